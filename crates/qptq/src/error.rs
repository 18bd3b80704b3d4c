//! The error type of the post-training techniques.

use thiserror::Error;

/// What can go wrong in a post-training technique.
#[derive(Debug, Error)]
pub enum PtqError {
    /// The graph could not be read or rewritten.
    #[error(transparent)]
    Graph(#[from] qgraph::GraphError),
    /// The interpreter failed.
    #[error(transparent)]
    Exec(#[from] qexec::ExecError),
    /// The simulation failed.
    #[error(transparent)]
    Calib(#[from] qcalib::CalibError),
    /// A gradient could not be computed.
    #[error(transparent)]
    Grad(#[from] qgrad::GradError),
    /// The data given does not fit the model.
    #[error("{0}")]
    Data(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, PtqError>;

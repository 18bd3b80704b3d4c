//! The error type of quantization-aware training.

use thiserror::Error;

/// What can go wrong in training.
#[derive(Debug, Error)]
pub enum TrainError {
    /// The graph could not be read or written.
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
    /// The data or labels given do not fit the model, or an option is out of range.
    #[error("{0}")]
    Data(String),
    /// A checkpoint could not be written, read, or does not belong to this job.
    #[error("checkpoint {path}: {detail}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The loss became NaN or infinite.
    #[error("the loss is {loss} at epoch {epoch}, step {step}: lower the learning rate")]
    Diverged {
        /// The loss value.
        loss: f64,
        /// Epoch (from 1).
        epoch: usize,
        /// Step within the epoch (from 1).
        step: usize,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

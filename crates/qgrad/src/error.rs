//! The error type of the gradient engine.

use thiserror::Error;

/// What can go wrong computing a gradient.
#[derive(Debug, Error)]
pub enum GradError {
    /// A layer or its operands have shapes the rule cannot take.
    #[error("{op}: {detail}")]
    Shape {
        /// The op (or node) concerned.
        op: String,
        /// What does not fit.
        detail: String,
    },
    /// The op or attribute has no gradient rule.
    #[error("{op}: no gradient rule ({detail})")]
    Unsupported {
        /// The op concerned.
        op: String,
        /// Which form is missing.
        detail: String,
    },
    /// A node's attributes could not be read.
    #[error(transparent)]
    Graph(#[from] qgraph::GraphError),
    /// A product failed.
    #[error("matrix product: {0}")]
    Product(String),
    /// A rule produced a NaN or an infinity.
    #[error(
        "{op}: the gradient by '{value}' is NaN or infinite (its forward values reach a pole or an overflow: a zero under a Sqrt, Div or Log, an extreme mask)"
    )]
    NonFinite {
        /// The node whose rule produced it (name and op type).
        op: String,
        /// The input it is the gradient by.
        value: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, GradError>;

pub(crate) fn shape_error(op: &str, detail: impl Into<String>) -> GradError {
    GradError::Shape { op: op.into(), detail: detail.into() }
}

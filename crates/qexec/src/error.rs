//! `ExecError`: every way planning or running a graph can fail. Each variant names the node, op or
//! tensor concerned, so a user can find the culprit in their model or data.

use qgraph::GraphError;

/// Errors of the `qexec` crate.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The graph has a node whose op the interpreter does not implement (found while planning,
    /// before anything runs).
    #[error("unsupported op {domain}{op} (opset {opset}) at node '{node}'")]
    UnsupportedOp {
        /// The op type.
        op: String,
        /// The node name.
        node: String,
        /// The op domain followed by `::` when not the default domain, else empty.
        domain: String,
        /// The opset version the model imports for that domain.
        opset: i64,
    },
    /// A node's attributes or static inputs are invalid for its op.
    #[error("node '{node}' ({op}): {detail}")]
    Invalid {
        /// The node name.
        node: String,
        /// The op type.
        op: String,
        /// What is wrong.
        detail: String,
    },
    /// A kernel failed on the tensors it was given (shape or dtype mismatch at run time).
    #[error("node '{node}' ({op}) failed: {detail}")]
    Kernel {
        /// The node name.
        node: String,
        /// The op type.
        op: String,
        /// What is wrong.
        detail: String,
    },
    /// A graph input was not fed.
    #[error("graph input '{name}' was not provided")]
    MissingInput {
        /// The input name.
        name: String,
    },
    /// A feed names no graph input.
    #[error("'{name}' is not an input of the graph (inputs: {inputs})")]
    UnknownInput {
        /// The name given.
        name: String,
        /// The graph's input names, comma separated.
        inputs: String,
    },
    /// A fed tensor does not match the declared dtype or shape of its graph input.
    #[error("graph input '{name}': expected {expected}, got {got}")]
    InputMismatch {
        /// The input name.
        name: String,
        /// The declared dtype and shape.
        expected: String,
        /// The fed dtype and shape.
        got: String,
    },
    /// Resuming needs a value that is neither recomputed nor in the cache.
    #[error("resuming needs value '{name}' (read by node '{node}'), which is not in the cache")]
    MissingValue {
        /// The value name.
        name: String,
        /// The node that reads it.
        node: String,
    },
    /// The hook refused a tensor.
    #[error("hook failed on tensor '{name}': {source}")]
    Hook {
        /// The tensor name.
        name: String,
        /// The hook's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The thread pool could not be built.
    #[error("cannot start {threads} worker threads: {detail}")]
    ThreadPool {
        /// The requested count.
        threads: usize,
        /// The OS or rayon error.
        detail: String,
    },
    /// An error of the graph layer (e.g. a cycle, a mistyped attribute).
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, ExecError>;

/// The error a kernel returns: a description that the session wraps with node and op.
pub(crate) type KernelResult<T> = std::result::Result<T, String>;

//! `GraphError`: every way loading, checking, transforming or saving a graph can fail, each variant
//! naming the node, tensor or file concerned so the user can find the culprit.

use std::path::PathBuf;

/// Errors of the `qgraph` crate.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Loading a model file failed.
    #[error("{path}: {source}")]
    InFile {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: Box<GraphError>,
    },
    /// The bytes end in the middle of a protobuf message: the file is cut short.
    #[error("truncated ONNX file: {detail}")]
    Truncated {
        /// What the decoder saw.
        detail: String,
    },
    /// The bytes are not an ONNX model (not protobuf, or a protobuf without a graph).
    #[error("not an ONNX model: {detail}")]
    NotOnnx {
        /// What is wrong.
        detail: String,
    },
    /// A tensor or value has an element type the IR does not hold.
    #[error("tensor '{tensor}' has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Tensor or value name.
        tensor: String,
        /// The ONNX dtype name.
        dtype: String,
    },
    /// A tensor's stored data does not match its declared shape and dtype.
    #[error("tensor '{tensor}': {detail}")]
    TensorData {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// A tensor stored outside the model file could not be read.
    #[error("tensor '{tensor}': external data {path}: {detail}")]
    ExternalData {
        /// Tensor name.
        tensor: String,
        /// The external file as named in the model.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Two producers (initializer, graph input or node output) define the same value name.
    #[error("value '{name}' is defined twice (second definition by {by})")]
    DuplicateValue {
        /// The value name.
        name: String,
        /// The second definer.
        by: String,
    },
    /// A node consumes a value nothing defines.
    #[error("node '{node}' ({op}) reads '{input}', which no node, initializer or graph input defines")]
    DanglingInput {
        /// Node name.
        node: String,
        /// Node op type.
        op: String,
        /// The undefined input name.
        input: String,
    },
    /// A graph output is not defined by anything.
    #[error("graph output '{output}' is not produced by any node, initializer or input")]
    DanglingOutput {
        /// The output name.
        output: String,
    },
    /// The nodes form a cycle.
    #[error("the graph has a cycle through node '{node}' ({op})")]
    Cycle {
        /// A node on the cycle.
        node: String,
        /// Its op type.
        op: String,
    },
    /// An attribute is missing, of the wrong type, or has an invalid value.
    #[error("node '{node}' ({op}): attribute '{attr}': {detail}")]
    Attribute {
        /// Node name.
        node: String,
        /// Node op type.
        op: String,
        /// Attribute name.
        attr: String,
        /// What is wrong.
        detail: String,
    },
    /// Shape inference found inputs an op cannot accept.
    #[error("node '{node}' ({op}): {detail}")]
    Shape {
        /// Node name.
        node: String,
        /// Node op type.
        op: String,
        /// What is wrong.
        detail: String,
    },
    /// A construct the IR does not support.
    #[error("unsupported: {detail}")]
    Unsupported {
        /// What is not supported.
        detail: String,
    },
    /// The graph could not be encoded as ONNX.
    #[error("cannot encode ONNX: {detail}")]
    Encode {
        /// What is wrong.
        detail: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = GraphError> = std::result::Result<T, E>;

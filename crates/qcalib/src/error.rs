//! `CalibError`: every way building, calibrating, running or exporting a simulation can fail.
//! Each variant names what is at fault — a config key path, a tensor, a file — so the user can
//! find it.

use std::path::PathBuf;

/// Errors of the `qcalib` crate.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// A quantsim config that does not follow the schema (spec §3.1).
    #[error("quantsim config: {path}: {detail}")]
    Config {
        /// JSON key path of the offending entry, e.g. `op_type.Conv.is_output_quantized`.
        path: String,
        /// What is wrong, with the offending value.
        detail: String,
    },
    /// A config name that is neither a built-in preset nor a readable file.
    #[error("unknown quantsim config '{name}' (built-in: {known}; or give a path to a JSON file)")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// Built-in preset names, comma separated.
        known: String,
    },
    /// A setting the simulation cannot honour for one tensor or quantizer.
    #[error("quantizer of '{tensor}': {detail}")]
    Quantizer {
        /// The tensor the quantizer sits on.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// Calibration data that cannot be used.
    #[error("calibration data: {0}")]
    Data(String),
    /// A quantizer saw no data during calibration (or only NaN).
    #[error("quantizer of '{tensor}' saw no usable data during calibration ({detail})")]
    NoStatistics {
        /// The tensor.
        tensor: String,
        /// Why (no batch reached it, only NaN, …).
        detail: String,
    },
    /// An encodings file that cannot be read back.
    #[error("encodings {path}: {detail}")]
    Encodings {
        /// File (or `<memory>`).
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A statistics file that is corrupt or of another version.
    #[error("statistics file {path}: {detail}")]
    Statistics {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The graph layer reported an error.
    #[error(transparent)]
    Graph(#[from] qgraph::GraphError),
    /// The interpreter reported an error.
    #[error(transparent)]
    Exec(#[from] qexec::ExecError),
    /// A kernel rejected its settings.
    #[error("{context}: {source}")]
    Kernel {
        /// Which tensor or quantizer.
        context: String,
        /// The kernel error.
        source: qkernels::KernelError,
    },
}

/// Result alias of the crate.
pub type Result<T, E = CalibError> = std::result::Result<T, E>;

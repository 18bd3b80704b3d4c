//! `KernelError`: invalid quantizer settings or mismatched buffers given to a kernel.

/// Errors of the `qkernels` crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A bitwidth outside 2..=16 (or 32 for bias bookkeeping).
    #[error("unsupported bitwidth {0} (2..=16, or 32)")]
    Bitwidth(u32),
    /// A range with a NaN bound.
    #[error("the observed range [{min}, {max}] is not a number")]
    NanRange {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// Per-channel data whose layout does not fit the encodings.
    #[error("per-channel layout: {0}")]
    Layout(String),
    /// Two tensors compared by a metric differ in length.
    #[error("metric inputs differ in length: {0} vs {1}")]
    LengthMismatch(usize, usize),
}

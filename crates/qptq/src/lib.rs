//! `qptq`: post-training quantization techniques that make a model quantization-friendly before
//! any precision is chosen — cross-layer equalization with high-bias absorption, bias correction
//! (empirical and analytical) and batch-norm re-estimation.
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod bias_correction;
mod bn_reestimate;
mod equalize;
mod error;
mod layers;
mod watch;

pub use bias_correction::{BiasCorrectionKind, BiasCorrectionReport, CorrectedLayer, correct_bias};
pub use bn_reestimate::{BnReestimationReport, ReestimatedBn, reestimate_batch_norms};
pub use equalize::{AbsorbedBias, EqualizeOptions, EqualizeReport, ScaledSet, equalize};
pub use error::{PtqError, Result};

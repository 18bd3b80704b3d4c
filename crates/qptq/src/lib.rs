//! `qptq`: post-training quantization techniques that make a model quantization-friendly before
//! any precision is chosen — cross-layer equalization with high-bias absorption, bias correction
//! (empirical and analytical), batch-norm re-estimation, AdaRound's learned weight rounding and
//! sequential MSE's weight encodings.
#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]

mod adaround;
mod bias_correction;
mod bn_reestimate;
mod equalize;
mod error;
mod layers;
mod seq_mse;
mod watch;
mod weight_layers;

pub use adaround::{AdaroundOptions, AdaroundReport, Adarounded, RoundedLayer, adaround};
pub use bias_correction::{BiasCorrectionKind, BiasCorrectionReport, CorrectedLayer, correct_bias};
pub use bn_reestimate::{
    BnReestimationReport, ReestimatedBn, fold_batch_norms_of_simulation, reestimate_batch_norms,
};
pub use equalize::{AbsorbedBias, EqualizeOptions, EqualizeReport, ScaledSet, equalize};
pub use error::{PtqError, Result};
pub use seq_mse::{SearchedLayer, SeqMseOptions, SeqMseReport, SeqMsed, seq_mse};

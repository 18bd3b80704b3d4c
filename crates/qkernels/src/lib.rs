//! `qkernels`: the numeric core of quantization simulation — encodings computed from observed
//! ranges exactly as AIMET computes them, quantize-dequantize ("fake-quant") per tensor and per
//! channel, fp16/bf16 fake-casts, running statistics (min/max, AIMET's TF-enhanced histogram, a
//! mergeable histogram) and error metrics (MSE, SQNR, AIMET's PSNR).
//! A leaf crate: it depends on no other crate of the workspace.
//!
//! Every kernel here is the scalar reference that defines the semantics; vectorised bodies must
//! reproduce it bit for bit.
#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]

pub mod dispatch;
mod encoding;
mod error;
mod fake_quant;
pub mod fastmath;
mod float_cast;
mod histogram;
mod metrics;
mod stats;

pub use encoding::{Encoding, MIN_SCALE, QuantSpec};
pub use error::KernelError;
pub use fake_quant::{
    Rounding, fake_quant, fake_quant_per_block, fake_quant_per_channel, fake_quant_with, quantize_to_int,
};
pub use float_cast::{fake_cast_bf16, fake_cast_f16};
pub use histogram::{MergeableHistogram, TF_BUCKETS, TfHistogram};
pub use metrics::{dot_sum, mse, psnr_aimet, sqnr_db, squared_error_sum};
pub use stats::{ChannelMinMax, MinMax};

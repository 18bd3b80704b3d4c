//! `qkernels`: the numeric core of quantization simulation — encodings computed from observed
//! ranges exactly as AIMET computes them, quantize-dequantize ("fake-quant") per tensor and per
//! channel, fp16/bf16 fake-casts, running statistics (min/max, AIMET's TF-enhanced histogram, a
//! mergeable histogram) and error metrics (MSE, SQNR, AIMET's PSNR).
//! A leaf crate: it depends on no other crate of the workspace.
//!
//! Every kernel here is the scalar reference that defines the semantics; vectorised bodies must
//! reproduce it bit for bit.
//!
//! ```
//! use qkernels::{Encoding, QuantSpec, fake_quant};
//! let enc = Encoding::from_range(-1.0, 2.0, QuantSpec::asymmetric(8)).unwrap();
//! assert_eq!(enc.offset, -85.0);
//! let mut x = [0.5f32, 7.0, f32::NAN];
//! fake_quant(&mut x, &enc);
//! assert_eq!(x[1] as f64, enc.max as f32 as f64);
//! ```
#![deny(unsafe_code)]

pub mod dispatch;
mod encoding;
mod error;
mod fake_quant;
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
pub use metrics::{mse, psnr_aimet, sqnr_db};
pub use stats::{ChannelMinMax, MinMax};

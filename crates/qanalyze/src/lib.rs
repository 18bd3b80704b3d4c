//! `qanalyze`: per-layer quantization sensitivity — which layers hurt when quantized — scored
//! the way AIMET's `analyze_per_layer_sensitivity` scores them (spec §5.1–5.2).
//!
//! Status: the enable-one analysis with AIMET's PSNR and SQNR; disable-one, the whole-model checks,
//! suffix-only recomputation and the HTML report arrive with the rest of the `qanalyze` issue.
#![forbid(unsafe_code)]

mod sensitivity;

pub use sensitivity::{AnalyzeError, LayerScore, Metric, enable_one, layers};

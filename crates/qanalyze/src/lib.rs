//! `qanalyze`: per-layer quantization sensitivity — which layers hurt when quantized — scored
//! the way AIMET's `analyze_per_layer_sensitivity` scores them (spec §5.1–5.2).
//!
//! Status: enable-one (resuming each layer from the FP32 values) and disable-one analyses and the
//! whole-model checks, with AIMET's PSNR or SQNR; the HTML report, per-layer MSE and ranges arrive
//! with the rest of the `qanalyze` issue.
#![forbid(unsafe_code)]

mod sensitivity;

pub use sensitivity::{
    AnalyzeError, FloatReference, LayerScore, Metric, ModelChecks, disable_one, enable_one, layers,
    model_checks,
};

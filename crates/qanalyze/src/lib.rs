//! `qanalyze`: per-layer quantization sensitivity — which layers hurt when quantized — scored
//! the way AIMET's `analyze_per_layer_sensitivity` scores them (spec §5.1–5.2).
//!
//! Also: whole-model checks, disable-one, per-layer output MSE, quantizer ranges, histograms, and
//! the analysis report (JSON, terminal table, self-contained HTML with inline SVG charts).
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod analysis;
mod enable_one_cache;
mod forward_walk;
mod quant_analyzer;
mod report;
mod sensitivity;

pub use analysis::{
    HISTOGRAM_BINS, LayerMse, RangeEntry, TensorHistogram, histograms, per_layer_mse, ranges,
};
pub use enable_one_cache::{EnableOneCache, enable_one_cached};
pub use quant_analyzer::{AnalyzeOptions, AnalyzeStep, analyze};
pub use report::AnalysisReport;

pub use sensitivity::{
    AnalyzeError, DEFAULT_CACHE_BUDGET, ENABLE_ONE_BUDGET, FloatReference, LayerScore, Metric, ModelChecks,
    Outputs, Scorer, UserMetric, disable_one, enable_one, layers, model_checks,
};

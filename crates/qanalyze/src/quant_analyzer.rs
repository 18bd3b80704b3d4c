//! The whole analysis in one call, as AIMET's `QuantAnalyzer.analyze`: whole-model checks,
//! enable-one (and on request disable-one) sensitivity, per-layer output MSE, quantizer ranges and
//! the histograms of the most sensitive layers, gathered into an [`AnalysisReport`] whose model
//! name, settings and evaluations the caller fills in.

use std::time::Instant;

use qcalib::QuantSim;
use serde_json::json;

use crate::analysis::{histograms, per_layer_mse, ranges};
use crate::enable_one_cache::{EnableOneCache, enable_one_cached};
use crate::report::AnalysisReport;
use crate::sensitivity::{
    AnalyzeError, FloatReference, LayerScore, Metric, Scorer, disable_one, enable_one, layers, model_checks,
};

/// What [`analyze`] computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnalyzeOptions {
    /// The sensitivity metric.
    pub metric: Metric,
    /// Also score every layer with all quantizers on but its own (one full run per layer).
    pub disable_one: bool,
    /// How many of the most sensitive layers get activation and weight histograms.
    pub histograms: usize,
}

/// Progress of [`analyze`].
#[derive(Debug, Clone, PartialEq)]
pub enum AnalyzeStep {
    /// A stage starts with `total` layers to score.
    Stage {
        /// Stage name.
        name: &'static str,
        /// Layers in it.
        total: usize,
    },
    /// Layers done in the current stage.
    Layers(usize),
}

/// Analyzes the calibrated `sim` against `reference` (see the module doc); the simulation is left
/// as it was. The report's `model` and `settings` are empty and its `evaluations` none. With a
/// main (unsharded) `cache`, enable-one scores only the layers it does not know yet.
pub fn analyze(
    sim: &mut QuantSim,
    reference: &FloatReference,
    options: &AnalyzeOptions,
    cache: Option<&mut EnableOneCache>,
    progress: &mut dyn FnMut(AnalyzeStep),
) -> Result<AnalysisReport, AnalyzeError> {
    let mut seconds: Vec<(String, f64)> = Vec::new();
    let mut step = Instant::now();
    let mut lap = |name: &str| {
        seconds.push((name.to_string(), step.elapsed().as_secs_f64()));
        step = Instant::now();
    };
    let metric = options.metric;
    let checks = model_checks(sim, reference, metric)?;
    lap("whole-model checks");
    let layer_list = layers(sim)?;
    let known = cache.as_ref().map_or(0, |c| c.len());
    progress(AnalyzeStep::Stage { name: "enable one", total: layer_list.len().saturating_sub(known) });
    let mut layer_done = |done, _| progress(AnalyzeStep::Layers(done));
    let enabled = match cache {
        Some(c) if c.shard().is_some() => {
            return Err(AnalyzeError::Data("the analysis needs every layer's score, not a shard's".into()));
        }
        Some(c) => enable_one_cached(sim, reference, metric, c, &mut layer_done)?,
        None => enable_one(sim, reference, metric, &mut layer_done)?,
    };
    lap("enable one");
    let disabled = if options.disable_one {
        progress(AnalyzeStep::Stage { name: "disable one", total: layer_list.len() });
        let d = disable_one(sim, reference, metric, &mut |done, _| progress(AnalyzeStep::Layers(done)))?;
        lap("disable one");
        Some(d)
    } else {
        None
    };
    let mse = per_layer_mse(sim, reference)?;
    let range_list = ranges(sim);
    let mut worst: Vec<&LayerScore> = enabled.iter().collect();
    worst.sort_by(|x, y| y.sensitivity().total_cmp(&x.sensitivity()));
    let g = &sim.model().graph;
    let worst_nodes: Vec<qgraph::NodeId> =
        worst.iter().take(options.histograms).filter_map(|l| g.node_id(&l.layer)).collect();
    let histogram_list = histograms(sim, reference, &worst_nodes)?;
    lap("MSE, ranges, histograms");
    let layer_ops = layer_list
        .iter()
        .map(|(node, _)| (g.node(*node).name.clone(), g.node(*node).op_type.clone()))
        .collect();
    Ok(AnalysisReport {
        model: String::new(),
        settings: json!({}),
        metric: metric.name(),
        higher_is_better: metric.higher_is_better(),
        checks,
        evaluations: Vec::new(),
        layer_ops,
        enable_one: enabled,
        disable_one: disabled,
        mse,
        ranges: range_list,
        histograms: histogram_list,
        placement: sim.placement().report(g),
        seconds,
    })
}

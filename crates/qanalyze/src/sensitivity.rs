//! Per-layer sensitivity, "enable one" (spec §5.1): every quantizer of the calibrated simulation
//! off except one layer's — its outputs, parameters and the inputs no node produces — scored
//! against the FP32 outputs, for every layer in topological order. Encodings are not recomputed
//! between layers, exactly as AIMET does; afterwards every quantizer is restored.
//!
//! Only the layer's downstream is recomputed: the FP32 values of every tensor are kept from one
//! float run per batch (memory: all intermediates of the batch), and each layer's run resumes
//! from them (qexec `resume`).

use qcalib::{Feeds, QuantSim, QuantizerId};
use qgraph::{NodeId, Tensor};

/// Errors of the analysis.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    /// The simulation failed.
    #[error(transparent)]
    Calib(#[from] qcalib::CalibError),
    /// The FP32 reference run failed.
    #[error(transparent)]
    Exec(#[from] qexec::ExecError),
    /// The data cannot be scored.
    #[error("analysis: {0}")]
    Data(String),
}

/// How a layer's effect on the outputs is scored (higher is better for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// AIMET's PSNR (spec §5.2): pooled over all samples and elements, minimum over outputs.
    Psnr,
    /// Signal-to-quantization-noise ratio in dB, pooled the same way.
    Sqnr,
}

impl Metric {
    fn score(self, reference: &[f32], simulated: &[f32]) -> Result<f64, AnalyzeError> {
        let kernel = |e: qkernels::KernelError| AnalyzeError::Data(e.to_string());
        match self {
            Metric::Psnr => qkernels::psnr_aimet(reference, simulated)
                .map_err(kernel)?
                .ok_or_else(|| AnalyzeError::Data("the FP32 outputs are not finite".into())),
            Metric::Sqnr => qkernels::sqnr_db(reference, simulated).map_err(kernel),
        }
    }
}

/// One layer's score.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerScore {
    /// The node name (AIMET's op name).
    pub layer: String,
    /// The metric with only this layer quantized.
    pub score: f64,
}

/// The layers of the simulation as AIMET counts them (every node but `Constant`, in topological
/// order) with their currently enabled quantizers; layers without any are left out.
pub fn layers(sim: &QuantSim) -> Result<Vec<(NodeId, Vec<QuantizerId>)>, AnalyzeError> {
    let g = &sim.model().graph;
    let p = sim.placement();
    let mut out = Vec::new();
    for node in g.topological_order().map_err(qcalib::CalibError::from)? {
        if g.node(node).op_type == "Constant" {
            continue;
        }
        let qs: Vec<QuantizerId> =
            p.op_quantizers(g, node).into_iter().filter(|&q| p.quantizer(q).enabled).collect();
        if !qs.is_empty() {
            out.push((node, qs));
        }
    }
    Ok(out)
}

/// The float outputs of a batch list, concatenated per output over all batches.
fn pooled(outputs: Vec<Vec<Tensor>>) -> Result<Vec<Vec<f32>>, AnalyzeError> {
    let mut pooled: Vec<Vec<f32>> = Vec::new();
    for batch in outputs {
        for (i, t) in batch.into_iter().enumerate() {
            let Some(a) = t.as_f32() else { continue };
            if pooled.len() <= i {
                pooled.resize(i + 1, Vec::new());
            }
            pooled[i].extend(a.iter().copied());
        }
    }
    Ok(pooled)
}

fn run_all(
    batches: &[Feeds],
    run: impl Fn(&[(&str, Tensor)]) -> Result<Vec<Tensor>, AnalyzeError>,
) -> Result<Vec<Vec<f32>>, AnalyzeError> {
    let mut outs = Vec::with_capacity(batches.len());
    for feeds in batches {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        outs.push(run(&named)?);
    }
    pooled(outs)
}

/// Where a resumed run must start when only the given quantizers are on: the tensors they sit on,
/// except that a quantized node output starts from its producer's inputs (the producer reruns so
/// the hook sees its output).
fn changed_values(sim: &QuantSim, qs: &[QuantizerId]) -> Vec<qgraph::ValueId> {
    let g = &sim.model().graph;
    let mut out = Vec::new();
    for t in sim.placement().tensors().iter().filter(|t| qs.contains(&t.quantizer)) {
        match g.producer_node(t.value) {
            Some(node) if g.static_value(t.value).is_none() => {
                out.extend(node.inputs().iter().flatten().copied())
            }
            _ => out.push(t.value),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Scores every layer with only its quantizers enabled. `progress(done, total)` is called after
/// each layer. The simulation is restored before returning (also on error).
pub fn enable_one(
    sim: &mut QuantSim,
    batches: &[Feeds],
    metric: Metric,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerScore>, AnalyzeError> {
    if batches.is_empty() {
        return Err(AnalyzeError::Data("no batches to score the layers on".into()));
    }
    let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(threads))?;
    // FP32 values of every tensor, per batch: a layer's run recomputes only what lies downstream
    // of its quantizers and reads the rest from here.
    let mut caches = Vec::with_capacity(batches.len());
    let mut reference_outputs = Vec::with_capacity(batches.len());
    for feeds in batches {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let run = float.run_with(&named, qexec::RunOptions::default().keep(qexec::Keep::All))?;
        reference_outputs.push(run.outputs);
        caches.push(run.kept);
    }
    let reference = pooled(reference_outputs)?;
    if reference.iter().all(Vec::is_empty) {
        return Err(AnalyzeError::Data("the model has no float outputs to score".into()));
    }
    let layers = layers(sim)?;
    let set = |sim: &mut QuantSim, qs: &[QuantizerId], on: bool| {
        let p = sim.placement_mut();
        qs.iter().for_each(|&q| p.quantizer_mut(q).enabled = on);
    };
    with_enabled(sim, |sim| {
        let all = sim.placement().quantizer_ids();
        set(sim, &all, false);
        let g_inputs: Vec<qgraph::ValueId> = sim.model().graph.inputs().to_vec();
        let mut scores = Vec::with_capacity(layers.len());
        for (k, (node, qs)) in layers.iter().enumerate() {
            set(sim, qs, true);
            sim.refresh()?;
            let changed = changed_values(sim, qs);
            let simulated = if changed.iter().any(|v| g_inputs.contains(v)) {
                run_all(batches, |f| Ok(sim.run(f)?))?
            } else {
                pooled(caches.iter().map(|c| sim.run_resumed(c, &changed)).collect::<Result<_, _>>()?)?
            };
            let score = min_over_outputs(metric, &reference, &simulated)?;
            scores.push(LayerScore { layer: sim.model().graph.node(*node).name.clone(), score });
            set(sim, qs, false);
            progress(k + 1, layers.len());
        }
        Ok(scores)
    })
}

/// The metric of every output, the worst (lowest) one.
fn min_over_outputs(
    metric: Metric,
    reference: &[Vec<f32>],
    simulated: &[Vec<f32>],
) -> Result<f64, AnalyzeError> {
    let mut score = f64::INFINITY;
    for (r, s) in reference.iter().zip(simulated) {
        if !r.is_empty() {
            score = score.min(metric.score(r, s)?);
        }
    }
    Ok(score)
}

/// The FP32 outputs of `batches`, pooled per output.
fn float_reference(sim: &QuantSim, batches: &[Feeds], threads: usize) -> Result<Vec<Vec<f32>>, AnalyzeError> {
    if batches.is_empty() {
        return Err(AnalyzeError::Data("no batches to score on".into()));
    }
    let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(threads))?;
    let reference = run_all(batches, |f| Ok(float.run(f)?))?;
    if reference.iter().all(Vec::is_empty) {
        return Err(AnalyzeError::Data("the model has no float outputs to score".into()));
    }
    Ok(reference)
}

/// Runs `body` with some quantizers switched on or off, then restores every quantizer and the
/// session, whatever `body` returned.
fn with_enabled<T>(
    sim: &mut QuantSim,
    body: impl FnOnce(&mut QuantSim) -> Result<T, AnalyzeError>,
) -> Result<T, AnalyzeError> {
    let all: Vec<QuantizerId> = sim.placement().quantizer_ids();
    let was: Vec<bool> = all.iter().map(|&q| sim.placement().quantizer(q).enabled).collect();
    let result = body(sim);
    let p = sim.placement_mut();
    for (&q, &on) in all.iter().zip(&was) {
        p.quantizer_mut(q).enabled = on;
    }
    sim.refresh()?;
    result
}

/// Per-layer sensitivity, "disable one" (spec §5.4 step 4): everything quantized except one
/// layer's quantizers, for every layer in topological order (full forward passes).
pub fn disable_one(
    sim: &mut QuantSim,
    batches: &[Feeds],
    metric: Metric,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerScore>, AnalyzeError> {
    let reference = float_reference(sim, batches, threads)?;
    let layers = layers(sim)?;
    with_enabled(sim, |sim| {
        let mut scores = Vec::with_capacity(layers.len());
        for (k, (node, qs)) in layers.iter().enumerate() {
            qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = false);
            sim.refresh()?;
            let simulated = run_all(batches, |f| Ok(sim.run(f)?))?;
            let score = min_over_outputs(metric, &reference, &simulated)?;
            scores.push(LayerScore { layer: sim.model().graph.node(*node).name.clone(), score });
            qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = true);
            progress(k + 1, layers.len());
        }
        Ok(scores)
    })
}

/// How much of the damage comes from weights and how much from activations (spec §5.4 step 2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelChecks {
    /// Every enabled quantizer on.
    pub all: f64,
    /// Only parameter quantizers on.
    pub weights_only: f64,
    /// Only activation quantizers on.
    pub activations_only: f64,
}

/// Scores the whole simulation, its weights alone and its activations alone (no recalibration).
pub fn model_checks(
    sim: &mut QuantSim,
    batches: &[Feeds],
    metric: Metric,
    threads: usize,
) -> Result<ModelChecks, AnalyzeError> {
    let reference = float_reference(sim, batches, threads)?;
    let score = |sim: &QuantSim| -> Result<f64, AnalyzeError> {
        let simulated = run_all(batches, |f| Ok(sim.run(f)?))?;
        min_over_outputs(metric, &reference, &simulated)
    };
    let all = score(sim)?;
    let mut only = |params: bool| {
        with_enabled(sim, |sim| {
            let ids = sim.placement().quantizer_ids();
            for q in ids {
                if sim.placement().quantizer(q).is_param != params {
                    sim.placement_mut().quantizer_mut(q).enabled = false;
                }
            }
            sim.refresh()?;
            score(sim)
        })
    };
    let weights_only = only(true)?;
    let activations_only = only(false)?;
    Ok(ModelChecks { all, weights_only, activations_only })
}

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

/// How a layer's effect on the outputs is scored (higher is better for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// AIMET's PSNR (spec §5.2): pooled over all samples and elements, minimum over outputs.
    Psnr,
    /// Signal-to-quantization-noise ratio in dB, pooled the same way.
    Sqnr,
    /// The SQNR of AIMET's AMP phase 1 (spec §7.11), first output only: per batch
    /// `mean(x²) / (mean((x − x̂)²) + 1e−4)`, summed over batches, divided by the sample count
    /// (not the batch count, as AIMET does), in dB.
    AmpSqnr,
}

impl Metric {
    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Psnr => "psnr_db",
            Metric::Sqnr => "sqnr_db",
            Metric::AmpSqnr => "amp_sqnr_db",
        }
    }

    fn pooled_score(self, reference: &[f32], simulated: &[f32]) -> Result<f64, AnalyzeError> {
        let kernel = |e: qkernels::KernelError| AnalyzeError::Data(e.to_string());
        match self {
            Metric::Psnr => qkernels::psnr_aimet(reference, simulated)
                .map_err(kernel)?
                .ok_or_else(|| AnalyzeError::Data("the FP32 outputs are not finite".into())),
            Metric::Sqnr | Metric::AmpSqnr => qkernels::sqnr_db(reference, simulated).map_err(kernel),
        }
    }

    /// The score of simulated outputs against the FP32 ones, both given per batch and output.
    fn score(self, reference: &BatchOutputs, simulated: &BatchOutputs) -> Result<f64, AnalyzeError> {
        if self == Metric::AmpSqnr {
            let mut sum = 0f64;
            for (r, s) in reference.per_batch.iter().zip(&simulated.per_batch) {
                let (Some(r), Some(s)) = (r.first(), s.first()) else { continue };
                if r.len() != s.len() {
                    return Err(AnalyzeError::Data(format!(
                        "output sizes differ: {} vs {}",
                        r.len(),
                        s.len()
                    )));
                }
                let n = r.len().max(1) as f64;
                let signal: f64 = r.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n;
                let noise: f64 =
                    r.iter().zip(s).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>() / n;
                sum += signal / (noise + 1e-4);
            }
            return Ok(10.0 * (sum / reference.samples.max(1) as f64).log10());
        }
        let (r, s) = (reference.pooled(), simulated.pooled());
        let mut score = f64::INFINITY;
        for (r, s) in r.iter().zip(&s) {
            if !r.is_empty() {
                score = score.min(self.pooled_score(r, s)?);
            }
        }
        Ok(score)
    }
}

/// The float outputs of a list of batches: per batch, per output (non-float outputs left empty).
#[derive(Debug, Clone, Default)]
struct BatchOutputs {
    per_batch: Vec<Vec<Vec<f32>>>,
    samples: usize,
}

impl BatchOutputs {
    fn push(&mut self, outputs: Vec<Tensor>) {
        self.samples += outputs.first().and_then(|t| t.shape().first().copied()).unwrap_or(1);
        self.per_batch.push(
            outputs
                .iter()
                .map(|t| t.as_f32().map(|a| a.iter().copied().collect()).unwrap_or_default())
                .collect(),
        );
    }

    /// Each output concatenated over all batches.
    fn pooled(&self) -> Vec<Vec<f32>> {
        let mut pooled: Vec<Vec<f32>> = Vec::new();
        for batch in &self.per_batch {
            for (i, t) in batch.iter().enumerate() {
                if pooled.len() <= i {
                    pooled.resize(i + 1, Vec::new());
                }
                pooled[i].extend_from_slice(t);
            }
        }
        pooled
    }

    fn is_empty(&self) -> bool {
        self.per_batch.iter().all(|b| b.iter().all(Vec::is_empty))
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

fn run_all(
    batches: &[Feeds],
    run: impl Fn(&[(&str, Tensor)]) -> Result<Vec<Tensor>, AnalyzeError>,
) -> Result<BatchOutputs, AnalyzeError> {
    let mut outs = BatchOutputs::default();
    for feeds in batches {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        outs.push(run(&named)?);
    }
    Ok(outs)
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

/// The FP32 run of a list of batches, kept to score simulations against and to resume from: the
/// value of every tensor per batch (memory: all intermediates of every batch) and the outputs.
pub struct FloatReference {
    batches: Vec<Feeds>,
    caches: Vec<qexec::ValueCache>,
    outputs: BatchOutputs,
}

impl FloatReference {
    /// Runs the float model of `sim` on `batches`.
    pub fn new(sim: &QuantSim, batches: &[Feeds], threads: usize) -> Result<FloatReference, AnalyzeError> {
        if batches.is_empty() {
            return Err(AnalyzeError::Data("no batches to score on".into()));
        }
        let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(threads))?;
        let mut caches = Vec::with_capacity(batches.len());
        let mut outputs = BatchOutputs::default();
        for feeds in batches {
            let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let run = float.run_with(&named, qexec::RunOptions::default().keep(qexec::Keep::All))?;
            outputs.push(run.outputs);
            caches.push(run.kept);
        }
        if outputs.is_empty() {
            return Err(AnalyzeError::Data("the model has no float outputs to score".into()));
        }
        Ok(FloatReference { batches: batches.to_vec(), caches, outputs })
    }

    /// The batches.
    pub fn batches(&self) -> &[Feeds] {
        &self.batches
    }

    /// The FP32 value of every tensor, per batch.
    pub fn values(&self) -> &[qexec::ValueCache] {
        &self.caches
    }

    /// Samples in the batches.
    pub fn samples(&self) -> usize {
        self.outputs.samples
    }

    /// Nodes a [`FloatReference::score_only`] run with `enabled` recomputes per batch (the others
    /// are read from the FP32 values); all nodes when a graph input is quantized.
    pub fn nodes_recomputed(&self, sim: &QuantSim, enabled: &[QuantizerId]) -> usize {
        let g = &sim.model().graph;
        let changed = changed_values(sim, enabled);
        if changed.iter().any(|v| g.inputs().contains(v)) {
            return g.node_count();
        }
        g.downstream_nodes(&changed).len()
    }

    /// Scores the simulation as it is (full forward passes).
    pub fn score(&self, sim: &QuantSim, metric: Metric) -> Result<f64, AnalyzeError> {
        let simulated = run_all(&self.batches, |f| Ok(sim.run(f)?))?;
        metric.score(&self.outputs, &simulated)
    }

    /// Scores the simulation when `enabled` are its only enabled quantizers: only what lies
    /// downstream of them is recomputed, the rest is read from the FP32 values. The caller
    /// guarantees that no other quantizer is enabled.
    pub fn score_only(
        &self,
        sim: &QuantSim,
        enabled: &[QuantizerId],
        metric: Metric,
    ) -> Result<f64, AnalyzeError> {
        let changed = changed_values(sim, enabled);
        let inputs = sim.model().graph.inputs();
        if changed.iter().any(|v| inputs.contains(v)) {
            return self.score(sim, metric);
        }
        let mut simulated = BatchOutputs::default();
        for cache in &self.caches {
            simulated.push(sim.run_resumed(cache, &changed)?);
        }
        metric.score(&self.outputs, &simulated)
    }
}

/// Scores every layer with only its quantizers enabled, against `reference` (the FP32 run of the
/// batches to score on). `progress(done, total)` is called after each layer. The simulation is
/// restored before returning (also on error).
pub fn enable_one(
    sim: &mut QuantSim,
    reference: &FloatReference,
    metric: Metric,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerScore>, AnalyzeError> {
    let layers = layers(sim)?;
    let set = |sim: &mut QuantSim, qs: &[QuantizerId], on: bool| {
        let p = sim.placement_mut();
        qs.iter().for_each(|&q| p.quantizer_mut(q).enabled = on);
    };
    with_enabled(sim, |sim| {
        let all = sim.placement().quantizer_ids();
        set(sim, &all, false);
        let mut scores = Vec::with_capacity(layers.len());
        for (k, (node, qs)) in layers.iter().enumerate() {
            set(sim, qs, true);
            sim.refresh()?;
            let score = reference.score_only(sim, qs, metric)?;
            scores.push(LayerScore { layer: sim.model().graph.node(*node).name.clone(), score });
            set(sim, qs, false);
            progress(k + 1, layers.len());
        }
        Ok(scores)
    })
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
    reference: &FloatReference,
    metric: Metric,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerScore>, AnalyzeError> {
    let layers = layers(sim)?;
    with_enabled(sim, |sim| {
        let mut scores = Vec::with_capacity(layers.len());
        for (k, (node, qs)) in layers.iter().enumerate() {
            qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = false);
            sim.refresh()?;
            let score = reference.score(sim, metric)?;
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
    reference: &FloatReference,
    metric: Metric,
) -> Result<ModelChecks, AnalyzeError> {
    let score = |sim: &QuantSim| reference.score(sim, metric);
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

//! Per-layer sensitivity, "enable one" (spec §5.1): every quantizer of the calibrated simulation
//! off except one layer's — its outputs, parameters and the inputs no node produces — scored
//! against the FP32 outputs, for every layer in topological order. Encodings are not recomputed
//! between layers, exactly as AIMET does; afterwards every quantizer is restored.
//!
//! Scores come from a [`Scorer`]: the built-in [`Metric`]s (AIMET's PSNR, SQNR, AMP SQNR, MSE,
//! top-k logit PSNR, arg-max agreement) or a [`UserMetric`] closure; each says whether higher is
//! better, and [`LayerScore::sensitivity`] ranks layers the same way whatever the direction.
//!
//! Only the layer's downstream is recomputed: the FP32 values of every tensor are kept from one
//! float run per batch (memory: all intermediates of the batch), and each layer's run resumes
//! from them (qexec `resume`). Batches of a model that keeps samples apart run sample by sample,
//! one sample per thread (see [`FloatReference`]).

use qcalib::{Feeds, QuantSim, QuantizerId};
use qgraph::{NodeId, Tensor};
use rayon::prelude::*;

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

/// The built-in ways to score simulated outputs against the FP32 ones.
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
    /// Mean squared error pooled over samples, maximum over outputs (lower is better).
    Mse,
    /// AIMET's PSNR on the FP32 output's `k` largest logits of each row only (first output, last
    /// axis = classes): the logits a classification depends on.
    TopKPsnr(usize),
    /// Share of rows of the first output whose arg-max equals the FP32 arg-max.
    Top1Agreement,
}

/// A way to score simulated outputs against the FP32 outputs of the same batches. [`Metric`]
/// implements it; [`UserMetric`] wraps a closure (e.g. top-1 against labels).
pub trait Scorer {
    /// The name reports use.
    fn metric_name(&self) -> String;
    /// Whether a higher score means less damage.
    fn higher_is_better(&self) -> bool;
    /// The score of `simulated` against `reference`.
    fn score(&self, reference: &Outputs, simulated: &Outputs) -> Result<f64, AnalyzeError>;
}

impl<T: Scorer + ?Sized> Scorer for &T {
    fn metric_name(&self) -> String {
        (**self).metric_name()
    }
    fn higher_is_better(&self) -> bool {
        (**self).higher_is_better()
    }
    fn score(&self, reference: &Outputs, simulated: &Outputs) -> Result<f64, AnalyzeError> {
        (**self).score(reference, simulated)
    }
}

/// A metric given as a closure of (FP32 outputs, simulated outputs).
pub struct UserMetric<F> {
    name: String,
    higher_is_better: bool,
    f: F,
}

impl<F: Fn(&Outputs, &Outputs) -> Result<f64, String>> UserMetric<F> {
    /// A metric called `name`, scored by `f`.
    pub fn new(name: impl Into<String>, higher_is_better: bool, f: F) -> UserMetric<F> {
        UserMetric { name: name.into(), higher_is_better, f }
    }
}

impl<F: Fn(&Outputs, &Outputs) -> Result<f64, String>> Scorer for UserMetric<F> {
    fn metric_name(&self) -> String {
        self.name.clone()
    }
    fn higher_is_better(&self) -> bool {
        self.higher_is_better
    }
    fn score(&self, reference: &Outputs, simulated: &Outputs) -> Result<f64, AnalyzeError> {
        let s = (self.f)(reference, simulated)
            .map_err(|e| AnalyzeError::Data(format!("metric {}: {e}", self.name)))?;
        if s.is_nan() {
            return Err(AnalyzeError::Data(format!("metric {} returned NaN", self.name)));
        }
        Ok(s)
    }
}

fn sizes_differ(r: usize, s: usize) -> AnalyzeError {
    AnalyzeError::Data(format!("output sizes differ: {r} vs {s}"))
}

/// Output 0 of one batch, FP32 and simulated, as rows of `classes` logits.
struct BatchLogits {
    classes: usize,
    reference: Vec<f32>,
    simulated: Vec<f32>,
}

/// Classes of an output: the size of its last axis.
fn classes_of(t: &Tensor) -> usize {
    t.shape().last().copied().unwrap_or(1).max(1)
}

impl Metric {
    /// The name reports use.
    pub fn name(self) -> String {
        match self {
            Metric::Psnr => "psnr_db".into(),
            Metric::Sqnr => "sqnr_db".into(),
            Metric::AmpSqnr => "amp_sqnr_db".into(),
            Metric::Mse => "mse".into(),
            Metric::TopKPsnr(k) => format!("top{k}_psnr_db"),
            Metric::Top1Agreement => "top1_agreement".into(),
        }
    }

    /// Parses a name as [`Metric::name`] gives it, or without its `_db` unit (`top5_psnr`).
    pub fn parse(s: &str) -> Option<Metric> {
        let s = s.strip_suffix("_db").unwrap_or(s);
        Some(match s {
            "psnr" => Metric::Psnr,
            "sqnr" => Metric::Sqnr,
            "amp_sqnr" => Metric::AmpSqnr,
            "mse" => Metric::Mse,
            "top1_agreement" => Metric::Top1Agreement,
            _ => {
                let k: usize = s.strip_prefix("top")?.strip_suffix("_psnr")?.parse().ok()?;
                (k > 0).then_some(Metric::TopKPsnr(k))?
            }
        })
    }

    fn pooled_score(self, reference: &[f32], simulated: &[f32]) -> Result<f64, AnalyzeError> {
        let kernel = |e: qkernels::KernelError| AnalyzeError::Data(e.to_string());
        match self {
            Metric::Mse => qkernels::mse(reference, simulated).map_err(kernel),
            Metric::Sqnr => qkernels::sqnr_db(reference, simulated).map_err(kernel),
            _ => qkernels::psnr_aimet(reference, simulated)
                .map_err(kernel)?
                .ok_or_else(|| AnalyzeError::Data("the FP32 outputs are not finite".into())),
        }
    }

    fn amp_sqnr(reference: &Outputs, simulated: &Outputs) -> Result<f64, AnalyzeError> {
        let mut sum = 0f64;
        for (r, s) in reference.per_batch.iter().zip(&simulated.per_batch) {
            let (Some(r), Some(s)) = (r.first().map(floats), s.first().map(floats)) else { continue };
            if r.len() != s.len() {
                return Err(sizes_differ(r.len(), s.len()));
            }
            let n = r.len().max(1) as f64;
            let signal: f64 = r.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n;
            let noise: f64 =
                r.iter().zip(&s).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>() / n;
            sum += signal / (noise + 1e-4);
        }
        Ok(10.0 * (sum / reference.samples.max(1) as f64).log10())
    }

    /// Output 0 of every batch: the FP32 logits, the simulated ones and the row length.
    fn rows(reference: &Outputs, simulated: &Outputs) -> Result<Vec<BatchLogits>, AnalyzeError> {
        let mut out = Vec::new();
        for (r, s) in reference.per_batch.iter().zip(&simulated.per_batch) {
            let (Some(rt), Some(st)) = (r.first(), s.first()) else { continue };
            let (r, s) = (floats(rt), floats(st));
            if r.len() != s.len() {
                return Err(sizes_differ(r.len(), s.len()));
            }
            out.push(BatchLogits { classes: classes_of(rt), reference: r, simulated: s });
        }
        Ok(out)
    }

    fn top_k_psnr(k: usize, reference: &Outputs, simulated: &Outputs) -> Result<f64, AnalyzeError> {
        let (mut picked_r, mut picked_s) = (Vec::new(), Vec::new());
        for b in Self::rows(reference, simulated)? {
            for (row_r, row_s) in b.reference.chunks(b.classes).zip(b.simulated.chunks(b.classes)) {
                let mut order: Vec<usize> = (0..row_r.len()).collect();
                order.sort_by(|&a, &b| row_r[b].total_cmp(&row_r[a]).then(a.cmp(&b)));
                for &i in order.iter().take(k) {
                    picked_r.push(row_r[i]);
                    picked_s.push(row_s[i]);
                }
            }
        }
        Metric::Psnr.pooled_score(&picked_r, &picked_s)
    }

    fn top1_agreement(reference: &Outputs, simulated: &Outputs) -> Result<f64, AnalyzeError> {
        let argmax = |row: &[f32]| {
            row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
        };
        let (mut rows, mut same) = (0usize, 0usize);
        for b in Self::rows(reference, simulated)? {
            for (row_r, row_s) in b.reference.chunks(b.classes).zip(b.simulated.chunks(b.classes)) {
                rows += 1;
                same += usize::from(argmax(row_r) == argmax(row_s));
            }
        }
        if rows == 0 {
            return Err(AnalyzeError::Data("no rows to compare".into()));
        }
        Ok(same as f64 / rows as f64)
    }
}

impl Scorer for Metric {
    fn metric_name(&self) -> String {
        self.name()
    }

    fn higher_is_better(&self) -> bool {
        *self != Metric::Mse
    }

    fn score(&self, reference: &Outputs, simulated: &Outputs) -> Result<f64, AnalyzeError> {
        match *self {
            Metric::AmpSqnr => Metric::amp_sqnr(reference, simulated),
            Metric::TopKPsnr(0) => Err(AnalyzeError::Data("top-k PSNR needs k ≥ 1".into())),
            Metric::TopKPsnr(k) => Metric::top_k_psnr(k, reference, simulated),
            Metric::Top1Agreement => Metric::top1_agreement(reference, simulated),
            Metric::Psnr | Metric::Sqnr | Metric::Mse => {
                // Worst over outputs: the lowest PSNR/SQNR, the highest MSE.
                let mut worst: Option<f64> = None;
                for i in 0..reference.output_count() {
                    let (r, s) = (reference.pooled(i), simulated.pooled(i));
                    if r.is_empty() {
                        continue;
                    }
                    let v = self.pooled_score(&r, &s)?;
                    worst = Some(match worst {
                        None => v,
                        Some(w) if *self == Metric::Mse => w.max(v),
                        Some(w) => w.min(v),
                    });
                }
                Ok(worst.unwrap_or(if *self == Metric::Mse { 0.0 } else { f64::INFINITY }))
            }
        }
    }
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.as_f32().map(|a| a.iter().copied().collect()).unwrap_or_default()
}

/// The outputs of a list of batches, per batch and output, as the model produced them.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    per_batch: Vec<Vec<Tensor>>,
    samples: usize,
}

impl Outputs {
    fn push(&mut self, outputs: Vec<Tensor>) {
        self.samples += outputs.first().and_then(|t| t.shape().first().copied()).unwrap_or(1);
        self.per_batch.push(outputs);
    }

    /// Per batch, the model's outputs in order.
    pub fn batches(&self) -> &[Vec<Tensor>] {
        &self.per_batch
    }

    /// Samples over all batches (the first axis of the first output).
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Outputs per batch.
    pub fn output_count(&self) -> usize {
        self.per_batch.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Output `i` of every batch concatenated, as f32 (empty when it is not a float tensor).
    pub fn pooled(&self, i: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for batch in &self.per_batch {
            if let Some(a) = batch.get(i).and_then(Tensor::as_f32) {
                out.extend(a.iter().copied());
            }
        }
        out
    }

    fn is_empty(&self) -> bool {
        (0..self.output_count()).all(|i| {
            self.per_batch.iter().all(|b| b.get(i).and_then(Tensor::as_f32).is_none_or(|a| a.is_empty()))
        })
    }
}

/// One layer's score.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerScore {
    /// The node name (AIMET's op name).
    pub layer: String,
    /// The metric with only this layer quantized.
    pub score: f64,
    /// Whether a higher score means the layer hurts less.
    pub higher_is_better: bool,
}

impl LayerScore {
    /// How much the layer hurts, comparable across layers whatever the metric's direction:
    /// higher is more sensitive.
    pub fn sensitivity(&self) -> f64 {
        if self.higher_is_better { -self.score } else { self.score }
    }
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

/// Whether every batch can run sample by sample: the model keeps samples apart
/// ([`qexec::Session::keeps_samples_apart`]) and the feeds of each batch share their first axis.
fn splittable(float: &qexec::Session, batches: &[Feeds]) -> bool {
    float.keeps_samples_apart()
        && batches.iter().all(|b| {
            let n = b.first().and_then(|(_, t)| t.shape().first().copied());
            n.is_some_and(|n| n > 0) && b.iter().all(|(_, t)| t.shape().first().copied() == n)
        })
}

/// The samples of a batch that [`splittable`] accepted, each a batch of one.
fn samples_of(batch: &Feeds) -> Vec<Feeds> {
    let n = batch.first().map_or(0, |(_, t)| t.shape()[0]);
    (0..n)
        .map(|i| {
            batch
                .iter()
                .map(|(name, t)| (name.clone(), t.rows(i, 1).expect("splittable: every feed has n rows")))
                .collect()
        })
        .collect()
}

fn named(feeds: &Feeds) -> Vec<(&str, Tensor)> {
    feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect()
}

/// Runs `run(batch, piece)` on every piece of the batches, in parallel on `pool` when there is
/// one; the results per batch and piece, in order whatever the thread count.
fn run_pieces<T: Send>(
    pool: Option<&rayon::ThreadPool>,
    pieces: &[Vec<Feeds>],
    run: impl Fn(usize, usize) -> Result<T, AnalyzeError> + Sync + Send,
) -> Result<Vec<Vec<T>>, AnalyzeError> {
    let index: Vec<(usize, usize)> =
        pieces.iter().enumerate().flat_map(|(b, ps)| (0..ps.len()).map(move |p| (b, p))).collect();
    let flat: Vec<T> = match pool {
        Some(pool) => pool.install(|| index.par_iter().map(|&(b, p)| run(b, p)).collect::<Result<_, _>>())?,
        None => index.iter().map(|&(b, p)| run(b, p)).collect::<Result<_, _>>()?,
    };
    let mut flat = flat.into_iter();
    Ok(pieces.iter().map(|ps| flat.by_ref().take(ps.len()).collect()).collect())
}

/// The outputs of every batch: its pieces' outputs stacked along the first axis.
fn stacked(per_piece: Vec<Vec<Vec<Tensor>>>) -> Result<Outputs, AnalyzeError> {
    let mut outs = Outputs::default();
    for (b, mut pieces) in per_piece.into_iter().enumerate() {
        if pieces.len() == 1 {
            outs.push(pieces.pop().expect("one piece"));
            continue;
        }
        let count = pieces.first().map_or(0, Vec::len);
        let batch = (0..count)
            .map(|i| {
                let parts: Vec<Tensor> = pieces.iter().filter_map(|p| p.get(i).cloned()).collect();
                Tensor::concat_rows(&parts).filter(|_| parts.len() == pieces.len()).ok_or_else(|| {
                    AnalyzeError::Data(format!("the outputs of the samples of batch {b} do not stack"))
                })
            })
            .collect::<Result<_, _>>()?;
        outs.push(batch);
    }
    Ok(outs)
}

/// A piece's FP32 run: its outputs and the value of every tensor.
type FloatRun = (Vec<Tensor>, qexec::ValueCache);

/// The FP32 runs of the pieces, keeping every value: on `pool` when there is one, each run then
/// on its calling thread; otherwise on the session's threads.
fn float_runs(
    float: &qexec::Session,
    pieces: &[Vec<Feeds>],
    pool: Option<&rayon::ThreadPool>,
) -> Result<Vec<Vec<FloatRun>>, AnalyzeError> {
    run_pieces(pool, pieces, |b, p| {
        let options = qexec::RunOptions::default().keep(qexec::Keep::All).serial(pool.is_some());
        let run = float.run_with(&named(&pieces[b][p]), options)?;
        Ok((run.outputs, run.kept))
    })
}

/// Whether one sample's intermediates take more memory than the model's weights. Sample by
/// sample, every run reads the weights once per sample; batch by batch, every layer's output
/// goes through memory. So a CNN on images (megabytes of activations per sample) runs faster
/// sample by sample and a transformer on short sequences (large weights, small activations)
/// batch by batch.
fn intermediates_outweigh_weights(float: &qexec::Session, sample: &Feeds) -> Result<bool, AnalyzeError> {
    let g = &float.model().graph;
    let weights: usize =
        g.initializers().filter_map(|v| g.static_value(v)).map(|t| t.len() * t.dtype().size_of()).sum();
    let options = qexec::RunOptions::default().keep(qexec::Keep::All).serial(true);
    Ok(float.run_with(&named(sample), options)?.kept.bytes() > weights)
}

/// The FP32 run of a list of batches, kept to score simulations against and to resume from: the
/// value of every tensor (memory: all intermediates of every batch) and the outputs.
///
/// When the model keeps samples apart ([`qgraph::samples_independent`]) and one sample's
/// intermediates outweigh its weights, each batch is cut into its samples, and every run (the
/// FP32 one and each simulation scored) takes the samples one per thread, each through the
/// whole graph on that thread: a sample's intermediates stay in cache, where a batch's spill to
/// memory between layers. The samples' outputs are stacked back into their batch's, so metrics
/// see the batches as given, and results do not depend on the thread count. Other models run
/// batch by batch.
pub struct FloatReference {
    batches: Vec<Feeds>,
    /// Per batch, what runs: its samples, or the whole batch.
    pieces: Vec<Vec<Feeds>>,
    /// Per batch and piece, the FP32 value of every tensor.
    caches: Vec<Vec<qexec::ValueCache>>,
    outputs: Outputs,
    /// Whether the batches run sample by sample (each run on one thread).
    split: bool,
    /// Where sample runs go in parallel (with more than one thread).
    pool: Option<rayon::ThreadPool>,
}

impl FloatReference {
    /// Runs the float model of `sim` on `batches`, on `threads` threads (0: one per core).
    pub fn new(sim: &QuantSim, batches: &[Feeds], threads: usize) -> Result<FloatReference, AnalyzeError> {
        if batches.is_empty() {
            return Err(AnalyzeError::Data("no batches to score on".into()));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        } else {
            threads
        };
        let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(threads))?;
        if splittable(&float, batches) {
            let pieces: Vec<Vec<Feeds>> = batches.iter().map(samples_of).collect();
            if intermediates_outweigh_weights(&float, &pieces[0][0])? {
                let pool = (threads > 1)
                    .then(|| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
                    .transpose()
                    .map_err(|e| AnalyzeError::Data(format!("cannot start {threads} threads: {e}")))?;
                let runs = float_runs(&float, &pieces, pool.as_ref())?;
                return FloatReference::assemble(batches, pieces, runs, true, pool);
            }
        }
        let pieces: Vec<Vec<Feeds>> = batches.iter().map(|b| vec![b.clone()]).collect();
        let runs = float_runs(&float, &pieces, None)?;
        FloatReference::assemble(batches, pieces, runs, false, None)
    }

    fn assemble(
        batches: &[Feeds],
        pieces: Vec<Vec<Feeds>>,
        runs: Vec<Vec<FloatRun>>,
        split: bool,
        pool: Option<rayon::ThreadPool>,
    ) -> Result<FloatReference, AnalyzeError> {
        let (outputs, caches): (Vec<Vec<Vec<Tensor>>>, Vec<Vec<qexec::ValueCache>>) =
            runs.into_iter().map(|ps| ps.into_iter().unzip()).unzip();
        let outputs = stacked(outputs)?;
        if outputs.is_empty() {
            return Err(AnalyzeError::Data("the model has no float outputs to score".into()));
        }
        Ok(FloatReference { batches: batches.to_vec(), pieces, caches, outputs, split, pool })
    }

    /// Runs `run(feeds, cache)` on every piece, as this reference runs them, and stacks the
    /// outputs per batch.
    fn simulate(
        &self,
        run: impl Fn(&Feeds, &qexec::ValueCache) -> Result<Vec<Tensor>, AnalyzeError> + Sync + Send,
    ) -> Result<Outputs, AnalyzeError> {
        let outs =
            run_pieces(self.pool.as_ref(), &self.pieces, |b, p| run(&self.pieces[b][p], &self.caches[b][p]))?;
        stacked(outs)
    }

    /// The batches.
    pub fn batches(&self) -> &[Feeds] {
        &self.batches
    }

    /// What runs, in order: each piece of a batch (a sample, or the whole batch) with the FP32
    /// value of every tensor it computed.
    pub fn pieces(&self) -> impl Iterator<Item = (&Feeds, &qexec::ValueCache)> {
        self.pieces.iter().flatten().zip(self.caches.iter().flatten())
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
    pub fn score(&self, sim: &QuantSim, metric: impl Scorer) -> Result<f64, AnalyzeError> {
        let simulated = self.simulate(|feeds, _| {
            let feeds = named(feeds);
            Ok(if self.split { sim.run_serial(&feeds)? } else { sim.run(&feeds)? })
        })?;
        metric.score(&self.outputs, &simulated)
    }

    /// Scores the simulation when `enabled` are its only enabled quantizers: only what lies
    /// downstream of them is recomputed, the rest is read from the FP32 values. The caller
    /// guarantees that no other quantizer is enabled.
    pub fn score_only(
        &self,
        sim: &QuantSim,
        enabled: &[QuantizerId],
        metric: impl Scorer,
    ) -> Result<f64, AnalyzeError> {
        let changed = changed_values(sim, enabled);
        let inputs = sim.model().graph.inputs();
        if changed.iter().any(|v| inputs.contains(v)) {
            return self.score(sim, metric);
        }
        let simulated = self.simulate(|_, cache| {
            Ok(if self.split {
                sim.run_resumed_serial(cache, &changed)?
            } else {
                sim.run_resumed(cache, &changed)?
            })
        })?;
        metric.score(&self.outputs, &simulated)
    }
}

/// Scores every layer with only its quantizers enabled, against `reference` (the FP32 run of the
/// batches to score on). `progress(done, total)` is called after each layer. The simulation is
/// restored before returning (also on error).
pub fn enable_one(
    sim: &mut QuantSim,
    reference: &FloatReference,
    metric: impl Scorer,
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
            let score = reference.score_only(sim, qs, &metric)?;
            scores.push(LayerScore {
                layer: sim.model().graph.node(*node).name.clone(),
                score,
                higher_is_better: metric.higher_is_better(),
            });
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
    metric: impl Scorer,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerScore>, AnalyzeError> {
    let layers = layers(sim)?;
    with_enabled(sim, |sim| {
        let mut scores = Vec::with_capacity(layers.len());
        for (k, (node, qs)) in layers.iter().enumerate() {
            qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = false);
            sim.refresh()?;
            let score = reference.score(sim, &metric)?;
            scores.push(LayerScore {
                layer: sim.model().graph.node(*node).name.clone(),
                score,
                higher_is_better: metric.higher_is_better(),
            });
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
    metric: impl Scorer,
) -> Result<ModelChecks, AnalyzeError> {
    let score = |sim: &QuantSim| reference.score(sim, &metric);
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

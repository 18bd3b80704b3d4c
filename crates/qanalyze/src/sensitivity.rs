//! Per-layer sensitivity, "enable one" (spec §5.1): every quantizer of the calibrated simulation
//! off except one layer's — its outputs, parameters and the inputs no node produces — scored
//! against the FP32 outputs, for every layer in topological order. Encodings are not recomputed
//! between layers, exactly as AIMET does; afterwards every quantizer is restored.
//!
//! Scores come from a [`Scorer`]: the built-in [`Metric`]s (AIMET's PSNR, SQNR, AMP SQNR, MSE,
//! top-k logit PSNR, arg-max agreement) or a [`UserMetric`] closure; each says whether higher is
//! better, and [`LayerScore::sensitivity`] ranks layers the same way whatever the direction.
//!
//! Only the layer's downstream is recomputed: each layer's run resumes (qexec `resume`) from the
//! FP32 values of every tensor, kept from one float run when they fit a memory budget and
//! recomputed in windows of samples that do otherwise. Batches of a model that keeps samples apart
//! run sample by sample, one sample per thread (see [`FloatReference`]).

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
    /// A results cache file cannot be used.
    #[error("{}: {detail}", path.display())]
    Cache {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        detail: String,
    },
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
            Some(node) if !g.is_static(t.value) => out.extend(node.inputs().iter().flatten().copied()),
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

/// Samples in a piece: the first axis of its first feed (1 without one).
fn samples_in(piece: &Feeds) -> usize {
    piece.first().and_then(|(_, t)| t.shape().first().copied()).unwrap_or(1).max(1)
}

fn named(feeds: &Feeds) -> Vec<(&str, Tensor)> {
    feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect()
}

/// Runs `run(i)` for every piece index `i` in `pieces`, in parallel on `pool` when there is one;
/// the results in the order of `pieces`, whatever the thread count.
fn run_pieces<T: Send>(
    pool: Option<&rayon::ThreadPool>,
    pieces: std::ops::Range<usize>,
    run: impl Fn(usize) -> Result<T, AnalyzeError> + Sync + Send,
) -> Result<Vec<T>, AnalyzeError> {
    match pool {
        Some(pool) => pool.install(|| pieces.into_par_iter().map(run).collect()),
        None => pieces.map(run).collect(),
    }
}

/// A piece's FP32 run: its outputs and the value of every tensor.
type FloatRun = (Vec<Tensor>, qexec::ValueCache);

/// The memory a [`FloatReference`] may fill with kept FP32 values unless told otherwise: 4 GiB.
pub const DEFAULT_CACHE_BUDGET: usize = 4 << 30;

/// A budget for references that serve [`enable_one`] only (128 MiB): when the values do not all
/// fit, it walks the FP32 passes alongside the layers at the speed of keeping every value
/// (mobilenetv2, 32 images: 12.7 s against 12.6 s, 0.40 GB against 2.1 GB for the whole Lite-MP
/// job).
pub const ENABLE_ONE_BUDGET: usize = 128 << 20;

/// The FP32 run of a list of batches, kept to score simulations against and to resume from.
///
/// **Pieces.** When the model keeps samples apart ([`qgraph::samples_independent`]) and one
/// sample's intermediates outweigh its weights, each batch is cut into its samples, and every run
/// (the FP32 one and each simulation scored) takes the samples one per thread, each through the
/// whole graph on that thread: a sample's intermediates stay in cache, where a batch's spill to
/// memory between layers. The samples' outputs are stacked back into their batch's, so metrics
/// see the batches as given, and results do not depend on the thread count. Other models run
/// batch by batch (a batch is then one piece). Sample by sample, every run reads the weights once
/// per sample, so a transformer on short sequences (large weights, small activations) keeps
/// whole batches.
///
/// **Memory.** The FP32 outputs are always kept. The value of every tensor, which resumed runs
/// start from, is kept for every piece when all of them fit the memory budget
/// ([`DEFAULT_CACHE_BUDGET`], or [`FloatReference::with_budget`]); the run stops keeping them as
/// soon as they would not. Then nothing is written to disk (an FP32 forward pass costs less than
/// writing and reading back a sample's intermediates): [`enable_one`] walks each piece's FP32
/// pass alongside the layers, keeping only the values still ahead of it (see `forward_walk`), in
/// windows of as many consecutive pieces as the budget holds of their working sets (in whole
/// rounds of one piece per thread), and [`FloatReference::score_only`] runs the simulation in
/// full. Scores are the same bits either way.
pub struct FloatReference {
    float: qexec::Session,
    batches: Vec<Feeds>,
    /// Per batch, what runs: its samples, or the whole batch.
    pieces: Vec<Vec<Feeds>>,
    /// The pieces of every batch in order, with the batch each belongs to.
    flat: Vec<(usize, usize)>,
    /// Per piece (in `flat` order), the FP32 value of every tensor, when they all fit the budget.
    caches: Option<Vec<qexec::ValueCache>>,
    /// Bytes of one sample's FP32 values (measured on the first piece).
    sample_bytes: usize,
    /// Per value, its bytes per sample (measured on the first piece).
    value_bytes: std::collections::HashMap<qgraph::ValueId, usize>,
    budget: usize,
    outputs: Outputs,
    /// Whether the batches run sample by sample (each run on one thread).
    split: bool,
    /// Where sample runs go in parallel (with more than one thread).
    pool: Option<rayon::ThreadPool>,
}

impl FloatReference {
    /// Runs the float model of `sim` on `batches`, on `threads` threads (0: one per core), keeping
    /// up to [`DEFAULT_CACHE_BUDGET`] bytes of FP32 values.
    pub fn new(sim: &QuantSim, batches: &[Feeds], threads: usize) -> Result<FloatReference, AnalyzeError> {
        FloatReference::with_budget(sim, batches, threads, DEFAULT_CACHE_BUDGET)
    }

    /// As [`FloatReference::new`], keeping up to `budget` bytes of FP32 values (0: none, for a
    /// reference that only scores full runs).
    pub fn with_budget(
        sim: &QuantSim,
        batches: &[Feeds],
        threads: usize,
        budget: usize,
    ) -> Result<FloatReference, AnalyzeError> {
        if batches.is_empty() {
            return Err(AnalyzeError::Data("no batches to score on".into()));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        } else {
            threads
        };
        let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(threads))?;
        let whole = || batches.iter().map(|b| vec![b.clone()]).collect::<Vec<_>>();
        let (pieces, split) = if splittable(&float, batches) {
            let pieces: Vec<Vec<Feeds>> = batches.iter().map(samples_of).collect();
            let run = float_run(&float, &pieces[0][0], true)?;
            let g = &float.model().graph;
            let weights: usize = g
                .initializers()
                .filter_map(|v| g.static_value(v))
                .map(|t| t.len() * t.dtype().size_of())
                .sum();
            if run.1.bytes() > weights { (pieces, true) } else { (whole(), false) }
        } else {
            (whole(), false)
        };
        let pool = (split && threads > 1)
            .then(|| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
            .transpose()
            .map_err(|e| AnalyzeError::Data(format!("cannot start {threads} threads: {e}")))?;
        let flat: Vec<(usize, usize)> =
            pieces.iter().enumerate().flat_map(|(b, ps)| (0..ps.len()).map(move |p| (b, p))).collect();
        let mut reference = FloatReference {
            float,
            batches: batches.to_vec(),
            pieces,
            flat,
            caches: Some(Vec::new()),
            sample_bytes: 0,
            value_bytes: std::collections::HashMap::new(),
            budget,
            outputs: Outputs::default(),
            split,
            pool,
        };
        let outputs = reference.run_keeping_within_budget()?;
        reference.outputs = reference.stacked(outputs)?;
        if reference.outputs.is_empty() {
            return Err(AnalyzeError::Data("the model has no float outputs to score".into()));
        }
        Ok(reference)
    }

    /// The FP32 runs of every piece, a thread's worth at a time, keeping their values while all
    /// of them fit the budget; the outputs per piece.
    fn run_keeping_within_budget(&mut self) -> Result<Vec<Vec<Tensor>>, AnalyzeError> {
        let total_samples: usize = self.batches.iter().map(samples_in).sum();
        let step = self.pool.as_ref().map_or(1, rayon::ThreadPool::current_num_threads);
        let mut outputs = Vec::with_capacity(self.flat.len());
        let mut kept_bytes = 0usize;
        for start in (0..self.flat.len()).step_by(step) {
            let window = start..(start + step).min(self.flat.len());
            for (i, (outs, values)) in window.clone().zip(self.float_runs(window)?) {
                if i == 0 {
                    let samples = samples_in(self.piece(0));
                    self.sample_bytes = values.bytes() / samples;
                    self.value_bytes =
                        values.iter().map(|(v, t)| (v, t.len() * t.dtype().size_of() / samples)).collect();
                    if self.sample_bytes.saturating_mul(total_samples) > self.budget {
                        self.caches = None;
                    }
                }
                kept_bytes += values.bytes();
                if kept_bytes > self.budget {
                    self.caches = None;
                }
                if let Some(caches) = self.caches.as_mut() {
                    caches.push(values);
                }
                outputs.push(outs);
            }
        }
        Ok(outputs)
    }

    fn piece(&self, i: usize) -> &Feeds {
        let (b, p) = self.flat[i];
        &self.pieces[b][p]
    }

    /// The FP32 runs of the pieces `window`, keeping every value, as the reference runs them.
    fn float_runs(&self, window: std::ops::Range<usize>) -> Result<Vec<FloatRun>, AnalyzeError> {
        run_pieces(self.pool.as_ref(), window, |i| float_run(&self.float, self.piece(i), self.pool.is_some()))
    }

    /// The FP32 value of every tensor of the pieces `window`, computed again.
    fn recomputed_values(
        &self,
        window: std::ops::Range<usize>,
    ) -> Result<Vec<qexec::ValueCache>, AnalyzeError> {
        Ok(self.float_runs(window)?.into_iter().map(|(_, values)| values).collect())
    }

    /// Regroups per-piece outputs (in piece order) into their batches' outputs, stacking the
    /// samples of a split batch along the first axis.
    fn stacked(&self, per_piece: Vec<Vec<Tensor>>) -> Result<Outputs, AnalyzeError> {
        let mut per_piece = per_piece.into_iter();
        let mut outs = Outputs::default();
        for (b, pieces) in self.pieces.iter().enumerate() {
            let mut mine: Vec<Vec<Tensor>> = per_piece.by_ref().take(pieces.len()).collect();
            if mine.len() == 1 {
                outs.push(mine.pop().expect("one piece"));
                continue;
            }
            let count = mine.first().map_or(0, Vec::len);
            let batch = (0..count)
                .map(|i| {
                    let parts: Vec<Tensor> = mine.iter().filter_map(|p| p.get(i).cloned()).collect();
                    Tensor::concat_rows(&parts).filter(|_| parts.len() == mine.len()).ok_or_else(|| {
                        AnalyzeError::Data(format!("the outputs of the samples of batch {b} do not stack"))
                    })
                })
                .collect::<Result<_, _>>()?;
            outs.push(batch);
        }
        Ok(outs)
    }

    /// Consecutive ranges of pieces whose FP32 values fit the budget together, in whole rounds of
    /// one piece per thread (so no thread idles; at least one round): the windows [`enable_one`]
    /// recomputes them in when they are not kept (one window of every piece when they are).
    fn windows(&self) -> Vec<std::ops::Range<usize>> {
        let budget = if self.caches.is_some() { usize::MAX } else { self.budget };
        self.windows_of(self.sample_bytes, budget)
    }

    /// Consecutive pieces, in whole rounds of one piece per thread, each window holding at most
    /// `budget` bytes at `sample_bytes` a sample (at least one round).
    fn windows_of(&self, sample_bytes: usize, budget: usize) -> Vec<std::ops::Range<usize>> {
        let round = self.pool.as_ref().map_or(1, rayon::ThreadPool::current_num_threads);
        let n = self.flat.len();
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for i in (0..n).step_by(round) {
            let pieces = i..(i + round).min(n);
            let more: usize = pieces.map(|j| sample_bytes.saturating_mul(samples_in(self.piece(j)))).sum();
            if i > start && bytes.saturating_add(more) > budget {
                out.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes = bytes.saturating_add(more);
        }
        out.push(start..n);
        out
    }

    /// A cache holding piece `i`'s feeds as the values of the graph inputs they name.
    fn feeds_cache(&self, i: usize) -> Result<qexec::ValueCache, AnalyzeError> {
        let g = &self.float.model().graph;
        let mut cache = qexec::ValueCache::new();
        for (name, t) in self.piece(i) {
            let v = g
                .value_id(name)
                .filter(|v| g.inputs().contains(v))
                .ok_or_else(|| AnalyzeError::Data(format!("'{name}' is not an input of the model")))?;
            cache.insert(v, t.clone());
        }
        Ok(cache)
    }

    /// Runs the FP32 `nodes` of each piece of `window` from its values `caches`, keeping `keep`.
    fn run_pieces_nodes(
        &self,
        window: std::ops::Range<usize>,
        caches: &[qexec::ValueCache],
        nodes: &[NodeId],
        keep: &[qgraph::ValueId],
    ) -> Result<Vec<qexec::ValueCache>, AnalyzeError> {
        let start = window.start;
        run_pieces(self.pool.as_ref(), window, |i| {
            let options =
                qexec::RunOptions::default().keep(qexec::Keep::Values(keep.to_vec())).serial(self.split);
            Ok(self.float.run_nodes(&caches[i - start], nodes, options)?.kept)
        })
    }

    /// Runs `run(piece, cache)` on the pieces `window` and returns their outputs in order:
    /// `caches` holds the window's FP32 values, or is `None` for full runs.
    fn simulate_window(
        &self,
        window: std::ops::Range<usize>,
        caches: Option<&[qexec::ValueCache]>,
        run: impl Fn(&Feeds, Option<&qexec::ValueCache>) -> Result<Vec<Tensor>, AnalyzeError> + Sync + Send,
    ) -> Result<Vec<Vec<Tensor>>, AnalyzeError> {
        let start = window.start;
        run_pieces(self.pool.as_ref(), window, |i| run(self.piece(i), caches.map(|c| &c[i - start])))
    }

    /// The batches.
    pub fn batches(&self) -> &[Feeds] {
        &self.batches
    }

    /// How many pieces run: the samples of every batch, or the batches.
    pub fn piece_count(&self) -> usize {
        self.flat.len()
    }

    /// Bytes of FP32 values kept (0 when they did not fit the budget).
    pub fn kept_bytes(&self) -> usize {
        self.caches.as_ref().map_or(0, |c| c.iter().map(qexec::ValueCache::bytes).sum())
    }

    /// Calls `f(feeds, values)` for every piece in order, with its FP32 value of every tensor:
    /// the kept ones, or recomputed one piece at a time when they are not kept.
    pub fn for_each_piece(
        &self,
        mut f: impl FnMut(&Feeds, &qexec::ValueCache) -> Result<(), AnalyzeError>,
    ) -> Result<(), AnalyzeError> {
        for i in 0..self.flat.len() {
            match &self.caches {
                Some(caches) => f(self.piece(i), &caches[i])?,
                None => f(self.piece(i), &float_run(&self.float, self.piece(i), false)?.1)?,
            }
        }
        Ok(())
    }

    /// Samples in the batches.
    pub fn samples(&self) -> usize {
        self.outputs.samples
    }

    /// The nodes a [`FloatReference::score_only`] run with `enabled` recomputes per piece (the
    /// others are read from the FP32 values); every node when a graph input is quantized.
    pub fn nodes_recomputed(&self, sim: &QuantSim, enabled: &[QuantizerId]) -> Vec<NodeId> {
        let g = &sim.model().graph;
        let changed = changed_values(sim, enabled);
        if changed.iter().any(|v| g.inputs().contains(v)) {
            return g.node_ids().collect();
        }
        g.downstream_nodes(&changed)
    }

    /// A full run of the simulation on one piece.
    fn full_run(&self, sim: &QuantSim, piece: &Feeds) -> Result<Vec<Tensor>, AnalyzeError> {
        let feeds = named(piece);
        Ok(if self.split { sim.run_serial(&feeds)? } else { sim.run(&feeds)? })
    }

    /// Scores the simulation as it is (full forward passes).
    pub fn score(&self, sim: &QuantSim, metric: impl Scorer) -> Result<f64, AnalyzeError> {
        let outs = self.simulate_window(0..self.flat.len(), None, |piece, _| self.full_run(sim, piece))?;
        metric.score(&self.outputs, &self.stacked(outs)?)
    }

    /// The outputs of the simulation when `enabled` are its only enabled quantizers, on the pieces
    /// `window` whose FP32 values are `caches`: only what lies downstream of the quantizers is
    /// recomputed, the rest is read from the FP32 values (full runs when a graph input is
    /// quantized or without values).
    fn simulate_only(
        &self,
        sim: &QuantSim,
        enabled: &[QuantizerId],
        window: std::ops::Range<usize>,
        caches: Option<&[qexec::ValueCache]>,
    ) -> Result<Vec<Vec<Tensor>>, AnalyzeError> {
        let changed = changed_values(sim, enabled);
        let inputs = sim.model().graph.inputs();
        let resumable = !changed.iter().any(|v| inputs.contains(v));
        self.simulate_window(window, caches.filter(|_| resumable), |piece, cache| match cache {
            Some(cache) if self.split => Ok(sim.run_resumed_serial(cache, &changed)?),
            Some(cache) => Ok(sim.run_resumed(cache, &changed)?),
            None => self.full_run(sim, piece),
        })
    }

    /// Scores the simulation when `enabled` are its only enabled quantizers: only what lies
    /// downstream of them is recomputed, the rest is read from the FP32 values (when they are
    /// kept; full runs otherwise). The caller guarantees that no other quantizer is enabled.
    pub fn score_only(
        &self,
        sim: &QuantSim,
        enabled: &[QuantizerId],
        metric: impl Scorer,
    ) -> Result<f64, AnalyzeError> {
        let outs = self.simulate_only(sim, enabled, 0..self.flat.len(), self.caches.as_deref())?;
        metric.score(&self.outputs, &self.stacked(outs)?)
    }
}

/// One piece's FP32 run keeping every value, on its calling thread when `serial`.
fn float_run(float: &qexec::Session, piece: &Feeds, serial: bool) -> Result<FloatRun, AnalyzeError> {
    let options = qexec::RunOptions::default().keep(qexec::Keep::All).serial(serial);
    let run = float.run_with(&named(piece), options)?;
    Ok((run.outputs, run.kept))
}

/// Scores every layer with only its quantizers enabled, against `reference` (the FP32 run of the
/// batches to score on). `progress(done, total)` is called after each layer (after each layer of
/// each window when the reference recomputes its FP32 values window by window). The simulation
/// is restored before returning (also on error).
///
/// When the reference keeps its FP32 values, each layer runs on every piece in turn. Otherwise,
/// when every layer's outputs fit the reference's budget until the last window, each window's
/// FP32 passes are walked once alongside the layers (see `forward_walk`); else the FP32 values are
/// recomputed once per layer and window (a full FP32 pass per layer and piece).
pub fn enable_one(
    sim: &mut QuantSim,
    reference: &FloatReference,
    metric: impl Scorer,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerScore>, AnalyzeError> {
    let all: Vec<usize> = (0..layers(sim)?.len()).collect();
    let mut scores = Vec::with_capacity(all.len());
    enable_one_of(
        sim,
        reference,
        metric,
        &all,
        &mut |_, s| {
            scores.push(s);
            Ok(())
        },
        progress,
    )?;
    Ok(scores)
}

/// [`enable_one`] on the layers of index `todo` only (indices into [`layers`]), handing each
/// score to `found` with its layer's index as soon as it is known.
pub(crate) fn enable_one_of(
    sim: &mut QuantSim,
    reference: &FloatReference,
    metric: impl Scorer,
    todo: &[usize],
    found: &mut dyn FnMut(usize, LayerScore) -> Result<(), AnalyzeError>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), AnalyzeError> {
    let layers = layers(sim)?;
    if let Some(&k) = todo.iter().find(|&&k| k >= layers.len()) {
        return Err(AnalyzeError::Data(format!("layer {k} of {}", layers.len())));
    }
    let windows = reference.windows();
    let output_bytes: usize =
        reference.outputs.per_batch.iter().flatten().map(|t| t.len() * t.dtype().size_of()).sum();
    // Without kept FP32 values, each piece's FP32 pass is walked alongside the layers when every
    // layer's outputs fit the budget until the end (see `forward_walk`).
    let walked = reference.caches.is_none() && output_bytes.saturating_mul(todo.len()) <= reference.budget;
    let set = |sim: &mut QuantSim, qs: &[QuantizerId], on: bool| {
        let p = sim.placement_mut();
        qs.iter().for_each(|&q| p.quantizer_mut(q).enabled = on);
    };
    // The outputs of every piece with only layer `k` quantized, window by window.
    let run_layer =
        |sim: &mut QuantSim, k: usize, window: std::ops::Range<usize>, values: &[qexec::ValueCache]| {
            let qs = &layers[k].1;
            set(sim, qs, true);
            let outs = sim
                .refresh()
                .map_err(AnalyzeError::from)
                .and_then(|()| reference.simulate_only(sim, qs, window, Some(values)));
            set(sim, qs, false);
            outs
        };
    let score = |sim: &QuantSim, k: usize, outs: Vec<Vec<Tensor>>| -> Result<LayerScore, AnalyzeError> {
        Ok(LayerScore {
            layer: sim.model().graph.node(layers[k].0).name.clone(),
            score: metric.score(&reference.outputs, &reference.stacked(outs)?)?,
            higher_is_better: metric.higher_is_better(),
        })
    };
    with_enabled(sim, |sim| {
        let all = sim.placement().quantizer_ids();
        set(sim, &all, false);
        if walked {
            let changed: Vec<Vec<qgraph::ValueId>> =
                todo.iter().map(|&k| changed_values(sim, &layers[k].1)).collect();
            let walk = crate::forward_walk::Walk::plan(sim, &changed)?;
            let windows = reference.windows_of(walk.peak_bytes(&reference.value_bytes), reference.budget);
            let total = windows.len() * todo.len();
            let mut per_layer: Vec<Vec<Vec<Tensor>>> = vec![Vec::new(); todo.len()];
            for (w, window) in windows.iter().enumerate() {
                let mut caches: Vec<qexec::ValueCache> =
                    window.clone().map(|i| reference.feeds_cache(i)).collect::<Result<_, _>>()?;
                for (s, (j, advance, keep, drop)) in walk.steps().enumerate() {
                    if !advance.is_empty() {
                        let made = reference.run_pieces_nodes(window.clone(), &caches, advance, keep)?;
                        for (cache, made) in caches.iter_mut().zip(made) {
                            for &v in keep {
                                if let Some(t) = made.get(v) {
                                    cache.insert(v, t.clone());
                                }
                            }
                        }
                    }
                    per_layer[j].extend(run_layer(sim, todo[j], window.clone(), &caches)?);
                    for cache in &mut caches {
                        drop.iter().for_each(|&v| {
                            cache.remove(v);
                        });
                    }
                    progress(w * todo.len() + s + 1, total);
                }
            }
            for (outs, &k) in per_layer.into_iter().zip(todo) {
                found(k, score(sim, k, outs)?)?;
            }
            return Ok(());
        }
        let total = todo.len();
        for (j, &k) in todo.iter().enumerate() {
            // One window of every piece when the values are kept.
            let mut outs = Vec::with_capacity(reference.flat.len());
            for window in &windows {
                let recomputed;
                let values = match reference.caches.as_deref() {
                    Some(kept) => &kept[window.clone()],
                    None => {
                        recomputed = reference.recomputed_values(window.clone())?;
                        &recomputed[..]
                    }
                };
                outs.extend(run_layer(sim, k, window.clone(), values)?);
            }
            found(k, score(sim, k, outs)?)?;
            progress(j + 1, total);
        }
        Ok(())
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

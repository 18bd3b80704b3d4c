//! The training loop. Each step runs the simulation forward on a mini-batch (in micro-batches
//! whose gradients add up), takes the objective's gradient by the first output, and sends it back
//! through the graph with `qgrad`: at every fake-quantized value the straight-through estimator
//! passes the gradient where the value lies inside its encoding's range (and collects the
//! gradients of scale and offset). Adam then updates the weights and biases and, in range
//! learning, the scale and offset of every quantizer. Updates are measured in each parameter's
//! own unit — a weight's quantization step, a bias's output step, a scale's logarithm — because
//! an ONNX model usually has its batch norms folded, which leaves weights that differ in size by
//! orders of magnitude from layer to layer; one learning rate then suits every layer. In regular QAT (AIMET's default mode) the
//! activation encodings stay as calibrated and the weight encodings follow the weights after
//! every step; in range learning every encoding is a parameter. After each epoch the optional
//! evaluation scores the simulation, the best epoch is remembered, and a checkpoint is written;
//! at the end the best epoch's state is what the simulation holds.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use qcalib::{Feeds, Granularity, QuantSim, Quantizer, QuantizerId, TrainingRun, encoding_index};
use qgrad::{Adam, EncodingGrad, ForwardValues, fake_quant_backward, fake_quant_backward_indexed};
use qgraph::{Graph, NodeId, Tensor, ValueId};
use qkernels::Encoding;
use serde_json::{Value, json};

use crate::augment::{Augmentation, SplitMix64};
use crate::checkpoint::Checkpoint;
use crate::error::{Result, TrainError};
use crate::loss::Objective;

/// Which parameters learn (AIMET's two QAT modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QatMode {
    /// Weights and biases learn; activation encodings stay fixed; weight encodings are
    /// recomputed from the weights after every step.
    Regular,
    /// Weights, biases and the scale and offset of every quantizer learn.
    RangeLearning,
}

impl QatMode {
    /// `regular` or `range-learning`.
    pub fn as_str(self) -> &'static str {
        match self {
            QatMode::Regular => "regular",
            QatMode::RangeLearning => "range-learning",
        }
    }
}

/// How the learning rate moves over the training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Cosine decay from the rate to zero over all steps.
    Cosine,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct QatOptions {
    /// Regular QAT or range learning.
    pub mode: QatMode,
    /// Passes over the training samples.
    pub epochs: usize,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Samples per forward/backward pass (their gradients add up to the batch's); bounds memory.
    pub micro_batch: usize,
    /// Adam's learning rate, in units of each parameter's quantization step (see the module
    /// doc): 1e-3 moves every weight by at most a thousandth of its grid step per update.
    pub learning_rate: f32,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Largest global gradient norm (gradients are scaled down beyond it).
    pub clip_grad_norm: Option<f32>,
    /// The loss.
    pub objective: Objective,
    /// Seed of the sample order (shuffled every epoch).
    pub seed: u64,
    /// Segments the forward values are recomputed in (1: all kept from one forward pass). With
    /// more, a step keeps only the values crossing segment boundaries from its forward pass and
    /// recomputes each segment's values before its backward pass: memory falls to about one
    /// segment's values for about one more forward pass; the gradients are the same.
    pub segments: usize,
    /// Image augmentation of every training batch (`None`: the samples as given). With
    /// distillation the FP32 model's targets are computed on the augmented images.
    pub augmentation: Option<Augmentation>,
}

impl Default for QatOptions {
    fn default() -> QatOptions {
        QatOptions {
            mode: QatMode::Regular,
            epochs: 10,
            batch_size: 32,
            micro_batch: 8,
            learning_rate: 1e-3,
            schedule: Schedule::Cosine,
            clip_grad_norm: None,
            objective: Objective::Distillation { temperature: 4.0 },
            seed: 0,
            segments: 1,
            augmentation: None,
        }
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// Epoch number (from 1; 0 is the simulation before training).
    pub epoch: usize,
    /// Mean loss per sample over the epoch (of the simulation before training, for epoch 0).
    pub loss: f64,
    /// The evaluation's score after the epoch, when an evaluation was given.
    pub score: Option<f64>,
    /// Wall time of the epoch's training.
    pub seconds: f64,
}

/// What a training did.
#[derive(Debug, Clone, PartialEq)]
pub struct QatReport {
    /// Every epoch, from epoch 0 (before training) when an evaluation was given.
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose state the simulation holds at the end (0: training did not improve on the
    /// calibrated simulation).
    pub best_epoch: usize,
    /// Trained float tensors and their values in total.
    pub trained_tensors: usize,
    /// Trained values.
    pub trained_values: usize,
    /// Quantizers whose encodings learned (range learning).
    pub learned_quantizers: usize,
    /// The epoch a resumed training started after, if it resumed.
    pub resumed_after: Option<usize>,
}

impl EpochRecord {
    fn to_json(&self) -> Value {
        json!({"epoch": self.epoch, "loss": self.loss, "score": self.score, "seconds": self.seconds})
    }

    /// The record [`EpochRecord::to_json`] wrote (a NaN loss is written as null).
    fn from_json(e: &Value) -> EpochRecord {
        EpochRecord {
            epoch: e["epoch"].as_u64().unwrap_or(0) as usize,
            loss: e["loss"].as_f64().unwrap_or(f64::NAN),
            score: e["score"].as_f64(),
            seconds: e["seconds"].as_f64().unwrap_or(0.0),
        }
    }
}

impl QatReport {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "epochs": self.epochs.iter().map(EpochRecord::to_json).collect::<Vec<_>>(),
            "best_epoch": self.best_epoch,
            "trained_tensors": self.trained_tensors,
            "trained_values": self.trained_values,
            "learned_quantizers": self.learned_quantizers,
            "resumed_after": self.resumed_after,
        })
    }
}

/// Where a training is, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Current epoch (from 1).
    pub epoch: usize,
    /// All epochs.
    pub epochs: usize,
    /// Steps done in this epoch.
    pub step: usize,
    /// Steps per epoch.
    pub steps: usize,
    /// Mean loss per sample over the epoch so far.
    pub loss: f64,
}

/// The training data: samples (each a batch of one or more rows of every graph input) and, for
/// cross-entropy, one class label per row; for distillation and MSE, the FP32 model to learn
/// from.
#[derive(Debug, Clone, Copy)]
pub struct TrainingData<'a> {
    /// Samples.
    pub samples: &'a [Feeds],
    /// Class labels (indices into the first output's last axis), one per sample row.
    pub labels: Option<&'a [usize]>,
    /// The model whose outputs distillation and MSE target: the FP32 model as given, before
    /// any post-training technique changed its weights (`None`: the simulation's float model).
    pub teacher: Option<&'a qgraph::Model>,
}

/// A scoring of the simulation (higher is better), run after every epoch.
pub type Evaluate<'a> = &'a mut dyn FnMut(&QuantSim) -> Result<f64>;

/// A float tensor that learns.
struct Param {
    value: ValueId,
    /// For a tensor without an integer quantizer of its own: the tensor whose activation
    /// quantizer's step is the unit of its updates (the output of the layer it is the bias of).
    unit_from: Option<ValueId>,
    /// Where its quantizer has several encodings (per channel or block): each element's.
    encoding_index: Option<Vec<usize>>,
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
    grad: Vec<f32>,
    adam: Adam,
}

/// A quantizer whose encodings learn: `[ln Δ…, offset…]` in `state` (the step in log space, so
/// updates are relative to it whatever its size; the offset in steps).
struct LearnedRange {
    quantizer: QuantizerId,
    name: String,
    template: Vec<Encoding>,
    symmetric: bool,
    state: Vec<f32>,
    grad: Vec<f64>,
    adam: Adam,
}

impl LearnedRange {
    fn encodings(&self) -> Vec<Encoding> {
        let k = self.template.len();
        self.template
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let offset = if self.symmetric { t.offset } else { f64::from(self.state[k + i]).round() };
                Encoding::from_scale_offset(f64::from(self.state[i]).exp(), offset, t.bitwidth, t.steps)
            })
            .collect()
    }
}

/// The input slots of `node` whose float initializers learn: the weights and biases of weighted
/// layers, normalization scales and shifts, PRelu slopes, and the bias an `Add` puts on a
/// weighted layer's output (exports write MatMul + Add). Constants elsewhere — an input's
/// mean and deviation, masks, attention scales — stay as they are.
fn trainable_slots(g: &Graph, node: &qgraph::Node) -> Vec<usize> {
    const WEIGHTED: [&str; 4] = ["Conv", "ConvTranspose", "Gemm", "MatMul"];
    match node.op_type.as_str() {
        "Conv" | "ConvTranspose" | "Gemm" => vec![1, 2],
        "MatMul" => vec![0, 1],
        "BatchNormalization" | "LayerNormalization" => vec![1, 2],
        "PRelu" => vec![1],
        "Add" => (0..2)
            .filter(|&slot| {
                let other = node.input(1 - slot).and_then(|v| g.producer_node(v));
                other.is_some_and(|p| WEIGHTED.contains(&p.op_type.as_str()))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The float initializers of `g` that learn: weights, biases and normalization parameters
/// (scalars, running statistics, shapes and other constants excluded).
fn trainable_values(g: &Graph) -> Vec<ValueId> {
    let mut out: Vec<ValueId> = Vec::new();
    for (_, node) in g.nodes() {
        for slot in trainable_slots(g, node) {
            let Some(v) = node.input(slot) else { continue };
            let is_initializer = matches!(g.value(v).source(), qgraph::ValueSource::Initializer);
            let learnable = g.static_value(v).is_some_and(|t| t.dtype() == qgraph::DType::F32 && t.len() > 1);
            if is_initializer && learnable && !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out
}

/// The first quantized tensor on the way out of the node that reads `v`: its output, or the
/// output of the activation that alone follows it (where the simulation quantizes a layer).
fn quantized_output_of_reader(sim: &QuantSim, v: ValueId) -> Option<ValueId> {
    let g = &sim.model().graph;
    let placement = sim.placement();
    let reader = *g.consumer_nodes(v).first()?;
    let mut out = g.node(reader).output(0)?;
    for _ in 0..3 {
        if placement.quantizer_of(out).is_some_and(|q| placement.quantizer(q).enabled) {
            return Some(out);
        }
        let next = g.consumer_nodes(out);
        let [only] = next.as_slice() else { return None };
        let node = g.node(*only);
        if !["Relu", "Clip", "LeakyRelu", "PRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh"]
            .contains(&node.op_type.as_str())
        {
            return None;
        }
        out = node.output(0)?;
    }
    None
}

/// The bytes a training step holds for the backward pass of one sample kept whole (every value
/// as read, and each fake-quantized activation before fake-quant): `sample` is run once.
/// Times the micro-batch, against a memory budget, it gives [`QatOptions::segments`].
pub fn kept_bytes_per_sample(sim: &QuantSim, sample: &Feeds) -> Result<usize> {
    let named: Vec<(&str, Tensor)> = sample.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let run = sim.run_for_training(&named)?;
    let before: usize = run.before_quantization.values().map(|t| t.len() * t.dtype().size_of()).sum();
    Ok(run.values.bytes().saturating_add(before) / rows_of(sample).max(1))
}

/// The values a backward pass reads: a training run's, and for a segment, the values it read
/// from the segments before it (`cache`).
struct SegmentValues<'r, 'a> {
    run: &'r TrainingRun<'a>,
    cache: Option<&'r qexec::ValueCache>,
}

impl ForwardValues for SegmentValues<'_, '_> {
    fn read(&self, v: ValueId) -> Option<&Tensor> {
        self.run.values.get(v).or_else(|| self.cache?.get(v))
    }

    fn produced(&self, v: ValueId) -> Option<&Tensor> {
        self.run.before_quantization.get(&v).or_else(|| self.read(v))
    }
}

/// A training model cut into contiguous runs of nodes (in topological order) whose values are
/// recomputed one run at a time in the backward pass, so only one run's values are held.
struct SegmentPlan {
    segments: Vec<Segment>,
    /// Every value some segment reads from an earlier one (or a graph input): the first pass
    /// keeps these.
    kept: Vec<ValueId>,
}

/// One segment: its nodes, the non-constant values it reads from before it, and the values it
/// produces that later segments (or the graph outputs) read.
struct Segment {
    nodes: Vec<NodeId>,
    within: HashSet<NodeId>,
    reads: HashSet<ValueId>,
    produces: Vec<ValueId>,
}

impl SegmentPlan {
    fn new(model: &qgraph::Model, count: usize) -> Result<SegmentPlan> {
        let g = &model.graph;
        let order = g.topological_order()?;
        let per = order.len().div_ceil(count.max(1)).max(1);
        let mut segment_of = vec![usize::MAX; g.node_count()];
        for (i, &n) in order.iter().enumerate() {
            segment_of[n.index()] = i / per;
        }
        let chunks: Vec<Vec<NodeId>> = order.chunks(per).map(<[NodeId]>::to_vec).collect();
        let mut segments: Vec<Segment> = chunks
            .into_iter()
            .map(|nodes| Segment {
                within: nodes.iter().copied().collect(),
                nodes,
                reads: HashSet::new(),
                produces: Vec::new(),
            })
            .collect();
        let is_constant = |v: ValueId| g.is_static(v);
        let producer_segment = |v: ValueId| g.producer(v).map(|o| segment_of[o.node.index()]);
        for (s, segment) in segments.iter_mut().enumerate() {
            for &n in &segment.nodes {
                let node = g.node(n);
                for &v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                    if !is_constant(v) && producer_segment(v).is_none_or(|p| p < s) {
                        segment.reads.insert(v);
                    }
                }
            }
        }
        let mut kept: Vec<ValueId> = segments.iter().flat_map(|s| s.reads.iter().copied()).collect();
        kept.sort_unstable_by_key(|v| v.index());
        kept.dedup();
        for &v in kept.iter().chain(g.outputs()) {
            if let Some(p) = producer_segment(v) {
                if !segments[p].produces.contains(&v) {
                    segments[p].produces.push(v);
                }
            }
        }
        Ok(SegmentPlan { segments, kept })
    }
}

/// The straight-through estimator at a value quantized by `q` whose input was `x` (shape
/// `shape`; `index`: each element's encoding when known, else computed): rewrites `grad` (by the quantized value) into the gradient by `x`, adding the
/// encodings' gradients to `enc_grads` when given. Float casts pass the gradient unchanged.
fn straight_through(
    x: &[f32],
    shape: &[usize],
    q: &Quantizer,
    index: Option<&[usize]>,
    grad: &mut ArrayD<f32>,
    enc_grads: Option<&mut [f64]>,
) -> std::result::Result<(), String> {
    if !q.precision.is_int() {
        return Ok(());
    }
    let encs = q.encodings.as_deref().ok_or("no encodings")?;
    let dy = grad.as_standard_layout().to_owned();
    let dy = dy.as_slice().expect("standard layout");
    if dy.len() != x.len() {
        return Err(format!("gradient of {} values for a tensor of {}", dy.len(), x.len()));
    }
    let mut dx = vec![0.0f32; x.len()];
    let mut local = vec![EncodingGrad::default(); encs.len()];
    match q.granularity {
        Granularity::PerTensor => local[0] = fake_quant_backward(x, &encs[0], dy, &mut dx),
        granularity => {
            let computed;
            let index = match index {
                Some(index) => index,
                None => {
                    computed = encoding_index(shape, granularity)?.0;
                    &computed
                }
            };
            if index.iter().any(|&i| i >= encs.len()) {
                return Err(format!("an element maps beyond the {} encodings held", encs.len()));
            }
            fake_quant_backward_indexed(x, encs, index, dy, &mut dx, &mut local);
        }
    }
    if let Some(acc) = enc_grads {
        let k = encs.len();
        for (i, g) in local.iter().enumerate() {
            acc[i] += g.delta;
            acc[k + i] += g.offset;
        }
    }
    *grad = ArrayD::from_shape_vec(IxDyn(shape), dx).expect("sizes agree");
    Ok(())
}

/// A deterministic permutation of `0..n` for `seed` (splitmix64-driven Fisher–Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The samples `chunk` stacked into one batch per graph input.
fn stack(samples: &[Feeds], chunk: &[usize]) -> Result<Feeds> {
    let first = &samples[chunk[0]];
    first
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            let parts: Vec<Tensor> = chunk
                .iter()
                .map(|&i| {
                    samples[i].get(k).filter(|(n, _)| n == name).map(|(_, t)| t.clone()).ok_or_else(|| {
                        TrainError::Data(format!("sample {i} does not feed '{name}' in the same place"))
                    })
                })
                .collect::<Result<_>>()?;
            let stacked = Tensor::concat_rows(&parts).ok_or_else(|| {
                TrainError::Data(format!("the samples of '{name}' differ in shape or type"))
            })?;
            Ok((name.clone(), stacked))
        })
        .collect()
}

fn rows_of(feeds: &Feeds) -> usize {
    feeds.first().and_then(|(_, t)| t.shape().first().copied()).unwrap_or(1)
}

/// Everything that learns, and the run's bookkeeping.
struct Trainer<'o> {
    options: &'o QatOptions,
    params: Vec<Param>,
    ranges: Vec<LearnedRange>,
    steps_done: usize,
}

impl Trainer<'_> {
    fn fingerprint(&self, samples: usize) -> Value {
        let o = self.options;
        json!({
            "mode": o.mode.as_str(),
            "epochs": o.epochs,
            "batch_size": o.batch_size,
            "micro_batch": o.micro_batch,
            "learning_rate": o.learning_rate,
            "schedule": format!("{:?}", o.schedule),
            "clip_grad_norm": o.clip_grad_norm,
            "objective": format!("{:?}", o.objective),
            "seed": o.seed,
            "augmentation": format!("{:?}", o.augmentation),
            "samples": samples,
            "params": self.params.iter().map(|p| json!([p.name, p.data.len()])).collect::<Vec<_>>(),
            "ranges": self.ranges.iter().map(|r| json!([r.name, r.state.len()])).collect::<Vec<_>>(),
        })
    }

    /// The learning state (weights and ranges), to remember the best epoch.
    fn snapshot(&self) -> Vec<Vec<f32>> {
        self.params
            .iter()
            .map(|p| p.data.clone())
            .chain(self.ranges.iter().map(|r| r.state.clone()))
            .collect()
    }

    fn restore(&mut self, snapshot: &[Vec<f32>]) {
        let (p, r) = snapshot.split_at(self.params.len().min(snapshot.len()));
        for (param, data) in self.params.iter_mut().zip(p) {
            param.data.clone_from(data);
        }
        for (range, state) in self.ranges.iter_mut().zip(r) {
            range.state.clone_from(state);
        }
    }

    /// Writes the learned state into the simulation and rebuilds it.
    fn apply(&self, sim: &mut QuantSim) -> Result<()> {
        for p in &self.params {
            let t = Tensor::from_vec(&p.shape, p.data.clone())
                .ok_or_else(|| TrainError::Data(format!("{}: shape and data disagree", p.name)))?;
            sim.set_param(p.value, t)?;
        }
        for r in &self.ranges {
            sim.placement_mut().quantizer_mut(r.quantizer).encodings = Some(r.encodings());
        }
        match self.options.mode {
            QatMode::Regular => sim.recompute_param_encodings()?,
            QatMode::RangeLearning => sim.refresh()?,
        }
        Ok(())
    }

    fn learning_rate(&self, total_steps: usize) -> f32 {
        let lr = self.options.learning_rate;
        match self.options.schedule {
            Schedule::Constant => lr,
            Schedule::Cosine => {
                let t = self.steps_done as f64 / total_steps.max(1) as f64;
                (f64::from(lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
            }
        }
    }

    /// One micro-batch: forward, loss, backward; gradients added. Returns the summed loss.
    fn accumulate(
        &mut self,
        sim: &QuantSim,
        feeds: &Feeds,
        labels: &[usize],
        teacher: Option<&Tensor>,
        scale: f32,
    ) -> Result<f64> {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let wrt: Vec<ValueId> = self.params.iter().map(|p| p.value).collect();
        if self.options.segments <= 1 {
            let run = sim.run_for_training(&named)?;
            let (loss, seed) = self.loss(&run.outputs, run.model, labels, teacher, scale)?;
            let values = SegmentValues { run: &run, cache: None };
            let grads = self.backward_through(sim, &run, &values, vec![seed], &wrt, None)?;
            self.add_param_grads(&grads);
            return Ok(loss);
        }
        let model = sim.training_model()?;
        let plan = SegmentPlan::new(model, self.options.segments)?;
        let (outputs, kept) = sim.run_keeping(&named, &plan.kept)?;
        let (loss, seed) = self.loss(&outputs, model, labels, teacher, scale)?;
        // Gradients by values that cross a segment boundary, as they leave the segments that
        // read them (before the straight-through estimator of their producer).
        let mut pending: HashMap<ValueId, ArrayD<f32>> = HashMap::from([seed]);
        for segment in plan.segments.iter().rev() {
            let mut cache = qexec::ValueCache::new();
            for &v in &segment.reads {
                if let Some(t) = kept.get(v) {
                    cache.insert(v, t.clone());
                }
            }
            let run = sim.rerun_for_training(&cache, &segment.nodes)?;
            let seeds: Vec<(ValueId, ArrayD<f32>)> =
                segment.produces.iter().filter_map(|v| Some((*v, pending.remove(v)?))).collect();
            if seeds.is_empty() {
                continue;
            }
            let mut wanted = wrt.clone();
            wanted.extend(segment.reads.iter().copied());
            let values = SegmentValues { run: &run, cache: Some(&cache) };
            let grads = self.backward_through(sim, &run, &values, seeds, &wanted, Some(segment))?;
            for v in &segment.reads {
                if let Some(g) = grads.get(v) {
                    match pending.get_mut(v) {
                        Some(sum) if sum.shape() == g.shape() => *sum += g,
                        Some(_) => {
                            return Err(TrainError::Data(format!(
                                "gradients of '{}' differ in shape",
                                model.graph.value(*v).name
                            )));
                        }
                        None => {
                            pending.insert(*v, g.clone());
                        }
                    }
                }
            }
            self.add_param_grads(&grads);
        }
        Ok(loss)
    }

    /// The loss of the first output against `labels` or `teacher`, and its gradient (times
    /// `scale`) as a seed at that output of `model`.
    fn loss(
        &self,
        outputs: &[Tensor],
        model: &qgraph::Model,
        labels: &[usize],
        teacher: Option<&Tensor>,
        scale: f32,
    ) -> Result<(f64, (ValueId, ArrayD<f32>))> {
        let out = outputs.first().and_then(Tensor::as_f32).ok_or_else(|| {
            TrainError::Data("the model's first output is not f32: nothing to train against".into())
        })?;
        let teacher = teacher.and_then(Tensor::as_f32).map(|t| t.view());
        let (loss, mut seed) = self.options.objective.loss(out.view(), labels, teacher)?;
        seed.mapv_inplace(|g| g * scale);
        let out_value =
            *model.graph.outputs().first().ok_or_else(|| TrainError::Data("no outputs".into()))?;
        Ok((loss, (out_value, seed)))
    }

    /// `qgrad::backward` over `run` (through `segment`'s nodes only, when given) from `seeds`
    /// to `wanted`, with the straight-through estimator at every quantizer (range gradients
    /// collected) except at the values the segment reads from before it (their producer's
    /// segment applies it).
    fn backward_through(
        &mut self,
        sim: &QuantSim,
        run: &TrainingRun<'_>,
        values: &SegmentValues<'_, '_>,
        seeds: Vec<(ValueId, ArrayD<f32>)>,
        wanted: &[ValueId],
        segment: Option<&Segment>,
    ) -> Result<qgrad::Gradients> {
        let none = HashSet::new();
        let inputs = segment.map_or(&none, |s| &s.reads);
        let placement = sim.placement();
        let activation_quantizers: HashMap<ValueId, &Quantizer> = run.quantizers.iter().copied().collect();
        let param_index: HashMap<ValueId, usize> =
            self.params.iter().enumerate().map(|(i, p)| (p.value, i)).collect();
        let range_index: HashMap<QuantizerId, usize> =
            self.ranges.iter().enumerate().map(|(i, r)| (r.quantizer, i)).collect();
        let (params, ranges) = (&self.params, &mut self.ranges);
        let mut through = |v: ValueId, grad: &mut ArrayD<f32>| -> qgrad::Result<()> {
            if inputs.contains(&v) {
                return Ok(());
            }
            let (x, shape, q, index): (&[f32], &[usize], &Quantizer, Option<&[usize]>) = if let Some(&i) =
                param_index.get(&v)
            {
                let q = placement.quantizer_of(v).map(|q| placement.quantizer(q)).filter(|q| q.enabled);
                let Some(q) = q else { return Ok(()) };
                let p = &params[i];
                (&p.data, &p.shape, q, p.encoding_index.as_deref())
            } else if let Some(q) = activation_quantizers.get(&v) {
                let Some(t) = run.before_quantization.get(&v).and_then(Tensor::as_f32) else { return Ok(()) };
                let Some(x) = t.as_slice() else { return Ok(()) };
                (x, t.shape(), *q, None)
            } else {
                return Ok(());
            };
            let learned =
                placement.quantizer_of(v).and_then(|q| range_index.get(&q)).map(|&i| &mut ranges[i].grad);
            straight_through(x, shape, q, index, grad, learned.map(|g| g.as_mut_slice())).map_err(|detail| {
                qgrad::GradError::Shape { op: run.model.graph.value(v).name.clone(), detail }
            })
        };
        Ok(match segment {
            Some(s) => qgrad::backward_within(run.model, &s.within, values, seeds, wanted, &mut through)?,
            None => qgrad::backward(run.model, values, seeds, wanted, &mut through)?,
        })
    }

    /// Adds the parameters' gradients in `grads` to theirs.
    fn add_param_grads(&mut self, grads: &qgrad::Gradients) {
        for p in self.params.iter_mut() {
            if let Some(g) = grads.get(&p.value) {
                for (acc, &d) in p.grad.iter_mut().zip(g.iter()) {
                    *acc += d;
                }
            }
        }
    }

    /// The unit of each parameter's updates, per element (or one for the whole tensor): the
    /// step of its quantization grid where it is quantized to integers; for a bias (or another
    /// unquantized parameter), the step of the quantized output of the layer that reads it; else
    /// its RMS. Folding batch norms leaves layers whose weights differ in scale by orders of
    /// magnitude; measured in these units one learning rate suits them all.
    fn units(&self, sim: &QuantSim) -> Vec<Vec<f32>> {
        let placement = sim.placement();
        let int_encodings = |v: ValueId| {
            let q = placement.quantizer(placement.quantizer_of(v)?);
            if q.enabled && q.precision.is_int() { q.encodings.as_deref() } else { None }
        };
        self.params
            .iter()
            .map(|p| {
                let grid = int_encodings(p.value).and_then(|encs| match &p.encoding_index {
                    Some(index) => index.iter().map(|&i| encs.get(i).map(|e| e.delta as f32)).collect(),
                    None => Some(vec![encs.first()?.delta as f32]),
                });
                let output = || {
                    let encs = int_encodings(p.unit_from?)?;
                    Some(vec![encs.first()?.delta as f32])
                };
                grid.or_else(output).filter(|u| u.iter().all(|&d| d > 0.0 && d.is_finite())).unwrap_or_else(
                    || {
                        let rms = (p.data.iter().map(|&w| f64::from(w) * f64::from(w)).sum::<f64>()
                            / p.data.len().max(1) as f64)
                            .sqrt();
                        vec![(rms as f32).max(1e-2)]
                    },
                )
            })
            .collect()
    }

    /// Clips the gradients by their global norm and takes one Adam step at `lr` (weights in
    /// `units`).
    fn step(&mut self, lr: f32, units: &[Vec<f32>]) {
        if let Some(limit) = self.options.clip_grad_norm {
            let sq: f64 =
                self.params.iter().flat_map(|p| &p.grad).map(|&g| f64::from(g) * f64::from(g)).sum::<f64>()
                    + self.ranges.iter().flat_map(|r| &r.grad).map(|g| g * g).sum::<f64>();
            let norm = sq.sqrt();
            if norm > f64::from(limit) {
                let k = f64::from(limit) / norm;
                self.params
                    .iter_mut()
                    .flat_map(|p| p.grad.iter_mut())
                    .for_each(|g| *g = (f64::from(*g) * k) as f32);
                self.ranges.iter_mut().flat_map(|r| r.grad.iter_mut()).for_each(|g| *g *= k);
            }
        }
        for (p, unit) in self.params.iter_mut().zip(units) {
            // Adam on `w / unit`: the step is `lr` units, whatever the tensor's scale.
            let mut u: Vec<f32> = p.data.iter().zip(unit.iter().cycle()).map(|(w, s)| w / s).collect();
            let g: Vec<f32> = p.grad.iter().zip(unit.iter().cycle()).map(|(g, s)| g * s).collect();
            p.adam.lr = lr;
            p.adam.step(&mut u, &g);
            for ((w, u), s) in p.data.iter_mut().zip(&u).zip(unit.iter().cycle()) {
                *w = u * s;
            }
            p.grad.iter_mut().for_each(|g| *g = 0.0);
        }
        for r in self.ranges.iter_mut() {
            let k = r.template.len();
            let grad: Vec<f32> = r
                .grad
                .iter()
                .enumerate()
                .map(|(i, &g)| match i < k {
                    true => (g * f64::from(r.state[i]).exp()) as f32,
                    false if r.symmetric => 0.0,
                    false => g as f32,
                })
                .collect();
            r.adam.lr = lr;
            r.adam.step(&mut r.state, &grad);
            for (i, t) in r.template.iter().enumerate() {
                // The offset keeps zero on the grid.
                r.state[k + i] = r.state[k + i].clamp(-(t.steps as f32), 0.0);
            }
            r.grad.iter_mut().for_each(|g| *g = 0.0);
        }
        self.steps_done += 1;
    }

    fn checkpoint(&self, header: Value, best: &[Vec<f32>]) -> Checkpoint {
        let mut arrays = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let (m, v, _) = p.adam.state();
            arrays.push((format!("param:{}", p.name), p.data.clone()));
            arrays.push((format!("adam_m:{}", p.name), m.to_vec()));
            arrays.push((format!("adam_v:{}", p.name), v.to_vec()));
            arrays.push((format!("best:{}", p.name), best.get(i).cloned().unwrap_or_default()));
        }
        for (i, r) in self.ranges.iter().enumerate() {
            let (m, v, _) = r.adam.state();
            arrays.push((format!("range:{}", r.name), r.state.clone()));
            arrays.push((format!("range_m:{}", r.name), m.to_vec()));
            arrays.push((format!("range_v:{}", r.name), v.to_vec()));
            arrays.push((
                format!("best_range:{}", r.name),
                best.get(self.params.len() + i).cloned().unwrap_or_default(),
            ));
        }
        let mut header = header;
        if let Some(map) = header.as_object_mut() {
            map.insert("steps_done".into(), json!(self.steps_done));
        }
        Checkpoint { header, arrays }
    }

    /// Restores the state of checkpoint `c`; returns the best snapshot it holds.
    fn resume(&mut self, c: &Checkpoint, path: &Path) -> Result<Vec<Vec<f32>>> {
        let bad = |detail: String| TrainError::Checkpoint { path: path.display().to_string(), detail };
        let get = |name: String, len: usize| -> Result<Vec<f32>> {
            match c.array(&name) {
                Some(a) if a.len() == len => Ok(a.to_vec()),
                Some(a) => Err(bad(format!("{name} holds {} values, {len} expected", a.len()))),
                None => Err(bad(format!("{name} is missing"))),
            }
        };
        let steps =
            c.header.get("steps_done").and_then(Value::as_u64).ok_or_else(|| bad("no step count".into()))?;
        let t = i32::try_from(steps).map_err(|_| bad(format!("step count {steps}")))?;
        let mut best = Vec::new();
        for p in self.params.iter_mut() {
            let n = p.data.len();
            p.data = get(format!("param:{}", p.name), n)?;
            let (m, v) = (get(format!("adam_m:{}", p.name), n)?, get(format!("adam_v:{}", p.name), n)?);
            p.adam.restore(&m, &v, t);
            best.push(get(format!("best:{}", p.name), n)?);
        }
        for r in self.ranges.iter_mut() {
            let n = r.state.len();
            r.state = get(format!("range:{}", r.name), n)?;
            let (m, v) = (get(format!("range_m:{}", r.name), n)?, get(format!("range_v:{}", r.name), n)?);
            r.adam.restore(&m, &v, t);
            best.push(get(format!("best_range:{}", r.name), n)?);
        }
        self.steps_done = steps as usize;
        Ok(best)
    }
}

fn check_options(o: &QatOptions, data: &TrainingData<'_>) -> Result<()> {
    if o.batch_size == 0 || o.micro_batch == 0 {
        return Err(TrainError::Data("batch and micro-batch sizes must be at least 1".into()));
    }
    if !(o.learning_rate > 0.0 && o.learning_rate.is_finite()) {
        return Err(TrainError::Data(format!("learning rate {} is not positive", o.learning_rate)));
    }
    if data.samples.is_empty() {
        return Err(TrainError::Data("no training samples".into()));
    }
    if let Some(a) = &o.augmentation {
        a.check()?;
    }
    if o.objective == Objective::CrossEntropy {
        let rows: usize = data.samples.iter().map(rows_of).sum();
        match data.labels {
            Some(l) if l.len() == rows => {}
            Some(l) => {
                return Err(TrainError::Data(format!("{} labels for {rows} training samples", l.len())));
            }
            None => return Err(TrainError::Data("cross-entropy needs labels".into())),
        }
    }
    Ok(())
}

/// Trains the calibrated simulation `sim` on `data` (see the module doc). `checkpoint`: the file
/// written after every epoch, and resumed from when it exists and `resume` is set (a checkpoint
/// of other settings is an error). `evaluate` scores the simulation before training and after
/// every epoch; the best epoch's state is kept (without it, the last epoch's).
pub fn train(
    sim: &mut QuantSim,
    data: TrainingData<'_>,
    options: &QatOptions,
    checkpoint: Option<(&Path, bool)>,
    mut evaluate: Option<Evaluate<'_>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<QatReport> {
    check_options(options, &data)?;
    let samples = data.samples;
    // Label offsets of each sample's rows.
    let mut first_row = Vec::with_capacity(samples.len());
    let mut rows = 0usize;
    for s in samples {
        first_row.push(rows);
        rows += rows_of(s);
    }
    // The FP32 model's outputs (distillation and MSE): once per sample, or per augmented batch.
    let float = match options.objective {
        Objective::CrossEntropy => None,
        _ => Some(qexec::Session::new(
            data.teacher.unwrap_or(sim.model()).clone(),
            qexec::SessionOptions::threads(sim.options().threads),
        )?),
    };
    let teacher_of = |feeds: &Feeds| -> Result<Option<Tensor>> {
        let Some(float) = float.as_ref() else { return Ok(None) };
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let first = float.run(&named)?.into_iter().next();
        first.map(Some).ok_or_else(|| TrainError::Data("the FP32 model has no outputs".into()))
    };
    let teacher: Vec<Tensor> = match options.augmentation {
        Some(_) => Vec::new(),
        None => samples.iter().filter_map(|s| teacher_of(s).transpose()).collect::<Result<_>>()?,
    };
    let g = &sim.model().graph;
    let params: Vec<Param> = trainable_values(g)
        .into_iter()
        .filter_map(|v| {
            let t = g.static_value(v)?.as_f32()?;
            let data: Vec<f32> = t.iter().copied().collect();
            let placement = sim.placement();
            let granularity = placement.quantizer_of(v).map(|q| placement.quantizer(q).granularity);
            let encoding_index = match granularity {
                Some(g @ (Granularity::PerChannel { .. } | Granularity::PerBlock { .. })) => {
                    encoding_index(t.shape(), g).ok().map(|(index, _)| index)
                }
                _ => None,
            };
            Some(Param {
                value: v,
                unit_from: quantized_output_of_reader(sim, v),
                encoding_index,
                name: g.value(v).name.clone(),
                shape: t.shape().to_vec(),
                grad: vec![0.0; data.len()],
                adam: Adam::new(data.len(), options.learning_rate),
                data,
            })
        })
        .collect();
    let mut ranges = Vec::new();
    if options.mode == QatMode::RangeLearning {
        let placement = sim.placement();
        for q in placement.quantizer_ids() {
            let quantizer = placement.quantizer(q);
            let Some(encs) = quantizer.encodings.as_ref() else { continue };
            if !quantizer.enabled
                || quantizer.frozen
                || !quantizer.precision.is_int()
                || quantizer.fixed_range.is_some()
            {
                continue;
            }
            let name = placement
                .tensors_of(q)
                .next()
                .map_or_else(|| format!("quantizer {}", q.0), |t| g.value(t.value).name.clone());
            let state: Vec<f32> = encs
                .iter()
                .map(|e| e.delta.ln() as f32)
                .chain(encs.iter().map(|e| e.offset as f32))
                .collect();
            ranges.push(LearnedRange {
                quantizer: q,
                name,
                template: encs.clone(),
                symmetric: quantizer.symmetric,
                grad: vec![0.0; state.len()],
                adam: Adam::new(state.len(), options.learning_rate),
                state,
            });
        }
    }
    let mut trainer = Trainer { options, params, ranges, steps_done: 0 };
    let mut report = QatReport {
        epochs: Vec::new(),
        best_epoch: 0,
        trained_tensors: trainer.params.len(),
        trained_values: trainer.params.iter().map(|p| p.data.len()).sum(),
        learned_quantizers: trainer.ranges.len(),
        resumed_after: None,
    };
    let fingerprint = trainer.fingerprint(samples.len());
    let mut best = trainer.snapshot();
    let mut best_score: Option<f64> = None;
    let mut start = 0usize;
    if let Some((path, true)) = checkpoint
        && path.exists()
    {
        let c = Checkpoint::read(path)?;
        if c.header.get("fingerprint") != Some(&fingerprint) {
            return Err(TrainError::Checkpoint {
                path: path.display().to_string(),
                detail: "written by a training of other settings, data or model (remove it or drop --resume)"
                    .into(),
            });
        }
        best = trainer.resume(&c, path)?;
        start = c.header.get("epoch").and_then(Value::as_u64).unwrap_or(0) as usize;
        report.best_epoch = c.header.get("best_epoch").and_then(Value::as_u64).unwrap_or(0) as usize;
        best_score = c.header.get("best_score").and_then(Value::as_f64);
        report.epochs = c.header["history"]
            .as_array()
            .map_or_else(Vec::new, |h| h.iter().map(EpochRecord::from_json).collect());
        report.resumed_after = Some(start);
        trainer.apply(sim)?;
    } else if let Some(eval) = evaluate.as_mut() {
        let score = eval(sim)?;
        best_score = Some(score);
        report.epochs.push(EpochRecord { epoch: 0, loss: f64::NAN, score: Some(score), seconds: 0.0 });
    }
    let batch = options.batch_size;
    let steps_per_epoch = samples.len().div_ceil(batch);
    let total_steps = steps_per_epoch * options.epochs;
    for epoch in start + 1..=options.epochs {
        let started = Instant::now();
        let order = shuffled(samples.len(), options.seed.wrapping_add(epoch as u64));
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        for (step, batch_ids) in order.chunks(batch).enumerate() {
            let batch_rows: usize = batch_ids.iter().map(|&i| rows_of(&samples[i])).sum();
            for (part, chunk) in batch_ids.chunks(options.micro_batch).enumerate() {
                let mut feeds = stack(samples, chunk)?;
                if let Some(a) = &options.augmentation {
                    let seed = options.seed ^ ((epoch as u64) << 42) ^ ((step as u64) << 21) ^ part as u64;
                    feeds = a.apply(&feeds, seed)?;
                }
                let labels: Vec<usize> = match data.labels {
                    Some(l) => chunk
                        .iter()
                        .flat_map(|&i| l[first_row[i]..first_row[i] + rows_of(&samples[i])].iter().copied())
                        .collect(),
                    None => Vec::new(),
                };
                let target = if options.augmentation.is_some() {
                    teacher_of(&feeds)?
                } else if teacher.is_empty() {
                    None
                } else {
                    let parts: Vec<Tensor> = chunk.iter().map(|&i| teacher[i].clone()).collect();
                    Some(
                        Tensor::concat_rows(&parts)
                            .ok_or_else(|| TrainError::Data("FP32 outputs differ in shape".into()))?,
                    )
                };
                let loss =
                    trainer.accumulate(sim, &feeds, &labels, target.as_ref(), 1.0 / batch_rows as f32)?;
                if !loss.is_finite() {
                    return Err(TrainError::Diverged { loss, epoch, step: step + 1 });
                }
                loss_sum += loss;
                seen += rows_of(&feeds);
            }
            let lr = trainer.learning_rate(total_steps);
            let units = trainer.units(sim);
            trainer.step(lr, &units);
            trainer.apply(sim)?;
            progress(&Progress {
                epoch,
                epochs: options.epochs,
                step: step + 1,
                steps: steps_per_epoch,
                loss: loss_sum / seen.max(1) as f64,
            });
        }
        let seconds = started.elapsed().as_secs_f64();
        let score = match evaluate.as_mut() {
            Some(eval) => Some(eval(sim)?),
            None => None,
        };
        report.epochs.push(EpochRecord { epoch, loss: loss_sum / seen.max(1) as f64, score, seconds });
        let better = match (score, best_score) {
            (Some(s), Some(b)) => s > b,
            _ => true,
        };
        if better {
            best = trainer.snapshot();
            report.best_epoch = epoch;
            best_score = score.or(best_score);
        }
        if let Some((path, _)) = checkpoint {
            let history: Vec<Value> = report.epochs.iter().map(EpochRecord::to_json).collect();
            let header = json!({
                "format": "quantkit-qat",
                "fingerprint": fingerprint,
                "epoch": epoch,
                "best_epoch": report.best_epoch,
                "best_score": best_score,
                "history": history,
            });
            trainer.checkpoint(header, &best).write(path)?;
        }
    }
    trainer.restore(&best);
    trainer.apply(sim)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_biases_learn_preprocessing_constants_do_not() {
        use qgraph::{DType, Shape};
        let mut g = Graph::new("g");
        let t = |shape: &[usize]| Tensor::from_vec(shape, vec![0.5f32; shape.iter().product()]).unwrap();
        let x = g.add_input("x", DType::F32, Shape::known(&[1, 3, 4, 4]));
        let mean = g.add_initializer("mean", t(&[1, 3, 1, 1]));
        let centred = g.add_op("Sub", "centred", &[x, mean], vec![]);
        let (w, b) = (g.add_initializer("w", t(&[2, 3, 1, 1])), g.add_initializer("b", t(&[2])));
        let conv = g.add_op("Conv", "conv", &[centred, w, b], vec![]);
        let flat = g.add_op("Flatten", "flat", &[conv], vec![]);
        let w2 = g.add_initializer("w2", t(&[32, 4]));
        let product = g.add_op("MatMul", "fc", &[flat, w2], vec![]);
        let bias = g.add_initializer("bias", t(&[4]));
        let scale = g.add_initializer("scale", t(&[4]));
        let shifted = g.add_op("Add", "fc_bias", &[bias, product], vec![]);
        g.add_op("Mul", "scaled", &[shifted, scale], vec![]);
        let names: Vec<&str> = trainable_values(&g).iter().map(|&v| g.value(v).name.as_str()).collect();
        assert_eq!(names, ["w", "b", "w2", "bias"]);
    }

    #[test]
    fn shuffles_are_permutations_and_depend_on_the_seed() {
        let a = shuffled(50, 1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, shuffled(50, 2));
        assert_eq!(a, shuffled(50, 1));
    }
}

//! `Session`: a graph compiled into a list of steps (one kernel per node, in topological order),
//! and the run loop that feeds inputs, calls the hook on every produced tensor, frees each
//! intermediate after its last reader, and can resume from cached tensors, recomputing only what
//! lies downstream of the values that changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use qgraph::{Dim, Model, NodeId, Tensor, ValueId, ValueSource};

use crate::buffers::BufferPool;
use crate::error::{ExecError, Result};
use crate::hook::{Epilogue, Hook, TensorEvent, TensorKind};
use crate::memory::{self, default_max_tensor_bytes};
use crate::ops::{self, Activation, ExecCtx, Kernel};

/// How a session is built.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Worker threads; 0 means one per available core. With 1, every kernel runs on the calling
    /// thread and no thread pool is created.
    pub threads: usize,
    /// Whether Conv/ConvTranspose/Gemm/MatMul apply a directly following Relu or static Clip
    /// themselves (skipped automatically when a hook observes the intermediate tensor).
    pub fuse_activations: bool,
    /// The largest tensor, in bytes, a node may produce: a node whose output shape is known
    /// beyond it is refused when the session is built, one whose shape is only known at run time
    /// when it runs, before anything is allocated. Default: [`default_max_tensor_bytes`].
    pub max_tensor_bytes: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { threads: 0, fuse_activations: true, max_tensor_bytes: default_max_tensor_bytes() }
    }
}

impl SessionOptions {
    /// Options with the given thread count.
    pub fn threads(threads: usize) -> SessionOptions {
        SessionOptions { threads, ..SessionOptions::default() }
    }
}

/// Which values a run hands back besides the graph outputs.
#[derive(Debug, Clone, Default)]
pub enum Keep {
    /// Only the graph outputs.
    #[default]
    Outputs,
    /// Every value the run fed or computed (the cache for a later `resume`). Disables fusion.
    All,
    /// These values too.
    Values(Vec<ValueId>),
}

/// Per-run settings.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Called on produced tensors.
    pub hook: Option<&'a mut (dyn Hook + Send)>,
    /// Values to keep.
    pub keep: Keep,
    /// Also call the hook on fed graph inputs.
    pub hook_inputs: bool,
    /// Also call the hook on initializers and constants, once per run, before their first reader.
    pub hook_params: bool,
    /// Time every step (kernel and the hook calls on its outputs) into [`RunResult::profile`].
    pub profile: bool,
    /// Run every kernel on the calling thread, whatever the session's thread count: for callers
    /// that run several inputs at once, one per thread.
    pub serial: bool,
}

impl<'a> RunOptions<'a> {
    /// Options with a hook.
    pub fn with_hook(hook: &'a mut (dyn Hook + Send)) -> RunOptions<'a> {
        RunOptions { hook: Some(hook), ..RunOptions::default() }
    }

    /// Sets the keep policy.
    pub fn keep(mut self, keep: Keep) -> RunOptions<'a> {
        self.keep = keep;
        self
    }

    /// Sets whether steps are timed.
    pub fn profile(mut self, profile: bool) -> RunOptions<'a> {
        self.profile = profile;
        self
    }

    /// Sets whether the run stays on the calling thread.
    pub fn serial(mut self, serial: bool) -> RunOptions<'a> {
        self.serial = serial;
        self
    }
}

/// Tensors by value id: what a run kept, and what `resume` starts from.
#[derive(Debug, Clone, Default)]
pub struct ValueCache {
    values: HashMap<ValueId, Tensor>,
}

impl ValueCache {
    /// An empty cache.
    pub fn new() -> ValueCache {
        ValueCache::default()
    }

    /// The tensor of `v`, if cached.
    pub fn get(&self, v: ValueId) -> Option<&Tensor> {
        self.values.get(&v)
    }

    /// Caches `t` as the value of `v` (replacing any previous one). Cached initializers override
    /// the model's data in `resume`.
    pub fn insert(&mut self, v: ValueId, t: Tensor) {
        self.values.insert(v, t);
    }

    /// Removes `v`.
    pub fn remove(&mut self, v: ValueId) -> Option<Tensor> {
        self.values.remove(&v)
    }

    /// Number of cached values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Total bytes of the cached tensors.
    pub fn bytes(&self) -> usize {
        self.values.values().map(tensor_bytes).sum()
    }

    /// The cached (value, tensor) pairs, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (ValueId, &Tensor)> {
        self.values.iter().map(|(&v, t)| (v, t))
    }
}

/// Measurements of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Nodes executed (a fused activation counts with its producer as one).
    pub nodes_run: usize,
    /// Peak bytes of fed and computed tensors alive at once (weights excluded).
    pub peak_bytes: usize,
}

/// What a run returns.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The graph outputs, in graph order.
    pub outputs: Vec<Tensor>,
    /// The values kept per `Keep` (for `Keep::All`: every fed or computed value).
    pub kept: ValueCache,
    /// Measurements.
    pub stats: RunStats,
    /// With [`RunOptions::profile`]: the time of every step that ran, in execution order.
    pub profile: Vec<StepTime>,
}

/// The wall time of one executed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTime {
    /// The node whose kernel ran.
    pub node: NodeId,
    /// The activation node it applied itself, if fused.
    pub fused: Option<NodeId>,
    /// From the kernel call to the end of the hook calls on its outputs.
    pub elapsed: std::time::Duration,
    /// The shape of the step's first output.
    pub output_shape: Vec<usize>,
}

/// One compiled node.
struct Step {
    node: NodeId,
    kernel: Box<dyn Kernel>,
    /// The activation of the next step, if this step can apply it itself.
    fuse: Option<Activation>,
}

/// How a step runs the activation of the next step.
enum Fusion<'h> {
    /// The kernel applies it to its output (no quantizer in between).
    InKernel(Activation),
    /// The kernel's epilogue applies the hook's transform of the kernel output, the activation,
    /// then the transform of the activation output (if the hook has one).
    BetweenEpilogues(Activation, Epilogue<'h>, Option<Epilogue<'h>>),
}

impl Fusion<'_> {
    fn activation(&self) -> Activation {
        match self {
            Fusion::InKernel(a) | Fusion::BetweenEpilogues(a, _, _) => *a,
        }
    }
}

/// A model compiled for execution.
pub struct Session {
    model: Model,
    steps: Vec<Step>,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
    buffers: BufferPool,
    /// Per value: static, or computed from static data alone. Their buffers are dropped after
    /// use, not pooled: each is made once per run and would fill the pool with weight-sized
    /// buffers.
    per_run_weights: Vec<bool>,
    /// Whether a batch may run sample by sample ([`qgraph::samples_independent`]).
    samples_apart: bool,
    /// The largest tensor a node may produce, in bytes.
    max_tensor_bytes: usize,
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.len() * t.dtype().size_of()
}

/// `order` (a topological order) with every node that computes from static data alone (a
/// weight's QuantizeLinear/DequantizeLinear pair, a Transpose of a weight) moved to just before
/// its first reader: the computed weight then lives only as long as its reader needs it, so a
/// model whose weights are read on demand holds one at a time, not all of them from the start.
/// Also returns which nodes compute from static data alone.
fn weight_steps_deferred(g: &qgraph::Graph, order: Vec<NodeId>) -> (Vec<NodeId>, Vec<bool>) {
    let mut weight_only = vec![false; g.node_count()];
    for &id in &order {
        let node = g.node(id);
        weight_only[id.index()] = node
            .inputs()
            .iter()
            .flatten()
            .chain(node.implicit_inputs())
            .all(|&v| g.is_static(v) || g.producer(v).is_some_and(|o| weight_only[o.node.index()]));
    }
    let mut placed = vec![false; g.node_count()];
    let mut out = Vec::with_capacity(order.len());
    let mut stack: Vec<(NodeId, bool)> = Vec::new();
    let readers = order.iter().filter(|id| !weight_only[id.index()]);
    let rest = order.iter().filter(|id| weight_only[id.index()]);
    for &id in readers.chain(rest) {
        // Depth first through weight-only producers, each placed after its own inputs.
        stack.push((id, false));
        while let Some((n, inputs_placed)) = stack.pop() {
            if placed[n.index()] {
                continue;
            }
            if inputs_placed {
                placed[n.index()] = true;
                out.push(n);
                continue;
            }
            stack.push((n, true));
            let node = g.node(n);
            for &v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                if let Some(o) = g.producer(v)
                    && weight_only[o.node.index()]
                    && !placed[o.node.index()]
                {
                    stack.push((o.node, false));
                }
            }
        }
    }
    (out, weight_only)
}

impl Session {
    /// Compiles `model`: every node gets its kernel now, so an unsupported op or an invalid
    /// attribute is reported before any data flows.
    pub fn new(model: Model, options: SessionOptions) -> Result<Session> {
        let opset = model.default_opset();
        let g = &model.graph;
        let mut steps: Vec<Step> = Vec::new();
        let (order, weight_only) = weight_steps_deferred(g, g.topological_order()?);
        let per_run_weights: Vec<bool> = g
            .value_ids()
            .map(|v| g.is_static(v) || g.producer(v).is_some_and(|o| weight_only[o.node.index()]))
            .collect();
        for id in order {
            let node = g.node(id);
            let outputs_static = node.outputs().iter().flatten().all(|&v| g.is_static(v));
            if outputs_static && !node.outputs().is_empty() {
                continue;
            }
            for &v in node.outputs().iter().flatten() {
                let value = g.value(v);
                let (Some(shape), Some(dtype)) =
                    (value.shape.as_ref().and_then(|s| s.to_known()), value.dtype)
                else {
                    continue;
                };
                memory::check(&shape, dtype.size_of(), options.max_tensor_bytes)
                    .map_err(|e| ops::invalid(node, format!("output '{}': {e}", value.name)))?;
            }
            steps.push(Step { node: id, kernel: ops::compile(node, opset)?, fuse: None });
        }
        if options.fuse_activations {
            for i in 0..steps.len().saturating_sub(1) {
                if !steps[i].kernel.fuses_activation() {
                    continue;
                }
                let (producer, next) = (g.node(steps[i].node), g.node(steps[i + 1].node));
                let Some(out) = producer.outputs().first().copied().flatten() else { continue };
                let feeds_next = next.inputs().first().copied().flatten() == Some(out);
                if !feeds_next || g.use_count(out) != 1 || g.is_output(out) || producer.outputs().len() != 1 {
                    continue;
                }
                let bound = |slot: usize| {
                    let v = next.inputs().get(slot).copied().flatten()?;
                    let t = g.static_value(v)?;
                    if t.len() == 1 { t.to_f64_vec().first().map(|&x| x as f32) } else { None }
                };
                steps[i].fuse = ops::fusable_activation(next, opset, bound);
            }
        }
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        } else {
            options.threads
        };
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map_err(|e| ExecError::ThreadPool { threads, detail: e.to_string() })?,
            )
        } else {
            None
        };
        let samples_apart = qgraph::samples_independent(&model).is_ok();
        Ok(Session {
            model,
            steps,
            threads,
            pool,
            buffers: BufferPool::default(),
            per_run_weights,
            samples_apart,
            max_tensor_bytes: options.max_tensor_bytes,
        })
    }

    /// Whether the model keeps the samples of a batch apart ([`qgraph::samples_independent`]),
    /// so a batch may run sample by sample.
    pub fn keeps_samples_apart(&self) -> bool {
        self.samples_apart
    }

    /// Takes over the recycled activation buffers of `previous` (a session it replaces, e.g. one
    /// rebuilt with other weights), so the first runs reuse warm memory instead of faulting in
    /// fresh pages.
    pub fn reuse_buffers(&mut self, previous: Session) {
        self.buffers = previous.buffers;
    }

    /// The model the session runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Worker threads in use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Number of nodes the session executes per full run (constants excluded).
    pub fn step_count(&self) -> usize {
        self.steps.len()
    }

    /// Runs the graph on named inputs and returns the graph outputs.
    pub fn run(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        Ok(self.run_with(feeds, RunOptions::default())?.outputs)
    }

    /// Runs the graph on named inputs with a hook and a keep policy. A batch of a model that
    /// keeps its samples apart ([`qgraph::samples_independent`]) runs sample by sample when no
    /// hook, profile or kept value asks for the batch's tensors (see
    /// [`Session::run_per_sample`]).
    pub fn run_with(&self, feeds: &[(&str, Tensor)], options: RunOptions<'_>) -> Result<RunResult> {
        let fed = self.checked_feeds(feeds)?;
        let plain = options.hook.is_none() && matches!(options.keep, Keep::Outputs) && !options.profile;
        if plain && !options.serial {
            let serial = |f: &[(&str, Tensor)]| self.run_with(f, RunOptions::default().serial(true));
            if let Some(result) = self.per_sample(feeds, serial)? {
                return Ok(result);
            }
        }
        self.execute(fed, None, None, false, options)
    }

    /// Runs a batch sample by sample when the model keeps its samples apart: `run` gets each
    /// sample as a batch of one (on the session's threads, one sample each, so `run` should
    /// keep to its calling thread), and the outputs are stacked back along the first axis, the
    /// same values a run of the whole batch gives, without streaming every layer's output for
    /// the whole batch through memory. `None` (nothing run) when the model or the feeds do not
    /// allow it: a fixed batch axis, feeds of different lengths, a single sample, or an op that
    /// mixes samples. Stats: the nodes of one sample's run, and the peak of the samples running
    /// at once.
    pub fn run_per_sample(
        &self,
        feeds: &[(&str, Tensor)],
        run: impl Fn(&[(&str, Tensor)]) -> Result<RunResult> + Sync + Send,
    ) -> Result<Option<RunResult>> {
        self.checked_feeds(feeds)?;
        self.per_sample(feeds, run)
    }

    fn per_sample(
        &self,
        feeds: &[(&str, Tensor)],
        run: impl Fn(&[(&str, Tensor)]) -> Result<RunResult> + Sync + Send,
    ) -> Result<Option<RunResult>> {
        let n = feeds.first().and_then(|(_, t)| t.shape().first().copied()).unwrap_or(0);
        if !self.samples_apart || n < 2 || feeds.iter().any(|(_, t)| t.shape().first() != Some(&n)) {
            return Ok(None);
        }
        let samples: Option<Vec<Vec<(&str, Tensor)>>> = (0..n)
            .map(|i| feeds.iter().map(|(name, t)| t.rows(i, 1).map(|r| (*name, r))).collect())
            .collect();
        let Some(samples) = samples else { return Ok(None) };
        let results: Vec<RunResult> = match &self.pool {
            Some(pool) => pool.install(|| samples.par_iter().map(|f| run(f)).collect::<Result<_>>())?,
            None => samples.iter().map(|f| run(f)).collect::<Result<_>>()?,
        };
        let count = self.model.graph.outputs().len();
        let mut outputs = Vec::with_capacity(count);
        for i in 0..count {
            let parts: Vec<Tensor> = results.iter().filter_map(|r| r.outputs.get(i).cloned()).collect();
            match Tensor::concat_rows(&parts).filter(|t| t.shape().first() == Some(&n)) {
                Some(t) => outputs.push(t),
                None => return Ok(None),
            }
        }
        let at_once = self.threads.min(n);
        let stats = RunStats {
            nodes_run: results.iter().map(|r| r.stats.nodes_run).max().unwrap_or(0),
            peak_bytes: results.iter().map(|r| r.stats.peak_bytes).max().unwrap_or(0) * at_once,
        };
        Ok(Some(RunResult { outputs, kept: ValueCache::new(), stats, profile: Vec::new() }))
    }

    /// The feeds by value id, checked against the graph's inputs (names, dtypes, shapes).
    fn checked_feeds(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<(ValueId, Tensor)>> {
        let g = &self.model.graph;
        let mut fed: Vec<(ValueId, Tensor)> = Vec::with_capacity(feeds.len());
        for (name, t) in feeds {
            let v = g.value_id(name).filter(|v| g.inputs().contains(v)).ok_or_else(|| {
                ExecError::UnknownInput {
                    name: (*name).to_string(),
                    inputs: g
                        .inputs()
                        .iter()
                        .map(|&v| g.value(v).name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?;
            self.check_input(v, t)?;
            fed.push((v, t.clone()));
        }
        for &v in g.inputs() {
            if !fed.iter().any(|(f, _)| *f == v) {
                return Err(ExecError::MissingInput { name: g.value(v).name.clone() });
            }
        }
        Ok(fed)
    }

    /// Re-runs only the nodes downstream of `changed`, reading every other value from `cache`
    /// (typically the `kept` values of an earlier `Keep::All` run). Values in `cache` override
    /// initializers, so a changed weight can be passed that way.
    pub fn resume(
        &self,
        cache: &ValueCache,
        changed: &[ValueId],
        options: RunOptions<'_>,
    ) -> Result<RunResult> {
        let g = &self.model.graph;
        let mut dirty = vec![false; g.node_count()];
        for n in g.downstream_nodes(changed) {
            dirty[n.index()] = true;
        }
        self.execute(Vec::new(), Some(cache), Some(&dirty), false, options)
    }

    /// Runs only `nodes` (in the session's order), reading every other value — graph inputs
    /// included, which are checked as fed ones are — from `cache`: a model computed piece by
    /// piece, each piece starting from the values the earlier ones kept.
    pub fn run_nodes(
        &self,
        cache: &ValueCache,
        nodes: &[NodeId],
        options: RunOptions<'_>,
    ) -> Result<RunResult> {
        let g = &self.model.graph;
        for &v in g.inputs() {
            if let Some(t) = cache.get(v) {
                self.check_input(v, t)?;
            }
        }
        let mut dirty = vec![false; g.node_count()];
        for n in nodes {
            if let Some(d) = dirty.get_mut(n.index()) {
                *d = true;
            }
        }
        self.execute(Vec::new(), Some(cache), Some(&dirty), true, options)
    }

    fn check_input(&self, v: ValueId, t: &Tensor) -> Result<()> {
        let val = self.model.graph.value(v);
        let dtype_ok = val.dtype.is_none_or(|d| d == t.dtype());
        let shape_ok = val.shape.as_ref().is_none_or(|s| {
            s.rank() == t.shape().len()
                && s.0.iter().zip(t.shape()).all(|(d, &n)| !matches!(d, Dim::Known(k) if *k != n))
        });
        if dtype_ok && shape_ok {
            return Ok(());
        }
        let expected = format!(
            "{} {}",
            val.dtype.map_or("?".to_string(), |d| d.to_string()),
            val.shape.as_ref().map_or("[?]".to_string(), |s| format!("{s}"))
        );
        Err(ExecError::InputMismatch {
            name: val.name.clone(),
            expected,
            got: format!("{} {:?}", t.dtype(), t.shape()),
        })
    }

    /// Runs the steps `dirty` marks (all without it) on `fed` and `cache`; `partial`: graph outputs
    /// neither computed nor cached are no error (and no outputs are handed back).
    fn execute(
        &self,
        fed: Vec<(ValueId, Tensor)>,
        cache: Option<&ValueCache>,
        dirty: Option<&[bool]>,
        partial: bool,
        options: RunOptions<'_>,
    ) -> Result<RunResult> {
        match &self.pool {
            Some(pool) if !options.serial => pool.install(|| {
                let running = AtomicBool::new(true);
                let runner = rayon::current_thread_index();
                rayon::scope(|s| {
                    for _ in 1..self.threads {
                        s.spawn(|_| keep_busy(&running, runner));
                    }
                    // Ends the keepers however the run ends (a panic included), so the scope can.
                    let _end = RunEnd(&running);
                    self.execute_here(fed, cache, dirty, partial, options)
                })
            }),
            _ => self.execute_here(fed, cache, dirty, partial, options),
        }
    }

    fn execute_here(
        &self,
        fed: Vec<(ValueId, Tensor)>,
        cache: Option<&ValueCache>,
        dirty: Option<&[bool]>,
        partial: bool,
        mut options: RunOptions<'_>,
    ) -> Result<RunResult> {
        let g = &self.model.graph;
        let threads = if options.serial { 1 } else { self.threads };
        let ctx = ExecCtx { threads, pool: &self.buffers, epilogue: None, max_bytes: self.max_tensor_bytes };
        let nvalues = g.value_count();
        // `requested`: values to hand back; `keep`: values never freed (those and the outputs).
        let mut requested = vec![false; nvalues];
        let keep_all = matches!(options.keep, Keep::All);
        if let Keep::Values(vs) = &options.keep {
            vs.iter().for_each(|v| requested[v.index()] = true);
        }
        let mut keep = requested.clone();
        for &v in g.outputs() {
            keep[v.index()] = true;
        }
        let runs = |s: &Step| dirty.is_none_or(|d| d[s.node.index()]);
        // Last step (among those that run) reading each value.
        let mut last_use = vec![usize::MAX; nvalues];
        for (i, s) in self.steps.iter().enumerate().filter(|(_, s)| runs(s)) {
            let node = g.node(s.node);
            for v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                last_use[v.index()] = i;
            }
        }
        let mut store: Vec<Option<Tensor>> = vec![None; nvalues];
        let (mut live, mut stats) = (0usize, RunStats::default());
        for (v, mut t) in fed {
            if options.hook_inputs {
                if options.hook.as_deref().is_some_and(|h| h.observes(v)) {
                    t = self.buffers.owned_copy(t);
                }
                call_hook(&mut options, g, v, TensorKind::GraphInput, &mut t)?;
            }
            live += tensor_bytes(&t);
            store[v.index()] = Some(t);
        }
        stats.peak_bytes = live;
        let fusion_allowed = !keep_all;
        let mut skip_next = false;
        let mut profile = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            if skip_next {
                skip_next = false;
                continue;
            }
            if !runs(step) {
                continue;
            }
            let node = g.node(step.node);
            // The explicit inputs, then what the node's subgraphs read from this scope.
            let slots: Vec<Option<ValueId>> = node
                .inputs()
                .iter()
                .copied()
                .chain(node.implicit_inputs().iter().map(|&v| Some(v)))
                .collect();
            let mut inputs: Vec<Option<Tensor>> = Vec::with_capacity(slots.len());
            for &slot in &slots {
                let Some(v) = slot else {
                    inputs.push(None);
                    continue;
                };
                if store[v.index()].is_none() {
                    let t = match cache.and_then(|c| c.get(v)) {
                        Some(t) => {
                            if !g.is_static(v) {
                                live += tensor_bytes(t);
                            }
                            t.clone()
                        }
                        None => match g.load_static(v).map_err(ExecError::from)? {
                            Some(mut t) => {
                                if options.hook_params {
                                    call_hook(&mut options, g, v, TensorKind::Param, &mut t)?;
                                }
                                t
                            }
                            None if g.value(v).source() == ValueSource::Input => {
                                return Err(ExecError::MissingInput { name: g.value(v).name.clone() });
                            }
                            None => {
                                return Err(ExecError::MissingValue {
                                    name: g.value(v).name.clone(),
                                    node: node.name.clone(),
                                });
                            }
                        },
                    };
                    store[v.index()] = Some(t);
                }
                inputs.push(store[v.index()].clone());
            }
            // Release inputs read for the last time, so kernels can reuse their buffers.
            for &v in slots.iter().flatten() {
                if last_use[v.index()] == i && !keep[v.index()] && !keep_all {
                    if let Some(t) = store[v.index()].take() {
                        if !g.is_static(v) {
                            live -= tensor_bytes(&t);
                        }
                    }
                }
            }
            let produced = node.outputs().first().copied().flatten();
            let hook = options.hook.as_deref();
            let activation_out =
                |i: usize| g.node(self.steps[i + 1].node).outputs().first().copied().flatten();
            let fusion = match (step.fuse, produced) {
                (Some(act), Some(out))
                    if fusion_allowed
                        && !requested[out.index()]
                        && self.steps.get(i + 1).is_some_and(&runs) =>
                {
                    match hook {
                        None => Some(Fusion::InKernel(act)),
                        Some(h) if !h.observes(out) => Some(Fusion::InKernel(act)),
                        // A quantizer between the kernel and its activation: both epilogues and
                        // the activation between them, per block, when the hook has an
                        // elementwise form for both values.
                        Some(h) if step.kernel.applies_epilogue() => {
                            let after = activation_out(i);
                            match (h.epilogue(out), after) {
                                (Some(before), Some(v)) if !h.observes(v) || h.epilogue(v).is_some() => {
                                    Some(Fusion::BetweenEpilogues(act, before, h.epilogue(v)))
                                }
                                _ => None,
                            }
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            let fused = fusion.as_ref().map(Fusion::activation);
            // The value the kernel's first output becomes (the activation's, when fused), and the
            // hook's epilogue for it if the kernel can apply one.
            let first_out = if fused.is_some() { activation_out(i) } else { produced };
            let composite;
            let epilogue = match (&fusion, step.kernel.applies_epilogue(), first_out, hook) {
                (Some(Fusion::BetweenEpilogues(act, before, after)), _, Some(v), _) => {
                    let (act, before, after) = (*act, *before, *after);
                    composite = move |block: &mut [f32]| {
                        before(block);
                        act.apply(block);
                        if let Some(after) = after {
                            after(block);
                        }
                    };
                    Some((v, &composite as Epilogue<'_>))
                }
                (_, true, Some(v), Some(h)) if h.observes(v) => h.epilogue(v).map(|f| (v, f)),
                _ => None,
            };
            let step_ctx = ExecCtx { epilogue: epilogue.map(|(_, f)| f), ..ctx };
            let kernel_activation = match fusion {
                Some(Fusion::InKernel(act)) => Some(act),
                _ => None,
            };
            let started = options.profile.then(std::time::Instant::now);
            let outs = step.kernel.run(&mut inputs, &step_ctx, kernel_activation).map_err(|detail| {
                ExecError::Kernel { node: node.name.clone(), op: node.op_type.clone(), detail }
            })?;
            let applied = epilogue.map(|(v, _)| v);
            for (t, slot) in inputs.into_iter().zip(&slots) {
                if let (Some(t), Some(v)) = (t, slot)
                    && !self.per_run_weights[v.index()]
                {
                    self.buffers.recycle(t);
                }
            }
            stats.nodes_run += 1;
            // With a fused activation, the result belongs to the activation node's output.
            let out_node = if fused.is_some() {
                skip_next = true;
                g.node(self.steps[i + 1].node)
            } else {
                node
            };
            let out_id = if fused.is_some() { self.steps[i + 1].node } else { step.node };
            let output_shape = match (&started, outs.first()) {
                (Some(_), Some(t)) => t.shape().to_vec(),
                _ => Vec::new(),
            };
            let mut outs = outs.into_iter();
            for &slot in out_node.outputs() {
                let t = outs.next();
                let Some(v) = slot else { continue };
                let Some(mut t) = t else {
                    return Err(ExecError::Kernel {
                        node: out_node.name.clone(),
                        op: out_node.op_type.clone(),
                        detail: format!("output '{}' was not produced", g.value(v).name),
                    });
                };
                if applied != Some(v) || t.dtype() != qgraph::DType::F32 {
                    call_hook(&mut options, g, v, TensorKind::NodeOutput(out_id), &mut t)?;
                }
                if g.use_count(v) == 0 && !keep[v.index()] && !keep_all {
                    continue;
                }
                live += tensor_bytes(&t);
                store[v.index()] = Some(t);
            }
            stats.peak_bytes = stats.peak_bytes.max(live);
            if let Some(started) = started {
                let fused = fused.map(|_| out_id);
                let elapsed = started.elapsed();
                profile.push(StepTime { node: step.node, fused, elapsed, output_shape });
            }
        }
        let mut outputs = Vec::with_capacity(g.outputs().len());
        for &v in g.outputs() {
            let t = store[v.index()]
                .clone()
                .or_else(|| cache.and_then(|c| c.get(v).cloned()))
                .map_or_else(|| g.load_static(v), |t| Ok(Some(t)))
                .map_err(ExecError::from)?;
            match t {
                Some(t) => outputs.push(t),
                None if partial => {
                    outputs.clear();
                    break;
                }
                None => {
                    return Err(ExecError::MissingValue {
                        name: g.value(v).name.clone(),
                        node: "(graph output)".into(),
                    });
                }
            }
        }
        let mut kept = ValueCache::new();
        for (v, t) in g.value_ids().zip(store) {
            if let Some(t) = t {
                if (keep_all || requested[v.index()]) && !g.is_static(v) {
                    kept.insert(v, t);
                }
            }
        }
        Ok(RunResult { outputs, kept, stats, profile })
    }
}

fn call_hook(
    options: &mut RunOptions<'_>,
    g: &qgraph::Graph,
    v: ValueId,
    kind: TensorKind,
    t: &mut Tensor,
) -> Result<()> {
    let Some(hook) = options.hook.as_deref_mut() else { return Ok(()) };
    if !hook.observes(v) {
        return Ok(());
    }
    let name = &g.value(v).name;
    hook.on_tensor(TensorEvent { value: v, name, kind }, t)
        .map_err(|source| ExecError::Hook { name: name.clone(), source })
}

/// Clears the running flag of [`keep_busy`] when dropped.
struct RunEnd<'a>(&'a AtomicBool);

impl Drop for RunEnd<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Keeps a worker of the session's pool looking for the run's parallel work until the run ends,
/// instead of letting it fall asleep between kernels. On a virtual machine a sleeping vCPU halts,
/// and waking it for every parallel kernel costs more than the kernel gains once the host
/// has stopped polling for it (a run after a pause took longer on two threads than on one).
/// A worker that picks this up on the thread running the graph returns at once: it would
/// otherwise wait for the run it sits under.
fn keep_busy(running: &AtomicBool, runner: Option<usize>) {
    if rayon::current_thread_index() == runner {
        return;
    }
    while running.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

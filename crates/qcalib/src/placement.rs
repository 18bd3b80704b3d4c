//! Quantizer placement (spec §3.2–3.7): which tensors of a graph get a quantizer and in which
//! state, decided from a quantsim config exactly as AIMET decides it — params and activations,
//! data-movement outputs left alone, the config applied level by level, supergroups, the MatmulAdd,
//! norm and MaskedSoftmax passes, exception rules for norms and dynamic MatMul, and quantizer tying
//! through Concat, AveragePool, Relu and Resize.
//!
//! State lives in a side table: [`Placement`] maps a tensor (`ValueId`) to a [`QuantizerId`];
//! several tensors may share one quantizer (tying). The graph itself is never modified.

use std::collections::{HashMap, HashSet};

use qgraph::ops::ParamRole;
use qgraph::{Graph, NodeId, ValueId, ValueSource};
use qkernels::{Encoding, QuantSpec};
use serde_json::{Value, json};

use crate::config::{QuantsimConfig, RangeConstraint};
use crate::error::{CalibError, Result};
use crate::patterns::{ChannelClip, channel_clips, masked_softmax_fusions, matmul_add_matches, norm_matches};

/// Index of a quantizer in a [`Placement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuantizerId(pub usize);

/// What a quantizer simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Integer grid of the given bitwidth (2..=16; 32 for bias bookkeeping).
    Int(u32),
    /// IEEE half: a round-to-nearest-even cast.
    Float16,
    /// bfloat16: a round-to-nearest-even cast.
    BFloat16,
}

impl Precision {
    /// Whether this is an integer grid.
    pub fn is_int(self) -> bool {
        matches!(self, Precision::Int(_))
    }

    /// Bits per value.
    pub fn bits(self) -> u32 {
        match self {
            Precision::Int(b) => b,
            Precision::Float16 | Precision::BFloat16 => 16,
        }
    }

    /// Parses `int8`, `int16`, `fp16`/`float16`, `bf16`/`bfloat16`, `int4`, ….
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "fp16" | "float16" | "f16" => Some(Precision::Float16),
            "bf16" | "bfloat16" => Some(Precision::BFloat16),
            _ => {
                let bits: u32 = s.strip_prefix("int")?.parse().ok()?;
                (2..=16).contains(&bits).then_some(Precision::Int(bits))
            }
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Precision::Int(b) => write!(f, "int{b}"),
            Precision::Float16 => f.write_str("float16"),
            Precision::BFloat16 => f.write_str("bfloat16"),
        }
    }
}

/// How many encodings a quantizer holds and along which axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One encoding for the whole tensor.
    PerTensor,
    /// One encoding per index of `axis`.
    PerChannel {
        /// Channel axis of the tensor.
        axis: usize,
    },
    /// One encoding per (channel, block of `block_size` along `block_axis`).
    PerBlock {
        /// Channel axis.
        channel_axis: usize,
        /// Axis split into blocks.
        block_axis: usize,
        /// Elements per block.
        block_size: usize,
    },
}

/// Where a weight's blocks lie: one encoding per index of `channel_axis` (output channels) and
/// block of `block_axis` (its `in_channels` input channels); its bias quantizer, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    /// Output-channel axis.
    pub channel_axis: usize,
    /// Input-channel axis, split into blocks.
    pub block_axis: usize,
    /// Length of `block_axis`.
    pub in_channels: usize,
    /// The bias quantizer of the weight's node.
    pub bias: Option<QuantizerId>,
}

/// One quantizer's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantizer {
    /// Whether it acts at all (disabled = float pass-through).
    pub enabled: bool,
    /// Integer bits or float cast.
    pub precision: Precision,
    /// Symmetric grid.
    pub symmetric: bool,
    /// Strict symmetric (one step fewer).
    pub strict: bool,
    /// Unsigned symmetric for non-negative ranges.
    pub unsigned_symmetric: bool,
    /// Encodings per tensor, channel or block.
    pub granularity: Granularity,
    /// Per-block encodings whose scales are compressed as AIMET's LPBQ does (the decompressed
    /// bitwidth; see `set_lpbq`).
    pub lpbq: Option<u32>,
    /// Fixed bounds from `encoding_constraints` (`None` bound = calibrated).
    pub fixed_range: Option<(Option<f64>, Option<f64>)>,
    /// Calibrated (or loaded) encodings, flattened in row-major order of the encoding shape.
    pub encodings: Option<Vec<Encoding>>,
    /// Frozen encodings are kept by calibration.
    pub frozen: bool,
    /// Encodings a technique learned (AdaRound, sequential MSE), with the precision and symmetry
    /// they hold for: the quantizer is frozen to them whenever it is at that precision, and
    /// calibrated like any other at another one.
    pub learned: Option<LearnedEncodings>,
    /// Whether the quantizer sits on a parameter (weights, bias, …).
    pub is_param: bool,
}

impl Quantizer {
    fn new(is_param: bool) -> Quantizer {
        Quantizer {
            enabled: false,
            precision: Precision::Int(8),
            symmetric: false,
            strict: false,
            unsigned_symmetric: false,
            granularity: Granularity::PerTensor,
            lpbq: None,
            fixed_range: None,
            encodings: None,
            frozen: false,
            learned: None,
            is_param,
        }
    }

    /// The grid rule of an integer quantizer.
    pub fn spec(&self) -> QuantSpec {
        QuantSpec {
            bitwidth: self.precision.bits(),
            symmetric: self.symmetric,
            strict: self.strict,
            unsigned_symmetric: self.unsigned_symmetric,
        }
    }

    /// Changes the precision; a change drops the encodings (they no longer fit). Learned
    /// encodings come back (frozen) when the quantizer returns to their precision; frozen
    /// encodings that were not learned for a precision stay as they are.
    pub fn set_precision(&mut self, precision: Precision) {
        if self.precision == precision {
            return;
        }
        match &self.learned {
            Some(l) if l.precision == precision => {
                self.symmetric = l.symmetric;
                self.encodings = Some(l.encodings.clone());
                self.frozen = true;
            }
            Some(_) => {
                self.encodings = None;
                self.frozen = false;
            }
            None if self.frozen => return,
            None => self.encodings = None,
        }
        self.precision = precision;
    }

    /// Freezes the quantizer to encodings a technique learned at `learned.precision`: now, if it
    /// is at that precision, and whenever [`Quantizer::set_precision`] brings it back to it.
    pub fn learn(&mut self, learned: LearnedEncodings) {
        if self.precision == learned.precision {
            self.symmetric = learned.symmetric;
            self.encodings = Some(learned.encodings.clone());
            self.frozen = true;
        }
        self.learned = Some(learned);
    }
}

/// Encodings a technique learned, with the precision and symmetry they hold for.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnedEncodings {
    /// The precision they were learned at.
    pub precision: Precision,
    /// Symmetric grids.
    pub symmetric: bool,
    /// One per tensor, channel or block.
    pub encodings: Vec<Encoding>,
}

/// Why a tensor carries a quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A parameter (static input in a param slot) of `node`.
    Param {
        /// The first node reading it as a parameter.
        node: NodeId,
        /// Its role there.
        role: ParamRole,
    },
    /// A float graph input.
    GraphInput,
    /// A static tensor (initializer or `Constant` output) read as an ordinary input.
    Constant,
    /// An output of `node`.
    Output {
        /// The producer.
        node: NodeId,
    },
}

impl TensorRole {
    /// Short name for reports: `param`, `input`, `constant`, `output`.
    pub fn kind(self) -> &'static str {
        match self {
            TensorRole::Param { .. } => "param",
            TensorRole::GraphInput => "input",
            TensorRole::Constant => "constant",
            TensorRole::Output { .. } => "output",
        }
    }
}

/// A tensor that carries a quantizer.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    /// The tensor.
    pub value: ValueId,
    /// Why it is quantized.
    pub role: TensorRole,
    /// Its quantizer (possibly shared with other tensors).
    pub quantizer: QuantizerId,
}

/// The quantizer side table of one graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    quantizers: Vec<Quantizer>,
    tensors: Vec<QuantizedTensor>,
    by_value: HashMap<ValueId, usize>,
}

/// Ops whose outputs never get a quantizer (AIMET's `op_outputs_to_ignore`).
const IGNORED_OUTPUT_OPS: [&str; 11] = [
    "Flatten",
    "Gather",
    "Reshape",
    "Shape",
    "Unsqueeze",
    "Squeeze",
    "Split",
    "Compress",
    "Tile",
    "Transpose",
    "Identity",
];

/// Ops that keep their input's grid (outputs not quantized unless the config says so).
pub const GRID_PRESERVING_OPS: [&str; 28] = [
    "Col2Im",
    "Compress",
    "DepthToSpace",
    "Dropout",
    "Expand",
    "Flatten",
    "Gather",
    "GatherElements",
    "GatherND",
    "Identity",
    "MaxPool",
    "MaxRoiPool",
    "NonZero",
    "Pad",
    "ReduceMax",
    "ReduceMin",
    "Reshape",
    "Slice",
    "SpaceToDepth",
    "Split",
    "SplitToSequence",
    "Squeeze",
    "Tile",
    "TopK",
    "Transpose",
    "Unsqueeze",
    "BatchToSpace",
    "SpaceToBatch",
];

/// Ops whose output quantizer is tied forward to their input's.
const FORWARD_TIED_OPS: [&str; 5] = ["AveragePool", "Relu", "Resize", "Upsample", "CropAndResize"];

/// Multi-input ops whose inputs are tied backward to their output's quantizer.
const BACKWARD_TIED_OPS: [&str; 4] = ["Concat", "Scatter", "ScatterElements", "ScatterND"];

const NORM_OPS: [&str; 5] = [
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
    "InstanceNormalization",
];

/// The precisions a simulation starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultPrecision {
    /// Parameter (weight) precision.
    pub param: Precision,
    /// Activation precision.
    pub activation: Precision,
}

impl Default for DefaultPrecision {
    fn default() -> DefaultPrecision {
        DefaultPrecision { param: Precision::Int(8), activation: Precision::Int(8) }
    }
}

fn is_depthwise_or_3d(g: &Graph, node: NodeId) -> bool {
    let n = g.node(node);
    let Some(shape) = n.input(1).and_then(|w| g.value(w).shape.as_ref()).and_then(|s| s.to_known()) else {
        return false;
    };
    if shape.len() == 5 {
        return true;
    }
    let group = n.int_attr("group", 1).unwrap_or(1);
    match n.op_type.as_str() {
        "Conv" => group > 1 && shape.get(1) == Some(&1),
        "ConvTranspose" => group > 1 && shape.first().copied() == Some(group as usize),
        _ => false,
    }
}

impl Placement {
    /// Places and configures quantizers on `g` (whose dtypes should be inferred) under `config`.
    pub fn build(g: &Graph, config: &QuantsimConfig, precision: DefaultPrecision) -> Result<Placement> {
        let mut p = Placement { quantizers: Vec::new(), tensors: Vec::new(), by_value: HashMap::new() };
        let order = g.topological_order()?;
        let matmul_add = if config.supergroup_passes.iter().any(|s| s == "MatmulAdd") {
            matmul_add_matches(g, &order)
        } else {
            Vec::new()
        };
        let mut unquantized = if config.supergroup_passes.iter().any(|s| s == "MaskedSoftmax") {
            masked_softmax_fusions(g, &order)
        } else {
            HashSet::new()
        };
        let clips = channel_clips(g, &order);
        for c in &clips {
            unquantized.extend(c.inner.iter().chain(&c.bounds));
        }
        p.collect_params(g, &order, &matmul_add)?;
        p.collect_activations(g, &order, &unquantized);
        p.configure(g, config, &order, precision, &matmul_add, &clips);
        p.apply_param_symmetry_to_inputs(g, config, &order);
        p.apply_exception_rules(g, config, &order);
        p.tie_quantizers(g, &order);
        Ok(p)
    }

    fn add(&mut self, value: ValueId, role: TensorRole) {
        if self.by_value.contains_key(&value) {
            return;
        }
        let q = QuantizerId(self.quantizers.len());
        self.quantizers.push(Quantizer::new(matches!(role, TensorRole::Param { .. })));
        self.by_value.insert(value, self.tensors.len());
        self.tensors.push(QuantizedTensor { value, role, quantizer: q });
    }

    fn collect_params(
        &mut self,
        g: &Graph,
        order: &[NodeId],
        matmul_add: &[(NodeId, NodeId, ValueId)],
    ) -> Result<()> {
        for &node in order {
            if g.node(node).op_type == "Constant" {
                continue;
            }
            for param in g.node_params(node)? {
                self.add(param.root, TensorRole::Param { node, role: param.role });
            }
            if let Some(&(_, add, bias)) = matmul_add.iter().find(|(_, a, _)| *a == node) {
                self.add(bias, TensorRole::Param { node: add, role: ParamRole::Bias });
            }
        }
        Ok(())
    }

    /// Activation quantizers (spec §3.2), none on the `unquantized` tensors (inside fusions).
    fn collect_activations(&mut self, g: &Graph, order: &[NodeId], unquantized: &HashSet<ValueId>) {
        let float = |v: ValueId| g.value(v).dtype.is_none_or(|d| d.is_float()) && !unquantized.contains(&v);
        let ignored =
            |v: ValueId| g.producer_node(v).is_some_and(|n| IGNORED_OUTPUT_OPS.contains(&n.op_type.as_str()));
        for &v in g.inputs() {
            if float(v) {
                self.add(v, TensorRole::GraphInput);
            }
        }
        for &node in order {
            let n = g.node(node);
            if n.op_type == "Constant" {
                continue;
            }
            for (slot, v) in n.inputs().iter().enumerate() {
                let Some(v) = *v else { continue };
                if (n.op_type == "Resize" || n.op_type == "Upsample") && slot > 0 {
                    continue;
                }
                if g.is_static(v) && float(v) {
                    self.add(v, TensorRole::Constant);
                }
            }
            for v in n.outputs().iter().flatten() {
                if float(*v) && !ignored(*v) && !g.is_static(*v) {
                    self.add(*v, TensorRole::Output { node });
                }
            }
        }
    }

    /// The quantized tensors, params first (in node order), then activations.
    pub fn tensors(&self) -> &[QuantizedTensor] {
        &self.tensors
    }

    /// The quantized-tensor entry of `v`, if it carries a quantizer.
    pub fn tensor(&self, v: ValueId) -> Option<&QuantizedTensor> {
        self.by_value.get(&v).map(|&i| &self.tensors[i])
    }

    /// The quantizer on `v`, if any.
    pub fn quantizer_of(&self, v: ValueId) -> Option<QuantizerId> {
        self.tensor(v).map(|t| t.quantizer)
    }

    /// A quantizer.
    pub fn quantizer(&self, id: QuantizerId) -> &Quantizer {
        &self.quantizers[id.0]
    }

    /// A quantizer, mutably.
    pub fn quantizer_mut(&mut self, id: QuantizerId) -> &mut Quantizer {
        &mut self.quantizers[id.0]
    }

    /// Every quantizer that sits on at least one tensor, once each, in tensor order.
    pub fn quantizer_ids(&self) -> Vec<QuantizerId> {
        let mut seen = HashSet::new();
        self.tensors.iter().map(|t| t.quantizer).filter(|q| seen.insert(*q)).collect()
    }

    /// The tensors a quantizer sits on.
    pub fn tensors_of(&self, q: QuantizerId) -> impl Iterator<Item = &QuantizedTensor> {
        self.tensors.iter().filter(move |t| t.quantizer == q)
    }

    /// Whether `v` is quantized by an enabled quantizer.
    pub fn is_enabled(&self, v: ValueId) -> bool {
        self.quantizer_of(v).is_some_and(|q| self.quantizers[q.0].enabled)
    }

    fn q_mut(&mut self, v: ValueId) -> Option<&mut Quantizer> {
        let q = self.quantizer_of(v)?;
        Some(&mut self.quantizers[q.0])
    }

    /// Quantizers of `node`'s outputs.
    pub fn output_quantizers(&self, g: &Graph, node: NodeId) -> Vec<QuantizerId> {
        g.node(node)
            .outputs()
            .iter()
            .flatten()
            .filter_map(|&v| {
                self.tensor(v).filter(|t| matches!(t.role, TensorRole::Output { .. })).map(|t| t.quantizer)
            })
            .collect()
    }

    /// Quantizers of `node`'s non-parameter inputs (activations and constants it reads).
    pub fn input_quantizers(&self, g: &Graph, node: NodeId) -> Vec<QuantizerId> {
        g.node(node)
            .inputs()
            .iter()
            .flatten()
            .filter_map(|&v| {
                self.tensor(v).filter(|t| !matches!(t.role, TensorRole::Param { .. })).map(|t| t.quantizer)
            })
            .collect()
    }

    /// The quantizers of one layer as AIMET counts them (spec §5.1): its non-parameter inputs that
    /// no node produces (graph inputs, constants), its outputs and its parameters — each once.
    /// Changing these is how a layer is switched to another precision or left in float.
    pub fn op_quantizers(&self, g: &Graph, node: NodeId) -> Vec<QuantizerId> {
        let mut out: Vec<QuantizerId> = Vec::new();
        let inputs =
            g.node(node).inputs().iter().flatten().filter(|&&v| g.producer(v).is_none() || g.is_static(v));
        let from_inputs = inputs.filter_map(|&v| {
            self.tensor(v).filter(|t| !matches!(t.role, TensorRole::Param { .. })).map(|t| t.quantizer)
        });
        let params = self.param_quantizers(g, node).into_iter().map(|(_, q)| q);
        for q in from_inputs.chain(self.output_quantizers(g, node)).chain(params) {
            if !out.contains(&q) {
                out.push(q);
            }
        }
        out
    }

    /// Quantizers of `node`'s parameters, with their roles.
    pub fn param_quantizers(&self, g: &Graph, node: NodeId) -> Vec<(ParamRole, QuantizerId)> {
        let mut out = Vec::new();
        for &v in g.node(node).inputs().iter().flatten() {
            let root = g.static_root(v).map_or(v, |(r, _)| r);
            if let Some(t) = self.tensor(root)
                && let TensorRole::Param { role, .. } = t.role
                && !out.iter().any(|(_, q)| *q == t.quantizer)
            {
                out.push((role, t.quantizer));
            }
        }
        out
    }

    fn configure(
        &mut self,
        g: &Graph,
        config: &QuantsimConfig,
        order: &[NodeId],
        precision: DefaultPrecision,
        matmul_add: &[(NodeId, NodeId, ValueId)],
        clips: &[ChannelClip],
    ) {
        let d = &config.defaults;
        // Defaults for ops and params (steps 1–3).
        for t in &self.tensors {
            let q = &mut self.quantizers[t.quantizer.0];
            match t.role {
                TensorRole::Param { .. } => {
                    q.enabled = d.params_quantized;
                    q.symmetric = d.params_symmetric.unwrap_or(false);
                }
                TensorRole::Output { node } => {
                    q.enabled = d.output_quantized && g.node(node).op_type != "ConstantOfShape";
                    q.symmetric = d.activation_symmetric.unwrap_or(false);
                }
                TensorRole::GraphInput | TensorRole::Constant => {
                    q.enabled = false;
                    q.symmetric = d.activation_symmetric.unwrap_or(false);
                }
            }
            if let Some(s) = d.strict_symmetric {
                q.strict = s;
            }
            if let Some(u) = d.unsigned_symmetric {
                q.unsigned_symmetric = u;
            }
        }
        // The `params` section (step 4).
        for t in &self.tensors {
            if let TensorRole::Param { role, .. } = t.role
                && let Some(rule) = config.params.get(role.aimet_name())
            {
                let q = &mut self.quantizers[t.quantizer.0];
                if let Some(on) = rule.is_quantized {
                    q.enabled = on;
                }
                if let Some(s) = rule.is_symmetric {
                    q.symmetric = s;
                }
            }
        }
        // The `op_type` section, and grid-preserving ops' outputs (step 5).
        for &node in order {
            let op = g.node(node).op_type.as_str();
            let Some(rule) = config.op_types.get(op) else {
                if GRID_PRESERVING_OPS.contains(&op) {
                    for q in self.output_quantizers(g, node) {
                        self.quantizers[q.0].enabled = false;
                    }
                }
                continue;
            };
            let outputs = self.output_quantizers(g, node);
            let inputs = self.input_quantizers(g, node);
            for &q in &outputs {
                let q = &mut self.quantizers[q.0];
                if let Some(on) = rule.output_quantized {
                    q.enabled = on;
                }
                if let Some(RangeConstraint { min, max }) = rule.constraint {
                    q.fixed_range = Some((Some(min), max));
                    if let Some(max) = max
                        && (min + max).abs() <= 1e-6 * max.abs().max(1.0)
                    {
                        q.symmetric = true;
                    }
                }
            }
            if rule.input_quantized == Some(true) {
                inputs.iter().for_each(|q| self.quantizers[q.0].enabled = true);
            }
            if let Some(s) = rule.symmetric {
                inputs.iter().chain(&outputs).for_each(|q| self.quantizers[q.0].symmetric = s);
            }
            for (role, q) in self.param_quantizers(g, node) {
                if let Some(r) = rule.params.get(role.aimet_name()) {
                    let q = &mut self.quantizers[q.0];
                    if let Some(on) = r.is_quantized {
                        q.enabled = on;
                    }
                    if let Some(s) = r.is_symmetric {
                        q.symmetric = s;
                    }
                }
            }
        }
        // Supergroups (step 6).
        self.apply_supergroups(g, config, order, matmul_add, clips);
        // Model inputs and constants read as inputs (step 7).
        if config.model_input_quantized {
            for t in &self.tensors {
                if matches!(t.role, TensorRole::GraphInput | TensorRole::Constant) {
                    self.quantizers[t.quantizer.0].enabled = true;
                }
            }
        }
        // Model outputs (step 8).
        if config.model_output_quantized == Some(true) {
            for &node in order {
                let terminal = g.node(node).outputs().iter().flatten().all(|&v| g.use_count(v) == 0);
                if terminal {
                    for q in self.output_quantizers(g, node) {
                        self.quantizers[q.0].enabled = true;
                    }
                }
            }
        }
        // Precision (step 9).
        for t in &self.tensors {
            let q = &mut self.quantizers[t.quantizer.0];
            q.precision = if q.is_param { precision.param } else { precision.activation };
        }
        // Per-channel params (step 10).
        for &node in order {
            let n = g.node(node);
            if !config.per_channel_for(&n.op_type) {
                continue;
            }
            let grouped_transpose = n.op_type == "ConvTranspose" && n.int_attr("group", 1).unwrap_or(1) > 1;
            for param in g.node_params(node).unwrap_or_default() {
                let Some(axis) = param.channel_axis else { continue };
                if grouped_transpose && param.role == ParamRole::Weight {
                    continue;
                }
                let rank = g.value(param.root).shape.as_ref().map_or(0, |s| s.rank());
                let axis = if param.through_transpose && rank == 2 { 1 - axis } else { axis };
                if let Some(q) = self.q_mut(param.root) {
                    q.granularity = Granularity::PerChannel { axis };
                }
            }
        }
        // Graph passes (step 11): MatmulAdd.
        for &(matmul, _add, bias) in matmul_add {
            for q in self.output_quantizers(g, matmul) {
                self.quantizers[q.0].enabled = false;
            }
            let weight = g.node(matmul).input(1).and_then(|w| g.static_root(w)).map(|(r, _)| r);
            let weight_granularity =
                weight.and_then(|w| self.quantizer_of(w)).map(|q| self.quantizers[q.0].granularity);
            if let Some(q) = self.q_mut(bias) {
                q.enabled = false;
                q.symmetric = true;
                if let Some(Granularity::PerChannel { .. }) = weight_granularity {
                    q.granularity = Granularity::PerChannel { axis: 0 };
                }
            }
        }
        // Graph passes (step 11): decomposed LayerNormalization / RMSNormalization.
        let passes = &config.supergroup_passes;
        let (ln, rms) = (
            passes.iter().any(|p| p == "LayerNormalization"),
            passes.iter().any(|p| p == "RMSNormalization"),
        );
        for m in norm_matches(g, order) {
            if (m.centred && !ln) || (!m.centred && !rms) {
                continue;
            }
            for &node in &m.inner {
                for q in self.output_quantizers(g, node) {
                    self.quantizers[q.0].enabled = false;
                }
            }
            for &c in m.constants.iter().chain(&m.beta) {
                if let Some(q) = self.q_mut(c) {
                    q.enabled = false;
                }
            }
            if let Some(q) = m.gamma.and_then(|v| self.q_mut(v))
                && q.precision == Precision::Int(16)
            {
                q.symmetric = true;
            }
        }
    }

    fn apply_supergroups(
        &mut self,
        g: &Graph,
        config: &QuantsimConfig,
        order: &[NodeId],
        matmul_add: &[(NodeId, NodeId, ValueId)],
        clips: &[ChannelClip],
    ) {
        // A per-channel clip matches a `Clip` of a pattern as a whole: first node → last node.
        let clip_at: HashMap<NodeId, NodeId> = clips.iter().map(|c| (c.first, c.last)).collect();
        let mut patterns: Vec<&Vec<String>> = config.supergroups.iter().collect();
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let mut matched: HashSet<NodeId> = matmul_add.iter().map(|(m, _, _)| *m).collect();
        for pattern in patterns {
            for &start in order {
                if matched.contains(&start)
                    || g.node(start).op_type != pattern[0]
                    || is_depthwise_or_3d(g, start)
                {
                    continue;
                }
                let mut chain = vec![start];
                for op in &pattern[1..] {
                    let last = g.node(*chain.last().unwrap());
                    let Some(out) = last.outputs().first().copied().flatten() else { break };
                    let next = g.consumer_nodes(out);
                    if next.len() != 1 || g.is_output(out) || matched.contains(&next[0]) {
                        break;
                    }
                    match clip_at.get(&next[0]) {
                        Some(&last) if op == "Clip" => chain.push(last),
                        _ if g.node(next[0]).op_type == *op => chain.push(next[0]),
                        _ => break,
                    }
                }
                if chain.len() != pattern.len() {
                    continue;
                }
                for &node in &chain[..chain.len() - 1] {
                    for q in self.output_quantizers(g, node) {
                        self.quantizers[q.0].enabled = false;
                    }
                }
                matched.extend(chain);
            }
        }
    }

    /// Conv/ConvTranspose/Gemm/MatMul whose second input is dynamic: that input's effective
    /// quantizer takes the weight symmetry of the config.
    fn apply_param_symmetry_to_inputs(&mut self, g: &Graph, config: &QuantsimConfig, order: &[NodeId]) {
        for &node in order {
            let n = g.node(node);
            if !["Conv", "ConvTranspose", "Gemm", "MatMul"].contains(&n.op_type.as_str()) {
                continue;
            }
            let Some(w) = n.input(1) else { continue };
            if g.static_root(w).is_some() {
                continue;
            }
            if let Some((q, _)) = self.effective_quantizer(g, w) {
                self.quantizers[q.0].symmetric = config.weight_symmetric_for(&n.op_type);
            }
        }
    }

    /// Applies the exception rules again (spec §3.3; AIMET's `_apply_exception_rules`), as AIMET
    /// does after mixed-precision changes: norm parameters at ≥ 8 bits with their symmetry, and
    /// with a `hw_version`, dynamic MatMul inputs adjusted to each other.
    pub fn reapply_exception_rules(&mut self, g: &Graph, config: &QuantsimConfig) -> Result<()> {
        let order = g.topological_order()?;
        self.apply_exception_rules(g, config, &order);
        Ok(())
    }

    fn apply_exception_rules(&mut self, g: &Graph, config: &QuantsimConfig, order: &[NodeId]) {
        let old_hw =
            config.defaults.hw_version.as_deref().is_some_and(|h| ["V66", "V68", "V69"].contains(&h));
        for &node in order {
            let n = g.node(node);
            let op = n.op_type.as_str();
            if NORM_OPS.contains(&op) {
                let out = self.output_quantizers(g, node).first().map(|q| self.quantizers[q.0].clone());
                for (_, q) in self.param_quantizers(g, node) {
                    let q = &mut self.quantizers[q.0];
                    let Precision::Int(bw) = q.precision else { continue };
                    if !q.enabled {
                        continue;
                    }
                    let mut bw = bw.max(8);
                    match op {
                        "GroupNormalization" | "InstanceNormalization" | "RMSNormalization" => {
                            if let Some(out) = out.as_ref().filter(|o| o.enabled) {
                                q.symmetric = out.symmetric;
                                if let Precision::Int(ob) = out.precision {
                                    bw = ob.max(8);
                                }
                            }
                        }
                        _ => {
                            if old_hw {
                                bw = 8;
                            }
                            q.symmetric = bw >= 16;
                        }
                    }
                    q.precision = Precision::Int(bw);
                }
            }
            if op == "MatMul" && config.defaults.hw_version.is_some() {
                let Some(w) = n.input(1) else { continue };
                if g.static_root(w).is_some() {
                    continue;
                }
                let (Some((q0, _)), Some((q1, _))) =
                    (n.input(0).and_then(|x| self.effective_quantizer(g, x)), self.effective_quantizer(g, w))
                else {
                    continue;
                };
                let (p0, p1) = (self.quantizers[q0.0].precision, self.quantizers[q1.0].precision);
                if !p0.is_int() || !p1.is_int() {
                    continue;
                }
                if old_hw {
                    self.quantizers[q1.0].symmetric = true;
                    self.quantizers[q1.0].precision = Precision::Int(8);
                } else if p1 == Precision::Int(16) {
                    self.quantizers[q1.0].symmetric = true;
                    self.quantizers[q0.0].precision = Precision::Int(16);
                }
            }
        }
    }

    /// AIMET's effective quantizer of `v`: its own if enabled, else walking up through
    /// grid-preserving producers and float→float Casts. Returns it with the tensors walked.
    pub fn effective_quantizer(&self, g: &Graph, v: ValueId) -> Option<(QuantizerId, Vec<ValueId>)> {
        let mut cur = v;
        let mut path = vec![v];
        loop {
            if let Some(q) = self.quantizer_of(cur).filter(|q| self.quantizers[q.0].enabled) {
                return Some((q, path));
            }
            let node = g.producer_node(cur)?;
            let float_cast = node.op_type == "Cast"
                && g.value(cur).dtype.is_some_and(|d| d.is_float())
                && node.input(0).is_some_and(|i| g.value(i).dtype.is_some_and(|d| d.is_float()));
            if !GRID_PRESERVING_OPS.contains(&node.op_type.as_str()) && !float_cast {
                return None;
            }
            cur = node.input(0)?;
            path.push(cur);
        }
    }

    /// Points every tensor of quantizer `from` at quantizer `to`.
    fn retarget(&mut self, from: QuantizerId, to: QuantizerId) {
        if from == to {
            return;
        }
        for t in &mut self.tensors {
            if t.quantizer == from {
                t.quantizer = to;
            }
        }
    }

    /// Merges the constraints of `other` into `into` (spec §3.6).
    fn merge_constraints(&mut self, into: QuantizerId, other: QuantizerId) {
        let o = self.quantizers[other.0].clone();
        let q = &mut self.quantizers[into.0];
        if let (Precision::Int(a), Precision::Int(b)) = (q.precision, o.precision) {
            q.precision = Precision::Int(a.min(b));
        }
        q.symmetric |= o.symmetric;
        q.unsigned_symmetric |= o.unsigned_symmetric;
        if q.fixed_range.is_none() {
            q.fixed_range = o.fixed_range;
        }
        if q.symmetric
            && let Some((lo, hi)) = q.fixed_range
        {
            let m = lo.unwrap_or(0.0).abs().max(hi.unwrap_or(0.0).abs());
            q.fixed_range = Some((Some(-m), Some(m)));
        }
    }

    fn tie_quantizers(&mut self, g: &Graph, order: &[NodeId]) {
        // Backward: inputs of Concat-like ops share the output's quantizer.
        for &node in order.iter().rev() {
            let n = g.node(node);
            if !BACKWARD_TIED_OPS.contains(&n.op_type.as_str()) {
                continue;
            }
            let Some(out_q) = n.outputs().first().copied().flatten().and_then(|o| self.quantizer_of(o))
            else {
                continue;
            };
            if !self.quantizers[out_q.0].enabled {
                continue;
            }
            let mut candidates = Vec::new();
            for &input in n.inputs().iter().flatten() {
                if g.is_static(input) {
                    continue;
                }
                let Some((q, path)) = self.effective_quantizer(g, input) else { continue };
                if path.iter().all(|&v| g.use_count(v) == 1) {
                    candidates.push(q);
                }
            }
            let ranges: Vec<_> = candidates.iter().map(|q| self.quantizers[q.0].fixed_range).collect();
            let all_same = ranges.first().is_some_and(|r| r.is_some() && ranges.iter().all(|x| x == r));
            if all_same {
                self.quantizers[out_q.0].fixed_range = ranges[0];
            }
            for q in candidates {
                if all_same || self.quantizers[q.0].fixed_range.is_none() {
                    self.retarget(q, out_q);
                }
            }
        }
        // Forward: AveragePool/Relu/Resize outputs share their input's quantizer.
        for &node in order {
            let n = g.node(node);
            if !FORWARD_TIED_OPS.contains(&n.op_type.as_str()) {
                continue;
            }
            let Some(out) = n.outputs().first().copied().flatten() else { continue };
            let Some(out_q) = self.quantizer_of(out).filter(|q| self.quantizers[q.0].enabled) else {
                continue;
            };
            let Some((in_q, path)) = n.input(0).and_then(|x| self.effective_quantizer(g, x)) else {
                continue;
            };
            if in_q == out_q {
                continue;
            }
            let out_range = self.quantizers[out_q.0].fixed_range;
            if out_range.is_some()
                && out_range != self.quantizers[in_q.0].fixed_range
                && path.iter().any(|&v| g.use_count(v) != 1)
            {
                continue;
            }
            self.merge_constraints(in_q, out_q);
            self.retarget(out_q, in_q);
        }
    }

    /// Blockwise weights, as AIMET's `set_blockwise_quantization_for_weights`: the weight of every
    /// node of `op_types` gets one encoding per output channel and block of `block_size` input
    /// channels, at `bits` and `symmetric`; its bias quantizer becomes per-channel and symmetric.
    /// Weights whose input-channel axis `block_size` does not divide keep their quantizer, and
    /// are returned with the reason. Encodings are cleared: calibrate (again) after this.
    pub fn set_blockwise_weights(
        &mut self,
        g: &Graph,
        op_types: &[&str],
        bits: u32,
        symmetric: bool,
        block_size: usize,
    ) -> Result<Vec<(String, String)>> {
        Placement::check_precision("(blockwise weights)", Precision::Int(bits))?;
        if block_size == 0 {
            return Err(CalibError::Quantizer {
                tensor: "(blockwise weights)".into(),
                detail: "block size 0".into(),
            });
        }
        let (layouts, mut skipped) = self.block_layouts(g, op_types);
        for (q, name, layout) in layouts {
            if let Err(why) = self.set_weight_blocks(q, layout, Precision::Int(bits), symmetric, block_size) {
                skipped.push((name, why));
            }
        }
        Ok(skipped)
    }

    /// The weight quantizers of the nodes of `op_types` that can be split into blocks, with their
    /// tensor's name and layout; and the weights that cannot, with the reason.
    #[allow(clippy::type_complexity)]
    pub fn block_layouts(
        &self,
        g: &Graph,
        op_types: &[&str],
    ) -> (Vec<(QuantizerId, String, BlockLayout)>, Vec<(String, String)>) {
        let (mut layouts, mut skipped) = (Vec::new(), Vec::new());
        for (id, n) in g.nodes() {
            if !op_types.contains(&n.op_type.as_str()) {
                continue;
            }
            let params = g.node_params(id).unwrap_or_default();
            let Some(weight) = params.iter().find(|p| p.role == ParamRole::Weight) else { continue };
            let Some(shape) = g.static_shape(weight.root).map(<[usize]>::to_vec) else { continue };
            let Some(q) = self.quantizer_of(weight.root) else { continue };
            let name = g.value(weight.root).name.clone();
            let channel_axis = match weight.channel_axis {
                Some(a) if weight.through_transpose && shape.len() == 2 => 1 - a,
                Some(a) => a,
                None => {
                    skipped.push((name, "no output-channel axis".into()));
                    continue;
                }
            };
            if shape.len() < 2 || channel_axis > 1 {
                skipped.push((
                    name,
                    format!("shape {shape:?} has no input-channel axis beside axis {channel_axis}"),
                ));
                continue;
            }
            let block_axis = 1 - channel_axis;
            let bias =
                params.iter().find(|p| p.role == ParamRole::Bias).and_then(|b| self.quantizer_of(b.root));
            layouts.push((
                q,
                name,
                BlockLayout { channel_axis, block_axis, in_channels: shape[block_axis], bias },
            ));
        }
        (layouts, skipped)
    }

    /// Splits the weight quantizer `q` of `layout` into blocks of `block_size` at `precision` and
    /// `symmetric`, its bias per channel and symmetric, clearing their encodings; the reason when
    /// it cannot (the block size does not divide the input channels, or its encodings are frozen).
    pub fn set_weight_blocks(
        &mut self,
        q: QuantizerId,
        layout: BlockLayout,
        precision: Precision,
        symmetric: bool,
        block_size: usize,
    ) -> std::result::Result<(), String> {
        if block_size == 0 || layout.in_channels % block_size != 0 {
            return Err(format!(
                "block size {block_size} does not divide its {} input channels",
                layout.in_channels
            ));
        }
        let quantizer = &mut self.quantizers[q.0];
        if quantizer.frozen {
            return Err("its encodings are frozen".into());
        }
        let BlockLayout { channel_axis, block_axis, .. } = layout;
        quantizer.granularity = Granularity::PerBlock { channel_axis, block_axis, block_size };
        quantizer.precision = precision;
        quantizer.symmetric = symmetric;
        quantizer.encodings = None;
        if let Some(bias) = layout.bias.map(|b| &mut self.quantizers[b.0])
            && !bias.frozen
        {
            bias.granularity = Granularity::PerChannel { axis: 0 };
            bias.symmetric = true;
            bias.encodings = None;
        }
        Ok(())
    }

    /// The placement as JSON: one entry per quantized tensor (name, producer op, kind, enabled,
    /// precision, symmetry, granularity, shared-with), so users can see and diff what is quantized.
    pub fn report(&self, g: &Graph) -> Value {
        let entries: Vec<Value> = self
            .tensors
            .iter()
            .map(|t| {
                let q = &self.quantizers[t.quantizer.0];
                let v = g.value(t.value);
                let producer = match v.source() {
                    ValueSource::Node(o) => g.node(o.node).op_type.clone(),
                    ValueSource::Input => "(graph input)".into(),
                    ValueSource::Initializer => "(initializer)".into(),
                };
                let consumer = match t.role {
                    TensorRole::Param { node, role } => Some(json!({"op": g.node(node).name, "role": role.aimet_name()})),
                    _ => None,
                };
                let granularity = match q.granularity {
                    Granularity::PerTensor => json!("per_tensor"),
                    Granularity::PerChannel { axis } => json!({"per_channel": {"axis": axis}}),
                    Granularity::PerBlock { channel_axis, block_axis, block_size } => {
                        json!({"per_block": {"channel_axis": channel_axis, "block_axis": block_axis, "block_size": block_size}})
                    }
                };
                let shared: Vec<&str> = self
                    .tensors_of(t.quantizer)
                    .filter(|o| o.value != t.value)
                    .map(|o| g.value(o.value).name.as_str())
                    .collect();
                let mut e = json!({
                    "tensor": v.name,
                    "producer": producer,
                    "kind": t.role.kind(),
                    "enabled": q.enabled,
                    "precision": q.precision.to_string(),
                    "symmetric": q.symmetric,
                    "granularity": granularity,
                });
                if let Some(c) = consumer {
                    e["param_of"] = c;
                }
                if q.strict {
                    e["strict_symmetric"] = json!(true);
                }
                if let Some((lo, hi)) = q.fixed_range {
                    e["fixed_range"] = json!([lo, hi]);
                }
                if !shared.is_empty() {
                    e["shared_with"] = json!(shared);
                }
                e
            })
            .collect();
        json!({ "quantizers": entries })
    }

    /// Checks that a precision is one the simulation can run.
    pub fn check_precision(name: &str, p: Precision) -> Result<()> {
        match p {
            Precision::Int(b) if !(2..=16).contains(&b) => Err(CalibError::Quantizer {
                tensor: name.into(),
                detail: format!("bitwidth {b} is outside 2..=16"),
            }),
            _ => Ok(()),
        }
    }
}

//! A simulation's precision plan as AMD Quark's ONNX configuration (`QConfig.to_dict()` /
//! `QConfig.from_dict()` of `quark.onnx`), and such a configuration read back.
//!
//! Quark addresses layers, not tensors: a `QLayerConfig` sets a node's `input_tensors` (its
//! inputs before the first initializer), `weight` (the first initializer), `bias` (the next) and
//! `output_tensors`, and Quark maps the layers to tensor overrides with increasing precedence:
//! `global_config`, `layer_type_config` (by op type), `specific_layer_config` (by node name, or a
//! pattern starting with `^`), then `extra_options.TensorQuantOverrides` (by tensor); `exclude`
//! and a `null` layer config leave nodes in float.
//!
//! Written: `global_config` carries the most common activation and weight precisions; each node
//! that differs gets the fields that differ — `weight` and `bias` from the quantizers of the
//! inputs in those slots (a weight, or a constant such as a Clip's bounds; parameter biases keep
//! their own precision), `output_tensors` from its output quantizer, `input_tensors` only where it
//! reads a graph input — so every tensor is set by exactly one layer entry and Quark's tensor
//! overrides equal the plan's precisions. (A weight reached through an op, e.g. a `Transpose` of
//! an initializer, is not in a slot Quark reads; such plans do not round-trip.)
//! Nodes whose weight and every other quantizer are float are excluded. Quark inserts the
//! converts at precision boundaries itself. A tensor config carries all five fields Quark's
//! `QTensorConfig` takes; only `data_type` (and the node structure) carries the plan.
//!
//! Read: data types set the precision of the quantizers they reach and enable them; excluded
//! nodes have their parameter and output quantizers disabled; tensors without a quantizer here
//! (ops the quantsim config leaves unquantized) are counted, not refused. Symmetry, granularity
//! and calibration come from the quantsim config, as for the onnxruntime overrides.

use std::collections::HashMap;

use qgraph::ops::ParamRole;
use qgraph::{Graph, NodeId, ValueId, ValueSource};
use serde_json::{Map, Value, json};

use crate::error::{CalibError, Result};
use crate::overrides::{AppliedPlan, apply_tensor_quant_overrides};
use crate::placement::{Granularity, Placement, Precision, Quantizer, TensorRole};
use crate::schemes::Scheme;
use crate::sim::QuantSim;

/// Largest node-name pattern read (Quark's `^…` patterns).
const MAX_PATTERN_BYTES: usize = 4096;

fn plan_error(at: &str, detail: impl Into<String>) -> CalibError {
    CalibError::Quantizer { tensor: at.to_string(), detail: detail.into() }
}

/// Quark's data type name of a precision with the given signedness.
fn data_type(p: Precision, signed: bool) -> Option<&'static str> {
    Some(match (p, signed) {
        (Precision::Int(4), true) => "Int4",
        (Precision::Int(4), false) => "UInt4",
        (Precision::Int(8), true) => "Int8",
        (Precision::Int(8), false) => "UInt8",
        (Precision::Int(16), true) => "Int16",
        (Precision::Int(16), false) => "UInt16",
        (Precision::Float16, _) => "Float16",
        (Precision::BFloat16, _) => "BFloat16",
        _ => return None,
    })
}

fn parse_data_type(name: &str) -> Option<Precision> {
    Some(match name {
        "Int4" | "UInt4" => Precision::Int(4),
        "Int8" | "UInt8" => Precision::Int(8),
        "Int16" | "UInt16" => Precision::Int(16),
        "Int32" | "UInt32" => Precision::Int(32),
        "Float16" => Precision::Float16,
        "BFloat16" => Precision::BFloat16,
        _ => return None,
    })
}

/// What one tensor config of the plan says (the fields Quark's `QTensorConfig` keys on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TensorSpec {
    data_type: &'static str,
    symmetric: bool,
    granularity: &'static str,
}

impl TensorSpec {
    fn of(q: &Quantizer, is_param: bool, name: &str) -> Result<TensorSpec> {
        let signed = crate::qdq::signed_view(q, is_param);
        let data_type = data_type(q.precision, signed)
            .ok_or_else(|| plan_error(name, format!("{} has no Quark data type", q.precision)))?;
        let granularity = match q.granularity {
            Granularity::PerTensor => "QuantGranularity.Tensor",
            Granularity::PerChannel { .. } => "QuantGranularity.Channel",
            Granularity::PerBlock { .. } => "QuantGranularity.Group",
        };
        Ok(TensorSpec { data_type, symmetric: q.symmetric, granularity })
    }

    fn to_json(self, calibration: &str) -> Value {
        json!({
            "symmetric": self.symmetric,
            "scale_type": "ScaleType.Float32",
            "calibration_method": calibration,
            "quant_granularity": self.granularity,
            "data_type": self.data_type,
        })
    }
}

/// Quark's calibration method closest to a scheme (TF-enhanced and MSE have none at float
/// scale; Quark's `MinMSE` is its power-of-two search).
fn calibration_method(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Percentile(_) => "CalibMethod.Percentile",
        Scheme::Entropy => "CalibMethod.Entropy",
        _ => "CalibMethod.MinMax",
    }
}

/// The enabled quantizer on `v` with its spec.
fn spec_on(sim: &QuantSim, v: ValueId) -> Result<Option<TensorSpec>> {
    let placement = sim.placement();
    let Some(t) = placement.tensor(v) else { return Ok(None) };
    let q = placement.quantizer(t.quantizer);
    if !q.enabled {
        return Ok(None);
    }
    let is_param = matches!(t.role, TensorRole::Param { .. });
    TensorSpec::of(q, is_param, &sim.model().graph.value(v).name).map(Some)
}

/// A node's inputs in Quark's slots: those before the first initializer (`input_tensors`), that
/// initializer (`weight`; a Clip's min too) and the input after it (`bias`).
struct Slots {
    inputs: Vec<ValueId>,
    first_init: usize,
}

impl Slots {
    fn of(g: &Graph, node: NodeId) -> Slots {
        let inputs: Vec<ValueId> = g.node(node).inputs().iter().flatten().copied().collect();
        let first_init = inputs
            .iter()
            .position(|&v| matches!(g.value(v).source(), ValueSource::Initializer))
            .unwrap_or(inputs.len());
        Slots { inputs, first_init }
    }

    fn leading(&self) -> &[ValueId] {
        &self.inputs[..self.first_init]
    }

    fn weight(&self) -> Option<ValueId> {
        self.inputs.get(self.first_init).copied()
    }

    fn bias(&self) -> Option<ValueId> {
        self.inputs.get(self.first_init + 1).copied()
    }
}

/// What the global config gives the tensor in a node's weight slot on reading.
#[derive(Clone, Copy, PartialEq)]
enum WeightSlot {
    /// A weight: the global weight type.
    Weight,
    /// A constant or an activation: the global activation type.
    Activation,
    /// Another parameter (a bias): nothing, it keeps its own precision.
    Other,
}

/// The layer fields of one node: input_tensors, weight, bias, output_tensors.
type LayerFields = [Option<TensorSpec>; 4];

/// The simulation's plan as a Quark `QConfig` dictionary (see the module doc).
pub fn quark_config(sim: &QuantSim) -> Result<Value> {
    let g = &sim.model().graph;
    let placement = sim.placement();
    let mut layers: Vec<(NodeId, LayerFields, WeightSlot)> = Vec::new();
    let mut exclude: Vec<&str> = Vec::new();
    let mut act_count: HashMap<TensorSpec, usize> = HashMap::new();
    let mut weight_count: HashMap<TensorSpec, usize> = HashMap::new();
    for (id, node) in g.nodes() {
        let slots = Slots::of(g, id);
        let role = |v: ValueId| placement.tensor(v).map(|t| t.role);
        let weight_slot = match slots.weight().and_then(role) {
            Some(TensorRole::Param { role: ParamRole::Weight, .. }) => WeightSlot::Weight,
            Some(TensorRole::Param { .. }) => WeightSlot::Other,
            _ => WeightSlot::Activation,
        };
        let weight = match slots.weight() {
            Some(v) => spec_on(sim, v)?,
            None => None,
        };
        // A parameter bias keeps its own precision (AIMET leaves it in float or int32).
        let bias = match slots.bias() {
            Some(v) if matches!(role(v), Some(TensorRole::Constant)) => spec_on(sim, v)?,
            _ => None,
        };
        let mut output = None;
        for &v in node.outputs().iter().flatten() {
            if matches!(role(v), Some(TensorRole::Output { .. } | TensorRole::Constant))
                && let Some(s) = spec_on(sim, v)?
            {
                output = Some(s);
                break;
            }
        }
        let leading = slots.leading();
        let mut input = None;
        if leading.iter().any(|&v| matches!(g.value(v).source(), ValueSource::Input)) {
            let specs = leading.iter().map(|&v| spec_on(sim, v)).collect::<Result<Vec<_>>>()?;
            if let Some(&first) = specs.first()
                && specs.iter().all(|s| *s == first)
            {
                input = first;
            }
        }
        for s in [input, output].into_iter().flatten() {
            *act_count.entry(s).or_default() += 1;
        }
        if let (Some(w), WeightSlot::Weight) = (weight, weight_slot) {
            *weight_count.entry(w).or_default() += 1;
        }
        let quantizers = placement.op_quantizers(g, id);
        if weight_slot == WeightSlot::Weight
            && !quantizers.is_empty()
            && quantizers.iter().all(|&q| !placement.quantizer(q).enabled)
        {
            exclude.push(&node.name);
            continue;
        }
        layers.push((id, [input, weight, bias, output], weight_slot));
    }
    let most_common = |counts: &HashMap<TensorSpec, usize>, fallback: TensorSpec| {
        counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.data_type.cmp(a.0.data_type)))
            .map_or(fallback, |(s, _)| *s)
    };
    let global_act = most_common(
        &act_count,
        TensorSpec { data_type: "UInt8", symmetric: false, granularity: "QuantGranularity.Tensor" },
    );
    let global_weight = most_common(
        &weight_count,
        TensorSpec { data_type: "Int8", symmetric: true, granularity: "QuantGranularity.Tensor" },
    );
    let calibration = calibration_method(sim.options().scheme);
    // Group nodes by the fields that differ from the global config, in graph order.
    let mut groups: Vec<(LayerFields, Vec<&str>)> = Vec::new();
    for (id, [input, weight, bias, output], weight_slot) in layers {
        // Each field against what the global config gives its tensor on reading.
        let fields = [
            input.filter(|s| *s != global_act),
            weight.filter(|s| match weight_slot {
                WeightSlot::Weight => *s != global_weight,
                WeightSlot::Activation => *s != global_act,
                WeightSlot::Other => true,
            }),
            bias.filter(|s| *s != global_act),
            output.filter(|s| *s != global_act),
        ];
        if fields.iter().all(Option::is_none) {
            continue;
        }
        let name = g.node(id).name.as_str();
        match groups.iter_mut().find(|(f, _)| *f == fields) {
            Some((_, names)) => names.push(name),
            None => groups.push((fields, vec![name])),
        }
    }
    let specific: Vec<Value> = groups
        .into_iter()
        .map(|(fields, names)| {
            let mut layer = Map::new();
            for (key, spec) in ["input_tensors", "weight", "bias", "output_tensors"].into_iter().zip(fields) {
                if let Some(s) = spec {
                    layer.insert(key.into(), s.to_json(calibration));
                }
            }
            json!([Value::Object(layer), names])
        })
        .collect();
    Ok(json!({
        "global_config": {
            "input_tensors": global_act.to_json(calibration),
            "weight": global_weight.to_json(calibration),
        },
        "specific_layer_config": specific,
        "layer_type_config": [],
        "exclude": exclude,
    }))
}

/// One layer config read from the file: precisions of its four fields.
#[derive(Debug, Clone, Copy, Default)]
struct LayerPlan {
    input: Option<Precision>,
    weight: Option<Precision>,
    bias: Option<Precision>,
    output: Option<Precision>,
}

fn read_tensor_config(v: &Value, at: &str) -> Result<Option<Precision>> {
    if v.is_null() {
        return Ok(None);
    }
    let obj = v.as_object().ok_or_else(|| plan_error(at, "expected a tensor config object"))?;
    let name = obj
        .get("data_type")
        .and_then(Value::as_str)
        .ok_or_else(|| plan_error(at, "expected a data_type name"))?;
    let p = parse_data_type(name).ok_or_else(|| {
        plan_error(at, format!("data_type {name}: expected Int4..UInt16, Float16 or BFloat16"))
    })?;
    Ok(Some(p))
}

fn read_layer(v: &Value, at: &str) -> Result<LayerPlan> {
    let obj = v.as_object().ok_or_else(|| plan_error(at, "expected a layer config object"))?;
    let field = |key: &str| match obj.get(key) {
        Some(t) => read_tensor_config(t, &format!("{at}.{key}")),
        None => Ok(None),
    };
    let input = match field("input_tensors")? {
        Some(p) => Some(p),
        None => field("activation")?,
    };
    Ok(LayerPlan { input, weight: field("weight")?, bias: field("bias")?, output: field("output_tensors")? })
}

/// The nodes a `specific_layer_config` / `exclude` entry names: an exact node name, or (as
/// Quark) a pattern starting with `^` searched in every node name.
fn target_nodes(g: &Graph, entry: &Value, at: &str) -> Result<Vec<NodeId>> {
    let name = entry
        .as_str()
        .ok_or_else(|| plan_error(at, "expected node names (subgraph entries are not read)"))?;
    if let Some(stripped) = name.strip_prefix('^') {
        if name.len() > MAX_PATTERN_BYTES {
            return Err(plan_error(at, format!("pattern longer than {MAX_PATTERN_BYTES} bytes")));
        }
        let re = regex::RegexBuilder::new(name)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| plan_error(at, format!("pattern {name}: {e}")))?;
        let nodes: Vec<NodeId> = g.nodes().filter(|(_, n)| re.is_match(&n.name)).map(|(id, _)| id).collect();
        if nodes.is_empty() {
            return Err(plan_error(at, format!("pattern ^{stripped} matches no node")));
        }
        return Ok(nodes);
    }
    g.node_id(name).map(|id| vec![id]).ok_or_else(|| plan_error(at, format!("no node named {name}")))
}

/// Settings gathered from the file, applied in Quark's order of precedence.
#[derive(Default)]
struct TensorPlan {
    precision: HashMap<ValueId, Precision>,
    excluded: Vec<NodeId>,
}

impl TensorPlan {
    /// Quark's mapping of a layer config onto `node`'s tensors.
    fn set_layer(&mut self, g: &Graph, node: NodeId, layer: &LayerPlan) {
        let slots = Slots::of(g, node);
        let mut set = |v: ValueId, p: Option<Precision>| {
            if let Some(p) = p {
                self.precision.insert(v, p);
            }
        };
        for &v in slots.leading() {
            set(v, layer.input);
        }
        if let Some(w) = slots.weight() {
            set(w, layer.weight);
        }
        if let Some(b) = slots.bias() {
            set(b, layer.bias);
        }
        for &v in g.node(node).outputs().iter().flatten() {
            set(v, layer.output);
        }
    }
}

fn entries<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a [Value]> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(plan_error(key, "expected a list")),
    }
}

/// Sets the precisions of a Quark `QConfig` dictionary on the simulation's quantizers (see the
/// module doc); precisions take effect at the next calibration.
pub fn apply_quark_config(sim: &mut QuantSim, config: &Value) -> Result<AppliedPlan> {
    let obj = config.as_object().ok_or_else(|| plan_error("(plan)", "expected a QConfig object"))?;
    let global = read_layer(
        obj.get("global_config").ok_or_else(|| plan_error("global_config", "missing"))?,
        "global_config",
    )?;
    let g = &sim.model().graph;
    let mut plan = TensorPlan::default();
    // Global: every enabled activation and weight quantizer.
    let placement = sim.placement();
    for t in placement.tensors() {
        if !placement.quantizer(t.quantizer).enabled {
            continue;
        }
        let p = match t.role {
            TensorRole::Param { role: ParamRole::Weight, .. } => global.weight,
            TensorRole::Param { .. } => None,
            _ => global.input,
        };
        if let Some(p) = p {
            plan.precision.insert(t.value, p);
        }
    }
    for (i, entry) in entries(obj, "layer_type_config")?.iter().enumerate() {
        let at = format!("layer_type_config[{i}]");
        let (layer, op_types) = pair(entry, &at)?;
        let types: Vec<&str> = op_types
            .iter()
            .map(|t| t.as_str().ok_or_else(|| plan_error(&at, "expected op type names")))
            .collect::<Result<_>>()?;
        let nodes: Vec<NodeId> =
            g.nodes().filter(|(_, n)| types.contains(&n.op_type.as_str())).map(|(id, _)| id).collect();
        match layer {
            None => plan.excluded.extend(nodes),
            Some(l) => {
                let l = read_layer(l, &at)?;
                for n in nodes {
                    plan.set_layer(g, n, &l);
                }
            }
        }
    }
    for (i, entry) in entries(obj, "specific_layer_config")?.iter().enumerate() {
        let at = format!("specific_layer_config[{i}]");
        let (layer, names) = pair(entry, &at)?;
        let layer = layer.map(|l| read_layer(l, &at)).transpose()?;
        for name in names {
            for n in target_nodes(g, name, &at)? {
                match &layer {
                    None => plan.excluded.push(n),
                    Some(l) => plan.set_layer(g, n, l),
                }
            }
        }
    }
    for (i, name) in entries(obj, "exclude")?.iter().enumerate() {
        plan.excluded.extend(target_nodes(g, name, &format!("exclude[{i}]"))?);
    }
    let mut applied = AppliedPlan::default();
    let mut activation_bits: Vec<u32> = Vec::new();
    let mut changes = Vec::with_capacity(plan.precision.len());
    for (&v, &p) in &plan.precision {
        let name = &g.value(v).name;
        Placement::check_precision(name, p)?;
        let root = g.static_root(v).map_or(v, |(r, _)| r);
        match placement.quantizer_of(root) {
            Some(q) => {
                if let (Precision::Int(bits), false) = (p, placement.quantizer(q).is_param)
                    && !activation_bits.contains(&bits)
                {
                    activation_bits.push(bits);
                }
                changes.push((q, p));
            }
            None => applied.ignored += 1,
        }
    }
    let mut off = Vec::new();
    for &n in &plan.excluded {
        off.extend(placement.param_quantizers(g, n).into_iter().map(|(_, q)| q));
        off.extend(placement.output_quantizers(g, n));
    }
    for (q, p) in changes {
        let quantizer = sim.placement_mut().quantizer_mut(q);
        quantizer.enabled = true;
        quantizer.set_precision(p);
        applied.tensors += 1;
    }
    for q in off {
        sim.placement_mut().quantizer_mut(q).enabled = false;
    }
    sim.apply_exception_rules()?;
    applied.converts = activation_bits.len() > 1;
    if let Some(overrides) = obj.get("extra_options").and_then(|e| e.get("TensorQuantOverrides")) {
        let more = apply_tensor_quant_overrides(sim, overrides)?;
        applied.tensors += more.tensors;
        applied.converts |= more.converts;
    }
    Ok(applied)
}

/// A `[layer config or null, [names]]` entry.
fn pair<'a>(entry: &'a Value, at: &str) -> Result<(Option<&'a Value>, &'a [Value])> {
    match entry.as_array().map(Vec::as_slice) {
        Some([layer, Value::Array(names)]) => Ok(((!layer.is_null()).then_some(layer), names)),
        _ => Err(plan_error(at, "expected [layer config or null, [names]]")),
    }
}

/// Sets a plan file's precisions on the simulation: a Quark `QConfig` dictionary (it has
/// `global_config`) or onnxruntime's `TensorQuantOverrides`.
pub fn apply_plan(sim: &mut QuantSim, plan: &Value) -> Result<AppliedPlan> {
    if plan.get("global_config").is_some() {
        apply_quark_config(sim, plan)
    } else {
        apply_tensor_quant_overrides(sim, plan)
    }
}

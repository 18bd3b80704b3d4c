//! Target legality: the (weight, activation) precision pairs a runtime executes, and the repair of
//! a mixed-precision plan that uses others.
//!
//! A [`Target`] holds `supported_kernels` lists in AIMET's config format — one for every op type,
//! optionally one per op type — loaded from a preset (`default`: AIMET's default config lists
//! none, so every pair is legal; `htp_v73`: the pairs of Qualcomm's HTP op definitions) or a JSON
//! file. [`Target::apply_to`] writes them into a quantsim config, where AMP's candidate filter
//! reads them (spec §7.3). [`legalize`] checks a finished plan op by op: each quantized op's
//! weight precision and the activation precision it computes at (its output quantizer, or for an
//! op fused with the next one, that one's) must match a kernel of its op type. An illegal op is
//! raised to the cheapest legal pair that is at least as precise on both sides (W16A8 → W16A16),
//! or, when none is, set to the most precise legal pair; every change is returned. An op type
//! with no legal pair at all is refused, naming the op and its pair.

use std::collections::{BTreeMap, VecDeque};

use qcalib::{Kernel, KernelPrecision, Precision, QuantSim, QuantizerId, QuantsimConfig, TensorRole};
use qgraph::ops::ParamRole;
use qgraph::{Graph, NodeId};
use serde_json::Value;

use crate::AmpError;
use crate::candidate::{effective_bits, matches};

/// Built-in targets: (name, JSON).
const PRESETS: [(&str, &str); 2] = [
    ("default", include_str!("../targets/default.json")),
    ("htp_v73", include_str!("../targets/htp_v73.json")),
];

/// Largest target file read (a target is a few kernels per op type).
const MAX_TARGET_BYTES: u64 = 1 << 20;

/// How many passes [`legalize`] makes; raising one op can change the pair of an op sharing its
/// quantizer, and each pass only raises, so a few suffice.
const MAX_PASSES: usize = 8;

/// The precision pairs a runtime executes.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Preset name or file path.
    pub name: String,
    /// Where the rules come from.
    pub source: String,
    /// Kernels of every op type without its own list (empty: every pair is legal).
    pub kernels: Vec<Kernel>,
    /// Kernels per op type.
    pub op_kernels: BTreeMap<String, Vec<Kernel>>,
}

/// One op whose pair [`legalize`] changed.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanChange {
    /// The node's name.
    pub op: String,
    /// Its op type.
    pub op_type: String,
    /// Weight precision before (`None`: the op has no quantized weight).
    pub param_before: Option<Precision>,
    /// Activation precision before.
    pub activation_before: Precision,
    /// Weight precision after.
    pub param_after: Option<Precision>,
    /// Activation precision after.
    pub activation_after: Precision,
    /// Whether the change raised precision (`false`: no legal pair was at least as precise).
    pub raised: bool,
}

fn pair(param: Option<Precision>, activation: Precision) -> String {
    match param {
        Some(w) => format!("W{}A{}", short(w), short(activation)),
        None => format!("A{}", short(activation)),
    }
}

fn short(p: Precision) -> String {
    match p {
        Precision::Int(b) => b.to_string(),
        Precision::Float16 => "fp16".into(),
        Precision::BFloat16 => "bf16".into(),
    }
}

impl std::fmt::Display for PlanChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {} → {}{}",
            self.op,
            self.op_type,
            pair(self.param_before, self.activation_before),
            pair(self.param_after, self.activation_after),
            if self.raised { "" } else { " (lowered: no legal pair is as precise)" }
        )
    }
}

impl PlanChange {
    /// The change as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "op": self.op,
            "op_type": self.op_type,
            "before": pair(self.param_before, self.activation_before),
            "after": pair(self.param_after, self.activation_after),
            "raised": self.raised,
        })
    }
}

fn target_error(name: &str, detail: impl Into<String>) -> AmpError {
    AmpError::Target { target: name.to_string(), detail: detail.into() }
}

impl Target {
    /// The preset `name` (`default`, `htp_v73`) or the JSON file at that path.
    pub fn load(name_or_path: &str) -> Result<Target, AmpError> {
        if let Some((_, json)) = PRESETS.iter().find(|(n, _)| *n == name_or_path) {
            return Target::parse(json, name_or_path);
        }
        let path = std::path::Path::new(name_or_path);
        let text = qgraph::read_text_at_most(path, MAX_TARGET_BYTES).map_err(|e| {
            let presets: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            target_error(
                name_or_path,
                format!("not a preset ({}) and not a readable file: {e}", presets.join(", ")),
            )
        })?;
        Target::parse(&text, name_or_path)
    }

    /// Parses a target: `{"name", "source", "supported_kernels": [...], "op_type": {OP: [...]}}`
    /// (every key optional, kernels in AIMET's `supported_kernels` format).
    pub fn parse(text: &str, name: &str) -> Result<Target, AmpError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| target_error(name, format!("not JSON: {e}")))?;
        let map = v.as_object().ok_or_else(|| target_error(name, "expected a JSON object"))?;
        for key in map.keys() {
            if !["name", "source", "supported_kernels", "op_type"].contains(&key.as_str()) {
                return Err(target_error(
                    name,
                    format!("unknown key '{key}' (expected name, source, supported_kernels, op_type)"),
                ));
            }
        }
        let text_of = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
        let kernels_of = |v: &Value, path: &str| {
            qcalib::parse_supported_kernels(v, path).map_err(|e| target_error(name, e.to_string()))
        };
        let kernels = match map.get("supported_kernels") {
            Some(v) => kernels_of(v, "supported_kernels")?,
            None => Vec::new(),
        };
        let mut op_kernels = BTreeMap::new();
        if let Some(ops) = map.get("op_type") {
            let ops = ops.as_object().ok_or_else(|| target_error(name, "op_type: expected an object"))?;
            for (op, list) in ops {
                op_kernels.insert(op.clone(), kernels_of(list, &format!("op_type.{op}"))?);
            }
        }
        Ok(Target {
            name: text_of("name").unwrap_or_else(|| name.to_string()),
            source: text_of("source").unwrap_or_default(),
            kernels,
            op_kernels,
        })
    }

    /// The kernels of `op_type` (empty: every pair is legal).
    pub fn kernels_for(&self, op_type: &str) -> &[Kernel] {
        self.op_kernels.get(op_type).map_or(&self.kernels, Vec::as_slice)
    }

    /// Whether `op_type` may run with weights at `param` (`None`: no quantized weight) and
    /// activations at `activation`.
    pub fn allows(&self, op_type: &str, param: Option<Precision>, activation: Precision) -> bool {
        let kernels = self.kernels_for(op_type);
        kernels.is_empty() || kernels.iter().any(|k| kernel_matches(k, param, activation))
    }

    /// Makes the target the config's `supported_kernels` (what AMP's candidate filter reads).
    pub fn apply_to(&self, config: &mut QuantsimConfig) {
        config.defaults.supported_kernels = self.kernels.clone();
        for (op, kernels) in &self.op_kernels {
            config.op_types.entry(op.clone()).or_default().supported_kernels = kernels.clone();
        }
    }
}

fn precision_of(k: KernelPrecision) -> Option<Precision> {
    match (k.float, k.bitwidth) {
        (false, b) => Some(Precision::Int(b)),
        (true, 16) => Some(Precision::Float16),
        (true, _) => None,
    }
}

fn kernel_matches(k: &Kernel, param: Option<Precision>, activation: Precision) -> bool {
    matches(k.activation, activation)
        && match (k.param, param) {
            (Some(kp), Some(p)) => matches(kp, p),
            _ => true,
        }
}

/// Order of precision: more bits first, float above integer of the same width.
fn rank(p: Precision) -> (u32, bool) {
    (p.bits(), !p.is_int())
}

/// The legal pair an illegal `(param, activation)` moves to, and whether that raises it.
fn repair(
    kernels: &[Kernel],
    param: Option<Precision>,
    activation: Precision,
) -> Option<(Option<Precision>, Precision, bool)> {
    let pairs: Vec<(Option<Precision>, Precision)> = kernels
        .iter()
        .filter_map(|k| {
            let a = precision_of(k.activation)?;
            let w = match (k.param, param) {
                (Some(kp), Some(_)) => Some(precision_of(kp)?),
                (_, p) => p,
            };
            Some((w, a))
        })
        .collect();
    let cost = |(w, a): (Option<Precision>, Precision)| effective_bits(a) * w.map_or(1.0, effective_bits);
    let dominates = |(w, a): (Option<Precision>, Precision)| {
        rank(a) >= rank(activation)
            && match (w, param) {
                (Some(w), Some(p)) => rank(w) >= rank(p),
                _ => true,
            }
    };
    if let Some(&best) =
        pairs.iter().filter(|&&p| dominates(p)).min_by(|&&x, &&y| cost(x).total_cmp(&cost(y)))
    {
        return Some((best.0, best.1, true));
    }
    pairs.iter().max_by(|&&x, &&y| cost(x).total_cmp(&cost(y))).map(|&(w, a)| (w, a, false))
}

/// The activation quantizer `node` computes at: its own enabled output quantizer, else (a node
/// fused with the one after it) the first enabled one along single readers, up to a few nodes.
fn activation_quantizer(sim: &QuantSim, g: &Graph, node: NodeId) -> Option<QuantizerId> {
    let placement = sim.placement();
    let mut queue = VecDeque::from([(node, 0usize)]);
    while let Some((n, depth)) = queue.pop_front() {
        for &o in g.node(n).outputs().iter().flatten() {
            if let Some(t) = placement.tensor(o)
                && matches!(t.role, TensorRole::Output { .. })
                && placement.quantizer(t.quantizer).enabled
            {
                return Some(t.quantizer);
            }
            if let [reader] = g.consumer_nodes(o).as_slice()
                && depth < 3
            {
                queue.push_back((*reader, depth + 1));
            }
        }
    }
    None
}

/// An op at an unsupported pair: its activation quantizer, its weight quantizer and the change
/// that makes it legal.
type Repair = (QuantizerId, Option<QuantizerId>, PlanChange);

/// The ops of `sim` at a pair `target` does not support, each with its repair.
fn illegal_ops(sim: &QuantSim, target: &Target) -> Result<Vec<Repair>, AmpError> {
    let g = &sim.model().graph;
    let placement = sim.placement();
    let mut found = Vec::new();
    for (id, node) in g.nodes() {
        let kernels = target.kernels_for(&node.op_type);
        if kernels.is_empty()
            || !placement.op_quantizers(g, id).iter().any(|&q| placement.quantizer(q).enabled)
        {
            continue;
        }
        let Some(aq) = activation_quantizer(sim, g, id) else { continue };
        let activation = placement.quantizer(aq).precision;
        let weight = placement
            .param_quantizers(g, id)
            .into_iter()
            .find(|(role, q)| *role == ParamRole::Weight && placement.quantizer(*q).enabled)
            .map(|(_, q)| q);
        let param = weight.map(|q| placement.quantizer(q).precision);
        if target.allows(&node.op_type, param, activation) {
            continue;
        }
        let Some((param_after, activation_after, raised)) = repair(kernels, param, activation) else {
            return Err(AmpError::Illegal {
                op: node.name.clone(),
                op_type: node.op_type.clone(),
                pair: pair(param, activation),
                target: target.name.clone(),
            });
        };
        let change = PlanChange {
            op: node.name.clone(),
            op_type: node.op_type.clone(),
            param_before: param,
            activation_before: activation,
            param_after,
            activation_after,
            raised,
        };
        found.push((aq, weight, change));
    }
    Ok(found)
}

/// Makes the plan in `sim` legal for `target` (see the module doc) and re-derives the encodings
/// of a calibrated simulation; returns every change, in graph order within each pass.
pub fn legalize(sim: &mut QuantSim, target: &Target) -> Result<Vec<PlanChange>, AmpError> {
    let mut changes: Vec<PlanChange> = Vec::new();
    for pass in 0..=MAX_PASSES {
        let found = illegal_ops(sim, target)?;
        let Some((_, _, first)) = found.first() else { break };
        if pass == MAX_PASSES {
            // Repairs that keep undoing each other (quantizers shared across ops, frozen ones).
            return Err(AmpError::Illegal {
                op: first.op.clone(),
                op_type: first.op_type.clone(),
                pair: pair(first.param_before, first.activation_before),
                target: target.name.clone(),
            });
        }
        let placement = sim.placement_mut();
        for (aq, wq, c) in &found {
            placement.quantizer_mut(*aq).set_precision(c.activation_after);
            if let (Some(wq), Some(w)) = (wq, c.param_after) {
                placement.quantizer_mut(*wq).set_precision(w);
            }
        }
        changes.extend(found.into_iter().map(|(_, _, c)| c));
    }
    if !changes.is_empty() {
        sim.apply_exception_rules()?;
        if !sim.all_stats().is_empty() {
            sim.compute_encodings()?;
        }
    }
    Ok(changes)
}

//! Cross-layer equalization (Nagel et al. 2019; AIMET's `equalize_model`): batch norms folded,
//! chains of layers found through the activations that commute with a positive per-channel
//! scale, each set of two or three layers scaled so that the weight ranges of the channels they
//! share are equal, then high biases absorbed where batch-norm statistics say how large they are.
//!
//! Unlike AIMET, a `Clip` between two scaled layers is kept exact: its bounds become per-channel
//! bounds (`Relu`/`Max` then `Min` with a per-channel constant, marked for the placement, which
//! quantizes them as the `Clip` they replace), so the equalized float model computes what the
//! original computed.

use std::collections::{HashMap, HashSet};

use ndarray::{ArrayD, Axis, IxDyn};
use qgraph::passes::{BnFoldDirection, eliminate_dead_nodes, fold_batch_norms};
use qgraph::{DimBindings, Graph, Model, NodeId, NodeSpec, Tensor, ValueId};
use serde_json::{Value, json};

use crate::error::Result;
use crate::layers::{Layer, abs_max_along, bias_of, f32_data, layer, on_8bit_grid, scale_along, vector};

/// Ops that commute with a positive per-channel scale and may sit between two scaled layers.
const SCALE_COMMUTING_OPS: [&str; 10] = [
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Identity",
    "Dropout",
];

/// Options of [`equalize`].
#[derive(Debug, Clone, Copy)]
pub struct EqualizeOptions {
    /// Absorb high biases into the next layer where batch-norm statistics are known.
    pub high_bias_fold: bool,
    /// Also scale sets with a layer whose weights already lie on an 8-bit grid (a model
    /// converted from an integer one, or trained with quantization): scaling moves them off it,
    /// so such sets are left alone by default.
    pub rescale_quantized: bool,
}

impl Default for EqualizeOptions {
    fn default() -> Self {
        EqualizeOptions { high_bias_fold: true, rescale_quantized: false }
    }
}

/// One set of layers scaled together.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledSet {
    /// The layers' node names, in order (two, or three with a depthwise Conv in the middle).
    pub layers: Vec<String>,
    /// Per pair of consecutive layers, the ops passed through between them.
    pub through: Vec<Vec<String>>,
    /// Per pair, the scale of each shared channel: the first layer's output channel is divided
    /// by it, the second layer's input channel multiplied.
    pub scales: Vec<Vec<f32>>,
}

/// A high bias moved from one layer into the next.
#[derive(Debug, Clone, PartialEq)]
pub struct AbsorbedBias {
    /// The layer whose bias was lowered.
    pub from: String,
    /// The layer whose bias took it.
    pub into: String,
    /// Channels with a non-zero shift.
    pub channels: usize,
    /// Largest shift.
    pub max_shift: f32,
}

/// What [`equalize`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EqualizeReport {
    /// Batch norms folded, `(bn, layer)`.
    pub bn_folded: Vec<(String, String)>,
    /// The scaled sets, in the order scaled.
    pub sets: Vec<ScaledSet>,
    /// `Clip` nodes rewritten with per-channel bounds.
    pub clips_rewritten: Vec<String>,
    /// High biases absorbed.
    pub high_bias: Vec<AbsorbedBias>,
    /// Pairs where high-bias absorption was possible in principle but not done, with the reason.
    pub high_bias_skipped: Vec<String>,
    /// Sets found but left alone, with the reason.
    pub sets_skipped: Vec<String>,
}

impl EqualizeReport {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "bn_folded": self.bn_folded.iter().map(|(b, l)| json!({"bn": b, "layer": l})).collect::<Vec<_>>(),
            "sets": self.sets.iter().map(|s| json!({
                "layers": s.layers,
                "through": s.through,
                "scales": s.scales,
            })).collect::<Vec<_>>(),
            "clips_rewritten": self.clips_rewritten,
            "high_bias_absorbed": self.high_bias.iter().map(|h| json!({
                "from": h.from, "into": h.into, "channels": h.channels, "max_shift": h.max_shift,
            })).collect::<Vec<_>>(),
            "high_bias_skipped": self.high_bias_skipped,
            "sets_skipped": self.sets_skipped,
        })
    }
}

/// How a `Clip` between two layers changes: its bounds per channel become `bound·factor`, and
/// the upper one also drops by `shift` (high-bias absorption).
struct ClipChange {
    factor: Vec<f32>,
    shift: Vec<f32>,
    channel_axis: usize,
}

impl ClipChange {
    /// The change recorded for `clip` so far, created as no change over `channels` channels on
    /// `channel_axis`.
    fn of(
        clips: &mut HashMap<NodeId, ClipChange>,
        clip: NodeId,
        channels: usize,
        channel_axis: usize,
    ) -> &mut ClipChange {
        clips.entry(clip).or_insert_with(|| ClipChange {
            factor: vec![1.0; channels],
            shift: vec![0.0; channels],
            channel_axis,
        })
    }
}

/// Scalar bounds of a `Clip` (`None` when absent or dynamic-free infinite).
fn clip_bounds(g: &Graph, node: NodeId) -> Option<(Option<f32>, Option<f32>)> {
    let n = g.node(node);
    let finite = |x: f32| (x.is_finite() && x.abs() < f32::MAX).then_some(x);
    let scalar = |slot: usize| -> Option<Option<f32>> {
        match n.input(slot) {
            None => Some(None),
            Some(v) => {
                let t = g.static_value(v)?.as_f32()?;
                if t.len() != 1 {
                    return None;
                }
                Some(finite(*t.iter().next()?))
            }
        }
    };
    if n.inputs().len() > 1 || n.attr("min").is_none() && n.attr("max").is_none() {
        Some((scalar(1)?, scalar(2)?))
    } else {
        let lo = n.float_attr("min", f32::MIN).ok()?;
        let hi = n.float_attr("max", f32::MAX).ok()?;
        Some((finite(lo), finite(hi)))
    }
}

/// Whether a `Clip` needs per-channel bounds once its input is scaled per channel.
fn clip_needs_rewrite(bounds: (Option<f32>, Option<f32>)) -> bool {
    !matches!(bounds, (None | Some(0.0), None))
}

/// Whether `node` passes a per-channel scale of its data input through to its output; `axis`
/// is the channel axis of that input.
fn commutes(g: &Graph, opset: i64, node: NodeId) -> bool {
    let n = g.node(node);
    let op = n.op_type.as_str();
    if !n.is_onnx_domain() || n.outputs().iter().skip(1).flatten().any(|&v| g.use_count(v) > 0) {
        return false;
    }
    match op {
        "Clip" => clip_bounds(g, node).is_some_and(|b| !clip_needs_rewrite(b) || opset >= 8),
        "Dropout" => n.input(1).is_none() && n.input(2).is_none(),
        "PRelu" => n.input(1).is_some_and(|s| g.is_static(s)),
        "Flatten" | "Reshape" => {
            // Only [N, C, 1, …, 1] → [N, C]: the channel stays where it was.
            let shape = |v: Option<ValueId>| v.and_then(|v| g.value(v).shape.clone());
            match (shape(n.input(0)), shape(n.output(0))) {
                (Some(i), Some(o)) => {
                    let (i, o) = (&i.0, &o.0);
                    i.len() >= 2
                        && i[2..].iter().all(|d| d.known() == Some(1))
                        && o.len() == 2
                        && o[1].known().is_some()
                        && o[1].known() == i[1].known()
                }
                _ => false,
            }
        }
        _ => SCALE_COMMUTING_OPS.contains(&op),
    }
}

/// The next layer after `l1` reached through scale-commuting ops, with those ops.
fn next_layer(g: &Graph, opset: i64, l1: &Layer) -> Option<(Layer, Vec<NodeId>)> {
    let mut v = g.node(l1.node).output(0)?;
    let mut through = Vec::new();
    loop {
        let consumers = g.consumers(v);
        if g.is_output(v) || consumers.len() != 1 || consumers[0].slot != 0 {
            return None;
        }
        let next = consumers[0].node;
        if let Some(l2) = layer(g, next) {
            return (l2.in_channels == l1.out_channels).then_some((l2, through));
        }
        if !commutes(g, opset, next) {
            return None;
        }
        if g.node(next).op_type == "Clip" && clip_needs_rewrite(clip_bounds(g, next)?) {
            let rank = g.value(v).shape.as_ref()?.rank();
            let axis = l1.output_channel_axis?;
            if rank <= axis
                || through.iter().any(|&t| matches!(g.node(t).op_type.as_str(), "Flatten" | "Reshape"))
            {
                return None;
            }
        }
        through.push(next);
        v = g.node(next).output(0)?;
    }
}

/// A chain link: the next layer and the ops between.
struct Link {
    to: Layer,
    through: Vec<NodeId>,
}

/// The BN statistics of a layer's output: the output is about `N(beta, gamma²)` per channel.
struct BnStats {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// Equalizes `model` in place (see the module doc) and says what it did.
pub fn equalize(model: &mut Model, options: EqualizeOptions) -> Result<EqualizeReport> {
    let mut report = EqualizeReport::default();
    // 1. Batch norms: remember the statistics of those folded backward, then fold.
    let mut stats_before = bn_statistics(&model.graph);
    let mut bn: HashMap<String, BnStats> = HashMap::new();
    for fold in fold_batch_norms(model)? {
        if fold.direction == BnFoldDirection::Backward
            && let Some((gamma, beta)) = stats_before.remove(&fold.bn)
        {
            bn.insert(fold.layer.clone(), BnStats { gamma, beta });
        }
        report.bn_folded.push((fold.bn, fold.layer));
    }
    model.infer_shapes(&DimBindings::default())?;
    let opset = model.default_opset();
    let g = &mut model.graph;

    // 2. Chains of layers, split into sets as AIMET splits them.
    let order = g.topological_order()?;
    let mut links: HashMap<NodeId, Link> = HashMap::new();
    for &node in &order {
        if let Some(l1) = layer(g, node)
            && let Some((to, through)) = next_layer(g, opset, &l1)
        {
            links.insert(node, Link { to, through });
        }
    }
    let targets: HashSet<NodeId> = links.values().map(|l| l.to.node).collect();
    let mut found: Vec<Vec<NodeId>> = Vec::new();
    for &start in &order {
        if targets.contains(&start) || !links.contains_key(&start) {
            continue;
        }
        let mut chain = vec![start];
        while let Some(link) = links.get(chain.last().expect("a chain is never empty")) {
            chain.push(link.to.node);
        }
        let mut i = 0;
        while i + 1 < chain.len() {
            let middle_dw = links[&chain[i]].to.depthwise;
            if middle_dw && i + 2 < chain.len() {
                found.push(chain[i..i + 3].to_vec());
                i += 2;
            } else {
                found.push(chain[i..i + 2].to_vec());
                i += 1;
            }
        }
    }
    let mut sets: Vec<Vec<NodeId>> = Vec::new();
    for set in found {
        let gridded = (!options.rescale_quantized)
            .then(|| {
                set.iter().copied().find(|&n| {
                    let l = layer(g, n).expect("set members are layers");
                    f32_data(g, l.weight).is_some_and(|w| on_8bit_grid(&w, l.out_axis))
                })
            })
            .flatten();
        match gridded {
            Some(n) => {
                let names: Vec<&str> = set.iter().map(|&m| g.node(m).name.as_str()).collect();
                report.sets_skipped.push(format!(
                    "{}: the weights of '{}' already lie on an 8-bit grid",
                    names.join(" → "),
                    g.node(n).name
                ));
            }
            None => sets.push(set),
        }
    }

    // 3. Scale each set on working copies of the weights and biases.
    let mut weights: HashMap<NodeId, ArrayD<f32>> = HashMap::new();
    let mut biases: HashMap<NodeId, Vec<f32>> = HashMap::new();
    let mut layers: HashMap<NodeId, Layer> = HashMap::new();
    for set in &sets {
        for &n in set {
            if let std::collections::hash_map::Entry::Vacant(e) = layers.entry(n) {
                let l = layer(g, n).expect("set members are layers");
                weights.insert(n, f32_data(g, l.weight).expect("layer weights are static f32"));
                biases.insert(n, bias_of(g, &l));
                e.insert(l);
            }
        }
    }
    let mut bn_by_node: HashMap<NodeId, BnStats> = HashMap::new();
    for &n in layers.keys() {
        if let Some(s) = bn.remove(&g.node(n).name) {
            bn_by_node.insert(n, s);
        }
    }
    let mut clips: HashMap<NodeId, ClipChange> = HashMap::new();
    for set in &sets {
        let ls: Vec<&Layer> = set.iter().map(|n| &layers[n]).collect();
        let range_out =
            |n: NodeId, l: &Layer, w: &HashMap<NodeId, ArrayD<f32>>| abs_max_along(&w[&n], l.out_axis);
        let range_in =
            |n: NodeId, l: &Layer, w: &HashMap<NodeId, ArrayD<f32>>| abs_max_along(&w[&n], l.in_axis);
        // Per gap between consecutive layers: the factor its channels are divided by.
        let gap_scales: Vec<Vec<f32>> = if set.len() == 3 {
            let r1 = range_out(set[0], ls[0], &weights);
            let r2 = range_out(set[1], ls[1], &weights);
            let r3 = range_in(set[2], ls[2], &weights);
            let mut s12 = vec![1.0f32; r1.len()];
            let mut s23 = vec![1.0f32; r1.len()];
            for c in 0..r1.len() {
                if r1[c] != 0.0 && r2[c] != 0.0 && r3[c] != 0.0 {
                    let cube = (r1[c] * r2[c] * r3[c]).powf(1.0 / 3.0);
                    s12[c] = r1[c] * (1.0 / cube);
                    s23[c] = cube * (1.0 / r3[c]);
                }
            }
            vec![s12, s23]
        } else {
            let r1 = range_out(set[0], ls[0], &weights);
            let r2 = range_in(set[1], ls[1], &weights);
            let s = r1
                .iter()
                .zip(&r2)
                .map(|(&a, &b)| {
                    let root = (a * b).sqrt();
                    if root != 0.0 { a * (1.0 / root) } else { 1.0 }
                })
                .collect();
            vec![s]
        };
        for (gap, s) in gap_scales.iter().enumerate() {
            let (a, b) = (set[gap], set[gap + 1]);
            let inv: Vec<f32> = s.iter().map(|&x| 1.0 / x).collect();
            let (la, lb) = (layers[&a].clone(), layers[&b].clone());
            scale_along(weights.get_mut(&a).expect("working weight"), la.out_axis, &inv);
            for (x, k) in biases.get_mut(&a).expect("working bias").iter_mut().zip(&inv) {
                *x *= k;
            }
            scale_along(weights.get_mut(&b).expect("working weight"), lb.in_axis, s);
            if let Some(st) = bn_by_node.get_mut(&a) {
                for ((gm, bt), k) in st.gamma.iter_mut().zip(st.beta.iter_mut()).zip(&inv) {
                    *gm *= k;
                    *bt *= k;
                }
            }
            for &t in &links[&a].through {
                if g.node(t).op_type == "Clip" && clip_bounds(g, t).is_some_and(clip_needs_rewrite) {
                    let change =
                        ClipChange::of(&mut clips, t, inv.len(), la.output_channel_axis.unwrap_or(1));
                    for (f, k) in change.factor.iter_mut().zip(&inv) {
                        *f *= k;
                    }
                }
            }
        }
        report.sets.push(ScaledSet {
            layers: set.iter().map(|&n| g.node(n).name.clone()).collect(),
            through: set[..set.len() - 1]
                .iter()
                .map(|a| links[a].through.iter().map(|&t| g.node(t).op_type.clone()).collect())
                .collect(),
            scales: gap_scales,
        });
    }

    // 4. High-bias absorption, pair by pair, where the first layer's BN statistics are known.
    if options.high_bias_fold {
        for set in &sets {
            for pair in set.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                let Some(st) = bn_by_node.get(&a) else { continue };
                let name = |n: NodeId| g.node(n).name.clone();
                match absorb_high_bias(
                    g,
                    &layers,
                    &links[&a],
                    st,
                    a,
                    b,
                    &mut weights,
                    &mut biases,
                    &mut clips,
                ) {
                    Ok(Some(h)) => report.high_bias.push(AbsorbedBias { from: name(a), into: name(b), ..h }),
                    Ok(None) => {}
                    Err(why) => report.high_bias_skipped.push(format!("{} → {}: {why}", name(a), name(b))),
                }
            }
        }
    }

    // 5. Write the weights and biases, then the clips.
    for (&n, l) in &layers {
        let name = g.node(n).name.clone();
        let w = weights.remove(&n).expect("working weight");
        g.set_static_input(n, 1, &format!("{name}.weight"), Tensor::F32(w.into_shared()));
        if let Some(slot) = l.bias_slot {
            let b = biases.remove(&n).expect("working bias");
            if g.node(n).input(slot).is_some() || b.iter().any(|&x| x != 0.0) {
                g.set_static_input(n, slot, &format!("{name}.bias"), vector(b));
            }
        }
    }
    let mut dead = HashSet::new();
    let mut renames = Vec::new();
    let mut rewritten: Vec<(NodeId, ClipChange)> = clips.into_iter().collect();
    rewritten.sort_by_key(|(n, _)| *n);
    for (clip, change) in rewritten {
        let Some((old, new)) = rewrite_clip(g, clip, &change) else { continue };
        report.clips_rewritten.push(g.node(clip).name.clone());
        dead.insert(clip);
        renames.push((old, new));
    }
    if !dead.is_empty() {
        // The last new node takes the clip's name and its output the clip's output name, so that
        // encodings and reports name them as before.
        let names: Vec<(String, String, String)> = renames
            .iter()
            .map(|&(o, n)| {
                let clip = g.producer_node(o).map(|c| c.name.clone()).unwrap_or_default();
                (g.value(o).name.clone(), g.value(n).name.clone(), clip)
            })
            .collect();
        for &(old, new) in &renames {
            g.replace_uses(old, new);
        }
        g.remove_nodes(&dead)?;
        for (old, new, clip) in names {
            if let Some(v) = g.value_id(&new) {
                g.rename_value(v, &old)?;
                if let Some(p) = g.producer(v) {
                    g.node_mut(p.node).name = clip;
                }
            }
        }
        g.sort_topologically()?;
    }
    eliminate_dead_nodes(g)?;
    model.infer_shapes(&DimBindings::default())?;
    Ok(report)
}

/// `(gamma, beta)` of every BatchNormalization with static parameters, by node name.
fn bn_statistics(g: &Graph) -> HashMap<String, (Vec<f32>, Vec<f32>)> {
    let mut out = HashMap::new();
    for (_, n) in g.nodes() {
        if n.op_type != "BatchNormalization" {
            continue;
        }
        let read =
            |slot: usize| n.input(slot).and_then(|v| f32_data(g, v)).map(|a| a.iter().copied().collect());
        if let (Some(gamma), Some(beta)) = (read(1), read(2)) {
            out.insert(n.name.clone(), (gamma, beta));
        }
    }
    out
}

/// Moves the part of `a`'s bias that its ReLU-like activation always passes (`β − 3|γ|`, at
/// least 0) into `b`'s bias. `Ok(None)` when nothing moves; `Err` says why it cannot be done.
#[allow(clippy::too_many_arguments)]
fn absorb_high_bias(
    g: &Graph,
    layers: &HashMap<NodeId, Layer>,
    link: &Link,
    st: &BnStats,
    a: NodeId,
    b: NodeId,
    weights: &mut HashMap<NodeId, ArrayD<f32>>,
    biases: &mut HashMap<NodeId, Vec<f32>>,
    clips: &mut HashMap<NodeId, ClipChange>,
) -> std::result::Result<Option<AbsorbedBias>, &'static str> {
    let (la, lb) = (&layers[&a], &layers[&b]);
    if la.bias_slot.is_none() || lb.bias_slot.is_none() {
        return Err("a layer without a bias input");
    }
    let relu_like = match link.through.as_slice() {
        [] => false,
        [t] => match g.node(*t).op_type.as_str() {
            "Relu" => true,
            "Clip" => matches!(clip_bounds(g, *t), Some((Some(0.0), _))),
            _ => return Err("an activation other than ReLU or Clip(0, ·) between"),
        },
        _ => return Err("more than one op between"),
    };
    let nb = g.node(b);
    if nb.op_type == "ConvTranspose" {
        return Err("the next layer is a ConvTranspose");
    }
    if nb.op_type == "Conv" {
        let padded = nb.ints_attr("pads").ok().flatten().is_some_and(|p| p.iter().any(|&x| x != 0));
        let auto = nb.string_attr("auto_pad").ok().flatten().is_some_and(|s| s != "NOTSET" && s != "VALID");
        if padded || auto {
            return Err("the next layer pads its input (the shift would not be constant at the borders)");
        }
    }
    let clip = link.through.first().copied().filter(|&t| g.node(t).op_type == "Clip");
    let upper = clip.and_then(|t| clip_bounds(g, t)).and_then(|(_, hi)| hi);
    let channels = la.out_channels;
    let mut c: Vec<f32> = (0..channels)
        .map(|k| if relu_like { (st.beta[k] - 3.0 * st.gamma[k].abs()).max(0.0) } else { st.beta[k] })
        .collect();
    if let Some(hi) = upper {
        let change = clip.and_then(|t| clips.get(&t));
        for (k, x) in c.iter_mut().enumerate() {
            let bound = change.map_or(hi, |ch| hi * ch.factor[k] - ch.shift[k]);
            *x = x.min(bound);
        }
    }
    if c.iter().all(|&x| x == 0.0) {
        return Ok(None);
    }
    for (x, k) in biases.get_mut(&a).expect("working bias").iter_mut().zip(&c) {
        *x -= k;
    }
    // b's bias gains Σ over its kernel of W[o, k, …]·c[k].
    let w = &weights[&b];
    let mut add = vec![0.0f32; lb.out_channels];
    if lb.depthwise {
        for (k, lane) in w.axis_iter(Axis(0)).enumerate() {
            add[k] = lane.sum() * c[k];
        }
    } else {
        for (o, lane) in w.axis_iter(Axis(lb.out_axis)).enumerate() {
            let in_axis = if lb.in_axis > lb.out_axis { lb.in_axis - 1 } else { lb.in_axis };
            for (k, sub) in lane.axis_iter(Axis(in_axis)).enumerate() {
                add[o] += sub.sum() * c[k];
            }
        }
    }
    for (x, k) in biases.get_mut(&b).expect("working bias").iter_mut().zip(&add) {
        *x += k;
    }
    // Only a Clip with an upper bound changes: ReLU(x − c) + c is the clip's lower part already.
    if let Some(t) = clip.filter(|_| upper.is_some()) {
        let change = ClipChange::of(clips, t, channels, la.output_channel_axis.unwrap_or(1));
        for (s, k) in change.shift.iter_mut().zip(&c) {
            *s += k;
        }
    }
    let nonzero = c.iter().filter(|&&x| x != 0.0).count();
    let max_shift = c.iter().fold(0.0f32, |m, &x| m.max(x));
    Ok(Some(AbsorbedBias { from: String::new(), into: String::new(), channels: nonzero, max_shift }))
}

/// Replaces `clip` by marked per-channel `Relu`/`Max` and `Min` nodes appended to the graph;
/// returns the clip's output and the new output (the caller rewires and removes the clip).
fn rewrite_clip(g: &mut Graph, clip: NodeId, change: &ClipChange) -> Option<(ValueId, ValueId)> {
    let (lo, hi) = clip_bounds(g, clip)?;
    let x = g.node(clip).input(0)?;
    let y = g.node(clip).output(0)?;
    let rank = g.value(x).shape.as_ref()?.rank();
    let channels = change.factor.len();
    let mut shape = vec![channels];
    shape.extend(std::iter::repeat_n(1, rank.checked_sub(change.channel_axis + 1)?));
    let name = g.node(clip).name.clone();
    let bound = |g: &mut Graph, suffix: &str, v: Vec<f32>| -> ValueId {
        let t = ArrayD::from_shape_vec(IxDyn(&shape), v).expect("bound shape matches the channels");
        g.add_initializer(&format!("{name}.{suffix}"), Tensor::F32(t.into_shared()))
    };
    let add = |g: &mut Graph, op: &str, suffix: &str, inputs: Vec<ValueId>| -> ValueId {
        let id = g.add_node(NodeSpec {
            name: format!("{name}.{suffix}"),
            op_type: op.into(),
            domain: String::new(),
            attrs: Vec::new(),
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![format!("{name}.{suffix}")],
        });
        g.node_mut(id).doc_string = qcalib::CHANNEL_CLIP_MARK.into();
        g.node(id).output(0).expect("the node was given an output")
    };
    let mut cur = x;
    match lo {
        Some(0.0) => cur = add(g, "Relu", "lower", vec![cur]),
        Some(l) => {
            let b = bound(g, "min", change.factor.iter().map(|f| l * f).collect());
            cur = add(g, "Max", "lower", vec![cur, b]);
        }
        None => {}
    }
    if let Some(h) = hi {
        let v = change.factor.iter().zip(&change.shift).map(|(f, s)| h * f - s).collect();
        let b = bound(g, "max", v);
        cur = add(g, "Min", "upper", vec![cur, b]);
    }
    (cur != x).then_some((y, cur))
}

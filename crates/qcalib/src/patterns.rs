//! Structural recognisers the placement consumes: decomposed normalisations, MatMul + bias Add,
//! masked softmax and per-channel clips. They read the graph's structure only and hold no
//! quantization state.

use std::collections::{HashMap, HashSet};

use qgraph::{Graph, NodeId, ValueId};

/// A decomposed normalisation: `(x − mean(x)) / sqrt(mean((x − mean)²) + ε) · γ + β` (centred,
/// LayerNormalization) or `x / sqrt(mean(x²) + ε) · γ` (RMSNormalization), whatever the
/// exporter's spelling (see [`norm_matches`]).
pub(crate) struct NormMatch {
    /// Whether the mean is subtracted (LayerNormalization).
    pub(crate) centred: bool,
    /// Nodes whose outputs are internal to the normalisation.
    pub(crate) inner: Vec<NodeId>,
    /// Internal constants (the exponent, ε, the element count, the numerator 1).
    pub(crate) constants: Vec<ValueId>,
    /// The scale γ, if the pattern has one.
    pub(crate) gamma: Option<ValueId>,
    /// The shift β, if the pattern has one.
    pub(crate) beta: Option<ValueId>,
}

/// A static scalar (any shape of one element) equal to `want`.
fn is_scalar(g: &Graph, v: ValueId, want: f32) -> bool {
    g.static_shape(v).is_some_and(|s| s.iter().product::<usize>() == 1)
        && g.static_value(v)
            .and_then(|t| t.as_f32())
            .is_some_and(|a| a.len() == 1 && a.iter().all(|&x| x == want))
}

/// Finds decomposed LayerNormalization / RMSNormalization patterns by their structure, in the
/// spellings exporters use (torch, tf2onnx, jax2tf):
/// - the square: `Pow(d, 2)` or `Mul(d, d)`;
/// - the mean of it: `ReduceMean`, or `ReduceSum` then `Div`/`Mul` by a constant;
/// - or, for a centred norm, the moments' form `E[x²] − E[x]²` (`Sub` of the mean square of `x`
///   and the square of its mean);
/// - the stabiliser: up to two of `Add(·, ε)` / `Max(·, ε)`, with shape-only ops
///   (`Reshape`/`Expand`/`Unsqueeze`/`Squeeze`) allowed between them and around the statistics;
/// - the reciprocal root: `Sqrt` then `Div(d, ·)`, or `Reciprocal(Sqrt)`, `Div(1, Sqrt)` or
///   `Pow(·, −0.5)` then `Mul(d, ·)`;
/// - `d` is `x` (RMS) or `Sub(x, ReduceMean(x))` (centred);
/// - then optionally `Mul(·, γ)` and `Add(·, β)` with static γ, β (γ may instead multiply the
///   reciprocal root before it scales `d`).
pub(crate) fn norm_matches(g: &Graph, order: &[NodeId]) -> Vec<NormMatch> {
    let producer = |v: ValueId, op: &str| g.producer(v).map(|o| o.node).filter(|&n| g.node(n).op_type == op);
    let static_input = |n: NodeId, not: ValueId| {
        g.node(n).inputs().iter().flatten().copied().find(|&v| v != not && g.is_static(v))
    };
    let sole_consumer = |v: ValueId, op: &str| {
        let c = g.consumer_nodes(v);
        (c.len() == 1 && g.node(c[0]).op_type == op && !g.is_output(v)).then(|| c[0])
    };
    // The value `v` reached through shape-only ops (Reshape, Expand, Unsqueeze, Squeeze), which
    // exporters put between a statistic and its use to broadcast it, and those ops.
    let through_shape = |mut v: ValueId| -> (ValueId, Vec<NodeId>) {
        let mut nodes = Vec::new();
        while nodes.len() < 4 {
            let Some(p) = g.producer(v).map(|o| o.node).filter(|&n| {
                matches!(g.node(n).op_type.as_str(), "Reshape" | "Expand" | "Unsqueeze" | "Squeeze")
            }) else {
                break;
            };
            let Some(i) = g.node(p).input(0) else { break };
            nodes.push(p);
            v = i;
        }
        (v, nodes)
    };
    // The mean ending at `v`: `ReduceMean`, or `ReduceSum` then `Div`/`Mul` by a constant; what
    // it averages, its nodes and constants.
    let mean_of = |v: ValueId| -> Option<(ValueId, Vec<NodeId>, Vec<ValueId>)> {
        if let Some(mean) = producer(v, "ReduceMean") {
            return Some((g.node(mean).input(0)?, vec![mean], Vec::new()));
        }
        let scale = producer(v, "Div").or_else(|| producer(v, "Mul"))?;
        let n = g.node(scale);
        let (a, b) = (n.input(0)?, n.input(1)?);
        let (sum_v, count) = if g.is_static(b) { (a, b) } else { (b, a) };
        if n.op_type == "Div" && sum_v != a {
            return None;
        }
        let sum = producer(sum_v, "ReduceSum")?;
        g.is_static(count).then_some(())?;
        Some((g.node(sum).input(0)?, vec![scale, sum], vec![count]))
    };
    // The mean of the square of `d` ending at `v`: its nodes and constants.
    let mean_square = |v: ValueId, d: ValueId| -> Option<(Vec<NodeId>, Vec<ValueId>)> {
        let (sq_value, mut nodes, mut consts) = mean_of(v)?;
        let sq = g.producer(sq_value)?.node;
        let n = g.node(sq);
        match n.op_type.as_str() {
            "Pow" if n.input(0) == Some(d) && n.input(1).is_some_and(|e| is_scalar(g, e, 2.0)) => {
                consts.push(n.input(1)?);
            }
            "Mul" if n.input(0) == Some(d) && n.input(1) == Some(d) => {}
            _ => return None,
        }
        nodes.push(sq);
        Some((nodes, consts))
    };
    // The variance of `d` ending at `v`: the mean of its square, or (`d = x − E[x]`) the
    // moments' form `E[x²] − E[x]²` that jax2tf exports write.
    let variance = |v: ValueId, d: ValueId| -> Option<(Vec<NodeId>, Vec<ValueId>)> {
        if let Some(found) = mean_square(v, d) {
            return Some(found);
        }
        let sub = producer(v, "Sub")?;
        let x = g.node(producer(d, "Sub")?).input(0)?;
        let (second, first_squared) = (g.node(sub).input(0)?, g.node(sub).input(1)?);
        let (mut nodes, mut consts) = mean_square(second, x)?;
        let sq = g.producer(first_squared)?.node;
        let n = g.node(sq);
        let m = match n.op_type.as_str() {
            "Mul" if n.input(0) == n.input(1) => n.input(0)?,
            "Pow" if n.input(1).is_some_and(|e| is_scalar(g, e, 2.0)) => {
                consts.push(n.input(1)?);
                n.input(0)?
            }
            _ => return None,
        };
        let (of, mean_nodes, mean_consts) = mean_of(m)?;
        (of == x).then_some(())?;
        nodes.extend([sub, sq]);
        nodes.extend(mean_nodes);
        consts.extend(mean_consts);
        Some((nodes, consts))
    };
    // The stabilised variance below a root's input `v`: up to two Add/Max with a static operand,
    // with shape-only ops between them allowed.
    let stabilised = |mut v: ValueId, d: ValueId| -> Option<(Vec<NodeId>, Vec<ValueId>)> {
        let (mut nodes, mut consts) = (Vec::new(), Vec::new());
        let mut stabilisers = 0;
        for _ in 0..2 {
            let (base, shape_ops) = through_shape(v);
            let Some(p) = producer(base, "Add").or_else(|| producer(base, "Max")) else { break };
            let Some(eps) = g.node(p).output(0).and_then(|o| static_input(p, o)) else { break };
            let Some(other) = g.node(p).inputs().iter().flatten().copied().find(|&i| i != eps) else { break };
            nodes.extend(shape_ops);
            nodes.push(p);
            consts.push(eps);
            stabilisers += 1;
            v = other;
        }
        if stabilisers == 0 {
            return None;
        }
        let (v, shape_ops) = through_shape(v);
        nodes.extend(shape_ops);
        let (more, more_consts) = variance(v, d)?;
        nodes.extend(more);
        consts.extend(more_consts);
        Some((nodes, consts))
    };
    let mut out = Vec::new();
    for &apply in order {
        let n = g.node(apply);
        // (d, nodes from the root down, constants)
        let found = match n.op_type.as_str() {
            "Div" => (|| {
                let (d, s) = (n.input(0)?, n.input(1)?);
                let sqrt = producer(s, "Sqrt")?;
                let (nodes, consts) = stabilised(g.node(sqrt).input(0)?, d)?;
                Some((d, [vec![sqrt], nodes].concat(), consts, None))
            })(),
            "Mul" => (|| {
                for (d, inv) in [(n.input(0)?, n.input(1)?), (n.input(1)?, n.input(0)?)] {
                    // γ folded into the reciprocal root: `d · (inv · γ)`.
                    let folded =
                        producer(inv, "Mul").filter(|_| g.consumer_nodes(inv).len() == 1).and_then(|m| {
                            let gamma = static_input(m, inv)?;
                            let other = g.node(m).inputs().iter().flatten().copied().find(|&i| i != gamma)?;
                            Some((m, gamma, other))
                        });
                    let (inv, folded) = match folded {
                        Some((m, gamma, other)) => (other, Some((m, gamma))),
                        None => (inv, None),
                    };
                    let Some(inv_node) = g.producer(inv).map(|o| o.node) else { continue };
                    let inode = g.node(inv_node);
                    let found = match inode.op_type.as_str() {
                        "Pow" if inode.input(1).is_some_and(|e| is_scalar(g, e, -0.5)) => {
                            stabilised(inode.input(0)?, d).map(|(nodes, mut c)| {
                                c.push(inode.input(1).expect("checked"));
                                ([vec![inv_node], nodes].concat(), c)
                            })
                        }
                        "Reciprocal" | "Div" => {
                            let root_in = if inode.op_type == "Div" {
                                if !inode.input(0).is_some_and(|one| is_scalar(g, one, 1.0)) {
                                    continue;
                                }
                                inode.input(1)?
                            } else {
                                inode.input(0)?
                            };
                            let Some(sqrt) = producer(root_in, "Sqrt") else { continue };
                            stabilised(g.node(sqrt).input(0)?, d).map(|(nodes, mut c)| {
                                if inode.op_type == "Div" {
                                    c.push(inode.input(0).expect("checked"));
                                }
                                ([vec![inv_node, sqrt], nodes].concat(), c)
                            })
                        }
                        _ => None,
                    };
                    if let Some((nodes, consts)) = found {
                        return Some((d, nodes, consts, folded));
                    }
                }
                None
            })(),
            _ => None,
        };
        let Some((d, mut inner, mut constants, folded)) = found else { continue };
        let centred = match producer(d, "Sub") {
            Some(sub) => {
                let (Some(x), Some(m)) = (g.node(sub).input(0), g.node(sub).input(1)) else { continue };
                let (m, shape_ops) = through_shape(m);
                match mean_of(m) {
                    Some((of, mean_nodes, mean_consts)) if of == x => {
                        inner.extend(mean_nodes);
                        inner.extend(shape_ops);
                        inner.push(sub);
                        constants.extend(mean_consts);
                        true
                    }
                    _ => continue,
                }
            }
            None => false,
        };
        let Some(y) = n.output(0) else { continue };
        let (mut gamma, mut beta) = (None, None);
        if let Some((mul, gm)) = folded {
            inner.push(mul);
            gamma = Some(gm);
            if let Some(add) = sole_consumer(y, "Add")
                && let Some(b) = static_input(add, y)
            {
                inner.push(apply);
                beta = Some(b);
            }
        } else if let Some(mul) = sole_consumer(y, "Mul")
            && let Some(gm) = static_input(mul, y)
        {
            inner.push(apply);
            gamma = Some(gm);
            if let Some(z) = g.node(mul).output(0)
                && let Some(add) = sole_consumer(z, "Add")
                && let Some(b) = static_input(add, z)
            {
                inner.push(mul);
                beta = Some(b);
            }
        }
        constants.retain(|c| !inner.iter().any(|&n| g.node(n).outputs().contains(&Some(*c))));
        out.push(NormMatch { centred, inner, constants, gamma, beta });
    }
    out
}

/// MatMul(x, static 2-D W) whose only consumer is an Add with a rank-1 static operand:
/// (matmul, add, bias value).
pub(crate) fn matmul_add_matches(g: &Graph, order: &[NodeId]) -> Vec<(NodeId, NodeId, ValueId)> {
    let mut out = Vec::new();
    for &node in order {
        let n = g.node(node);
        if n.op_type != "MatMul" {
            continue;
        }
        let w_ok = n
            .input(1)
            .and_then(|w| g.static_root(w))
            .is_some_and(|(r, _)| g.value(r).shape.as_ref().is_some_and(|s| s.rank() == 2));
        let Some(y) = n.output(0) else { continue };
        let consumers = g.consumer_nodes(y);
        if !w_ok || consumers.len() != 1 || g.is_output(y) {
            continue;
        }
        let add = g.node(consumers[0]);
        if add.op_type != "Add" {
            continue;
        }
        let bias =
            add.inputs().iter().flatten().copied().find(|&v| {
                v != y && g.is_static(v) && g.value(v).shape.as_ref().is_some_and(|s| s.rank() == 1)
            });
        if let Some(b) = bias {
            out.push((node, consumers[0], b));
        }
    }
    out
}

/// Ops a mask may pass through between its producer and the masked `Add` (single data input).
const MASK_CARRIERS: [&str; 8] =
    ["Cast", "Expand", "Identity", "Reshape", "Squeeze", "Tile", "Transpose", "Unsqueeze"];

/// Magnitude from which a constant is taken for a mask fill value (`-1e4` of early BERT exports,
/// `-1e9`, `finfo.min`, `-inf`).
const MASK_FILL_MAGNITUDE: f32 = 1e4;

/// Whether `v` is a static tensor whose every element is a large negative fill value.
fn is_mask_fill(g: &Graph, v: ValueId) -> bool {
    g.static_value(v)
        .and_then(|t| t.as_f32())
        .is_some_and(|a| !a.is_empty() && a.iter().all(|&x| x <= -MASK_FILL_MAGNITUDE))
}

/// The tensors a `MaskedSoftmax` fusion leaves without a quantizer: the intermediate outputs of
/// the fused group and its mask fill values (spec §3.2 (d)). Two decomposed forms are fused:
/// * `Softmax(Where(c, scores, fill))`: the `Where` output and `fill`;
/// * `Softmax(Add(scores, mask))` where `mask` comes, through data-movement ops, from
///   `Where(c, a, b)` with static `a`, `b` (one of them a fill) or from `Mul(x, fill)`: the `Add`
///   output, the mask chain's outputs and the producer's static operands. The mask producer joins
///   the group only when every one of its uses is such a masked `Add` (a mask shared by the
///   attention layers of a transformer is), otherwise the mask keeps its quantizer.
///
/// A fill value is a static tensor of elements ≤ −10⁴. The `Add`/`Where` must be the softmax's
/// only input producer with no other consumer.
pub(crate) fn masked_softmax_fusions(g: &Graph, order: &[NodeId]) -> HashSet<ValueId> {
    let sole_use = |v: ValueId, node: NodeId| !g.is_output(v) && g.consumer_nodes(v) == [node];
    let mut internal = HashSet::new();
    // Mask producer output → what the masked `Add`s using it pass through and fill with.
    let mut masks: HashMap<ValueId, MaskUses> = HashMap::new();
    for &softmax in order {
        let s = g.node(softmax);
        if s.op_type != "Softmax" {
            continue;
        }
        let Some(x) = s.input(0) else { continue };
        let Some(producer) = g.producer(x).map(|o| o.node) else { continue };
        if !sole_use(x, softmax) {
            continue;
        }
        let p = g.node(producer);
        match p.op_type.as_str() {
            "Where" => {
                if let Some(fill) = p.input(2).filter(|&f| is_mask_fill(g, f)) {
                    internal.extend([x, fill]);
                }
            }
            "Add" => {
                for slot in 0..2 {
                    let Some(mask) = p.input(slot) else { continue };
                    if let Some(source) = mask_source(g, mask) {
                        internal.insert(x);
                        let uses = masks.entry(source.producer_output).or_default();
                        uses.carriers.extend(source.carriers);
                        uses.statics.extend(source.statics);
                        uses.adds.insert(producer);
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    for (root, uses) in masks {
        let only_masking = |v: ValueId| {
            !g.is_output(v)
                && g.consumer_nodes(v).iter().all(|c| {
                    uses.adds.contains(c)
                        || g.node(*c).outputs().iter().flatten().any(|o| uses.carriers.contains(o))
                })
        };
        if only_masking(root) && uses.carriers.iter().all(|&v| only_masking(v)) {
            internal.insert(root);
            internal.extend(uses.carriers);
            internal.extend(uses.statics);
        }
    }
    internal
}

/// How the masked `Add`s of one mask producer reach it.
#[derive(Default)]
struct MaskUses {
    /// Outputs of the [`MASK_CARRIERS`] between the producer and the `Add`s.
    carriers: Vec<ValueId>,
    /// The producer's static operands (fill values and the `Where`'s other branch).
    statics: Vec<ValueId>,
    /// The masked `Add`s.
    adds: HashSet<NodeId>,
}

/// Where an additive mask comes from.
struct MaskSource {
    producer_output: ValueId,
    /// Carrier outputs passed on the way back from the mask.
    carriers: Vec<ValueId>,
    statics: Vec<ValueId>,
}

/// Traces an additive mask back through [`MASK_CARRIERS`] to a `Where(c, a, b)` with static `a`
/// and `b`, one of them a fill, or a `Mul` with a fill operand.
fn mask_source(g: &Graph, mask: ValueId) -> Option<MaskSource> {
    let mut chain = Vec::new();
    let mut v = mask;
    loop {
        let node = g.producer_node(v)?;
        match node.op_type.as_str() {
            op if MASK_CARRIERS.contains(&op) => {
                chain.push(v);
                v = node.input(0)?;
            }
            "Where" => {
                let (a, b) = (node.input(1)?, node.input(2)?);
                let both_static = g.is_static(a) && g.is_static(b);
                return (both_static && (is_mask_fill(g, a) || is_mask_fill(g, b))).then(|| MaskSource {
                    producer_output: v,
                    carriers: chain,
                    statics: vec![a, b],
                });
            }
            "Mul" => {
                let fill = node.inputs().iter().flatten().copied().find(|&f| is_mask_fill(g, f))?;
                return Some(MaskSource { producer_output: v, carriers: chain, statics: vec![fill] });
            }
            _ => return None,
        }
    }
}

/// The `doc_string` that marks the nodes of a per-channel clip written by cross-layer
/// equalization (`qptq`), so that only those — never a model's own `Min`/`Max` — are read as one.
pub const CHANNEL_CLIP_MARK: &str = "quantkit: per-channel Clip";

/// A `Clip` whose bounds are per channel, as cross-layer equalization writes one it scales
/// through: `Relu` or `Max(x, lo)`, then `Min(·, hi)` (either alone when the other bound is
/// absent), each node marked with [`CHANNEL_CLIP_MARK`]. It is quantized as the `Clip` it
/// replaces: one output quantizer, none inside, none on the bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChannelClip {
    /// The first node (reads the clipped tensor).
    pub(crate) first: NodeId,
    /// The last node (writes the clip's output).
    pub(crate) last: NodeId,
    /// Outputs inside the clip (the first node's, when there are two).
    pub(crate) inner: Vec<ValueId>,
    /// The static bound tensors.
    pub(crate) bounds: Vec<ValueId>,
}

/// Finds the per-channel clips of `g`.
pub(crate) fn channel_clips(g: &Graph, order: &[NodeId]) -> Vec<ChannelClip> {
    let marked = |n: NodeId| g.node(n).doc_string == CHANNEL_CLIP_MARK;
    let statics = |n: NodeId| -> Vec<ValueId> {
        g.node(n).inputs().iter().flatten().copied().filter(|&v| g.is_static(v)).collect()
    };
    let mut out = Vec::new();
    let mut taken = HashSet::new();
    for &node in order {
        let n = g.node(node);
        if !marked(node) || taken.contains(&node) {
            continue;
        }
        let op = n.op_type.as_str();
        let is_lower = op == "Relu" || (op == "Max" && statics(node).len() == 1);
        let is_upper = op == "Min" && statics(node).len() == 1;
        if !is_lower && !is_upper {
            continue;
        }
        let Some(y) = n.output(0) else { continue };
        let next = g.consumer_nodes(y);
        let pair = is_lower
            && next.len() == 1
            && !g.is_output(y)
            && marked(next[0])
            && g.node(next[0]).op_type == "Min"
            && statics(next[0]).len() == 1
            && g.node(next[0]).input(0) == Some(y);
        let mut bounds = statics(node);
        let (last, inner) = if pair {
            bounds.extend(statics(next[0]));
            (next[0], vec![y])
        } else {
            (node, Vec::new())
        };
        taken.insert(last);
        out.push(ChannelClip { first: node, last, inner, bounds });
    }
    out
}

//! Phase 3 of AMP (spec §7.9): fewer precision converts. Where a tensor computed at one activation
//! precision is read at another, a deployment inserts a convert op; a plan with many small islands
//! of int16 pays for them. Phase 3 raises some groups' activation precision (never lowers one, so
//! accuracy is kept) to cut the converts, at the least bit-ops cost.
//!
//! - [`GroupGraph`]: quantizer groups with activation quantizers as nodes; an edge joins the group
//!   of each quantized activation to the groups of the quantized activations it is computed from
//!   (ops without an enabled output quantizer are looked through, as AIMET contracts them;
//!   constants are not sources, being stored at their reader's precision). Each edge carries
//!   AIMET's predicted convert cycles for the larger of its two tensors.
//! - [`exact_front`]: the exact trade-off between weighted converts and bit-ops, by dynamic
//!   programming over the groups in topological order. The state is the choice of every group
//!   that still has an edge to a later one (a path decomposition of the group graph), each state
//!   keeps its Pareto set of (converts, cost). AIMET solves one MIP per threshold with CBC and a
//!   10 s limit; this gives every threshold's optimum at once, without a solver dependency.
//! - [`Phase3Threshold`]: AIMET's three ways to turn `alpha` into a convert budget.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use qcalib::{Placement, Precision, QuantizerId, TensorRole};
use qgraph::{Graph, ValueId};

use crate::AmpError;
use crate::bitops::BitOps;
use crate::candidate::Candidate;
use crate::groups::QuantizerGroup;

/// AIMET's fitted convert-cycle model: `2.7517·C + 0.8065·H·C + 4.2742·H·W + 0.03624·size +
/// 2255.28·⌈H/8⌉` on the tensor padded to 4-D `[N, C, H, W]` (rank 2 and 3 padded with ones at the
/// end, higher ranks take their last four dims; unknown dims count as 1).
pub fn predicted_convert_cycles(dims: &[usize]) -> f64 {
    let mut d = [1usize; 4];
    if dims.len() > 4 {
        d.copy_from_slice(&dims[dims.len() - 4..]);
    } else {
        d[..dims.len()].copy_from_slice(dims);
    }
    let (c, h, w) = (d[1] as f64, d[2] as f64, d[3] as f64);
    let size: f64 = d.iter().map(|&x| x as f64).product();
    2.751_709_39 * c
        + 0.806_526_234 * h * c
        + 4.274_175_44 * h * w
        + 0.036_243_929_2 * size
        + 2_255.279_50 * (h / 8.0).ceil()
}

/// One edge of the group graph: activations of `from` feed the computation of a quantized
/// activation of `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupEdge {
    /// Upstream group (index into the group list).
    pub from: usize,
    /// Downstream group.
    pub to: usize,
    /// The tensor the convert cost is predicted on (the larger of the two ends).
    pub tensor: String,
    /// Its elements (symbolic dims as 1).
    pub tensor_size: usize,
    /// AIMET's predicted convert cycles for it.
    pub convert_cycles: f64,
}

/// How an edge whose ends differ in activation precision is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutWeight {
    /// Every convert counts 1.
    Count,
    /// A convert counts its tensor's elements.
    TensorSize,
    /// A convert counts its predicted cycles.
    PredictedCycles,
}

/// How `alpha` becomes a convert budget (AIMET's sampling strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase3Threshold {
    /// Converts ≤ `alpha` × the phase-2 plan's count.
    UnweightedCutSize,
    /// Converted elements ≤ `alpha` × the phase-2 plan's.
    WeightedWithTensorSize,
    /// Predicted cycles ≤ the cumulative sum of the sorted edge cycles at `alpha` × the index
    /// where that sum reaches the phase-2 plan's cycles (AIMET's default).
    #[default]
    WeightedWithPredictedConvertCost,
}

impl Phase3Threshold {
    /// The edge weight the budget is expressed in.
    pub fn weight(self) -> CutWeight {
        match self {
            Phase3Threshold::UnweightedCutSize => CutWeight::Count,
            Phase3Threshold::WeightedWithTensorSize => CutWeight::TensorSize,
            Phase3Threshold::WeightedWithPredictedConvertCost => CutWeight::PredictedCycles,
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase3Threshold::UnweightedCutSize => "unweighted_cut_size",
            Phase3Threshold::WeightedWithTensorSize => "weighted_with_tensor_size",
            Phase3Threshold::WeightedWithPredictedConvertCost => "weighted_with_predicted_convert_cost",
        }
    }

    /// The convert budget for `alpha` (in `[0, 1)`) given the phase-2 plan's weighted cut.
    pub fn budget(self, graph: &GroupGraph, alpha: f64, phase2_cut: f64) -> f64 {
        match self {
            Phase3Threshold::UnweightedCutSize | Phase3Threshold::WeightedWithTensorSize => {
                alpha * phase2_cut
            }
            Phase3Threshold::WeightedWithPredictedConvertCost => {
                if alpha == 0.0 {
                    return 0.0;
                }
                let mut costs: Vec<f64> = graph.edges.iter().map(|e| e.convert_cycles).collect();
                costs.sort_by(f64::total_cmp);
                let cumulative: Vec<f64> = costs
                    .iter()
                    .scan(0.0, |s, &c| {
                        *s += c;
                        Some(*s)
                    })
                    .collect();
                // AIMET takes the last index whose running sum is below the phase-2 cut (and fails
                // when there is none; here index 0 is used).
                let last_below = cumulative.iter().rposition(|&s| s < phase2_cut).unwrap_or(0);
                cumulative.get((alpha * last_below as f64) as usize).copied().unwrap_or(0.0)
            }
        }
    }
}

/// The quantizer-group graph of a simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupGraph {
    /// Groups with activation quantizers (the nodes), ascending.
    pub nodes: Vec<usize>,
    /// Edges, one per (from, to) pair, in discovery order.
    pub edges: Vec<GroupEdge>,
}

fn dims_of(g: &Graph, v: ValueId) -> Vec<usize> {
    g.value(v)
        .shape
        .as_ref()
        .map_or_else(|| vec![1; 4], |s| s.0.iter().map(|d| d.known().unwrap_or(1).max(1)).collect())
}

impl GroupGraph {
    /// Builds the graph of `groups` over the enabled activation quantizers of `placement`.
    pub fn new(g: &Graph, placement: &Placement, groups: &[QuantizerGroup]) -> GroupGraph {
        let mut group_of: HashMap<QuantizerId, usize> = HashMap::new();
        for (i, group) in groups.iter().enumerate() {
            for &q in &group.activations {
                group_of.insert(q, i);
            }
        }
        // Constants are stored at whatever precision their reader runs at: no convert at run time.
        let activation_group = |v: ValueId| -> Option<usize> {
            let t = placement.tensor(v)?;
            if matches!(t.role, TensorRole::Param { .. } | TensorRole::Constant)
                || !placement.quantizer(t.quantizer).enabled
            {
                return None;
            }
            group_of.get(&t.quantizer).copied()
        };
        let mut edges: Vec<GroupEdge> = Vec::new();
        let mut index: HashMap<(usize, usize), usize> = HashMap::new();
        for t in placement.tensors() {
            let TensorRole::Output { node } = t.role else { continue };
            let Some(to) = activation_group(t.value) else { continue };
            let out_dims = dims_of(g, t.value);
            let mut stack: Vec<ValueId> = g.node(node).inputs().iter().flatten().copied().collect();
            let mut seen: Vec<ValueId> = Vec::new();
            while let Some(v) = stack.pop() {
                if seen.contains(&v) {
                    continue;
                }
                seen.push(v);
                if let Some(from) = activation_group(v) {
                    if from == to {
                        continue;
                    }
                    let in_dims = dims_of(g, v);
                    let (c_in, c_out) =
                        (predicted_convert_cycles(&in_dims), predicted_convert_cycles(&out_dims));
                    let (tensor, dims, cycles) =
                        if c_in > c_out { (v, in_dims, c_in) } else { (t.value, out_dims.clone(), c_out) };
                    let edge = GroupEdge {
                        from,
                        to,
                        tensor: g.value(tensor).name.clone(),
                        tensor_size: dims.iter().product(),
                        convert_cycles: cycles,
                    };
                    match index.get(&(from, to)) {
                        Some(&k) if edges[k].convert_cycles >= edge.convert_cycles => {}
                        Some(&k) => edges[k] = edge,
                        None => {
                            index.insert((from, to), edges.len());
                            edges.push(edge);
                        }
                    }
                } else if !g.is_static(v)
                    && let Some(p) = g.producer(v)
                {
                    stack.extend(g.node(p.node).inputs().iter().flatten().copied());
                }
            }
        }
        let nodes = (0..groups.len()).filter(|&i| !groups[i].activations.is_empty()).collect();
        GroupGraph { nodes, edges }
    }

    /// The weight of edge `e` under `weight`.
    pub fn weight(&self, e: &GroupEdge, weight: CutWeight) -> f64 {
        match weight {
            CutWeight::Count => 1.0,
            CutWeight::TensorSize => e.tensor_size as f64,
            CutWeight::PredictedCycles => e.convert_cycles,
        }
    }

    /// Summed weight of the edges whose ends differ in activation precision.
    pub fn cut(&self, activation: &[Precision], weight: CutWeight) -> f64 {
        self.edges
            .iter()
            .filter(|e| activation[e.from] != activation[e.to])
            .fold(0.0, |sum, e| sum + self.weight(e, weight))
    }

    /// Under `assignment`: the number of converts, their weight under `weight`, and their
    /// predicted cycles.
    pub fn convert_totals(&self, assignment: &[Candidate], weight: CutWeight) -> (usize, f64, f64) {
        let act: Vec<Precision> = assignment.iter().map(|c| c.activation).collect();
        (
            self.cut(&act, CutWeight::Count) as usize,
            self.cut(&act, weight),
            self.cut(&act, CutWeight::PredictedCycles),
        )
    }

    /// Graphviz text of the graph, nodes coloured by activation precision (8-bit cyan, 16-bit
    /// red, others grey) and labelled with the group's index and first tensor.
    pub fn to_dot(&self, groups: &[QuantizerGroup], activation: &[Precision]) -> String {
        let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = String::from("digraph quantizer_groups {\n  node [style=filled];\n");
        for &i in &self.nodes {
            let colour = match activation[i].bits() {
                8 => "cyan",
                16 => "red",
                _ => "grey",
            };
            let first = groups[i].activation_names.first().map_or("", String::as_str);
            let _ = writeln!(
                out,
                "  g{i} [label=\"{i}: {} ({})\", color={colour}];",
                quote(first),
                activation[i]
            );
        }
        for e in &self.edges {
            let style =
                if activation[e.from] != activation[e.to] { ", color=orange, penwidth=2" } else { "" };
            let _ = writeln!(out, "  g{} -> g{} [label=\"{:.0}\"{style}];", e.from, e.to, e.convert_cycles);
        }
        out.push_str("}\n");
        out
    }
}

/// One plan on the exact front: the choice index of every node and its totals.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontPoint {
    /// Summed weight of the converts.
    pub cut: f64,
    /// Summed cost of the choices.
    pub cost: f64,
    /// Choice index per node.
    pub choice: Vec<usize>,
}

/// The exact front grew beyond the state limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontTooWide {
    /// Node being added when the limit was hit.
    pub node: usize,
    /// Partial plans kept at that point.
    pub entries: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    cut: f64,
    cost: f64,
    choice: u32,
    prev: u32,
}

/// Keeps the entries no other entry beats in both cut and cost (ties: the first one).
fn pareto(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.sort_by(|a, b| a.cut.total_cmp(&b.cut).then(a.cost.total_cmp(&b.cost)));
    let mut kept: Vec<Entry> = Vec::new();
    for e in entries {
        if kept.last().is_none_or(|k| e.cost < k.cost) {
            kept.push(e);
        }
    }
    kept
}

/// Every Pareto-optimal plan of (cut, cost), lowest cut first. Nodes are `0..choices.len()` in
/// processing order (a topological order keeps the state small); `choices[v]` lists node `v`'s
/// options as (label, cost); `edges` are `(a, b, weight)`, paying `weight` when the labels of `a`
/// and `b` differ. Fails when more than `max_entries` partial plans would be kept at one node.
pub fn exact_front(
    choices: &[Vec<(u32, f64)>],
    edges: &[(usize, usize, f64)],
    max_entries: usize,
) -> Result<Vec<FrontPoint>, FrontTooWide> {
    let n = choices.len();
    let mut last: Vec<usize> = (0..n).collect();
    let mut earlier: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n];
    for &(a, b, w) in edges {
        if a == b {
            continue;
        }
        let (lo, hi) = (a.min(b), a.max(b));
        last[lo] = last[lo].max(hi);
        earlier[hi].push((lo, w));
    }
    let mut frontier: Vec<usize> = Vec::new();
    let mut states: BTreeMap<Vec<u32>, Vec<u32>> = BTreeMap::from([(Vec::new(), vec![0])]);
    let mut arenas: Vec<Vec<Entry>> = vec![vec![Entry { cut: 0.0, cost: 0.0, choice: 0, prev: 0 }]];
    for v in 0..n {
        let mut extended = frontier.clone();
        extended.push(v);
        let keep: Vec<bool> = extended.iter().map(|&u| last[u] > v).collect();
        let positions: Vec<(usize, f64)> = earlier[v]
            .iter()
            .map(|&(u, w)| {
                (frontier.iter().position(|&f| f == u).expect("an earlier neighbour is on the frontier"), w)
            })
            .collect();
        let previous = arenas.last().expect("the initial arena");
        let mut next: BTreeMap<Vec<u32>, Vec<Entry>> = BTreeMap::new();
        for (key, entries) in &states {
            for (ci, &(label, cost)) in choices[v].iter().enumerate() {
                let added: f64 = positions
                    .iter()
                    .filter(|&&(pos, _)| choices[frontier[pos]][key[pos] as usize].0 != label)
                    .fold(0.0, |sum, &(_, w)| sum + w);
                let mut new_key: Vec<u32> = Vec::with_capacity(extended.len());
                for (k, &c) in key.iter().chain(std::iter::once(&(ci as u32))).enumerate() {
                    if keep[k] {
                        new_key.push(c);
                    }
                }
                let list = next.entry(new_key).or_default();
                for &e in entries {
                    let p = previous[e as usize];
                    list.push(Entry { cut: p.cut + added, cost: p.cost + cost, choice: ci as u32, prev: e });
                }
            }
        }
        let mut arena: Vec<Entry> = Vec::new();
        states = BTreeMap::new();
        for (key, list) in next {
            let kept = pareto(list);
            let ids = (arena.len() as u32..(arena.len() + kept.len()) as u32).collect();
            arena.extend(kept);
            states.insert(key, ids);
        }
        if arena.len() > max_entries {
            return Err(FrontTooWide { node: v, entries: arena.len() });
        }
        arenas.push(arena);
        frontier = extended.into_iter().zip(&keep).filter(|&(_, &k)| k).map(|(u, _)| u).collect();
    }
    // Every node has left the frontier: one state remains, its list already Pareto-pruned and
    // ordered by cut. Each plan is read back through the `prev` links.
    let finals = arenas.last().expect("the last arena");
    Ok(states
        .values()
        .flatten()
        .map(|&id| {
            let mut choice = vec![0usize; n];
            let mut at = id;
            for v in (0..n).rev() {
                let entry = arenas[v + 1][at as usize];
                choice[v] = entry.choice as usize;
                at = entry.prev;
            }
            let e = finals[id as usize];
            FrontPoint { cut: e.cut, cost: e.cost, choice }
        })
        .collect())
}

/// Settings of phase 3.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase3Options {
    /// Convert budgets as fractions of the phase-2 plan's (1.0 keeps the phase-2 plan).
    pub alphas: Vec<f64>,
    /// How `alpha` becomes a budget.
    pub threshold: Phase3Threshold,
}

impl Default for Phase3Options {
    /// AIMET's alphas `[1.0, 0.8, 0.6, 0.4, 0.2, 0.0]` with its default threshold.
    fn default() -> Phase3Options {
        Phase3Options { alphas: vec![1.0, 0.8, 0.6, 0.4, 0.2, 0.0], threshold: Phase3Threshold::default() }
    }
}

/// The phase-3 plan for one alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase3Plan {
    /// The alpha.
    pub alpha: f64,
    /// The convert budget it gives (in the threshold's weight).
    pub budget: f64,
    /// Candidate per group; `None` when no plan fits the budget.
    pub assignment: Option<Vec<Candidate>>,
    /// Groups whose activation precision was raised.
    pub raised: Vec<usize>,
    /// Edges whose ends differ in activation precision.
    pub converts: usize,
    /// Their summed weight (the threshold's weight).
    pub weighted_cut: f64,
    /// Their predicted convert cycles.
    pub convert_cycles: f64,
    /// Bit-ops relative to the starting point.
    pub relative_bitops: f64,
    /// Phase-2 score of the plan, recalibrated (filled in by the AMP run).
    pub score: Option<f64>,
    /// Encodings (format 1.0.0) of the recalibrated plan (filled in by the AMP run).
    pub encodings: Option<serde_json::Value>,
}

impl Phase3Plan {
    /// One line for a terminal: the plan's converts, raised groups, bit-ops and score.
    pub fn summary(&self) -> String {
        if self.assignment.is_none() {
            return format!("alpha {:.1}: no plan fits a budget of {:.0}", self.alpha, self.budget);
        }
        format!(
            "alpha {:.1}: {} converts ({:.0} cycles), {} groups raised, {:.3} of the bit-ops, score {}",
            self.alpha,
            self.converts,
            self.convert_cycles,
            self.raised.len(),
            self.relative_bitops,
            self.score.map_or("-".into(), |s| format!("{s:.4}"))
        )
    }
}

/// What phase 3 found.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase3Result {
    /// The group graph.
    pub graph: GroupGraph,
    /// The threshold rule used.
    pub threshold: Phase3Threshold,
    /// Converts of the phase-2 plan.
    pub phase2_converts: usize,
    /// Their weight (the threshold's weight).
    pub phase2_weighted_cut: f64,
    /// Their predicted cycles.
    pub phase2_convert_cycles: f64,
    /// Activation precision per group in the phase-2 plan.
    pub phase2_activation: Vec<Precision>,
    /// Every Pareto-optimal plan as (weighted converts, relative bit-ops), fewest converts first.
    pub front: Vec<(f64, f64)>,
    /// One plan per alpha, in the order asked.
    pub plans: Vec<Phase3Plan>,
    /// Why nothing was solved, when so.
    pub skipped: Option<String>,
}

/// Whether activation precision `p` keeps at least the accuracy of `base`: the same, or the same
/// kind with more bits.
fn raises(p: Precision, base: Precision) -> bool {
    p == base || (p.is_int() == base.is_int() && p.bits() > base.bits())
}

/// Partial plans the exact solver may keep at one group before giving up.
const MAX_PARTIAL_PLANS: usize = 4_000_000;

/// Plans phase 3 from the phase-2 plan `phase2`: for every alpha, the cheapest plan in bit-ops
/// whose converts fit that alpha's budget, raising only activation precisions among each group's
/// `supported` candidates (parameters keep their phase-2 precision).
pub fn plan_phase3(
    graph: GroupGraph,
    groups: &[QuantizerGroup],
    supported: &[Vec<Candidate>],
    phase2: &[Candidate],
    bitops: &BitOps,
    start_bitops: f64,
    options: &Phase3Options,
) -> Result<Phase3Result, AmpError> {
    for &a in &options.alphas {
        if !(0.0..=1.0).contains(&a) {
            return Err(AmpError::Settings(format!("phase-3 alpha must lie in [0, 1], got {a}")));
        }
    }
    let weight = options.threshold.weight();
    let relative = |a: &[Candidate]| if start_bitops > 0.0 { bitops.total(a) / start_bitops } else { 1.0 };
    let (phase2_converts, phase2_weighted_cut, phase2_convert_cycles) = graph.convert_totals(phase2, weight);
    let mut result = Phase3Result {
        threshold: options.threshold,
        phase2_converts,
        phase2_weighted_cut,
        phase2_convert_cycles,
        phase2_activation: phase2.iter().map(|c| c.activation).collect(),
        front: Vec::new(),
        plans: Vec::new(),
        skipped: None,
        graph,
    };
    if phase2_converts == 0 {
        result.skipped = Some("the phase-2 plan has no precision converts".into());
        return Ok(result);
    }
    let graph = &result.graph;
    let mut labels: Vec<Precision> = Vec::new();
    let mut label = |p: Precision| -> u32 {
        match labels.iter().position(|&l| l == p) {
            Some(i) => i as u32,
            None => {
                labels.push(p);
                (labels.len() - 1) as u32
            }
        }
    };
    let mut options_of: Vec<Vec<Candidate>> = Vec::with_capacity(graph.nodes.len());
    let mut choices: Vec<Vec<(u32, f64)>> = Vec::with_capacity(graph.nodes.len());
    for &g in &graph.nodes {
        let base = phase2[g];
        let mut own = vec![base];
        for &c in &supported[g] {
            let params_kept = c.param == base.param || groups[g].params.is_empty();
            if params_kept
                && raises(c.activation, base.activation)
                && !own.iter().any(|o| o.activation == c.activation)
            {
                own.push(Candidate { activation: c.activation, ..base });
            }
        }
        choices.push(own.iter().map(|&c| (label(c.activation), bitops.group_cost(g, c))).collect());
        options_of.push(own);
    }
    let position: HashMap<usize, usize> = graph.nodes.iter().enumerate().map(|(i, &g)| (g, i)).collect();
    let edges: Vec<(usize, usize, f64)> =
        graph.edges.iter().map(|e| (position[&e.from], position[&e.to], graph.weight(e, weight))).collect();
    let front = exact_front(&choices, &edges, MAX_PARTIAL_PLANS).map_err(|w| {
        AmpError::Settings(format!(
            "phase 3: the quantizer-group graph is too wide for the exact solver ({} partial plans at group {})",
            w.entries, graph.nodes[w.node]
        ))
    })?;
    let assignment_of = |p: &FrontPoint| -> Vec<Candidate> {
        let mut a = phase2.to_vec();
        for (k, &g) in graph.nodes.iter().enumerate() {
            a[g] = options_of[k][p.choice[k]];
        }
        a
    };
    result.front = front.iter().map(|p| (p.cut, relative(&assignment_of(p)))).collect();
    for &alpha in &options.alphas {
        let (budget, assignment) = if alpha == 1.0 {
            (phase2_weighted_cut, Some(phase2.to_vec()))
        } else {
            let budget = options.threshold.budget(graph, alpha, phase2_weighted_cut);
            let slack = budget.abs() * 1e-12;
            (budget, front.iter().rev().find(|p| p.cut <= budget + slack).map(assignment_of))
        };
        let mut plan = Phase3Plan {
            alpha,
            budget,
            assignment: None,
            raised: Vec::new(),
            converts: 0,
            weighted_cut: 0.0,
            convert_cycles: 0.0,
            relative_bitops: f64::NAN,
            score: None,
            encodings: None,
        };
        if let Some(a) = assignment {
            (plan.converts, plan.weighted_cut, plan.convert_cycles) = graph.convert_totals(&a, weight);
            plan.relative_bitops = relative(&a);
            plan.raised = (0..a.len()).filter(|&g| a[g].activation != phase2[g].activation).collect();
            plan.assignment = Some(a);
        }
        result.plans.push(plan);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every plan, enumerated.
    fn brute_force(choices: &[Vec<(u32, f64)>], edges: &[(usize, usize, f64)]) -> Vec<(f64, f64)> {
        let n = choices.len();
        let mut plans = Vec::new();
        let mut idx = vec![0usize; n];
        loop {
            let cost: f64 = (0..n).map(|v| choices[v][idx[v]].1).sum();
            let cut: f64 = edges
                .iter()
                .filter(|&&(a, b, _)| choices[a][idx[a]].0 != choices[b][idx[b]].0)
                .map(|e| e.2)
                .sum();
            plans.push((cut, cost));
            let mut k = 0;
            while k < n {
                idx[k] += 1;
                if idx[k] < choices[k].len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
            if k == n {
                break;
            }
        }
        plans
    }

    /// A small deterministic pseudo-random generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn exact_front_equals_brute_force_on_random_graphs() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200 {
            let n = 1 + rng.below(9) as usize;
            let choices: Vec<Vec<(u32, f64)>> = (0..n)
                .map(|_| {
                    let k = 1 + rng.below(3) as u32;
                    (0..k).map(|l| (l, rng.below(50) as f64)).collect()
                })
                .collect();
            let edges: Vec<(usize, usize, f64)> = (0..rng.below(14))
                .map(|_| {
                    (rng.below(n as u64) as usize, rng.below(n as u64) as usize, 1.0 + rng.below(20) as f64)
                })
                .collect();
            let front = exact_front(&choices, &edges, 1 << 20).expect("small graphs fit");
            let plans = brute_force(&choices, &edges);
            for p in &front {
                let cut: f64 = edges
                    .iter()
                    .filter(|&&(a, b, _)| choices[a][p.choice[a]].0 != choices[b][p.choice[b]].0)
                    .map(|e| e.2)
                    .sum();
                let cost: f64 = (0..n).map(|v| choices[v][p.choice[v]].1).sum();
                assert_eq!((cut, cost), (p.cut, p.cost), "a front plan's totals are its own");
            }
            for &(cut, cost) in &plans {
                let best =
                    front.iter().filter(|p| p.cut <= cut).map(|p| p.cost).fold(f64::INFINITY, f64::min);
                assert!(best <= cost, "the front beats or ties every plan");
            }
            for p in &front {
                assert!(
                    !plans.iter().any(|&(c, k)| (c < p.cut && k <= p.cost) || (c <= p.cut && k < p.cost)),
                    "no plan dominates a front point"
                );
            }
        }
    }

    #[test]
    fn too_many_states_is_an_error() {
        let n = 12;
        let choices: Vec<Vec<(u32, f64)>> = (0..n).map(|v| vec![(0, 0.0), (1, v as f64 + 1.0)]).collect();
        let edges: Vec<(usize, usize, f64)> =
            (0..n).map(|v| (v, n - 1, 1.0)).chain((0..n).map(|v| (v, 0, 1.0))).collect();
        assert!(exact_front(&choices, &edges, 16).is_err());
    }

    #[test]
    fn convert_cycles_follow_aimets_model() {
        let c = predicted_convert_cycles(&[1, 32, 112, 112]);
        let expected = 2.75170939 * 32.0
            + 0.806526234 * 112.0 * 32.0
            + 4.27417544 * 112.0 * 112.0
            + 0.0362439292 * 32.0 * 112.0 * 112.0
            + 2255.2795 * 14.0;
        assert!((c - expected).abs() < 1e-6 * expected);
        assert_eq!(predicted_convert_cycles(&[1, 1000]), predicted_convert_cycles(&[1, 1000, 1, 1]));
        assert_eq!(predicted_convert_cycles(&[2, 1, 8, 4, 4]), predicted_convert_cycles(&[1, 8, 4, 4]));
    }
}

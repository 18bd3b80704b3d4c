//! `ai.onnx.ml` tree ensembles: `TreeEnsemble` (opset 5) and `TreeEnsembleRegressor` (opsets 1
//! and 3). Both attribute layouts compile into one forest — decision nodes, leaves and the votes
//! each leaf casts — evaluated row by row in f64 with onnxruntime's aggregation (sum, average,
//! min, max, then the base values) and post-transforms (softmax, logistic, softmax-zero,
//! probit). A branch that does not reach a leaf within as many steps as the forest has nodes is
//! an error, so a hostile cycle cannot hang the run.

use std::collections::HashMap;
use std::ops::Range;

use half::f16;
use qgraph::{Attribute, DType, Node, Tensor};

use super::{Activation, ExecCtx, Kernel, input, invalid, tensor_from};
use crate::error::{KernelResult, Result};

/// Where a branch leads.
#[derive(Debug, Clone, Copy)]
enum Next {
    Decision(usize),
    Leaf(usize),
}

/// How a decision compares its feature with its split value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Member,
}

struct Decision {
    feature: usize,
    mode: Mode,
    split: f64,
    /// The decision's set (`Mode::Member`), as a range of `Forest::members`.
    members: Range<usize>,
    /// A NaN feature takes the true branch.
    missing_true: bool,
    on_true: Next,
    on_false: Next,
}

#[derive(Debug, Clone, Copy)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

#[derive(Debug, Clone, Copy)]
enum PostTransform {
    None,
    Softmax,
    Logistic,
    SoftmaxZero,
    Probit,
}

struct Forest {
    decisions: Vec<Decision>,
    /// Each leaf's votes, as a range of `targets`/`weights`.
    leaves: Vec<Range<usize>>,
    targets: Vec<usize>,
    weights: Vec<f64>,
    members: Vec<f64>,
    roots: Vec<Next>,
    n_targets: usize,
    aggregate: Aggregate,
    post: PostTransform,
    /// Added to every row's scores (empty: none).
    base: Vec<f64>,
    /// The output is f32 whatever the input (`TreeEnsembleRegressor`); otherwise the input's type.
    f32_output: bool,
    /// The largest feature index any decision reads.
    max_feature: Option<usize>,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    if node.domain != "ai.onnx.ml" {
        return None;
    }
    let built = match node.op_type.as_str() {
        "TreeEnsemble" => tree_ensemble(node),
        "TreeEnsembleRegressor" => tree_ensemble_regressor(node),
        _ => return None,
    };
    Some(built.map(|f| Box::new(f) as Box<dyn Kernel>).map_err(|detail| invalid(node, detail)))
}

fn ints<'a>(node: &'a Node, name: &str) -> std::result::Result<&'a [i64], String> {
    node.ints_attr(name).map_err(|e| e.to_string())?.ok_or_else(|| format!("attribute {name} is missing"))
}

fn opt_ints<'a>(node: &'a Node, name: &str) -> std::result::Result<&'a [i64], String> {
    Ok(node.ints_attr(name).map_err(|e| e.to_string())?.unwrap_or(&[]))
}

/// A float list given as `FLOATS` under `name` or as a tensor under `name_as_tensor` (either
/// may be absent: empty).
fn float_list(node: &Node, name: &str, tensor_name: &str) -> std::result::Result<Vec<f64>, String> {
    match (node.attr(name), node.attr(tensor_name)) {
        (Some(Attribute::Floats(v)), _) => Ok(v.iter().map(|&x| f64::from(x)).collect()),
        (Some(Attribute::Tensor(t)), _) | (None, Some(Attribute::Tensor(t))) => Ok(t.to_f64_vec()),
        (None, None) => Ok(Vec::new()),
        (Some(other), _) | (None, Some(other)) => {
            Err(format!("attribute {name} must be floats or a tensor, found {}", other.kind()))
        }
    }
}

fn strings_of(node: &Node, name: &str) -> std::result::Result<Vec<String>, String> {
    match node.attr(name) {
        Some(Attribute::Strings(v)) => {
            Ok(v.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
        }
        Some(other) => Err(format!("attribute {name} must be strings, found {}", other.kind())),
        None => Err(format!("attribute {name} is missing")),
    }
}

fn index(v: i64, len: usize, what: &str) -> std::result::Result<usize, String> {
    usize::try_from(v).ok().filter(|&i| i < len).ok_or_else(|| format!("{what} {v} is out of range 0..{len}"))
}

fn same_len(name: &str, len: usize, expected: usize) -> std::result::Result<(), String> {
    if len == expected {
        Ok(())
    } else {
        Err(format!("attribute {name} has {len} entries, the nodes are {expected}"))
    }
}

fn n_targets(node: &Node) -> std::result::Result<usize, String> {
    let n = node.int_attr("n_targets", 1).map_err(|e| e.to_string())?;
    usize::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| format!("n_targets {n} must be at least 1"))
}

fn feature(v: i64) -> std::result::Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("feature id {v} is negative"))
}

/// Splits `values` at NaNs into one set per member decision, in node order.
fn member_sets(values: &[f64], decisions: &mut [Decision]) -> std::result::Result<Vec<f64>, String> {
    let mut sets = values.split(|v| v.is_nan()).filter(|s| !s.is_empty());
    let mut members = Vec::new();
    for d in decisions.iter_mut().filter(|d| d.mode == Mode::Member) {
        let set = sets.next().ok_or("membership_values holds fewer sets than there are member nodes")?;
        d.members = members.len()..members.len() + set.len();
        members.extend_from_slice(set);
    }
    Ok(members)
}

fn tree_ensemble(node: &Node) -> std::result::Result<Forest, String> {
    let features = ints(node, "nodes_featureids")?;
    let count = features.len();
    let modes = node
        .tensor_attr("nodes_modes")
        .map_err(|e| e.to_string())?
        .ok_or("attribute nodes_modes is missing")?
        .to_i64_vec()
        .ok_or("nodes_modes must be an integer tensor")?;
    let splits = float_list(node, "nodes_splits", "nodes_splits")?;
    let (true_ids, true_leafs) = (ints(node, "nodes_truenodeids")?, ints(node, "nodes_trueleafs")?);
    let (false_ids, false_leafs) = (ints(node, "nodes_falsenodeids")?, ints(node, "nodes_falseleafs")?);
    let missing = opt_ints(node, "nodes_missing_value_tracks_true")?;
    for (name, len) in [
        ("nodes_modes", modes.len()),
        ("nodes_splits", splits.len()),
        ("nodes_truenodeids", true_ids.len()),
        ("nodes_trueleafs", true_leafs.len()),
        ("nodes_falsenodeids", false_ids.len()),
        ("nodes_falseleafs", false_leafs.len()),
    ] {
        same_len(name, len, count)?;
    }
    if !missing.is_empty() {
        same_len("nodes_missing_value_tracks_true", missing.len(), count)?;
    }
    let leaf_targets = ints(node, "leaf_targetids")?;
    let weights = float_list(node, "leaf_weights", "leaf_weights")?;
    if weights.len() != leaf_targets.len() {
        return Err(format!("{} leaf weights for {} leaf target ids", weights.len(), leaf_targets.len()));
    }
    let n_targets = n_targets(node)?;
    let next = |id: i64, leaf: i64| -> std::result::Result<Next, String> {
        Ok(if leaf != 0 {
            Next::Leaf(index(id, weights.len(), "leaf")?)
        } else {
            Next::Decision(index(id, count, "node")?)
        })
    };
    let mut decisions = Vec::with_capacity(count);
    for i in 0..count {
        let mode = match modes[i] {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            6 => Mode::Member,
            m => return Err(format!("node mode {m} is not one of 0..=6")),
        };
        decisions.push(Decision {
            feature: feature(features[i])?,
            mode,
            split: splits[i],
            members: 0..0,
            missing_true: missing.get(i).is_some_and(|&m| m != 0),
            on_true: next(true_ids[i], true_leafs[i])?,
            on_false: next(false_ids[i], false_leafs[i])?,
        });
    }
    let members = member_sets(&float_list(node, "membership_values", "membership_values")?, &mut decisions)?;
    let roots = ints(node, "tree_roots")?
        .iter()
        .map(|&r| index(r, count, "tree root").map(Next::Decision))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let targets = leaf_targets
        .iter()
        .map(|&t| index(t, n_targets, "leaf target id"))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let aggregate = match node.int_attr("aggregate_function", 1).map_err(|e| e.to_string())? {
        0 => Aggregate::Average,
        1 => Aggregate::Sum,
        2 => Aggregate::Min,
        3 => Aggregate::Max,
        a => return Err(format!("aggregate_function {a} is not one of 0..=3")),
    };
    let post = match node.int_attr("post_transform", 0).map_err(|e| e.to_string())? {
        0 => PostTransform::None,
        1 => PostTransform::Softmax,
        2 => PostTransform::Logistic,
        3 => PostTransform::SoftmaxZero,
        4 => PostTransform::Probit,
        p => return Err(format!("post_transform {p} is not one of 0..=4")),
    };
    Ok(Forest {
        max_feature: decisions.iter().map(|d| d.feature).max(),
        decisions,
        leaves: (0..targets.len()).map(|l| l..l + 1).collect(),
        targets,
        weights,
        members,
        roots,
        n_targets,
        aggregate,
        post,
        base: Vec::new(),
        f32_output: false,
    })
}

fn tree_ensemble_regressor(node: &Node) -> std::result::Result<Forest, String> {
    let tree_ids = ints(node, "nodes_treeids")?;
    let count = tree_ids.len();
    let node_ids = ints(node, "nodes_nodeids")?;
    let features = ints(node, "nodes_featureids")?;
    let modes = strings_of(node, "nodes_modes")?;
    let values = float_list(node, "nodes_values", "nodes_values_as_tensor")?;
    let (true_ids, false_ids) = (ints(node, "nodes_truenodeids")?, ints(node, "nodes_falsenodeids")?);
    let missing = opt_ints(node, "nodes_missing_value_tracks_true")?;
    for (name, len) in [
        ("nodes_nodeids", node_ids.len()),
        ("nodes_featureids", features.len()),
        ("nodes_modes", modes.len()),
        ("nodes_values", values.len()),
        ("nodes_truenodeids", true_ids.len()),
        ("nodes_falsenodeids", false_ids.len()),
    ] {
        same_len(name, len, count)?;
    }
    if !missing.is_empty() {
        same_len("nodes_missing_value_tracks_true", missing.len(), count)?;
    }
    // Every node's place: a decision or a leaf, by its (tree, node) id.
    let mut place: HashMap<(i64, i64), Next> = HashMap::with_capacity(count);
    let (mut decision_count, mut leaf_count) = (0, 0);
    for i in 0..count {
        let at = if modes[i] == "LEAF" {
            leaf_count += 1;
            Next::Leaf(leaf_count - 1)
        } else {
            decision_count += 1;
            Next::Decision(decision_count - 1)
        };
        if place.insert((tree_ids[i], node_ids[i]), at).is_some() {
            return Err(format!("tree {} has node id {} twice", tree_ids[i], node_ids[i]));
        }
    }
    let find = |tree: i64, id: i64| {
        place.get(&(tree, id)).copied().ok_or_else(|| format!("tree {tree} has no node {id}"))
    };
    let mut decisions = Vec::with_capacity(decision_count);
    for i in (0..count).filter(|&i| modes[i] != "LEAF") {
        let mode = match modes[i].as_str() {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            m => return Err(format!("node mode '{m}' is not a BRANCH_ mode or LEAF")),
        };
        decisions.push(Decision {
            feature: feature(features[i])?,
            mode,
            split: values[i],
            members: 0..0,
            missing_true: missing.get(i).is_some_and(|&m| m != 0),
            on_true: find(tree_ids[i], true_ids[i])?,
            on_false: find(tree_ids[i], false_ids[i])?,
        });
    }
    let n_targets = n_targets(node)?;
    let (target_trees, target_nodes) = (ints(node, "target_treeids")?, ints(node, "target_nodeids")?);
    let target_ids = ints(node, "target_ids")?;
    let target_weights = float_list(node, "target_weights", "target_weights_as_tensor")?;
    let votes = target_trees.len();
    for (name, len) in [
        ("target_nodeids", target_nodes.len()),
        ("target_ids", target_ids.len()),
        ("target_weights", target_weights.len()),
    ] {
        if len != votes {
            return Err(format!("attribute {name} has {len} entries, target_treeids has {votes}"));
        }
    }
    let mut by_leaf: Vec<Vec<(usize, f64)>> = vec![Vec::new(); leaf_count];
    for j in 0..votes {
        let Next::Leaf(l) = find(target_trees[j], target_nodes[j])? else {
            return Err(format!(
                "target {j} names node {} of tree {}, which is not a leaf",
                target_nodes[j], target_trees[j]
            ));
        };
        by_leaf[l].push((index(target_ids[j], n_targets, "target id")?, target_weights[j]));
    }
    let (mut leaves, mut targets, mut weights) = (Vec::with_capacity(leaf_count), Vec::new(), Vec::new());
    for votes in by_leaf {
        leaves.push(targets.len()..targets.len() + votes.len());
        for (t, w) in votes {
            targets.push(t);
            weights.push(w);
        }
    }
    let mut trees: Vec<i64> = tree_ids.to_vec();
    trees.sort_unstable();
    trees.dedup();
    let roots = trees.iter().map(|&t| find(t, 0)).collect::<std::result::Result<Vec<_>, _>>()?;
    let aggregate = match node.string_attr("aggregate_function").map_err(|e| e.to_string())?.unwrap_or("SUM")
    {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        a => return Err(format!("aggregate_function '{a}' is not SUM, AVERAGE, MIN or MAX")),
    };
    let post = match node.string_attr("post_transform").map_err(|e| e.to_string())?.unwrap_or("NONE") {
        "NONE" => PostTransform::None,
        "SOFTMAX" => PostTransform::Softmax,
        "LOGISTIC" => PostTransform::Logistic,
        "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
        "PROBIT" => PostTransform::Probit,
        p => {
            return Err(format!(
                "post_transform '{p}' is not NONE, SOFTMAX, LOGISTIC, SOFTMAX_ZERO or PROBIT"
            ));
        }
    };
    let base = float_list(node, "base_values", "base_values_as_tensor")?;
    if !base.is_empty() && base.len() != n_targets {
        return Err(format!("{} base values for {n_targets} targets", base.len()));
    }
    Ok(Forest {
        max_feature: decisions.iter().map(|d| d.feature).max(),
        decisions,
        leaves,
        targets,
        weights,
        members: Vec::new(),
        roots,
        n_targets,
        aggregate,
        post,
        base,
        f32_output: true,
    })
}

impl Decision {
    fn goes_true(&self, x: f64, members: &[f64]) -> bool {
        let holds = match self.mode {
            Mode::Leq => x <= self.split,
            Mode::Lt => x < self.split,
            Mode::Gte => x >= self.split,
            Mode::Gt => x > self.split,
            Mode::Eq => x == self.split,
            Mode::Neq => x != self.split,
            Mode::Member => members[self.members.clone()].contains(&x),
        };
        holds || (self.missing_true && x.is_nan())
    }
}

impl Forest {
    /// The leaf a row reaches from `at`.
    fn leaf(&self, row: &[f64], mut at: Next) -> KernelResult<usize> {
        for _ in 0..=self.decisions.len() {
            match at {
                Next::Leaf(l) => return Ok(l),
                Next::Decision(d) => {
                    let d = &self.decisions[d];
                    at = if d.goes_true(row[d.feature], &self.members) { d.on_true } else { d.on_false };
                }
            }
        }
        Err("a tree's branches form a cycle and never reach a leaf".into())
    }

    /// One row's scores, aggregated over the trees and post-transformed, into `out`.
    fn score(&self, row: &[f64], out: &mut [f64], seen: &mut [bool]) -> KernelResult<()> {
        out.fill(0.0);
        seen.fill(false);
        for &root in &self.roots {
            let leaf = self.leaf(row, root)?;
            for v in self.leaves[leaf].clone() {
                let (t, w) = (self.targets[v], self.weights[v]);
                out[t] = match self.aggregate {
                    Aggregate::Sum | Aggregate::Average => out[t] + w,
                    Aggregate::Min if seen[t] => out[t].min(w),
                    Aggregate::Max if seen[t] => out[t].max(w),
                    Aggregate::Min | Aggregate::Max => w,
                };
                seen[t] = true;
            }
        }
        if matches!(self.aggregate, Aggregate::Average) && !self.roots.is_empty() {
            let trees = self.roots.len() as f64;
            out.iter_mut().for_each(|v| *v /= trees);
        }
        out.iter_mut().zip(&self.base).for_each(|(v, b)| *v += b);
        post_transform(self.post, out);
        Ok(())
    }
}

fn post_transform(post: PostTransform, v: &mut [f64]) {
    match post {
        PostTransform::None => {}
        PostTransform::Softmax => {
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            v.iter_mut().for_each(|x| *x = (*x - max).exp());
            let sum: f64 = v.iter().sum();
            v.iter_mut().for_each(|x| *x /= sum);
        }
        PostTransform::SoftmaxZero => {
            // Zero scores stay zero; the others are a softmax among themselves.
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            v.iter_mut().for_each(|x| *x = if *x == 0.0 { 0.0 } else { (*x - max).exp() });
            let sum: f64 = v.iter().sum();
            if sum > 0.0 {
                v.iter_mut().for_each(|x| *x /= sum);
            }
        }
        PostTransform::Logistic => v.iter_mut().for_each(|x| {
            let e = (-x.abs()).exp();
            *x = if *x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        }),
        PostTransform::Probit => {
            v.iter_mut().for_each(|x| *x = std::f64::consts::SQRT_2 * erf_inv(2.0 * *x - 1.0))
        }
    }
}

/// The inverse error function by Winitzki's closed form (a = 0.147), the approximation
/// onnxruntime's probit uses.
fn erf_inv(x: f64) -> f64 {
    const A: f64 = 0.147;
    let ln = ((1.0 - x) * (1.0 + x)).ln();
    let first = 2.0 / (std::f64::consts::PI * A) + ln / 2.0;
    let root = (first * first - ln / A).sqrt() - first;
    root.sqrt().copysign(x)
}

impl Kernel for Forest {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let (rows, width) = match x.shape() {
            [w] => (1, *w),
            [n, w] => (*n, *w),
            s => return Err(format!("the input must be [N, F], got shape {s:?}")),
        };
        if let Some(f) = self.max_feature.filter(|&f| f >= width) {
            return Err(format!("a node reads feature {f}, the input has {width}"));
        }
        let out_type = if self.f32_output { DType::F32 } else { x.dtype() };
        if !matches!(out_type, DType::F32 | DType::F64 | DType::F16) {
            return Err(format!("the input must be float, double or float16 (got {})", x.dtype()));
        }
        let shape = [rows, self.n_targets];
        // One row's scores are held even for an empty batch: both sizes are checked.
        ctx.checked_len(&[self.n_targets], std::mem::size_of::<f64>())?;
        let len = ctx.checked_len(&shape, std::mem::size_of::<f64>())?;
        let data = x.to_f64_vec();
        let mut scores = vec![0f64; len];
        let mut seen = vec![false; self.n_targets];
        for (r, out) in scores.chunks_mut(self.n_targets).enumerate() {
            self.score(&data[r * width..(r + 1) * width], out, &mut seen)?;
        }
        Ok(vec![match out_type {
            DType::F64 => tensor_from(&shape, scores)?,
            DType::F16 => tensor_from(&shape, scores.into_iter().map(f16::from_f64).collect())?,
            _ => tensor_from(&shape, scores.into_iter().map(|v| v as f32).collect())?,
        }])
    }
}

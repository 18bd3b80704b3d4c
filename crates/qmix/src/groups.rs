//! Quantizer groups (spec §7.2): the quantizers AMP switches together. A weighted op's input
//! activation quantizers and its parameter quantizers form one group; activations feeding several
//! weighted ops merge their groups; an activation no weighted op reads is a group of its own.
//! Consumers are found through pass-through ops (Reshape, Gather, Unsqueeze, Pad, Transpose) and a
//! consumer's inputs are traced back through them.
//!
//! Unlike AIMET, whose group order follows Python set iteration, groups here are ordered by the
//! topological position of their first tensor, so ties in the phase-1 sort break the same way on
//! every run.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use qcalib::{Placement, QuantizerId, TensorRole};
use qgraph::{Graph, NodeId, ValueId};

use crate::AmpError;

/// Ops AMP looks through when finding a tensor's consumers (AIMET's pass-through list).
const PASS_THROUGH_OPS: [&str; 5] = ["Reshape", "Gather", "Unsqueeze", "Pad", "Transpose"];

/// Quantizers switched together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizerGroup {
    /// Activation quantizers (inputs, outputs, constants).
    pub activations: Vec<QuantizerId>,
    /// Parameter quantizers.
    pub params: Vec<QuantizerId>,
    /// Names of the activation tensors, sorted.
    pub activation_names: Vec<String>,
    /// Names of the parameter tensors, sorted.
    pub param_names: Vec<String>,
    /// Op types the group's quantizers belong to (producer of an activation, consumer of a graph
    /// input or parameter), for `supported_kernels`.
    pub op_types: Vec<String>,
}

impl QuantizerGroup {
    /// Every quantizer of the group.
    pub fn quantizers(&self) -> impl Iterator<Item = QuantizerId> + '_ {
        self.activations.iter().chain(&self.params).copied()
    }

    /// AIMET's `to_list()`: `[("activation", name)…, ("weight", name)…]`.
    pub fn to_list(&self) -> Vec<(&'static str, &str)> {
        let acts = self.activation_names.iter().map(|n| ("activation", n.as_str()));
        acts.chain(self.param_names.iter().map(|n| ("weight", n.as_str()))).collect()
    }

    /// A short label: the names joined by `+`.
    pub fn label(&self) -> String {
        self.activation_names.iter().chain(&self.param_names).cloned().collect::<Vec<_>>().join(" + ")
    }
}

fn pass_through(g: &Graph, node: NodeId) -> bool {
    PASS_THROUGH_OPS.contains(&g.node(node).op_type.as_str())
}

/// The ops reading `v`, looking through pass-through ops.
fn consumers_through(g: &Graph, v: ValueId, out: &mut Vec<NodeId>, seen: &mut HashSet<ValueId>) {
    if !seen.insert(v) {
        return;
    }
    for node in g.consumer_nodes(v) {
        if pass_through(g, node) {
            for &o in g.node(node).outputs().iter().flatten() {
                consumers_through(g, o, out, seen);
            }
        } else if !out.contains(&node) {
            out.push(node);
        }
    }
}

/// `v` traced back through pass-through producers via their first input.
fn trace_back(g: &Graph, mut v: ValueId) -> ValueId {
    let mut steps = 0;
    while let Some(node) = g.producer(v).map(|o| o.node) {
        if !pass_through(g, node) || steps > g.node_count() {
            break;
        }
        let Some(first) = g.node(node).input(0) else { break };
        v = first;
        steps += 1;
    }
    v
}

/// The quantizer groups of the enabled quantizers of `placement`, in topological order.
pub fn find_quantizer_groups(g: &Graph, placement: &Placement) -> Result<Vec<QuantizerGroup>, AmpError> {
    let order = g.topological_order()?;
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i + 1)).collect();
    let value_position = |v: ValueId| -> usize {
        match g.producer(v) {
            Some(o) if !g.is_static(v) => position.get(&o.node).copied().unwrap_or(0),
            _ => g.consumer_nodes(v).iter().filter_map(|n| position.get(n)).min().copied().unwrap_or(0),
        }
    };
    let enabled = |v: ValueId| placement.tensor(v).filter(|t| placement.quantizer(t.quantizer).enabled);
    let mut starts: Vec<ValueId> = placement
        .tensors()
        .iter()
        .filter(|t| placement.quantizer(t.quantizer).enabled)
        .map(|t| t.value)
        .collect();
    starts.sort_by_key(|&v| (value_position(v), v));

    let mut grouped: HashSet<ValueId> = HashSet::new();
    let mut tensor_groups: Vec<Vec<ValueId>> = Vec::new();
    for &start in &starts {
        if grouped.contains(&start) {
            continue;
        }
        let mut members = vec![start];
        let mut queue = VecDeque::from([start]);
        let mut visited_ops: HashSet<NodeId> = HashSet::new();
        while let Some(v) = queue.pop_front() {
            let mut ops = Vec::new();
            consumers_through(g, v, &mut ops, &mut HashSet::new());
            for op in ops {
                if !visited_ops.insert(op) {
                    continue;
                }
                let params = placement.param_quantizers(g, op);
                if !params.iter().any(|&(_, q)| placement.quantizer(q).enabled) {
                    continue;
                }
                let inputs = g.node(op).inputs().iter().flatten().map(|&i| trace_back(g, i));
                let param_roots =
                    g.node(op).inputs().iter().flatten().filter_map(|&i| g.static_root(i)).map(|(r, _)| r);
                for m in inputs.chain(param_roots) {
                    if enabled(m).is_some() && !members.contains(&m) {
                        members.push(m);
                        queue.push_back(m);
                    }
                }
            }
        }
        grouped.extend(&members);
        tensor_groups.push(members);
    }
    // Tensors that share a quantizer (tying) belong to one group.
    let mut owner: HashMap<QuantizerId, usize> = HashMap::new();
    let mut parent: Vec<usize> = (0..tensor_groups.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for (i, members) in tensor_groups.iter().enumerate() {
        for &v in members {
            let q = placement.quantizer_of(v).expect("members carry quantizers");
            match owner.get(&q) {
                Some(&j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    owner.insert(q, i);
                }
            }
        }
    }
    let mut merged: Vec<Vec<ValueId>> = vec![Vec::new(); tensor_groups.len()];
    for (i, members) in tensor_groups.into_iter().enumerate() {
        let r = root(&mut parent, i);
        merged[r].extend(members);
    }
    Ok(merged.into_iter().filter(|m| !m.is_empty()).map(|m| build_group(g, placement, &m)).collect())
}

fn build_group(g: &Graph, placement: &Placement, members: &[ValueId]) -> QuantizerGroup {
    let (mut activations, mut params) = (BTreeSet::new(), BTreeSet::new());
    let (mut activation_names, mut param_names) = (Vec::new(), Vec::new());
    let mut op_types = BTreeSet::new();
    for &v in members {
        let t = placement.tensor(v).expect("members carry quantizers");
        let name = g.value(v).name.clone();
        match t.role {
            TensorRole::Param { node, .. } => {
                params.insert(t.quantizer);
                param_names.push(name);
                op_types.insert(g.node(node).op_type.clone());
            }
            TensorRole::Output { node } => {
                activations.insert(t.quantizer);
                activation_names.push(name);
                op_types.insert(g.node(node).op_type.clone());
            }
            TensorRole::GraphInput | TensorRole::Constant => {
                activations.insert(t.quantizer);
                activation_names.push(name);
                op_types.extend(g.consumer_nodes(v).first().map(|&n| g.node(n).op_type.clone()));
            }
        }
    }
    activation_names.sort();
    param_names.sort();
    QuantizerGroup {
        activations: activations.into_iter().collect(),
        params: params.into_iter().collect(),
        activation_names,
        param_names,
        op_types: op_types.into_iter().collect(),
    }
}

//! Inlining of `If` nodes whose condition is known when the model loads (a constant, or a value
//! shape inference computes from static dims, as exporters emit for shape checks): the branch the
//! condition picks replaces the node, so its layers sit in the main graph, where quantizers,
//! calibration, analysis and export see them one by one. The `If`'s output names are kept.
//!
//! A branch is left in place when inlining it could not keep the graph's meaning exactly: a name
//! it defines is taken in the main graph (its own subgraphs read values by name), one of its
//! outputs is not computed by one of its nodes, or two outputs are the same value.

use std::collections::{HashMap, HashSet};

use crate::attr::Attribute;
use crate::error::{GraphError, Result};
use crate::graph::{Model, NodeSpec};
use crate::ids::{NodeId, ValueId};
use crate::load::subgraph_model;
use crate::passes::eliminate_dead_nodes;
use crate::shape::DimBindings;

/// Inlines every `If` whose condition is known (repeatedly, as an inlined branch can make another
/// condition known) and removes what computed the conditions. Returns the number inlined; a model
/// whose shapes cannot be inferred is left as it is.
pub fn inline_static_ifs(model: &mut Model, bindings: &DimBindings) -> Result<usize> {
    let mut inlined = 0;
    let mut kept: HashSet<String> = HashSet::new();
    loop {
        let g = &model.graph;
        let ifs: Vec<NodeId> = g
            .nodes()
            .filter(|(_, n)| n.op_type == "If" && n.is_onnx_domain() && !kept.contains(&n.name))
            .map(|(id, _)| id)
            .collect();
        if ifs.is_empty() {
            break;
        }
        // Conditions are computed on a copy whose static dims read through `Shape → Gather` are
        // constants (shape inference computes no value from a partly symbolic shape).
        let mut scratch = model.clone();
        fold_static_dims(&mut scratch.graph);
        let Ok(report) = scratch.infer_shapes(bindings) else { break };
        let g = &scratch.graph;
        let decided = ifs.into_iter().find_map(|id| {
            let cond = g.node(id).input(0)?;
            let value = g.static_value(cond).cloned().or_else(|| report.values[cond.index()].clone())?;
            let first = *value.to_i64_vec()?.first()?;
            Some((id, first != 0))
        });
        let Some((id, taken)) = decided else { break };
        if inline(model, id, taken)? {
            inlined += 1;
        } else {
            kept.insert(model.graph.node(id).name.clone());
        }
    }
    if inlined > 0 {
        eliminate_dead_nodes(&mut model.graph)?;
    }
    Ok(inlined)
}

/// Turns every `Gather` of a `Shape` output whose indices are constant and pick dims the shaped
/// value declares as numbers (`x.size(0)` as torch exports it, on a partly symbolic shape) into
/// a constant.
fn fold_static_dims(g: &mut crate::graph::Graph) {
    let mut folds = Vec::new();
    for (_, n) in g.nodes() {
        if n.op_type != "Gather" || n.int_attr("axis", 0).ok() != Some(0) {
            continue;
        }
        let (Some(shape_out), Some(indices), Some(out)) = (n.input(0), n.input(1), n.output(0)) else {
            continue;
        };
        let Some(shape_node) = g.producer_node(shape_out).filter(|p| p.op_type == "Shape") else { continue };
        let whole = shape_node.attr("start").is_none() && shape_node.attr("end").is_none();
        let Some(dims) = shape_node.input(0).and_then(|x| g.value(x).shape.as_ref()).filter(|_| whole) else {
            continue;
        };
        let Some(index_tensor) = g.static_value(indices) else { continue };
        let Some(picks) = index_tensor.to_i64_vec() else { continue };
        let rank = dims.rank() as i64;
        let known: Option<Vec<i64>> = picks
            .iter()
            .map(|&i| {
                let i = if i < 0 { i + rank } else { i };
                let d = dims.0.get(usize::try_from(i).ok()?)?.known()?;
                i64::try_from(d).ok()
            })
            .collect();
        if let Some(values) = known
            && let Some(t) = crate::tensor::Tensor::from_vec(index_tensor.shape(), values)
        {
            folds.push((out, t));
        }
    }
    for (v, t) in folds {
        g.make_initializer(v, t);
    }
}

/// Replaces `If` node `id` by its `then_branch` (`taken`) or `else_branch`; false (and the graph
/// untouched) when the branch cannot be inlined exactly.
fn inline(model: &mut Model, id: NodeId, taken: bool) -> Result<bool> {
    let opset = model.default_opset();
    let g = &mut model.graph;
    let node = g.node(id).clone();
    let Some(Attribute::Graph(proto)) = node.attr(if taken { "then_branch" } else { "else_branch" }) else {
        return Ok(false);
    };
    let (branch, _) = subgraph_model(proto, opset)?;
    let b = &branch.graph;
    let outputs = b.outputs();
    let distinct: HashSet<ValueId> = outputs.iter().copied().collect();
    let computed = outputs.iter().all(|&v| b.producer(v).is_some());
    // Nested subgraphs read outer values by name: every name the branch defines stays as it is.
    let defined = b.value_ids().filter(|&v| b.producer(v).is_some() || b.is_static(v));
    let clash = defined.into_iter().any(|v| g.value_id(&b.value(v).name).is_some());
    if clash || !computed || distinct.len() != outputs.len() || outputs.len() != node.outputs().len() {
        return Ok(false);
    }
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    for &v in b.inputs() {
        let Some(outer) = g.value_id(&b.value(v).name) else { return Ok(false) };
        map.insert(v, outer);
    }
    let broken =
        |detail: String| GraphError::Unsupported { detail: format!("inlining If '{}': {detail}", node.name) };
    for v in b.initializers() {
        let data = b
            .load_static(v)?
            .ok_or_else(|| broken(format!("initializer '{}' has no data", b.value(v).name)))?;
        map.insert(v, g.add_initializer(&b.value(v).name, data));
    }
    for nid in b.topological_order()? {
        let n = b.node(nid);
        // A `Constant` becomes an initializer of the same name.
        if n.op_type == "Constant"
            && let Some(out) = n.output(0)
            && let Some(data) = b.static_value(out)
        {
            map.insert(out, g.add_initializer(&b.value(out).name, data.clone()));
            continue;
        }
        let new = g.add_node(NodeSpec {
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            attrs: n.attrs.clone(),
            inputs: (n.inputs().iter())
                .map(|i| match i {
                    Some(v) => map.get(v).copied().map(Some).ok_or_else(|| {
                        broken(format!("'{}' reads '{}' before it is defined", n.name, b.value(*v).name))
                    }),
                    None => Ok(None),
                })
                .collect::<Result<_>>()?,
            outputs: (n.outputs().iter().enumerate())
                .map(|(slot, o)| {
                    o.map_or_else(|| format!("{}_unused_{slot}", n.name), |v| b.value(v).name.clone())
                })
                .collect(),
        });
        for (slot, o) in n.outputs().iter().enumerate() {
            if let (Some(o), Some(created)) = (o, g.node(new).output(slot)) {
                map.insert(*o, created);
            }
        }
        let reads = crate::load::subgraph_outer_names(g.node(new));
        let implicit: Option<Vec<ValueId>> = reads.iter().map(|name| g.value_id(name)).collect();
        let implicit =
            implicit.ok_or_else(|| broken(format!("a subgraph of '{}' reads an undefined value", n.name)))?;
        g.set_implicit_inputs(new, implicit);
    }
    let mut renames = Vec::new();
    for (slot, &out) in outputs.iter().enumerate() {
        let Some(if_out) = node.output(slot) else { continue };
        let inlined =
            *map.get(&out).ok_or_else(|| broken("an output of the branch was not inlined".into()))?;
        g.replace_uses(if_out, inlined);
        renames.push((g.value(inlined).name.clone(), g.value(if_out).name.clone()));
    }
    g.remove_nodes(&HashSet::from([id]))?;
    for (from, to) in renames {
        if let Some(v) = g.value_id(&from) {
            g.rename_value(v, &to)?;
        }
    }
    // The branch's nodes were appended after the readers of the `If`'s outputs.
    g.sort_topologically()?;
    Ok(true)
}

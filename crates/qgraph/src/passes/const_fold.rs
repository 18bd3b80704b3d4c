//! Constant folding of shape sub-graphs: with the symbolic dims bound (e.g. batch 1, seq 128), the
//! integer values shape inference computes (`Shape → Gather → Unsqueeze → Concat`) become
//! initializers and the nodes that produced them are removed.

use std::collections::HashSet;

use crate::error::Result;
use crate::graph::Model;
use crate::passes::eliminate_dead_nodes;
use crate::shape::DimBindings;

/// Folds every node whose outputs shape inference fully computed (integer shape arithmetic) into
/// initializers, then removes nodes left without readers. Returns the number of nodes folded.
pub fn fold_constants(model: &mut Model, bindings: &DimBindings) -> Result<usize> {
    let report = model.infer_shapes(bindings)?;
    let g = &mut model.graph;
    let mut folded = HashSet::new();
    for id in g.node_ids() {
        let node = g.node(id);
        if node.op_type == "Constant" || node.outputs().iter().all(Option::is_none) {
            continue;
        }
        let all_known = node.outputs().iter().flatten().all(|v| report.values[v.index()].is_some());
        if all_known {
            folded.insert(id);
        }
    }
    for &id in &folded {
        let outs: Vec<_> = g.node(id).outputs().iter().flatten().copied().collect();
        for v in outs {
            let data = report.values[v.index()].clone().expect("checked above");
            g.make_initializer(v, data);
        }
    }
    let count = folded.len();
    if count > 0 {
        eliminate_dead_nodes(g)?;
    }
    Ok(count)
}

//! Structural clean-ups: removing `Identity` and inference-mode `Dropout` nodes, and removing nodes
//! whose results reach no graph output.

use std::collections::HashSet;

use crate::error::Result;
use crate::graph::{Graph, ValueSource};
use crate::ids::NodeId;

/// Removes `Identity` nodes and `Dropout` nodes whose mask output is unused, wiring their readers
/// to the input. When the output is a graph output, the input value takes over the output's name
/// (if it is a node result not itself a graph output); otherwise the node is kept. Returns the
/// number of nodes removed.
pub fn remove_identities(g: &mut Graph) -> Result<usize> {
    let mut dead: HashSet<NodeId> = HashSet::new();
    let mut renames: Vec<(crate::ids::ValueId, String)> = Vec::new();
    for id in g.node_ids() {
        let node = g.node(id);
        let removable = match node.op_type.as_str() {
            "Identity" => node.is_onnx_domain(),
            "Dropout" => node.is_onnx_domain() && node.output(1).is_none_or(|m| g.use_count(m) == 0),
            _ => false,
        };
        let (Some(input), Some(output)) = (node.input(0), node.output(0)) else { continue };
        if !removable {
            continue;
        }
        if g.is_output(output) {
            let takes_name = matches!(g.value(input).source(), ValueSource::Node(_)) && !g.is_output(input);
            if !takes_name {
                continue;
            }
            renames.push((input, g.value(output).name.clone()));
        }
        g.replace_uses(output, input);
        dead.insert(id);
    }
    let removed = dead.len();
    if removed == 0 {
        return Ok(0);
    }
    let names: Vec<(String, String)> =
        renames.iter().map(|(v, n)| (g.value(*v).name.clone(), n.clone())).collect();
    g.remove_nodes(&dead)?;
    for (old, new) in names {
        if let Some(v) = g.value_id(&old) {
            g.rename_value(v, &new)?;
        }
    }
    Ok(removed)
}

/// Removes nodes none of whose results reach a graph output (directly or through other nodes).
/// Returns the number of nodes removed.
pub fn eliminate_dead_nodes(g: &mut Graph) -> Result<usize> {
    let mut live_value = vec![false; g.value_count()];
    for &o in g.outputs() {
        live_value[o.index()] = true;
    }
    let mut dead = HashSet::new();
    let ids: Vec<NodeId> = g.node_ids().collect();
    for &id in ids.iter().rev() {
        let node = g.node(id);
        if node.outputs().iter().flatten().any(|v| live_value[v.index()]) {
            for v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                live_value[v.index()] = true;
            }
        } else {
            dead.insert(id);
        }
    }
    let removed = dead.len();
    if removed > 0 {
        g.remove_nodes(&dead)?;
    }
    Ok(removed)
}

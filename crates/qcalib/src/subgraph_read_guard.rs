//! A guard the QDQ export adds for onnxruntime: its QDQ propagation (graph optimisation level 1
//! and up) moves a `DequantizeLinear` forward through `Reshape`, `Transpose`, `Squeeze`,
//! `Unsqueeze`, `Slice` and `MaxPool` by inserting Q/DQ pairs after them, and when such an output
//! is read by a subgraph (an `If`/`Loop`/`Scan` body reading it from outside) it indexes the
//! reader's explicit inputs with the implicit input's index and aborts
//! (`qdq_propagation.cc`, `InsertQDQPairs`). Propagation stops at a `QuantizeLinear`, so each such
//! output gets a Q/DQ pair of its own with the encoding being propagated: the values are already on
//! that grid (those ops only move or select them), so the pair changes nothing, and onnxruntime
//! finds nothing left to insert.

use std::collections::{HashMap, HashSet};

use onnx_protobuf::{GraphProto, NodeProto};

/// The ops onnxruntime propagates a `DequantizeLinear` through.
const PROPAGATING: [&str; 6] = ["Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "MaxPool"];

/// Adds the Q/DQ pairs that keep onnxruntime's DQ propagation from reaching a value a subgraph
/// reads. Returns how many were added.
pub(crate) fn guard_subgraph_reads(graph: &mut GraphProto) -> usize {
    let implicit: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| &n.attribute)
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
        .flat_map(qgraph::subgraph_free_names)
        .collect();
    if implicit.is_empty() {
        return 0;
    }
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in n.input.iter().filter(|s| !s.is_empty()) {
            readers.entry(input.as_str()).or_default().push(i);
        }
    }
    // (node whose output 0 is guarded, the DequantizeLinear whose encoding it takes)
    let mut guards: Vec<(usize, usize)> = Vec::new();
    let mut seen: HashSet<usize> = HashSet::new();
    for (d, dq) in graph.node.iter().enumerate().filter(|(_, n)| n.op_type == "DequantizeLinear") {
        let mut frontier: Vec<&str> = dq.output.iter().take(1).map(String::as_str).collect();
        while let Some(value) = frontier.pop() {
            for &r in readers.get(value).into_iter().flatten() {
                let reader = &graph.node[r];
                if !PROPAGATING.contains(&reader.op_type.as_str()) || !seen.insert(r) {
                    continue;
                }
                let Some(out) = reader.output.first() else { continue };
                if implicit.contains(out) {
                    guards.push((r, d));
                } else {
                    frontier.push(out);
                }
            }
        }
    }
    let taken: HashSet<String> = graph.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
    let mut after: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    for &(r, d) in &guards {
        let out = graph.node[r].output[0].clone();
        let mut raw = format!("{out}_before_guard");
        while taken.contains(&raw) {
            raw.push('_');
        }
        let dq = &graph.node[d];
        let params: Vec<String> = dq.input.iter().skip(1).cloned().collect();
        let pair = |op: &str, input: &str, output: &str| {
            let mut n = NodeProto::new();
            n.op_type = op.into();
            n.name = format!("{out}_guard_{}", if op == "QuantizeLinear" { "q" } else { "dq" });
            n.input = std::iter::once(input.to_string()).chain(params.iter().cloned()).collect();
            n.output = vec![output.to_string()];
            n.attribute = dq.attribute.clone();
            n.domain = dq.domain.clone();
            n
        };
        let quantized = format!("{raw}_quantized");
        let nodes =
            vec![pair("QuantizeLinear", &raw, &quantized), pair("DequantizeLinear", &quantized, &out)];
        after.insert(r, nodes);
        graph.node[r].output[0] = raw;
    }
    let nodes = std::mem::take(&mut graph.node);
    for (i, n) in nodes.into_iter().enumerate() {
        graph.node.push(n);
        graph.node.extend(after.remove(&i).into_iter().flatten());
    }
    guards.len()
}

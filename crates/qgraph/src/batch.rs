//! Whether a model treats the samples of a batch independently: then a batch can run as single
//! samples, and their outputs stacked along the first axis are the batch's outputs. An executor
//! uses this to keep one sample's intermediates in cache instead of streaming a whole batch's
//! through memory layer after layer.
//!
//! The check is conservative. The batch axis is the first axis of every graph input (declared
//! with a free size), and it must stay the first axis of every value computed from them, through
//! ops known to keep samples apart: elementwise ops (other operands without a batch axis of
//! their own), convolutions, pooling and inference normalisations, softmax and reductions off
//! the first axis, data movement that leaves the first axis alone, MatMul/Gemm with the batch on
//! the rows. Any other op reading a batched value (`Shape`, `Expand`, a reshape of the batch
//! axis, ...) makes the answer no.

use crate::graph::{Graph, Model, Node};
use crate::shape::DimBindings;

/// Unary ops (in the ONNX domain) that map each element, or each sample, on its own; inputs
/// after the first are parameters that must not carry the batch.
const PER_SAMPLE_UNARY: &[&str] = &[
    "Abs",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Conv",
    "ConvTranspose",
    "Cos",
    "DepthToSpace",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "GlobalAveragePool",
    "GlobalLpPool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LRN",
    "LeakyRelu",
    "Log",
    "LpPool",
    "MaxPool",
    "AveragePool",
    "Mish",
    "Neg",
    "Not",
    "Reciprocal",
    "Relu",
    "Round",
    "Selu",
    "Sigmoid",
    "Sign",
    "Sin",
    "Softplus",
    "Softsign",
    "SpaceToDepth",
    "Sqrt",
    "Tanh",
];

/// Elementwise ops with broadcasting.
const BROADCASTING: &[&str] = &[
    "Add",
    "And",
    "BitShift",
    "Div",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Or",
    "PRelu",
    "Pow",
    "Sub",
    "Sum",
    "Where",
    "Xor",
];

/// `Ok` when every sample of a batch can run alone with the same results, else why not (naming
/// the first node in the way).
pub fn samples_independent(model: &Model) -> Result<(), String> {
    let mut model = model.clone();
    model.infer_shapes(&DimBindings::default()).map_err(|e| format!("shape inference: {e}"))?;
    let g = &model.graph;
    let mut batched = vec![false; g.value_count()];
    for &v in g.inputs() {
        let value = g.value(v);
        match value.shape.as_ref().and_then(|s| s.0.first()) {
            Some(d) if d.known().is_none() => batched[v.index()] = true,
            _ => return Err(format!("input '{}' has no free first axis", value.name)),
        }
    }
    for id in g.topological_order().map_err(|e| e.to_string())? {
        let node = g.node(id);
        let reads: Vec<bool> = node.inputs().iter().map(|v| v.is_some_and(|v| batched[v.index()])).collect();
        let implicit = node.implicit_inputs().iter().any(|v| batched[v.index()]);
        if !reads.contains(&true) && !implicit {
            continue;
        }
        keeps_samples_apart(g, model.default_opset(), node, &reads)
            .map_err(|why| format!("{} node '{}' {why}", node.op_type, node.name))?;
        for v in node.outputs().iter().flatten() {
            batched[v.index()] = true;
        }
    }
    match g.outputs().iter().find(|v| !batched[v.index()]) {
        Some(&v) => Err(format!("output '{}' does not come from the inputs' samples", g.value(v).name)),
        None => Ok(()),
    }
}

/// Rank of input `slot`, when known.
fn rank(g: &Graph, node: &Node, slot: usize) -> Option<usize> {
    let v = node.input(slot)?;
    g.value(v).shape.as_ref().map(|s| s.rank())
}

/// Integer data of input `slot`, when static.
fn static_ints(g: &Graph, node: &Node, slot: usize) -> Option<Vec<i64>> {
    g.static_value(node.input(slot)?)?.to_i64_vec()
}

/// `axis` as a non-negative axis of a tensor of rank `rank`.
fn normalized(axis: i64, rank: usize) -> i64 {
    if axis < 0 { axis + rank as i64 } else { axis }
}

/// The axes a node works along: attribute `axes`, or static input `slot` (newer opsets).
fn axes(g: &Graph, node: &Node, slot: usize) -> Result<Option<Vec<i64>>, String> {
    if let Some(a) = node.ints_attr("axes").map_err(|e| e.to_string())? {
        return Ok(Some(a.to_vec()));
    }
    match node.input(slot) {
        None => Ok(None),
        Some(_) => static_ints(g, node, slot).map(Some).ok_or_else(|| "has computed axes".to_string()),
    }
}

fn int_attr(node: &Node, name: &str, default: i64) -> Result<i64, String> {
    node.int_attr(name, default).map_err(|e| e.to_string())
}

/// Whether `node` (in a model of default `opset`), reading batched values where `reads` says so, keeps the samples apart on the
/// first axis of its outputs.
fn keeps_samples_apart(g: &Graph, opset: i64, node: &Node, reads: &[bool]) -> Result<(), String> {
    if !node.is_onnx_domain() || !node.implicit_inputs().is_empty() {
        return Err("is not known to keep samples apart".into());
    }
    let only_first = || {
        if reads.iter().skip(1).any(|&b| b) {
            Err("reads the batch in a parameter".to_string())
        } else {
            Ok(())
        }
    };
    let axis_off_batch = |axis: i64| {
        let r = rank(g, node, 0).ok_or("has an input of unknown rank")?;
        if normalized(axis, r) == 0 { Err("works along the batch axis".to_string()) } else { Ok(()) }
    };
    let op = node.op_type.as_str();
    match op {
        _ if PER_SAMPLE_UNARY.contains(&op) => {
            if op == "BatchNormalization" && int_attr(node, "training_mode", 0)? != 0 {
                return Err("normalises over the batch (training mode)".into());
            }
            only_first()
        }
        "QuantizeLinear" | "DequantizeLinear" => {
            only_first()?;
            let per_tensor = node.input(1).and_then(|v| g.static_value(v)).is_some_and(|t| t.len() == 1);
            if per_tensor { Ok(()) } else { Err("quantizes per axis".into()) }
        }
        _ if BROADCASTING.contains(&op) => {
            let ranks: Vec<Option<usize>> = (0..reads.len()).map(|s| rank(g, node, s)).collect();
            let full =
                ranks.iter().zip(reads).filter(|(_, b)| **b).map(|(r, _)| *r).collect::<Option<Vec<_>>>();
            let full = full.ok_or("has an input of unknown rank")?;
            let r = full.iter().copied().max().unwrap_or(0);
            if full.iter().any(|&x| x != r) {
                return Err("broadcasts batched inputs of different ranks".into());
            }
            for (slot, _) in reads.iter().enumerate().filter(|(_, b)| !**b) {
                let Some(v) = node.input(slot) else { continue };
                let shape = g.value(v).shape.as_ref().ok_or("has an operand of unknown shape")?;
                if shape.rank() == r && shape.0.first().and_then(|d| d.known()) != Some(1) {
                    return Err("broadcasts an operand over the batch axis".into());
                }
            }
            Ok(())
        }
        "Softmax" | "LogSoftmax" | "Hardmax" => {
            only_first()?;
            axis_off_batch(int_attr(node, "axis", if opset >= 13 { -1 } else { 1 })?)
        }
        "LayerNormalization" => {
            only_first()?;
            axis_off_batch(int_attr(node, "axis", -1)?)
        }
        "ArgMax" | "ArgMin" | "Flatten" => {
            only_first()?;
            axis_off_batch(int_attr(node, "axis", if op == "Flatten" { 1 } else { 0 })?)
        }
        "Concat" | "Split" => {
            if op == "Concat" && reads.contains(&false) {
                return Err("joins batched and unbatched values".into());
            }
            if op == "Split" {
                only_first()?;
            }
            axis_off_batch(int_attr(node, "axis", 0)?)
        }
        _ if op.starts_with("Reduce") => {
            only_first()?;
            let noop = int_attr(node, "noop_with_empty_axes", 0)? != 0;
            match axes(g, node, 1)? {
                Some(a) if !a.is_empty() => a.into_iter().try_for_each(axis_off_batch),
                _ if noop => Ok(()),
                _ => Err("reduces every axis".into()),
            }
        }
        "Squeeze" => {
            only_first()?;
            let a = axes(g, node, 1)?.ok_or("squeezes every axis of size one")?;
            a.into_iter().try_for_each(axis_off_batch)
        }
        "Unsqueeze" => {
            only_first()?;
            let a = axes(g, node, 1)?.ok_or("has no axes")?;
            let out = rank(g, node, 0).ok_or("has an input of unknown rank")? + a.len();
            if a.iter().any(|&x| normalized(x, out) == 0) {
                Err("inserts an axis before the batch".into())
            } else {
                Ok(())
            }
        }
        "Transpose" => {
            only_first()?;
            match node.ints_attr("perm").map_err(|e| e.to_string())? {
                Some(p) if p.first() == Some(&0) => Ok(()),
                _ => Err("moves the batch axis".into()),
            }
        }
        "Reshape" => {
            only_first()?;
            if int_attr(node, "allowzero", 0)? != 0 {
                return Err("may reshape the batch axis".into());
            }
            let target = static_ints(g, node, 1).ok_or("has a computed shape")?;
            match target.first() {
                Some(0) => Ok(()),
                Some(-1) if target[1..].iter().all(|&d| d > 0) => {
                    let dims =
                        g.value(node.input(0).ok_or("has no data")?).shape.as_ref().map(|s| s.0.clone());
                    let per_sample: Option<usize> = dims.and_then(|d| {
                        d.get(1..)?.iter().try_fold(1usize, |acc, x| acc.checked_mul(x.known()?))
                    });
                    let rest = target[1..].iter().try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
                    if per_sample.is_some() && per_sample == rest {
                        Ok(())
                    } else {
                        Err("may reshape the batch axis".into())
                    }
                }
                _ => Err("may reshape the batch axis".into()),
            }
        }
        "Slice" => {
            only_first()?;
            let starts = static_ints(g, node, 1).ok_or("has computed bounds")?;
            let a = match axes(g, node, 3)? {
                Some(a) => a,
                None => (0..starts.len() as i64).collect(),
            };
            a.into_iter().try_for_each(axis_off_batch)
        }
        "Gather" => {
            let axis = int_attr(node, "axis", 0)?;
            match (reads.first(), reads.get(1)) {
                (Some(true), Some(false)) => axis_off_batch(axis),
                (Some(false), Some(true)) if axis == 0 => Ok(()),
                _ => Err("gathers across the batch".into()),
            }
        }
        "MatMul" => match (reads.first(), reads.get(1)) {
            (Some(true), Some(false)) if rank(g, node, 1) == Some(2) => Ok(()),
            (Some(true), Some(true))
                if rank(g, node, 0) == rank(g, node, 1) && rank(g, node, 0) > Some(2) =>
            {
                Ok(())
            }
            _ => Err("multiplies across the batch".into()),
        },
        "Gemm" => {
            only_first()?;
            let bias_rows = node.input(2).and_then(|v| g.value(v).shape.clone()).map(|s| s.0);
            let bias_ok = bias_rows.is_none_or(|d| d.len() < 2 || d[0].known() == Some(1));
            if int_attr(node, "transA", 0)? == 0 && bias_ok {
                Ok(())
            } else {
                Err("multiplies across the batch".into())
            }
        }
        "Pad" => {
            only_first()?;
            let pads = match node.ints_attr("pads").map_err(|e| e.to_string())? {
                Some(p) => p.to_vec(),
                None => static_ints(g, node, 1).ok_or("has computed pads")?,
            };
            let r = pads.len() / 2;
            if node.input(3).is_some() || pads.first() != Some(&0) || pads.get(r) != Some(&0) {
                Err("pads the batch axis".into())
            } else {
                Ok(())
            }
        }
        "Resize" => {
            only_first()?;
            let scales = static_floats(g, node, 2);
            match scales {
                Some(s) if s.first() == Some(&1.0) && node.input(3).is_none() => Ok(()),
                _ => Err("resizes by computed or batch-wide sizes".into()),
            }
        }
        _ => Err("is not known to keep samples apart".into()),
    }
}

/// Float data of input `slot`, when static.
fn static_floats(g: &Graph, node: &Node, slot: usize) -> Option<Vec<f64>> {
    Some(g.static_value(node.input(slot)?)?.to_f64_vec())
}

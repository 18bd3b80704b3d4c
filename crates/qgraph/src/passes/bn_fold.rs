//! Batch-norm folding (spec §8.2): a BatchNormalization after Conv/ConvTranspose/Gemm/MatMul is
//! folded backward into the layer's weight and bias; one before a Conv/Gemm is folded forward into
//! the consumer. BNs that stay are rewritten to the pure affine form (μ = 0, var = 1, ε = 0).

use std::collections::HashSet;

use ndarray::{ArrayD, Axis, IxDyn};

use crate::attr::Attribute;
use crate::error::Result;
use crate::graph::{Graph, Model};
use crate::ids::{NodeId, ValueId};
use crate::tensor::Tensor;

/// Which way a BN was folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnFoldDirection {
    /// Into the producer before it (`W' = W·s[out]`).
    Backward,
    /// Into the consumer after it (`W' = W·s[in]`).
    Forward,
}

/// One folded BatchNormalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BnFold {
    /// Name of the removed BN node.
    pub bn: String,
    /// Name of the layer it was folded into.
    pub layer: String,
    /// Direction.
    pub direction: BnFoldDirection,
}

/// `s = γ/sqrt(var+ε)` and the other per-channel BN terms.
struct BnTerms {
    scale: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
}

fn f32_vec(g: &Graph, v: Option<ValueId>) -> Option<Vec<f32>> {
    let t = g.static_value(v?)?.as_f32()?;
    Some(t.iter().copied().collect())
}

fn bn_terms(g: &Graph, bn: NodeId) -> Option<BnTerms> {
    let n = g.node(bn);
    if n.int_attr("training_mode", 0).ok()? != 0
        || n.outputs().iter().skip(1).flatten().any(|&v| g.use_count(v) > 0)
    {
        return None;
    }
    let eps = n.float_attr("epsilon", 1e-5).ok()?;
    let gamma = f32_vec(g, n.input(1))?;
    let beta = f32_vec(g, n.input(2))?;
    let mean = f32_vec(g, n.input(3))?;
    let var = f32_vec(g, n.input(4))?;
    let c = gamma.len();
    if beta.len() != c || mean.len() != c || var.len() != c {
        return None;
    }
    let scale = gamma.iter().zip(&var).map(|(&gm, &vr)| gm / (vr + eps).sqrt()).collect();
    Some(BnTerms { scale, beta, mean })
}

/// A static f32 weight read only by `node` (shared weights are never folded).
fn private_weight(g: &Graph, node: NodeId, slot: usize) -> Option<(ValueId, ArrayD<f32>)> {
    let v = g.node(node).input(slot)?;
    let t = g.static_value(v)?.as_f32()?;
    (g.use_count(v) == 1).then(|| (v, t.to_owned()))
}

/// The bias of `node` at `slot` as f32s (zeros when absent); `None` if present but not a private
/// static 1-D tensor of `c` elements.
fn private_bias(g: &Graph, node: NodeId, slot: usize, c: usize) -> Option<Vec<f32>> {
    match g.node(node).input(slot) {
        None => Some(vec![0.0; c]),
        Some(v) => {
            let b = f32_vec(g, Some(v))?;
            (g.use_count(v) == 1 && b.len() == c).then_some(b)
        }
    }
}

/// Multiplies `w` by `s[c]` along axis `axis`, where channel `c` of the layer output maps to the
/// weight's index on that axis.
fn scale_axis(w: &mut ArrayD<f32>, axis: usize, s: &[f32]) -> Option<()> {
    if w.shape().get(axis) != Some(&s.len()) {
        return None;
    }
    for (mut lane, &k) in w.axis_iter_mut(Axis(axis)).zip(s) {
        lane.mapv_inplace(|x| x * k);
    }
    Some(())
}

fn vector(v: Vec<f32>) -> Tensor {
    let n = v.len();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("1-D shape matches").into_shared())
}

/// Writes a new weight (slot 1) and bias (slot 2) into `node`.
fn install(g: &mut Graph, node: NodeId, w: ArrayD<f32>, b: Vec<f32>) {
    let name = g.node(node).name.clone();
    g.set_static_input(node, 1, &format!("{name}.weight"), Tensor::F32(w.into_shared()));
    g.set_static_input(node, 2, &format!("{name}.bias"), vector(b));
}

/// Backward fold into the producer `layer`; `None` when a rule forbids it.
fn fold_backward(g: &mut Graph, layer: NodeId, t: &BnTerms) -> Option<()> {
    let n = g.node(layer);
    let op = n.op_type.clone();
    let c = t.scale.len();
    let (_, mut w) = private_weight(g, layer, 1)?;
    let group = n.int_attr("group", 1).ok()?.max(1) as usize;
    match op.as_str() {
        "Conv" => scale_axis(&mut w, 0, &t.scale)?,
        "ConvTranspose" => {
            let cin = w.shape()[0];
            let depthwise = group > 1 && group == cin && w.shape()[1] == 1;
            if group > 1 && !depthwise {
                return None;
            }
            if depthwise { scale_axis(&mut w, 0, &t.scale)? } else { scale_axis(&mut w, 1, &t.scale)? }
        }
        "Gemm" => {
            if w.ndim() != 2 {
                return None;
            }
            let axis = if n.int_attr("transB", 0).ok()? != 0 { 0 } else { 1 };
            scale_axis(&mut w, axis, &t.scale)?;
        }
        "MatMul" => {
            let a_rank = g.value(n.input(0)?).shape.as_ref()?.rank();
            if w.ndim() != 2 || a_rank != 2 {
                return None;
            }
            scale_axis(&mut w, 1, &t.scale)?;
        }
        _ => return None,
    }
    let beta_coef = if op == "Gemm" { n.float_attr("beta", 1.0).ok()? } else { 1.0 };
    let bias = if op == "MatMul" { vec![0.0; c] } else { private_bias(g, layer, 2, c)? };
    let new_b: Vec<f32> =
        (0..c).map(|k| t.beta[k] - (t.mean[k] - beta_coef * bias[k]) * t.scale[k]).collect();
    if op == "MatMul" {
        let node = g.node_mut(layer);
        node.op_type = "Gemm".into();
        node.attrs.clear();
    }
    if op == "Gemm" {
        set_float_attr(g, layer, "beta", 1.0);
    }
    install(g, layer, w, new_b);
    Some(())
}

/// Forward fold of `bn` into its consumer `layer` (Conv without padding or groups, or Gemm).
fn fold_forward(g: &mut Graph, bn: NodeId, layer: NodeId, t: &BnTerms) -> Option<()> {
    let n = g.node(layer);
    let op = n.op_type.clone();
    let (_, mut w) = private_weight(g, layer, 1)?;
    // shift[i] = β[i] − μ[i]·s[i]: what BN adds per input channel after scaling.
    let shift: Vec<f32> = (0..t.scale.len()).map(|i| t.beta[i] - t.mean[i] * t.scale[i]).collect();
    let (in_axis, out_axis, alpha, beta_coef) = match op.as_str() {
        "Conv" => {
            let padded = n.ints_attr("pads").ok()?.is_some_and(|p| p.iter().any(|&v| v != 0));
            let auto = n.string_attr("auto_pad").ok()?.is_some_and(|a| a != "NOTSET" && a != "VALID");
            if n.int_attr("group", 1).ok()? != 1 || padded || auto {
                return None;
            }
            (1, 0, 1.0, 1.0)
        }
        "Gemm" => {
            if w.ndim() != 2 || n.int_attr("transA", 0).ok()? != 0 {
                return None;
            }
            let tb = n.int_attr("transB", 0).ok()? != 0;
            (
                if tb { 1 } else { 0 },
                if tb { 0 } else { 1 },
                n.float_attr("alpha", 1.0).ok()?,
                n.float_attr("beta", 1.0).ok()?,
            )
        }
        _ => return None,
    };
    let c_out = *w.shape().get(out_axis)?;
    let bias = private_bias(g, layer, 2, c_out)?;
    // b'[o] = beta·b[o] + alpha·Σ_{i,k} W[o,i,k]·shift[i], computed before scaling W.
    if w.shape().get(in_axis) != Some(&shift.len()) {
        return None;
    }
    let mut added = vec![0.0f32; c_out];
    for (o, lane) in w.axis_iter(Axis(out_axis)).enumerate() {
        let in_ax = if in_axis > out_axis { in_axis - 1 } else { in_axis };
        for (i, sub) in lane.axis_iter(Axis(in_ax)).enumerate() {
            added[o] += sub.sum() * shift[i];
        }
    }
    scale_axis(&mut w, in_axis, &t.scale)?;
    let new_b: Vec<f32> = (0..c_out).map(|o| beta_coef * bias[o] + alpha * added[o]).collect();
    if op == "Gemm" {
        set_float_attr(g, layer, "beta", 1.0);
    }
    install(g, layer, w, new_b);
    let bn_input = g.node(bn).input(0)?;
    g.set_input(layer, 0, Some(bn_input));
    Some(())
}

fn set_float_attr(g: &mut Graph, node: NodeId, name: &str, v: f32) {
    let attrs = &mut g.node_mut(node).attrs;
    match attrs.iter_mut().find(|(n, _)| n == name) {
        Some((_, a)) => *a = Attribute::Float(v),
        None => attrs.push((name.to_string(), Attribute::Float(v))),
    }
}

/// Folds every foldable BatchNormalization of the model (backward preferred, then forward), and
/// rewrites the remaining ones to their affine form. Returns the folds made.
pub fn fold_batch_norms(model: &mut Model) -> Result<Vec<BnFold>> {
    let g = &mut model.graph;
    let mut folds = Vec::new();
    let mut dead: HashSet<NodeId> = HashSet::new();
    let mut renames: Vec<(String, String)> = Vec::new();
    let bns: Vec<NodeId> = g.node_ids().filter(|&id| g.node(id).op_type == "BatchNormalization").collect();
    for bn in bns {
        let Some(terms) = bn_terms(g, bn) else { continue };
        let (Some(x), Some(y)) = (g.node(bn).input(0), g.node(bn).output(0)) else { continue };
        // Backward: the producer's output feeds only this BN.
        if let Some(p) = g.producer(x)
            && g.use_count(x) == 1
            && !dead.contains(&p.node)
            && fold_backward(g, p.node, &terms).is_some()
        {
            folds.push(BnFold {
                bn: g.node(bn).name.clone(),
                layer: g.node(p.node).name.clone(),
                direction: BnFoldDirection::Backward,
            });
            renames.push((g.value(x).name.clone(), g.value(y).name.clone()));
            g.replace_uses(y, x);
            dead.insert(bn);
            continue;
        }
        // Forward: the BN output feeds exactly one Conv/Gemm as its data input.
        let consumers = g.consumers(y).to_vec();
        if let [only] = consumers.as_slice()
            && only.slot == 0
            && g.use_count(y) == 1
            && fold_forward(g, bn, only.node, &terms).is_some()
        {
            folds.push(BnFold {
                bn: g.node(bn).name.clone(),
                layer: g.node(only.node).name.clone(),
                direction: BnFoldDirection::Forward,
            });
            dead.insert(bn);
            continue;
        }
        make_affine(g, bn, &terms);
    }
    if !dead.is_empty() {
        g.remove_nodes(&dead)?;
        for (old, new) in renames {
            if let Some(v) = g.value_id(&old) {
                g.rename_value(v, &new)?;
            }
        }
    }
    // Constant nodes whose tensors were replaced in place are now without outputs.
    crate::passes::eliminate_dead_nodes(g)?;
    Ok(folds)
}

/// Rewrites a BN that could not be folded to `γ' = s`, `β' = β − μ·s`, μ = 0, var = 1, ε = 0.
fn make_affine(g: &mut Graph, bn: NodeId, t: &BnTerms) {
    let c = t.scale.len();
    let beta: Vec<f32> = (0..c).map(|k| t.beta[k] - t.mean[k] * t.scale[k]).collect();
    let name = g.node(bn).name.clone();
    g.set_static_input(bn, 1, &format!("{name}.scale"), vector(t.scale.clone()));
    g.set_static_input(bn, 2, &format!("{name}.B"), vector(beta));
    g.set_static_input(bn, 3, &format!("{name}.mean"), vector(vec![0.0; c]));
    g.set_static_input(bn, 4, &format!("{name}.var"), vector(vec![1.0; c]));
    set_float_attr(g, bn, "epsilon", 0.0);
}

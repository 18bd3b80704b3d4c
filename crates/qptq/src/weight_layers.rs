//! The layers the weight techniques (AdaRound, sequential MSE) rewrite one after another in graph
//! order — Conv, Gemm and MatMul with an int-quantized float initializer weight read by that node
//! alone — and the activations they capture from a run over the calibration data.

use std::collections::HashSet;

use ndarray::ArrayD;
use qcalib::{Feeds, Granularity, LoadedEncoding, QuantSim};
use qexec::{RunOptions, Session, SessionOptions};
use qgraph::{Graph, Model, NodeId, Tensor, ValueId};
use qkernels::{Encoding, QuantSpec};

use crate::error::{PtqError, Result};
use crate::watch::Watch;

/// A layer whose weight a technique rewrites, with the weight's encodings.
pub(crate) struct WeightLayer {
    pub(crate) node: NodeId,
    pub(crate) weight: ValueId,
    pub(crate) encodings: Vec<Encoding>,
    /// Encoding index of each weight element.
    pub(crate) index: Vec<usize>,
    /// The quantizer's precision, symmetry and encodings, as frozen afterwards.
    pub(crate) loaded: LoadedEncoding,
    /// The quantizer's grid rule.
    pub(crate) spec: QuantSpec,
    /// The weight axis the encodings run along (per-channel), if any.
    pub(crate) channel_axis: Option<usize>,
}

impl WeightLayer {
    /// `w` fake-quantized with `encodings` (one per group of [`WeightLayer::index`]).
    pub(crate) fn fake_quant(&self, w: &[f32], encodings: &[Encoding]) -> Vec<f32> {
        let mut groups: Vec<Vec<f32>> = vec![Vec::new(); encodings.len()];
        for (&x, &g) in w.iter().zip(&self.index) {
            groups[g].push(x);
        }
        for (values, e) in groups.iter_mut().zip(encodings) {
            qkernels::fake_quant(values, e);
        }
        let mut next = vec![0usize; encodings.len()];
        self.index
            .iter()
            .map(|&g| {
                let v = groups[g][next[g]];
                next[g] += 1;
                v
            })
            .collect()
    }
}

/// The weighted layers of `g` whose weight quantizer in `sim` is an enabled integer one with
/// encodings, in graph order (only `wanted` ones when it is not empty); why others were left
/// alone goes to `skipped`.
pub(crate) fn weight_layers(
    g: &Graph,
    sim: &QuantSim,
    wanted: &[String],
    skipped: &mut Vec<String>,
) -> Result<Vec<WeightLayer>> {
    let wanted: HashSet<&str> = wanted.iter().map(String::as_str).collect();
    let placement = sim.placement();
    let mut out = Vec::new();
    for node_id in g.topological_order()? {
        let n = g.node(node_id);
        if !["Conv", "Gemm", "MatMul"].contains(&n.op_type.as_str()) || !n.is_onnx_domain() {
            continue;
        }
        if !wanted.is_empty() && !wanted.contains(n.name.as_str()) {
            continue;
        }
        let Some(w) = n.input(1) else { continue };
        let Some(q) = placement.quantizer_of(w) else { continue };
        let quantizer = placement.quantizer(q);
        if !quantizer.enabled || !quantizer.precision.is_int() {
            continue;
        }
        let Some(data) = g.static_value(w).and_then(|t| t.as_f32()) else {
            skipped.push(format!("{}: its weight is not a float initializer", n.name));
            continue;
        };
        if g.use_count(w) != 1 {
            skipped.push(format!("{}: its weight is shared with other nodes", n.name));
            continue;
        }
        let Some(encodings) = quantizer.encodings.clone() else { continue };
        let (index, groups) = qcalib::encoding_index(data.shape(), quantizer.granularity)
            .map_err(|e| PtqError::Data(format!("{}: {e}", n.name)))?;
        if groups != encodings.len() {
            skipped.push(format!("{}: {} encodings for {groups} groups", n.name, encodings.len()));
            continue;
        }
        let loaded = LoadedEncoding {
            precision: quantizer.precision,
            symmetric: quantizer.symmetric,
            encodings: encodings.clone(),
        };
        let channel_axis = match quantizer.granularity {
            Granularity::PerChannel { axis } => Some(axis),
            _ => None,
        };
        out.push(WeightLayer {
            node: node_id,
            weight: w,
            encodings,
            index,
            loaded,
            spec: quantizer.spec(),
            channel_axis,
        });
    }
    Ok(out)
}

/// The values of `v` over every batch, from runs of `model` cut down to the nodes `v` depends
/// on (a layer's input costs the part of the model above it).
pub(crate) fn capture(
    model: &Model,
    v: ValueId,
    batches: &[Feeds],
    threads: usize,
) -> Result<Vec<ArrayD<f32>>> {
    let name = model.graph.value(v).name.clone();
    let mut prefix = model.clone();
    prefix.graph.set_outputs(vec![v]);
    qgraph::passes::eliminate_dead_nodes(&mut prefix.graph)?;
    let v = prefix
        .graph
        .value_id(&name)
        .ok_or_else(|| PtqError::Data(format!("'{name}' is gone from the model cut at it")))?;
    let session =
        Session::new(prefix, SessionOptions { fuse_activations: false, ..SessionOptions::threads(threads) })?;
    let watched: HashSet<ValueId> = [v].into_iter().collect();
    let mut out = Vec::with_capacity(batches.len());
    for (i, feeds) in batches.iter().enumerate() {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let mut got = None;
        let mut hook = Watch::new(&watched, |_, _, a| {
            got = Some(a.to_owned());
            Ok(())
        });
        let opts = RunOptions { hook: Some(&mut hook), hook_inputs: true, ..RunOptions::default() };
        session.run_with(&named, opts).map_err(|e| PtqError::Data(format!("batch {i}: {e}")))?;
        out.push(got.ok_or_else(|| PtqError::Data(format!("batch {i} did not reach '{name}'")))?);
    }
    Ok(out)
}

/// The threads of a layer's products for a simulation's `threads` setting (0 = every core).
pub(crate) fn product_threads(threads: usize) -> usize {
    if threads == 0 { rayon::current_num_threads() } else { threads }
}

/// The static f32 bias of a Conv/Gemm layer.
pub(crate) fn static_bias(g: &Graph, node: NodeId) -> Option<Vec<f32>> {
    let n = g.node(node);
    if n.op_type == "MatMul" {
        return None;
    }
    let b = g.static_value(n.input(2)?)?.as_f32()?;
    Some(b.iter().copied().collect())
}

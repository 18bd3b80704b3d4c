//! The layers the weight techniques (AdaRound, sequential MSE) rewrite one after another in graph
//! order — Conv, ConvTranspose, Gemm and MatMul with an int-quantized float initializer weight
//! read by that node alone — and the activations they capture from a run over the calibration data.

use std::collections::HashSet;

use ndarray::ArrayD;
use qcalib::{Feeds, Granularity, LoadedEncoding, QuantSim};
use qexec::{Keep, RunOptions, Session, SessionOptions, ValueCache};
use qgraph::{Graph, Model, NodeId, Tensor, ValueId, ValueSource};
use qkernels::{Encoding, QuantSpec};

use crate::error::{PtqError, Result};

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
        if !["Conv", "ConvTranspose", "Gemm", "MatMul"].contains(&n.op_type.as_str()) || !n.is_onnx_domain() {
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
            channel_major_blocks: false,
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

/// A model's values over the calibration batches, computed piece by piece as the techniques ask
/// for them layer after layer: a request runs only the nodes its value needs that no earlier
/// request ran, from what the earlier ones kept — the values a node not run yet still reads. A
/// weight set with [`Capture::set_weight`] holds for the nodes that run afterwards, which is how
/// a layer's rewritten weight reaches the layers below it.
pub(crate) struct Capture {
    session: Session,
    caches: Vec<ValueCache>,
    ran: Vec<bool>,
    weights: Vec<(ValueId, Tensor)>,
}

impl Capture {
    /// Nothing computed yet; each batch's feeds in its cache.
    pub(crate) fn new(model: &Model, batches: &[Feeds], threads: usize) -> Result<Capture> {
        let options = SessionOptions { fuse_activations: false, ..SessionOptions::threads(threads) };
        // No graph outputs: a run hands back only the values asked for.
        let mut model = model.clone();
        model.graph.set_outputs(Vec::new());
        let session = Session::new(model, options)?;
        let g = &session.model().graph;
        let caches = batches
            .iter()
            .enumerate()
            .map(|(i, feeds)| {
                let mut cache = ValueCache::new();
                for (name, t) in feeds {
                    let v = g
                        .value_id(name)
                        .filter(|&v| g.inputs().contains(&v))
                        .ok_or_else(|| PtqError::Data(format!("batch {i}: '{name}' is not a graph input")))?;
                    cache.insert(v, t.clone());
                }
                Ok(cache)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Capture { ran: vec![false; g.node_count()], session, caches, weights: Vec::new() })
    }

    /// Uses `t` as weight `v` in the nodes that run from now on.
    pub(crate) fn set_weight(&mut self, v: ValueId, t: Tensor) {
        self.weights.retain(|(w, _)| *w != v);
        self.weights.push((v, t));
    }

    /// The values of `v` over every batch.
    pub(crate) fn values(&mut self, v: ValueId) -> Result<Vec<ArrayD<f32>>> {
        let g = &self.session.model().graph;
        let name = g.value(v).name.clone();
        // The nodes `v` needs that have not run.
        let mut run = Vec::new();
        let mut pending: Vec<ValueId> = vec![v];
        while let Some(u) = pending.pop() {
            let Some(outlet) = g.producer(u) else { continue };
            if std::mem::replace(&mut self.ran[outlet.node.index()], true) {
                continue;
            }
            run.push(outlet.node);
            let n = g.node(outlet.node);
            pending.extend(n.inputs().iter().flatten().chain(n.implicit_inputs()));
        }
        // What the nodes still to run read from the computed part, and `v`.
        let mut keep: Vec<ValueId> = g
            .nodes()
            .filter(|(id, _)| !self.ran[id.index()])
            .flat_map(|(_, n)| n.inputs().iter().flatten().chain(n.implicit_inputs()).copied())
            .filter(|&u| match g.producer(u) {
                Some(o) => self.ran[o.node.index()],
                None => g.value(u).source() == ValueSource::Input,
            })
            .chain([v])
            .collect();
        keep.sort_by_key(|u| u.index());
        keep.dedup();
        let mut out = Vec::with_capacity(self.caches.len());
        for (i, cache) in self.caches.iter_mut().enumerate() {
            for (w, t) in &self.weights {
                cache.insert(*w, t.clone());
            }
            let kept = if run.is_empty() {
                ValueCache::new()
            } else {
                let options = RunOptions { keep: Keep::Values(keep.clone()), ..RunOptions::default() };
                self.session
                    .run_nodes(cache, &run, options)
                    .map_err(|e| PtqError::Data(format!("batch {i}: {e}")))?
                    .kept
            };
            let mut next = ValueCache::new();
            for &u in &keep {
                if let Some(t) = kept.get(u).or_else(|| cache.get(u)) {
                    next.insert(u, t.clone());
                }
            }
            let t = next.get(v).ok_or_else(|| PtqError::Data(format!("batch {i} did not reach '{name}'")))?;
            out.push(
                t.as_f32()
                    .ok_or_else(|| PtqError::Data(format!("'{name}' is {}, not float", t.dtype())))?
                    .to_owned(),
            );
            *cache = next;
        }
        Ok(out)
    }
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

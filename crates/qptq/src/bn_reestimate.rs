//! Batch-norm re-estimation (AIMET's `reestimate_bn_stats`): the statistics a BatchNormalization
//! was trained with describe its input in float; under quantization the input's mean and variance
//! move. The model is simulated on the data, each BN's mean and variance are measured on its
//! simulated input (per channel, over the batch and spatial axes), written into the BN, and the
//! batch norms are then folded.

use std::collections::{HashMap, HashSet};

use qcalib::{Feeds, Granularity, QuantSim, Quantizer, QuantizerId, QuantsimConfig, SimOptions};
use qgraph::passes::{BnFoldDirection, fold_batch_norms};
use qgraph::{DimBindings, Graph, Model, NodeId, Tensor, ValueId};
use qkernels::Encoding;
use serde_json::{Value, json};

use crate::error::{PtqError, Result};
use crate::layers::{f32_data, vector};
use crate::watch::Watch;

/// One re-estimated batch norm.
#[derive(Debug, Clone, PartialEq)]
pub struct ReestimatedBn {
    /// Node name.
    pub bn: String,
    /// Largest change of a channel's mean.
    pub max_mean_change: f32,
    /// Largest ratio between a channel's new and old variance (or its inverse).
    pub max_var_ratio: f32,
}

/// What [`reestimate_batch_norms`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BnReestimationReport {
    /// The batch norms re-estimated.
    pub reestimated: Vec<ReestimatedBn>,
    /// Batch norms folded afterwards, `(bn, layer)`.
    pub folded: Vec<(String, String)>,
}

impl BnReestimationReport {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "reestimated": self.reestimated.iter().map(|r| json!({
                "bn": r.bn, "max_mean_change": r.max_mean_change, "max_var_ratio": r.max_var_ratio,
            })).collect::<Vec<_>>(),
            "folded": self.folded.iter().map(|(b, l)| json!({"bn": b, "layer": l})).collect::<Vec<_>>(),
        })
    }
}

/// Per-channel sums of a BN input: Σx, Σx², count.
#[derive(Default)]
struct Moments {
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    count: u64,
}

/// Adds a tensor's per-channel (axis 1) sums to `moments`.
fn add_moments(
    moments: &mut HashMap<ValueId, Moments>,
    name: &str,
    value: ValueId,
    a: ndarray::ArrayViewD<'_, f32>,
) -> std::result::Result<(), String> {
    if a.ndim() < 2 {
        return Ok(());
    }
    let channels = a.shape()[1];
    let m = moments.entry(value).or_default();
    if m.sum.is_empty() {
        m.sum = vec![0.0; channels];
        m.sum_sq = vec![0.0; channels];
    }
    if m.sum.len() != channels {
        return Err(format!("'{name}' changes its channel count between batches"));
    }
    for (c, lane) in a.axis_iter(ndarray::Axis(1)).enumerate() {
        for &x in lane.iter() {
            let x = f64::from(x);
            m.sum[c] += x;
            m.sum_sq[c] += x * x;
        }
    }
    m.count += (a.len() / channels.max(1)) as u64;
    Ok(())
}

/// The inference-mode BatchNormalizations of `g`, with their input.
fn inference_batch_norms(g: &Graph) -> Vec<(NodeId, ValueId)> {
    g.nodes()
        .filter(|(_, n)| {
            n.op_type == "BatchNormalization" && n.int_attr("training_mode", 0).is_ok_and(|t| t == 0)
        })
        .filter_map(|(id, n)| Some((id, n.input(0)?)))
        .collect()
}

/// Re-estimates every inference-mode BatchNormalization of `model` on the simulation `config`
/// and `options` describe, run on `batches`, then folds the batch norms.
pub fn reestimate_batch_norms(
    model: &mut Model,
    config: &QuantsimConfig,
    options: SimOptions,
    batches: &[Feeds],
) -> Result<BnReestimationReport> {
    let mut report = BnReestimationReport::default();
    if batches.is_empty() {
        return Err(PtqError::Data("BN re-estimation needs calibration data".into()));
    }
    model.infer_shapes(&DimBindings::default())?;
    if !inference_batch_norms(&model.graph).is_empty() {
        let mut sim = QuantSim::new(model.clone(), config.clone(), options)?;
        sim.calibrate(batches.iter().cloned(), &mut |_| {})?;
        report.reestimated = measure_into(&sim, &mut model.graph, batches)?;
    }
    report.folded = fold_batch_norms(model)?.into_iter().map(|f| (f.bn, f.layer)).collect();
    model.infer_shapes(&DimBindings::default())?;
    Ok(report)
}

/// Runs `sim` on `batches`, measures each inference-mode BatchNormalization's input per channel
/// and writes the mean and variance into the BN of `g` (`sim`'s graph or a copy of it).
fn measure_into(sim: &QuantSim, g: &mut Graph, batches: &[Feeds]) -> Result<Vec<ReestimatedBn>> {
    let bns = inference_batch_norms(g);
    let watched: HashSet<ValueId> = bns.iter().map(|&(_, x)| x).collect();
    let mut moments: HashMap<ValueId, Moments> = HashMap::new();
    for (i, feeds) in batches.iter().enumerate() {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let mut hook = Watch::new(&watched, |name, v, a| add_moments(&mut moments, name, v, a));
        sim.run_observed(&named, &mut hook).map_err(|e| PtqError::Data(format!("batch {i}: {e}")))?;
    }
    let mut reestimated = Vec::new();
    for (bn, x) in bns {
        let Some(m) = moments.get(&x).filter(|m| m.count > 0) else { continue };
        let n = g.node(bn);
        let (Some(mean_v), Some(var_v)) = (n.input(3), n.input(4)) else { continue };
        let (Some(old_mean), Some(old_var)) = (f32_data(g, mean_v), f32_data(g, var_v)) else { continue };
        if old_mean.len() != m.sum.len() || g.use_count(mean_v) != 1 || g.use_count(var_v) != 1 {
            continue;
        }
        let count = m.count as f64;
        let eps = f64::from(n.float_attr("epsilon", 1e-5).unwrap_or(1e-5));
        let mean: Vec<f32> = m.sum.iter().map(|s| (s / count) as f32).collect();
        // A channel that never varied keeps its variance when ε cannot keep the division finite.
        let var: Vec<f32> = m
            .sum
            .iter()
            .zip(&m.sum_sq)
            .zip(old_var.iter())
            .map(|((s, q), &old)| {
                let v = ((q / count) - (s / count).powi(2)).max(0.0);
                if v + eps > 0.0 { v as f32 } else { old }
            })
            .collect();
        let max_mean_change = mean.iter().zip(old_mean.iter()).fold(0.0f32, |a, (n, o)| a.max((n - o).abs()));
        let max_var_ratio = var
            .iter()
            .zip(old_var.iter())
            .fold(1.0f32, |a, (&n, &o)| if n > 0.0 && o > 0.0 { a.max(n / o).max(o / n) } else { a });
        let name = n.name.clone();
        g.make_initializer(mean_v, vector(mean));
        g.make_initializer(var_v, vector(var));
        reestimated.push(ReestimatedBn { bn: name, max_mean_change, max_var_ratio });
    }
    Ok(reestimated)
}

/// BN re-estimation on a simulation that has trained (AIMET's `reestimate_bn_stats`, then
/// `fold_all_batch_norms_to_scale`): each inference-mode BatchNormalization's statistics are
/// measured on its input as `sim` computes it on `batches`, the batch norms are folded into
/// their layers, and `sim` is rebuilt on the folded model with every quantizer as it was —
/// activation encodings (learned or calibrated) kept, and a folded layer's per-channel symmetric
/// weight encodings scaled by the BN's per-channel factor, so each weight keeps its integer.
/// Weight encodings that cannot follow that way (per-tensor or blocked weights, a BN folded into
/// the layer after it) and the folded layers' biases are calibrated again.
pub fn fold_batch_norms_of_simulation(sim: &mut QuantSim, batches: &[Feeds]) -> Result<BnReestimationReport> {
    let mut report = BnReestimationReport::default();
    if inference_batch_norms(&sim.model().graph).is_empty() {
        return Ok(report);
    }
    if batches.is_empty() {
        return Err(PtqError::Data("BN re-estimation needs calibration data".into()));
    }
    let mut model = sim.model().clone();
    report.reestimated = measure_into(sim, &mut model.graph, batches)?;
    let factors: HashMap<String, Vec<f64>> = inference_batch_norms(&model.graph)
        .into_iter()
        .filter_map(|(bn, _)| Some((model.graph.node(bn).name.clone(), bn_factor(&model.graph, bn)?)))
        .collect();
    let folds = fold_batch_norms(&mut model)?;
    model.infer_shapes(&DimBindings::default())?;
    let scaled_layers: HashMap<&str, &Vec<f64>> = folds
        .iter()
        .filter(|f| f.direction == BnFoldDirection::Backward)
        .filter_map(|f| Some((f.layer.as_str(), factors.get(&f.bn)?)))
        .collect();
    let folded_layers: HashSet<&str> = folds.iter().map(|f| f.layer.as_str()).collect();
    let mut rebuilt = QuantSim::new(model, sim.config().clone(), *sim.options())?;
    let old_graph = &sim.model().graph;
    let g = &rebuilt.model().graph;
    let mut carried: Vec<(QuantizerId, Quantizer)> = Vec::new();
    for t in rebuilt.placement().tensors() {
        let (old_value, param_of) = match g.static_value(t.value) {
            // A parameter is matched by the layer that reads it and the slot it fills (folding
            // renames a layer's weight).
            Some(_) => {
                let Some(read) = g.consumers(t.value).first() else { continue };
                let node = g.node(read.node);
                let old = old_graph.node_id(&node.name).and_then(|n| old_graph.node(n).input(read.slot));
                (old, Some((node.name.as_str(), read.slot)))
            }
            None => (old_graph.value_id(&g.value(t.value).name), None),
        };
        let Some(old_q) = old_value.and_then(|v| sim.placement().quantizer_of(v)) else { continue };
        let mut q = sim.placement().quantizer(old_q).clone();
        if let Some((layer, slot)) = param_of.filter(|(l, _)| folded_layers.contains(l)) {
            // The weight's grid follows the BN's factor; the folded bias is calibrated again.
            q.encodings = scaled_layers.get(layer).filter(|_| slot == 1).and_then(|k| scaled_to(&q, k));
            // Encodings learned for the unfolded weight no longer fit it.
            q.learned = None;
        }
        carried.push((t.quantizer, q));
    }
    let kept_frozen: Vec<(QuantizerId, bool)> = carried.iter().map(|(id, q)| (*id, q.frozen)).collect();
    let placement = rebuilt.placement_mut();
    for (id, mut q) in carried {
        q.frozen = q.encodings.is_some();
        *placement.quantizer_mut(id) = q;
    }
    rebuilt.calibrate(batches.iter().cloned(), &mut |_| {})?;
    let placement = rebuilt.placement_mut();
    for (id, frozen) in kept_frozen {
        placement.quantizer_mut(id).frozen = frozen;
    }
    rebuilt.refresh()?;
    report.folded = folds.into_iter().map(|f| (f.bn, f.layer)).collect();
    *sim = rebuilt;
    Ok(report)
}

/// A BN's per-channel factor `γ/√(var+ε)`.
fn bn_factor(g: &Graph, bn: NodeId) -> Option<Vec<f64>> {
    let n = g.node(bn);
    let gamma = f32_data(g, n.input(1)?)?;
    let var = f32_data(g, n.input(4)?)?;
    let eps = f64::from(n.float_attr("epsilon", 1e-5).ok()?);
    (gamma.len() == var.len()).then(|| {
        gamma.iter().zip(var.iter()).map(|(&c, &v)| f64::from(c) / (f64::from(v) + eps).sqrt()).collect()
    })
}

/// `q`'s encodings for its weight scaled per output channel by `k`: symmetric per-channel grids
/// (axis 0) whose step follows `|k|`, so every weight keeps its integer; `None` otherwise.
fn scaled_to(q: &Quantizer, k: &[f64]) -> Option<Vec<Encoding>> {
    let encodings = q.encodings.as_ref()?;
    let per_output_channel = matches!(q.granularity, Granularity::PerChannel { axis: 0 });
    if !q.symmetric || !per_output_channel || encodings.len() != k.len() {
        return None;
    }
    encodings
        .iter()
        .zip(k)
        .map(|(e, &k)| {
            let scale = e.delta * k.abs();
            (scale > 0.0 && scale.is_finite())
                .then(|| Encoding::from_scale_offset(scale, e.offset, e.bitwidth, e.steps))
        })
        .collect()
}

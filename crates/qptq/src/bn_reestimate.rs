//! Batch-norm re-estimation (AIMET's `reestimate_bn_stats`): the statistics a BatchNormalization
//! was trained with describe its input in float; under quantization the input's mean and variance
//! move. The model is simulated on the data, each BN's mean and variance are measured on its
//! simulated input (per channel, over the batch and spatial axes), written into the BN, and the
//! batch norms are then folded.

use std::collections::{HashMap, HashSet};

use qcalib::{Feeds, QuantSim, QuantsimConfig, SimOptions};
use qgraph::passes::fold_batch_norms;
use qgraph::{DimBindings, Model, Tensor, ValueId};
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
    let g = &model.graph;
    let bns: Vec<_> = g
        .nodes()
        .filter(|(_, n)| {
            n.op_type == "BatchNormalization" && n.int_attr("training_mode", 0).is_ok_and(|t| t == 0)
        })
        .filter_map(|(id, n)| Some((id, n.input(0)?)))
        .collect();
    if !bns.is_empty() {
        let mut sim = QuantSim::new(model.clone(), config.clone(), options)?;
        sim.calibrate(batches.iter().cloned(), &mut |_| {})?;
        let watched: HashSet<ValueId> = bns.iter().map(|&(_, x)| x).collect();
        let mut moments: HashMap<ValueId, Moments> = HashMap::new();
        for (i, feeds) in batches.iter().enumerate() {
            let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let mut hook = Watch::new(&watched, |name, v, a| add_moments(&mut moments, name, v, a));
            sim.run_observed(&named, &mut hook).map_err(|e| PtqError::Data(format!("batch {i}: {e}")))?;
        }
        let g = &mut model.graph;
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
            let max_mean_change =
                mean.iter().zip(old_mean.iter()).fold(0.0f32, |a, (n, o)| a.max((n - o).abs()));
            let max_var_ratio = var
                .iter()
                .zip(old_var.iter())
                .fold(1.0f32, |a, (&n, &o)| if n > 0.0 && o > 0.0 { a.max(n / o).max(o / n) } else { a });
            let name = n.name.clone();
            g.make_initializer(mean_v, vector(mean));
            g.make_initializer(var_v, vector(var));
            report.reestimated.push(ReestimatedBn { bn: name, max_mean_change, max_var_ratio });
        }
    }
    report.folded = fold_batch_norms(model)?.into_iter().map(|f| (f.bn, f.layer)).collect();
    model.infer_shapes(&DimBindings::default())?;
    Ok(report)
}

//! Bias correction (Nagel et al. 2019, §4.2): quantizing a layer's weight `W` to `Q(W)` shifts
//! the expected value of its output by `(W − Q(W))·E[x]`; adding that shift to the layer's bias
//! removes it. `E[x]` comes from the calibration data (empirical: the batch mean of the layer's
//! float input, pushed through the layer with weight `W − Q(W)`, exact at padded borders too), or
//! from the batch-norm statistics of the layer feeding it (analytical: the mean of a ReLU or clip
//! of `N(β, γ²)`), as AIMET computes it. Each layer is corrected for its own weight error, all
//! from one float pass over the data (as NNCF's fast bias correction).

use std::collections::{HashMap, HashSet};

use ndarray::{ArrayD, Axis};
use qcalib::{Feeds, QuantSim, QuantsimConfig, SimOptions};
use qexec::{Keep, RunOptions, Session, SessionOptions};
use qgraph::{Attribute, DimBindings, Graph, Model, NodeId, NodeSpec, Tensor, ValueId};
use serde_json::{Value, json};

use crate::error::{PtqError, Result};
use crate::layers::{Layer, bias_of, f32_data, layer, vector};
use crate::watch::Watch;

/// Where a layer's expected input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasCorrectionKind {
    /// From the calibration data (every layer).
    Empirical,
    /// From the batch-norm statistics of the layer before (Conv→BN→ReLU/Clip→layer), the data
    /// for the layers without them.
    Analytical,
}

/// One corrected layer.
#[derive(Debug, Clone, PartialEq)]
pub struct CorrectedLayer {
    /// Node name.
    pub layer: String,
    /// `empirical` or `analytical`.
    pub method: &'static str,
    /// Largest magnitude of the shift added to the bias.
    pub max_shift: f32,
    /// Mean magnitude of the shift.
    pub mean_shift: f32,
}

/// What [`correct_bias`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BiasCorrectionReport {
    /// Layers whose bias changed.
    pub corrected: Vec<CorrectedLayer>,
    /// Layers with a quantized weight left alone, with the reason.
    pub skipped: Vec<String>,
}

impl BiasCorrectionReport {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "corrected": self.corrected.iter().map(|c| json!({
                "layer": c.layer, "method": c.method, "max_shift": c.max_shift, "mean_shift": c.mean_shift,
            })).collect::<Vec<_>>(),
            "skipped": self.skipped,
        })
    }
}

/// Sums of a value over the batch axis, and the number of samples summed.
struct BatchSum {
    sum: Option<ArrayD<f64>>,
    samples: usize,
}

/// Adds a tensor's sum over its batch axis to `sums`.
fn add_batch_sum(
    sums: &mut HashMap<ValueId, BatchSum>,
    name: &str,
    value: ValueId,
    a: ndarray::ArrayViewD<'_, f32>,
) -> std::result::Result<(), String> {
    if a.ndim() == 0 {
        return Ok(());
    }
    let n = a.shape()[0];
    let s = a.mapv(f64::from).sum_axis(Axis(0));
    let entry = sums.entry(value).or_insert(BatchSum { sum: None, samples: 0 });
    match &mut entry.sum {
        Some(acc) if acc.shape() == s.shape() => *acc += &s,
        Some(_) => return Err(format!("'{name}' changes shape between batches")),
        None => entry.sum = Some(s),
    }
    entry.samples += n;
    Ok(())
}

/// Corrects the biases of `model`'s quantized layers (see the module doc) for the weight
/// quantization `config` and `options` describe; `batches` are the calibration data.
pub fn correct_bias(
    model: &mut Model,
    config: &QuantsimConfig,
    options: SimOptions,
    batches: &[Feeds],
    kind: BiasCorrectionKind,
) -> Result<BiasCorrectionReport> {
    let mut report = BiasCorrectionReport::default();
    model.infer_shapes(&DimBindings::default())?;
    let mut sim = QuantSim::new(model.clone(), config.clone(), options)?;
    let quantized = sim.weight_quantized_model()?;
    let g = &model.graph;
    let order = g.topological_order()?;
    let mut todo: Vec<(Layer, ArrayD<f32>)> = Vec::new();
    for &node in &order {
        let Some(l) = layer(g, node) else { continue };
        let (Some(w), Some(q)) = (f32_data(g, l.weight), f32_data(&quantized.graph, l.weight)) else {
            continue;
        };
        if w == q {
            continue;
        }
        if l.bias_slot.is_none() {
            report.skipped.push(format!(
                "{}: a {} has no bias to correct",
                g.node(node).name,
                g.node(node).op_type
            ));
            continue;
        }
        todo.push((l, &w - &q));
    }
    // Analytical expectations where the input is a BN's (folded or not) through ReLU/Clip.
    let mut expected: HashMap<NodeId, Vec<f32>> = HashMap::new();
    if kind == BiasCorrectionKind::Analytical {
        for (l, _) in &todo {
            if let Some(e) = analytical_input_mean(g, l) {
                expected.insert(l.node, e);
            }
        }
    }
    let need_data: Vec<&Layer> =
        todo.iter().map(|(l, _)| l).filter(|l| !expected.contains_key(&l.node)).collect();
    let mut sums: HashMap<ValueId, BatchSum> = HashMap::new();
    if !need_data.is_empty() {
        if batches.is_empty() {
            return Err(PtqError::Data("bias correction needs calibration data".into()));
        }
        let watched: HashSet<ValueId> = need_data.iter().filter_map(|l| g.node(l.node).input(0)).collect();
        let session = Session::new(
            model.clone(),
            SessionOptions { fuse_activations: false, ..SessionOptions::threads(options.threads) },
        )?;
        for (i, feeds) in batches.iter().enumerate() {
            let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let mut hook = Watch::new(&watched, |name, v, a| add_batch_sum(&mut sums, name, v, a));
            let opts = RunOptions { hook: Some(&mut hook), hook_inputs: true, ..RunOptions::default() };
            session.run_with(&named, opts).map_err(|e| PtqError::Data(format!("batch {i}: {e}")))?;
        }
    }
    let opset = model.default_opset();
    let mut updates: Vec<(Layer, Vec<f32>, &'static str)> = Vec::new();
    for (l, delta) in &todo {
        let n = g.node(l.node);
        let (shift, method) = if let Some(e) = expected.get(&l.node) {
            (shift_from_channel_means(l, delta, e), "analytical")
        } else {
            let Some(x) = n.input(0) else { continue };
            let Some(BatchSum { sum: Some(sum), samples }) = sums.get(&x) else {
                report.skipped.push(format!("{}: its input was not reached by the data", n.name));
                continue;
            };
            let mean = sum.mapv(|s| (s / *samples as f64) as f32).insert_axis(Axis(0));
            (shift_through_layer(g, opset, l, delta, mean, options.threads)?, "empirical")
        };
        updates.push((l.clone(), shift, method));
    }
    let g = &mut model.graph;
    for (l, shift, method) in updates {
        let mut b = bias_of(g, &l);
        for (x, s) in b.iter_mut().zip(&shift) {
            *x += s;
        }
        let name = g.node(l.node).name.clone();
        g.set_static_input(
            l.node,
            l.bias_slot.expect("layers without bias were skipped"),
            &format!("{name}.bias"),
            vector(b),
        );
        let max_shift = shift.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        let mean_shift = shift.iter().map(|x| x.abs()).sum::<f32>() / shift.len().max(1) as f32;
        report.corrected.push(CorrectedLayer { layer: name, method, max_shift, mean_shift });
    }
    model.infer_shapes(&DimBindings::default())?;
    Ok(report)
}

/// `Σ_{c,k} ΔW[o, c, k]·E[x_c]` for each output channel (spatially uniform input).
fn shift_from_channel_means(l: &Layer, delta: &ArrayD<f32>, mean: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; l.out_channels];
    if l.depthwise {
        for (c, lane) in delta.axis_iter(Axis(0)).enumerate() {
            out[c] = lane.sum() * mean[c];
        }
        return out;
    }
    let in_axis = if l.in_axis > l.out_axis { l.in_axis - 1 } else { l.in_axis };
    for (o, lane) in delta.axis_iter(Axis(l.out_axis)).enumerate() {
        for (c, sub) in lane.axis_iter(Axis(in_axis)).enumerate() {
            out[o] += sub.sum() * mean[c];
        }
    }
    out
}

/// The layer's op with weight `delta` and no bias run on `mean` (one sample), averaged over
/// every axis but the output channels'.
fn shift_through_layer(
    g: &Graph,
    opset: i64,
    l: &Layer,
    delta: &ArrayD<f32>,
    mean: ArrayD<f32>,
    threads: usize,
) -> Result<Vec<f32>> {
    let n = g.node(l.node);
    let mut one = Graph::new("bias_shift");
    let x = one.add_input("x", qgraph::DType::F32, qgraph::Shape::known(mean.shape()));
    let w = one.add_initializer("w", Tensor::F32(delta.clone().into_shared()));
    let attrs: Vec<(String, Attribute)> = n.attrs.clone();
    let id = one.add_node(NodeSpec {
        name: "layer".into(),
        op_type: n.op_type.clone(),
        domain: String::new(),
        attrs,
        inputs: vec![Some(x), Some(w)],
        outputs: vec!["y".into()],
    });
    let y = one.node(id).output(0).expect("the node was given an output");
    one.add_output(y);
    let session = Session::new(Model::new(one, opset), SessionOptions::threads(threads))?;
    let out = session
        .run_with(&[("x", Tensor::F32(mean.into_shared()))], RunOptions::default().keep(Keep::Outputs))?;
    let y =
        out.outputs[0].as_f32().ok_or_else(|| PtqError::Data(format!("{}: not a float output", n.name)))?;
    let axis = l.output_channel_axis.unwrap_or(1);
    if axis >= y.ndim() || y.shape()[axis] != l.out_channels {
        return Err(PtqError::Data(format!(
            "{}: output {:?} has no {} channels on axis {axis}",
            n.name,
            y.shape(),
            l.out_channels
        )));
    }
    Ok(y.axis_iter(Axis(axis)).map(|lane| lane.mean().unwrap_or(0.0)).collect())
}

/// The expected value of each input channel of `l` when its input is
/// `act(BatchNormalization(…))` with `act` ReLU, Clip or nothing: the mean of `act(N(β, γ²))`.
fn analytical_input_mean(g: &Graph, l: &Layer) -> Option<Vec<f32>> {
    let mut v = g.node(l.node).input(0)?;
    let mut bounds: (f32, f32) = (f32::NEG_INFINITY, f32::INFINITY);
    let producer = g.producer_node(v)?;
    match producer.op_type.as_str() {
        "Relu" => {
            bounds.0 = 0.0;
            v = producer.input(0)?;
        }
        "Clip" => {
            let read = |slot: usize, attr: &str, default: f32| -> Option<f32> {
                match producer.input(slot) {
                    Some(b) => g.static_value(b)?.as_f32()?.iter().next().copied(),
                    None => producer.float_attr(attr, default).ok(),
                }
            };
            bounds = (read(1, "min", f32::NEG_INFINITY)?, read(2, "max", f32::INFINITY)?);
            v = producer.input(0)?;
        }
        _ => {}
    }
    let bn = g.producer_node(v)?;
    if bn.op_type != "BatchNormalization" {
        return None;
    }
    let gamma = f32_data(g, bn.input(1)?)?;
    let beta = f32_data(g, bn.input(2)?)?;
    let mean: Vec<f32> = gamma
        .iter()
        .zip(beta.iter())
        .map(|(&gm, &bt)| clipped_normal_mean(f64::from(bt), f64::from(gm.abs()), bounds) as f32)
        .collect();
    (mean.len() == l.in_channels).then_some(mean)
}

/// `E[clip(z, lo, hi)]` for `z ~ N(mu, sigma²)`.
fn clipped_normal_mean(mu: f64, sigma: f64, (lo, hi): (f32, f32)) -> f64 {
    let (lo, hi) = (f64::from(lo), f64::from(hi));
    if sigma == 0.0 {
        return mu.clamp(lo, hi);
    }
    let pdf = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let cdf = |t: f64| 0.5 * erfc(-t / std::f64::consts::SQRT_2);
    let (a, b) = ((lo - mu) / sigma, (hi - mu) / sigma);
    let (pa, pb) = if lo.is_finite() { (pdf(a), cdf(a)) } else { (0.0, 0.0) };
    let (qa, qb) = if hi.is_finite() { (pdf(b), cdf(b)) } else { (0.0, 1.0) };
    // Inside: μ·(Φ(b) − Φ(a)) + σ·(φ(a) − φ(b)); below: lo·Φ(a); above: hi·(1 − Φ(b)).
    let inside = mu * (qb - pb) + sigma * (pa - qa);
    let below = if lo.is_finite() { lo * pb } else { 0.0 };
    let above = if hi.is_finite() { hi * (1.0 - qb) } else { 0.0 };
    inside + below + above
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, |error| < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_of_a_normal_has_the_closed_form_mean() {
        // E[relu(N(μ, σ²))] = μ·Φ(μ/σ) + σ·φ(μ/σ).
        let m = clipped_normal_mean(0.0, 1.0, (0.0, f32::INFINITY));
        assert!((m - 1.0 / (2.0 * std::f64::consts::PI).sqrt()).abs() < 1e-6, "{m}");
        let unclipped = clipped_normal_mean(0.7, 2.0, (f32::NEG_INFINITY, f32::INFINITY));
        assert!((unclipped - 0.7).abs() < 1e-6);
        let tight = clipped_normal_mean(10.0, 1.0, (0.0, 6.0));
        assert!((tight - 6.0).abs() < 1e-4, "{tight}");
    }

    #[test]
    fn erfc_matches_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        assert!((erfc(1.0) - 0.157_299_207).abs() < 2e-7);
        assert!((erfc(-1.0) - 1.842_700_793).abs() < 2e-7);
    }
}

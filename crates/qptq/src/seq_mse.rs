//! Sequential MSE (AIMET 2.42's `apply_seq_mse`): layer by layer in graph order, each weight's
//! encodings are chosen from `num_candidates` shrunken ranges — candidate `k` spans `k/K` of the
//! min-max encoding's range — by the squared error of the layer's output against its output with
//! float weights, both on the input the simulation gives it (earlier layers already chosen,
//! activations in float); the errors come from the Gram matrix of the layer's input (the bias
//! cancels), so a candidate costs no pass over the data. Each output channel picks its best
//! candidate; a per-channel quantizer takes each channel's, a per-tensor one is rebuilt from all
//! channels' picks (so it spans the widest of them), as AIMET does. The chosen encodings are frozen; weights are not changed.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::ArrayD;
use qcalib::{Feeds, LoadedEncoding, QuantSim, QuantsimConfig, SimOptions};
use qgrad::Linear;
use qgraph::{DimBindings, Model, Tensor};
use qkernels::Encoding;
use serde_json::{Value, json};

use crate::error::{PtqError, Result};
use crate::weight_layers::{Capture, WeightLayer, product_threads, weight_layers};

/// Sequential MSE's settings (AIMET 2.42's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct SeqMseOptions {
    /// Candidate ranges per weight.
    pub candidates: usize,
    /// Only these layers (node names); all supported ones when empty.
    pub nodes: Vec<String>,
}

impl Default for SeqMseOptions {
    fn default() -> SeqMseOptions {
        SeqMseOptions { candidates: 20, nodes: Vec::new() }
    }
}

/// One searched layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchedLayer {
    /// Node name.
    pub layer: String,
    /// Weight name.
    pub weight: String,
    /// The smallest and largest candidate picked by a channel (1..=candidates).
    pub picked: (usize, usize),
    /// Encodings whose range is narrower than the min-max one.
    pub shrunk: usize,
    /// Squared error of the output with the min-max encodings.
    pub error_min_max: f64,
    /// The same with the chosen encodings.
    pub error_chosen: f64,
    /// Wall time of the layer.
    pub seconds: f64,
}

/// What [`seq_mse`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqMseReport {
    /// Layers searched, in graph order.
    pub layers: Vec<SearchedLayer>,
    /// Quantized layers left alone, with the reason.
    pub skipped: Vec<String>,
}

impl SeqMseReport {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "layers": self.layers.iter().map(|l| json!({
                "layer": l.layer, "weight": l.weight, "picked": [l.picked.0, l.picked.1], "shrunk": l.shrunk,
                "error_min_max": l.error_min_max, "error_chosen": l.error_chosen, "seconds": l.seconds,
            })).collect::<Vec<_>>(),
            "skipped": self.skipped,
        })
    }
}

/// The chosen encodings (to load frozen) and the report.
pub struct SeqMsed {
    /// The chosen weight encodings, by weight name.
    pub encodings: HashMap<String, LoadedEncoding>,
    /// What was done.
    pub report: SeqMseReport,
}

/// Chooses the weight encodings of `model`'s quantized Conv, ConvTranspose, Gemm and MatMul layers (see the
/// module doc) on calibration `batches`. `progress(done, total)` counts layers.
pub fn seq_mse(
    model: &Model,
    config: &QuantsimConfig,
    options: SimOptions,
    batches: &[Feeds],
    settings: &SeqMseOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SeqMsed> {
    if batches.is_empty() {
        return Err(PtqError::Data("sequential MSE needs calibration data".into()));
    }
    if settings.candidates == 0 {
        return Err(PtqError::Data("sequential MSE needs at least one candidate".into()));
    }
    let mut model = model.clone();
    model.infer_shapes(&DimBindings::default())?;
    let mut sim = QuantSim::new(model.clone(), config.clone(), options)?;
    let mut captured = Capture::new(&sim.weight_quantized_model()?, batches, options.threads)?;
    let mut report = SeqMseReport::default();
    let layers = weight_layers(&model.graph, &sim, &settings.nodes, &mut report.skipped)?;
    let mut encodings = HashMap::new();
    let g = &model.graph;
    for (i, l) in layers.iter().enumerate() {
        progress(i as u64, layers.len() as u64);
        let started = Instant::now();
        let node = g.node(l.node);
        let Some(x) = node.input(0) else { continue };
        let Some(w) = g.static_value(l.weight).and_then(|t| t.as_f32()).map(|a| a.to_owned()) else {
            continue;
        };
        let inputs = captured.values(x)?;
        let Some(chosen) = search_layer(
            l,
            node,
            &w,
            &inputs,
            settings.candidates,
            product_threads(options.threads),
            &mut report,
        )?
        else {
            continue;
        };
        let weight_name = g.value(l.weight).name.clone();
        let flat: Vec<f32> = w.iter().copied().collect();
        let quantized = Tensor::from_vec(w.shape(), l.fake_quant(&flat, &chosen.encodings))
            .ok_or_else(|| PtqError::Data(format!("{}: weight shape and data disagree", node.name)))?;
        captured.set_weight(l.weight, quantized);
        encodings
            .insert(weight_name.clone(), LoadedEncoding { encodings: chosen.encodings, ..l.loaded.clone() });
        report.layers.push(SearchedLayer {
            layer: node.name.clone(),
            weight: weight_name,
            picked: chosen.picked,
            shrunk: chosen.shrunk,
            error_min_max: chosen.error_min_max,
            error_chosen: chosen.error_chosen,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    progress(layers.len() as u64, layers.len() as u64);
    Ok(SeqMsed { encodings, report })
}

struct Chosen {
    encodings: Vec<Encoding>,
    picked: (usize, usize),
    shrunk: usize,
    error_min_max: f64,
    error_chosen: f64,
}

/// The encodings of candidate `k` of `K`: each encoding's range scaled by `k/K`.
fn candidate(l: &WeightLayer, k: usize, of: usize) -> Result<Vec<Encoding>> {
    let f = k as f64 / of as f64;
    l.encodings
        .iter()
        .map(|e| {
            Encoding::from_range(e.min * f, e.max * f, l.spec).map_err(|e| PtqError::Data(e.to_string()))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn search_layer(
    l: &WeightLayer,
    node: &qgraph::Node,
    w: &ArrayD<f32>,
    inputs: &[ArrayD<f32>],
    candidates: usize,
    threads: usize,
    report: &mut SeqMseReport,
) -> Result<Option<Chosen>> {
    let x_shape = inputs.first().map(|x| x.shape().to_vec()).unwrap_or_default();
    let layer = match Linear::from_node(node, &x_shape, w.shape()) {
        Ok(layer) => layer.with_threads(threads),
        Err(e) => {
            report.skipped.push(e.to_string());
            return Ok(None);
        }
    };
    let c = layer.out_channels();
    let out_axis = match (node.op_type.as_str(), node.int_attr("transB", 0)?) {
        ("Conv", _) | ("Gemm", 1) => 0,
        // ConvTranspose `[C_in, C_out/group, k…]`, MatMul and Gemm `[in, out]`.
        _ => 1,
    };
    let per_channel = l.encodings.len() > 1;
    if per_channel && (l.channel_axis != Some(out_axis) || l.encodings.len() != c) {
        report.skipped.push(format!("{}: its encodings do not run along the output channels", node.name));
        return Ok(None);
    }
    let flat: Vec<f32> = w.iter().copied().collect();
    // The products take the weight as rows (a ConvTranspose's reordered).
    let rows = layer.weight_rows(&flat);
    let mut gram = layer.gram();
    for x in inputs {
        layer.add_to_gram(&layer.columns(x.view())?, &mut gram)?;
    }
    let channel_errors = |encodings: &[Encoding]| -> Result<Vec<f64>> {
        Ok(layer.output_distances(&gram, &layer.weight_rows(&l.fake_quant(&flat, encodings)), &rows)?)
    };
    let mut best = vec![(f64::INFINITY, candidates); c];
    for k in 1..=candidates {
        let err = channel_errors(&candidate(l, k, candidates)?)?;
        for (b, e) in best.iter_mut().zip(err) {
            if e < b.0 {
                *b = (e, k);
            }
        }
    }
    let f = |k: usize| k as f64 / candidates as f64;
    let encodings: Vec<Encoding> = if per_channel {
        l.encodings
            .iter()
            .zip(&best)
            .map(|(e, &(_, k))| Encoding::from_range(e.min * f(k), e.max * f(k), l.spec))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| PtqError::Data(e.to_string()))?
    } else {
        let e = l.encodings[0];
        let lo = best.iter().map(|&(_, k)| e.min * f(k)).fold(f64::INFINITY, f64::min);
        let hi = best.iter().map(|&(_, k)| e.max * f(k)).fold(f64::NEG_INFINITY, f64::max);
        vec![Encoding::from_range(lo, hi, l.spec).map_err(|e| PtqError::Data(e.to_string()))?]
    };
    let shrunk = encodings.iter().zip(&l.encodings).filter(|(a, b)| a.max - a.min < b.max - b.min).count();
    let picked = best.iter().fold((candidates, 1), |(lo, hi), &(_, k)| (lo.min(k), hi.max(k)));
    let error_min_max = channel_errors(&l.encodings)?.iter().sum();
    let error_chosen = channel_errors(&encodings)?.iter().sum();
    Ok(Some(Chosen { encodings, picked, shrunk, error_min_max, error_chosen }))
}

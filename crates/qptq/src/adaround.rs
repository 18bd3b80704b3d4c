//! AdaRound (Nagel et al. 2020), as AIMET 2.42's `apply_adaround` runs it: layer by layer in
//! graph order, each weight's rounding (up or down from the floor on its min-max grid) is
//! learned by minimising the reconstruction error of the layer's output — after the activation
//! that follows it — against the FP32 model's, with the layer's input taken from the simulation
//! with the earlier layers already rounded and activation quantizers off. A rectified sigmoid
//! `h(V)` makes the rounding soft; a regulariser annealed from β 20 to 2 (cosine, after a 20 %
//! warm start) drives every `h` to 0 or 1; Adam at AIMET's settings. Iteration `i` uses
//! calibration batch `i mod batches` (at most 32 samples; larger batches are split). The rounded
//! weights replace the float ones and their encodings are frozen, so calibration keeps them.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::ArrayD;
use qcalib::{Feeds, LoadedEncoding, QuantSim, QuantsimConfig, SimOptions};
use qgrad::{Activation, Adam, Columns, Linear};
use qgraph::{DimBindings, Graph, Model, NodeId, Tensor};
use qkernels::{Encoding, fastmath};
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::error::{PtqError, Result};
use crate::weight_layers::{Capture, WeightLayer, product_threads, static_bias, weight_layers};

/// The rectified sigmoid's stretch: `h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)`.
const ZETA: f32 = 1.1;
const GAMMA: f32 = -0.1;
/// AIMET's cap on the samples of one iteration.
const MAX_SAMPLES_PER_ITERATION: usize = 32;
/// The prepared inputs and targets of one layer may use this much memory.
const MAX_LAYER_BYTES: usize = 6 << 30;

/// AdaRound's settings (AIMET 2.42's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaroundOptions {
    /// Optimisation steps per layer (AIMET: 10,000; 15,000 recommended below 8 bits).
    pub iterations: usize,
    /// Weight of the rounding regulariser.
    pub reg_param: f32,
    /// β at the end of the warm start and at the last iteration.
    pub beta_range: (f32, f32),
    /// Fraction of the iterations without the regulariser.
    pub warm_start: f32,
    /// Adam's learning rate.
    pub learning_rate: f32,
    /// Only these layers (node names); all supported ones when empty.
    pub nodes: Vec<String>,
}

impl Default for AdaroundOptions {
    fn default() -> AdaroundOptions {
        AdaroundOptions {
            iterations: 10_000,
            reg_param: 0.01,
            beta_range: (20.0, 2.0),
            warm_start: 0.2,
            learning_rate: 1e-3,
            nodes: Vec::new(),
        }
    }
}

/// One rounded layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundedLayer {
    /// Node name.
    pub layer: String,
    /// Weight name.
    pub weight: String,
    /// The activation the loss was taken after, if any.
    pub activation: Option<String>,
    /// Reconstruction loss (mean over the batches) with nearest rounding.
    pub loss_nearest: f64,
    /// The same with the learned rounding.
    pub loss_adaround: f64,
    /// Weights rounded the other way than nearest.
    pub flipped: usize,
    /// Weights in the layer.
    pub weights: usize,
    /// Wall time of the layer.
    pub seconds: f64,
}

/// What [`adaround`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdaroundReport {
    /// Layers rounded, in graph order.
    pub layers: Vec<RoundedLayer>,
    /// Quantized layers left alone, with the reason.
    pub skipped: Vec<String>,
}

impl AdaroundReport {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "layers": self.layers.iter().map(|l| json!({
                "layer": l.layer, "weight": l.weight, "activation": l.activation,
                "loss_nearest": l.loss_nearest, "loss_adaround": l.loss_adaround,
                "flipped": l.flipped, "weights": l.weights, "seconds": l.seconds,
            })).collect::<Vec<_>>(),
            "skipped": self.skipped,
        })
    }
}

/// The result: the model with rounded weights, and their encodings to load frozen.
pub struct Adarounded {
    /// The model, each rounded weight holding its values on the grid.
    pub model: Model,
    /// The rounded weights' encodings, by weight name (load with `freeze`).
    pub encodings: HashMap<String, LoadedEncoding>,
    /// What was done.
    pub report: AdaroundReport,
}

/// Rounds the weights of `model`'s quantized Conv, ConvTranspose, Gemm and MatMul layers (see the module doc)
/// for the weight quantization `config` and `options` describe, on calibration `batches`.
/// `progress(done, total)` counts iterations over all layers.
pub fn adaround(
    model: &Model,
    config: &QuantsimConfig,
    options: SimOptions,
    batches: &[Feeds],
    settings: &AdaroundOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Adarounded> {
    if batches.is_empty() {
        return Err(PtqError::Data("AdaRound needs calibration data".into()));
    }
    let mut model = model.clone();
    model.infer_shapes(&DimBindings::default())?;
    // The targets come from the FP32 model; `model` takes the rounded weights as they are learned.
    let mut targets_of = Capture::new(&model, batches, options.threads)?;
    let mut sim = QuantSim::new(model.clone(), config.clone(), options)?;
    // Weights fake-quantized with their min-max encodings, activations in float.
    let mut inputs_of = Capture::new(&sim.weight_quantized_model()?, batches, options.threads)?;
    let mut report = AdaroundReport::default();
    let targets = weight_layers(&model.graph, &sim, &settings.nodes, &mut report.skipped)?;
    let total = (targets.len() * settings.iterations) as u64;
    let mut encodings = HashMap::new();
    for (i, t) in targets.iter().enumerate() {
        let started = Instant::now();
        let g = &model.graph;
        let node = g.node(t.node);
        let (x, y) = (node.input(0), node.output(0));
        let (Some(x), Some(y)) = (x, y) else { continue };
        let w_data = g.static_value(t.weight).and_then(|w| w.as_f32()).map(|w| w.to_owned());
        let Some(w) = w_data else { continue };
        let inputs = inputs_of.values(x)?;
        let x_shape = inputs.first().map(|x| x.shape().to_vec()).unwrap_or_default();
        let layer = match Linear::from_node(node, &x_shape, w.shape()) {
            Ok(layer) => layer.with_threads(product_threads(options.threads)),
            Err(e) => {
                // A layer without a gradient rule keeps nearest rounding, as AIMET skips the
                // ops it does not support.
                report.skipped.push(e.to_string());
                continue;
            }
        };
        let outputs = targets_of.values(y)?;
        let bias = static_bias(g, t.node);
        let activation = following_activation(g, t.node)?;
        let flat: Vec<f32> = w.iter().copied().collect();
        let rounded = round_layer(
            &layer,
            g,
            t,
            &layer.weight_rows(&flat),
            &layer.weight_rows(&t.index),
            bias.as_deref(),
            activation.as_ref(),
            &inputs,
            &outputs,
            settings,
            &mut |it| progress((i * settings.iterations + it) as u64, total),
        )?;
        let name = node.name.clone();
        let weight_name = g.value(t.weight).name.clone();
        let tensor = Tensor::from_vec(w.shape(), layer.weight_from_rows(&rounded.weights))
            .ok_or_else(|| PtqError::Data(format!("{name}: weight shape and data disagree")))?;
        model.graph.value_mut(t.weight).data = Some(tensor.clone());
        inputs_of.set_weight(t.weight, tensor);
        encodings.insert(weight_name.clone(), t.loaded.clone());
        report.layers.push(RoundedLayer {
            layer: name,
            weight: weight_name,
            activation: activation.as_ref().map(|(op, _)| op.clone()),
            loss_nearest: rounded.loss_nearest,
            loss_adaround: rounded.loss_adaround,
            flipped: rounded.flipped,
            weights: w.len(),
            seconds: started.elapsed().as_secs_f64(),
        });
        progress(((i + 1) * settings.iterations) as u64, total);
    }
    Ok(Adarounded { model, encodings, report })
}

/// The activation that alone reads `node`'s output, if any (the loss is taken after it).
fn following_activation(g: &Graph, node: NodeId) -> Result<Option<(String, Activation)>> {
    let n = g.node(node);
    let Some(y) = n.output(0) else { return Ok(None) };
    let consumers = g.consumer_nodes(y);
    if consumers.len() != 1 || g.is_output(y) {
        return Ok(None);
    }
    let next = g.node(consumers[0]);
    let rank = g.value(y).shape.as_ref().map_or(2, |s| s.rank());
    let channel_axis = if n.op_type.starts_with("Conv") { 1 } else { rank.saturating_sub(1) };
    Ok(Activation::from_node(g, next, channel_axis, rank)?.map(|a| (next.op_type.clone(), a)))
}

/// One layer's learned rounding.
struct Rounded {
    weights: Vec<f32>,
    loss_nearest: f64,
    loss_adaround: f64,
    flipped: usize,
}

/// Inputs (prepared) and targets (after the activation, channel-major) of one iteration's batch.
struct Piece {
    cols: Columns,
    target: Vec<f32>,
}

/// Splits the batches into pieces of at most 32 samples and prepares them.
fn pieces(
    layer: &Linear,
    op: &str,
    activation: Option<&Activation>,
    inputs: &[ArrayD<f32>],
    outputs: &[ArrayD<f32>],
) -> Result<Vec<Piece>> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for (x, y) in inputs.iter().zip(outputs) {
        let n = x.shape().first().copied().unwrap_or(1).max(1);
        if y.shape().first() != x.shape().first() {
            return Err(PtqError::Data(format!(
                "{op}: input {:?} and output {:?} differ in samples",
                x.shape(),
                y.shape()
            )));
        }
        let mut start = 0;
        while start < n {
            let end = (start + MAX_SAMPLES_PER_ITERATION).min(n);
            let take = |a: &ArrayD<f32>| {
                if a.ndim() == 0 {
                    a.clone()
                } else {
                    a.slice_axis(ndarray::Axis(0), (start..end).into()).to_owned()
                }
            };
            let cols = layer.columns(take(x).view())?;
            let mut target = layer.to_channel_major(take(y).view())?;
            if let Some(act) = activation {
                let pre = target.clone();
                act.forward(&pre, &mut target, cols.width());
            }
            bytes =
                bytes.saturating_add(cols.width().saturating_mul(layer.out_channels() + 1).saturating_mul(4));
            if bytes > MAX_LAYER_BYTES {
                return Err(PtqError::Data(format!(
                    "{op}: the calibration data's inputs and targets of this layer pass {} GiB; use fewer calibration samples",
                    MAX_LAYER_BYTES >> 30
                )));
            }
            out.push(Piece { cols, target });
            start = end;
        }
    }
    Ok(out)
}

/// Weight elements processed per parallel task of the per-weight passes.
const WEIGHT_CHUNK: usize = 1 << 14;

/// The per-weight state of one layer's rounding: each weight is `Δ·(clamp(floor + h(V) − o, 0,
/// N) + o)` with `h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)`.
struct SoftRounding {
    floor: Vec<f32>,
    delta: Vec<f32>,
    offset: Vec<f32>,
    steps: Vec<f32>,
    v: Vec<f32>,
    h: Vec<f32>,
    /// `dh/dV` where `h` is not clamped, else 0.
    slope: Vec<f32>,
    /// 1 where the grid index is not clamped (the weight's gradient passes), else 0.
    pass: Vec<f32>,
}

impl SoftRounding {
    fn new(w: &[f32], encodings: &[Encoding], index: &[usize]) -> SoftRounding {
        let grid = |i: usize| &encodings[index[i]];
        let delta: Vec<f32> = (0..w.len()).map(|i| grid(i).delta as f32).collect();
        let offset: Vec<f32> = (0..w.len()).map(|i| grid(i).offset as f32).collect();
        let steps: Vec<f32> = (0..w.len()).map(|i| grid(i).steps as f32).collect();
        let floor: Vec<f32> = w.iter().zip(&delta).map(|(&x, &d)| (x / d).floor()).collect();
        // V so that h(V) is the fractional part: soft rounding starts at the float weight.
        let v = w
            .iter()
            .zip(&delta)
            .zip(&floor)
            .map(|((&x, &d), &f)| {
                let rest = x / d - f;
                -((ZETA - GAMMA) / (rest - GAMMA) - 1.0).ln()
            })
            .collect();
        let len = w.len();
        SoftRounding {
            floor,
            delta,
            offset,
            steps,
            v,
            h: vec![0.0; len],
            slope: vec![0.0; len],
            pass: vec![0.0; len],
        }
    }

    /// The weights of a fixed rounding (`up[i]` 0 or 1).
    fn weights_of(&self, up: &[f32]) -> Vec<f32> {
        (0..up.len())
            .map(|i| {
                self.delta[i]
                    * ((self.floor[i] + up[i] - self.offset[i]).clamp(0.0, self.steps[i]) + self.offset[i])
            })
            .collect()
    }

    /// Nearest rounding.
    fn nearest(&self, w: &[f32]) -> Vec<f32> {
        w.iter()
            .zip(&self.delta)
            .zip(&self.floor)
            .map(|((&x, &d), &f)| if x / d - f >= 0.5 { 1.0 } else { 0.0 })
            .collect()
    }

    /// The learned rounding: up where `V ≥ 0`.
    fn hard(&self) -> Vec<f32> {
        self.v.iter().map(|&x| if x >= 0.0 { 1.0 } else { 0.0 }).collect()
    }

    /// Computes `h`, its slope and the soft weights into `w_soft`.
    fn soft_weights(&mut self, w_soft: &mut [f32]) {
        let SoftRounding { floor, delta, offset, steps, v, h, slope, pass } = self;
        let chunks = w_soft
            .par_chunks_mut(WEIGHT_CHUNK)
            .zip(h.par_chunks_mut(WEIGHT_CHUNK))
            .zip(slope.par_chunks_mut(WEIGHT_CHUNK))
            .zip(pass.par_chunks_mut(WEIGHT_CHUNK))
            .enumerate();
        chunks.for_each(|(c, (((out, h), slope), pass))| {
            let r = c * WEIGHT_CHUNK..c * WEIGHT_CHUNK + out.len();
            let grid = Grid {
                floor: &floor[r.clone()],
                delta: &delta[r.clone()],
                offset: &offset[r.clone()],
                steps: &steps[r.clone()],
            };
            soft_chunk(&v[r], &grid, h, slope, pass, out);
        });
    }

    /// `∂loss/∂V` into `dv` from the soft weights' gradient `dw`, plus the regulariser
    /// `λ·Σ(1 − |2h − 1|^β)` when `beta` is given.
    fn grad(&self, dw: &[f32], beta: Option<f32>, reg: f32, dv: &mut [f32]) {
        let SoftRounding { delta, h, slope, pass, .. } = self;
        dv.par_chunks_mut(WEIGHT_CHUNK).enumerate().for_each(|(c, dv)| {
            let r = c * WEIGHT_CHUNK..c * WEIGHT_CHUNK + dv.len();
            let parts = GradParts {
                dw: &dw[r.clone()],
                delta: &delta[r.clone()],
                pass: &pass[r.clone()],
                h: &h[r.clone()],
                slope: &slope[r],
            };
            grad_chunk(&parts, beta.unwrap_or(0.0), if beta.is_some() { reg } else { 0.0 }, dv);
        });
    }
}

/// The grid of a run of weights.
struct Grid<'a> {
    floor: &'a [f32],
    delta: &'a [f32],
    offset: &'a [f32],
    steps: &'a [f32],
}

/// What the gradient by `V` of a run of weights reads.
struct GradParts<'a> {
    dw: &'a [f32],
    delta: &'a [f32],
    pass: &'a [f32],
    h: &'a [f32],
    slope: &'a [f32],
}

qkernels::multiversion! {
    /// `h(V)`, its slope, whether the index is inside the grid, and the soft weights, for a run.
    fn soft_chunk(v: &[f32], grid: &Grid<'_>, h: &mut [f32], slope: &mut [f32], pass: &mut [f32], out: &mut [f32]) {
        let n = out.len();
        let (v, floor, delta, offset, steps) = (&v[..n], &grid.floor[..n], &grid.delta[..n], &grid.offset[..n], &grid.steps[..n]);
        let (h, slope, pass) = (&mut h[..n], &mut slope[..n], &mut pass[..n]);
        for i in 0..n {
            let sig = 1.0 / (1.0 + fastmath::exp(-v[i]));
            let raw = sig * (ZETA - GAMMA) + GAMMA;
            let hv = if raw > 0.0 { if raw < 1.0 { raw } else { 1.0 } } else { 0.0 };
            let q = floor[i] + hv - offset[i];
            h[i] = hv;
            slope[i] = if raw > 0.0 && raw < 1.0 { sig * (1.0 - sig) * (ZETA - GAMMA) } else { 0.0 };
            pass[i] = if q > 0.0 && q < steps[i] { 1.0 } else { 0.0 };
            let qc = if q > 0.0 { if q < steps[i] { q } else { steps[i] } } else { 0.0 };
            out[i] = delta[i] * (qc + offset[i]);
        }
    }
}

qkernels::multiversion! {
    /// `∂loss/∂V` of a run: the weight gradient through the grid, plus (when `reg` is not 0) the
    /// regulariser's `−λ·β·|u|^(β−1)·sign(u)·2` (u = 2h − 1), both through `dh/dV`.
    fn grad_chunk(parts: &GradParts<'_>, beta: f32, reg: f32, dv: &mut [f32]) {
        let n = dv.len();
        let (dw, delta, pass, h, slope) = (&parts.dw[..n], &parts.delta[..n], &parts.pass[..n], &parts.h[..n], &parts.slope[..n]);
        for i in 0..n {
            let u = 2.0 * h[i] - 1.0;
            let pow = fastmath::exp((beta - 1.0) * fastmath::ln(u.abs()));
            let sign = if u < 0.0 { -1.0 } else { 1.0 };
            let regulariser = if reg != 0.0 { reg * beta * pow * sign * 2.0 } else { 0.0 };
            let g = dw[i] * delta[i] * pass[i] - regulariser;
            dv[i] = g * slope[i];
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn round_layer(
    layer: &Linear,
    g: &Graph,
    t: &WeightLayer,
    w: &[f32],
    index: &[usize],
    bias: Option<&[f32]>,
    activation: Option<&(String, Activation)>,
    inputs: &[ArrayD<f32>],
    outputs: &[ArrayD<f32>],
    settings: &AdaroundOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Rounded> {
    let op = g.node(t.node).name.as_str();
    let act = activation.map(|(_, a)| a);
    if let Some(a) = act {
        a.check(op, layer.out_channels())?;
    }
    let pieces = pieces(layer, op, act, inputs, outputs)?;
    let mut rounding = SoftRounding::new(w, &t.encodings, index);
    let nearest = rounding.nearest(w);
    let len = w.len();
    let (mut w_soft, mut dw, mut dv) = (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
    let mean_loss = |wq: &[f32]| -> Result<f64> {
        let mut sum = 0.0;
        for p in &pieces {
            sum += layer.reconstruction(wq, bias, act, &p.cols, &p.target, None)?;
        }
        Ok(sum / pieces.len().max(1) as f64)
    };
    let loss_nearest = mean_loss(&rounding.weights_of(&nearest))?;
    let mut adam = Adam::new(len, settings.learning_rate);
    let iterations = settings.iterations;
    let warm_end = settings.warm_start * iterations as f32;
    let (beta_start, beta_end) = settings.beta_range;
    for it in 0..iterations {
        let piece = &pieces[it % pieces.len().max(1)];
        rounding.soft_weights(&mut w_soft);
        layer.reconstruction(&w_soft, bias, act, &piece.cols, &piece.target, Some(&mut dw))?;
        let beta = ((it as f32) >= warm_end).then(|| {
            let rel = (it as f32 - warm_end) / (iterations as f32 - warm_end);
            beta_end + 0.5 * (beta_start - beta_end) * (1.0 + (rel * std::f32::consts::PI).cos())
        });
        rounding.grad(&dw, beta, settings.reg_param, &mut dv);
        adam.step(&mut rounding.v, &dv);
        if it % 100 == 99 {
            progress(it + 1);
        }
    }
    let hard = rounding.hard();
    let weights = rounding.weights_of(&hard);
    let loss_adaround = mean_loss(&weights)?;
    let flipped = hard.iter().zip(&nearest).filter(|(a, b)| a != b).count();
    Ok(Rounded { weights, loss_nearest, loss_adaround, flipped })
}

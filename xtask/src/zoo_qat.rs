//! Quantization-aware training on the zoo: the whole-graph gradient of a loss on
//! mobilenetv1_025_128 against finite differences at sampled weights of every kind of layer, and
//! label-free W8A8 per-channel QAT of mobilenetv2_keras on the 100 calibration images — the
//! distillation loss falls, top-1 on the 400 evaluation images after the last epoch against PTQ,
//! the training time and peak RSS, and the QDQ export of the trained model in onnxruntime.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use qcalib::{DefaultPrecision, Feeds, Precision, QuantSim, QuantsimConfig, SimOptions};
use qexec::{Keep, RunOptions, Session, SessionOptions};
use qgraph::{Model, Tensor};

use crate::bench::peak_rss_mib;
use crate::zoo_calib::{BATCH, qdq_top1_in_onnxruntime, split, top1};
use crate::zoo_data::{self, CLASSIFIERS};

pub fn check(zoo: &Path) -> Result<()> {
    println!("quantization-aware training:");
    let labels = zoo_data::labels(zoo)?.to_vec();
    let mut failures = Vec::new();
    gradient_check(zoo, &mut failures)?;
    qat_mobilenetv2(zoo, &labels, &mut failures)?;
    if !failures.is_empty() {
        bail!("QAT checks failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// `Σ r·logits` of two images; the gradient by sampled elements of a standard convolution, a
/// depthwise one, the classifier and their biases, against central differences in f64.
fn gradient_check(zoo: &Path, failures: &mut Vec<String>) -> Result<()> {
    let c = CLASSIFIERS.iter().find(|c| c.name == "mobilenetv1_025_128").context("classifier")?;
    let model = qgraph::load_path(zoo.join(format!("models/{}.onnx", c.name)))?;
    let images = zoo_data::raw_images(zoo, c.images)?;
    let input = model.graph.value(model.graph.inputs()[0]).name.clone();
    let x = c.batch(&images, &[0, 5]);
    let feeds = [(input.as_str(), x)];
    let session = Session::new(model.clone(), SessionOptions::threads(0))?;
    let run = session.run_with(&feeds, RunOptions::default().keep(Keep::All))?;
    let out = run.outputs[0].as_f32().context("f32 logits")?;
    let r: Vec<f32> = qgrad::check::sample_values(out.len(), 11);
    let seed = ArrayD::from_shape_vec(IxDyn(out.shape()), r.clone())?;
    let g = &model.graph;
    // The first standard Conv, the first depthwise Conv, the last Conv (the classifier).
    let convs: Vec<_> = g.nodes().filter(|(_, n)| n.op_type == "Conv").map(|(_, n)| n).collect();
    let depthwise =
        convs.iter().find(|n| n.int_attr("group", 1).unwrap_or(1) > 1).context("a depthwise conv")?;
    let picked = [convs[0], depthwise, convs[convs.len() - 1]];
    let wrt: Vec<_> = picked.iter().flat_map(|n| [n.input(1), n.input(2)]).flatten().collect();
    let started = Instant::now();
    let grads = qgrad::backward(&model, &run.kept, vec![(g.outputs()[0], seed)], &wrt, &mut |_, _| Ok(()))?;
    let backward_s = started.elapsed().as_secs_f64();
    let loss = |m: &Model| -> Result<f64> {
        let s = Session::new(m.clone(), SessionOptions::threads(0))?;
        let o = s.run(&feeds)?;
        let o = o[0].as_f32().context("f32 logits")?;
        Ok(o.iter().zip(&r).map(|(&y, &r)| f64::from(y) * f64::from(r)).sum())
    };
    // The forward is f32 and every Relu6 is a kink a difference step can cross: each sample must
    // agree to 2 % (most do to 1e-4), and a few near a kink to 25 %.
    let mut errors = Vec::new();
    for &v in &wrt {
        let data = g.static_value(v).and_then(Tensor::as_f32).context("f32 weight")?;
        let grad = grads.get(&v).context("a gradient for every weight")?;
        let n = data.len();
        for k in 0..8 {
            let i = (k * 7919 + 13) % n;
            let eps = 5e-4f32;
            let probe = |delta: f32| -> Result<f64> {
                let mut m = model.clone();
                let mut w: Vec<f32> = data.iter().copied().collect();
                w[i] += delta;
                m.graph.value_mut(v).data = Tensor::from_vec(data.shape(), w);
                loss(&m)
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * f64::from(eps));
            let analytic = f64::from(grad.as_slice().context("standard layout")?[i]);
            let err = (analytic - numeric).abs() / (1.0 + numeric.abs());
            errors.push(err);
            if err > 0.25 {
                failures.push(format!(
                    "{}: gradient by element {i} of '{}': analytic {analytic}, numeric {numeric}",
                    c.name,
                    g.value(v).name
                ));
            }
        }
    }
    let close = errors.iter().filter(|&&e| e <= 2e-2).count();
    if close * 100 < errors.len() * 85 {
        failures.push(format!("{}: only {close} of {} sampled gradients within 2 %", c.name, errors.len()));
    }
    let (checked, worst) = (errors.len(), errors.iter().fold(0f64, |m, &e| m.max(e)));
    println!(
        "  {:<20} whole-graph gradient: {checked} sampled weights and biases of 3 layers against central differences: {close} within 2 %, worst {worst:.1e}; backward {backward_s:.2} s",
        c.name
    );
    Ok(())
}

fn qat_mobilenetv2(zoo: &Path, labels: &[i64], failures: &mut Vec<String>) -> Result<()> {
    let c = CLASSIFIERS.iter().find(|c| c.name == "mobilenetv2_keras").context("classifier")?;
    let model = qgraph::load_path(zoo.join(format!("models/{}.onnx", c.name)))?;
    let images = zoo_data::raw_images(zoo, c.images)?;
    let input = model.graph.value(model.graph.inputs()[0]).name.clone();
    let (calib_rows, eval_rows) = split();
    let options = SimOptions {
        precision: DefaultPrecision { param: Precision::Int(8), activation: Precision::Int(8) },
        threads: 0,
        ..SimOptions::default()
    };
    let mut sim = QuantSim::new(model, QuantsimConfig::load("default")?, options)?;
    let batches: Vec<Feeds> =
        calib_rows.chunks(BATCH).map(|rows| vec![(input.clone(), c.batch(&images, rows))]).collect();
    sim.calibrate(batches, &mut |_| {})?;
    let ptq = top1(&sim, c, &images, &eval_rows, labels)?;
    let samples: Vec<Feeds> =
        calib_rows.iter().map(|&r| vec![(input.clone(), c.batch(&images, &[r]))]).collect();
    let qat = qtrain::QatOptions {
        mode: qtrain::QatMode::Regular,
        epochs: EPOCHS,
        batch_size: 16,
        micro_batch: 8,
        learning_rate: 1e-3,
        objective: qtrain::Objective::Distillation { temperature: 1.0 },
        ..qtrain::QatOptions::default()
    };
    let data = qtrain::TrainingData { samples: &samples, labels: None, teacher: None };
    let rss_before = peak_rss_mib().unwrap_or(0.0);
    let started = Instant::now();
    let mut eval_seconds = 0.0;
    let mut score = |s: &QuantSim| -> qtrain::Result<f64> {
        let t = Instant::now();
        let v =
            top1(s, c, &images, &eval_rows, labels).map_err(|e| qtrain::TrainError::Data(e.to_string()))?;
        eval_seconds += t.elapsed().as_secs_f64();
        Ok(v)
    };
    let report = qtrain::train(&mut sim, data, &qat, None, Some(&mut score), &mut |_| {})?;
    let seconds = started.elapsed().as_secs_f64() - eval_seconds;
    let trained = top1(&sim, c, &images, &eval_rows, labels)?;
    let last = report.epochs.last().and_then(|e| e.score).unwrap_or(0.0);
    let losses: Vec<f64> = report.epochs.iter().filter(|e| e.epoch > 0).map(|e| e.loss).collect();
    let scores: Vec<String> =
        report.epochs.iter().map(|e| e.score.map_or("-".into(), |s| format!("{s:.4}"))).collect();
    println!(
        "  {:<20} W8A8 per-channel, label-free QAT ({EPOCHS} epochs on 100 images): top-1 {trained:.4} (PTQ {ptq:.4}); top-1 per epoch {}, loss {}; training {seconds:.0} s, peak RSS {:.0} MiB (before {rss_before:.0} MiB)",
        c.name,
        scores.join(" "),
        losses.iter().map(|l| format!("{l:.4}")).collect::<Vec<_>>().join(" "),
        peak_rss_mib().unwrap_or(0.0)
    );
    // One image of slack: the check is that training does not lose what calibration had.
    if last + 0.0025 < ptq {
        failures.push(format!("{}: QAT's last epoch top-1 {last} below PTQ's {ptq}", c.name));
    }
    if losses.windows(2).any(|w| w[1] >= w[0]) {
        failures.push(format!("{}: the QAT loss did not fall every epoch: {losses:?}", c.name));
    }
    sim.set_rounding(qcalib::Rounding::HalfToEven)?;
    let even = top1(&sim, c, &images, &eval_rows, labels)?;
    let (written, optimised) = qdq_top1_in_onnxruntime(&sim, "qat_w8a8", c, &images, &eval_rows, labels)?;
    println!(
        "  {:<20} QAT's QDQ export in onnxruntime: top-1 {written:.4} as written, {optimised:.4} optimised (simulation with ONNX rounding {even:.4})",
        c.name
    );
    for (what, t) in [("as written", written), ("optimised", optimised)] {
        if (t - even).abs() > QDQ_TOLERANCE + 1e-9 {
            failures.push(format!(
                "{}: QAT QDQ export {what}: top-1 {t} against the simulation's {even}",
                c.name
            ));
        }
    }
    Ok(())
}

/// Training epochs of the mobilenetv2 check.
const EPOCHS: usize = 2;

/// Two images of 400: the simulation and onnxruntime sum products in different orders, so a
/// value near a rounding boundary can land on either side (onnxruntime's own two modes differ by
/// one image on this model).
const QDQ_TOLERANCE: f64 = 0.005;

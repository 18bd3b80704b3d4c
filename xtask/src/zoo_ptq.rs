//! Post-training techniques on the zoo classifiers (`cargo xtask zoo ptq`), against AIMET 2.42's
//! figures in `../shared/zoo/aimet/<model>/ptq/`:
//! - the equalized FP32 model (every set scaled, including layers already on an 8-bit grid)
//!   gives the original's outputs within 1e-5 of the largest logit on the 400 evaluation images;
//! - efficientnet_lite0, per-tensor W8A8 with CLE: top-1 at least 0.865;
//! - with the per-channel `default` config, CLE loses no more than 0.5 pp on any classifier;
//! - reported: mobilenetv2_keras per-tensor with CLE, bias correction and both, and the time CLE
//!   takes;
//! - mobilenetv1_025_128, sequential MSE per-tensor and per-channel: every chosen weight scale
//!   equals AIMET's (its encodings file), top-1 at least AIMET's − 0.5 pp (times printed beside
//!   AIMET's; speed is not asserted here);
//! - mobilenetv1_025_128, AdaRound per-channel at 1,000 iterations (AIMET's
//!   `adaround_default_it1000`, batches of 25 as AIMET ran it): top-1 at least AIMET's − 0.5 pp;
//! - mobilenetv2_keras per-tensor W8A8, AutoQuant with AdaRound at 50 iterations and the AMP
//!   stage (W16A16/W16A8/W8A16/W8A8): the kept stage within 1 pp of FP32.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use qcalib::{Feeds, QuantSim, QuantsimConfig, SimOptions};
use qexec::{Session, SessionOptions};
use qgraph::Model;
use qptq::{BiasCorrectionKind, EqualizeOptions};

use crate::zoo_calib::{BATCH, split, top1};
use crate::zoo_data::{self, CLASSIFIERS, Classifier};

/// Top-1 efficientnet_lite0 must reach per-tensor with CLE (FP32 0.885, AIMET's CLE 0.800).
const EFFICIENTNET_PER_TENSOR_CLE: f64 = 0.865;
/// Largest top-1 CLE may lose under the per-channel `default` config.
const DEFAULT_CONFIG_LOSS: f64 = 0.005;
/// Largest top-1 AdaRound and sequential MSE may fall below AIMET's.
const WEIGHT_TECHNIQUE_MARGIN: f64 = 0.005;
/// Samples per batch of AIMET's AdaRound and sequential MSE runs.
const AIMET_PTQ_BATCH: usize = 25;
/// Largest FP32 output change of equalization, relative to the largest logit.
const EQUALIZED_FP32_TOLERANCE: f32 = 1e-5;

/// Calibrates a simulation of `model` under `config` and returns its top-1 on the evaluation rows.
fn simulated_top1(model: Model, config: &str, data: &Data<'_>) -> Result<f64> {
    let config = QuantsimConfig::load(config)?;
    let mut sim = QuantSim::new(model, config, SimOptions::default())?;
    sim.calibrate(data.calibration.iter().cloned(), &mut |_| {})?;
    top1(&sim, data.c, data.images, data.eval, data.labels)
}

/// A classifier's data.
struct Data<'a> {
    c: &'a Classifier,
    images: &'a ndarray::Array4<u8>,
    calibration: Vec<Feeds>,
    eval: &'a [usize],
    labels: &'a [i64],
}

/// AIMET's simulated top-1 from one of its PTQ runs.
fn aimet_top1(zoo: &Path, model: &str, run: &str) -> Option<f64> {
    aimet_figure(zoo, model, run, "sim_top1")
}

/// A figure of one of AIMET's PTQ runs.
fn aimet_figure(zoo: &Path, model: &str, run: &str, key: &str) -> Option<f64> {
    let path = zoo.join(format!("aimet/{model}/ptq/{run}/result.json"));
    // Python's json writes non-finite floats as bare words JSON does not have.
    let text = std::fs::read_to_string(path)
        .ok()?
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    doc[key].as_f64()
}

/// AIMET's weight scales (flattened per tensor) from the encodings file of one of its PTQ runs.
fn aimet_weight_scales(zoo: &Path, model: &str, run: &str) -> Result<HashMap<String, Vec<f64>>> {
    let path = zoo.join(format!("aimet/{model}/ptq/{run}/encodings_1.0.0/model.encodings"));
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| path.display().to_string())?)?;
    let entries = doc["param_encodings"].as_array().context("param_encodings")?;
    Ok(entries
        .iter()
        .filter_map(|e| {
            let scales = e["scale"].as_array()?.iter().map(|v| v.as_f64()).collect::<Option<Vec<f64>>>()?;
            Some((e["name"].as_str()?.to_string(), scales))
        })
        .collect())
}

/// A simulation of `model` with `frozen` weight encodings, calibrated, and its top-1.
fn frozen_top1(
    model: Model,
    config: &str,
    frozen: &HashMap<String, qcalib::LoadedEncoding>,
    data: &Data<'_>,
) -> Result<f64> {
    let mut sim = QuantSim::new(
        model,
        QuantsimConfig::load(config)?,
        SimOptions { threads: 0, ..SimOptions::default() },
    )?;
    qcalib::freeze_encodings(&mut sim, frozen);
    sim.calibrate(data.calibration.iter().cloned(), &mut |_| {})?;
    top1(&sim, data.c, data.images, data.eval, data.labels)
}

/// Sequential MSE and AdaRound on mobilenetv1_025_128 against AIMET's runs.
fn weight_techniques(zoo: &Path, labels: &[i64], failures: &mut Vec<String>) -> Result<()> {
    let Some(c) = CLASSIFIERS.iter().find(|c| c.name == "mobilenetv1_025_128") else { return Ok(()) };
    let (calib_rows, eval_rows) = split();
    let images = zoo_data::raw_images(zoo, c.images)?;
    let model = qgraph::load_path(zoo.join(format!("models/{}.onnx", c.name)))?;
    let input = model.graph.value(model.graph.inputs()[0]).name.clone();
    let calibration: Vec<Feeds> = calib_rows
        .chunks(AIMET_PTQ_BATCH)
        .map(|rows| vec![(input.clone(), c.batch(&images, rows))])
        .collect();
    let data = Data { c, images: &images, calibration, eval: &eval_rows, labels };
    let options = SimOptions { threads: 0, ..SimOptions::default() };
    for (config, run) in [("default_per_tensor", "seqmse_per_tensor"), ("default", "seqmse_default")] {
        let started = Instant::now();
        let r = qptq::seq_mse(
            &model,
            &QuantsimConfig::load(config)?,
            options,
            &data.calibration,
            &qptq::SeqMseOptions::default(),
            &mut |_, _| {},
        )?;
        let seconds = started.elapsed().as_secs_f64();
        let aimet = aimet_weight_scales(zoo, c.name, run)?;
        let (mut equal, mut total) = (0usize, 0usize);
        for (name, l) in &r.encodings {
            let Some(theirs) = aimet.get(name) else { continue };
            for (ours, theirs) in l.encodings.iter().zip(theirs) {
                total += 1;
                equal += usize::from((ours.delta - theirs).abs() <= 1e-6 * theirs.abs());
            }
        }
        let t = frozen_top1(model.clone(), config, &r.encodings, &data)?;
        let (aimet_t, aimet_s) = (aimet_top1(zoo, c.name, run), aimet_seconds(zoo, c.name, run, "seqmse"));
        println!(
            "  {:<20} sequential MSE {config}: {equal}/{total} weight scales equal AIMET's, top-1 {t:.4} (AIMET {}), {seconds:.1} s (AIMET {})",
            c.name,
            aimet_t.map_or("-".into(), |v| format!("{v:.4}")),
            aimet_s.map_or("-".into(), |v| format!("{v:.0} s"))
        );
        if equal != total || total == 0 {
            failures.push(format!(
                "{}: sequential MSE {config}: {equal} of {total} scales equal AIMET's",
                c.name
            ));
        }
        if let Some(a) = aimet_t.filter(|&a| t < a - WEIGHT_TECHNIQUE_MARGIN) {
            failures.push(format!("{}: sequential MSE {config}: top-1 {t} < AIMET's {a} − 0.5 pp", c.name));
        }
    }
    let run = "adaround_default_it1000";
    let started = Instant::now();
    let settings = qptq::AdaroundOptions { iterations: 1000, ..qptq::AdaroundOptions::default() };
    let r = qptq::adaround(
        &model,
        &QuantsimConfig::load("default")?,
        options,
        &data.calibration,
        &settings,
        &mut |_, _| {},
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let t = frozen_top1(r.model, "default", &r.encodings, &data)?;
    let (aimet_t, aimet_s) = (aimet_top1(zoo, c.name, run), aimet_seconds(zoo, c.name, run, "adaround"));
    println!(
        "  {:<20} AdaRound default, 1,000 iterations: top-1 {t:.4} (AIMET {}), {seconds:.1} s (AIMET {})",
        c.name,
        aimet_t.map_or("-".into(), |v| format!("{v:.4}")),
        aimet_s.map_or("-".into(), |v| format!("{v:.0} s"))
    );
    if let Some(a) = aimet_t.filter(|&a| t < a - WEIGHT_TECHNIQUE_MARGIN) {
        failures.push(format!("{}: AdaRound: top-1 {t} < AIMET's {a} − 0.5 pp", c.name));
    }
    Ok(())
}

/// AutoQuant on mobilenetv2_keras per-tensor, whose PTQ stages fall far short (its weights are
/// per-channel int8 values): the AMP stage must bring it within 1 pp of FP32.
fn autoquant_mobilenetv2(zoo: &Path, labels: &[i64], failures: &mut Vec<String>) -> Result<()> {
    let Some(c) = CLASSIFIERS.iter().find(|c| c.name == "mobilenetv2_keras") else { return Ok(()) };
    let (calib_rows, eval_rows) = split();
    let images = zoo_data::raw_images(zoo, c.images)?;
    let model = qgraph::load_path(zoo.join(format!("models/{}.onnx", c.name)))?;
    let input = model.graph.value(model.graph.inputs()[0]).name.clone();
    let calibration: Vec<Feeds> =
        calib_rows.chunks(BATCH).map(|rows| vec![(input.clone(), c.batch(&images, rows))]).collect();
    let phase1 = vec![vec![(input.clone(), c.batch(&images, &calib_rows[..32]))]];
    let float = Session::new(model.clone(), SessionOptions::threads(0))?;
    let mut correct = 0usize;
    for rows in eval_rows.chunks(BATCH) {
        let out = float.run(&[(input.as_str(), c.batch(&images, rows))])?;
        let preds = zoo_data::argmax_rows(&out[0], c.label_offset)?;
        correct += preds.iter().zip(rows).filter(|(p, r)| **p == labels[**r]).count();
    }
    let fp32 = correct as f64 / eval_rows.len() as f64;
    let candidates =
        ["w16a16", "w16a8", "w8a16", "w8a8"].iter().filter_map(|s| qmix::Candidate::parse(s)).collect();
    let amp = qmix::AutoQuantAmp {
        options: qmix::AmpOptions { clean_start: true, ..qmix::AmpOptions::new(candidates) },
        phase1,
    };
    let settings = qmix::AutoQuantOptions {
        allowed_drop: 0.01,
        adaround: qptq::AdaroundOptions { iterations: 50, ..qptq::AdaroundOptions::default() },
        cache: None,
        fingerprint: String::new(),
        amp: Some(amp),
    };
    let mut score = |sim: &QuantSim| top1(sim, c, &images, &eval_rows, labels).map_err(|e| e.to_string());
    let started = Instant::now();
    let r = qmix::auto_quant(
        &model,
        &QuantsimConfig::load("default_per_tensor")?,
        SimOptions { threads: 0, ..SimOptions::default() },
        &calibration,
        fp32,
        &mut score,
        &settings,
        &mut |_, _, _| {},
    )?;
    let stages: Vec<String> =
        r.stages.iter().map(|s| format!("{} {:.4} ({:.0} s)", s.stage.name(), s.score, s.seconds)).collect();
    println!(
        "  {:<20} AutoQuant per-tensor (AdaRound 50 iterations, AMP W16A16/W16A8/W8A16/W8A8): FP32 {fp32:.4}; {}; kept {} in {:.0} s{}",
        c.name,
        stages.join(", "),
        r.chosen.name(),
        started.elapsed().as_secs_f64(),
        r.amp
            .as_ref()
            .map_or(String::new(), |a| format!(", at {:.3} of the W16A16 bit-ops", a.final_relative_bitops))
    );
    let kept = r.stages.iter().find(|s| s.stage == r.chosen).map_or(0.0, |s| s.score);
    if !r.met || kept < fp32 - 0.01 - 1e-9 {
        failures.push(format!(
            "{}: AutoQuant kept {} at {kept:.4}, below FP32 {fp32:.4} − 1 pp",
            c.name,
            r.chosen.name()
        ));
    }
    Ok(())
}

/// The seconds one step of one of AIMET's PTQ runs took.
fn aimet_seconds(zoo: &Path, model: &str, run: &str, step: &str) -> Option<f64> {
    let path = zoo.join(format!("aimet/{model}/ptq/{run}/result.json"));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    doc["seconds_by_step"][step].as_f64()
}

/// Largest output difference between two models over the evaluation rows, and the largest logit.
fn fp32_difference(a: &Model, b: &Model, data: &Data<'_>) -> Result<(f32, f32)> {
    let (sa, sb) = (
        Session::new(a.clone(), SessionOptions::default())?,
        Session::new(b.clone(), SessionOptions::default())?,
    );
    let name = a.graph.value(a.graph.inputs()[0]).name.clone();
    let (mut diff, mut largest) = (0f32, 0f32);
    for chunk in data.eval.chunks(BATCH) {
        let x = data.c.batch(data.images, chunk);
        let (ya, yb) = (sa.run(&[(name.as_str(), x.clone())])?, sb.run(&[(name.as_str(), x)])?);
        let (ya, yb) = (ya[0].as_f32().context("f32 logits")?, yb[0].as_f32().context("f32 logits")?);
        for (p, q) in ya.iter().zip(yb.iter()) {
            diff = diff.max((p - q).abs());
            largest = largest.max(p.abs());
        }
    }
    Ok((diff, largest))
}

pub fn check(zoo: &Path) -> Result<()> {
    let labels: Vec<i64> = zoo_data::labels(zoo)?.to_vec();
    let (calib_rows, eval_rows) = split();
    let mut failures = Vec::new();
    println!("post-training techniques (W8A8 min-max, 100 calibration images, top-1 on 400):");
    for c in CLASSIFIERS {
        let images = zoo_data::raw_images(zoo, c.images)?;
        let original = qgraph::load_path(zoo.join(format!("models/{}.onnx", c.name)))?;
        let input = original.graph.value(original.graph.inputs()[0]).name.clone();
        let calibration =
            calib_rows.chunks(BATCH).map(|rows| vec![(input.clone(), c.batch(&images, rows))]).collect();
        let data = Data { c, images: &images, calibration, eval: &eval_rows, labels: &labels };

        // Every set scaled: the float function is kept.
        let mut forced = original.clone();
        let started = Instant::now();
        let options = EqualizeOptions { rescale_quantized: true, ..EqualizeOptions::default() };
        let report = qptq::equalize(&mut forced, options)?;
        let cle_seconds = started.elapsed().as_secs_f64();
        let (diff, largest) = fp32_difference(&original, &forced, &data)?;
        println!(
            "  {:<20} CLE (every set): {} sets, {} Clip per-channel, in {:.3} s; FP32 outputs move by {diff:.2e} (largest logit {largest:.2})",
            c.name,
            report.sets.len(),
            report.clips_rewritten.len(),
            cle_seconds
        );
        if diff > EQUALIZED_FP32_TOLERANCE * largest {
            failures.push(format!(
                "{}: the equalized FP32 model moves outputs by {diff:e} (largest {largest})",
                c.name
            ));
        }

        // The default config: CLE as `--cle` applies it must not lose accuracy.
        let mut equalized = original.clone();
        let report = qptq::equalize(&mut equalized, EqualizeOptions::default())?;
        let base = simulated_top1(original.clone(), "default", &data)?;
        let with_cle =
            if report.sets.is_empty() { base } else { simulated_top1(equalized.clone(), "default", &data)? };
        println!(
            "  {:<20} default: top-1 {base:.4}, with CLE {with_cle:.4} ({} sets scaled, {} left alone as their weights lie on an 8-bit grid; AIMET's CLE {})",
            c.name,
            report.sets.len(),
            report.sets_skipped.len(),
            aimet_top1(zoo, c.name, "cle_default").map_or("-".into(), |v| format!("{v:.4}"))
        );
        if with_cle < base - DEFAULT_CONFIG_LOSS {
            failures.push(format!(
                "{}: CLE loses {:.2} pp under the default config",
                c.name,
                (base - with_cle) * 100.0
            ));
        }

        match c.name {
            "efficientnet_lite0" => {
                let t = simulated_top1(equalized, "default_per_tensor", &data)?;
                println!(
                    "  {:<20} per-tensor with CLE: top-1 {t:.4} (required ≥ {EFFICIENTNET_PER_TENSOR_CLE}; AIMET's CLE {}, replacing ReLU6 {} with FP32 top-1 {} after it)",
                    c.name,
                    aimet_top1(zoo, c.name, "cle_per_tensor").map_or("-".into(), |v| format!("{v:.4}")),
                    aimet_top1(zoo, c.name, "cle_clipconst_per_tensor")
                        .map_or("-".into(), |v| format!("{v:.4}")),
                    aimet_figure(zoo, c.name, "cle_clipconst_per_tensor", "fp32_top1_after_cle")
                        .map_or("-".into(), |v| format!("{v:.4}"))
                );
                if t < EFFICIENTNET_PER_TENSOR_CLE {
                    failures.push(format!(
                        "{}: per-tensor top-1 with CLE {t} < {EFFICIENTNET_PER_TENSOR_CLE}",
                        c.name
                    ));
                }
            }
            "mobilenetv2_keras" => {
                let config = QuantsimConfig::load("default_per_tensor")?;
                let corrected = |mut m: Model| -> Result<Model> {
                    qptq::correct_bias(
                        &mut m,
                        &config,
                        SimOptions::default(),
                        &data.calibration,
                        BiasCorrectionKind::Empirical,
                    )?;
                    Ok(m)
                };
                let cle = simulated_top1(forced.clone(), "default_per_tensor", &data)?;
                let bc = simulated_top1(corrected(original.clone())?, "default_per_tensor", &data)?;
                let both = simulated_top1(corrected(forced)?, "default_per_tensor", &data)?;
                println!(
                    "  {:<20} per-tensor: CLE of every set {cle:.4}, bias correction {bc:.4}, both {both:.4} (AIMET's CLE {})",
                    c.name,
                    aimet_top1(zoo, c.name, "cle_per_tensor").map_or("-".into(), |v| format!("{v:.4}"))
                );
            }
            _ => {}
        }
    }
    println!(
        "  BN re-estimation: no zoo classifier carries a BatchNormalization (all folded at export); it is checked on generated models (crates/qptq/tests)"
    );
    weight_techniques(zoo, &labels, &mut failures)?;
    autoquant_mobilenetv2(zoo, &labels, &mut failures)?;
    if !failures.is_empty() {
        bail!("post-training techniques on the zoo:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

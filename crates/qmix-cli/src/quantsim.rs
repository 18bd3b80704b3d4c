//! `qmix quantsim`: place quantizers, calibrate on .npy data, optionally evaluate, and write what
//! a deployment toolchain needs — the AIMET encodings file beside a copy of the FP32 model, the
//! placement report, and on request a QDQ ONNX model. Every file is written atomically.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use qcalib::{DefaultPrecision, EncodingVersion, Precision, QuantSim, Scheme, SimOptions};
use qgraph::Tensor;

use crate::dataset::{
    Dataset, EvalArgs, Preprocess, SampleAxes, bar, check_labels, predictions, read_labels, user,
};
use crate::{Failure, write_tensor};

/// Arguments of `qmix quantsim`.
#[derive(clap::Args)]
pub struct QuantsimArgs {
    /// The FP32 ONNX model.
    model: PathBuf,
    /// Fix a graph input to a value for the whole job, NAME=V[,V…] (repeatable): the model is
    /// specialised for it (a sample rate, a mode flag) and exported without that input.
    #[arg(long = "bind", value_parser = crate::dataset::parse_bind)]
    binds: Vec<crate::dataset::Bind>,
    /// Calibration data for a graph input, NAME=FILE.npy with samples along axis 0 (repeatable).
    #[arg(long = "calib", value_parser = crate::parse_input, required_unless_present = "load_stats")]
    calib: Vec<(String, PathBuf)>,
    /// Save the calibration statistics (a compact binary file) for later runs.
    #[arg(long)]
    save_stats: Option<PathBuf>,
    /// Reuse statistics saved with --save-stats instead of calibrating (no --calib needed).
    #[arg(long)]
    load_stats: Option<PathBuf>,
    /// A precision plan to simulate, as --qdq writes them beside the QDQ model: onnxruntime
    /// TensorQuantOverrides (types by name; each listed tensor takes its quant_type's precision,
    /// `convert` entries turn --converts on) or an AMD Quark QConfig dictionary (global,
    /// per-op-type and per-layer data types, exclusions; mixed integer precisions turn
    /// --converts on, as Quark inserts them). Encodings come from calibration.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Samples per calibration batch (AIMET's examples use 32; TF-enhanced depends on it).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Quantsim config: a preset (default, default_per_tensor, htp_v73) or a JSON file.
    #[arg(long, default_value = "default")]
    config: String,
    /// A graph pass to apply on top of the config's `supergroup_pass_list` (repeatable):
    /// MaskedSoftmax, MatmulAdd, LayerNormalization, RMSNormalization.
    #[arg(long = "pass")]
    passes: Vec<String>,
    /// Calibration scheme: min_max, tf_enhanced, percentile, percentile:P, mse or entropy.
    #[arg(long, default_value = "min_max", value_parser = parse_scheme)]
    scheme: Scheme,
    /// Weight precision: int4..int16, fp16, bf16.
    #[arg(long, default_value = "int8", value_parser = parse_precision)]
    param: Precision,
    /// Activation precision: int4..int16, fp16, bf16.
    #[arg(long = "act", default_value = "int8", value_parser = parse_precision)]
    activation: Precision,
    #[command(flatten)]
    blocks: crate::dataset::BlockArgs,
    /// Gather activation statistics with float weights (AIMET quantizes weights first).
    #[arg(long)]
    calibrate_activations_with_float_weights: bool,
    /// Tie rounding of activations: `aimet` (away from zero) or `onnx` (to even, what the QDQ
    /// export computes).
    #[arg(long, default_value = "aimet", value_parser = parse_rounding)]
    rounding: qcalib::Rounding,
    /// Encodings file version: 1.0.0, 0.6.1 or 2.0.0.
    #[arg(long, default_value = "1.0.0", value_parser = parse_version)]
    encoding_version: EncodingVersion,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    #[command(flatten)]
    ptq: crate::ptq::PtqArgs,
    #[command(flatten)]
    learned_rounding: crate::ptq::RoundingArgs,
    #[command(flatten)]
    evaluation: EvalArgs,
    #[command(flatten)]
    preprocess: Preprocess,
    /// Output folder.
    #[arg(long, default_value = "quantsim_out")]
    out: PathBuf,
    /// Interpreter threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    threads: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl QuantsimArgs {
    /// The same job with AdaRound on.
    pub fn with_adaround(mut self) -> QuantsimArgs {
        self.learned_rounding.adaround = true;
        self
    }
}

pub(crate) fn parse_scheme(s: &str) -> Result<Scheme, String> {
    Scheme::parse(s).ok_or_else(|| {
        format!("unknown scheme '{s}' (min_max, tf_enhanced, percentile, percentile:P, mse, entropy)")
    })
}

fn parse_rounding(s: &str) -> Result<qcalib::Rounding, String> {
    match s {
        "aimet" => Ok(qcalib::Rounding::HalfAwayFromZero),
        "onnx" => Ok(qcalib::Rounding::HalfToEven),
        _ => Err(format!("unknown rounding '{s}' (aimet, onnx)")),
    }
}

pub(crate) fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).ok_or_else(|| format!("unknown precision '{s}' (int4..int16, fp16, bf16)"))
}

fn parse_version(s: &str) -> Result<EncodingVersion, String> {
    EncodingVersion::parse(s).ok_or_else(|| format!("unknown encodings version '{s}' (0.6.1, 1.0.0, 2.0.0)"))
}

pub fn run(a: QuantsimArgs) -> Result<(), Failure> {
    run_job(a, None)
}

/// The quantsim job; with `training`, quantization-aware training after calibration (`qmix qat`).
pub(crate) fn run_job(a: QuantsimArgs, training: Option<&crate::qat::TrainArgs>) -> Result<(), Failure> {
    let config = crate::dataset::quantsim_config(&a.config, &a.passes)?;
    let target = a.device.target()?;
    let model = crate::dataset::load_model(&a.model, &a.binds, a.quiet)?;
    let options = SimOptions {
        precision: DefaultPrecision { param: a.param, activation: a.activation },
        scheme: a.scheme,
        threads: a.threads,
        calibrate_with_float_weights: a.calibrate_activations_with_float_weights,
        rounding: a.rounding,
        converts: a.device.converts,
    };
    let calib = if a.calib.is_empty() {
        None
    } else {
        Some(Dataset::load(&a.calib, &a.preprocess, &SampleAxes::of(&model)).map_err(Failure::User)?)
    };
    let batches: Option<Vec<qcalib::Feeds>> =
        calib.as_ref().map(|c| c.batches(a.batch.max(1)).collect::<Result<_, _>>()).transpose()?;
    let changes_weights =
        a.ptq.any() || a.learned_rounding.adaround || a.learned_rounding.seq_mse || training.is_some();
    let given = changes_weights.then(|| model.clone());
    let (model, mut ptq_report) = if a.ptq.any() {
        let (m, r) = crate::ptq::apply(model, &a.ptq, &config, options, batches.as_deref())?;
        (m, Some(r))
    } else {
        (model, None)
    };
    let crate::ptq::LearnedWeights { model, frozen, report: rounding_report } =
        crate::ptq::round_weights(model, &a.learned_rounding, &config, options, batches.as_deref(), a.quiet)?;
    drop(batches);
    if let Some((technique, r)) = rounding_report {
        let report = ptq_report.get_or_insert_with(|| serde_json::json!({}));
        if let Some(map) = report.as_object_mut() {
            map.insert(technique.into(), r);
        }
    }
    let mut sim = QuantSim::new(model, config, options).map_err(user)?;
    qcalib::freeze_encodings(&mut sim, &frozen);
    a.blocks.apply(&mut sim, a.param)?;
    if let Some(path) = &a.plan {
        apply_plan(&mut sim, path)?;
    }
    let mut set = qgraph::OutputSet::begin(&a.out).map_err(user)?;
    if let Some(r) = &ptq_report {
        qgraph::write_atomically(&set.staged("ptq.json"), qcalib::to_pretty_json(r).as_bytes())?;
    }
    let placement = sim.placement();
    let enabled = placement.quantizer_ids().iter().filter(|&&q| placement.quantizer(q).enabled).count();
    say!(
        "{}: {} tensors carry quantizers ({} enabled), config '{}', {} weights / {} activations, {:?}",
        a.model.display(),
        placement.tensors().len(),
        enabled,
        a.config,
        a.param,
        a.activation,
        a.scheme
    );
    match &a.load_stats {
        Some(stats) => {
            qcalib::load_stats(&mut sim, stats).map_err(user)?;
            say!("encodings computed from the statistics in {}", stats.display());
        }
        None => {
            let calib =
                calib.as_ref().ok_or_else(|| user(anyhow::anyhow!("no calibration data (--calib)")))?;
            let batches = calib.samples.div_ceil(a.batch.max(1));
            let pb = bar(batches, "calibrating", "batches", a.quiet);
            let started = Instant::now();
            crate::dataset::calibrate(&mut sim, calib, a.batch, &mut |done| pb.set_position(done as u64))?;
            pb.finish_and_clear();
            // Printed with the other warnings below.
            crate::dataset::repair_non_finite(&mut sim, calib, a.batch)?;
            say!(
                "calibrated on {} samples in {} batches in {:.2} s",
                calib.samples,
                batches,
                started.elapsed().as_secs_f64()
            );
        }
    }
    crate::device::DeviceArgs::legalize(target.as_ref(), &mut sim, &mut set)?;
    for w in sim.warnings() {
        crate::emit(true, format_args!("warning: {w}"));
    }
    if let Some(path) = &a.save_stats {
        qcalib::save_stats(&sim, path).map_err(user)?;
        say!("saved statistics to {}", path.display());
    }
    if let Some(t) = training {
        let calib = calib.as_ref().ok_or_else(|| user(anyhow::anyhow!("qat trains on --calib data")))?;
        let inputs = crate::qat::TrainingInputs {
            calib,
            teacher: given.as_ref(),
            evaluation: &a.evaluation,
            preprocess: &a.preprocess,
            out: &a.out,
            quiet: a.quiet,
        };
        let report = crate::qat::train(t, &mut sim, inputs)?;
        qgraph::write_atomically(&set.staged("qat.json"), qcalib::to_pretty_json(&report).as_bytes())?;
    }
    write_outputs(&a, &sim, &mut set)?;
    let top1 =
        if a.evaluation.eval.is_empty() { None } else { evaluate(&a, &sim, given.as_ref(), &mut set)? };
    set.commit().map_err(user)?;
    crate::summary(serde_json::json!({
        "command": if training.is_some() { "qat" } else { "quantsim" },
        "model": a.model.display().to_string(),
        "out": a.out.display().to_string(),
        "encodings": a.out.join("model.encodings").display().to_string(),
        "top1": top1.map(|(f, s)| serde_json::json!({"fp32": f, "simulated": s})),
        "warnings": sim.warnings(),
    }));
    Ok(())
}

/// Largest plan file read.
const MAX_PLAN_BYTES: u64 = 256 << 20;

/// Sets the precisions of the plan at `path` (onnxruntime overrides or a Quark config) on `sim`.
fn apply_plan(sim: &mut QuantSim, path: &std::path::Path) -> Result<(), Failure> {
    let bad = |detail: String| user(anyhow::anyhow!("{}: {detail}", path.display()));
    let text = qgraph::read_text_at_most(path, MAX_PLAN_BYTES).map_err(|e| bad(e.to_string()))?;
    let plan: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let applied = qcalib::apply_plan(sim, &plan).map_err(|e| bad(e.to_string()))?;
    if applied.converts {
        sim.set_converts(true).map_err(user)?;
    }
    say!(
        "plan {}: {} tensors set{}{}",
        path.display(),
        applied.tensors,
        match applied.ignored {
            0 => String::new(),
            n => format!(", {n} without a quantizer in this config left as they are"),
        },
        if applied.converts { ", precision converts simulated" } else { "" }
    );
    Ok(())
}

/// Writes the encodings, the model, the placement report and (with `--qdq`) the QDQ model into
/// `set` (they reach `--out` together when the job ends).
fn write_outputs(a: &QuantsimArgs, sim: &QuantSim, set: &mut qgraph::OutputSet) -> Result<(), Failure> {
    qcalib::write_encodings(sim, a.encoding_version, &set.staged("model.encodings")).map_err(user)?;
    qgraph::save_path(sim.model(), set.staged("model.onnx"))?;
    let text = qcalib::to_pretty_json(&sim.placement().report(&sim.model().graph));
    qgraph::write_atomically(&set.staged("placement.json"), text.as_bytes())?;
    say!(
        "wrote {} (version {}), {} and {}",
        set.final_path("model.encodings").display(),
        a.encoding_version.as_str(),
        set.final_path("model.onnx").display(),
        set.final_path("placement.json").display()
    );
    a.device.write_qdq(sim, set, "model_qdq.onnx")
}

/// Runs the evaluation data; returns FP32 and simulated top-1 when labels were given. FP32 is the
/// model as given (`given`, when post-training techniques changed it), else the simulated one.
fn evaluate(
    a: &QuantsimArgs,
    sim: &QuantSim,
    given: Option<&qgraph::Model>,
    set: &mut qgraph::OutputSet,
) -> Result<Option<(f64, f64)>, Failure> {
    let float_model = given.unwrap_or(sim.model()).clone();
    let data = Dataset::load(&a.evaluation.eval, &a.preprocess, &SampleAxes::of(&float_model))
        .map_err(Failure::User)?;
    let float = qexec::Session::new(float_model, qexec::SessionOptions::threads(a.threads))?;
    let pb = bar(data.samples.div_ceil(a.batch.max(1)), "evaluating", "batches", a.quiet);
    let (mut sim_out, mut float_out): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for (i, feeds) in data.batches(a.batch).enumerate() {
        let feeds = feeds?;
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        sim_out.push(sim.run(&named).map_err(user)?.swap_remove(0));
        float_out.push(float.run(&named)?.swap_remove(0));
        pb.set_position(i as u64 + 1);
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let joined = concat(&sim_out).map_err(Failure::User)?;
    write_tensor(&set.staged("sim_outputs.npy"), &joined).map_err(Failure::User)?;
    let path = set.final_path("sim_outputs.npy");
    say!(
        "evaluated {} samples (simulated and FP32) in {secs:.2} s; simulated outputs in {}",
        data.samples,
        path.display()
    );
    if let Some(labels) = &a.evaluation.labels {
        let labels = read_labels(labels)?;
        if labels.len() != data.samples {
            return Err(user(anyhow::anyhow!("{} labels for {} samples", labels.len(), data.samples)));
        }
        if let Some(first) = float_out.first() {
            check_labels(&labels, a.evaluation.label_offset, first.shape().last().copied().unwrap_or(1))?;
        }
        let top1 = |outs: &[Tensor]| -> f64 {
            let preds: Vec<i64> =
                outs.iter().flat_map(|t| predictions(t, a.evaluation.label_offset)).collect();
            preds.iter().zip(&labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
        };
        let (f, s) = (top1(&float_out), top1(&sim_out));
        say!("top-1: FP32 {f:.4}, simulated {s:.4}");
        return Ok(Some((f, s)));
    }
    Ok(None)
}

/// Concatenates f32 batches along axis 0.
fn concat(parts: &[Tensor]) -> anyhow::Result<Tensor> {
    let views: Vec<_> = parts
        .iter()
        .map(|t| t.as_f32().map(|a| a.view()))
        .collect::<Option<_>>()
        .context("outputs are not f32")?;
    let joined = ndarray::concatenate(ndarray::Axis(0), &views)?;
    Ok(Tensor::F32(joined.into_shared()))
}

//! Post-training techniques on the command line: `qmix cle` (the equalized model and its report)
//! and the `--cle`, `--bias-correction` and `--bn-reestimate` options every simulation command
//! takes, applied to the model before calibration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use qcalib::{Feeds, QuantsimConfig, SimOptions};
use qgraph::Model;
use qptq::BiasCorrectionKind;
use serde_json::{Value, json};

use crate::Failure;
use crate::dataset::{EvalArgs, JobArgs, JobData, user};

/// The post-training techniques a simulation command applies before calibrating.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct PtqArgs {
    /// Cross-layer equalization first (BN folding, scaling through ReLU/ReLU6/Clip exactly,
    /// high-bias absorption where BN statistics are known).
    #[arg(long)]
    pub cle: bool,
    /// Re-estimate BatchNormalization statistics on the simulated model, then fold them.
    #[arg(long)]
    pub bn_reestimate: bool,
    /// Correct each quantized layer's bias for its weight error: `empirical` (calibration data)
    /// or `analytical` (BN statistics where the model has them, the data elsewhere).
    #[arg(long, value_name = "KIND", num_args = 0..=1, default_missing_value = "empirical", value_parser = parse_kind)]
    pub bias_correction: Option<BiasCorrectionKind>,
}

fn parse_kind(s: &str) -> Result<BiasCorrectionKind, String> {
    match s {
        "empirical" => Ok(BiasCorrectionKind::Empirical),
        "analytical" => Ok(BiasCorrectionKind::Analytical),
        _ => Err(format!("unknown bias correction '{s}' (empirical, analytical)")),
    }
}

impl PtqArgs {
    /// Whether any technique was asked for.
    pub fn any(&self) -> bool {
        self.cle || self.bn_reestimate || self.bias_correction.is_some()
    }
}

/// Weight rounding or encodings learned on the calibration data (`qmix quantsim` and the jobs).
#[derive(clap::Args, Clone, Default)]
pub(crate) struct RoundingArgs {
    /// Learn each weight's rounding with AdaRound (AIMET's settings) after the techniques
    /// above; the rounded weights keep their encodings (frozen) through calibration.
    #[arg(long)]
    pub adaround: bool,
    /// AdaRound's optimisation steps per layer (AIMET: 10,000; 15,000 below 8 bits).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub adaround_iterations: u32,
    /// Choose each weight's encodings by sequential MSE (AIMET's candidate search) after the
    /// techniques above; the chosen encodings are frozen through calibration.
    #[arg(long, conflicts_with = "adaround")]
    pub seq_mse: bool,
    /// Sequential MSE's candidate ranges per weight.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub seq_mse_candidates: u32,
}

/// Encodings to keep through calibration, by tensor name.
pub(crate) type Frozen = HashMap<String, qcalib::LoadedEncoding>;

/// What [`round_weights`] returns.
pub(crate) struct LearnedWeights {
    /// The model (AdaRound's rounded weights in it).
    pub model: Model,
    /// Encodings to freeze before calibration.
    pub frozen: Frozen,
    /// The technique's name and report, when one ran.
    pub report: Option<(&'static str, Value)>,
}

/// Runs AdaRound or sequential MSE on `model` when asked.
pub(crate) fn round_weights(
    model: Model,
    args: &RoundingArgs,
    config: &QuantsimConfig,
    options: SimOptions,
    calibration: Option<&[Feeds]>,
    quiet: bool,
) -> Result<LearnedWeights, Failure> {
    if args.seq_mse {
        let batches =
            calibration.ok_or_else(|| user(anyhow::anyhow!("--seq-mse needs calibration data (--calib)")))?;
        let settings =
            qptq::SeqMseOptions { candidates: args.seq_mse_candidates as usize, ..Default::default() };
        let started = Instant::now();
        let pb = crate::dataset::bar(0, "SeqMSE", "layers", quiet);
        let r = qptq::seq_mse(&model, config, options, batches, &settings, &mut |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        })
        .map_err(user)?;
        pb.finish_and_clear();
        let shrunk: usize = r.report.layers.iter().map(|l| l.shrunk).sum();
        let weights = r.report.layers.iter().filter(|l| l.shrunk > 0).count();
        say!(
            "sequential MSE: {} weights' encodings chosen from {} candidates ({shrunk} ranges of {weights} weights narrowed), {} left alone, in {:.1} s",
            r.report.layers.len(),
            settings.candidates,
            r.report.skipped.len(),
            started.elapsed().as_secs_f64()
        );
        return Ok(LearnedWeights {
            model,
            frozen: r.encodings,
            report: Some(("seq_mse", r.report.to_json())),
        });
    }
    if !args.adaround {
        return Ok(LearnedWeights { model, frozen: Frozen::new(), report: None });
    }
    let batches =
        calibration.ok_or_else(|| user(anyhow::anyhow!("--adaround needs calibration data (--calib)")))?;
    let settings =
        qptq::AdaroundOptions { iterations: args.adaround_iterations as usize, ..Default::default() };
    let started = Instant::now();
    let pb = crate::dataset::bar(0, "AdaRound", "iterations", quiet);
    let r = qptq::adaround(&model, config, options, batches, &settings, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })
    .map_err(user)?;
    pb.finish_and_clear();
    let flipped: usize = r.report.layers.iter().map(|l| l.flipped).sum();
    let weights: usize = r.report.layers.iter().map(|l| l.weights).sum();
    say!(
        "AdaRound: {} layers rounded ({} iterations each; {flipped} of {weights} weights rounded away from nearest), {} left alone, in {:.1} s",
        r.report.layers.len(),
        settings.iterations,
        r.report.skipped.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(LearnedWeights { model: r.model, frozen: r.encodings, report: Some(("adaround", r.report.to_json())) })
}

/// Applies the requested techniques to `model` in the order AIMET's workflow runs them (BN
/// re-estimation, equalization, bias correction); returns the model and a report of each.
pub(crate) fn apply(
    mut model: Model,
    ptq: &PtqArgs,
    config: &QuantsimConfig,
    options: SimOptions,
    calibration: Option<&[Feeds]>,
) -> Result<(Model, Value), Failure> {
    let mut report = serde_json::Map::new();
    let data = |what: &str| {
        calibration.ok_or_else(|| user(anyhow::anyhow!("{what} needs calibration data (--calib)")))
    };
    if ptq.bn_reestimate {
        let started = Instant::now();
        let r = qptq::reestimate_batch_norms(&mut model, config, options, data("--bn-reestimate")?)
            .map_err(user)?;
        say!(
            "BN re-estimation: {} batch norms re-estimated, {} folded, in {:.2} s",
            r.reestimated.len(),
            r.folded.len(),
            started.elapsed().as_secs_f64()
        );
        report.insert("bn_reestimation".into(), r.to_json());
    }
    if ptq.cle {
        let started = Instant::now();
        let r = qptq::equalize(&mut model, qptq::EqualizeOptions::default()).map_err(user)?;
        say!("{}", cle_summary(&r, started.elapsed().as_secs_f64()));
        report.insert("cle".into(), r.to_json());
    }
    if let Some(kind) = ptq.bias_correction {
        let started = Instant::now();
        let r = qptq::correct_bias(&mut model, config, options, data("--bias-correction")?, kind)
            .map_err(user)?;
        say!(
            "bias correction: {} layers corrected, {} left alone, in {:.2} s",
            r.corrected.len(),
            r.skipped.len(),
            started.elapsed().as_secs_f64()
        );
        report.insert("bias_correction".into(), r.to_json());
    }
    Ok((model, Value::Object(report)))
}

/// One line saying what equalization did.
fn cle_summary(r: &qptq::EqualizeReport, seconds: f64) -> String {
    let triples = r.sets.iter().filter(|s| s.layers.len() == 3).count();
    format!(
        "cross-layer equalization: {} sets scaled ({} of three layers; {} left alone), {} Clip made per-channel, {} BN folded, {} high biases absorbed, in {seconds:.3} s",
        r.sets.len(),
        triples,
        r.sets_skipped.len(),
        r.clips_rewritten.len(),
        r.bn_folded.len(),
        r.high_bias.len()
    )
}

/// Loads a job's model and data, and applies the techniques `ptq` and the job's
/// `learned_rounding` ask for. Returns the model, the data and the encodings AdaRound or
/// sequential MSE learned (to freeze on every simulation of the job: they hold at the precision
/// they were learned for, and a layer a plan moves to another precision is calibrated there).
pub(crate) fn load_job(
    job: &JobArgs,
    evaluation: &EvalArgs,
    ptq: &PtqArgs,
    config: &QuantsimConfig,
    options: SimOptions,
    quiet: bool,
) -> Result<(Model, JobData, Frozen), Failure> {
    let model = crate::dataset::load_model(&job.model, &job.binds, quiet)?;
    let data = JobData::load(job, &model, evaluation)?;
    let rounding = &job.learned_rounding;
    if !ptq.any() && !rounding.adaround && !rounding.seq_mse {
        return Ok((model, data, Frozen::new()));
    }
    let batches: Vec<Feeds> = data.calib.batches(job.batch.max(1)).collect::<Result<_, _>>()?;
    let model = if ptq.any() { apply(model, ptq, config, options, Some(&batches))?.0 } else { model };
    let learned = round_weights(model, rounding, config, options, Some(&batches), quiet)?;
    Ok((learned.model, data, learned.frozen))
}

/// Arguments of `qmix cle`.
#[derive(clap::Args)]
pub struct CleArgs {
    /// The FP32 ONNX model.
    model: PathBuf,
    /// Output folder: the equalized model (model.onnx) and what was done (cle_report.json).
    #[arg(long, default_value = "cle_out")]
    out: PathBuf,
    /// Leave high biases where they are.
    #[arg(long)]
    no_high_bias_fold: bool,
    /// Also scale layers whose weights already lie on an 8-bit grid (converted or
    /// quantization-aware-trained models; left alone by default, scaling moves them off it).
    #[arg(long)]
    rescale_quantized: bool,
}

pub fn run(a: CleArgs) -> Result<(), Failure> {
    let mut model = crate::dataset::load_model(&a.model, &[], false)?;
    let mut set = qgraph::OutputSet::begin(&a.out).map_err(user)?;
    let started = Instant::now();
    let options = qptq::EqualizeOptions {
        high_bias_fold: !a.no_high_bias_fold,
        rescale_quantized: a.rescale_quantized,
    };
    let r = qptq::equalize(&mut model, options).map_err(user)?;
    say!("{}: {}", a.model.display(), cle_summary(&r, started.elapsed().as_secs_f64()));
    qgraph::save_path(&model, set.staged("model.onnx"))?;
    let text = qcalib::to_pretty_json(&r.to_json());
    qgraph::write_atomically(&set.staged("cle_report.json"), text.as_bytes())?;
    set.commit().map_err(user)?;
    say!("wrote {} and {}", a.out.join("model.onnx").display(), a.out.join("cle_report.json").display());
    crate::summary(json!({
        "command": "cle",
        "model": a.model.display().to_string(),
        "out": a.out.display().to_string(),
        "sets": r.sets.len(),
        "clips_rewritten": r.clips_rewritten.len(),
        "bn_folded": r.bn_folded.len(),
        "high_bias_absorbed": r.high_bias.len(),
    }));
    Ok(())
}

//! `qmix analyze`: the quantization analysis of one model — calibrate, score the whole simulation
//! (all quantizers, weights only, activations only), score every layer with only its quantizers on
//! (and, on request, with all but its own), measure each layer's output MSE against FP32, collect
//! quantizer ranges and histograms of the most sensitive layers — then print the top of the
//! ranking and write `analysis.json`, AIMET's `layer_sensitivity.json` and a self-contained
//! `report.html`.

use std::path::PathBuf;
use std::time::Instant;

use qanalyze::{AnalyzeOptions, AnalyzeStep, EnableOneCache, FloatReference, Metric};
use qcalib::{QuantSim, SimOptions};
use serde_json::json;

use crate::Failure;
use crate::dataset::{EvalArgs, JobArgs, JobData, bar, top1, user};

/// Arguments of `qmix analyze`.
#[derive(clap::Args)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    precision: crate::dataset::PrecisionArgs,
    /// Calibration samples (the first ones) layers are scored on.
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Sensitivity metric: psnr (AIMET's), sqnr, mse (lower is better), topK_psnr (AIMET's PSNR on
    /// each row's K largest FP32 logits, e.g. top5_psnr) or top1_agreement (share of rows whose
    /// arg-max stays the FP32 one).
    #[arg(long, default_value = "psnr", value_parser = parse_metric)]
    metric: Metric,
    /// Also score every layer with all quantizers on but its own (one full run per layer).
    #[arg(long)]
    disable_one: bool,
    /// Layers in the printed ranking.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Most sensitive layers whose activation and weight histograms go in the report.
    #[arg(long, default_value_t = 6)]
    histograms: usize,
    #[command(flatten)]
    evaluation: EvalArgs,
    /// Output folder (also holds the resumable enable-one scores in .cache/).
    #[arg(long, default_value = "analysis_out")]
    out: PathBuf,
    /// Score only enable-one shard I of N (I/N, from 0; auto: from the Slurm array or Kubernetes
    /// Indexed Job, see docs/sharding.md) into its own file in OUT/.cache, then stop; a run
    /// without --shard takes in every shard's scores and computes only what is missing.
    #[arg(long, value_parser = crate::shard::parse_shard)]
    shard: Option<(usize, usize)>,
    /// Interpreter threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    threads: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn parse_metric(s: &str) -> Result<Metric, String> {
    Metric::parse(s).filter(|m| *m != Metric::AmpSqnr).ok_or_else(|| {
        format!("unknown metric '{s}': psnr, sqnr, mse, top5_psnr (any K ≥ 1) or top1_agreement")
    })
}

pub fn run(a: AnalyzeArgs) -> Result<(), Failure> {
    let config = crate::dataset::quantsim_config(&a.job.config, &a.job.passes)?;
    let options = SimOptions {
        scheme: a.job.scheme,
        threads: a.threads,
        precision: a.precision.default_precision(),
        ..SimOptions::default()
    };
    let (model, JobData { calib, eval, labels }, frozen) =
        crate::ptq::load_job(&a.job, &a.evaluation, &a.job.ptq, &config, options, a.quiet)?;
    let mut sim = QuantSim::new(model, config, options).map_err(user)?;
    qcalib::freeze_encodings(&mut sim, &frozen);
    a.job.blocks.apply(&mut sim, options.precision.param)?;
    let batch = a.job.batch.max(1);
    let mut seconds: Vec<(String, f64)> = Vec::new();
    let mut step = Instant::now();
    let mut lap = |name: &str, seconds: &mut Vec<(String, f64)>| {
        seconds.push((name.to_string(), step.elapsed().as_secs_f64()));
        step = Instant::now();
    };

    let pb = bar(calib.samples.div_ceil(batch), "calibrating", "batches", a.quiet);
    crate::dataset::calibrate(&mut sim, &calib, batch, &mut |d| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let repaired = crate::dataset::repair_non_finite(&mut sim, &calib, batch)?;
    repaired.iter().for_each(|w| crate::emit(true, format_args!("warning: {w}")));
    lap("calibration", &mut seconds);
    let n = a.samples.clamp(1, calib.samples);
    let scored: Vec<qcalib::Feeds> =
        (0..n).step_by(batch).map(|s| calib.batch(s..(s + batch).min(n))).collect::<Result<_, _>>()?;
    let reference = FloatReference::with_budget(
        &sim,
        &scored,
        a.threads,
        a.job.fp32_cache_bytes(crate::dataset::WALKED_FP32_MIB),
    )
    .map_err(user)?;
    let mut cache = EnableOneCache::open(&a.out, &sim, &reference, &a.metric, a.shard).map_err(user)?;
    if a.shard.is_some() {
        return crate::shard::score_enable_one_shard(&mut sim, &reference, a.metric, &mut cache, a.quiet);
    }
    let mut set = qgraph::OutputSet::begin(&a.out).map_err(user)?;
    let mut pb = bar(0, "", "layers", true);
    let quiet = a.quiet;
    let options = AnalyzeOptions { metric: a.metric, disable_one: a.disable_one, histograms: a.histograms };
    let mut report =
        qanalyze::analyze(&mut sim, &reference, &options, Some(&mut cache), &mut |step| match step {
            AnalyzeStep::Stage { name, total } => {
                pb.finish_and_clear();
                pb = bar(total, name, "layers", quiet);
            }
            AnalyzeStep::Layers(done) => pb.set_position(done as u64),
        })
        .map_err(user)?;
    pb.finish_and_clear();
    seconds.append(&mut report.seconds);
    let mut evaluations = Vec::new();
    if let (Some(e), Some(l)) = (&eval, &labels) {
        let started = Instant::now();
        let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(a.threads))?;
        let offset = a.evaluation.label_offset;
        evaluations.push((
            format!("FP32 top-1 ({} samples)", e.samples),
            top1(e, l, batch, offset, &|f| Ok(float.run(f)?))?,
        ));
        evaluations.push((
            format!("simulated top-1 ({} samples)", e.samples),
            top1(e, l, batch, offset, &|f| sim.run(f).map_err(user))?,
        ));
        seconds.push(("evaluation".into(), started.elapsed().as_secs_f64()));
    }
    report.model = a.job.model.display().to_string();
    report.settings = json!({
        "config": a.job.config, "scheme": a.job.scheme.aimet_name(), "param": a.precision.param.to_string(), "activation": a.precision.activation.to_string(),
        "calibration_samples": calib.samples, "scored_samples": n, "batch": batch, "threads": a.threads,
        "quantizers_disabled_for_non_finite_outputs": repaired,
    });
    report.evaluations = evaluations;
    report.seconds = seconds;
    let checks = report.checks;
    say!(
        "{}: {} of the W{}A{} simulation: {} (weights only {}, activations only {})",
        a.job.model.display(),
        a.metric.name(),
        a.precision.param.bits(),
        a.precision.activation.bits(),
        report.format_score(checks.all),
        report.format_score(checks.weights_only),
        report.format_score(checks.activations_only)
    );
    for (k, v) in &report.evaluations {
        say!("{k}: {v:.4}");
    }
    say!("most sensitive of {} layers (enable one, most sensitive first):", report.enable_one.len());
    say!("{}", report.top_table(a.top).trim_end());
    qgraph::write_atomically(
        &set.staged("layer_sensitivity.json"),
        report.layer_sensitivity_json().as_bytes(),
    )?;
    qgraph::write_atomically(
        &set.staged("analysis.json"),
        qcalib::to_pretty_json(&report.to_json()).as_bytes(),
    )?;
    qgraph::write_atomically(&set.staged("report.html"), report.to_html().as_bytes())?;
    let total: f64 = report.seconds.iter().map(|(_, s)| s).sum();
    say!("wrote {} (analysis.json, layer_sensitivity.json, report.html) in {total:.1} s", a.out.display());
    let mut ranked: Vec<&qanalyze::LayerScore> = report.enable_one.iter().collect();
    ranked.sort_by(|x, y| y.sensitivity().total_cmp(&x.sensitivity()));
    set.commit().map_err(user)?;
    crate::summary(json!({
        "command": "analyze",
        "model": a.job.model.display().to_string(),
        "out": a.out.display().to_string(),
        "metric": a.metric.name(),
        "higher_is_better": report.higher_is_better,
        "checks": {"all": checks.all, "weights_only": checks.weights_only, "activations_only": checks.activations_only},
        "most_sensitive": ranked.iter().take(a.top).map(|l| json!([l.layer, l.score])).collect::<Vec<_>>(),
        "evaluations": report.evaluations.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
    }));
    Ok(())
}

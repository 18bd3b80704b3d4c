//! `qmix litemp`: AIMET's Lite-MP workflow in one command — calibrate W8A8, score every layer
//! with only its quantizers on (AIMET's PSNR on the first calibration samples), flip the most
//! sensitive share of layers to a higher precision, recalibrate, and write the sensitivity
//! (in layer order and ranked), the flipped layers and the mixed-precision encodings; with
//! evaluation data, FP32, W8A8 and mixed top-1.

use std::path::PathBuf;
use std::time::Instant;

use qcalib::{DefaultPrecision, EncodingVersion, Precision, QuantSim, SimOptions};
use serde_json::json;

use crate::Failure;
use crate::dataset::{Dataset, EvalArgs, Forward, JobArgs, JobData, advance, bar, user};

/// Arguments of `qmix litemp`.
#[derive(clap::Args)]
pub struct LitempArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Calibration samples (the first ones) the layers are scored on.
    #[arg(long, default_value_t = 32)]
    psnr_samples: usize,
    /// Share of the layers flipped, in percent.
    #[arg(long, default_value_t = 10.0, value_parser = crate::parse_finite)]
    percent: f64,
    /// Flip this many layers instead of a share.
    #[arg(long, conflicts_with = "until_psnr")]
    count: Option<usize>,
    /// Flip the fewest layers that bring the whole simulation's PSNR (on the scored samples,
    /// recalibrated) to this many dB, instead of a share.
    #[arg(long, value_parser = crate::parse_finite)]
    until_psnr: Option<f64>,
    /// Precision of the flipped layers: int16 or fp16 (weights and activations).
    #[arg(long = "override", default_value = "int16", value_parser = crate::quantsim::parse_precision)]
    override_precision: Precision,
    #[command(flatten)]
    evaluation: EvalArgs,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Output folder (also holds the resumable layer scores in .cache/).
    #[arg(long, default_value = "litemp_out")]
    out: PathBuf,
    /// Score only shard I of N of the layers (I/N, from 0; auto: from the Slurm array or
    /// Kubernetes Indexed Job, see docs/sharding.md) into its own file in OUT/.cache, then stop; a
    /// run without --shard takes in every shard's scores and computes only what is missing.
    #[arg(long, value_parser = crate::shard::parse_shard)]
    shard: Option<(usize, usize)>,
    /// Interpreter threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    threads: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn write_json(path: &std::path::Path, v: &serde_json::Value) -> Result<(), Failure> {
    qgraph::write_atomically(path, qcalib::to_pretty_json(v).as_bytes())?;
    Ok(())
}

/// Top-1 of `run` over the evaluation set, if labels were given.
fn top1(
    data: &Dataset,
    labels: Option<&[i64]>,
    batch: usize,
    offset: usize,
    run: Forward<'_>,
) -> Result<Option<f64>, Failure> {
    labels.map(|l| crate::dataset::top1(data, l, batch, offset, run)).transpose()
}

pub fn run(a: LitempArgs) -> Result<(), Failure> {
    if !matches!(a.override_precision, Precision::Int(16) | Precision::Float16) {
        return Err(user(anyhow::anyhow!("--override must be int16 or fp16, not {}", a.override_precision)));
    }
    let config = crate::dataset::quantsim_config(&a.job.config, &a.job.passes)?;
    let device_target = a.device.target()?;
    let options = SimOptions {
        scheme: a.job.scheme,
        threads: a.threads,
        precision: DefaultPrecision::default(),
        converts: a.device.converts,
        ..SimOptions::default()
    };
    let (model, JobData { calib, eval, labels }, frozen) =
        crate::ptq::load_job(&a.job, &a.evaluation, &a.job.ptq, &config, options, a.quiet)?;
    let mut sim = QuantSim::new(model, config, options).map_err(user)?;
    qcalib::freeze_encodings(&mut sim, &frozen);
    a.job.blocks.apply(&mut sim, options.precision.param)?;
    let started = Instant::now();
    let batches = calib.samples.div_ceil(a.job.batch.max(1));
    let pb = bar(batches, "calibrating", "batches", a.quiet);
    crate::dataset::calibrate(&mut sim, &calib, a.job.batch, &mut |d| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    for w in crate::dataset::repair_non_finite(&mut sim, &calib, a.job.batch)? {
        crate::emit(true, format_args!("warning: {w}"));
    }
    say!(
        "{}: calibrated W8A8 on {} samples in {:.1} s",
        a.job.model.display(),
        calib.samples,
        started.elapsed().as_secs_f64()
    );
    let scored = calib.batch(0..a.psnr_samples.clamp(1, calib.samples))?;
    let budget = a.job.fp32_cache_bytes(crate::dataset::WALKED_FP32_MIB);
    let reference =
        qanalyze::FloatReference::with_budget(&sim, std::slice::from_ref(&scored), a.threads, budget)
            .map_err(user)?;
    let metric = qanalyze::Metric::Psnr;
    let mut cache =
        qanalyze::EnableOneCache::open(&a.out, &sim, &reference, &metric, a.shard).map_err(user)?;
    if a.shard.is_some() {
        return crate::shard::score_enable_one_shard(&mut sim, &reference, metric, &mut cache, a.quiet);
    }
    let mut set = qgraph::OutputSet::begin(&a.out).map_err(user)?;
    let checks = qanalyze::model_checks(&mut sim, &reference, qanalyze::Metric::Psnr).map_err(user)?;
    say!(
        "PSNR of the W8A8 simulation: {:.2} dB (weights only {:.2} dB, activations only {:.2} dB)",
        checks.all,
        checks.weights_only,
        checks.activations_only
    );
    let layers = qanalyze::layers(&sim).map_err(user)?.len();
    let known = cache.len();
    let pb = bar(layers.saturating_sub(known), "scoring", "layers", a.quiet);
    let started = Instant::now();
    let scores = qanalyze::enable_one_cached(&mut sim, &reference, metric, &mut cache, &mut advance(&pb))
        .map_err(user)?;
    pb.finish_and_clear();
    let reused = if known > 0 {
        format!(", {known} of them cached in {}", cache.path().parent().unwrap_or(&a.out).display())
    } else {
        String::new()
    };
    say!(
        "scored {} layers (PSNR with only that layer quantized) in {:.1} s{reused}",
        scores.len(),
        started.elapsed().as_secs_f64()
    );
    let (eval_ref, labels_ref) = (eval.as_ref(), labels.as_deref());
    let w8a8 = match eval_ref {
        Some(e) => {
            top1(e, labels_ref, a.job.batch, a.evaluation.label_offset, &|f| sim.run(f).map_err(user))?
        }
        None => None,
    };
    let o = a.override_precision;
    let flipped = if let Some(target) = a.until_psnr {
        let calibration: Vec<qcalib::Feeds> = calib.batches(a.job.batch).collect::<Result<_, _>>()?;
        let r = qmix::flip_until(
            &mut sim,
            &scores,
            o,
            o,
            &calibration,
            &reference,
            qanalyze::Metric::Psnr,
            target,
        )
        .map_err(user)?;
        let verdict = if r.reached { "reaches" } else { "even with every layer flipped misses" };
        say!("{} layers flipped: PSNR {:.2} dB {verdict} the target {target} dB", r.flipped.len(), r.score);
        crate::device::DeviceArgs::legalize(device_target.as_ref(), &mut sim, &mut set)?;
        r.flipped
    } else {
        let flipped = match a.count {
            Some(n) => qmix::flip_count(&mut sim, &scores, n, o, o),
            None => qmix::flip_layers_to_higher_precision(&mut sim, &scores, a.percent, o, o),
        }
        .map_err(user)?;
        crate::device::DeviceArgs::legalize(device_target.as_ref(), &mut sim, &mut set)?;
        let pb = bar(batches, "recalibrating", "batches", a.quiet);
        crate::dataset::calibrate(&mut sim, &calib, a.job.batch, &mut |d| pb.set_position(d as u64))?;
        pb.finish_and_clear();
        flipped
    };
    let mut ranked = scores.clone();
    ranked.sort_by(|x, y| x.score.total_cmp(&y.score));
    say!("most sensitive layers (PSNR dB, lowest first; * = flipped to {}):", a.override_precision);
    for s in ranked.iter().take(10) {
        let mark = if flipped.iter().any(|f| f.layer == s.layer) { "*" } else { " " };
        say!("  {mark} {:>7.2}  {}", s.score, s.layer);
    }
    // `{layer: score}` in layer order, as AIMET writes it (JSON maps here sort their keys).
    let entries: Vec<String> = scores
        .iter()
        .map(|s| format!("    {}: {}", serde_json::Value::String(s.layer.clone()), json!(s.score)))
        .collect();
    let text = format!("{{\n{}\n}}\n", entries.join(",\n"));
    qgraph::write_atomically(&set.staged("layer_sensitivity.json"), text.as_bytes())?;

    let ranked_json: Vec<serde_json::Value> = ranked.iter().map(|s| json!([s.layer, s.score])).collect();
    write_json(
        &set.staged("layer_sensitivity_ranked.json"),
        &json!({"metric": "psnr_db", "higher_is_better": true, "ranked": ranked_json}),
    )?;
    let flipped_json: Vec<serde_json::Value> =
        flipped.iter().map(|f| json!({"layer": f.layer, "psnr_db": f.score})).collect();
    write_json(
        &set.staged("flipped_layers.json"),
        &json!({"percent": a.percent, "count": a.count, "until_psnr": a.until_psnr, "override": a.override_precision.to_string(), "n_layers": scores.len(), "n_flipped": flipped.len(), "flipped_layers": flipped_json}),
    )?;
    qcalib::write_encodings(&sim, EncodingVersion::V1_0_0, &set.staged("model_mixed.encodings"))
        .map_err(user)?;
    a.device.write_qdq(&sim, &mut set, "model_mixed_qdq.onnx")?;
    say!("flipped {} of {} layers; wrote {}", flipped.len(), scores.len(), a.out.display());
    let mut top1_scores = None;
    if let Some(e) = eval_ref {
        let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(a.threads))?;
        let fp32 = top1(e, labels_ref, a.job.batch, a.evaluation.label_offset, &|f| Ok(float.run(f)?))?;
        let mixed =
            top1(e, labels_ref, a.job.batch, a.evaluation.label_offset, &|f| sim.run(f).map_err(user))?;
        if let (Some(fp), Some(w), Some(m)) = (fp32, w8a8, mixed) {
            say!("top-1 on {} samples: FP32 {fp:.4}, W8A8 {w:.4}, Lite-MP {m:.4}", e.samples);
            top1_scores = Some(json!({"fp32": fp, "w8a8": w, "mixed": m, "samples": e.samples}));
        }
    }
    set.commit().map_err(user)?;
    crate::summary(json!({
        "command": "litemp",
        "model": a.job.model.display().to_string(),
        "out": a.out.display().to_string(),
        "psnr_db": {"all": checks.all, "weights_only": checks.weights_only, "activations_only": checks.activations_only},
        "layers": scores.len(),
        "flipped": flipped.iter().map(|f| f.layer.clone()).collect::<Vec<_>>(),
        "top1": top1_scores,
    }));
    Ok(())
}

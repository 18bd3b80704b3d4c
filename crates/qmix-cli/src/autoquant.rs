//! `qmix autoquant`: AIMET's AutoQuant flow — batch-norm folding, then cross-layer equalization,
//! then AdaRound, until the top-1 is within `--allowed-drop` of FP32 (else the best stage) —
//! writing the kept stage's model and encodings, `autoquant.json` and `autoquant.html`. Stage
//! scores and AdaRound's result are cached in `OUT/.autoquant_cache`, so a rerun resumes.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Instant;

use qcalib::{EncodingVersion, SimOptions};
use serde_json::json;

use crate::Failure;
use crate::dataset::{EvalArgs, JobArgs, JobData, bar, top1, user};

/// Arguments of `qmix autoquant`.
#[derive(clap::Args)]
pub struct AutoquantArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    precision: crate::dataset::PrecisionArgs,
    /// Largest top-1 drop below FP32 accepted, e.g. 0.01.
    #[arg(long, value_parser = crate::parse_finite)]
    allowed_drop: f64,
    /// A last stage when the others fall short: AIMET's greedy AMP over these candidates (e.g.
    /// w16a16,w8a16,w16a8,w8a8), to the same allowed drop, from the better of the folded and
    /// equalized models.
    #[arg(long, value_parser = crate::amp::parse_candidates)]
    amp_candidates: Option<crate::amp::Candidates>,
    /// Calibration samples (the first ones) the AMP stage's phase 1 scores groups on.
    #[arg(long, default_value_t = 32)]
    amp_phase1_samples: usize,
    #[command(flatten)]
    evaluation: EvalArgs,
    /// Output folder (also holds the resumable cache in .autoquant_cache/).
    #[arg(long, default_value = "autoquant_out")]
    out: PathBuf,
    /// Discard cached results from an earlier run.
    #[arg(long)]
    fresh: bool,
    /// Interpreter threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    threads: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: AutoquantArgs) -> Result<(), Failure> {
    let rounding = &a.job.learned_rounding;
    if a.job.ptq.any() || rounding.adaround || rounding.seq_mse || a.job.blocks.block_size.is_some() {
        return Err(user(anyhow::anyhow!(
            "autoquant applies its own techniques: drop --cle, --bias-correction, --bn-reestimate, --adaround, --seq-mse and --block-size (--adaround-iterations sets its AdaRound stage)"
        )));
    }
    let config = crate::dataset::quantsim_config(&a.job.config, &a.job.passes)?;
    let model = crate::dataset::load_model(&a.job.model, &a.job.binds, a.quiet)?;
    let JobData { calib, eval, labels } = JobData::load(&a.job, &model, &a.evaluation)?;
    let labels =
        labels.ok_or_else(|| user(anyhow::anyhow!("autoquant scores top-1: give --eval and --labels")))?;
    let eval = eval.as_ref().unwrap_or(&calib);
    let batch = a.job.batch.max(1);
    let options = SimOptions {
        precision: a.precision.default_precision(),
        scheme: a.job.scheme,
        threads: a.threads,
        ..SimOptions::default()
    };
    let calibration: Vec<qcalib::Feeds> = calib.batches(batch).collect::<Result<_, _>>()?;
    let offset = a.evaluation.label_offset;
    let started = Instant::now();
    let float = qexec::Session::new(model.clone(), qexec::SessionOptions::threads(a.threads))?;
    let fp32 = top1(eval, &labels, batch, offset, &|f| Ok(float.run(f)?))?;
    say!("FP32 top-1 on {} samples: {fp32:.4}; target {:.4}", eval.samples, fp32 - a.allowed_drop);
    let cache = a.out.join(".autoquant_cache");
    if a.fresh {
        std::fs::remove_dir_all(&cache).ok();
    }
    let model_bytes =
        std::fs::read(&a.job.model).map_err(|e| user(anyhow::anyhow!("{}: {e}", a.job.model.display())))?;
    let fingerprint = format!(
        "{} | inputs {:016x} | {} | {:?} | {:?} {:?} | batch {batch} | iterations {} | amp {} on {}",
        a.job.model.display(),
        digest(&model_bytes, &calibration, eval, batch, &labels)?,
        a.job.config,
        a.job.scheme,
        a.precision.param,
        a.precision.activation,
        a.job.learned_rounding.adaround_iterations,
        a.amp_candidates.as_ref().map_or("none".to_string(), |c| c
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")),
        a.amp_phase1_samples,
    );
    let amp = a
        .amp_candidates
        .as_ref()
        .map(|c| -> Result<_, Failure> {
            let samples = a.amp_phase1_samples.clamp(1, calib.samples.max(1));
            Ok(qmix::AutoQuantAmp {
                options: qmix::AmpOptions {
                    threads: a.threads,
                    fp32_cache_bytes: a.job.fp32_cache_bytes(crate::dataset::RESUMED_FP32_MIB),
                    ..qmix::AmpOptions::new(c.0.clone())
                },
                phase1: (0..samples)
                    .step_by(batch)
                    .map(|s| calib.batch(s..(s + batch).min(samples)))
                    .collect::<Result<_, _>>()?,
            })
        })
        .transpose()?;
    let settings = qmix::AutoQuantOptions {
        allowed_drop: a.allowed_drop,
        adaround: qptq::AdaroundOptions {
            iterations: a.job.learned_rounding.adaround_iterations as usize,
            ..Default::default()
        },
        cache: Some(cache),
        fingerprint,
        amp,
    };
    let mut score = |sim: &qcalib::QuantSim| {
        top1(eval, &labels, batch, offset, &|f| sim.run(f).map_err(user)).map_err(|e| e.to_string())
    };
    let pb = bar(0, "AdaRound", "iterations", a.quiet);
    let r = qmix::auto_quant(
        &model,
        &config,
        options,
        &calibration,
        fp32,
        &mut score,
        &settings,
        &mut |_, d, t| {
            pb.set_length(t);
            pb.set_position(d);
        },
    )
    .map_err(|e| match e {
        qmix::AutoQuantError::Cache { .. } => user(anyhow::anyhow!("{e} (rerun with --fresh to discard it)")),
        e => user(e),
    })?;
    pb.finish_and_clear();
    for s in &r.stages {
        let time = if s.cached { "cached".to_string() } else { format!("{:.1} s", s.seconds) };
        say!("  {:<26} top-1 {:.4} ({:+.4} vs FP32), {time}", s.stage.name(), s.score, s.score - fp32);
    }
    if let Some(amp) = &r.amp {
        say!(
            "  AMP plan at {:.3} of the bit-ops of its starting point ({} groups; {} search)",
            amp.final_relative_bitops,
            amp.groups.len(),
            amp.chosen_by
        );
    }
    say!(
        "kept {}{} in {:.1} s",
        r.chosen.name(),
        match (r.met, r.early_exit) {
            (true, _) => "",
            (false, true) =>
                " (with float weights the simulation already misses the target: equalization and AdaRound skipped; the best one)",
            (false, false) => " (no stage met the target: the best one)",
        },
        started.elapsed().as_secs_f64()
    );
    let mut set = qgraph::OutputSet::begin(&a.out).map_err(user)?;
    qcalib::write_encodings(&r.sim, EncodingVersion::V1_0_0, &set.staged("model.encodings")).map_err(user)?;
    qgraph::save_path(r.sim.model(), set.staged("model.onnx"))?;
    qgraph::write_atomically(&set.staged("autoquant.json"), qcalib::to_pretty_json(&r.to_json()).as_bytes())?;
    if let Some(amp) = &r.amp {
        qmix::write_amp_report(amp, Some(a.allowed_drop), set.staging_dir()).map_err(user)?;
    }
    let title = a.job.model.display().to_string();
    qgraph::write_atomically(&set.staged("autoquant.html"), r.to_html(&title).as_bytes())?;
    set.commit().map_err(user)?;
    say!("wrote {}", a.out.display());
    crate::summary(json!({
        "command": "autoquant", "model": a.job.model.display().to_string(), "out": a.out.display().to_string(),
        "fp32": fp32, "chosen": r.chosen.name(), "target_met": r.met, "early_exit": r.early_exit,
        "stages": r.stages.iter().map(|s| json!({"stage": s.stage.name(), "score": s.score})).collect::<Vec<_>>(),
    }));
    Ok(())
}

/// A digest of what the job reads — the model file's bytes and the data and labels as loaded —
/// so a cache made from other files (even under the same names) is not reused.
fn digest(
    model: &[u8],
    calibration: &[qcalib::Feeds],
    eval: &crate::dataset::Dataset,
    batch: usize,
    labels: &[i64],
) -> Result<u64, Failure> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut h);
    calibration.iter().for_each(|b| hash_feeds(b, &mut h));
    for b in eval.batches(batch) {
        hash_feeds(&b?, &mut h);
    }
    labels.hash(&mut h);
    Ok(h.finish())
}

fn hash_feeds(batch: &qcalib::Feeds, h: &mut impl Hasher) {
    for (name, t) in batch {
        name.hash(h);
        t.shape().hash(h);
        t.to_le_bytes().hash(h);
    }
}

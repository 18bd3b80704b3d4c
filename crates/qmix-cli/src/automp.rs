//! `qmix automp`: Quark-style auto mixed precision — score every layer at the narrow precision,
//! then from the wide precision move layers to the narrow one, least sensitive first, while top-1
//! stays within `--max-drop` of FP32 (or the outputs' relative L2 error against FP32 within
//! `--max-l2`), and write the resulting encodings and `automp.json`.

use std::path::PathBuf;
use std::time::Instant;

use qanalyze::{FloatReference, Metric};
use qcalib::{DefaultPrecision, EncodingVersion, QuantSim, SimOptions};
use qmix::Candidate;
use serde_json::json;

use crate::Failure;
use crate::dataset::{EvalArgs, JobArgs, JobData, advance, bar, top1, user};

/// Arguments of `qmix automp`.
#[derive(clap::Args)]
pub struct AutompArgs {
    #[command(flatten)]
    job: JobArgs,
    /// The precision every layer starts at, e.g. w16a16.
    #[arg(long, default_value = "w16a16", value_parser = parse_candidate)]
    wide: Candidate,
    /// The precision layers move to, e.g. w8a8.
    #[arg(long, default_value = "w8a8", value_parser = parse_candidate)]
    narrow: Candidate,
    /// Calibration samples (the first ones) the layers are scored on.
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Largest allowed drop of top-1 below FP32 (needs labels), e.g. 0.01.
    #[arg(long, conflicts_with = "max_l2", required_unless_present = "max_l2", value_parser = crate::parse_finite)]
    max_drop: Option<f64>,
    /// Largest allowed relative L2 error of the outputs against FP32, e.g. 0.05.
    #[arg(long, value_parser = crate::parse_finite)]
    max_l2: Option<f64>,
    /// Skip a layer whose move breaks the target and go on (default: stop there).
    #[arg(long)]
    skip_failures: bool,
    #[command(flatten)]
    evaluation: EvalArgs,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Output folder.
    #[arg(long, default_value = "automp_out")]
    out: PathBuf,
    /// Interpreter threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    threads: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// A score of the simulation as it is (higher is better).
type Score<'a> = dyn FnMut(&QuantSim) -> Result<f64, String> + 'a;

fn parse_candidate(s: &str) -> Result<Candidate, String> {
    Candidate::parse(s).ok_or_else(|| format!("'{s}' is not a precision pair like w8a8, w16a16 or w4b32a16"))
}

pub fn run(a: AutompArgs) -> Result<(), Failure> {
    let config = crate::dataset::quantsim_config(&a.job.config, &a.job.passes)?;
    let device_target = a.device.target()?;
    let options_at = |c: Candidate| {
        let precision = DefaultPrecision { param: c.param, activation: c.activation };
        SimOptions {
            scheme: a.job.scheme,
            threads: a.threads,
            precision,
            converts: a.device.converts,
            ..SimOptions::default()
        }
    };
    let (model, JobData { calib, eval, labels }, frozen) =
        crate::ptq::load_job(&a.job, &a.evaluation, &a.job.ptq, &config, options_at(a.narrow), a.quiet)?;
    let sim_at = |c: Candidate| {
        let mut sim = QuantSim::new(model.clone(), config.clone(), options_at(c)).map_err(user)?;
        qcalib::freeze_encodings(&mut sim, &frozen);
        a.job.blocks.apply(&mut sim, c.param)?;
        // A candidate in blocks: the weights that split into them are scored in blocks.
        if let (Some(block), qcalib::Precision::Int(bits)) = (c.block, c.param) {
            sim.set_blockwise_weights(&["Conv", "Gemm", "MatMul"], bits, true, block).map_err(user)?;
        }
        Ok::<_, Failure>(sim)
    };
    let mut narrow = sim_at(a.narrow)?;
    if a.max_drop.is_some() && labels.is_none() {
        return Err(user(anyhow::anyhow!("--max-drop needs labelled evaluation data (--eval and --labels)")));
    }
    let mut set = qgraph::OutputSet::begin(&a.out).map_err(user)?;
    let batch = a.job.batch.max(1);
    let started = Instant::now();
    let calibration: Vec<qcalib::Feeds> = calib.batches(batch).collect::<Result<_, _>>()?;
    narrow.calibrate(calibration.iter().cloned(), &mut |_| {}).map_err(user)?;
    let n = a.samples.clamp(1, calib.samples);
    let scored: Vec<qcalib::Feeds> =
        (0..n).step_by(batch).map(|s| calib.batch(s..(s + batch).min(n))).collect::<Result<_, _>>()?;
    let layers = qanalyze::layers(&narrow).map_err(user)?.len();
    let pb = bar(layers, "scoring", "layers", a.quiet);
    let fp32 = FloatReference::with_budget(
        &narrow,
        &scored,
        a.threads,
        a.job.fp32_cache_bytes(crate::dataset::WALKED_FP32_MIB),
    )
    .map_err(user)?;
    let scores = qanalyze::enable_one(&mut narrow, &fp32, Metric::Psnr, &mut advance(&pb)).map_err(user)?;
    pb.finish_and_clear();
    say!("scored {} layers at {} (PSNR with only that layer quantized)", scores.len(), a.narrow);

    let eval_set = eval.as_ref().unwrap_or(&calib);
    let eval_batches: Vec<qcalib::Feeds> = eval_set.batches(batch).collect::<Result<_, _>>()?;
    let offset = a.evaluation.label_offset;
    let mut wide = sim_at(a.wide)?;
    let (mut metric, target, what): (Box<Score<'_>>, f64, String) = match (a.max_drop, &labels) {
        (Some(drop), Some(l)) => {
            let float = qexec::Session::new(wide.model().clone(), qexec::SessionOptions::threads(a.threads))?;
            let fp32 = top1(eval_set, l, batch, offset, &|f| Ok(float.run(f)?))?;
            say!("FP32 top-1 on {} samples: {fp32:.4}", eval_set.samples);
            let metric = move |sim: &QuantSim| {
                top1(eval_set, l, batch, offset, &|f| sim.run(f).map_err(user)).map_err(|e| e.to_string())
            };
            (Box::new(metric), fp32 - drop, format!("top-1 ≥ {:.4}", fp32 - drop))
        }
        _ => {
            let max_l2 = a.max_l2.unwrap_or(0.05);
            // Only full runs are scored against it: no FP32 intermediates to keep.
            let reference = FloatReference::with_budget(&wide, &eval_batches, a.threads, 0).map_err(user)?;
            // Relative L2 error r = 10^(−SQNR/20): r ≤ max ⇔ −r ≥ −max.
            let metric = move |sim: &QuantSim| {
                let sqnr = reference.score(sim, Metric::Sqnr).map_err(|e| e.to_string())?;
                Ok(-(10f64.powf(-sqnr / 20.0)))
            };
            (Box::new(metric), -max_l2, format!("relative L2 error ≤ {max_l2}"))
        }
    };
    let pb = bar(layers, "narrowing", "layers", a.quiet);
    let r = qmix::narrow_until(
        &mut wide,
        &scores,
        a.narrow,
        &calibration,
        &mut *metric,
        target,
        a.skip_failures,
        &mut |d, _| pb.set_position(d as u64),
    )
    .map_err(user)?;
    pb.finish_and_clear();
    let g = &wide.model().graph;
    let macs = |names: &[String]| -> u64 {
        names.iter().filter_map(|n| g.node_id(n)).filter_map(|id| g.node_macs(id)).sum()
    };
    let all: Vec<String> = scores.iter().map(|s| s.layer.clone()).collect();
    let share = macs(&r.narrowed) as f64 / macs(&all).max(1) as f64;
    let shown = |v: f64| {
        if a.max_drop.is_some() { format!("top-1 {v:.4}") } else { format!("relative L2 {:.4}", -v) }
    };
    say!(
        "{} of {} layers moved to {} ({:.0} % of the MACs), {}; target {what}; {} evaluations in {:.1} s",
        r.narrowed.len(),
        scores.len(),
        a.narrow,
        100.0 * share,
        shown(r.score),
        r.evaluations,
        started.elapsed().as_secs_f64()
    );
    if let Some(first) = r.rejected.first() {
        say!("stopped at '{first}' ({} rejected)", r.rejected.len());
    }
    let changes = crate::device::DeviceArgs::legalize(device_target.as_ref(), &mut wide, &mut set)?;
    let legal_score = if changes.is_empty() {
        None
    } else {
        let s = metric(&wide).map_err(|e| user(anyhow::anyhow!(e)))?;
        say!("with the target's changes: {}", shown(s));
        Some(s)
    };
    qcalib::write_encodings(&wide, EncodingVersion::V1_0_0, &set.staged("model_automp.encodings"))
        .map_err(user)?;
    a.device.write_qdq(&wide, &mut set, "model_automp_qdq.onnx")?;
    let report = json!({
        "wide": a.wide.to_string(), "narrow": a.narrow.to_string(), "target": what,
        "narrowed": r.narrowed, "rejected": r.rejected, "score": r.score, "evaluations": r.evaluations,
        "narrowed_mac_share": share, "score_on_target": legal_score,
        "order": scores.iter().map(|s| json!([s.layer, s.score])).collect::<Vec<_>>(),
    });
    qgraph::write_atomically(&set.staged("automp.json"), qcalib::to_pretty_json(&report).as_bytes())?;
    say!("wrote {}", a.out.display());
    set.commit().map_err(user)?;
    crate::summary(
        json!({"command": "automp", "model": a.job.model.display().to_string(), "out": a.out.display().to_string(),
        "narrowed": r.narrowed.len(), "layers": scores.len(), "narrowed_mac_share": share, "score": r.score}),
    );
    Ok(())
}

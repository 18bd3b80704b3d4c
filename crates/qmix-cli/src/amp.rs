//! `qmix amp`: AIMET's greedy auto mixed precision in one command — quantizer groups, baseline
//! candidates, phase-1 sensitivity per (group, candidate), a phase-2 search for the cheapest point
//! within the allowed drop (or the full front), then the final simulation's encodings, the
//! accuracy and Pareto lists, a summary and two SVG charts. Resumable: rerun the same command
//! after an interruption and cached evaluations are not repeated.

use std::path::PathBuf;
use std::time::Instant;

use qanalyze::{FloatReference, Metric};
use qcalib::{DefaultPrecision, EncodingVersion, QuantSim, SimOptions};
use qmix::{
    AmpData, AmpEvent, AmpOptions, Candidate, MacOps, Phase2, Phase3Options, Phase3Threshold, SearchAlgo,
};

use crate::Failure;
use crate::dataset::{EvalArgs, JobArgs, JobData, bar, top1, user};

/// Arguments of `qmix amp`.
#[derive(clap::Args)]
pub struct AmpArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Candidates, comma-separated, e.g. w16a16,w8a16,w16a8,w8a8 (wfp16afp16 for float16;
    /// w4b32a16 for int4 weights in blocks of 32 input channels, offered to the groups whose
    /// Conv, Gemm and MatMul weights split into them).
    #[arg(long, default_value = "w16a16,w8a16,w16a8,w8a8", value_parser = parse_candidates)]
    candidates: Candidates,
    /// Allowed drop of the phase-2 score below FP32 (e.g. 0.01 = 1 pp of top-1). Without it the
    /// last point of the list is taken (as AIMET does); add --full-front to see them all.
    #[arg(long, value_parser = crate::parse_finite)]
    allowed_drop: Option<f64>,
    /// Phase-2 search: binary, interpolation or brute_force.
    #[arg(long, default_value = "binary")]
    search: SearchAlgo,
    /// Evaluate every point of the accuracy list (the full Pareto front), not only the searched ones.
    #[arg(long)]
    full_front: bool,
    /// Also search the budget-optimal plans (exact knapsack on the phase-1 scores, verified by
    /// evaluation) and keep the cheaper plan of the two searches that meets the target.
    #[arg(long)]
    budget_search: bool,
    /// Calibration samples (the first ones) phase 1 scores groups on.
    #[arg(long, default_value_t = 32)]
    phase1_samples: usize,
    /// Phase-1 metric: amp_sqnr (AIMET's), sqnr or psnr.
    #[arg(long, default_value = "amp_sqnr", value_parser = parse_metric)]
    phase1_metric: Metric,
    /// Count only Conv and Gemm in bit-ops, as AIMET does (default: also ConvTranspose, MatMul).
    #[arg(long)]
    aimet_macs: bool,
    /// Measured costs in place of bit-ops: JSON {"unit": "us", "ops": {OP: {"W8A8": 12.5, …}}}
    /// pricing every weighted op at every candidate (e.g. latencies profiled on the target). The
    /// search, the budget search and phase 3 then trade accuracy against this cost.
    #[arg(long)]
    cost: Option<PathBuf>,
    /// Give every group every candidate, ignoring the config's supported_kernels.
    #[arg(long)]
    use_all_candidates: bool,
    /// Phase 3: on the chosen plan, raise activation precisions to cut precision converts, one
    /// exact plan per alpha, each recalibrated and scored (the final encodings stay phase 2's).
    #[arg(long)]
    phase3: bool,
    /// Phase-3 alphas: convert budgets as fractions of the phase-2 plan's.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0])]
    phase3_alphas: Vec<f64>,
    /// Phase-3 budget rule: cycles (AIMET's default, predicted convert cycles), size (converted
    /// elements) or count (number of converts).
    #[arg(long, default_value = "cycles", value_parser = parse_threshold)]
    phase3_budget: Phase3Threshold,
    #[command(flatten)]
    evaluation: EvalArgs,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Output folder (also holds the resumable cache in .cache/).
    #[arg(long, default_value = "amp_out")]
    out: PathBuf,
    /// Discard cached results from an earlier run.
    #[arg(long)]
    clean_start: bool,
    /// Compute only phase-1 shard I of N (I/N, from 0; auto: from the Slurm array or Kubernetes
    /// Indexed Job, see docs/sharding.md) into its own cache file in OUT/.cache, then stop; a run
    /// without --shard merges all shard files it finds there.
    #[arg(long, value_parser = crate::shard::parse_shard)]
    shard: Option<(usize, usize)>,
    /// Interpreter threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
    threads: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// A parsed candidate list.
#[derive(Clone)]
pub(crate) struct Candidates(pub(crate) Vec<Candidate>);

pub(crate) fn parse_candidates(s: &str) -> Result<Candidates, String> {
    let list: Result<Vec<Candidate>, String> = s
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            Candidate::parse(c)
                .ok_or_else(|| format!("'{c}' is not a candidate like w8a16, wfp16afp16 or w4b32a16"))
        })
        .collect();
    let list = list?;
    if list.is_empty() {
        return Err("no candidates given".into());
    }
    Ok(Candidates(list))
}

fn parse_threshold(s: &str) -> Result<Phase3Threshold, String> {
    match s {
        "cycles" => Ok(Phase3Threshold::WeightedWithPredictedConvertCost),
        "size" => Ok(Phase3Threshold::WeightedWithTensorSize),
        "count" => Ok(Phase3Threshold::UnweightedCutSize),
        _ => Err(format!("unknown phase-3 budget '{s}': cycles, size or count")),
    }
}

fn parse_metric(s: &str) -> Result<Metric, String> {
    match s {
        "amp_sqnr" => Ok(Metric::AmpSqnr),
        "sqnr" => Ok(Metric::Sqnr),
        "psnr" => Ok(Metric::Psnr),
        _ => Err(format!("unknown metric '{s}': amp_sqnr, sqnr or psnr")),
    }
}

pub fn run(a: AmpArgs) -> Result<(), Failure> {
    let candidates = a.candidates.0.clone();
    let highest =
        candidates.iter().copied().fold(candidates[0], |m, c| if c.cost() > m.cost() { c } else { m });
    let mut config = crate::dataset::quantsim_config(&a.job.config, &a.job.passes)?;
    let target = a.device.target()?;
    if let Some(t) = &target {
        t.apply_to(&mut config);
    }
    let options = SimOptions {
        scheme: a.job.scheme,
        threads: a.threads,
        precision: DefaultPrecision { param: highest.param, activation: highest.activation },
        converts: a.device.converts,
        ..SimOptions::default()
    };
    let (model, JobData { calib, eval, labels }, frozen) =
        crate::ptq::load_job(&a.job, &a.evaluation, &a.job.ptq, &config, options, a.quiet)?;
    let mut sim = QuantSim::new(model, config, options).map_err(user)?;
    qcalib::freeze_encodings(&mut sim, &frozen);
    a.job.blocks.apply(&mut sim, options.precision.param)?;
    let batch = a.job.batch.max(1);
    let calibration: Vec<qcalib::Feeds> = calib.batches(batch).collect::<Result<_, _>>()?;
    let phase1_samples = a.phase1_samples.clamp(1, calib.samples);
    let phase1: Vec<qcalib::Feeds> = (0..phase1_samples)
        .step_by(batch)
        .map(|s| calib.batch(s..(s + batch).min(phase1_samples)))
        .collect::<Result<_, _>>()?;
    let eval_set = eval.as_ref().unwrap_or(&calib);
    let offset = a.evaluation.label_offset;
    let eval_batches: Vec<qcalib::Feeds> = eval_set.batches(batch).collect::<Result<_, _>>()?;
    // Phase 2: top-1 with labels, else the SQNR of the outputs against FP32.
    let sqnr_reference = match &labels {
        Some(_) => None,
        // Only full runs are scored against it: no FP32 intermediates to keep.
        None => Some(FloatReference::with_budget(&sim, &eval_batches, a.threads, 0).map_err(user)?),
    };
    let description = match &labels {
        Some(l) => format!("top-1 on {} samples ({} labels, offset {offset})", eval_set.samples, l.len()),
        None => format!("sqnr_db against FP32 on {} samples", eval_set.samples),
    };
    let mut eval_fn = |sim: &QuantSim| -> Result<f64, String> {
        match (&labels, &sqnr_reference) {
            (Some(l), _) => {
                top1(eval_set, l, batch, offset, &|f| sim.run(f).map_err(user)).map_err(|e| e.to_string())
            }
            (None, Some(r)) => r.score(sim, Metric::Sqnr).map_err(|e| e.to_string()),
            (None, None) => Err("no phase-2 metric".into()),
        }
    };
    let cost_table = a.cost.as_deref().map(qmix::CostTable::load).transpose().map_err(user)?;
    let amp_options = AmpOptions {
        candidates,
        allowed_accuracy_drop: a.allowed_drop,
        search: a.search,
        full_front: a.full_front,
        budget_search: a.budget_search,
        phase1_metric: a.phase1_metric,
        use_all_amp_candidates: a.use_all_candidates,
        mac_ops: if a.aimet_macs { MacOps::AimetCompatible } else { MacOps::All },
        cost_table,
        results_dir: Some(a.out.clone()),
        clean_start: a.clean_start,
        shard: a.shard,
        threads: a.threads,
        fp32_cache_bytes: a.job.fp32_cache_bytes(crate::dataset::RESUMED_FP32_MIB),
        phase3: a
            .phase3
            .then(|| Phase3Options { alphas: a.phase3_alphas.clone(), threshold: a.phase3_budget }),
        target: target.clone(),
    };
    say!(
        "{}: AMP over {} with {} calibration samples, phase 1 on {}, phase 2 = {description}",
        a.job.model.display(),
        a.candidates.0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        calib.samples,
        phase1_samples,
    );
    let started = Instant::now();
    let mut pb = bar(0, "", "steps", true);
    let quiet = a.quiet;
    let mut progress = |e: AmpEvent| match e {
        AmpEvent::Stage { name, total } => {
            pb.finish_and_clear();
            pb = bar(total, name, "steps", quiet);
        }
        AmpEvent::Step(d) => pb.set_position(d as u64),
    };
    let result = qmix::choose_mixed_precision(
        &mut sim,
        &AmpData { calibration: &calibration, phase1: &phase1 },
        Phase2 { description, eval: &mut eval_fn },
        &amp_options,
        &mut progress,
    )
    .map_err(|e| match e {
        qmix::AmpError::Cache { .. } => user(anyhow::anyhow!("{e} (rerun with --clean-start to discard it)")),
        e => user(e),
    })?;
    pb.finish_and_clear();
    if let Some((i, n)) = a.shard {
        say!(
            "phase-1 shard {i}/{n}: {} evaluations in {:.1} s, cached in {}",
            result.work.phase1_evaluations,
            started.elapsed().as_secs_f64(),
            a.out.join(".cache").display()
        );
        return Ok(());
    }
    // The reports and the encodings reach --out together (the cache stays in --out/.cache).
    let mut set = qgraph::OutputSet::begin(&a.out).map_err(user)?;
    let changes = result.target_changes.clone();
    if let Some(t) = &target {
        crate::device::write_legality(t, &changes, &mut set)?;
    }
    qmix::write_amp_report(&result, a.allowed_drop, set.staging_dir()).map_err(user)?;
    qcalib::write_encodings(&sim, EncodingVersion::V1_0_0, &set.staged("model_amp.encodings"))
        .map_err(user)?;
    a.device.write_qdq(&sim, &mut set, "model_amp_qdq.onnx")?;
    set.commit().map_err(user)?;
    let w = result.work;
    say!(
        "{} quantizer groups, {} (group, candidate) entries; FP32 {:.4}; {}",
        result.groups.len(),
        result.accuracy_list.len(),
        result.fp32_score,
        result.baseline_scores.iter().map(|(c, s)| format!("{c} {s:.4}")).collect::<Vec<_>>().join(", ")
    );
    let flipped = result.assignment.iter().filter(|&&c| c != result.baseline).count();
    say!(
        "chosen: score {:.4} at {:.3} of the {} bit-ops ({} of {} groups below {}); {:?}",
        result.final_score,
        result.final_relative_bitops,
        result.baseline,
        flipped,
        result.groups.len(),
        result.baseline,
        result.outcome
    );
    if let Some(b) = &result.budget {
        say!(
            "budget search: {} predicted plans, {} evaluated, {}; area between its front and the greedy one {:+.4} (positive: budget better); final plan from the {} search",
            b.plans.len(),
            b.evaluated.len(),
            b.chosen.map_or("none meets the target".into(), |i| format!(
                "cheapest meeting the target at {:.3} bit-ops",
                b.plans[i].relative_bitops
            )),
            b.area_vs_greedy,
            result.chosen_by
        );
    }
    if let Some(p3) = &result.phase3 {
        match &p3.skipped {
            Some(why) => say!("phase 3 skipped: {why}"),
            None => {
                say!(
                    "phase 3 ({}): {} groups, {} edges; phase-2 plan has {} converts ({:.0} predicted cycles); exact front of {} plans",
                    p3.threshold.name(),
                    p3.graph.nodes.len(),
                    p3.graph.edges.len(),
                    p3.phase2_converts,
                    p3.phase2_convert_cycles,
                    p3.front.len()
                );
                for plan in &p3.plans {
                    say!("  {}", plan.summary());
                }
            }
        }
    }
    if let Some(t) = &target {
        crate::device::say_changes(t, &changes);
        say!(
            "every plan above was scored as the target runs it; the chosen plan's cost includes the changes"
        );
    }
    say!(
        "this run: {} phase-1 and {} phase-2 evaluations, {} calibrations, {} points reused; {} points on record; {:.1} s",
        w.phase1_evaluations,
        w.phase2_evaluations,
        w.calibrations,
        w.reused_points,
        result.points.len(),
        started.elapsed().as_secs_f64()
    );
    say!("wrote {}", a.out.display());
    crate::summary(serde_json::json!({
        "command": "amp",
        "model": a.job.model.display().to_string(),
        "out": a.out.display().to_string(),
        "fp32": result.fp32_score,
        "baselines": result.baseline_scores.iter().map(|(c, s)| (c.to_string(), *s)).collect::<std::collections::BTreeMap<_, _>>(),
        "final_score": result.final_score,
        "final_relative_bitops": result.final_relative_bitops,
        "outcome": format!("{:?}", result.outcome),
        "chosen_by": result.chosen_by,
        "target_changes": changes.len(),
        "groups": result.groups.len(),
        "evaluations_this_run": {"phase1": w.phase1_evaluations, "phase2": w.phase2_evaluations},
        "phase3": result.phase3.as_ref().map(|p3| p3.plans.iter().map(|p| serde_json::json!({
            "alpha": p.alpha, "converts": p.converts, "relative_bitops": p.relative_bitops, "score": p.score,
        })).collect::<Vec<_>>()),
    }));
    Ok(())
}

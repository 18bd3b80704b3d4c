//! AMP on the zoo against AIMET 2.42's `choose_mixed_precision` run
//! (`../shared/zoo/aimet/mobilenetv2_keras/amp_per_tensor_binary_drop1pp/`): mobilenetv2_keras,
//! config `default_per_tensor`, candidates W16A16/W8A16/W16A8/W8A8, min-max on the 100 calibration
//! images, phase 1 = AIMET's SQNR on the first 32 of them, phase 2 = top-1 on the 400 evaluation
//! images, Binary search, allowed drop 1 pp. Checked: the quantizer groups, the baseline scores,
//! every phase-1 score and bit-ops saving, and that the chosen point is within the drop; the time
//! is printed next to AIMET's.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use qanalyze::Metric;
use qcalib::{DefaultPrecision, Precision, QuantSim, QuantsimConfig, SimOptions};
use qmix::{AmpData, AmpOptions, Candidate, MacOps, Phase2, Phase3Options, SearchAlgo};
use serde_json::Value;

use crate::zoo_data::{self, CLASSIFIERS};

/// A group as a set of names, the way both tools can name it.
type GroupKey = BTreeSet<String>;

fn key(list: &Value) -> Result<GroupKey> {
    list.as_array()
        .context("group list")?
        .iter()
        .map(|e| e[1].as_str().map(str::to_string).context("group entry"))
        .collect()
}

pub fn check(zoo: &Path) -> Result<()> {
    let dir = zoo.join("aimet/mobilenetv2_keras/amp_per_tensor_binary_drop1pp");
    if !dir.is_dir() {
        bail!("{} is missing", dir.display());
    }
    let read = |f: &str| -> Result<Value> { Ok(serde_json::from_slice(&std::fs::read(dir.join(f))?)?) };
    let (aimet_list, aimet_results, aimet_timings) =
        (read("amp_accuracy_list.json")?, read("amp_results.json")?, read("timings.json")?);
    let c = CLASSIFIERS.iter().find(|c| c.name == "mobilenetv2_keras").context("classifier")?;
    let images = zoo_data::raw_images(zoo, c.images)?;
    let labels: Vec<i64> = zoo_data::labels(zoo)?.to_vec();
    let calib_rows: Vec<usize> = (0..500).filter(|r| r % 5 == 0).collect();
    let eval_rows: Vec<usize> = (0..500).filter(|r| r % 5 != 0).collect();
    let precision = DefaultPrecision { param: Precision::Int(16), activation: Precision::Int(16) };
    let options = SimOptions { threads: 0, precision, ..SimOptions::default() };
    let model = qgraph::load_path(zoo.join("models/mobilenetv2_keras.onnx"))?;
    let mut sim = QuantSim::new(model, QuantsimConfig::load("default_per_tensor")?, options)?;
    let input = sim.model().graph.value(sim.model().graph.inputs()[0]).name.clone();
    let calibration: Vec<qcalib::Feeds> =
        calib_rows.chunks(32).map(|r| vec![(input.clone(), c.batch(&images, r))]).collect();
    let phase1 = vec![vec![(input.clone(), c.batch(&images, &calib_rows[..32]))]];
    let eval: Vec<(Vec<usize>, qgraph::Tensor)> =
        eval_rows.chunks(32).map(|r| (r.to_vec(), c.batch(&images, r))).collect();
    let mut top1 = |sim: &QuantSim| -> Result<f64, String> {
        let mut correct = 0usize;
        for (rows, x) in &eval {
            let out = sim.run(&[(input.as_str(), x.clone())]).map_err(|e| e.to_string())?;
            let preds = zoo_data::argmax_rows(&out[0], c.label_offset).map_err(|e| e.to_string())?;
            correct += preds.iter().zip(rows).filter(|(p, r)| **p == labels[**r]).count();
        }
        Ok(correct as f64 / eval_rows.len() as f64)
    };
    let candidates: Vec<Candidate> =
        ["w16a16", "w16a8", "w8a16", "w8a8"].iter().map(|s| Candidate::parse(s).expect("valid")).collect();
    let results_dir = crate::zoo::out_dir()?.join("amp_mobilenetv2_keras");
    let amp_options = AmpOptions {
        candidates,
        allowed_accuracy_drop: Some(0.01),
        search: SearchAlgo::Binary,
        full_front: false,
        budget_search: true,
        phase1_metric: Metric::AmpSqnr,
        use_all_amp_candidates: false,
        mac_ops: MacOps::AimetCompatible,
        cost_table: None,
        results_dir: Some(results_dir.clone()),
        clean_start: true,
        shard: None,
        threads: 0,
        fp32_cache_bytes: qanalyze::DEFAULT_CACHE_BUDGET,
        phase3: Some(Phase3Options::default()),
        target: None,
    };
    let started = Instant::now();
    let r = qmix::choose_mixed_precision(
        &mut sim,
        &AmpData { calibration: &calibration, phase1: &phase1 },
        Phase2 { description: "top-1 on the 400 evaluation images".into(), eval: &mut top1 },
        &amp_options,
        &mut |_| {},
    )?;
    let secs = started.elapsed().as_secs_f64();
    qmix::write_amp_report(&r, Some(0.01), &results_dir)?;
    let mut failures = Vec::new();

    // Groups.
    let ours: Vec<GroupKey> =
        r.groups.iter().map(|g| g.activation_names.iter().chain(&g.param_names).cloned().collect()).collect();
    let theirs: BTreeSet<GroupKey> = aimet_list
        .as_array()
        .context("accuracy list")?
        .iter()
        .map(|e| key(&e["group"]))
        .collect::<Result<_>>()?;
    let same_groups = ours.iter().filter(|g| theirs.contains(*g)).count();
    println!("AMP on mobilenetv2_keras (per-tensor, W16A16/W16A8/W8A16/W8A8, drop 1 pp) vs AIMET 2.42:");
    println!("  quantizer groups: {} (AIMET {}), {same_groups} identical", ours.len(), theirs.len());
    if same_groups != theirs.len() || ours.len() != theirs.len() {
        failures.push(format!("groups differ: {same_groups} of {} identical", theirs.len()));
    }
    // Baselines.
    let fp32 = aimet_results["fp32_score"].as_f64().context("fp32_score")?;
    let best = aimet_results["best_candidate"]["score"].as_f64().context("best score")?;
    let lowest = aimet_results["lowest_candidate"]["score"].as_f64().context("lowest score")?;
    let score_of =
        |label: &str| r.baseline_scores.iter().find(|(c, _)| c.to_string() == label).map(|(_, s)| *s);
    println!(
        "  top-1: FP32 {:.4} (AIMET {fp32:.4}), W16A16 {:.4} (AIMET {best:.4}), W8A8 {:.4} (AIMET {lowest:.4}); W16A8 {:.4}, W8A16 {:.4}",
        r.fp32_score,
        score_of("W16A16").unwrap_or(f64::NAN),
        score_of("W8A8").unwrap_or(f64::NAN),
        score_of("W16A8").unwrap_or(f64::NAN),
        score_of("W8A16").unwrap_or(f64::NAN),
    );
    if (r.fp32_score - fp32).abs() > 1e-9
        || r.baseline.to_string() != "W16A16"
        || r.lowest.to_string() != "W8A8"
    {
        failures.push(format!("baselines: FP32 {}, start {}, lowest {}", r.fp32_score, r.baseline, r.lowest));
    }
    // Phase 1.
    let ours_scores: HashMap<(GroupKey, String), (f64, f64)> = r
        .accuracy_list
        .iter()
        .map(|e| ((ours[e.group].clone(), e.candidate.aimet_label()), (e.score, e.bitops_reduction)))
        .collect();
    let (mut diffs, mut bitops_equal, mut matched) = (Vec::new(), 0usize, 0usize);
    for e in aimet_list.as_array().context("accuracy list")? {
        let k = (key(&e["group"])?, e["candidate"].as_str().context("candidate")?.to_string());
        let Some(&(score, saving)) = ours_scores.get(&k) else { continue };
        matched += 1;
        diffs.push((score - e["score"].as_f64().context("score")?).abs());
        if (saving - e["bitops_reduction"].as_f64().context("bitops")?).abs() < 0.5 {
            bitops_equal += 1;
        }
    }
    let close = diffs.iter().filter(|&&d| d <= 0.05).count();
    let worst = diffs.iter().copied().fold(0f64, f64::max);
    println!(
        "  phase 1: {matched}/{} entries matched, {close} within 0.05 dB of AIMET's SQNR (max |Δ| {worst:.3} dB), bit-ops savings equal for {bitops_equal}",
        aimet_list.as_array().map_or(0, Vec::len)
    );
    if matched != r.accuracy_list.len() || close * 100 < matched * 95 || bitops_equal != matched {
        failures
            .push(format!("phase 1: {matched} matched, {close} close, {bitops_equal} equal bit-ops savings"));
    }
    // Phase 2.
    let aimet_final = aimet_results["final_phase2_score"].as_f64().context("final score")?;
    let aimet_total =
        aimet_timings["seconds_by_step"]["choose_mixed_precision_total"].as_f64().unwrap_or(f64::NAN);
    let greedy = r.chosen_point.and_then(|i| r.points.iter().find(|p| p.index == i));
    println!(
        "  greedy (AIMET's algorithm): top-1 {} at {} of the W16A16 bit-ops after {} evaluated points (AIMET: {aimet_final:.4} at 0.348, 9 points)",
        greedy.map_or("-".into(), |p| format!("{:.4}", p.score)),
        greedy.map_or("-".into(), |p| format!("{:.3}", p.relative_bitops)),
        r.points.len()
    );
    let budget_s = r.timings.iter().find(|(k, _)| *k == "budget search").map_or(0.0, |t| t.1);
    let phase3_s = r.timings.iter().find(|(k, _)| *k == "phase 3").map_or(0.0, |t| t.1);
    let greedy_s = secs - budget_s - phase3_s;
    println!(
        "  time of AIMET's algorithm: {greedy_s:.0} s ({} calibrations, {} phase-1 and {} phase-2 evaluations in all) vs AIMET {aimet_total:.0} s: {:.1}× faster",
        r.work.calibrations,
        r.work.phase1_evaluations,
        r.work.phase2_evaluations,
        aimet_total / greedy_s
    );
    if let Some(b) = &r.budget {
        println!(
            "  budget-optimal search (+{budget_s:.0} s, {} plans evaluated): {}; final plan from the {} search",
            b.evaluated.len(),
            b.chosen.map_or("no plan meets the target".into(), |i| format!(
                "cheapest plan within the drop at {:.3} of the bit-ops",
                b.plans[i].relative_bitops
            )),
            r.chosen_by
        );
    }
    if let Some(p3) = &r.phase3 {
        match &p3.skipped {
            Some(why) => println!("  phase 3: skipped, {why}"),
            None => {
                println!(
                    "  phase 3 (+{phase3_s:.0} s, exact over {} groups and {} edges, front of {} plans): the chosen plan has {} converts ({:.0} predicted cycles)",
                    p3.graph.nodes.len(),
                    p3.graph.edges.len(),
                    p3.front.len(),
                    p3.phase2_converts,
                    p3.phase2_convert_cycles
                );
                for plan in &p3.plans {
                    println!("    {}", plan.summary());
                    if plan.assignment.is_some()
                        && (plan.weighted_cut > p3.phase2_weighted_cut * (1.0 + 1e-12)
                            || plan.relative_bitops < r.final_relative_bitops - 1e-12)
                    {
                        failures.push(format!("phase-3 plan for alpha {} has a larger convert cost or fewer bit-ops than phase 2's", plan.alpha));
                    }
                }
            }
        }
    }
    println!("  results, Pareto curve and sensitivity chart: {}", results_dir.display());
    if r.final_score < r.fp32_score - 0.01 - 1e-9 {
        failures.push(format!("chosen point scores {:.4}, below FP32 − 1 pp", r.final_score));
    }
    let (line, failure) =
        crate::zoo_calib::mixed_plan_in_onnxruntime(&mut sim, "amp", c, &images, &eval_rows, &labels)?;
    println!("  the chosen plan on the device: {line}");
    failures.extend(failure);
    if !failures.is_empty() {
        bail!("AMP differs from AIMET: {}", failures.join("; "));
    }
    Ok(())
}

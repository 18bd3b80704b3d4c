//! AMP results on disk: `accuracy_list.json` (phase 1, least sensitive first), `pareto_list.json`
//! (every evaluated phase-2 point, Pareto-optimal ones marked), `amp_info.json` (scores, choice,
//! flipped quantizer counts, timings, work done) and two SVG charts drawn with `plotters`:
//! `pareto_curve.svg` (score against relative bit-ops) and `quantizer_group_sensitivity.svg`
//! (phase-1 score per group and candidate), and the phase-3 plans when phase 3 ran. Every file is
//! written atomically.

use std::path::Path;

use plotters::prelude::*;
use qcalib::Precision;
use serde_json::{Value, json};

use crate::AmpError;
use crate::amp::AmpResult;
use crate::convert_ops::Phase3Result;
use crate::search::pareto_indices;

fn write(path: &Path, text: &str) -> Result<(), AmpError> {
    qgraph::write_atomically(path, text.as_bytes())
        .map_err(|e| AmpError::Write { path: path.into(), detail: e.to_string() })
}

fn group_list(r: &AmpResult, g: usize) -> Value {
    json!(r.groups[g].to_list().iter().map(|(kind, name)| json!([kind, name])).collect::<Vec<_>>())
}

/// The summary `amp_info.json` holds.
pub fn amp_info(r: &AmpResult, allowed_drop: Option<f64>) -> Value {
    let (mut act_total, mut act_flipped, mut param_total, mut param_flipped) = (0, 0, 0, 0);
    for (g, c) in r.groups.iter().zip(&r.assignment) {
        act_total += g.activations.len();
        param_total += g.params.len();
        if c.activation != r.baseline.activation {
            act_flipped += g.activations.len();
        }
        if c.param != r.baseline.param {
            param_flipped += g.params.len();
        }
    }
    let groups: Vec<Value> = r
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| json!({"group": i, "quantizers": group_list(r, i), "ops": g.op_types, "candidate": r.assignment.get(i).map(ToString::to_string)}))
        .collect();
    json!({
        "fp32_score": r.fp32_score,
        "allowed_accuracy_drop": allowed_drop,
        "baseline_scores": r.baseline_scores.iter().map(|(c, s)| json!({"candidate": c.to_string(), "score": s})).collect::<Vec<_>>(),
        "starting_candidate": r.baseline.to_string(),
        "lowest_candidate": r.lowest.to_string(),
        "outcome": format!("{:?}", r.outcome),
        "chosen_point": r.chosen_point,
        "final_score": r.final_score,
        "final_relative_bitops": r.final_relative_bitops,
        "quantizer_groups": r.groups.len(),
        "accuracy_list_entries": r.accuracy_list.len(),
        "phase2_points_evaluated_or_cached": r.points.len(),
        "activation_quantizers": act_total,
        "param_quantizers": param_total,
        "activation_quantizers_flipped": act_flipped,
        "param_quantizers_flipped": param_flipped,
        "work_this_run": {
            "phase1_evaluations": r.work.phase1_evaluations,
            "phase2_evaluations": r.work.phase2_evaluations,
            "calibrations": r.work.calibrations,
            "reused_points": r.work.reused_points,
        },
        "seconds": r.timings.iter().map(|(k, s)| json!([k, s])).collect::<Vec<_>>(),
        "chosen_by": r.chosen_by,
        "budget_search": r.budget.as_ref().map(|b| json!({
            "predicted_plans": b.plans.len(),
            "evaluated": b.evaluated.iter().map(|&(i, s)| json!({
                "plan": i, "relative_bitops": b.plans[i].relative_bitops, "predicted_noise": b.plans[i].predicted_noise,
                "score": s, "chosen": b.chosen == Some(i),
            })).collect::<Vec<_>>(),
            "area_vs_greedy": b.area_vs_greedy,
        })),
        "groups": groups,
    })
}

/// Writes the AMP results into `dir`.
pub fn write_amp_report(r: &AmpResult, allowed_drop: Option<f64>, dir: &Path) -> Result<(), AmpError> {
    std::fs::create_dir_all(dir).map_err(|source| AmpError::Io { path: dir.into(), source })?;
    let accuracy: Vec<Value> = r
        .accuracy_list
        .iter()
        .enumerate()
        .map(|(rank, e)| {
            json!({"rank": rank, "group": group_list(r, e.group), "group_index": e.group, "candidate": e.candidate.to_string(),
                   "aimet_candidate": e.candidate.aimet_label(), "score": e.score, "bitops_reduction": e.bitops_reduction})
        })
        .collect();
    write(&dir.join("accuracy_list.json"), &qcalib::to_pretty_json(&json!(accuracy)))?;
    let pts: Vec<(f64, f64)> = r.points.iter().map(|p| (p.relative_bitops, p.score)).collect();
    let front = pareto_indices(&pts);
    let points: Vec<Value> = r
        .points
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let e = &r.accuracy_list[p.index];
            json!({"point": p.index, "relative_bitops": p.relative_bitops, "score": p.score, "pareto_optimal": front.contains(&k),
                   "group": group_list(r, e.group), "candidate": e.candidate.to_string(), "chosen": r.chosen_point == Some(p.index)})
        })
        .collect();
    write(&dir.join("pareto_list.json"), &qcalib::to_pretty_json(&json!(points)))?;
    write(&dir.join("amp_info.json"), &qcalib::to_pretty_json(&amp_info(r, allowed_drop)))?;
    let target = allowed_drop.map(|d| r.fp32_score - d);
    let svg = pareto_svg(r, &front, target)
        .map_err(|e| AmpError::Settings(format!("drawing the Pareto curve: {e}")))?;
    write(&dir.join("pareto_curve.svg"), &svg)?;
    let svg =
        sensitivity_svg(r).map_err(|e| AmpError::Settings(format!("drawing the sensitivity chart: {e}")))?;
    write(&dir.join("quantizer_group_sensitivity.svg"), &svg)?;
    if let Some(p3) = &r.phase3 {
        write_phase3(r, p3, dir)?;
    }
    Ok(())
}

/// Phase-3 files: `phase3.json` (the front and every alpha's plan), and per alpha AIMET's
/// `AMP_phase_3_data_alpha_<a>.json`, `AMP_ph3_export_alpha_<a>.encodings` and a Graphviz file of
/// the group graph coloured by activation precision (plus one for the phase-2 plan).
fn write_phase3(r: &AmpResult, p3: &Phase3Result, dir: &Path) -> Result<(), AmpError> {
    let bits = |a: &[Precision], b: u32| p3.graph.nodes.iter().filter(|&&g| a[g].bits() == b).count();
    let phase2_act = &p3.phase2_activation;
    let plans: Vec<Value> = p3
        .plans
        .iter()
        .map(|p| {
            json!({"alpha": p.alpha, "budget": p.budget, "feasible": p.assignment.is_some(), "converts": p.converts,
                   "weighted_cut": p.weighted_cut, "convert_cycles": p.convert_cycles, "relative_bitops": p.relative_bitops,
                   "score": p.score, "raised_groups": p.raised,
                   "assignment": p.assignment.as_ref().map(|a| a.iter().map(ToString::to_string).collect::<Vec<_>>())})
        })
        .collect();
    let edges: Vec<Value> = p3
        .graph
        .edges
        .iter()
        .map(|e| json!({"from": e.from, "to": e.to, "tensor": e.tensor, "tensor_size": e.tensor_size, "convert_cycles": e.convert_cycles}))
        .collect();
    let summary = json!({
        "threshold": p3.threshold.name(),
        "skipped": p3.skipped,
        "groups": p3.graph.nodes,
        "edges": edges,
        "phase2_converts": p3.phase2_converts,
        "phase2_weighted_cut": p3.phase2_weighted_cut,
        "phase2_convert_cycles": p3.phase2_convert_cycles,
        "front": p3.front.iter().map(|&(cut, rel)| json!({"weighted_cut": cut, "relative_bitops": rel})).collect::<Vec<_>>(),
        "plans": plans,
    });
    write(&dir.join("phase3.json"), &qcalib::to_pretty_json(&summary))?;
    if p3.skipped.is_some() {
        return Ok(());
    }
    write(&dir.join("AMP_ph3_quantizer_group_graph_phase2sol.dot"), &p3.graph.to_dot(&r.groups, phase2_act))?;
    for p in &p3.plans {
        let alpha = format!("{:?}", p.alpha);
        let act: Option<Vec<Precision>> =
            p.assignment.as_ref().map(|a| a.iter().map(|c| c.activation).collect());
        let status = match (&act, p.alpha == 1.0) {
            (_, true) => "alpha = 1.0; solution copied from phase 2.",
            (Some(_), false) => "optimal",
            (None, false) => "infeasible",
        };
        let data = json!({
            "graph_number_of_nodes": p3.graph.nodes.len(),
            "graph_number_of_edges": p3.graph.edges.len(),
            "alpha": p.alpha,
            "sampling_version": p3.threshold.name(),
            "budget": p.budget,
            "problem_status": status,
            "relative_bitops": p.relative_bitops,
            "num_nodes_8bits_phase2": bits(phase2_act, 8),
            "num_nodes_16bits_phase2": bits(phase2_act, 16),
            "num_nodes_8bits_phase3": act.as_ref().map(|a| bits(a, 8)),
            "num_nodes_16bits_phase3": act.as_ref().map(|a| bits(a, 16)),
            "num_precision_changes_phase_2": p3.phase2_converts,
            "num_precision_changes_phase_3": act.as_ref().map(|_| p.converts),
            "weighted_cut_size_phase_2": p3.phase2_weighted_cut,
            "weighted_cut_size_phase_3": act.as_ref().map(|_| p.weighted_cut),
            "score": p.score,
        });
        write(&dir.join(format!("AMP_phase_3_data_alpha_{alpha}.json")), &qcalib::to_pretty_json(&data))?;
        if let Some(act) = &act {
            write(
                &dir.join(format!("AMP_ph3_quantizer_group_graph_phase3sol_alpha{alpha}.dot")),
                &p3.graph.to_dot(&r.groups, act),
            )?;
        }
        if let Some(enc) = &p.encodings {
            write(
                &dir.join(format!("AMP_ph3_export_alpha_{alpha}.encodings")),
                &qcalib::to_pretty_json(enc),
            )?;
        }
    }
    Ok(())
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The series legend, lower right.
fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

fn pareto_svg(r: &AmpResult, front: &[usize], target: Option<f64>) -> DrawResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 1000)).into_drawing_area();
        root.fill(&WHITE)?;
        let (all, near) = root.split_vertically(560);
        let phase3 = r.phase3.iter().flat_map(|p3| p3.plans.iter().filter_map(|p| p.score));
        let scores = r.points.iter().map(|p| p.score).chain([r.fp32_score]).chain(target).chain(phase3);
        let (lo, hi) = scores.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), s| (l.min(s), h.max(s)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        pareto_panel(
            &all,
            r,
            front,
            target,
            "AMP: score against bit-ops (relative to the starting point)",
            padded(lo, hi),
        )?;
        // The band that matters: from a little below the target (or the chosen point) to FP32.
        let floor = target.unwrap_or(r.final_score).min(r.final_score);
        let band = (r.fp32_score - floor).abs().max(0.005);
        let top = r.points.iter().map(|p| p.score).fold(r.fp32_score.max(floor), f64::max);
        let near_range = (floor - band)..(top + 0.15 * band);
        pareto_panel(&near, r, front, target, "zoomed near the target", near_range)?;
        root.present()?;
    }
    Ok(svg)
}

fn pareto_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    r: &AmpResult,
    front: &[usize],
    target: Option<f64>,
    title: &str,
    y: std::ops::Range<f64>,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    let (lo, hi) = (y.start, y.end);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..1.05f64, y)?;
    chart.configure_mesh().x_desc("relative bit-ops").y_desc("phase-2 score").draw()?;
    let inside = |s: f64| (lo..=hi).contains(&s);
    chart
        .draw_series(LineSeries::new([(0.0, r.fp32_score), (1.05, r.fp32_score)], BLACK.mix(0.5)))?
        .label(format!("FP32 {:.4}", r.fp32_score))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    if let Some(t) = target {
        chart
            .draw_series(LineSeries::new([(0.0, t), (1.05, t)], RED.mix(0.6)))?
            .label(format!("target {t:.4}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.6)));
    }
    chart
        .draw_series(
            r.points
                .iter()
                .filter(|p| inside(p.score))
                .map(|p| Circle::new((p.relative_bitops, p.score), 3, BLUE.mix(0.5).filled())),
        )?
        .label("evaluated point")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, BLUE.mix(0.5).filled()));
    if let Some(b) = &r.budget {
        let pts: Vec<(f64, f64)> = b
            .evaluated
            .iter()
            .map(|&(i, s)| (b.plans[i].relative_bitops, s))
            .filter(|p| inside(p.1))
            .collect();
        let orange = RGBColor(230, 120, 0);
        chart
            .draw_series(pts.iter().map(|&p| TriangleMarker::new(p, 6, orange.filled())))?
            .label("budget-optimal plan (evaluated)")
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, orange.filled()));
    }
    if let Some(p3) = &r.phase3 {
        let purple = RGBColor(140, 60, 180);
        // Alphas that give the same plan share one marker.
        let mut pts: Vec<(f64, f64, Vec<String>)> = Vec::new();
        for p in p3.plans.iter().filter(|p| p.alpha < 1.0) {
            let Some(score) = p.score.filter(|&s| inside(s)) else { continue };
            match pts.iter_mut().find(|q| q.0 == p.relative_bitops && q.1 == score) {
                Some(q) => q.2.push(format!("{:.1}", p.alpha)),
                None => pts.push((p.relative_bitops, score, vec![format!("{:.1}", p.alpha)])),
            }
        }
        chart
            .draw_series(pts.iter().map(|(x, y, alphas)| {
                EmptyElement::at((*x, *y))
                    + Rectangle::new([(-4, -4), (4, 4)], purple.filled())
                    + Text::new(
                        format!("α {}", alphas.join(", ")),
                        (6, -14),
                        ("sans-serif", 12).into_font().color(&purple),
                    )
            }))?
            .label("phase-3 plan (fewer converts)")
            .legend(move |(x, y)| Rectangle::new([(x + 6, y - 4), (x + 14, y + 4)], purple.filled()));
    }
    let mut line: Vec<(f64, f64)> = front
        .iter()
        .map(|&k| (r.points[k].relative_bitops, r.points[k].score))
        .filter(|p| inside(p.1))
        .collect();
    line.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(line, GREEN.stroke_width(2)))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(std::iter::once(Cross::new(
            (r.final_relative_bitops, r.final_score),
            8,
            RED.stroke_width(3),
        )))?
        .label(format!("chosen: {:.4} at {:.3} bit-ops", r.final_score, r.final_relative_bitops))
        .legend(|(x, y)| Cross::new((x + 10, y), 5, RED.stroke_width(2)));
    legend(&mut chart)
}

fn sensitivity_svg(r: &AmpResult) -> DrawResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 640)).into_drawing_area();
        root.fill(&WHITE)?;
        let finite: Vec<f64> = r.accuracy_list.iter().map(|e| e.score).filter(|s| s.is_finite()).collect();
        let (lo, hi) =
            finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &s| (l.min(s), h.max(s)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let mut chart = ChartBuilder::on(&root)
            .caption("Phase 1: score with only one quantizer group at a candidate", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(r.groups.len() as f64 - 0.5).max(0.5), padded(lo, hi))?;
        chart
            .configure_mesh()
            .x_desc("quantizer group (topological order)")
            .y_desc("phase-1 score")
            .draw()?;
        let mut candidates: Vec<crate::Candidate> = Vec::new();
        for e in &r.accuracy_list {
            if !candidates.contains(&e.candidate) {
                candidates.push(e.candidate);
            }
        }
        for (k, c) in candidates.iter().enumerate() {
            let color = Palette99::pick(k).mix(0.8);
            let pts: Vec<(f64, f64)> = r
                .accuracy_list
                .iter()
                .filter(|e| e.candidate == *c && e.score.is_finite())
                .map(|e| (e.group as f64 + (k as f64 - 1.0) * 0.15, e.score))
                .collect();
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?
                .label(c.to_string())
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, Palette99::pick(k).filled()));
        }
        legend(&mut chart)?;
        root.present()?;
    }
    Ok(svg)
}

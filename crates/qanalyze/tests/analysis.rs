//! The analysis on a small CNN built in the test: enable-one sensitivity (one score per layer in
//! topological order, quantizers restored afterwards, identical results on one and two threads and
//! with batches run whole or sample by sample, the same scores when the FP32 values exceed the
//! memory budget and are recomputed, a coarser layer scoring worse, a typed error without data),
//! disable-one and whole-model checks,
//! per-layer MSE, ranges, histograms and the report in its three forms.

use qanalyze::{AnalyzeError, Metric};
use qcalib::{Precision, QuantSim, QuantsimConfig, SimOptions};
use qgraph::{Attribute, DType, Dim, Graph, Model, Shape, Tensor};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// input → Conv → Relu → Conv → GlobalAveragePool → Flatten → Gemm.
fn model() -> Model {
    model_with_batch(Dim::Symbol("N".into()))
}

fn model_with_batch(batch: Dim) -> Model {
    let mut g = Graph::new("cnn");
    let x = g.add_input("input", DType::F32, Shape(vec![batch, Dim::Known(2), Dim::Known(6), Dim::Known(6)]));
    let w0 = g.add_initializer("w0", Tensor::from_vec(&[4, 2, 3, 3], values(72, 1)).unwrap());
    let w1 = g.add_initializer("w1", Tensor::from_vec(&[4, 4, 1, 1], values(16, 2)).unwrap());
    let wf = g.add_initializer("wf", Tensor::from_vec(&[5, 4], values(20, 3)).unwrap());
    let pads = ("pads", Attribute::Ints(vec![1, 1, 1, 1]));
    let c0 = g.add_op("Conv", "conv0", &[x, w0], vec![pads]);
    let r0 = g.add_op("Relu", "relu0", &[c0], vec![]);
    let c1 = g.add_op("Conv", "conv1", &[r0, w1], vec![]);
    let p = g.add_op("GlobalAveragePool", "pool", &[c1], vec![]);
    let f = g.add_op("Flatten", "flat", &[p], vec![]);
    let y = g.add_op("Gemm", "fc", &[f, wf], vec![("transB", Attribute::Int(1))]);
    g.add_output(y);
    Model::new(g, 13)
}

fn batches() -> Vec<qcalib::Feeds> {
    (0..2)
        .map(|i| vec![("input".to_string(), Tensor::from_vec(&[4, 2, 6, 6], values(288, 10 + i)).unwrap())])
        .collect()
}

/// The FP32 run of the test batches, to score against.
fn fp32(sim: &QuantSim, threads: usize) -> qanalyze::FloatReference {
    qanalyze::FloatReference::new(sim, &batches(), threads).unwrap()
}

/// The model with the given batch axis calibrated on two threads: a fixed axis keeps batches
/// whole, a free one runs them sample by sample.
fn calibrated_with(batch: Dim) -> QuantSim {
    let options = SimOptions { threads: 2, ..SimOptions::default() };
    let mut sim =
        QuantSim::new(model_with_batch(batch), QuantsimConfig::load("default").unwrap(), options).unwrap();
    sim.calibrate(batches(), &mut |_| {}).unwrap();
    sim
}

fn calibrated(threads: usize) -> QuantSim {
    let options = SimOptions { threads, ..SimOptions::default() };
    let mut sim = QuantSim::new(model(), QuantsimConfig::load("default").unwrap(), options).unwrap();
    sim.calibrate(batches(), &mut |_| {}).unwrap();
    sim
}

#[test]
fn one_score_per_layer_and_the_simulation_is_restored() {
    let mut sim = calibrated(1);
    let before = qcalib::encodings_json(&sim, qcalib::EncodingVersion::V1_0_0);
    let feeds = &batches()[0];
    let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let out_before = sim.run(&named).unwrap();
    let mut calls = 0;
    let fp32_sim = fp32(&sim, 1);
    let scores = qanalyze::enable_one(&mut sim, &fp32_sim, Metric::Psnr, &mut |_, _| calls += 1).unwrap();
    let names: Vec<&str> = scores.iter().map(|s| s.layer.as_str()).collect();
    // Conv+Relu is a supergroup; Flatten carries no quantizer.
    assert_eq!(names, ["conv0", "relu0", "conv1", "pool", "fc"]);
    assert_eq!(calls, scores.len());
    assert!(scores.iter().all(|s| s.score.is_finite() && s.score > 10.0), "{scores:?}");
    assert_eq!(qcalib::encodings_json(&sim, qcalib::EncodingVersion::V1_0_0), before);
    assert_eq!(sim.run(&named).unwrap(), out_before);
}

#[test]
fn results_do_not_depend_on_threads_and_coarser_layers_score_worse() {
    let mut one = calibrated(1);
    let mut two = calibrated(2);
    let fp32_one = fp32(&one, 1);
    let a = qanalyze::enable_one(&mut one, &fp32_one, Metric::Sqnr, &mut |_, _| {}).unwrap();
    let fp32_two = fp32(&two, 2);
    let b = qanalyze::enable_one(&mut two, &fp32_two, Metric::Sqnr, &mut |_, _| {}).unwrap();
    assert_eq!(a, b);
    // conv1 at 4 bits scores worse than at 8.
    let g = &one.model().graph;
    let conv1 = g.node_id("conv1").unwrap();
    for q in one.placement().op_quantizers(g, conv1) {
        one.placement_mut().quantizer_mut(q).set_precision(Precision::Int(4));
    }
    one.compute_encodings().unwrap();
    let fp32_one = fp32(&one, 1);
    let c = qanalyze::enable_one(&mut one, &fp32_one, Metric::Sqnr, &mut |_, _| {}).unwrap();
    let score = |v: &[qanalyze::LayerScore]| v.iter().find(|s| s.layer == "conv1").unwrap().score;
    assert!(score(&c) < score(&a) - 6.0, "{} vs {}", score(&c), score(&a));
}

#[test]
fn samples_run_apart_score_like_whole_batches() {
    let mut whole = calibrated_with(Dim::Known(4));
    let mut apart = calibrated_with(Dim::Symbol("N".into()));
    for metric in [Metric::Psnr, Metric::AmpSqnr, Metric::Top1Agreement] {
        let (fp32_whole, fp32_apart) = (fp32(&whole, 2), fp32(&apart, 2));
        assert_eq!((fp32_whole.piece_count(), fp32_apart.piece_count()), (2, 8));
        let a = qanalyze::enable_one(&mut whole, &fp32_whole, metric, &mut |_, _| {}).unwrap();
        let b = qanalyze::enable_one(&mut apart, &fp32_apart, metric, &mut |_, _| {}).unwrap();
        assert_eq!(a, b, "{metric:?}");
        let checks = |sim: &mut QuantSim, r: &qanalyze::FloatReference| {
            qanalyze::model_checks(sim, r, metric).unwrap()
        };
        assert_eq!(checks(&mut whole, &fp32_whole), checks(&mut apart, &fp32_apart), "{metric:?}");
    }
}

#[test]
fn fp32_values_beyond_the_budget_are_recomputed_with_the_same_scores() {
    // Whole batches (2 pieces) and samples apart (8 pieces, two at a time).
    for batch in [Dim::Known(4), Dim::Symbol("N".into())] {
        let mut sim = calibrated_with(batch.clone());
        let kept = qanalyze::FloatReference::new(&sim, &batches(), 2).unwrap();
        assert!(kept.kept_bytes() > 0);
        let expected = qanalyze::enable_one(&mut sim, &kept, Metric::Psnr, &mut |_, _| {}).unwrap();
        let layers = expected.len();
        let mse = qanalyze::per_layer_mse(&sim, &kept).unwrap();
        let conv1 = sim.model().graph.node_id("conv1").unwrap();
        let hists = qanalyze::histograms(&sim, &kept, &[conv1]).unwrap();
        // 1 KiB holds every layer's outputs (5 layers × 2 batches × 4 rows × 5 logits) but no
        // piece's values: windows of one piece per thread, each layer's outputs kept across
        // them. No budget at all: every layer recomputes the FP32 values window by window.
        let per_window = if kept.piece_count() == 8 { 2 } else { 1 };
        for (budget, windows) in [(1024, kept.piece_count() / per_window), (0, 1)] {
            let recomputed = qanalyze::FloatReference::with_budget(&sim, &batches(), 2, budget).unwrap();
            assert_eq!(recomputed.kept_bytes(), 0);
            let mut calls = Vec::new();
            let scores =
                qanalyze::enable_one(&mut sim, &recomputed, Metric::Psnr, &mut |d, t| calls.push((d, t)))
                    .unwrap();
            assert_eq!(scores, expected, "{batch:?}, budget {budget}");
            let total = windows * layers;
            assert_eq!(
                calls,
                (1..=total).map(|d| (d, total)).collect::<Vec<_>>(),
                "{batch:?}, budget {budget}"
            );
            assert_eq!(qanalyze::per_layer_mse(&sim, &recomputed).unwrap(), mse);
            assert_eq!(qanalyze::histograms(&sim, &recomputed, &[conv1]).unwrap(), hists);
            let mut checks =
                |r: &qanalyze::FloatReference| qanalyze::model_checks(&mut sim, r, Metric::Sqnr).unwrap();
            assert_eq!(checks(&recomputed), checks(&kept));
        }
    }
}

#[test]
fn no_data_is_a_typed_error() {
    let sim = calibrated(1);
    let err = qanalyze::FloatReference::new(&sim, &[], 1).err().unwrap();
    assert!(matches!(err, AnalyzeError::Data(_)), "{err}");
}

/// Runs a model on named inputs and returns its first output's values.
type Runner<'a> = &'a dyn Fn(&[(&str, Tensor)]) -> Vec<f32>;

#[test]
fn resuming_from_fp32_values_scores_like_full_runs() {
    let mut sim = calibrated(1);
    let fp32_sim = fp32(&sim, 1);
    let fast = qanalyze::enable_one(&mut sim, &fp32_sim, Metric::Psnr, &mut |_, _| {}).unwrap();
    // The naive way: every layer alone, full forward passes.
    let float = qexec::Session::new(sim.model().clone(), qexec::SessionOptions::threads(1)).unwrap();
    let run_all = |f: Runner<'_>| -> Vec<f32> {
        batches()
            .iter()
            .flat_map(|b| {
                let named: Vec<(&str, Tensor)> = b.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
                f(&named)
            })
            .collect()
    };
    let reference = run_all(&|f| float.run(f).unwrap()[0].as_f32().unwrap().iter().copied().collect());
    let layers = qanalyze::layers(&sim).unwrap();
    let all = sim.placement().quantizer_ids();
    for q in &all {
        sim.placement_mut().quantizer_mut(*q).enabled = false;
    }
    for ((_, qs), score) in layers.iter().zip(&fast) {
        qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = true);
        sim.refresh().unwrap();
        let got = run_all(&|f| sim.run(f).unwrap()[0].as_f32().unwrap().iter().copied().collect());
        let naive = qkernels::psnr_aimet(&reference, &got).unwrap().unwrap();
        assert_eq!(naive, score.score, "{}", score.layer);
        qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = false);
    }
}

#[test]
fn disable_one_and_whole_model_checks() {
    let mut sim = calibrated(1);
    let before = qcalib::encodings_json(&sim, qcalib::EncodingVersion::V1_0_0);
    let fp32_sim = fp32(&sim, 1);
    let enabled = qanalyze::enable_one(&mut sim, &fp32_sim, Metric::Psnr, &mut |_, _| {}).unwrap();
    let disabled = qanalyze::disable_one(&mut sim, &fp32_sim, Metric::Psnr, &mut |_, _| {}).unwrap();
    let checks = qanalyze::model_checks(&mut sim, &fp32_sim, Metric::Psnr).unwrap();
    assert_eq!(
        enabled.iter().map(|s| &s.layer).collect::<Vec<_>>(),
        disabled.iter().map(|s| &s.layer).collect::<Vec<_>>()
    );
    // (Errors of different quantizers can cancel, so no ordering between these is guaranteed.)
    assert!(disabled.iter().all(|s| s.score.is_finite() && s.score > 10.0), "{disabled:?}");
    for v in [checks.all, checks.weights_only, checks.activations_only] {
        assert!(v.is_finite() && v > 10.0 && v < 100.0, "{checks:?}");
    }
    assert_eq!(qcalib::encodings_json(&sim, qcalib::EncodingVersion::V1_0_0), before);
}

#[test]
fn mse_ranges_histograms_and_the_report() {
    let mut sim = calibrated(1);
    let reference = fp32(&sim, 1);
    let mse = qanalyze::per_layer_mse(&sim, &reference).unwrap();
    assert_eq!(
        mse.iter().map(|m| m.layer.as_str()).collect::<Vec<_>>(),
        ["conv0", "relu0", "conv1", "pool", "fc"]
    );
    assert!(mse.iter().all(|m| m.mse > 0.0 && m.mse < 1e-2), "{mse:?}");
    // With every quantizer off the simulation is FP32: no error anywhere.
    let placement = sim.placement().clone();
    let all = sim.placement().quantizer_ids();
    all.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = false);
    sim.refresh().unwrap();
    assert!(qanalyze::per_layer_mse(&sim, &reference).unwrap().iter().all(|m| m.mse == 0.0));
    *sim.placement_mut() = placement;
    sim.refresh().unwrap();

    let ranges = qanalyze::ranges(&sim);
    assert!(ranges.iter().any(|r| r.kind == "param" && r.channels == 4));
    for r in &ranges {
        assert!(r.encoding_min <= 0.0 && r.encoding_max >= 0.0, "{r:?}");
        if let Some((lo, hi)) = r.observed {
            // Min-max: the encoding covers what calibration saw, up to one step.
            assert!(r.encoding_min <= lo + r.delta && r.encoding_max >= hi - r.delta, "{r:?}");
        }
    }
    let g = &sim.model().graph;
    let conv1 = g.node_id("conv1").unwrap();
    let hists = qanalyze::histograms(&sim, &reference, &[conv1]).unwrap();
    assert_eq!(hists.iter().map(|h| h.kind).collect::<Vec<_>>(), ["activation", "weight"]);
    assert_eq!(hists[0].counts.iter().sum::<u64>(), 2 * 4 * 4 * 36);
    assert_eq!(hists[1].counts.iter().sum::<u64>(), 16);
    assert!(hists.iter().all(|h| h.encoding.is_some_and(|(a, b)| h.lo <= a && b <= h.hi)));

    let scores = qanalyze::enable_one(&mut sim, &reference, Metric::Psnr, &mut |_, _| {}).unwrap();
    let checks = qanalyze::model_checks(&mut sim, &reference, Metric::Psnr).unwrap();
    let mut report = qanalyze::AnalysisReport {
        model: "cnn <test>".into(),
        settings: serde_json::json!({"config": "default"}),
        metric: Metric::Psnr.name(),
        higher_is_better: true,
        checks,
        evaluations: vec![("top-1".into(), 0.5)],
        layer_ops: vec![("conv1".into(), "Conv".into())],
        enable_one: scores.clone(),
        disable_one: None,
        mse,
        ranges,
        histograms: hists,
        placement: sim.placement().report(&sim.model().graph),
        seconds: vec![("enable one".into(), 0.1)],
    };
    let json = report.to_json();
    assert_eq!(json["metric"]["higher_is_better"], true);
    assert_eq!(json["enable_one"]["scores"].as_array().unwrap().len(), scores.len());
    let worst = scores.iter().min_by(|a, b| a.score.total_cmp(&b.score)).unwrap();
    assert_eq!(json["enable_one"]["ranked"][0][0], worst.layer.as_str());
    let table = report.top_table(3);
    assert_eq!(table.lines().count(), 4);
    assert!(table.lines().nth(1).unwrap().contains(&worst.layer));
    let html = report.to_html();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert!(html.contains("cnn &lt;test&gt;") && !html.contains("<script"));
    assert_eq!(html.matches("<svg").count(), 3 + 2);
    assert!(json["enable_one"]["non_finite"].as_array().unwrap().is_empty());
    // A layer whose simulation gives NaN scores AIMET's −100 dB: named, marked and drawn.
    report.enable_one[0].score = -100.0;
    let name = report.enable_one[0].layer.clone();
    assert_eq!(report.to_json()["enable_one"]["non_finite"][0], name.as_str());
    assert!(report.top_table(1).contains("(non-finite outputs)"));
    let html = report.to_html();
    assert!(html.lines().any(|l| l.trim() == "non-finite"), "the chart labels the layer");
}

/// The simulated outputs of the test batches, flattened, with their row length.
fn simulated_logits(sim: &QuantSim) -> (Vec<f32>, usize) {
    let mut out = Vec::new();
    let mut classes = 0;
    for feeds in batches() {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let y = sim.run(&named).unwrap().remove(0);
        classes = *y.shape().last().unwrap();
        out.extend(y.as_f32().unwrap().iter().copied());
    }
    (out, classes)
}

#[test]
fn metrics_score_as_defined_and_carry_their_direction() {
    use qanalyze::Scorer;
    let mut sim = calibrated(1);
    let reference = fp32(&sim, 1);
    let (fp32_logits, classes) = {
        let mut off = calibrated(1);
        let ids = off.placement().quantizer_ids();
        ids.iter().for_each(|&q| off.placement_mut().quantizer_mut(q).enabled = false);
        off.refresh().unwrap();
        simulated_logits(&off)
    };
    let (sim_logits, _) = simulated_logits(&sim);
    // MSE: the plain mean over every logit; lower is better.
    let mse = reference.score(&sim, Metric::Mse).unwrap();
    assert!((mse - qkernels::mse(&fp32_logits, &sim_logits).unwrap()).abs() <= 1e-12 * mse.max(1.0));
    assert!(!Metric::Mse.higher_is_better() && Metric::Psnr.higher_is_better());
    // Top-k PSNR with k = every class is the PSNR of all logits.
    let all = reference.score(&sim, Metric::TopKPsnr(classes)).unwrap();
    assert!((all - reference.score(&sim, Metric::Psnr).unwrap()).abs() < 1e-9);
    let top1 = reference.score(&sim, Metric::TopKPsnr(1)).unwrap();
    let largest: Vec<(f32, f32)> = fp32_logits
        .chunks(classes)
        .zip(sim_logits.chunks(classes))
        .map(|(r, s)| {
            let i = (0..classes).fold(0, |b, i| if r[i] > r[b] { i } else { b });
            (r[i], s[i])
        })
        .collect();
    let (r, s): (Vec<f32>, Vec<f32>) = largest.into_iter().unzip();
    assert_eq!(top1, qkernels::psnr_aimet(&r, &s).unwrap().unwrap());
    // Arg-max agreement, and a user metric: top-1 against labels (here: the FP32 arg-max of
    // every row, so both agree).
    let argmax = |row: &[f32]| (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
    let labels: Vec<usize> = fp32_logits.chunks(classes).map(argmax).collect();
    let top1_vs_labels = qanalyze::UserMetric::new("top1", true, |_fp32, simulated: &qanalyze::Outputs| {
        let logits = (0..simulated.output_count()).next().map(|i| simulated.pooled(i)).unwrap_or_default();
        let hits = logits.chunks(classes).zip(&labels).filter(|(row, l)| argmax(row) == **l).count();
        Ok(hits as f64 / labels.len() as f64)
    });
    let agreement = reference.score(&sim, Metric::Top1Agreement).unwrap();
    assert!((0.0..=1.0).contains(&agreement));
    assert_eq!(reference.score(&sim, &top1_vs_labels).unwrap(), agreement);
    // Enable-one with a lower-is-better metric ranks the largest error first.
    let by_mse = qanalyze::enable_one(&mut sim, &reference, Metric::Mse, &mut |_, _| {}).unwrap();
    assert!(by_mse.iter().all(|l| !l.higher_is_better && l.sensitivity() == l.score));
    let by_user = qanalyze::enable_one(&mut sim, &reference, &top1_vs_labels, &mut |_, _| {}).unwrap();
    assert_eq!(by_user.len(), by_mse.len());
    // Names parse back.
    for m in
        [Metric::Psnr, Metric::Sqnr, Metric::AmpSqnr, Metric::Mse, Metric::TopKPsnr(5), Metric::Top1Agreement]
    {
        assert_eq!(Metric::parse(&m.name()), Some(m));
    }
    assert_eq!(Metric::parse("top0_psnr"), None);
}

/// Two branches from the input — `a`: Conv → Relu, and `b`: a Conv whose only reader comes after
/// `a` — joined by an Add, then a second graph output taken mid-way (`mid`, the Add's Relu), a
/// Conv, pooling and a Gemm. The FP32 walk must keep `b` while `a` is scored and resume layers
/// from values made far apart.
fn branched_model() -> Model {
    let mut g = Graph::new("branched");
    let batch = Dim::Symbol("N".into());
    let x = g.add_input("input", DType::F32, Shape(vec![batch, Dim::Known(2), Dim::Known(6), Dim::Known(6)]));
    let wa = g.add_initializer("wa", Tensor::from_vec(&[4, 2, 3, 3], values(72, 21)).unwrap());
    let wb = g.add_initializer("wb", Tensor::from_vec(&[4, 2, 1, 1], values(8, 22)).unwrap());
    let wc = g.add_initializer("wc", Tensor::from_vec(&[4, 4, 1, 1], values(16, 23)).unwrap());
    let wf = g.add_initializer("wf", Tensor::from_vec(&[5, 4], values(20, 24)).unwrap());
    let pads = ("pads", Attribute::Ints(vec![1, 1, 1, 1]));
    let b = g.add_op("Conv", "conv_b", &[x, wb], vec![]);
    let a = g.add_op("Conv", "conv_a", &[x, wa], vec![pads]);
    let ra = g.add_op("Relu", "relu_a", &[a], vec![]);
    let sum = g.add_op("Add", "join", &[ra, b], vec![]);
    let mid = g.add_op("Relu", "mid", &[sum], vec![]);
    let c = g.add_op("Conv", "conv_c", &[mid, wc], vec![]);
    let p = g.add_op("GlobalAveragePool", "pool", &[c], vec![]);
    let f = g.add_op("Flatten", "flat", &[p], vec![]);
    let y = g.add_op("Gemm", "fc", &[f, wf], vec![("transB", Attribute::Int(1))]);
    g.add_output(y);
    g.add_output(p);
    Model::new(g, 13)
}

#[test]
fn walking_the_fp32_pass_of_a_branched_model_scores_like_kept_values() {
    let options = SimOptions { threads: 2, ..SimOptions::default() };
    let mut sim = QuantSim::new(branched_model(), QuantsimConfig::load("default").unwrap(), options).unwrap();
    sim.calibrate(batches(), &mut |_| {}).unwrap();
    let kept = qanalyze::FloatReference::new(&sim, &batches(), 2).unwrap();
    assert!(kept.kept_bytes() > 0);
    for metric in [Metric::Psnr, Metric::Mse] {
        let expected = qanalyze::enable_one(&mut sim, &kept, metric, &mut |_, _| {}).unwrap();
        assert!(expected.len() >= 5, "{expected:?}");
        // Budgets holding every layer's outputs but not every FP32 value: windows of one round
        // of pieces to all of them.
        let mut windows = Vec::new();
        for budget in [2 << 10, 8 << 10, 24 << 10] {
            let walked = qanalyze::FloatReference::with_budget(&sim, &batches(), 2, budget).unwrap();
            assert_eq!(walked.kept_bytes(), 0);
            let mut total = 0;
            let scores = qanalyze::enable_one(&mut sim, &walked, metric, &mut |_, t| total = t).unwrap();
            assert_eq!(scores, expected, "{metric:?}, budget {budget}");
            windows.push(total / expected.len());
        }
        // The walk keeps a sample's working set, not its every value: 24 KiB holds all 8 pieces.
        assert!(windows[0] > windows[1] && windows[2] == 1, "windows per budget: {windows:?}");
    }
}

//! AMP on the committed default model: groups, bit-ops, searches and the resumable cache.

use std::path::Path;

use qcalib::{DefaultPrecision, Precision, QuantSim, QuantsimConfig, SimOptions};
use qmix::{BitOps, Candidate, MacOps, find_quantizer_groups};

fn sim(config: &str) -> QuantSim {
    let model =
        qgraph::load_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx")).unwrap();
    let precision = DefaultPrecision { param: Precision::Int(16), activation: Precision::Int(16) };
    QuantSim::new(
        model,
        QuantsimConfig::load(config).unwrap(),
        SimOptions { precision, ..SimOptions::default() },
    )
    .unwrap()
}

#[test]
fn bit_ops_follow_the_groups_of_weighted_ops() {
    let s = sim("default_per_tensor");
    let groups = find_quantizer_groups(&s.model().graph, s.placement()).unwrap();
    let w16a16 = Candidate::parse("w16a16").unwrap();
    let bitops = BitOps::new(&s, &groups, w16a16, MacOps::All);
    assert_eq!(bitops.ops().len(), 2, "{:?}", bitops.ops());
    let macs: u64 = bitops.ops().iter().map(|o| o.macs).sum();
    assert_eq!(macs, 2320);
    let w8a8 = Candidate::parse("w8a8").unwrap();
    // The Gemm's group holds only its weight: its activation side stays at 16 bits.
    let conv = bitops.ops().iter().find(|o| o.group_has_activations).unwrap().macs as f64;
    let gemm = macs as f64 - conv;
    assert_eq!(bitops.uniform(groups.len(), w8a8), conv * 64.0 + gemm * 16.0 * 8.0);
    assert_eq!(bitops.uniform(groups.len(), w16a16), macs as f64 * 256.0);
}

#[test]
fn the_predicted_front_is_the_brute_force_optimum() {
    let s = sim("default_per_tensor");
    let groups = find_quantizer_groups(&s.model().graph, s.placement()).unwrap();
    let names = ["w16a16", "w8a16", "w16a8", "w8a8", "w4a8"];
    let cands: Vec<Candidate> = names.iter().map(|n| Candidate::parse(n).unwrap()).collect();
    let bitops = BitOps::new(&s, &groups, cands[0], MacOps::All);
    // Made-up phase-1 scores: cheaper candidates hurt more, differently per group.
    let options: Vec<Vec<(Candidate, f64)>> = (0..groups.len())
        .map(|g| {
            cands[1..].iter().enumerate().map(|(k, &c)| (c, 40.0 - 6.0 * k as f64 - 3.0 * g as f64)).collect()
        })
        .collect();
    let starting = vec![cands[0]; groups.len()];
    let front = qmix::predicted_front(&options, &starting, &bitops, 1 << 14);
    let start = bitops.total(&starting);
    // Every assignment, by brute force.
    let mut all = Vec::new();
    for code in 0..cands.len().pow(groups.len() as u32) {
        let mut a = Vec::new();
        let mut noise = 0.0;
        let mut rest = code;
        for opts in &options {
            let k = rest % cands.len();
            rest /= cands.len();
            a.push(cands[k]);
            if k > 0 {
                noise += 10f64.powf(-opts[k - 1].1 / 10.0);
            }
        }
        all.push((bitops.total(&a) / start, noise));
    }
    assert!(!front.is_empty());
    for p in &front {
        let best = all
            .iter()
            .filter(|b| b.0 <= p.relative_bitops + 1e-12)
            .map(|b| b.1)
            .fold(f64::INFINITY, f64::min);
        assert!(
            (best - p.predicted_noise).abs() < 1e-12,
            "at {:.4}: {} vs brute force {best}",
            p.relative_bitops,
            p.predicted_noise
        );
    }
    // The cheapest assignment of all is on the front.
    let cheapest = all.iter().map(|b| b.0).fold(f64::INFINITY, f64::min);
    assert!((front[0].relative_bitops - cheapest).abs() < 1e-12);
}

#[test]
fn phase3_raises_activations_to_cut_converts_at_least_cost() {
    let s = sim("default_per_tensor");
    let groups = find_quantizer_groups(&s.model().graph, s.placement()).unwrap();
    let graph = qmix::GroupGraph::new(&s.model().graph, s.placement(), &groups);
    // Conv input → Relu output → pooled → logits; the Gemm weight is a group without activations.
    assert_eq!(graph.nodes, vec![0, 1, 2, 4]);
    let ends: Vec<(usize, usize)> = graph.edges.iter().map(|e| (e.from, e.to)).collect();
    assert_eq!(ends, vec![(0, 1), (1, 2), (2, 4)]);
    assert!(graph.edges.iter().all(|e| e.convert_cycles > 2000.0));
    let c = |n: &str| Candidate::parse(n).unwrap();
    let all = vec![c("w16a16"), c("w8a16"), c("w16a8"), c("w8a8")];
    let supported = vec![all.clone(); groups.len()];
    let bitops = BitOps::new(&s, &groups, c("w16a16"), MacOps::All);
    let start = bitops.total(&vec![c("w16a16"); groups.len()]);
    // The Conv at 8-bit activations between 16-bit islands, logits at 8 bits: two converts.
    let phase2 = vec![c("w8a8"), c("w8a16"), c("w8a16"), c("w8a8"), c("w8a8")];
    let options = qmix::Phase3Options {
        alphas: vec![1.0, 0.5, 0.0],
        threshold: qmix::Phase3Threshold::UnweightedCutSize,
    };
    let p3 = qmix::plan_phase3(graph, &groups, &supported, &phase2, &bitops, start, &options).unwrap();
    assert_eq!(p3.phase2_converts, 2);
    let [keep, half, none] = &p3.plans[..] else { panic!("three plans") };
    assert_eq!(keep.assignment.as_deref(), Some(&phase2[..]));
    assert_eq!((keep.converts, keep.raised.len()), (2, 0));
    // One convert allowed: raising the logits costs no bit-ops (no weighted op reads them).
    assert_eq!((half.converts, half.raised.clone()), (1, vec![4]));
    assert_eq!(half.relative_bitops, keep.relative_bitops);
    // None allowed: the Conv's activations go to 16 bits too, its weights stay at 8.
    assert_eq!((none.converts, none.raised.clone()), (0, vec![0, 4]));
    assert_eq!(none.assignment.as_ref().unwrap()[0], c("w8a16"));
    assert!(none.relative_bitops > keep.relative_bitops);
    // The front runs from no converts (dearest) to one (as cheap as the phase-2 plan, which it
    // dominates).
    assert_eq!(p3.front.len(), 2);
    assert_eq!(p3.front[0], (0.0, none.relative_bitops));
    assert_eq!(p3.front[1], (1.0, keep.relative_bitops));
    // A plan with no converts has nothing to reduce.
    let uniform = vec![c("w8a8"); groups.len()];
    let graph = qmix::GroupGraph::new(&s.model().graph, s.placement(), &groups);
    let p3 = qmix::plan_phase3(graph, &groups, &supported, &uniform, &bitops, start, &options).unwrap();
    assert!(p3.skipped.is_some() && p3.plans.is_empty());
}

/// A cost table with `cost(op, pair)` for every counted op of the bars model at `pairs`.
fn table(
    s: &QuantSim,
    bitops: &BitOps,
    pairs: &[&str],
    cost: impl Fn(u64, Candidate) -> f64,
) -> qmix::CostTable {
    let g = &s.model().graph;
    let ops = bitops
        .ops()
        .iter()
        .map(|op| {
            let row = pairs
                .iter()
                .map(|p| {
                    let c = Candidate::parse(p).unwrap();
                    (c, cost(op.macs, c))
                })
                .collect();
            (g.node(op.node).name.clone(), row)
        })
        .collect();
    qmix::CostTable { unit: "us".into(), ops }
}

#[test]
fn a_cost_table_prices_the_ops_in_place_of_bit_ops() {
    let s = sim("default_per_tensor");
    let groups = find_quantizer_groups(&s.model().graph, s.placement()).unwrap();
    let names = ["w16a16", "w8a16", "w16a8", "w8a8"];
    let cands: Vec<Candidate> = names.iter().map(|n| Candidate::parse(n).unwrap()).collect();
    let bitops = BitOps::new(&s, &groups, cands[0], MacOps::All);
    // Latency proportional to bit-ops: every cost scales by the same factor.
    let pairs = ["W16A16", "W8A16", "W16A8", "W8A8"];
    let proportional = table(&s, &bitops, &pairs, |macs, c| {
        0.5 * macs as f64 * qmix::effective_bits(c.activation) * qmix::effective_bits(c.param)
    });
    let measured = bitops.clone().with_table(&s, &proportional, &cands).unwrap();
    let w8a8 = vec![cands[3]; groups.len()];
    assert_eq!(measured.total(&w8a8), 0.5 * bitops.total(&w8a8));
    for g in 0..groups.len() {
        assert_eq!(measured.group_cost(g, cands[1]), 0.5 * bitops.group_cost(g, cands[1]));
    }
    // A flat table: precision changes nothing.
    let flat = bitops.clone().with_table(&s, &table(&s, &bitops, &pairs, |_, _| 7.0), &cands).unwrap();
    assert_eq!(flat.total(&w8a8), flat.uniform(groups.len(), cands[0]));
    assert_eq!(flat.reduction(0, cands[3], cands[0]), 0.0);
    // Refused: a missing pair, an op left out, an op that is not counted.
    let err = |t: qmix::CostTable| bitops.clone().with_table(&s, &t, &cands).unwrap_err().to_string();
    assert!(err(table(&s, &bitops, &pairs[..3], |_, _| 1.0)).contains("no cost at"));
    let mut partial = table(&s, &bitops, &pairs, |_, _| 1.0);
    let dropped = partial.ops.keys().next().unwrap().clone();
    partial.ops.remove(&dropped);
    assert!(err(partial).contains(&dropped));
    let mut extra = table(&s, &bitops, &pairs, |_, _| 1.0);
    extra.ops.insert("pooled".into(), extra.ops.values().next().unwrap().clone());
    assert!(err(extra).contains("'pooled'"));
}

#[test]
fn cost_tables_are_parsed_strictly() {
    let t = qmix::CostTable::parse(
        r#"{"unit": "us", "ops": {"features": {"W8A8": 1.5, "a16w16": 4}}}"#,
        "t.json",
    )
    .unwrap();
    assert_eq!(t.ops["features"][&Candidate::parse("w16a16").unwrap()], 4.0);
    let err = |text: &str| qmix::CostTable::parse(text, "t.json").unwrap_err().to_string();
    assert!(err("{}").contains("\"ops\""));
    assert!(err(r#"{"ops": {"features": {"W99A8": 1}}}"#).contains("W99A8"));
    assert!(err(r#"{"ops": {"features": {"W8A8": -1}}}"#).contains("ops.features.W8A8"));
    assert!(err("[").contains("not JSON"));
}

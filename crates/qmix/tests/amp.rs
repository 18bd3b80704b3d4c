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

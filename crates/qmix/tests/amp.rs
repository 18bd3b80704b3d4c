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

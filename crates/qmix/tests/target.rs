//! Target legality on the committed bars model (Conv → Relu → GlobalAveragePool → Flatten →
//! Gemm): an illegal plan is raised to the cheapest supported pair, lowered when no supported pair
//! is as precise, or refused naming the op; bad target descriptions are refused naming the fault.

use std::path::Path;

use qcalib::{DefaultPrecision, Precision, QuantSim, QuantsimConfig, SimOptions};
use qgraph::Tensor;
use qmix::{AmpError, Target};

fn calibrated(param: u32, activation: u32) -> QuantSim {
    let model =
        qgraph::load_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx")).unwrap();
    let precision = DefaultPrecision { param: Precision::Int(param), activation: Precision::Int(activation) };
    let mut s = QuantSim::new(
        model,
        QuantsimConfig::load("default").unwrap(),
        SimOptions { precision, ..SimOptions::default() },
    )
    .unwrap();
    let x: Vec<f32> = (0..8 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let batch = vec![("input".to_string(), Tensor::from_vec(&[8, 1, 8, 8], x).unwrap())];
    s.calibrate([batch], &mut |_| {}).unwrap();
    s
}

fn changes(s: &mut QuantSim, target: &Target) -> Vec<String> {
    qmix::legalize(s, target).unwrap().iter().map(ToString::to_string).collect()
}

#[test]
fn htp_raises_16_bit_weights_under_8_bit_activations() {
    let mut s = calibrated(16, 8);
    let htp = Target::load("htp_v73").unwrap();
    assert!(!htp.allows("Conv", Some(Precision::Int(16)), Precision::Int(8)));
    assert!(htp.allows("Relu", None, Precision::Int(16)));
    assert_eq!(changes(&mut s, &htp), ["features (Conv): W16A8 → W16A16", "logits (Gemm): W16A8 → W16A16"]);
    // The repaired plan is legal, calibrated and runs.
    assert!(changes(&mut s, &htp).is_empty());
    let x = Tensor::from_vec(&[1, 1, 8, 8], vec![0.5f32; 64]).unwrap();
    assert!(s.run(&[("input", x)]).is_ok());
    // AIMET's default config lists no kernels: everything is legal.
    assert!(changes(&mut calibrated(16, 8), &Target::load("default").unwrap()).is_empty());
}

#[test]
fn a_pair_with_nothing_as_precise_is_lowered_and_one_with_nothing_is_refused() {
    let only_w8a8 = Target::parse(
        r#"{"op_type": {"Conv": [{"activation": {"bitwidth": 8, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}}]}}"#,
        "conv-w8a8",
    )
    .unwrap();
    let mut s = calibrated(16, 16);
    assert_eq!(
        changes(&mut s, &only_w8a8),
        ["features (Conv): W16A16 → W8A8 (lowered: no legal pair is as precise)"]
    );
    let float32_only = Target::parse(
        r#"{"op_type": {"Gemm": [{"activation": {"bitwidth": 32, "dtype": "float"}}]}}"#,
        "gemm-float32",
    )
    .unwrap();
    let err = qmix::legalize(&mut calibrated(8, 8), &float32_only).unwrap_err();
    assert!(matches!(err, AmpError::Illegal { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("'logits'") && msg.contains("W8A8") && msg.contains("gemm-float32"), "{msg}");
}

#[test]
fn bad_targets_are_refused_naming_the_fault() {
    let err = |text: &str| Target::parse(text, "t.json").unwrap_err().to_string();
    assert!(err("{\"kernels\": []}").contains("unknown key 'kernels'"));
    assert!(err("[]").contains("expected a JSON object"));
    let bad_bits = err(r#"{"supported_kernels": [{"activation": {"bitwidth": 7, "dtype": "int"}}]}"#);
    assert!(bad_bits.contains("supported_kernels[0].activation.bitwidth"), "{bad_bits}");
    let missing = Target::load("/nonexistent/target.json").unwrap_err().to_string();
    assert!(missing.contains("default, htp_v73"), "{missing}");
}

#[test]
fn a_target_becomes_the_configs_supported_kernels() {
    let mut config = QuantsimConfig::load("default").unwrap();
    Target::load("htp_v73").unwrap().apply_to(&mut config);
    let user: Vec<qmix::Candidate> =
        ["w16a16", "w8a16", "w16a8", "w8a8"].iter().map(|c| qmix::Candidate::parse(c).unwrap()).collect();
    let allowed = qmix::supported_candidates(&config, &["Conv"], &user, false).unwrap();
    let labels: Vec<String> = allowed.iter().map(ToString::to_string).collect();
    assert_eq!(labels, ["W16A16", "W8A16", "W8A8"]);
}

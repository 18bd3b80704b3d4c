//! Lite-MP on the committed default model: flipping every layer to int16 gives exactly the
//! simulation built at W16A16 (the invariant AIMET users trip over), and flip-by-count and
//! flip-until-target choose the most sensitive layers first.

use std::path::Path;

use qcalib::{DefaultPrecision, EncodingVersion, Precision, QuantSim, QuantsimConfig, SimOptions};
use qgraph::Tensor;

fn sim(bits: u32) -> QuantSim {
    let model =
        qgraph::load_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx")).unwrap();
    let precision = DefaultPrecision { param: Precision::Int(bits), activation: Precision::Int(bits) };
    QuantSim::new(
        model,
        QuantsimConfig::load("default").unwrap(),
        SimOptions { precision, ..SimOptions::default() },
    )
    .unwrap()
}

fn batches() -> Vec<qcalib::Feeds> {
    (0..3)
        .map(|b| {
            let x: Vec<f32> = (0..8 * 64).map(|i| ((i * 7 + b * 131) as f32 * 0.37).sin()).collect();
            vec![("input".to_string(), Tensor::from_vec(&[8, 1, 8, 8], x).unwrap())]
        })
        .collect()
}

fn calibrated(bits: u32) -> QuantSim {
    let mut s = sim(bits);
    s.calibrate(batches(), &mut |_| {}).unwrap();
    s
}

fn scores(s: &mut QuantSim) -> Vec<qanalyze::LayerScore> {
    let fp32 = qanalyze::FloatReference::new(s, &batches()[..1], 1).unwrap();
    qanalyze::enable_one(s, &fp32, qanalyze::Metric::Psnr, &mut |_, _| {}).unwrap()
}

#[test]
fn flipping_every_layer_to_int16_equals_w16a16() {
    let mut mixed = calibrated(8);
    let s = scores(&mut mixed);
    let flipped =
        qmix::flip_layers_to_higher_precision(&mut mixed, &s, 100.0, Precision::Int(16), Precision::Int(16))
            .unwrap();
    assert_eq!(flipped.len(), s.len());
    mixed.calibrate(batches(), &mut |_| {}).unwrap();
    let direct = calibrated(16);
    // Everything but `quantizer_args`, which records the defaults the simulation was built with.
    let json = |s: &QuantSim| {
        let j = qcalib::encodings_json(s, EncodingVersion::V1_0_0);
        (j["activation_encodings"].clone(), j["param_encodings"].clone())
    };
    assert_eq!(json(&mixed), json(&direct));
    let feeds = &batches()[1];
    let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    assert_eq!(mixed.run(&named).unwrap()[0].as_f32(), direct.run(&named).unwrap()[0].as_f32());
}

#[test]
fn flip_by_count_takes_the_most_sensitive_layers() {
    let mut s = calibrated(8);
    let scored = scores(&mut s);
    let flipped = qmix::flip_count(&mut s, &scored, 2, Precision::Int(16), Precision::Int(16)).unwrap();
    let mut ranked = scored.clone();
    ranked.sort_by(|a, b| a.score.total_cmp(&b.score));
    let names: Vec<&str> = flipped.iter().map(|f| f.layer.as_str()).collect();
    assert_eq!(names, ranked[..2].iter().map(|l| l.layer.as_str()).collect::<Vec<_>>());
    assert!(
        qmix::flip_count(&mut s, &scored, scored.len() + 1, Precision::Int(16), Precision::Int(16)).is_err()
    );
}

#[test]
fn flip_until_finds_the_fewest_layers_reaching_the_target() {
    let mut s = calibrated(4);
    let scored = scores(&mut s);
    let reference = qanalyze::FloatReference::new(&s, &batches()[..1], 1).unwrap();
    let at = |s: &mut QuantSim, count: usize| {
        let mut probe = calibrated(4);
        *probe.placement_mut() = s.placement().clone();
        qmix::flip_count(&mut probe, &scored, count, Precision::Int(16), Precision::Int(16)).unwrap();
        probe.calibrate(batches(), &mut |_| {}).unwrap();
        reference.score(&probe, qanalyze::Metric::Psnr).unwrap()
    };
    let (none, all) = (at(&mut s, 0), at(&mut s, scored.len()));
    assert!(all > none, "flipping to int16 must help: {none} → {all}");
    let target = (none + all) / 2.0;
    let r = qmix::flip_until(
        &mut s,
        &scored,
        Precision::Int(16),
        Precision::Int(16),
        &batches(),
        &reference,
        qanalyze::Metric::Psnr,
        target,
    )
    .unwrap();
    assert!(r.reached && r.score >= target);
    let k = r.flipped.len();
    assert!(k >= 1 && at(&mut calibrated(4), k - 1) < target, "{k} layers, but fewer reach {target}");
    assert_eq!(reference.score(&s, qanalyze::Metric::Psnr).unwrap(), r.score);
}

#[test]
fn flips_apply_the_exception_rules_again() {
    // x → LayerNormalization(γ, β): at int8 AIMET's rule makes γ asymmetric, at int16 symmetric.
    let mut g = qgraph::Graph::new("ln");
    let x = g.add_input("x", qgraph::DType::F32, qgraph::Shape::known(&[2, 4]));
    let gamma = g.add_initializer("gamma", Tensor::from_vec(&[4], vec![1.0f32, 0.5, -0.25, 2.0]).unwrap());
    let beta = g.add_initializer("beta", Tensor::from_vec(&[4], vec![0.1f32, 0.0, -0.1, 0.2]).unwrap());
    let y = g.add_op("LayerNormalization", "ln", &[x, gamma, beta], vec![]);
    g.add_output(y);
    let model = qgraph::Model::new(g, 17);
    let mut s =
        QuantSim::new(model, QuantsimConfig::load("default").unwrap(), SimOptions::default()).unwrap();
    let gq = s.placement().quantizer_of(s.model().graph.value_id("gamma").unwrap()).unwrap();
    assert!(!s.placement().quantizer(gq).symmetric);
    let scores = vec![qanalyze::LayerScore { layer: "ln".into(), score: 1.0, higher_is_better: true }];
    qmix::flip_count(&mut s, &scores, 1, Precision::Int(16), Precision::Int(16)).unwrap();
    let q = s.placement().quantizer(gq);
    assert_eq!((q.precision, q.symmetric), (Precision::Int(16), true));
}

#[test]
fn a_lower_is_better_metric_flips_the_largest_scores() {
    let mut s = calibrated(8);
    let fp32 = qanalyze::FloatReference::new(&s, &batches()[..1], 1).unwrap();
    let mse = qanalyze::enable_one(&mut s, &fp32, qanalyze::Metric::Mse, &mut |_, _| {}).unwrap();
    let worst = mse.iter().max_by(|a, b| a.score.total_cmp(&b.score)).unwrap().layer.clone();
    let flipped = qmix::flip_count(&mut s, &mse, 1, Precision::Int(16), Precision::Int(16)).unwrap();
    assert_eq!(flipped[0].layer, worst);
}

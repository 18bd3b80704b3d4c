//! QuantSim end to end on a small CNN built in the test: placement under the default config,
//! calibration, simulation, encodings export in every version and loading back, precision
//! changes without recalibration, and typed errors on bad input.

use qcalib::{
    CalibError, DefaultPrecision, EncodingVersion, Granularity, LoadOptions, Precision, QuantSim,
    QuantsimConfig, Scheme, SimOptions,
};
use qgraph::{Attribute, DType, Dim, Graph, Model, Shape, Tensor};

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::from_vec(shape, data).unwrap()
}

/// input [N,1,8,8] → Conv(4, 3×3) → Clip(0, 6) → depthwise Conv → Relu → Add(clip) →
/// GlobalAveragePool → Flatten → Gemm(10).
fn cnn() -> Model {
    let mut g = Graph::new("cnn");
    let x = g.add_input(
        "input",
        DType::F32,
        Shape(vec![Dim::Symbol("N".into()), Dim::Known(1), Dim::Known(8), Dim::Known(8)]),
    );
    let w0 = g.add_initializer("conv0.weight", t(&[4, 1, 3, 3], values(36, 1)));
    let b0 = g.add_initializer("conv0.bias", t(&[4], values(4, 2)));
    let pads = ("pads", Attribute::Ints(vec![1, 1, 1, 1]));
    let c0 = g.add_op("Conv", "conv0", &[x, w0, b0], vec![pads.clone()]);
    let lo = g.add_initializer("clip.min", Tensor::scalar(0f32));
    let hi = g.add_initializer("clip.max", Tensor::scalar(6f32));
    let r0 = g.add_op("Clip", "clip0", &[c0, lo, hi], vec![]);
    let w1 = g.add_initializer("dw.weight", t(&[4, 1, 3, 3], values(36, 3)));
    let b1 = g.add_initializer("dw.bias", t(&[4], values(4, 4)));
    let c1 = g.add_op("Conv", "dw", &[r0, w1, b1], vec![pads, ("group", Attribute::Int(4))]);
    let r1 = g.add_op("Relu", "relu1", &[c1], vec![]);
    let a = g.add_op("Add", "add", &[r1, r0], vec![]);
    let p = g.add_op("GlobalAveragePool", "pool", &[a], vec![]);
    let f = g.add_op("Flatten", "flat", &[p], vec![]);
    let w2 = g.add_initializer("fc.weight", t(&[10, 4], values(40, 5)));
    let b2 = g.add_initializer("fc.bias", t(&[10], values(10, 6)));
    let y = g.add_op("Gemm", "logits", &[f, w2, b2], vec![("transB", Attribute::Int(1))]);
    g.add_output(y);
    Model::new(g, 13)
}

fn batch(n: usize, seed: u64) -> qcalib::Feeds {
    vec![("input".to_string(), t(&[n, 1, 8, 8], values(n * 64, seed).iter().map(|v| v * 3.0).collect()))]
}

fn batches() -> Vec<qcalib::Feeds> {
    (0..4).map(|i| batch(8, 100 + i)).collect()
}

fn sim(options: SimOptions) -> QuantSim {
    QuantSim::new(cnn(), QuantsimConfig::load("default").unwrap(), options).unwrap()
}

fn calibrated(options: SimOptions) -> QuantSim {
    let mut s = sim(options);
    s.calibrate(batches(), &mut |_| {}).unwrap();
    s
}

fn run(s: &QuantSim, feeds: &qcalib::Feeds) -> Vec<f32> {
    let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    s.run(&named).unwrap()[0].as_f32().unwrap().iter().copied().collect()
}

fn enabled(s: &QuantSim, name: &str) -> Option<bool> {
    let v = s.model().graph.value_id(name)?;
    s.placement().quantizer_of(v).map(|q| s.placement().quantizer(q).enabled)
}

#[test]
fn placement_follows_the_default_config() {
    let s = sim(SimOptions::default());
    // Conv+Clip supergroup: no quantizer between them; the depthwise Conv is exempt.
    assert_eq!(enabled(&s, "conv0"), Some(false));
    assert_eq!(enabled(&s, "clip0"), Some(true));
    assert_eq!(enabled(&s, "dw"), Some(true));
    // Relu after an unfused producer shares its quantizer.
    let p = s.placement();
    let g = &s.model().graph;
    assert_eq!(p.quantizer_of(g.value_id("relu1").unwrap()), p.quantizer_of(g.value_id("dw").unwrap()));
    // Data-movement outputs carry no quantizer; constants read as inputs are quantized.
    assert_eq!(enabled(&s, "flat"), None);
    assert_eq!(enabled(&s, "clip.min"), Some(true));
    assert_eq!(enabled(&s, "input"), Some(true));
    // Weights per channel and symmetric, biases off.
    let w = p.quantizer(p.quantizer_of(g.value_id("conv0.weight").unwrap()).unwrap());
    assert!(w.enabled && w.symmetric && w.granularity == Granularity::PerChannel { axis: 0 });
    assert_eq!(enabled(&s, "conv0.bias"), Some(false));
    let report = p.report(g);
    let entries = report["quantizers"].as_array().unwrap();
    assert!(entries.iter().any(|e| e["tensor"] == "relu1" && e["shared_with"][0] == "dw"));
    // Per-tensor config: weights per tensor.
    let pt = QuantSim::new(cnn(), QuantsimConfig::load("default_per_tensor").unwrap(), SimOptions::default())
        .unwrap();
    let q = pt.placement().quantizer_of(pt.model().graph.value_id("conv0.weight").unwrap()).unwrap();
    assert_eq!(pt.placement().quantizer(q).granularity, Granularity::PerTensor);
}

#[test]
fn simulation_is_close_to_float_and_not_equal() {
    let s = calibrated(SimOptions::default());
    let feeds = batch(4, 7);
    let q = run(&s, &feeds);
    let session = qexec::Session::new(cnn(), qexec::SessionOptions::threads(1)).unwrap();
    let f: Vec<f32> =
        session.run(&[("input", feeds[0].1.clone())]).unwrap()[0].as_f32().unwrap().iter().copied().collect();
    let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = q.iter().zip(&f).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err > 0.0 && err < 0.1 * scale, "error {err} vs scale {scale}");
}

#[test]
fn every_encodings_version_loads_back_to_the_same_simulation() {
    for scheme in [Scheme::MinMax, Scheme::TfEnhanced, Scheme::Percentile(99.9), Scheme::Mse, Scheme::Entropy]
    {
        let s = calibrated(SimOptions { scheme, ..SimOptions::default() });
        let feeds = batch(3, 9);
        let want = run(&s, &feeds);
        for version in [EncodingVersion::V1_0_0, EncodingVersion::V0_6_1, EncodingVersion::V2_0_0] {
            let doc = qcalib::encodings_json(&s, version);
            let text = qcalib::to_pretty_json(&doc);
            let parsed = qcalib::parse_encodings(&serde_json::from_str(&text).unwrap(), "test").unwrap();
            let mut fresh = sim(SimOptions { scheme, ..SimOptions::default() });
            qcalib::load_encodings(&mut fresh, &parsed, LoadOptions::default()).unwrap();
            assert_eq!(run(&fresh, &feeds), want, "{scheme:?} {}", version.as_str());
            if version == EncodingVersion::V1_0_0 {
                assert_eq!(qcalib::encodings_json(&fresh, version), doc, "1.0.0 round trip");
            }
        }
    }
}

#[test]
fn encodings_with_impossible_grids_are_refused_naming_the_tensor() {
    let doc = qcalib::encodings_json(&calibrated(SimOptions::default()), EncodingVersion::V1_0_0);
    let name = doc["activation_encodings"][0]["name"].as_str().unwrap().to_string();
    for (field, value, needle) in [
        ("scale", serde_json::json!([0.0]), "scale 0"),
        ("scale", serde_json::json!([-0.5]), "scale -0.5"),
        ("offset", serde_json::json!([0.5]), "offset 0.5"),
        ("bw", serde_json::json!(1), "bitwidth 1"),
        ("bw", serde_json::json!(64), "bitwidth 64"),
    ] {
        let mut bad = doc.clone();
        bad["activation_encodings"][0][field] = value;
        let err = qcalib::parse_encodings(&bad, "bad.encodings").unwrap_err().to_string();
        assert!(err.contains(&name) && err.contains(needle) && err.contains("bad.encodings"), "{err}");
    }
}

#[test]
fn version_2_has_int32_biases_and_unsigned_activations() {
    let s = calibrated(SimOptions::default());
    let doc = qcalib::encodings_json(&s, EncodingVersion::V2_0_0);
    let entries = doc["encodings"].as_array().unwrap();
    let find = |n: &str| entries.iter().find(|e| e["name"] == n).unwrap();
    assert_eq!(find("conv0.bias")["output_dtype"], "int32");
    assert_eq!(find("conv0.weight")["output_dtype"], "int8");
    assert_eq!(find("clip0")["output_dtype"], "uint8");
    // The Conv output inside the supergroup gets the Clip's encoding at export (spec §8.6).
    assert_eq!(find("conv0")["y_scale"], find("clip0")["y_scale"]);
    let bias_scale = find("conv0.bias")["y_scale"][0].as_f64().unwrap();
    let x = find("input")["y_scale"].as_f64().unwrap();
    let w = find("conv0.weight")["y_scale"][0].as_f64().unwrap();
    assert_eq!(bias_scale, x * w);
}

#[test]
fn activation_encodings_for_another_precision_need_no_new_pass() {
    let mut s = calibrated(SimOptions::default());
    let ids = s.placement().quantizer_ids();
    for q in ids {
        if !s.placement().quantizer(q).is_param {
            s.placement_mut().quantizer_mut(q).set_precision(Precision::Int(16));
        }
    }
    s.compute_encodings().unwrap();
    let precision = DefaultPrecision { param: Precision::Int(8), activation: Precision::Int(16) };
    let fresh = calibrated(SimOptions { precision, ..SimOptions::default() });
    let (a, b) = (
        qcalib::encodings_json(&s, EncodingVersion::V1_0_0),
        qcalib::encodings_json(&fresh, EncodingVersion::V1_0_0),
    );
    assert_eq!(a["activation_encodings"], b["activation_encodings"]);
    assert_eq!(a["param_encodings"], b["param_encodings"]);
}

#[test]
fn learned_weight_encodings_hold_at_their_precision_only() {
    // AdaRound's encodings for conv0.weight, learned at int8: a 16-bit plan calibrates the
    // weight at 16 bits; coming back to int8 brings the learned encodings back, frozen.
    let mut s = calibrated(SimOptions::default());
    let v = s.model().graph.value_id("conv0.weight").unwrap();
    let q = s.placement().quantizer_of(v).unwrap();
    let mut learned = s.placement().quantizer(q).encodings.clone().unwrap();
    for e in &mut learned {
        *e = qkernels::Encoding::from_scale_offset(e.delta * 0.75, e.offset, e.bitwidth, e.steps);
    }
    let frozen = std::collections::HashMap::from([(
        "conv0.weight".to_string(),
        qcalib::LoadedEncoding {
            precision: Precision::Int(8),
            symmetric: true,
            encodings: learned.clone(),
            channel_major_blocks: false,
        },
    )]);
    assert_eq!(qcalib::freeze_encodings(&mut s, &frozen), 1);
    let quantizer = |s: &QuantSim| s.placement().quantizer(q).clone();
    assert!(quantizer(&s).frozen && quantizer(&s).encodings.as_ref() == Some(&learned));
    s.placement_mut().quantizer_mut(q).set_precision(Precision::Int(16));
    s.compute_encodings().unwrap();
    let wide = quantizer(&s);
    assert!(!wide.frozen && wide.encodings.as_ref().is_some_and(|e| e[0].bitwidth == 16), "{wide:?}");
    s.placement_mut().quantizer_mut(q).set_precision(Precision::Int(8));
    s.compute_encodings().unwrap();
    assert!(quantizer(&s).frozen && quantizer(&s).encodings.as_ref() == Some(&learned));
}

#[test]
fn fp16_activations_round_like_half() {
    let precision = DefaultPrecision { param: Precision::Int(8), activation: Precision::Float16 };
    let s = calibrated(SimOptions { precision, ..SimOptions::default() });
    let out = run(&s, &batch(2, 11));
    assert!(out.iter().all(|v| half_round(*v) == *v));
    let doc = qcalib::encodings_json(&s, EncodingVersion::V1_0_0);
    let acts = doc["activation_encodings"].as_array().unwrap();
    assert!(acts.iter().all(|e| e["dtype"] == "FLOAT" && e["bw"] == 16));
}

/// Rounds through IEEE half (the logits are fp16-quantized).
fn half_round(v: f32) -> f32 {
    let mut x = [v];
    qkernels::fake_cast_f16(&mut x);
    x[0]
}

#[test]
fn bad_inputs_give_typed_errors() {
    let mut s = sim(SimOptions::default());
    let err = s.calibrate(Vec::<qcalib::Feeds>::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, CalibError::Data(ref m) if m.contains("no calibration batches")), "{err}");
    let nan = vec![("input".to_string(), t(&[1, 1, 8, 8], vec![f32::NAN; 64]))];
    let err = s.calibrate(vec![nan], &mut |_| {}).unwrap_err();
    assert!(matches!(err, CalibError::NoStatistics { ref tensor, .. } if tensor == "input"), "{err}");
    let wrong = vec![("input".to_string(), t(&[1, 2, 8, 8], vec![0.5; 128]))];
    let err = s.calibrate(vec![wrong], &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("batch 0") && err.contains("input"), "{err}");
    let err = s.run(&[("input", t(&[1, 1, 8, 8], vec![0.0; 64]))]).unwrap_err().to_string();
    assert!(err.contains("calibrate"), "{err}");
    let bad = QuantsimConfig::from_json_str(
        r#"{"defaults": 3, "params": {}, "op_type": {}, "supergroups": [], "model_input": {}, "model_output": {}}"#,
    ).unwrap_err().to_string();
    assert!(bad.contains("defaults") && bad.contains("found 3"), "{bad}");
}

#[test]
fn qdq_export_runs_and_matches_the_simulation() {
    let s = calibrated(SimOptions::default());
    let feeds = batch(4, 13);
    let want = run(&s, &feeds);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for options in [
        qcalib::QdqOptions::default(),
        qcalib::QdqOptions { prequantize_weights: true, int32_bias: true, matmul_nbits: false },
    ] {
        let proto = qcalib::to_qdq_model(&s, options).unwrap();
        let ops: Vec<&str> = proto.graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert!(ops.contains(&"QuantizeLinear") && ops.contains(&"DequantizeLinear"));
        assert_eq!(proto.graph.output[0].name, "logits", "graph outputs keep their names");
        let model = qgraph::model_from_proto(proto, None).unwrap();
        let session = qexec::Session::new(model, qexec::SessionOptions::threads(1)).unwrap();
        let got = session.run(&[("input", feeds[0].1.clone())]).unwrap();
        let got: Vec<f32> = got[0].as_f32().unwrap().iter().copied().collect();
        // ONNX QuantizeLinear rounds ties to even; otherwise the export is the simulation.
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 0.05 * scale, "{options:?}: {err} vs scale {scale}");
    }
}

#[test]
fn with_onnx_rounding_the_simulation_is_what_the_qdq_export_computes() {
    let mut s = calibrated(SimOptions::default());
    s.set_rounding(qcalib::Rounding::HalfToEven).unwrap();
    let feeds = batch(4, 17);
    let want = run(&s, &feeds);
    let model =
        qgraph::model_from_proto(qcalib::to_qdq_model(&s, qcalib::QdqOptions::default()).unwrap(), None)
            .unwrap();
    let session = qexec::Session::new(model, qexec::SessionOptions::threads(1)).unwrap();
    let got = session.run(&[("input", feeds[0].1.clone())]).unwrap();
    assert_eq!(got[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), want);
}

#[test]
fn int16_activations_raise_the_opset() {
    let precision = DefaultPrecision { param: Precision::Int(8), activation: Precision::Int(16) };
    let s = calibrated(SimOptions { precision, ..SimOptions::default() });
    let proto = qcalib::to_qdq_model(&s, qcalib::QdqOptions::default()).unwrap();
    assert_eq!(proto.opset_import[0].version, 21);
    assert!(proto.ir_version >= 10);
}

#[test]
fn statistics_files_reload_to_the_same_encodings() {
    let scratch = tempfile::Builder::new().prefix("qcalib-stats-").tempdir().unwrap();
    let dir = scratch.path();
    for scheme in [Scheme::MinMax, Scheme::TfEnhanced, Scheme::Entropy] {
        let s = calibrated(SimOptions { scheme, ..SimOptions::default() });
        let path = dir.join(format!("{scheme:?}.qstats"));
        qcalib::save_stats(&s, &path).unwrap();
        let mut fresh = sim(SimOptions { scheme, ..SimOptions::default() });
        qcalib::load_stats(&mut fresh, &path).unwrap();
        assert_eq!(
            qcalib::encodings_json(&fresh, EncodingVersion::V1_0_0),
            qcalib::encodings_json(&s, EncodingVersion::V1_0_0),
            "{scheme:?}"
        );
        let feeds = batch(2, 21);
        assert_eq!(run(&fresh, &feeds), run(&s, &feeds));
    }
    // Statistics do not depend on the activation bitwidth: W8A8 TF-enhanced statistics give the
    // encodings a fresh W8A16 or W8A4 calibration gives. (Activation statistics are gathered with
    // the weights quantized, as AIMET gathers them, so they hold for one weight precision.)
    for bits in [16, 4] {
        let precision = DefaultPrecision { param: Precision::Int(8), activation: Precision::Int(bits) };
        let options = SimOptions { scheme: Scheme::TfEnhanced, precision, ..SimOptions::default() };
        let mut from_file = sim(options);
        qcalib::load_stats(&mut from_file, &dir.join("TfEnhanced.qstats")).unwrap();
        assert_eq!(
            qcalib::encodings_json(&from_file, EncodingVersion::V1_0_0),
            qcalib::encodings_json(&calibrated(options), EncodingVersion::V1_0_0),
            "A{bits}"
        );
    }
    // Min-max statistics cannot serve TF-enhanced.
    let mut tfe = sim(SimOptions { scheme: Scheme::TfEnhanced, ..SimOptions::default() });
    let err = qcalib::load_stats(&mut tfe, &dir.join("MinMax.qstats")).unwrap_err().to_string();
    assert!(err.contains("no histogram"), "{err}");
    // Truncated and foreign files are typed errors naming the file.
    let bytes = std::fs::read(dir.join("TfEnhanced.qstats")).unwrap();
    std::fs::write(dir.join("cut.qstats"), &bytes[..bytes.len() / 2]).unwrap();
    let mut fresh = sim(SimOptions { scheme: Scheme::TfEnhanced, ..SimOptions::default() });
    let err = qcalib::load_stats(&mut fresh, &dir.join("cut.qstats")).unwrap_err();
    assert!(matches!(err, CalibError::Statistics { ref path, .. } if path.ends_with("cut.qstats")), "{err}");
    std::fs::write(dir.join("foreign.qstats"), b"{\"json\": true}").unwrap();
    let err = qcalib::load_stats(&mut fresh, &dir.join("foreign.qstats")).unwrap_err().to_string();
    assert!(err.contains("magic"), "{err}");
}

#[test]
fn float_limit_ranges_are_reported() {
    let mut s = sim(SimOptions::default());
    let mut feeds = batch(2, 5);
    if let Tensor::F32(a) = &mut feeds[0].1 {
        a[[0, 0, 0, 0]] = -3.0e38;
    }
    s.calibrate(vec![feeds], &mut |_| {}).unwrap();
    assert!(s.warnings().iter().any(|w| w.contains("'input'")), "{:?}", s.warnings());
}

/// x [N, 4] → decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add ε, Sqrt, Div, Mul γ,
/// Add β).
fn layer_norm_model() -> Model {
    let mut g = Graph::new("ln");
    let x = g.add_input("x", DType::F32, Shape(vec![Dim::Symbol("N".into()), Dim::Known(4)]));
    let axes = ("axes", Attribute::Ints(vec![-1]));
    let mean = g.add_op("ReduceMean", "mean", &[x], vec![axes.clone()]);
    let d = g.add_op("Sub", "centred", &[x, mean], vec![]);
    let two = g.add_initializer("two", Tensor::scalar(2f32));
    let sq = g.add_op("Pow", "squared", &[d, two], vec![]);
    let var = g.add_op("ReduceMean", "variance", &[sq], vec![axes]);
    let eps = g.add_initializer("eps", Tensor::scalar(1e-5f32));
    let ve = g.add_op("Add", "var_eps", &[var, eps], vec![]);
    let sd = g.add_op("Sqrt", "std", &[ve], vec![]);
    let n = g.add_op("Div", "normed", &[d, sd], vec![]);
    let gamma = g.add_initializer("gamma", t(&[4], vec![1.0, 0.5, -0.5, 2.0]));
    let scaled = g.add_op("Mul", "scaled", &[n, gamma], vec![]);
    let beta = g.add_initializer("beta", t(&[4], vec![0.1, 0.2, 0.3, 0.4]));
    let y = g.add_op("Add", "y", &[scaled, beta], vec![]);
    g.add_output(y);
    Model::new(g, 13)
}

#[test]
fn the_layer_norm_pass_keeps_only_the_output_and_gamma_quantized() {
    let precision = DefaultPrecision { param: Precision::Int(8), activation: Precision::Int(16) };
    let options = SimOptions { precision, ..SimOptions::default() };
    let s = QuantSim::new(layer_norm_model(), QuantsimConfig::load("htp_v73").unwrap(), options).unwrap();
    for inner in
        ["mean", "centred", "squared", "variance", "var_eps", "std", "normed", "scaled", "two", "eps", "beta"]
    {
        assert_eq!(enabled(&s, inner), Some(false), "{inner}");
    }
    assert_eq!(enabled(&s, "y"), Some(true));
    assert_eq!(enabled(&s, "x"), Some(true));
    let p = s.placement();
    let gamma = p.quantizer(p.quantizer_of(s.model().graph.value_id("gamma").unwrap()).unwrap());
    assert!(gamma.enabled && gamma.symmetric);
    // Without the pass (default config) the intermediate outputs are quantized.
    let plain = QuantSim::new(layer_norm_model(), QuantsimConfig::load("default").unwrap(), options).unwrap();
    assert_eq!(enabled(&plain, "normed"), Some(true));
}

#[test]
fn a_layer_can_be_switched_to_another_precision() {
    let mut s = calibrated(SimOptions::default());
    let g = &s.model().graph;
    let conv = g.node_id("conv0").unwrap();
    let qs = s.placement().op_quantizers(g, conv);
    let names: Vec<String> = qs
        .iter()
        .flat_map(|&q| s.placement().tensors_of(q).map(|t| g.value(t.value).name.clone()).collect::<Vec<_>>())
        .collect();
    // Its own output, weight and bias; the graph input it reads is AIMET's input quantizer of it.
    for n in ["input", "conv0", "conv0.weight", "conv0.bias"] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    for q in qs {
        s.placement_mut().quantizer_mut(q).set_precision(Precision::Int(16));
    }
    s.compute_encodings().unwrap();
    let doc = qcalib::encodings_json(&s, EncodingVersion::V1_0_0);
    let w = doc["param_encodings"].as_array().unwrap().iter().find(|e| e["name"] == "conv0.weight").unwrap();
    assert_eq!(w["bw"], 16);
}

/// Attention-style masked softmaxes over scores x [N, 6] and a keep mask [N, 6]:
/// `mask = Where(keep, 0, f32::MIN)` shared by `Softmax(x + mask)` and `Softmax(2x + mask)`, and
/// `Softmax(Where(keep, x, −1e9))`.
fn masked_softmax_model() -> Model {
    let mut g = Graph::new("attention");
    let dims = || Shape(vec![Dim::Symbol("N".into()), Dim::Known(6)]);
    let x = g.add_input("x", DType::F32, dims());
    let keep = g.add_input("keep", DType::Bool, dims());
    let zero = g.add_initializer("zero", Tensor::scalar(0f32));
    let lowest = g.add_initializer("lowest", Tensor::scalar(f32::MIN));
    let mask = g.add_op("Where", "mask", &[keep, zero, lowest], vec![]);
    let axis = ("axis", Attribute::Int(-1));
    let m1 = g.add_op("Add", "masked1", &[x, mask], vec![]);
    let p1 = g.add_op("Softmax", "probs1", &[m1], vec![axis.clone()]);
    let two = g.add_initializer("two", Tensor::scalar(2f32));
    let x2 = g.add_op("Mul", "scaled", &[x, two], vec![]);
    let m2 = g.add_op("Add", "masked2", &[mask, x2], vec![]);
    let p2 = g.add_op("Softmax", "probs2", &[m2], vec![axis.clone()]);
    let fill = g.add_initializer("fill", Tensor::scalar(-1e9f32));
    let m3 = g.add_op("Where", "masked3", &[keep, x, fill], vec![]);
    let p3 = g.add_op("Softmax", "probs3", &[m3], vec![axis]);
    for p in [p1, p2, p3] {
        g.add_output(p);
    }
    Model::new(g, 13)
}

fn masked_softmax_feeds(n: usize, seed: u64) -> qcalib::Feeds {
    let x = t(&[n, 6], values(n * 6, seed).iter().map(|v| v * 3.0).collect());
    let keep = Tensor::from_vec(&[n, 6], (0..n * 6).map(|i| i % 6 < 4).collect::<Vec<bool>>()).unwrap();
    vec![("x".to_string(), x), ("keep".to_string(), keep)]
}

/// Largest |simulated − float| over the three softmax outputs on fresh rows.
fn masked_softmax_error(config: QuantsimConfig) -> (f32, Vec<String>, QuantSim) {
    let precision = DefaultPrecision { param: Precision::Int(8), activation: Precision::Int(16) };
    let options = SimOptions { precision, ..SimOptions::default() };
    let mut s = QuantSim::new(masked_softmax_model(), config, options).unwrap();
    s.calibrate((0..2).map(|i| masked_softmax_feeds(8, 40 + i)).collect::<Vec<_>>(), &mut |_| {}).unwrap();
    let feeds = masked_softmax_feeds(8, 7);
    let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let float = qexec::Session::new(s.model().clone(), qexec::SessionOptions::default()).unwrap();
    let reference = float.run(&named).unwrap();
    let simulated = s.run(&named).unwrap();
    let mut err = 0f32;
    for (a, b) in reference.iter().zip(&simulated) {
        for (u, v) in a.as_f32().unwrap().iter().zip(b.as_f32().unwrap().iter()) {
            err = err.max((u - v).abs());
        }
    }
    let warnings = s.warnings().to_vec();
    (err, warnings, s)
}

#[test]
fn the_masked_softmax_pass_leaves_masks_in_float() {
    let mut config = QuantsimConfig::load("htp_v73").unwrap();
    let (plain_err, plain_warnings, plain) = masked_softmax_error(config.clone());
    // AIMET's htp_v73 (no MaskedSoftmax pass): the masked sums share a grid spanning f32::MIN, so
    // every score rounds to 0 and the softmax is flat.
    assert_eq!(enabled(&plain, "masked1"), Some(true));
    assert!(plain_warnings.iter().any(|w| w.contains("'masked1'")), "{plain_warnings:?}");
    assert!(plain_err > 0.1, "{plain_err}");

    config.supergroup_passes.push("MaskedSoftmax".into());
    let (err, warnings, s) = masked_softmax_error(config);
    let g = &s.model().graph;
    for inner in ["mask", "masked1", "masked2", "masked3", "zero", "lowest", "fill"] {
        assert_eq!(s.placement().quantizer_of(g.value_id(inner).unwrap()), None, "{inner}");
    }
    for quantized in ["x", "scaled", "probs1", "probs2", "probs3"] {
        assert_eq!(enabled(&s, quantized), Some(true), "{quantized}");
    }
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(err < 1e-3, "{err}");
}

#[test]
fn quantizers_that_make_the_simulation_non_finite_are_disabled() {
    // x → Div(x, x): a small x rounds to zero on the grid that also holds 1.0, so the simulated
    // quotient is 0/0 = NaN where the float one is 1.
    let mut g = Graph::new("div");
    let x = g.add_input("x", DType::F32, Shape(vec![Dim::Symbol("N".into()), Dim::Known(4)]));
    let y = g.add_op("Div", "div", &[x, x], vec![]);
    g.add_output(y);
    let model = Model::new(g, 13);
    let batch = vec![("x".to_string(), t(&[2, 4], vec![1.0, 0.001, 0.5, 0.25, 0.75, 0.001, 1.0, 0.125]))];
    let mut sim =
        QuantSim::new(model, QuantsimConfig::load("default").unwrap(), SimOptions::default()).unwrap();
    sim.calibrate(vec![batch.clone()], &mut |_| {}).unwrap();
    let named: Vec<(&str, Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    // The output quantizer turns the NaN into a finite value: the outputs alone do not show it.
    let before = sim.run(&named).unwrap().remove(0);
    assert_eq!(before.as_f32().unwrap()[[0, 1]], 0.0);
    let fixed = sim.disable_non_finite_quantizers(&named).unwrap();
    assert_eq!(fixed.len(), 1, "{fixed:?}");
    assert!(fixed[0].contains("'div' (Div)") && fixed[0].contains('x'), "{}", fixed[0]);
    assert!(sim.warnings().contains(&fixed[0]));
    let after = sim.run(&named).unwrap().remove(0);
    assert!(after.as_f32().unwrap().iter().all(|&v| (v - 1.0).abs() < 0.01), "{after:?}");
    // A finite simulation is left alone.
    assert!(sim.disable_non_finite_quantizers(&named).unwrap().is_empty());
}

#[test]
fn a_norm_in_tf2onnx_spelling_is_recognised_by_its_structure() {
    // x·rsqrt(max(sum(x·x)/8, 1e-12) + 1e-6)·γ: Square, Sum, truediv, Maximum, AddV2, Rsqrt as
    // tf2onnx writes them (Mul, ReduceSum, Div, Max, Add, Sqrt + Reciprocal).
    let mut g = Graph::new("rms");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 8]));
    let sq = g.add_op("Mul", "square", &[x, x], vec![]);
    let axes = g.add_initializer("axes", Tensor::from_vec(&[1], vec![-1i64]).unwrap());
    let sum = g.add_op("ReduceSum", "sum", &[sq, axes], vec![("keepdims", Attribute::Int(1))]);
    let n = g.add_initializer("n", t(&[], vec![8.0]));
    let mean = g.add_op("Div", "truediv", &[sum, n], vec![]);
    let tiny = g.add_initializer("tiny", t(&[], vec![1e-12]));
    let kept = g.add_op("Max", "maximum", &[mean, tiny], vec![]);
    let eps = g.add_initializer("eps", t(&[], vec![1e-6]));
    let stab = g.add_op("Add", "addv2", &[kept, eps], vec![]);
    let root = g.add_op("Sqrt", "sqrt", &[stab], vec![]);
    let inv = g.add_op("Reciprocal", "rsqrt", &[root], vec![]);
    let normed = g.add_op("Mul", "normed", &[x, inv], vec![]);
    let gamma = g.add_initializer("gamma", t(&[8], values(8, 3)));
    let y = g.add_op("Mul", "scaled", &[normed, gamma], vec![]);
    g.add_output(y);
    let model = Model::new(g, 13);
    let enabled = |pass: bool| -> Vec<String> {
        let mut config = QuantsimConfig::load("default").unwrap();
        if pass {
            config.add_pass("RMSNormalization").unwrap();
        }
        let sim = QuantSim::new(model.clone(), config, SimOptions::default()).unwrap();
        let p = sim.placement();
        p.tensors()
            .iter()
            .filter(|t| p.quantizer(t.quantizer).enabled)
            .map(|t| sim.model().graph.value(t.value).name.clone())
            .collect()
    };
    let (without, with) = (enabled(false), enabled(true));
    for inner in
        ["square", "sum", "truediv", "maximum", "addv2", "sqrt", "rsqrt", "normed", "tiny", "eps", "n"]
    {
        assert!(!with.contains(&inner.to_string()), "{inner} keeps its quantizer: {with:?}");
    }
    assert!(
        without.contains(&"rsqrt".to_string()) && with.contains(&"scaled".to_string()),
        "{without:?} {with:?}"
    );
}

#[test]
fn a_layer_norm_by_moments_with_broadcasts_and_a_folded_gamma_is_recognised() {
    // jax2tf's LayerNorm (Magika's): the variance as E[x²] − E[x]², Reshape + Expand between the
    // statistics and their use, γ multiplying the reciprocal root before it scales x − E[x].
    // (Reshape outputs carry no quantizer.)
    let mut g = Graph::new("ln_moments");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 8]));
    let axes = g.add_initializer("axes", Tensor::from_vec(&[1], vec![-1i64]).unwrap());
    let flat = vec![("keepdims", Attribute::Int(0))];
    let inv_n = g.add_initializer("inv_n", t(&[], vec![0.125]));
    let sum = g.add_op("ReduceSum", "sum", &[x, axes], flat.clone());
    let mean = g.add_op("Mul", "truediv", &[sum, inv_n], vec![]);
    let sq = g.add_op("Mul", "square", &[x, x], vec![]);
    let sum_sq = g.add_op("ReduceSum", "sum_1", &[sq, axes], flat);
    let mean_sq = g.add_op("Mul", "truediv_1", &[sum_sq, inv_n], vec![]);
    let sq_mean = g.add_op("Mul", "square_1", &[mean, mean], vec![]);
    let var = g.add_op("Sub", "sub", &[mean_sq, sq_mean], vec![]);
    let zero = g.add_initializer("zero", t(&[], vec![0.0]));
    let kept = g.add_op("Max", "maximum", &[zero, var], vec![]);
    let shape = g.add_initializer("shape", Tensor::from_vec(&[2], vec![2i64, 1]).unwrap());
    let var_col = g.add_op("Reshape", "reshape_1", &[kept, shape], vec![]);
    let var_b = g.add_op("Expand", "broadcast_1", &[var_col, shape], vec![]);
    let eps = g.add_initializer("eps", t(&[], vec![1e-6]));
    let stab = g.add_op("Add", "addv2", &[var_b, eps], vec![]);
    let root = g.add_op("Sqrt", "rsqrt", &[stab], vec![]);
    let inv = g.add_op("Reciprocal", "rsqrt_inv", &[root], vec![]);
    let gamma = g.add_initializer("gamma", t(&[8], values(8, 5)));
    let scale = g.add_op("Mul", "mul", &[inv, gamma], vec![]);
    let mean_col = g.add_op("Reshape", "reshape", &[mean, shape], vec![]);
    let mean_b = g.add_op("Expand", "broadcast", &[mean_col, shape], vec![]);
    let d = g.add_op("Sub", "sub_1", &[x, mean_b], vec![]);
    let normed = g.add_op("Mul", "mul_1", &[d, scale], vec![]);
    let beta = g.add_initializer("beta", t(&[8], values(8, 6)));
    let y = g.add_op("Add", "addv2_1", &[normed, beta], vec![]);
    g.add_output(y);
    let mut config = QuantsimConfig::load("default").unwrap();
    config.add_pass("LayerNormalization").unwrap();
    let mut sim = QuantSim::new(Model::new(g, 13), config, SimOptions::default()).unwrap();
    for inner in [
        "sum",
        "truediv",
        "square",
        "sum_1",
        "truediv_1",
        "square_1",
        "sub",
        "maximum",
        "broadcast_1",
        "addv2",
        "rsqrt",
        "rsqrt_inv",
        "mul",
        "broadcast",
        "sub_1",
        "mul_1",
        "inv_n",
        "zero",
        "eps",
        "beta",
    ] {
        assert_eq!(enabled(&sim, inner), Some(false), "{inner}");
    }
    assert_eq!(enabled(&sim, "addv2_1"), Some(true));
    // Rows of nearly equal values: quantized internals would round the variance to zero.
    let rows: Vec<f32> = (0..16).map(|i| 3.0 + 1e-3 * (i % 8) as f32).collect();
    sim.calibrate(vec![vec![("x".to_string(), t(&[2, 8], rows.clone()))]], &mut |_| {}).unwrap();
    let out = sim.run(&[("x", t(&[2, 8], rows))]).unwrap().remove(0);
    assert!(out.as_f32().unwrap().iter().all(|v| v.is_finite()), "{out:?}");
}

#[test]
fn a_non_finite_output_inside_a_decomposed_norm_names_the_pass_that_keeps_it_in_float() {
    // x·1/sqrt(mean(x²) + ε): a row of small values next to a row of large ones has its mean
    // square rounded to zero, and the reciprocal root is infinite.
    let mut g = Graph::new("rms");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 4]));
    let sq = g.add_op("Mul", "square", &[x, x], vec![]);
    let ms = g.add_op("ReduceMean", "mean_square", &[sq], vec![("axes", Attribute::Ints(vec![-1]))]);
    let eps = g.add_initializer("eps", t(&[], vec![1e-12]));
    let stab = g.add_op("Add", "stabilised", &[ms, eps], vec![]);
    let root = g.add_op("Sqrt", "root", &[stab], vec![]);
    let inv = g.add_op("Reciprocal", "inverse", &[root], vec![]);
    let y = g.add_op("Mul", "normed", &[x, inv], vec![]);
    g.add_output(y);
    let batch = vec![("x".to_string(), t(&[2, 4], vec![100.0, -80.0, 60.0, 90.0, 1e-3, -2e-3, 1e-3, 3e-3]))];
    let mut sim =
        QuantSim::new(Model::new(g, 13), QuantsimConfig::load("default").unwrap(), SimOptions::default())
            .unwrap();
    sim.calibrate(vec![batch.clone()], &mut |_| {}).unwrap();
    let named: Vec<(&str, Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let fixed = sim.disable_non_finite_quantizers(&named).unwrap();
    assert!(
        !fixed.is_empty() && fixed.iter().all(|l| l.contains("the graph pass RMSNormalization")),
        "{fixed:?}"
    );
}

/// The CNN with its depthwise layer (Conv + Relu) at W16A16 in a W8A8 simulation.
fn mixed(converts: bool) -> QuantSim {
    let mut s = calibrated(SimOptions { converts, ..SimOptions::default() });
    let g = s.model().graph.clone();
    for layer in ["dw", "relu1"] {
        for q in s.placement().op_quantizers(&g, g.node_id(layer).unwrap()) {
            s.placement_mut().quantizer_mut(q).set_precision(Precision::Int(16));
        }
    }
    s.compute_encodings().unwrap();
    s
}

#[test]
fn an_int16_island_converts_its_input_up_and_its_output_down() {
    let s = mixed(true);
    let g = &s.model().graph;
    let converts = s.converts().unwrap();
    let seen: Vec<(String, String, Vec<String>)> = converts
        .iter()
        .map(|c| {
            let readers = c.readers.iter().map(|&r| g.node(r).name.clone()).collect();
            (g.value(c.tensor).name.clone(), c.to.to_string(), readers)
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("clip0".into(), "int16".into(), vec!["dw".into()]),
            ("relu1".into(), "int8".into(), vec!["add".into()])
        ]
    );
    // Up is exact: every 8-bit level is a 16-bit level of the same range.
    let up = &converts[0];
    let own =
        s.placement().quantizer(s.placement().quantizer_of(up.tensor).unwrap()).encodings.clone().unwrap()[0];
    assert_eq!((up.encoding.min, up.encoding.max), (own.min, own.max));
    assert!((own.delta / up.encoding.delta - 257.0).abs() < 1e-9);
    // AIMET's simulation has none, and the device's numbers differ from it.
    assert!(mixed(false).converts().unwrap().is_empty());
    let feeds = batch(4, 19);
    assert_ne!(run(&s, &feeds), run(&mixed(false), &feeds));
}

#[test]
fn the_qdq_export_of_a_mixed_plan_carries_its_converts_and_computes_the_simulation() {
    let mut s = mixed(true);
    s.set_rounding(qcalib::Rounding::HalfToEven).unwrap();
    let proto = qcalib::to_qdq_model(&s, qcalib::QdqOptions::default()).unwrap();
    let names: Vec<&str> = proto.graph.node.iter().map(|n| n.name.as_str()).collect();
    for n in
        ["clip0_int16_quantize", "clip0_int16_dequantize", "relu1_int8_quantize", "relu1_int8_dequantize"]
    {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let reads = |node: &str| proto.graph.node.iter().find(|n| n.name == node).unwrap().input.clone();
    assert_eq!(reads("dw")[0], "clip0_int16");
    assert_eq!(reads("add"), ["relu1_int8", "clip0_dequantized"]);
    let feeds = batch(4, 23);
    let model = qgraph::model_from_proto(proto, None).unwrap();
    let session = qexec::Session::new(model, qexec::SessionOptions::threads(1)).unwrap();
    let got = session.run(&[("input", feeds[0].1.clone())]).unwrap();
    assert_eq!(got[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), run(&s, &feeds));
    let plain = qcalib::to_qdq_model(&mixed(false), qcalib::QdqOptions::default()).unwrap();
    assert!(!plain.graph.node.iter().any(|n| n.name.ends_with("_int16_quantize")));
}

/// Every quantizer's precision (`None` when disabled), by tensor name.
fn precisions(s: &QuantSim) -> Vec<(String, Option<Precision>)> {
    let g = &s.model().graph;
    let mut out: Vec<_> = s
        .placement()
        .tensors()
        .iter()
        .map(|t| {
            let q = s.placement().quantizer(t.quantizer);
            (g.value(t.value).name.clone(), q.enabled.then_some(q.precision))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn a_mixed_plan_as_quark_layers_sets_each_tensor_once_and_reads_back_the_same() {
    let s = mixed(true);
    let config = qcalib::quark_config(&s).unwrap();
    assert_eq!(config["global_config"]["input_tensors"]["data_type"], "UInt8");
    assert_eq!(config["global_config"]["weight"]["data_type"], "Int8");
    // dw and relu1 write int16 and dw's weight is int16: one layer entry each, only the fields
    // that differ from the global config (dw's input, clip0, stays clip0's own int8).
    let layers: Vec<String> = config["specific_layer_config"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let fields = e[0].as_object().unwrap().iter().map(|(k, v)| format!("{k}={}", v["data_type"]));
            format!("{}: {}", e[1], fields.collect::<Vec<_>>().join(" "))
        })
        .collect();
    assert_eq!(
        layers,
        [r#"["dw"]: output_tensors="UInt16" weight="Int16""#, r#"["relu1"]: output_tensors="UInt16""#]
    );
    let mut back = sim(SimOptions::default());
    let applied = qcalib::apply_plan(&mut back, &config).unwrap();
    assert!(applied.converts, "mixed integer activations: Quark inserts converts");
    assert_eq!(precisions(&back), precisions(&s));
    // Constants in Quark's weight and bias slots (a Clip's bounds) round-trip too.
    let mut s = mixed(true);
    for name in ["clip.min", "clip.max"] {
        let q = s.placement().quantizer_of(s.model().graph.value_id(name).unwrap()).unwrap();
        s.placement_mut().quantizer_mut(q).set_precision(Precision::Int(16));
    }
    s.compute_encodings().unwrap();
    let config = qcalib::quark_config(&s).unwrap();
    let mut back = sim(SimOptions::default());
    qcalib::apply_plan(&mut back, &config).unwrap();
    assert_eq!(precisions(&back), precisions(&s));
}

#[test]
fn quark_configs_apply_in_quarks_order_of_precedence() {
    let spec = |t: &str| serde_json::json!({"data_type": t, "symmetric": false});
    let config = serde_json::json!({
        "global_config": {"input_tensors": spec("UInt8"), "weight": spec("Int8")},
        "layer_type_config": [[null, ["Gemm"]], [{"output_tensors": spec("UInt16")}, ["Relu"]]],
        "specific_layer_config": [[{"input_tensors": spec("UInt16"), "weight": spec("Int4")}, ["^d.*"]]],
        "extra_options": {"TensorQuantOverrides": {"relu1": [{"quant_type": "QUInt8"}]}},
    });
    let mut s = sim(SimOptions::default());
    qcalib::apply_plan(&mut s, &config).unwrap();
    let of = |name: &str| {
        let p = precisions(&s);
        p.into_iter().find(|(n, _)| n == name).and_then(|(_, p)| p)
    };
    // The pattern reaches dw: its input (clip0) and weight; the tensor override beats the type
    // config on relu1; the Gemm is left in float.
    assert_eq!(of("clip0"), Some(Precision::Int(16)));
    assert_eq!(of("dw.weight"), Some(Precision::Int(4)));
    assert_eq!(of("relu1"), Some(Precision::Int(8)));
    assert_eq!(of("conv0.weight"), Some(Precision::Int(8)));
    assert_eq!((of("fc.weight"), of("logits")), (None, None));
    let refused = |config: serde_json::Value| {
        qcalib::apply_plan(&mut sim(SimOptions::default()), &config).unwrap_err().to_string()
    };
    let global = serde_json::json!({"input_tensors": spec("UInt8"), "weight": spec("Int8")});
    let e = refused(serde_json::json!({"global_config": global, "exclude": ["nope"]}));
    assert!(e.contains("exclude[0]") && e.contains("nope"), "{e}");
    let e =
        refused(serde_json::json!({"global_config": global, "specific_layer_config": [[null, ["^x.*"]]]}));
    assert!(e.contains("specific_layer_config[0]") && e.contains("matches no node"), "{e}");
    let e =
        refused(serde_json::json!({"global_config": {"input_tensors": spec("MX4"), "weight": spec("Int8")}}));
    assert!(e.contains("global_config.input_tensors") && e.contains("MX4"), "{e}");
    let e = refused(serde_json::json!({"global_config": global, "layer_type_config": {"Conv": 1}}));
    assert!(e.contains("layer_type_config") && e.contains("list"), "{e}");
}

#[test]
fn an_fp16_tensor_read_by_an_int8_op_is_quantized_for_it_from_its_statistics() {
    let island = |converts: bool| {
        let mut s = calibrated(SimOptions { converts, ..SimOptions::default() });
        let g = s.model().graph.clone();
        for layer in ["dw", "relu1"] {
            for q in s.placement().op_quantizers(&g, g.node_id(layer).unwrap()) {
                s.placement_mut().quantizer_mut(q).set_precision(Precision::Float16);
            }
        }
        s.compute_encodings().unwrap();
        s
    };
    let int8 = calibrated(SimOptions::default());
    let s = island(true);
    let g = &s.model().graph;
    let converts = s.converts().unwrap();
    // relu1 (fp16) is read by add (int8); clip0 (int8) read by dw (fp16) is only dequantized.
    assert_eq!(converts.len(), 1, "{converts:?}");
    let c = &converts[0];
    assert_eq!(
        (g.value(c.tensor).name.as_str(), c.from, c.to),
        ("relu1", Precision::Float16, Precision::Int(8))
    );
    assert_eq!(c.readers.iter().map(|&r| g.node(r).name.as_str()).collect::<Vec<_>>(), ["add"]);
    // The grid is the one calibration gives relu1 at int8 (same statistics, same scheme).
    let relu1 = int8.placement().quantizer_of(c.tensor).unwrap();
    let own = int8.placement().quantizer(relu1).encodings.clone().unwrap()[0];
    assert_eq!((c.encoding.min, c.encoding.max, c.encoding.delta), (own.min, own.max, own.delta));
    let feeds = batch(4, 29);
    assert_ne!(run(&s, &feeds), run(&island(false), &feeds));
    // The QDQ export carries the pair and computes what the simulation does.
    let mut even = island(true);
    even.set_rounding(qcalib::Rounding::HalfToEven).unwrap();
    let proto = qcalib::to_qdq_model(&even, qcalib::QdqOptions::default()).unwrap();
    assert!(proto.graph.node.iter().any(|n| n.name == "relu1_int8_quantize"));
    let model = qgraph::model_from_proto(proto, None).unwrap();
    let session = qexec::Session::new(model, qexec::SessionOptions::threads(1)).unwrap();
    let got = session.run(&[("input", feeds[0].1.clone())]).unwrap();
    assert_eq!(got[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), run(&even, &feeds));
}

#[test]
fn blockwise_int4_weights_calibrate_and_export_as_blocked_dequantize() {
    let mut s = sim(SimOptions::default());
    let skipped = s.set_blockwise_weights(&["Conv", "Gemm", "MatMul"], 4, true, 2).unwrap();
    // The convolutions read one input channel each: no block of 2 fits, they keep their quantizers.
    let names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["conv0.weight", "dw.weight"]);
    assert!(skipped[0].1.contains("does not divide"), "{skipped:?}");
    s.calibrate(batches(), &mut |_| {}).unwrap();
    let fc = s.model().graph.value_id("fc.weight").unwrap();
    let q = s.placement().quantizer(s.placement().quantizer_of(fc).unwrap());
    assert_eq!(q.granularity, Granularity::PerBlock { channel_axis: 0, block_axis: 1, block_size: 2 });
    assert_eq!((q.precision, q.encodings.as_ref().unwrap().len()), (Precision::Int(4), 20));
    let json = qcalib::encodings_json(&s, EncodingVersion::V1_0_0).to_string();
    assert!(json.contains("\"block_size\":2"), "{json}");

    let feeds = batch(4, 29);
    let want = run(&s, &feeds);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for prequantize_weights in [false, true] {
        let proto =
            qcalib::to_qdq_model(&s, qcalib::QdqOptions { prequantize_weights, ..Default::default() })
                .unwrap();
        assert_eq!(proto.opset_import[0].version, 21);
        let dq = proto.graph.node.iter().find(|n| n.name == "fc.weight_dequantize").unwrap();
        let block = dq.attribute.iter().find(|a| a.name == "block_size").map(|a| a.i);
        assert_eq!(block, Some(2));
        let zero_point = proto.graph.initializer.iter().find(|t| t.name == "fc.weight_zero_point").unwrap();
        assert_eq!(
            (zero_point.data_type, zero_point.dims.as_slice()),
            (22, [10i64, 2].as_slice()),
            "int4 [10, 2]"
        );
        if prequantize_weights {
            let w = proto.graph.initializer.iter().find(|t| t.name == "fc.weight").unwrap();
            assert_eq!((w.data_type, w.raw_data.len()), (22, 20), "40 int4 values, two per byte");
        }
        let model = qgraph::model_from_proto(proto, None).unwrap();
        let session = qexec::Session::new(model, qexec::SessionOptions::threads(1)).unwrap();
        let got = session.run(&[("input", feeds[0].1.clone())]).unwrap();
        let got: Vec<f32> = got[0].as_f32().unwrap().iter().copied().collect();
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 0.05 * scale, "prequantized {prequantize_weights}: {err} vs scale {scale}");
    }
}

#[test]
fn blockwise_matmul_encodings_use_aimets_layouts_and_load_back() {
    // x [2, 8] → MatMul w [8, 3]: channels along axis 1, blocks of 4 along axis 0, so the
    // encoding shape is [2 blocks, 3 channels]. AIMET writes 1.0.0 channel by channel and
    // 2.0.0 as the nested [2, 3] array.
    let mut g = Graph::new("mm");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 8]));
    let w: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * (1.0 + (i % 3) as f32)).collect();
    let w = g.add_initializer("w", Tensor::from_vec(&[8, 3], w).unwrap());
    let y = g.add_op("MatMul", "mm", &[x, w], vec![]);
    g.add_output(y);
    let model = Model::new(g, 13);
    let blockwise = || {
        let mut s =
            QuantSim::new(model.clone(), QuantsimConfig::load("default").unwrap(), SimOptions::default())
                .unwrap();
        assert!(s.set_blockwise_weights(&["MatMul"], 4, true, 4).unwrap().is_empty());
        s
    };
    let mut s = blockwise();
    let data = Tensor::from_vec(&[2, 8], (0..16).map(|i| i as f32 / 4.0).collect::<Vec<_>>()).unwrap();
    s.calibrate(vec![vec![("x".to_string(), data)]], &mut |_| {}).unwrap();
    let v = s.model().graph.value_id("w").unwrap();
    let encodings =
        s.placement().quantizer(s.placement().quantizer_of(v).unwrap()).encodings.clone().unwrap();
    assert_eq!(encodings.len(), 6);
    let deltas: Vec<f64> = encodings.iter().map(|e| e.delta).collect();
    let find = |doc: &serde_json::Value, list: &str| {
        doc[list].as_array().unwrap().iter().find(|e| e["name"] == "w").unwrap().clone()
    };
    let v1 = find(&qcalib::encodings_json(&s, EncodingVersion::V1_0_0), "param_encodings");
    let channel_major: Vec<f64> =
        (0..3).flat_map(|c| (0..2).map(move |b| b * 3 + c)).map(|i| deltas[i]).collect();
    assert_eq!(v1["scale"], serde_json::json!(channel_major));
    let v2 = find(&qcalib::encodings_json(&s, EncodingVersion::V2_0_0), "encodings");
    assert_eq!(v2["y_scale"], serde_json::json!([deltas[..3], deltas[3..]]));
    assert_eq!((v2["axis"].as_u64(), v2["block_size"].as_u64()), (Some(0), Some(4)));
    for (version, got) in reloaded_deltas(&s, &blockwise, "w") {
        assert_eq!(got, deltas, "{version}");
    }
}

/// The scales of `weight` after `sim`'s encodings are written in 1.0.0 and 2.0.0 and loaded into
/// a simulation `fresh` builds, per version.
fn reloaded_deltas(
    sim: &QuantSim,
    fresh: &dyn Fn() -> QuantSim,
    weight: &str,
) -> Vec<(&'static str, Vec<f64>)> {
    let dir = tempfile::tempdir().unwrap();
    let v = sim.model().graph.value_id(weight).unwrap();
    [EncodingVersion::V1_0_0, EncodingVersion::V2_0_0]
        .into_iter()
        .map(|version| {
            let path = dir.path().join(format!("{}.encodings", version.as_str()));
            qcalib::write_encodings(sim, version, &path).unwrap();
            let loaded = qcalib::read_encodings(&path).unwrap();
            let mut other = fresh();
            let options = qcalib::LoadOptions { freeze: false, keep_missing: true };
            qcalib::load_encodings(&mut other, &loaded, options).unwrap();
            let got =
                other.placement().quantizer(other.placement().quantizer_of(v).unwrap()).encodings.clone();
            (version.as_str(), got.unwrap().iter().map(|e| e.delta).collect())
        })
        .collect()
}

#[test]
fn lpbq_block_scales_are_integers_of_a_channel_scale_and_export_as_aimet_does() {
    // x [2, 64] → MatMul w [64, 3] at int4, blocks of 16, decompressed to int8: 4 bits of
    // integer scale per block under one float scale per channel.
    let mut g = Graph::new("mm");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 64]));
    let w: Vec<f32> =
        (0..192).map(|i| ((i * 37 % 101) as f32 - 50.0) / (1.0 + (i / 48) as f32 * 3.0)).collect();
    let w = g.add_initializer("w", Tensor::from_vec(&[64, 3], w).unwrap());
    let y = g.add_op("MatMul", "mm", &[x, w], vec![]);
    g.add_output(y);
    let model = Model::new(g, 13);
    let lpbq = || {
        let mut s =
            QuantSim::new(model.clone(), QuantsimConfig::load("default").unwrap(), SimOptions::default())
                .unwrap();
        assert!(s.set_blockwise_weights(&["MatMul"], 4, true, 16).unwrap().is_empty());
        assert_eq!(s.set_lpbq(8).unwrap(), 1);
        s
    };
    assert!(lpbq().set_lpbq(4).is_err(), "int4 cannot decompress to 4 bits");
    let mut s = lpbq();
    let data = Tensor::from_vec(&[2, 64], (0..128).map(|i| i as f32 / 64.0).collect::<Vec<_>>()).unwrap();
    s.calibrate(vec![vec![("x".to_string(), data)]], &mut |_| {}).unwrap();
    let v = s.model().graph.value_id("w").unwrap();
    let deltas: Vec<f64> = s
        .placement()
        .quantizer(s.placement().quantizer_of(v).unwrap())
        .encodings
        .clone()
        .unwrap()
        .iter()
        .map(|e| e.delta)
        .collect();
    assert_eq!(deltas.len(), 12, "[4 blocks, 3 channels]");
    for c in 0..3 {
        let unit = (0..4).map(|b| deltas[b * 3 + c]).fold(0f64, f64::max) / 16.0;
        for b in 0..4 {
            let k = deltas[b * 3 + c] / unit;
            assert!(
                (k - k.round()).abs() < 1e-9 && (1.0..=16.0).contains(&k.round()),
                "channel {c} block {b}: {k}"
            );
        }
    }
    let find = |doc: &serde_json::Value, list: &str| {
        doc[list].as_array().unwrap().iter().find(|e| e["name"] == "w").unwrap().clone()
    };
    let v1 = find(&qcalib::encodings_json(&s, EncodingVersion::V1_0_0), "param_encodings");
    assert_eq!(
        (v1["enc_type"].as_str(), v1["bw"].as_u64(), v1["compressed_bw"].as_u64()),
        (Some("LPBQ"), Some(8), Some(4))
    );
    assert_eq!(v1["scale"].as_array().unwrap().len(), 3);
    assert_eq!(v1["offset"], serde_json::json!([-128, -128, -128]));
    assert_eq!(v1["per_block_int_scale"].as_array().unwrap().len(), 12);
    let v2 = find(&qcalib::encodings_json(&s, EncodingVersion::V2_0_0), "encodings");
    assert_eq!(v2["output_dtype"], "int4");
    assert_eq!(v2["per_channel_float_scale"].as_array().unwrap().len(), 1, "[1, 3]");
    assert_eq!(v2["per_block_int_scale"].as_array().unwrap().len(), 4, "[4, 3]");
    for (version, got) in reloaded_deltas(&s, &lpbq, "w") {
        for (a, b) in got.iter().zip(&deltas) {
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{version}: {got:?} vs {deltas:?}");
        }
    }
}

#[test]
fn int4_block_matmul_weights_export_as_matmul_nbits() {
    // x [2, 32] → MatMul w [32, 2], int4 blocks of 16: MatMulNBits with the weight packed per
    // output channel and block (value + 8, low nibble first) and one scale per channel and block.
    let mut g = Graph::new("mm");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 32]));
    let w: Vec<f32> =
        (0..64).map(|i| ((i * 13 % 17) as f32 - 8.0) * if i % 2 == 0 { 0.5 } else { 0.1 }).collect();
    let wv = g.add_initializer("w", Tensor::from_vec(&[32, 2], w.clone()).unwrap());
    let y = g.add_op("MatMul", "mm", &[x, wv], vec![]);
    g.add_output(y);
    let mut s =
        QuantSim::new(Model::new(g, 13), QuantsimConfig::load("default").unwrap(), SimOptions::default())
            .unwrap();
    s.set_blockwise_weights(&["MatMul"], 4, true, 16).unwrap();
    let data = Tensor::from_vec(&[2, 32], (0..64).map(|i| i as f32 / 32.0).collect::<Vec<_>>()).unwrap();
    s.calibrate(vec![vec![("x".to_string(), data)]], &mut |_| {}).unwrap();
    let encs = s.placement().quantizer(s.placement().quantizer_of(wv).unwrap()).encodings.clone().unwrap();
    let options = qcalib::QdqOptions { matmul_nbits: true, ..Default::default() };
    let proto = qcalib::to_qdq_model(&s, options).unwrap();
    let mm = proto.graph.node.iter().find(|n| n.name == "mm").unwrap();
    assert_eq!((mm.op_type.as_str(), mm.domain.as_str()), ("MatMulNBits", "com.microsoft"));
    let attr = |name: &str| mm.attribute.iter().find(|a| a.name == name).map(|a| a.i);
    assert_eq!(
        (attr("K"), attr("N"), attr("bits"), attr("block_size")),
        (Some(32), Some(2), Some(4), Some(16))
    );
    assert!(proto.opset_import.iter().any(|o| o.domain == "com.microsoft"));
    assert!(
        !proto.graph.node.iter().any(|n| n.name == "w_dequantize"),
        "the weight needs no DequantizeLinear"
    );
    let init = |name: &str| proto.graph.initializer.iter().find(|t| t.name == name).unwrap();
    let packed = init("w");
    assert_eq!(packed.dims, [2, 2, 8]);
    let raw = init("w_scales");
    let scales: Vec<f32> = if raw.raw_data.is_empty() {
        raw.float_data.clone()
    } else {
        raw.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    for c in 0..2 {
        for b in 0..2 {
            let delta = encs[b * 2 + c].delta;
            assert_eq!(scales[c * 2 + b], delta as f32);
            for i in 0..16 {
                let k = b * 16 + i;
                let byte = packed.raw_data[c * 16 + k / 2];
                let u = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
                // Values on a tie round either way, as float division lands.
                let exact = f64::from(w[k * 2 + c]) / delta;
                let near = [exact.floor(), exact.ceil()].map(|v| v.clamp(-8.0, 7.0) as i64 + 8);
                assert!(
                    near.contains(&i64::from(u))
                        && (exact.fract().abs() == 0.5
                            || i64::from(u) == exact.round().clamp(-8.0, 7.0) as i64 + 8),
                    "channel {c}, row {k}: {u} for {exact}"
                );
            }
        }
    }
}

#[test]
fn mergeable_statistics_gathered_sample_by_sample_give_the_batch_encodings() {
    // Batches of 8 are observed sample by sample (each sample's statistics merged), batches of 1
    // whole: the same encodings, on one thread or several.
    let one_by_one: Vec<qcalib::Feeds> = batches()
        .iter()
        .flat_map(|b| (0..8).map(move |i| vec![("input".to_string(), b[0].1.rows(i, 1).unwrap())]))
        .collect();
    for scheme in [Scheme::MinMax, Scheme::Entropy] {
        let mut whole = sim(SimOptions { scheme, threads: 1, ..SimOptions::default() });
        whole.calibrate(one_by_one.clone(), &mut |_| {}).unwrap();
        for threads in [1, 3] {
            let s = calibrated(SimOptions { scheme, threads, ..SimOptions::default() });
            assert_eq!(
                qcalib::encodings_json(&s, EncodingVersion::V1_0_0),
                qcalib::encodings_json(&whole, EncodingVersion::V1_0_0),
                "{scheme:?} on {threads} thread(s)"
            );
        }
    }
}

/// input [N,64] → Gemm(64→64) → Relu → MatMul(64→32) → Add: weights of 16 and 8 KiB.
fn mlp() -> Model {
    let mut g = Graph::new("mlp");
    let x = g.add_input("input", DType::F32, Shape(vec![Dim::Symbol("N".into()), Dim::Known(64)]));
    let w0 = g.add_initializer("fc0.weight", t(&[64, 64], values(64 * 64, 7)));
    let b0 = g.add_initializer("fc0.bias", t(&[64], values(64, 8)));
    let h = g.add_op("Gemm", "fc0", &[x, w0, b0], vec![("transB", Attribute::Int(1))]);
    let r = g.add_op("Relu", "relu", &[h], vec![]);
    let w1 = g.add_initializer("fc1.weight", t(&[64, 32], values(64 * 32, 9)));
    let m = g.add_op("MatMul", "fc1", &[r, w1], vec![]);
    let b1 = g.add_initializer("fc1.bias", t(&[32], values(32, 10)));
    let y = g.add_op("Add", "out", &[m, b1], vec![]);
    g.add_output(y);
    Model::new(g, 17)
}

#[test]
fn mapped_weights_simulate_and_export_as_weights_in_memory_do_without_being_kept() {
    let dir = std::env::temp_dir().join(format!("qcalib-mapped-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    qgraph::save_path_with_external_data(&mlp(), dir.join("mlp.onnx")).unwrap();
    let every_tensor = qgraph::LoadOptions { map_external_from: 0, map_tensors_from: 0 };
    let mapped = qgraph::load_path_with(dir.join("mlp.onnx"), every_tensor).unwrap();
    let g = &mapped.graph;
    let lazy: Vec<&str> =
        g.value_ids().map(|v| g.value(v)).filter(|v| v.lazy.is_some()).map(|v| v.name.as_str()).collect();
    assert_eq!(lazy, ["fc0.weight", "fc1.weight"]);
    let feeds: Vec<qcalib::Feeds> = (0..3)
        .map(|i| {
            vec![("input".to_string(), t(&[4, 64], values(256, 40 + i).iter().map(|v| v * 2.0).collect()))]
        })
        .collect();
    let config = || QuantsimConfig::load("default").unwrap();
    let mut read = QuantSim::new(mlp(), config(), SimOptions::default()).unwrap();
    let mut lazy = QuantSim::new(mapped, config(), SimOptions::default()).unwrap();
    for s in [&mut read, &mut lazy] {
        s.calibrate(feeds.clone(), &mut |_| {}).unwrap();
    }
    let version = EncodingVersion::V1_0_0;
    assert_eq!(qcalib::encodings_json(&read, version), qcalib::encodings_json(&lazy, version));
    assert_eq!(run(&read, &feeds[0]), run(&lazy, &feeds[0]));
    assert_eq!(read.state_checksum().unwrap(), lazy.state_checksum().unwrap());
    for prequantize_weights in [false, true] {
        let options = qcalib::QdqOptions { prequantize_weights, ..Default::default() };
        let path = dir.join(format!("qdq-{prequantize_weights}.onnx"));
        qcalib::write_qdq_model(&lazy, options, &path).unwrap();
        assert!(dir.join(format!("qdq-{prequantize_weights}.onnx.data")).exists());
        let exported = qgraph::load_path(&path).unwrap();
        let want = qgraph::model_from_proto(qcalib::to_qdq_model(&read, options).unwrap(), None).unwrap();
        let outputs = |m: Model| {
            let session = qexec::Session::new(m, qexec::SessionOptions::threads(1)).unwrap();
            session.run(&[("input", feeds[1][0].1.clone())]).unwrap()[0].clone()
        };
        assert_eq!(outputs(exported), outputs(want), "prequantize_weights {prequantize_weights}");
    }
    let g = &lazy.model().graph;
    assert!(
        g.value_ids().filter_map(|v| g.value(v).lazy.as_ref()).all(|l| !l.is_resident()),
        "calibration, simulation and export read the mapped weights without keeping them"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_value_a_subgraph_reads_after_a_propagating_op_is_guarded_in_the_qdq_export() {
    use onnx_protobuf::{GraphProto, NodeProto, ValueInfoProto};
    // x → MatMul → Relu → Squeeze → If(c) reading the squeezed value from both branches.
    let branch = |op: &str| {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.input = vec!["squeezed".into()];
        n.output = vec![format!("{op}_out")];
        let mut out = ValueInfoProto::new();
        out.name = format!("{op}_out");
        let mut g = GraphProto::new();
        g.name = op.into();
        g.node = vec![n];
        g.output = vec![out];
        g
    };
    let mut g = Graph::new("guard");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 3, 4]));
    let c = g.add_input("c", DType::Bool, Shape::known(&[]));
    let w = g.add_initializer("w", t(&[4, 4], values(16, 9)));
    let m = g.add_op("MatMul", "matmul", &[x, w], vec![]);
    let r = g.add_op("Relu", "relu", &[m], vec![]);
    let axes = g.add_initializer("axes", Tensor::from_vec(&[1], vec![0i64]).unwrap());
    g.add_op("Squeeze", "squeezed", &[r, axes], vec![]);
    let node = g.add_node(qgraph::NodeSpec {
        name: "if".into(),
        op_type: "If".into(),
        inputs: vec![Some(c)],
        outputs: vec!["out".into()],
        attrs: vec![
            ("then_branch".into(), Attribute::Graph(Box::new(branch("Neg")))),
            ("else_branch".into(), Attribute::Graph(Box::new(branch("Sigmoid")))),
        ],
        ..Default::default()
    });
    let out = g.node(node).output(0).unwrap();
    g.add_output(out);
    let model = qgraph::load_bytes(&qgraph::save_bytes(&Model::new(g, 13)).unwrap(), None).unwrap();
    let mut sim =
        QuantSim::new(model, QuantsimConfig::load("default").unwrap(), SimOptions::default()).unwrap();
    let feeds = |cond: bool| -> qcalib::Feeds {
        vec![
            ("x".to_string(), t(&[1, 3, 4], values(12, 21).iter().map(|v| v * 4.0).collect())),
            ("c".to_string(), Tensor::from_vec(&[], vec![cond]).unwrap()),
        ]
    };
    sim.calibrate(vec![feeds(true)], &mut |_| {}).unwrap();
    sim.set_rounding(qcalib::Rounding::HalfToEven).unwrap();
    let proto = qcalib::to_qdq_model(&sim, qcalib::QdqOptions::default()).unwrap();
    let graph = proto.graph.as_ref().unwrap();
    let guards: Vec<&str> =
        graph.node.iter().filter(|n| n.name.contains("_guard_")).map(|n| n.op_type.as_str()).collect();
    assert_eq!(guards, ["QuantizeLinear", "DequantizeLinear"], "one Q/DQ pair on the squeezed value");
    let session = qexec::Session::new(
        qgraph::model_from_proto(proto, None).unwrap(),
        qexec::SessionOptions::threads(1),
    )
    .unwrap();
    for cond in [true, false] {
        let f = feeds(cond);
        let named: Vec<(&str, Tensor)> = f.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let got = session.run(&named).unwrap();
        assert_eq!(
            got[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(),
            run(&sim, &f),
            "cond {cond}"
        );
    }
}

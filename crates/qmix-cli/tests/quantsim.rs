//! `qmix quantsim` end to end on a small model saved by the test: encodings, FP32 copy,
//! placement report, QDQ model and evaluation outputs are written; bad configs and unusable
//! calibration data exit with code 1 and a message naming the culprit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use qgraph::{Attribute, DType, Dim, Graph, Model, NodeSpec, Shape, Tensor};

/// x [N, 2, 4, 4] → Conv(3, 1×1) → Relu → GlobalAveragePool → Flatten.
fn save_model(dir: &Path) -> PathBuf {
    let mut g = Graph::new("small");
    let x = g.add_input(
        "x",
        DType::F32,
        Shape(vec![Dim::Symbol("N".into()), Dim::Known(2), Dim::Known(4), Dim::Known(4)]),
    );
    let w = g.add_initializer(
        "w",
        Tensor::from_vec(&[3, 2, 1, 1], vec![0.5f32, -1.0, 1.5, 0.25, -0.75, 1.0]).unwrap(),
    );
    let b = g.add_initializer("b", Tensor::from_vec(&[3], vec![0.1f32, -0.2, 0.3]).unwrap());
    let mut add = |op: &str, inputs: Vec<qgraph::ValueId>, out: &str, attrs: Vec<(String, Attribute)>| {
        let id = g.add_node(NodeSpec {
            name: out.into(),
            op_type: op.into(),
            domain: String::new(),
            attrs,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![out.into()],
        });
        g.node(id).outputs()[0].unwrap()
    };
    let c = add("Conv", vec![x, w, b], "conv", vec![]);
    let r = add("Relu", vec![c], "relu", vec![]);
    let p = add("GlobalAveragePool", vec![r], "pool", vec![]);
    let f = add("Flatten", vec![p], "scores", vec![]);
    g.add_output(f);
    let path = dir.join("small.onnx");
    qgraph::save_path(&Model::new(g, 13), &path).unwrap();
    path
}

fn data(dir: &Path, name: &str, n: usize, fill: Option<f32>) -> PathBuf {
    let values: Vec<f32> =
        (0..n * 32).map(|i| fill.unwrap_or(((i * 37 % 101) as f32 - 50.0) / 25.0)).collect();
    let path = dir.join(name);
    ndarray_npy::write_npy(&path, &ArrayD::from_shape_vec(IxDyn(&[n, 2, 4, 4]), values).unwrap()).unwrap();
    path
}

fn qmix(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qmix")).args(args).output().unwrap()
}

#[test]
fn quantsim_writes_encodings_model_report_and_qdq() {
    let dir = common::scratch("ok");
    let model = save_model(&dir);
    let calib = data(&dir, "calib.npy", 10, None);
    let eval = data(&dir, "eval.npy", 6, None);
    let labels = dir.join("labels.npy");
    ndarray_npy::write_npy(&labels, &ndarray::arr1(&[0i64, 1, 2, 0, 1, 2])).unwrap();
    let out = dir.join("out");
    let o = qmix(&[
        "quantsim",
        model.to_str().unwrap(),
        "--calib",
        &format!("x={}", calib.display()),
        "--batch",
        "4",
        "--qdq",
        "--eval",
        &format!("x={}", eval.display()),
        "--labels",
        labels.to_str().unwrap(),
        "--encoding-version",
        "2.0.0",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("calibrated on 10 samples in 3 batches") && stdout.contains("top-1: FP32"),
        "{stdout}"
    );
    for f in ["model.encodings", "model.onnx", "placement.json", "model_qdq.onnx", "sim_outputs.npy"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let enc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.encodings")).unwrap()).unwrap();
    assert_eq!(enc["version"], "2.0.0");
    let outputs: ArrayD<f32> = ndarray_npy::read_npy(out.join("sim_outputs.npy")).unwrap();
    assert_eq!(outputs.shape(), &[6, 3]);
    qgraph::load_path(out.join("model_qdq.onnx")).unwrap();
}

#[test]
fn bad_configs_and_data_exit_with_a_named_culprit() {
    let dir = common::scratch("bad");
    let model = save_model(&dir);
    let calib = data(&dir, "calib.npy", 4, None);
    let model = model.to_str().unwrap();
    let feed = format!("x={}", calib.display());
    let o = qmix(&[
        "quantsim",
        model,
        "--calib",
        &feed,
        "--config",
        "no_such_config",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no_such_config"));
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"defaults": {"ops": {}, "params": {"is_quantized": "yes"}}}"#).unwrap();
    let o = qmix(&[
        "quantsim",
        model,
        "--calib",
        &feed,
        "--config",
        bad.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let o =
        qmix(&["quantsim", model, "--calib", &feed, "--pass", "MaskSoftmax", "--out", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'MaskSoftmax'") && err.contains("MaskedSoftmax"), "{err}");
    let nan = data(&dir, "nan.npy", 4, Some(f32::NAN));
    let o = qmix(&[
        "quantsim",
        model,
        "--calib",
        &format!("x={}", nan.display()),
        "--quiet",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'x'") && err.contains("nan.npy") && err.contains("NaN"), "{err}");
}

#[test]
fn litemp_scores_flips_and_writes_its_reports() {
    let dir = common::scratch("litemp");
    let model = save_model(&dir);
    let calib = data(&dir, "calib.npy", 8, None);
    let out = dir.join("out");
    let o = qmix(&[
        "litemp",
        model.to_str().unwrap(),
        "--calib",
        &format!("x={}", calib.display()),
        "--percent",
        "50",
        "--converts",
        "--qdq",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "layer_sensitivity.json",
        "layer_sensitivity_ranked.json",
        "flipped_layers.json",
        "model_mixed.encodings",
        "model_mixed_qdq.onnx",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let qdq = qgraph::load_path(out.join("model_mixed_qdq.onnx")).unwrap();
    let types: Vec<DType> = qdq
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "QuantizeLinear")
        .filter_map(|(_, n)| n.input(2).and_then(|z| qdq.graph.value(z).dtype))
        .collect();
    assert!(types.contains(&DType::U8) && types.contains(&DType::U16), "{types:?}");
    // The plan, read back by quantsim from onnxruntime's TensorQuantOverrides and from Quark's
    // layer configuration, simulates the same precisions: every tensor's bitwidth in the
    // encodings is the same.
    let bitwidths = |path: &Path| -> Vec<(String, u64)> {
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let mut out: Vec<(String, u64)> = ["activation_encodings", "param_encodings"]
            .iter()
            .flat_map(|k| doc[*k].as_array().unwrap().clone())
            .map(|e| (e["name"].as_str().unwrap().to_string(), e["bw"].as_u64().unwrap()))
            .collect();
        out.sort();
        out
    };
    for plan in ["tensor_quant_overrides.json", "quark_config.json"] {
        let replayed = dir.join(format!("replayed_{plan}"));
        let o = qmix(&[
            "quantsim",
            model.to_str().unwrap(),
            "--calib",
            &format!("x={}", calib.display()),
            "--plan",
            out.join(plan).to_str().unwrap(),
            "--out",
            replayed.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{plan}: {stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("precision converts simulated"), "{plan}: {stdout}");
        assert_eq!(
            bitwidths(&replayed.join("model.encodings")),
            bitwidths(&out.join("model_mixed.encodings")),
            "{plan}"
        );
    }
    let flipped: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("flipped_layers.json")).unwrap()).unwrap();
    let n = flipped["n_layers"].as_u64().unwrap();
    assert_eq!(flipped["n_flipped"].as_u64().unwrap(), n.div_ceil(2));
    let enc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model_mixed.encodings")).unwrap()).unwrap();
    let bws: Vec<u64> =
        enc["activation_encodings"].as_array().unwrap().iter().map(|e| e["bw"].as_u64().unwrap()).collect();
    assert!(bws.contains(&16) && bws.contains(&8), "{bws:?}");
    let o = qmix(&[
        "litemp",
        model.to_str().unwrap(),
        "--calib",
        &format!("x={}", calib.display()),
        "--override",
        "int8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
}

/// The README's main command: `qmix litemp models/digits_cnn.onnx`, data found beside the model.
#[test]
fn the_main_job_runs_on_the_default_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = root.join("models/digits_cnn.onnx");
    let scratch = common::scratch("default-model");
    let out = scratch.join("out");
    let o = qmix(&["litemp", model.to_str().unwrap(), "--quiet", "--out", out.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("top-1 on 400 samples: FP32 0.9825, W8A8 0.9825, Lite-MP 0.9825"), "{stdout}");
    assert!(out.join("flipped_layers.json").is_file());
    // With --json, stdout holds exactly one JSON summary.
    let o = qmix(&["litemp", model.to_str().unwrap(), "--quiet", "--json", "--out", out.to_str().unwrap()]);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["top1"]["fp32"], 0.9825);
    assert_eq!(summary["layers"], 8);
}

#[test]
fn inspect_summarises_the_placement_of_a_config() {
    let dir = common::scratch("inspect");
    let model = save_model(&dir);
    let o = qmix(&["inspect", model.to_str().unwrap(), "--config", "default_per_tensor"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("quantizers under config 'default_per_tensor'") && stdout.contains("param"),
        "{stdout}"
    );
    let o = qmix(&["inspect", model.to_str().unwrap(), "--config", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    // Graph passes apply here as in the job commands; an unknown one is a user error.
    let o = qmix(&["inspect", model.to_str().unwrap(), "--config", "default", "--pass", "MatmulAdd"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = qmix(&["inspect", model.to_str().unwrap(), "--config", "default", "--pass", "Nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("MaskedSoftmax"));
}

#[test]
fn blockwise_int4_weights_export_as_int4_blocked_dequantize() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = root.join("models/digits_cnn.onnx");
    let calib = format!("input={}", root.join("models/digits_cnn_calib.npy").display());
    let scratch = common::scratch("blockwise");
    let out = scratch.join("out");
    let args = |extra: &[&str]| {
        let mut a =
            vec!["quantsim", model.to_str().unwrap(), "--calib", &calib, "--out", out.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        qmix(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run(&["--param", "int4", "--block-size", "4", "--qdq", "--prequantize-weights"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    // The stem and depthwise convolutions read one input channel: no block of 4 fits.
    assert!(stdout.contains("2 weights kept their quantizer") && stdout.contains("stem.weight"), "{stdout}");
    let placement = std::fs::read_to_string(out.join("placement.json")).unwrap();
    assert!(placement.contains("per_block"), "{placement}");
    let qdq = qgraph::load_path(out.join("model_qdq.onnx")).unwrap();
    let g = &qdq.graph;
    let classifier = g.value(g.value_id("classifier.weight").unwrap());
    assert_eq!(classifier.dtype, Some(DType::I4));
    assert!(!out.join("tensor_quant_overrides.json").exists());
    // Blocks need integer weights.
    let o = run(&["--param", "fp16", "--block-size", "4"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--block-size"));
    // LPBQ: the blocked weights' encodings in AIMET's LPBQ form; it needs blocks, and a
    // decompressed width above the weights'.
    let o = run(&["--param", "int4", "--block-size", "4", "--lpbq", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let encodings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.encodings")).unwrap()).unwrap();
    let classifier = encodings["param_encodings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "classifier.weight")
        .unwrap()
        .clone();
    assert_eq!(
        (classifier["enc_type"].as_str(), classifier["compressed_bw"].as_u64()),
        (Some("LPBQ"), Some(4))
    );
    assert_eq!(run(&["--param", "int4", "--lpbq", "8"]).status.code(), Some(1));
    let o = run(&["--param", "int8", "--block-size", "4", "--lpbq", "8"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("LPBQ"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// x [N, 4], mode [] (int64) → If(mode == 1): then MatMul(x, w) → Relu, else Neg(x).
fn save_mode_model(dir: &Path) -> PathBuf {
    let mut then_graph = Graph::new("then");
    let x = then_graph.add_input("x", DType::F32, Shape::known(&[1, 4]));
    let w = then_graph.add_initializer(
        "w",
        Tensor::from_vec(&[4, 4], (0..16).map(|i| i as f32 / 8.0 - 1.0).collect()).unwrap(),
    );
    let m = then_graph.add_op("MatMul", "then_matmul", &[x, w], vec![]);
    let r = then_graph.add_op("Relu", "then_relu", &[m], vec![]);
    then_graph.add_output(r);
    let mut else_graph = Graph::new("else");
    let x = else_graph.add_input("x", DType::F32, Shape::known(&[1, 4]));
    let n = else_graph.add_op("Neg", "else_neg", &[x], vec![]);
    else_graph.add_output(n);
    // Branches read `x` from the enclosing graph: no inputs of their own.
    let branch = |g: Graph| {
        let mut proto = qgraph::model_to_proto(&Model::new(g, 13)).graph.unwrap();
        proto.input.clear();
        Attribute::Graph(Box::new(proto))
    };
    let mut g = Graph::new("mode");
    g.add_input("x", DType::F32, Shape(vec![Dim::Symbol("N".into()), Dim::Known(4)]));
    let mode = g.add_input("mode", DType::I64, Shape::known(&[]));
    let one = g.add_initializer("one", Tensor::scalar(1i64));
    let cond = g.add_op("Equal", "is_one", &[mode, one], vec![]);
    let id = g.add_node(NodeSpec {
        name: "if".into(),
        op_type: "If".into(),
        domain: String::new(),
        attrs: vec![("then_branch".into(), branch(then_graph)), ("else_branch".into(), branch(else_graph))],
        inputs: vec![Some(cond)],
        outputs: vec!["y".into()],
    });
    let y = g.node(id).output(0).unwrap();
    g.add_output(y);
    let path = dir.join("mode.onnx");
    qgraph::save_path(&Model::new(g, 13), &path).unwrap();
    path
}

#[test]
fn a_bound_input_specialises_the_model_and_its_if_is_inlined() {
    let dir = common::scratch("bind");
    let model = save_mode_model(&dir);
    let x = ArrayD::from_shape_fn(IxDyn(&[6, 4]), |i| (i[0] * 4 + i[1]) as f32 / 6.0 - 2.0);
    ndarray_npy::write_npy(dir.join("x.npy"), &x).unwrap();
    ndarray_npy::write_npy(dir.join("mode.npy"), &ndarray::arr0(1i64)).unwrap();
    let quantized = |extra: &[&str], out: &str| -> (usize, String) {
        let out = dir.join(out);
        let calib = format!("x={}", dir.join("x.npy").display());
        let mut args =
            vec!["quantsim", model.to_str().unwrap(), "--calib", &calib, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_qmix")).args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let placement: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("placement.json")).unwrap()).unwrap();
        let tensors = placement["quantizers"].as_array().map_or(0, Vec::len);
        (tensors, String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let mode_calib = format!("mode={}", dir.join("mode.npy").display());
    let (whole, _) = quantized(&["--calib", &mode_calib], "whole");
    let (bound, said) = quantized(&["--bind", "mode=1"], "bound");
    assert!(said.contains("1 If node(s)"), "{said}");
    assert!(bound > whole, "the branch's MatMul, weight and Relu get quantizers: {bound} vs {whole}");
    let specialised = qgraph::load_path(dir.join("bound/model.onnx")).unwrap();
    let g = &specialised.graph;
    assert!(g.nodes().all(|(_, n)| n.op_type != "If"));
    assert_eq!(g.inputs().iter().map(|&v| g.value(v).name.as_str()).collect::<Vec<_>>(), ["x"]);
    let m = model.to_str().unwrap();
    let x = format!("x={}", dir.join("x.npy").display());
    let out = dir.join("bad");
    let out = out.to_str().unwrap();
    common::fails_naming(
        &["quantsim", m, "--calib", &x, "--bind", "nope=1", "--out", out],
        &["nope", "mode"],
    );
    common::fails_naming(
        &["quantsim", m, "--calib", &x, "--bind", "mode=1.5", "--out", out],
        &["1.5", "integer"],
    );
    common::fails_naming(
        &["quantsim", m, "--calib", &x, "--bind", "mode=1,2", "--out", out],
        &["2 value(s)"],
    );
    common::fails_naming(&["quantsim", m, "--calib", &x, "--bind", "mode=one", "--out", out], &["'one'"]);
}

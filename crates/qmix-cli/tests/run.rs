//! `qmix run` end to end: a small model saved with qgraph, .npy inputs, outputs written as .npy;
//! and the user errors (wrong shape, missing file, unknown input) exiting with code 1 and a message
//! that names the culprit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use qgraph::{DType, Graph, Model, NodeSpec, Shape, Tensor};

/// y = Relu(x · W), x [N, 3], W [3, 2].
fn save_model(dir: &Path) -> PathBuf {
    let mut g = Graph::new("tiny");
    let x = g.add_input("x", DType::F32, Shape(vec![qgraph::Dim::Symbol("N".into()), qgraph::Dim::Known(3)]));
    let w =
        g.add_initializer("w", Tensor::from_vec(&[3, 2], vec![1.0f32, -1.0, 2.0, 0.5, -1.0, 1.0]).unwrap());
    let mm = g.add_node(NodeSpec {
        name: "mm".into(),
        op_type: "MatMul".into(),
        domain: String::new(),
        attrs: vec![],
        inputs: vec![Some(x), Some(w)],
        outputs: vec!["h".into()],
    });
    let h = g.node(mm).outputs()[0];
    let relu = g.add_node(NodeSpec {
        name: "relu".into(),
        op_type: "Relu".into(),
        domain: String::new(),
        attrs: vec![],
        inputs: vec![h],
        outputs: vec!["y/out".into()],
    });
    g.add_output(g.node(relu).outputs()[0].unwrap());
    let path = dir.join("tiny.onnx");
    qgraph::save_path(&Model::new(g, 13), &path).unwrap();
    path
}

fn qmix(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qmix")).args(args).output().unwrap()
}

/// `qmix run MODEL --input x=INPUT --out OUT` and `extra`.
fn run(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let x = format!("x={}", input.display());
    let mut args = vec!["run", model.to_str().unwrap(), "--input", &x, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    qmix(&args)
}

#[test]
fn run_writes_outputs_as_npy() {
    let dir = common::scratch("ok");
    let model = save_model(&dir);
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0]).unwrap();
    let input = dir.join("x.npy");
    ndarray_npy::write_npy(&input, &x).unwrap();
    let out = dir.join("out");
    let o = run(&model, &input, &out, &["--threads", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let y: ArrayD<f32> = ndarray_npy::read_npy(out.join("y_out.npy")).unwrap();
    // By hand: x·W = [1+4−3, −1+1+3] = [2, 3]; row 1: [−1+0−1, 1+0+1] = [−2, 2].
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), vec![2.0, 3.0, 0.0, 2.0]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("peak intermediate memory"));
}

#[test]
fn outputs_with_long_or_clashing_names_each_get_their_own_file() {
    // Exporters write names of hundreds of characters (TF's `a/b;c/d;…`), and `h.x`/`h_x`
    // sanitize alike: y = x, then three Relu outputs named that way.
    let dir = common::scratch("names");
    let long = "MobileNetV2/expanded_conv_6/project/Conv2D;StatefulPartitionedCall/".repeat(6);
    let mut g = Graph::new("names");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 2]));
    for (i, name) in [long.as_str(), "h.x", "h_x"].into_iter().enumerate() {
        let n = g.add_node(NodeSpec {
            name: format!("relu{i}"),
            op_type: "Relu".into(),
            domain: String::new(),
            attrs: vec![],
            inputs: vec![Some(x)],
            outputs: vec![name.into()],
        });
        g.add_output(g.node(n).outputs()[0].unwrap());
    }
    let model = dir.join("names.onnx");
    qgraph::save_path(&Model::new(g, 13), &model).unwrap();
    let input = dir.join("x.npy");
    ndarray_npy::write_npy(&input, &ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![1.0f32, -1.0]).unwrap())
        .unwrap();
    let out = dir.join("out");
    let o = run(&model, &input, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.iter().all(|f| f.len() <= 124), "{files:?}");
    assert!(out.join("h_x.npy").exists());
}

#[test]
fn run_reports_bad_inputs_with_exit_code_1() {
    let dir = common::scratch("bad");
    let model = save_model(&dir);
    let m = model.to_str().unwrap();
    let wrong = dir.join("wrong.npy");
    ndarray_npy::write_npy(&wrong, &ArrayD::<f32>::zeros(IxDyn(&[2, 4]))).unwrap();
    let cases = [
        (format!("x={}", wrong.display()), "graph input 'x'"),
        (format!("x={}", dir.join("missing.npy").display()), "missing.npy"),
        (format!("z={}", wrong.display()), "'z' is not an input"),
    ];
    for (arg, expect) in cases {
        let o = qmix(&["run", m, "--input", &arg, "--out", dir.join("o").to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{arg}: {err}");
        assert!(err.contains(expect) && err.lines().count() == 1, "{arg}: {err}");
    }
}

/// `qmix run --encodings` reproduces the simulation `qmix quantize` evaluated.
#[test]
fn run_simulates_with_exported_encodings() {
    let dir = common::scratch("simulated");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let model = models.join("bars_cnn.onnx");
    let calib = format!("input={}", models.join("bars_cnn_calib.npy").display());
    let eval = format!("input={}", models.join("bars_cnn_eval.npy").display());
    let q = dir.join("q");
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["quantize", model.to_str().unwrap(), "--calib", &calib, "--eval", &eval, "--quiet", "--out"])
        .arg(&q)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = dir.join("r");
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["run", model.to_str().unwrap(), "--input", &eval, "--profile", "3", "--encodings"])
        .arg(q.join("model.encodings"))
        .arg("--out")
        .arg(&r)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("profile: ") && stdout.contains("op type"), "{stdout}");
    let read = |p: PathBuf| -> ArrayD<f32> { ndarray_npy::read_npy(p).unwrap() };
    assert_eq!(read(r.join("logits.npy")), read(q.join("sim_outputs.npy")));
}

//! `qmix cle` and the post-training options of the simulation commands on a small model with a
//! BatchNormalization and a ReLU6 saved by the test: the equalized model computes what the
//! original computes, `quantsim` applies BN re-estimation, CLE and bias correction and writes
//! what each did, `qat` re-estimates and folds the batch norm after training (unless told to keep
//! it), and techniques that need data say so when none is given.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use qexec::{Session, SessionOptions};
use qgraph::{Attribute, DType, Dim, Graph, Model, Shape, Tensor};

fn tensor(shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(f).collect()).unwrap().into_shared())
}

/// x [N, 2, 6, 6] → Conv(4, 3×3, pad 1) → BatchNormalization → Clip(0, 6) → Conv(3, 1×1) →
/// GlobalAveragePool → Flatten.
fn save_model(dir: &Path) -> PathBuf {
    let mut g = Graph::new("bn_relu6");
    let shape = Shape(vec![Dim::Symbol("N".into()), Dim::Known(2), Dim::Known(6), Dim::Known(6)]);
    let x = g.add_input("x", DType::F32, shape);
    let w1 = g.add_initializer(
        "w1",
        tensor(&[4, 2, 3, 3], |i| (i as f32 * 0.77).sin() * [0.02, 0.3, 0.05, 0.9][i / 18]),
    );
    let c1 = g.add_op("Conv", "conv1", &[x, w1], vec![("pads", Attribute::Ints(vec![1, 1, 1, 1]))]);
    let bn: Vec<_> = [
        ("gamma", [1.0, 0.5, 2.0, 1.0]),
        ("beta", [0.5, 3.0, -1.0, 0.2]),
        ("mean", [0.1, -0.2, 0.0, 0.3]),
        ("var", [1.0, 2.0, 0.5, 1.5]),
    ]
    .iter()
    .map(|(n, v)| g.add_initializer(n, tensor(&[4], |i| v[i])))
    .collect();
    let b = g.add_op("BatchNormalization", "bn", &[c1, bn[0], bn[1], bn[2], bn[3]], vec![]);
    let (lo, hi) =
        (g.add_initializer("zero", tensor(&[], |_| 0.0)), g.add_initializer("six", tensor(&[], |_| 6.0)));
    let r = g.add_op("Clip", "relu6", &[b, lo, hi], vec![]);
    let w2 = g.add_initializer("w2", tensor(&[3, 4, 1, 1], |i| (i as f32 * 1.3).cos()));
    let c2 = g.add_op("Conv", "conv2", &[r, w2], vec![]);
    let p = g.add_op("GlobalAveragePool", "pool", &[c2], vec![]);
    let f = g.add_op("Flatten", "scores", &[p], vec![]);
    g.add_output(f);
    let path = dir.join("bn_relu6.onnx");
    qgraph::save_path(&Model::new(g, 13), &path).unwrap();
    path
}

fn data(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("x.npy");
    let values: Vec<f32> = (0..n * 72).map(|i| ((i * 37 % 101) as f32 - 50.0) / 20.0).collect();
    ndarray_npy::write_npy(&path, &ArrayD::from_shape_vec(IxDyn(&[n, 2, 6, 6]), values).unwrap()).unwrap();
    path
}

fn qmix(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qmix")).args(args).output().unwrap()
}

/// `qmix quantsim MODEL --calib x=DATA --out OUT --quiet` and `extra`.
fn quantsim(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let calib = format!("x={}", data.display());
    let mut args = vec![
        "quantsim",
        model.to_str().unwrap(),
        "--calib",
        &calib,
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    qmix(&args)
}

fn outputs(model: &Path, x: &Tensor) -> ArrayD<f32> {
    let m = qgraph::load_path(model).unwrap();
    let s = Session::new(m, SessionOptions::threads(1)).unwrap();
    s.run(&[("x", x.clone())]).unwrap()[0].as_f32().unwrap().to_owned()
}

#[test]
fn cle_writes_an_equivalent_model_and_its_report() {
    let dir = common::scratch("cle");
    let model = save_model(&dir);
    let out = dir.join("cle_out");
    let o = qmix(&["cle", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-high-bias-fold"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cle_report.json")).unwrap()).unwrap();
    assert_eq!(report["sets"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["bn_folded"].as_array().unwrap().len(), 1);
    assert_eq!(report["clips_rewritten"][0], "relu6");
    let x = tensor(&[3, 2, 6, 6], |i| ((i * 13 % 29) as f32 - 14.0) / 5.0);
    let (a, b) = (outputs(&model, &x), outputs(&out.join("model.onnx"), &x));
    let diff = (&a - &b).iter().fold(0f32, |m, d| m.max(d.abs()));
    assert!(diff < 1e-5, "equalized outputs moved by {diff}");
}

#[test]
fn quantsim_applies_and_reports_every_technique() {
    let dir = common::scratch("quantsim");
    let model = save_model(&dir);
    let x = data(&dir, 16);
    let out = dir.join("qs");
    let o = quantsim(&model, &x, &out, &["--bn-reestimate", "--cle", "--bias-correction"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("ptq.json")).unwrap()).unwrap();
    assert_eq!(report["bn_reestimation"]["reestimated"].as_array().unwrap().len(), 1, "{report}");
    assert!(report["cle"]["sets"].is_array());
    assert!(!report["bias_correction"]["corrected"].as_array().unwrap().is_empty(), "{report}");
    // The model beside the encodings is the modified one: no BatchNormalization, no Clip.
    let saved = qgraph::load_path(out.join("model.onnx")).unwrap();
    assert!(saved.graph.nodes().all(|(_, n)| n.op_type != "BatchNormalization" && n.op_type != "Clip"));
}

#[test]
fn qat_reestimates_and_folds_batch_norms_after_training() {
    let dir = common::scratch("qat_bn");
    let model = save_model(&dir);
    let x = data(&dir, 16);
    let calib = format!("x={}", x.display());
    let run = |out: &Path, extra: &[&str]| {
        let mut args =
            vec!["qat", model.to_str().unwrap(), "--calib", &calib, "--out", out.to_str().unwrap()];
        args.extend_from_slice(&["--epochs", "2", "--train-batch", "8", "--distill", "mse", "--quiet"]);
        args.extend_from_slice(extra);
        let o = qmix(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        qgraph::load_path(out.join("model.onnx")).unwrap()
    };
    let bn_count = |m: &Model| m.graph.nodes().filter(|(_, n)| n.op_type == "BatchNormalization").count();
    let folded = dir.join("folded");
    assert_eq!(bn_count(&run(&folded, &[])), 0);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folded.join("qat.json")).unwrap()).unwrap();
    assert_eq!(report["bn_reestimation"]["folded"][0]["layer"], "conv1", "{report}");
    assert_eq!(report["bn_reestimation"]["reestimated"].as_array().unwrap().len(), 1, "{report}");
    // Recomputed in segments, the training runs through the batch norm as well.
    assert_eq!(bn_count(&run(&dir.join("kept"), &["--keep-batch-norms", "--segments", "3"])), 1);
    let missing = dir.join("no_teacher.onnx");
    let out = dir.join("t");
    common::fails_naming(
        &["qat", model.to_str().unwrap(), "--calib", &calib, "--out", out.to_str().unwrap()]
            .into_iter()
            .chain(["--epochs", "1", "--quiet", "--teacher", missing.to_str().unwrap()])
            .collect::<Vec<_>>(),
        &["no_teacher.onnx"],
    );
}

#[test]
fn techniques_that_need_data_say_so() {
    let dir = common::scratch("nodata");
    let model = save_model(&dir);
    let x = data(&dir, 8);
    let stats = dir.join("stats.bin");
    let o = quantsim(&model, &x, &dir.join("a"), &["--save-stats", stats.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for flag in ["--bias-correction", "--bn-reestimate"] {
        let o = qmix(&[
            "quantsim",
            model.to_str().unwrap(),
            "--load-stats",
            stats.to_str().unwrap(),
            flag,
            "--out",
            dir.join("b").to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{flag}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(flag) && err.contains("calibration data"), "{flag}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let o = quantsim(&model, &x, &dir.join("c"), &["--bias-correction", "sometimes"]);
    assert_eq!(o.status.code(), Some(1));
}

/// `qmix quantsim` on the digits model at W4A8 per-tensor with `extra`; the simulated top-1.
fn digits_top1(out: &Path, command: &str, extra: &[&str]) -> f64 {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let arg = |f: &str| format!("input={}", models.join(f).display());
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["--json", command])
        .arg(models.join("digits_cnn.onnx"))
        .args(["--calib", &arg("digits_cnn_calib.npy"), "--eval", &arg("digits_cnn_eval.npy")])
        .arg("--labels")
        .arg(models.join("digits_cnn_labels.npy"))
        .args(["--config", "default_per_tensor", "--param", "int4", "--act", "int8", "--quiet", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    summary["top1"]["simulated"]
        .as_f64()
        .unwrap_or_else(|| panic!("no top-1 in {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn adaround_and_seq_mse_freeze_what_they_learn_on_the_digits_model() {
    let dir = common::scratch("adaround");
    let nearest = digits_top1(&dir.join("nearest"), "quantsim", &[]);
    let rounded = digits_top1(&dir.join("adaround"), "adaround", &["--adaround-iterations", "1000"]);
    assert!(rounded >= nearest, "AdaRound top-1 {rounded} below nearest rounding's {nearest}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adaround/ptq.json")).unwrap()).unwrap();
    let layers = report["adaround"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4, "{report}");
    assert!(layers.iter().any(|l| l["flipped"].as_u64().unwrap() > 0), "{report}");
    // The exported model holds the rounded weights, on the grids the encodings file gives.
    let encodings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adaround/model.encodings")).unwrap()).unwrap();
    let saved = qgraph::load_path(dir.join("adaround/model.onnx")).unwrap();
    for entry in encodings["param_encodings"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let Some(v) = saved.graph.value_id(name) else { continue };
        let (scale, offset) = (entry["scale"][0].as_f64().unwrap(), entry["offset"][0].as_f64().unwrap());
        for &w in saved.graph.static_value(v).unwrap().as_f32().unwrap().iter() {
            let q = f64::from(w) / scale - offset;
            assert!((q - q.round()).abs() < 1e-3, "{name}: {w} is off its grid");
        }
    }
    let searched = digits_top1(&dir.join("seq_mse"), "quantsim", &["--seq-mse"]);
    assert!(searched >= nearest - 0.02, "sequential MSE top-1 {searched} vs nearest {nearest}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("seq_mse/ptq.json")).unwrap()).unwrap();
    assert_eq!(report["seq_mse"]["layers"].as_array().unwrap().len(), 4, "{report}");
}

#[test]
fn job_commands_keep_adarounds_weights_on_their_grids() {
    // `litemp --adaround`: the float reference is the model with AdaRound's weights, and the
    // simulation keeps their frozen grids, so quantizing the weights alone changes nothing.
    let dir = common::scratch("litemp_adaround");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let arg = |f: &str| format!("input={}", models.join(f).display());
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["--json", "litemp"])
        .arg(models.join("digits_cnn.onnx"))
        .args(["--calib", &arg("digits_cnn_calib.npy"), "--eval", &arg("digits_cnn_eval.npy")])
        .arg("--labels")
        .arg(models.join("digits_cnn_labels.npy"))
        .args(["--config", "default_per_tensor", "--adaround", "--adaround-iterations", "200"])
        .args(["--count", "1", "--quiet", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary["psnr_db"]["weights_only"].as_f64().unwrap() >= 99.0, "{summary}");
    assert_eq!(summary["flipped"].as_array().unwrap().len(), 1, "{summary}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("AdaRound: 4 layers rounded"));
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["autoquant", "model.onnx", "--allowed-drop", "0.01", "--adaround"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--adaround-iterations sets its AdaRound stage"));
}

#[test]
fn autoquant_stops_at_the_first_stage_within_the_drop_and_resumes() {
    let dir = common::scratch("autoquant");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_qmix"))
            .args(["--json", "autoquant"])
            .arg(models.join("digits_cnn.onnx"))
            .args(["--config", "default_per_tensor", "--param", "int4", "--act", "int8"])
            .args(["--allowed-drop", "0.01", "--adaround-iterations", "1000", "--quiet", "--out"])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stages = summary["stages"].as_array().unwrap();
    let fp32 = summary["fp32"].as_f64().unwrap();
    // W4 per-tensor falls more than 1 pp below FP32 without help; AdaRound brings it back.
    assert!(stages[0]["score"].as_f64().unwrap() < fp32 - 0.01, "{summary}");
    assert_eq!(summary["chosen"], "adaround", "{summary}");
    assert_eq!(summary["target_met"], true);
    assert_eq!(summary["early_exit"], false, "{summary}");
    assert_eq!(summary["stages"][1]["stage"], "w32_evaluation", "{summary}");
    for f in ["model.onnx", "model.encodings", "autoquant.json", "autoquant.html"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    // A second run reads every stage from the cache and keeps the same result.
    let again = run();
    assert!(again.status.success());
    let cached: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(cached["stages"], summary["stages"]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("autoquant.json")).unwrap()).unwrap();
    assert!(report["stages"].as_array().unwrap().iter().all(|s| s["cached"] == true), "{report}");
}

#[test]
fn learned_techniques_skip_what_they_cannot_learn_and_name_bad_files() {
    let dir = common::scratch("hostile");
    // A Gemm whose first operand is transposed has no gradient rule: AdaRound leaves it at nearest
    // rounding and says so.
    let mut g = Graph::new("gemm_transa");
    let x = g.add_input("x", DType::F32, Shape(vec![Dim::Symbol("N".into()), Dim::Known(72)]));
    let xt = g.add_op("Transpose", "transpose", &[x], vec![("perm", Attribute::Ints(vec![1, 0]))]);
    let w = g.add_initializer("w", tensor(&[72, 3], |i| (i as f32 * 0.7).sin()));
    let y = g.add_op("Gemm", "gemm", &[xt, w], vec![("transA", Attribute::Int(1))]);
    g.add_output(y);
    let model = dir.join("gemm_transa.onnx");
    qgraph::save_path(&Model::new(g, 13), &model).unwrap();
    let flat = dir.join("flat.npy");
    let values: Vec<f32> = (0..8 * 72).map(|i| ((i * 37 % 101) as f32 - 50.0) / 20.0).collect();
    ndarray_npy::write_npy(&flat, &ArrayD::from_shape_vec(IxDyn(&[8, 72]), values).unwrap()).unwrap();
    let o = quantsim(&model, &flat, &dir.join("a"), &["--adaround", "--adaround-iterations", "5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("a/ptq.json")).unwrap()).unwrap();
    let skipped = report["adaround"]["skipped"].to_string();
    assert!(skipped.contains("gemm") && skipped.contains("transA"), "{report}");

    // A model that is not ONNX: one line, the cause said once.
    let garbage = dir.join("garbage.onnx");
    std::fs::write(&garbage, b"\x08\x07not a model at all").unwrap();
    let o = quantsim(&garbage, &flat, &dir.join("b"), &["--seq-mse"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("not an ONNX model").count(), 1, "{err}");

    // AutoQuant's cache: a corrupt score file is named with the way out; the way out works.
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let out = dir.join("aq");
    let cache = out.join(".autoquant_cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("scores.json"), "{garbage").unwrap();
    let autoquant = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qmix"))
            .arg("autoquant")
            .arg(models.join("digits_cnn.onnx"))
            .args(["--allowed-drop", "1", "--adaround-iterations", "5", "--quiet", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = autoquant(&[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("scores.json") && err.contains("--fresh") && err.lines().count() == 1, "{err}");
    let o = autoquant(&["--fresh"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // An output path that is a file.
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::write(&out, "a file").unwrap();
    let o = autoquant(&[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("aq") && err.lines().count() == 1 && !err.contains("--fresh"), "{err}");
}

#[test]
fn autoquant_ends_with_amp_when_the_techniques_fall_short() {
    let dir = common::scratch("autoquant-amp");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let run = |candidates: &str| {
        Command::new(env!("CARGO_BIN_EXE_qmix"))
            .args(["--json", "autoquant"])
            .arg(models.join("digits_cnn.onnx"))
            .args(["--config", "default_per_tensor", "--param", "int4", "--act", "int4"])
            .args(["--allowed-drop", "0.005", "--adaround-iterations", "200", "--amp-candidates", candidates])
            .args(["--quiet", "--out"])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let o = run("w8a8,w4a8,w8a4,w4a4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // At W4A4 even float weights lose more than the allowed drop (AIMET's W32 check): the weight
    // techniques are skipped, and the AMP stage meets the target with a mix.
    let stages: Vec<&str> =
        summary["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["batchnorm_folding", "w32_evaluation", "auto_mixed_precision"], "{summary}");
    assert_eq!(summary["early_exit"], true, "{summary}");
    let w32 = summary["stages"][1]["score"].as_f64().unwrap();
    assert!(w32 < summary["fp32"].as_f64().unwrap() - 0.005, "{summary}");
    assert_eq!(summary["chosen"], "auto_mixed_precision", "{summary}");
    assert_eq!(summary["target_met"], true, "{summary}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("autoquant.json")).unwrap()).unwrap();
    let counts = report["amp"]["groups_per_candidate"].as_object().unwrap();
    assert!(counts.len() > 1 && counts.contains_key("W4A4"), "{report}");
    for f in ["model.encodings", "accuracy_list.json", "pareto_curve.svg"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    // Rerun: every stage, AMP's included, from the caches; other candidates start AMP afresh.
    let again: serde_json::Value = serde_json::from_slice(&run("w8a8,w4a8,w8a4,w4a4").stdout).unwrap();
    assert_eq!(again["stages"], summary["stages"]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("autoquant.json")).unwrap()).unwrap();
    assert!(report["stages"].as_array().unwrap().iter().all(|s| s["cached"] == true), "{report}");
    let other = run("w8a8,w4a4");
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
}

//! `qmix qat` on the digits model: label-free W4A4 QAT with range learning brings the simulated
//! top-1 to within 1 pp of FP32 and writes what `quantsim` writes (the fine-tuned model, its
//! encodings, a QDQ model) plus qat.json; a second run with `--resume` finds the finished
//! checkpoint and ends with the same result; a checkpoint of other settings is refused.

use std::path::Path;
use std::process::{Command, Output};

mod common;

fn qat(out: &Path, extra: &[&str]) -> Output {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let arg = |f: &str| format!("input={}", models.join(f).display());
    Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["--json", "qat"])
        .arg(models.join("digits_cnn.onnx"))
        .args(["--calib", &arg("digits_cnn_calib.npy"), "--eval", &arg("digits_cnn_eval.npy")])
        .arg("--labels")
        .arg(models.join("digits_cnn_labels.npy"))
        .args(["--param", "int4", "--act", "int4", "--mode", "range-learning", "--lr", "0.03"])
        .args(["--train-batch", "20", "--micro-batch", "10", "--quiet", "--qdq", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn top1(o: &Output) -> (f64, f64) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["command"], "qat", "{summary}");
    (summary["top1"]["fp32"].as_f64().unwrap(), summary["top1"]["simulated"].as_f64().unwrap())
}

#[test]
fn label_free_qat_writes_the_fine_tuned_model_and_resumes() {
    let dir = common::scratch("qat");
    let out = dir.join("q");
    let first = qat(&out, &["--epochs", "30"]);
    let (fp32, simulated) = top1(&first);
    assert!(simulated >= fp32 - 0.01, "QAT top-1 {simulated} against FP32 {fp32}");
    for file in ["model.onnx", "model.encodings", "model_qdq.onnx", "qat.json"] {
        assert!(out.join(file).exists(), "{file}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("qat.json")).unwrap()).unwrap();
    assert_eq!(report["epochs"].as_array().unwrap().len(), 31, "{report}");
    assert!(report["learned_quantizers"].as_u64().unwrap() > 0, "{report}");
    // The fine-tuned weights differ from the given ones.
    let given = qgraph::load_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits_cnn.onnx"))
        .unwrap();
    let tuned = qgraph::load_path(out.join("model.onnx")).unwrap();
    let differs = given.graph.initializers().any(|v| {
        let name = &given.graph.value(v).name;
        let t = tuned.graph.value_id(name).and_then(|w| tuned.graph.static_value(w));
        t != given.graph.static_value(v)
    });
    assert!(differs, "the written model holds the given weights");
    assert!(dir.join("q.qat.ckpt").exists());
    let again = qat(&out, &["--epochs", "30", "--resume"]);
    assert_eq!(top1(&again), (fp32, simulated));
    let other = qat(&out, &["--epochs", "30", "--resume", "--seed", "3"]);
    assert_eq!(other.status.code(), Some(1));
    let err = String::from_utf8_lossy(&other.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("q.qat.ckpt") && last.contains("other settings"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

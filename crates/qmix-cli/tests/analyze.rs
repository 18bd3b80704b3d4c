//! `qmix analyze` on the committed default model: the ranking on the terminal, `analysis.json`
//! with every section, AIMET's `layer_sensitivity.json` and a self-contained `report.html`;
//! histograms of the most sensitive layers for metrics of either direction.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn writes_the_analysis_and_its_report() {
    let out = common::scratch("analyze");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .arg("analyze")
        .arg(&model)
        .args(["--disable-one", "--quiet", "--threads", "1", "--top", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("most sensitive of 4 layers") && stdout.contains("FP32 top-1"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("analysis.json")).unwrap()).unwrap();
    for key in [
        "checks",
        "enable_one",
        "disable_one",
        "per_layer_mse",
        "ranges",
        "histograms",
        "placement",
        "evaluations",
    ] {
        assert!(!v[key].is_null(), "{key} missing");
    }
    assert_eq!(v["enable_one"]["scores"].as_array().unwrap().len(), 4);
    let sensitivity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("layer_sensitivity.json")).unwrap()).unwrap();
    assert_eq!(sensitivity.as_object().unwrap().len(), 4);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    // Self-contained: inline SVG, nothing fetched, no script.
    assert!(html.contains("<svg") && !html.contains("<script"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
}

#[test]
fn histograms_go_to_the_most_sensitive_layers_whatever_the_metric_direction() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx");
    for metric in ["psnr", "mse"] {
        let out = common::scratch(&format!("analyze-{metric}"));
        let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
            .arg("analyze")
            .arg(&model)
            .args(["--metric", metric, "--histograms", "1", "--quiet", "--threads", "1", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("analysis.json")).unwrap()).unwrap();
        let ranked = &v["enable_one"]["ranked"];
        let most = ranked[0][0].as_str().unwrap();
        let layers: Vec<&str> =
            v["histograms"].as_array().unwrap().iter().map(|h| h["layer"].as_str().unwrap()).collect();
        assert!(!layers.is_empty() && layers.iter().all(|l| *l == most), "{metric}: {layers:?} vs {most}");
    }
}

#[test]
fn automp_moves_layers_while_the_target_holds() {
    let out = common::scratch("automp");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits_cnn.onnx");
    let run = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
            .arg("automp")
            .arg(&model)
            .args(["--wide", "w8a8", "--narrow", "w4a4", "--quiet", "--json", "--threads", "1", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(out.join("automp.json")).unwrap()).unwrap()
    };
    let strict = run(&["--max-drop", "0.01"]);
    let narrowed = strict["narrowed"].as_array().unwrap().len();
    assert!((1..8).contains(&narrowed), "{strict}");
    assert!(strict["score"].as_f64().unwrap() >= 0.9825 - 0.01 - 1e-12);
    // Skipping failures never moves fewer layers than stopping at the first one.
    let skipping = run(&["--max-drop", "0.01", "--skip-failures"]);
    assert!(skipping["narrowed"].as_array().unwrap().len() >= narrowed);
    assert!(out.join("model_automp.encodings").is_file());
}

#[test]
fn automp_narrows_to_weights_in_blocks_where_they_split() {
    let out = common::scratch("automp-blocks");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits_cnn.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .arg("automp")
        .arg(&model)
        .args(["--wide", "w8a8", "--narrow", "w4b8a8", "--max-drop", "0.01", "--skip-failures"])
        .args(["--quiet", "--threads", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("automp.json")).unwrap()).unwrap();
    let enc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model_automp.encodings")).unwrap()).unwrap();
    let blocked: Vec<&str> = enc["param_encodings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["block_size"] == 8)
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    // The stem's single input channel does not split into blocks of 8: never blocked.
    assert!(!blocked.contains(&"stem.weight"), "{blocked:?}");
    assert!(
        !report["narrowed"].as_array().unwrap().is_empty() && !blocked.is_empty(),
        "{report} {blocked:?}"
    );
}

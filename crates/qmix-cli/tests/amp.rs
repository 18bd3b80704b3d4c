//! `qmix amp` on the committed default model: it writes its results, and a run killed at any
//! moment (SIGKILL) resumes from its cache to exactly the result of an uninterrupted run, without
//! evaluating again what the cache holds; a cache made with other settings is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx")
}

fn amp(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qmix"));
    c.arg("amp").arg(model()).args([
        "--config",
        "default_per_tensor",
        "--full-front",
        "--quiet",
        "--threads",
        "1",
    ]);
    c.arg("--out").arg(out).args(extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn run_to_end(out: &Path, extra: &[&str]) {
    let o = amp(out, extra).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// What must not depend on interruptions: the lists, the choice and the final encodings.
fn outcome(out: &Path) -> (serde_json::Value, serde_json::Value, serde_json::Value, Vec<u8>) {
    let mut info = json(&out.join("amp_info.json"));
    info.as_object_mut().unwrap().remove("seconds");
    info.as_object_mut().unwrap().remove("work_this_run");
    (
        json(&out.join("accuracy_list.json")),
        json(&out.join("pareto_list.json")),
        info,
        std::fs::read(out.join("model_amp.encodings")).unwrap(),
    )
}

#[test]
fn writes_lists_plots_and_encodings() {
    let out = common::scratch("files");
    run_to_end(&out, &[]);
    for f in [
        "accuracy_list.json",
        "pareto_list.json",
        "amp_info.json",
        "pareto_curve.svg",
        "quantizer_group_sensitivity.svg",
        "model_amp.encodings",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let info = json(&out.join("amp_info.json"));
    assert_eq!(info["quantizer_groups"], 5);
    assert_eq!(info["accuracy_list_entries"], 15);
    let svg = std::fs::read_to_string(out.join("pareto_curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Pareto front"));
    // A finished run reruns from its cache without evaluating anything.
    run_to_end(&out, &[]);
    let work = &json(&out.join("amp_info.json"))["work_this_run"];
    assert_eq!(
        (work["phase1_evaluations"].as_u64(), work["phase2_evaluations"].as_u64()),
        (Some(0), Some(0))
    );
    // Other settings are refused while the cache exists, accepted with --clean-start.
    let o = amp(&out, &["--candidates", "w16a16,w8a8"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("other settings"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    run_to_end(&out, &["--candidates", "w16a16,w8a8", "--clean-start"]);
    // So is the cache of a simulation whose weights a technique changed.
    let o = amp(&out, &["--candidates", "w16a16,w8a8", "--bias-correction"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("other settings"));
}

#[test]
fn killed_runs_resume_to_the_same_result() {
    let reference = common::scratch("reference");
    let started = Instant::now();
    run_to_end(&reference, &[]);
    let full = started.elapsed();
    let expected = outcome(&reference);
    // Kill at moments spread over the run, then finish it; each time from a fresh folder.
    for k in 1..=6u32 {
        let out = common::scratch(&format!("killed{k}"));
        let mut child = amp(&out, &[]).spawn().unwrap();
        std::thread::sleep(full.mul_f64(f64::from(k) / 7.0).max(Duration::from_millis(1)));
        let _ = child.kill();
        let _ = child.wait();
        run_to_end(&out, &[]);
        assert_eq!(outcome(&out), expected, "killed after {k}/7 of the run");
        run_to_end(&out, &[]);
        let work = &json(&out.join("amp_info.json"))["work_this_run"];
        assert_eq!(work["phase1_evaluations"], 0);
        assert_eq!(work["phase2_evaluations"], 0);
    }
}

#[test]
fn phase_one_shards_merge_into_the_same_result() {
    let reference = common::scratch("unsharded");
    run_to_end(&reference, &[]);
    let out = common::scratch("sharded");
    // Three shards at once against one folder, as a Slurm array --array=0-2 launches them.
    let shards: Vec<_> = (0..3)
        .map(|id| {
            amp(&out, &["--shard", "auto"])
                .env("SLURM_ARRAY_TASK_ID", id.to_string())
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .env_remove("SLURM_ARRAY_TASK_MIN")
                .spawn()
                .unwrap()
        })
        .collect();
    for s in shards {
        let o = s.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    run_to_end(&out, &[]);
    assert_eq!(json(&out.join("amp_info.json"))["work_this_run"]["phase1_evaluations"], 0);
    assert_eq!(outcome(&out), outcome(&reference));
    let o = amp(&out, &["--shard", "3/3"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn phase3_writes_one_plan_per_alpha() {
    let out = common::scratch("phase3");
    let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits_cnn.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .arg("amp")
        .arg(digits)
        .args(["--config", "default_per_tensor", "--candidates", "w8a16,w8a8,w4a8,w8a4,w4a4"])
        .args(["--allowed-drop", "0.005", "--phase3", "--quiet", "--threads", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p3 = json(&out.join("phase3.json"));
    assert!(p3["skipped"].is_null(), "the chosen plan mixes precisions: {p3}");
    let plans = p3["plans"].as_array().unwrap();
    assert_eq!(plans.len(), 6);
    let converts: Vec<u64> = plans.iter().map(|p| p["converts"].as_u64().unwrap()).collect();
    assert!(converts.windows(2).all(|w| w[0] >= w[1]), "fewer converts as alpha falls: {converts:?}");
    assert_eq!(converts[5], 0);
    for alpha in ["1.0", "0.8", "0.6", "0.4", "0.2", "0.0"] {
        let data = json(&out.join(format!("AMP_phase_3_data_alpha_{alpha}.json")));
        assert!(data["score"].as_f64().is_some(), "alpha {alpha} scored");
        assert!(out.join(format!("AMP_ph3_export_alpha_{alpha}.encodings")).is_file());
        assert!(out.join(format!("AMP_ph3_quantizer_group_graph_phase3sol_alpha{alpha}.dot")).is_file());
    }
    // Phase 3 leaves the phase-2 choice in place.
    let phase2 = std::fs::read(out.join("model_amp.encodings")).unwrap();
    assert_eq!(phase2, std::fs::read(out.join("AMP_ph3_export_alpha_1.0.encodings")).unwrap());
}

#[test]
fn a_cost_table_replaces_bit_ops_and_belongs_to_the_cache_settings() {
    let out = common::scratch("cost");
    let table = |cost: f64| {
        let row: serde_json::Value = ["W16A16", "W8A16", "W16A8", "W8A8"]
            .iter()
            .map(|p| (p.to_string(), serde_json::json!(cost)))
            .collect();
        let doc = serde_json::json!({"unit": "us", "ops": {"features": row.clone(), "logits": row}});
        let path = out.join(format!("cost_{cost}.json"));
        std::fs::write(&path, doc.to_string()).unwrap();
        path
    };
    let flat = table(3.0);
    run_to_end(&out.join("run"), &["--cost", flat.to_str().unwrap()]);
    // Every plan costs the same under a flat table.
    let info = json(&out.join("run/amp_info.json"));
    assert_eq!(info["final_relative_bitops"], 1.0);
    let other = table(5.0);
    let o = amp(&out.join("run"), &["--cost", other.to_str().unwrap()]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("other settings"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(out.join("bad.json"), r#"{"ops": {"features": {"W8A8": 1}}}"#).unwrap();
    let o = amp(&out.join("bad"), &["--cost", out.join("bad.json").to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cost table") && !err.contains("panicked"), "{err}");
}

#[test]
fn every_plan_amp_scores_and_writes_is_legal_on_its_target() {
    // A group holds an op's weights and input; the op computes at its output's precision, which
    // the next group sets: mixing W16A16 and W4A8 groups composes a W16A8 op the HTP lacks.
    let out = common::scratch("target");
    let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits_cnn.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .arg("amp")
        .arg(&digits)
        .args(["--config", "default_per_tensor", "--candidates", "w16a16,w4a8", "--allowed-drop", "0.01"])
        .args(["--target", "htp_v73", "--phase3", "--quiet", "--threads", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let legality = json(&out.join("legality.json"));
    assert_eq!(legality["target"], "htp_v73");
    assert!(!legality["changes"].as_array().unwrap().is_empty(), "the chosen plan needed a repair");
    let htp = qmix::Target::load("htp_v73").unwrap();
    let mut files = vec![out.join("model_amp.encodings")];
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("AMP_ph3_export_alpha_") {
            files.push(path);
        }
    }
    assert!(files.len() > 1, "phase 3 wrote its plans");
    for file in files {
        let mut sim = qcalib::QuantSim::new(
            qgraph::load_path(&digits).unwrap(),
            qcalib::QuantsimConfig::load("default_per_tensor").unwrap(),
            qcalib::SimOptions::default(),
        )
        .unwrap();
        let loaded = qcalib::read_encodings(&file).unwrap();
        qcalib::load_encodings(&mut sim, &loaded, qcalib::LoadOptions::default()).unwrap();
        let changes = qmix::legalize(&mut sim, &htp).unwrap();
        assert!(changes.is_empty(), "{}: {changes:?}", file.display());
    }
}

#[test]
fn block_candidates_split_only_the_weights_that_divide_and_reach_the_encodings() {
    let out = common::scratch("blocks");
    let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits_cnn.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .arg("amp")
        .arg(digits)
        .args(["--config", "default_per_tensor", "--candidates", "w8a8,w4b8a8", "--allowed-drop", "0.01"])
        .args(["--quiet", "--threads", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = json(&out.join("amp_info.json"));
    let text = info.to_string();
    assert!(text.contains("W4B8A8"), "{text}");
    let enc = json(&out.join("model_amp.encodings"));
    let params = enc["param_encodings"].as_array().unwrap();
    let blocked: Vec<&str> =
        params.iter().filter(|p| p["block_size"] == 8).map(|p| p["name"].as_str().unwrap()).collect();
    // The stem convolution has one input channel, which blocks of 8 do not divide.
    assert!(!blocked.contains(&"stem.weight"), "{blocked:?}");
    // Every weight of a group at W4B8A8 is in blocks; every other weight is not.
    for g in info["groups"].as_array().unwrap() {
        let at_blocks = g["candidate"] == "W4B8A8";
        for q in g["quantizers"].as_array().unwrap().iter().filter(|q| q[0] == "weight") {
            let name = q[1].as_str().unwrap();
            assert_eq!(blocked.contains(&name), at_blocks, "{name} in group {}", g["group"]);
        }
    }
    assert!(!blocked.is_empty(), "some group takes the block candidate");
}

//! Every kind of bad input a user can hand the job commands, from the command line: each exits with
//! code 1 and a one-line message naming the file, tensor, node or option — no panic, no backtrace,
//! and nothing half-written left behind.

mod common;

use common::fails_naming;

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, IxDyn};

fn bars() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx")
}

fn images(dir: &Path, name: &str, shape: [usize; 4], fill: impl Fn(usize) -> f32) -> String {
    let n: usize = shape.iter().product();
    let a = Array4::from_shape_vec(shape, (0..n).map(fill).collect()).unwrap();
    let path = dir.join(name);
    ndarray_npy::write_npy(&path, &a).unwrap();
    format!("input={}", path.display())
}

#[test]
fn malformed_and_truncated_models() {
    let dir = common::scratch("models");
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"this is not a protobuf at all \xff\xfe").unwrap();
    let bytes = std::fs::read(bars()).unwrap();
    let cut = dir.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let calib = images(&dir, "calib.npy", [4, 1, 8, 8], |i| (i % 7) as f32);
    for model in [&junk, &cut] {
        let m = model.to_str().unwrap();
        for cmd in ["quantsim", "analyze", "litemp", "amp"] {
            fails_naming(
                &[cmd, m, "--calib", &calib, "--quiet", "--out", dir.join("out").to_str().unwrap()],
                &[m],
            );
        }
    }
    fails_naming(&["inspect", dir.join("missing.onnx").to_str().unwrap()], &["missing.onnx"]);
    assert!(!dir.join("out").join("analysis.json").exists());
}

#[test]
fn unsupported_ops_are_named_with_their_node() {
    let dir = common::scratch("op");
    let mut g = qgraph::Graph::new("odd");
    let x = g.add_input("input", qgraph::DType::F32, qgraph::Shape::known(&[1, 1, 8, 8]));
    let y = g.add_op("FancyOp", "the_fancy_node", &[x], vec![]);
    g.add_output(y);
    let model = dir.join("odd.onnx");
    qgraph::save_path(&qgraph::Model::new(g, 13), &model).unwrap();
    let calib = images(&dir, "calib.npy", [1, 1, 8, 8], |i| i as f32);
    fails_naming(
        &["quantsim", model.to_str().unwrap(), "--calib", &calib, "--quiet"],
        &["FancyOp", "the_fancy_node"],
    );
}

#[test]
fn wrong_shapes_dtypes_and_names_of_data() {
    let dir = common::scratch("data");
    let m = bars();
    let m = m.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let shape = images(&dir, "shape.npy", [4, 3, 8, 8], |i| i as f32);
    fails_naming(&["quantsim", m, "--calib", &shape, "--quiet", "--out", out], &["input"]);
    let ints = dir.join("ints.npy");
    ndarray_npy::write_npy(&ints, &ArrayD::<i64>::zeros(IxDyn(&[4, 1, 8, 8]))).unwrap();
    fails_naming(
        &["litemp", m, "--calib", &format!("input={}", ints.display()), "--quiet", "--out", out],
        &["input"],
    );
    let ok = images(&dir, "ok.npy", [4, 1, 8, 8], |i| (i % 5) as f32);
    let wrong_name = ok.replacen("input=", "pixels=", 1);
    fails_naming(&["analyze", m, "--calib", &wrong_name, "--quiet", "--out", out], &["pixels"]);
    fails_naming(
        &["amp", m, "--calib", &format!("input={}", dir.join("none.npy").display()), "--quiet", "--out", out],
        &["none.npy"],
    );
    let labels = dir.join("labels.npy");
    ndarray_npy::write_npy(&labels, &ndarray::Array1::<i64>::zeros(3)).unwrap();
    fails_naming(
        &[
            "litemp",
            m,
            "--calib",
            &ok,
            "--eval",
            &ok,
            "--labels",
            labels.to_str().unwrap(),
            "--quiet",
            "--out",
            out,
        ],
        &["3 labels", "4 evaluation samples"],
    );
}

#[test]
fn nan_inf_and_empty_calibration_data() {
    let dir = common::scratch("nan");
    let m = bars();
    let m = m.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let nan = images(&dir, "nan.npy", [4, 1, 8, 8], |i| if i == 70 { f32::NAN } else { (i % 5) as f32 });
    fails_naming(&["quantsim", m, "--calib", &nan, "--quiet", "--out", out], &["nan.npy", "NaN", "sample 1"]);
    let inf = images(&dir, "inf.npy", [4, 1, 8, 8], |i| if i == 3 { f32::INFINITY } else { 1.0 });
    fails_naming(
        &["litemp", m, "--calib", &inf, "--quiet", "--out", out],
        &["inf.npy", "infinite", "sample 0"],
    );
    let empty = images(&dir, "empty.npy", [0, 1, 8, 8], |_| 0.0);
    fails_naming(&["amp", m, "--calib", &empty, "--quiet", "--out", out], &["empty.npy", "zero samples"]);
}

#[test]
fn corrupt_caches_and_bad_options() {
    let dir = common::scratch("cache");
    let m = bars();
    let m = m.to_str().unwrap();
    let out = dir.join("amp");
    std::fs::create_dir_all(out.join(".cache")).unwrap();
    let cache = out.join(".cache/amp_cache.json");
    std::fs::write(&cache, b"{\"format\": \"qmix-amp-cache 1\", \"settings\": ").unwrap();
    fails_naming(
        &["amp", m, "--quiet", "--out", out.to_str().unwrap()],
        &["amp_cache.json", "--clean-start"],
    );
    // The corrupt cache is kept for the user to look at.
    assert!(cache.exists());
    let stats = dir.join("stats.bin");
    std::fs::write(&stats, b"QKSTATS\0 and then garbage").unwrap();
    fails_naming(&["quantsim", m, "--load-stats", stats.to_str().unwrap(), "--quiet"], &["stats.bin"]);
    fails_naming(
        &["amp", m, "--allowed-drop=-1", "--quiet", "--out", out.to_str().unwrap(), "--clean-start"],
        &["drop"],
    );
    fails_naming(&["amp", m, "--candidates", "w8a99", "--quiet"], &["w8a99"]);
    fails_naming(&["litemp", m, "--no-such-flag"], &["--no-such-flag"]);
    fails_naming(&["analyze", m, "--config", "no_such_config", "--quiet"], &["no_such_config"]);
    fails_naming(&["litemp", m, "--override", "int8", "--quiet"], &["int8"]);
    fails_naming(&["litemp", m, "--target", "no_such_target", "--quiet"], &["no_such_target", "htp_v73"]);
    let costs = out.join("costs.json");
    let costs = costs.to_str().unwrap();
    fails_naming(
        &["profile-costs", m, "--python", "/no/such/python", "--quiet", "--out", costs],
        &["/no/such/python", "amp --cost"],
    );
    fails_naming(&["profile-costs", m, "--candidates", "w8a8,w99a1", "--quiet", "--out", costs], &["w99a1"]);
    // Plans read by quantsim --plan: the file and the faulty entry are named.
    let calib = format!("input={}", Path::new(m).with_file_name("bars_cnn_calib.npy").display());
    for (text, needle) in [
        ("not json", "not JSON"),
        (r#"{"no_such_tensor": [{"quant_type": "QUInt16"}]}"#, "no_such_tensor"),
        (r#"{"features": [{"quant_type": "QFloat8"}]}"#, "QFloat8"),
        (r#"{"features": {"quant_type": "QUInt8"}}"#, "expected a list"),
        (
            r#"{"global_config": {"weight": {"data_type": "Int8"}}, "exclude": ["no_such_node"]}"#,
            "no_such_node",
        ),
        (r#"{"global_config": {"weight": {"data_type": "MXFP4E2M1"}}}"#, "MXFP4E2M1"),
        (r#"{"global_config": 1}"#, "global_config"),
    ] {
        let plan = out.join("plan.json");
        std::fs::write(&plan, text).unwrap();
        fails_naming(
            &["quantsim", m, "--calib", &calib, "--plan", plan.to_str().unwrap(), "--quiet", "--out", costs],
            &["plan.json", needle],
        );
    }
    // Every candidate illegal on the target: AMP refuses, naming the group and its ops.
    fails_naming(
        &[
            "amp",
            m,
            "--target",
            "htp_v73",
            "--candidates",
            "w16a8,w4a4",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            "--clean-start",
        ],
        &["no candidate is supported", "Conv"],
    );
}

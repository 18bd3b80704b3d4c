//! Hostile models, data files and options: sizes computed from a model or a file that would
//! overflow or exhaust memory are refused before anything is allocated, invalid attributes and
//! labels are named, and a closed stdout does not stop a job from writing its files. Every
//! failure is exit code 1 with one line naming the culprit — no panic, no abort.

mod common;

use common::fails_naming;

use std::path::Path;
use std::process::{Command, Stdio};

use ndarray::{Array1, ArrayD, IxDyn};
use qgraph::{Attribute, DType, Graph, Model, Shape, Tensor};

fn digits(suffix: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../models/digits_cnn{suffix}"))
        .display()
        .to_string()
}

/// A one-node model `y = OP(x, constants…)` with `x` of `shape`, saved in `dir`.
fn one_node(
    dir: &Path,
    name: &str,
    op: &str,
    shape: &[usize],
    consts: Vec<Tensor>,
    attrs: Vec<(&str, Attribute)>,
) -> String {
    let mut g = Graph::new(name);
    let x = g.add_input("x", DType::F32, Shape::known(shape));
    let mut inputs = vec![x];
    for (i, c) in consts.into_iter().enumerate() {
        inputs.push(g.add_initializer(&format!("c{i}"), c));
    }
    let y = g.add_op(op, &format!("the_{name}"), &inputs, attrs);
    g.add_output(y);
    let path = dir.join(format!("{name}.onnx"));
    qgraph::save_path(&Model::new(g, 17), &path).unwrap();
    path.display().to_string()
}

fn input(dir: &Path, shape: &[usize]) -> String {
    let path =
        dir.join(format!("x_{}.npy", shape.iter().map(ToString::to_string).collect::<Vec<_>>().join("_")));
    ndarray_npy::write_npy(&path, &ArrayD::<f32>::ones(IxDyn(shape))).unwrap();
    format!("x={}", path.display())
}

fn ints(v: &[i64]) -> Tensor {
    Tensor::from_vec(&[v.len()], v.to_vec()).unwrap()
}

#[test]
fn sizes_beyond_memory_are_refused_before_allocation() {
    let dir = common::scratch("sizes");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let x22 = input(&dir, &[2, 2]);
    let x11 = input(&dir, &[1, 1]);
    let x1144 = input(&dir, &[1, 1, 4, 4]);
    let cases: Vec<(String, &str, Vec<&str>)> = vec![
        (
            one_node(&dir, "tile", "Tile", &[2, 2], vec![ints(&[1 << 40, 1 << 40])], vec![]),
            &x22,
            vec!["the_tile", "more elements"],
        ),
        (
            one_node(&dir, "expand", "Expand", &[1, 1], vec![ints(&[1_000_000, 1_000_000])], vec![]),
            &x11,
            vec!["the_expand", "bytes"],
        ),
        (
            one_node(&dir, "pad", "Pad", &[2, 2], vec![ints(&[0, 0, 1_000_000, 1_000_000])], vec![]),
            &x22,
            vec!["the_pad", "bytes"],
        ),
        (
            one_node(
                &dir,
                "resize",
                "Resize",
                &[1, 1, 4, 4],
                vec![
                    Tensor::from_vec(&[0], Vec::<f32>::new()).unwrap(),
                    Tensor::from_vec(&[4], vec![1f32, 1.0, 1e6, 1e6]).unwrap(),
                ],
                vec![],
            ),
            &x1144,
            vec!["the_resize", "bytes"],
        ),
        (
            one_node(
                &dir,
                "pool",
                "MaxPool",
                &[1, 1, 4, 4],
                vec![],
                vec![
                    ("kernel_shape", Attribute::Ints(vec![3, 3])),
                    ("pads", Attribute::Ints(vec![30_000; 4])),
                ],
            ),
            &x1144,
            vec!["the_pool", "bytes"],
        ),
    ];
    for (model, data, needles) in &cases {
        fails_naming(&["run", model, "--input", data, "--out", out, "--max-memory", "1024"], needles);
    }
    // The limit is the user's: a small one refuses what the default allows.
    let small = one_node(&dir, "small_pad", "Pad", &[2, 2], vec![ints(&[0, 0, 1000, 1000])], vec![]);
    fails_naming(
        &["run", &small, "--input", &x22, "--out", out, "--max-memory", "1"],
        &["the_small_pad", "--max-memory"],
    );
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["run", &small, "--input", &x22, "--out", out])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn invalid_convolution_attributes_are_named() {
    let dir = common::scratch("conv");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let x = input(&dir, &[1, 4, 8, 8]);
    let w = |shape: &[usize]| Tensor::from_vec(shape, vec![1f32; shape.iter().product()]).unwrap();
    let group0 = one_node(
        &dir,
        "group0",
        "Conv",
        &[1, 4, 8, 8],
        vec![w(&[4, 4, 3, 3])],
        vec![("group", Attribute::Int(0))],
    );
    fails_naming(&["run", &group0, "--input", &x, "--out", out], &["the_group0", "group 0"]);
    let empty = one_node(
        &dir,
        "empty_kernel",
        "Conv",
        &[1, 4, 8, 8],
        vec![w(&[4, 1, 0, 3])],
        vec![("group", Attribute::Int(4))],
    );
    fails_naming(&["run", &empty, "--input", &x, "--out", out], &["the_empty_kernel", "empty kernel"]);
    let pads = one_node(
        &dir,
        "pads",
        "Conv",
        &[1, 4, 8, 8],
        vec![w(&[4, 4, 3, 3])],
        vec![("pads", Attribute::Ints(vec![1 << 40, 0, 0, 0]))],
    );
    fails_naming(&["run", &pads, "--input", &x, "--out", out], &["the_pads", "pads"]);
    let stride = one_node(
        &dir,
        "stride",
        "ConvTranspose",
        &[1, 4, 8, 8],
        vec![w(&[4, 4, 3, 3])],
        vec![("strides", Attribute::Ints(vec![1 << 20, 1 << 20]))],
    );
    fails_naming(
        &["run", &stride, "--input", &x, "--out", out, "--max-memory", "1024"],
        &["the_stride", "bytes"],
    );
}

#[test]
fn lying_data_files_and_bad_labels_are_named() {
    let dir = common::scratch("files");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let model = digits(".onnx");
    // A .npy header claiming 10¹² rows over a two-row body.
    let lying = dir.join("lying.npy");
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 1, 8, 8), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<117}\n");
    bytes.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    bytes.extend_from_slice(padded.as_bytes());
    bytes.extend_from_slice(&[0u8; 2 * 64 * 4]);
    std::fs::write(&lying, bytes).unwrap();
    fails_naming(
        &["quantsim", &model, "--calib", &format!("input={}", lying.display()), "--quiet", "--out", out],
        &["lying.npy", "claims"],
    );
    let calib = format!("input={}", digits("_calib.npy"));
    let eval = format!("input={}", digits("_eval.npy"));
    let labels: Array1<i64> = ndarray_npy::read_npy(digits("_labels.npy")).unwrap();
    let write = |name: &str, v: Array1<f32>| {
        let p = dir.join(name);
        ndarray_npy::write_npy(&p, &v).unwrap();
        p.display().to_string()
    };
    let as_f32 = labels.mapv(|l| l as f32);
    let mut nan = as_f32.clone();
    nan[5] = f32::NAN;
    let mut big = as_f32.clone();
    big[3] = 10.0;
    let mut frac = as_f32.clone();
    frac[7] = 1.5;
    for (file, needles) in [
        (write("nan.npy", nan), vec!["nan.npy", "row 5"]),
        (write("frac.npy", frac), vec!["frac.npy", "row 7"]),
        (write("big.npy", big), vec!["label 10", "row 3"]),
    ] {
        fails_naming(
            &[
                "quantsim", &model, "--calib", &calib, "--eval", &eval, "--labels", &file, "--quiet",
                "--out", out,
            ],
            &needles,
        );
    }
    let ok = digits("_labels.npy");
    fails_naming(
        &[
            "quantsim",
            &model,
            "--calib",
            &calib,
            "--eval",
            &eval,
            "--labels",
            &ok,
            "--label-offset",
            "18446744073709551615",
            "--quiet",
            "--out",
            out,
        ],
        &["--label-offset"],
    );
}

#[test]
fn bad_options_are_user_errors() {
    let dir = common::scratch("options");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let model = digits(".onnx");
    fails_naming(
        &["litemp", &model, "--until-psnr", "nan", "--quiet", "--out", out],
        &["--until-psnr", "finite"],
    );
    fails_naming(&["litemp", &model, "--threads", "100000", "--quiet", "--out", out], &["--threads", "1024"]);
    fails_naming(&["amp", &model, "--candidates", "w8a8,w8a8", "--quiet", "--out", out], &["two distinct"]);
    let float_calib = format!("input={}", digits("_calib.npy"));
    fails_naming(
        &["quantsim", &model, "--calib", &float_calib, "--scale", "0.5", "--quiet", "--out", out],
        &["--scale"],
    );
}

#[test]
fn a_closed_stdout_does_not_stop_the_job() {
    let dir = common::scratch("pipe");
    let out = dir.join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args(["litemp", &digits(".onnx"), "--quiet", "--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("layer_sensitivity.json").exists());
}

#[test]
fn compressed_npz_data_is_read() {
    let dir = common::scratch("npz");
    let data: ArrayD<f32> = ndarray_npy::read_npy(digits("_calib.npy")).unwrap();
    let npz = dir.join("calib.npz");
    let mut w = ndarray_npy::NpzWriter::new_compressed(std::fs::File::create(&npz).unwrap());
    w.add_array("input", &data).unwrap();
    w.finish().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qmix"))
        .args([
            "quantsim",
            &digits(".onnx"),
            "--calib",
            &format!("input={}", npz.display()),
            "--quiet",
            "--out",
        ])
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn dynamic_dims_stay_symbolic_and_bind_with_shape() {
    let dir = common::scratch("dynamic");
    let mut g = Graph::new("dynamic");
    let dims = vec![
        qgraph::Dim::Symbol(String::new()),
        qgraph::Dim::Known(3),
        qgraph::Dim::Symbol(String::new()),
        qgraph::Dim::Symbol("width".into()),
    ];
    let x = g.add_input("x", DType::F32, Shape(dims));
    let w = g.add_initializer("w", Tensor::from_vec(&[4, 3, 3, 3], vec![1f32; 108]).unwrap());
    let c = g.add_op("Conv", "conv", &[x, w], vec![("kernel_shape", Attribute::Ints(vec![3, 3]))]);
    let y = g.add_op(
        "MaxPool",
        "pool",
        &[c],
        vec![("kernel_shape", Attribute::Ints(vec![2, 2])), ("strides", Attribute::Ints(vec![2, 2]))],
    );
    g.add_output(y);
    let model = dir.join("dynamic.onnx");
    qgraph::save_path(&Model::new(g, 17), &model).unwrap();
    let model = model.to_str().unwrap();
    let inspect = |extra: &[&str]| {
        let o =
            Command::new(env!("CARGO_BIN_EXE_qmix")).arg("inspect").arg(model).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let symbolic = inspect(&[]);
    assert!(symbolic.contains("x : float [1, 3, ?, width]") && symbolic.contains("--shape"), "{symbolic}");
    let bound = inspect(&["--shape", "x=1,3,48,320"]);
    assert!(bound.contains("[1, 4, 23, 159]") && !bound.contains("symbolic dims"), "{bound}");
    fails_naming(&["inspect", model, "--shape", "x=1,4,48,320"], &["--shape x", "dim 1"]);
    fails_naming(&["inspect", model, "--shape", "y=1,3,48,320"], &["--shape y", "inputs: x"]);
}

#[test]
fn a_failed_job_leaves_the_previous_set_whole() {
    let dir = common::scratch("set");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let model = digits(".onnx");
    let calib = format!("input={}", digits("_calib.npy"));
    let qmix = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_qmix")).args(args).output().unwrap();
    assert!(qmix(&["quantsim", &model, "--calib", &calib, "--quiet", "--out", o]).status.success());
    let before = std::fs::read(out.join("model.encodings")).unwrap();
    // Leftovers of runs that died: a staging folder and a temporary file of dead processes.
    std::fs::create_dir_all(out.join(".staging-4000000000")).unwrap();
    std::fs::write(out.join(".model.onnx.4000000001.tmp"), b"half").unwrap();
    // A different precision whose evaluation then fails on a bad label: nothing new lands.
    let mut labels: Array1<i64> = ndarray_npy::read_npy(digits("_labels.npy")).unwrap();
    labels[0] = 99;
    let bad = dir.join("bad_labels.npy");
    ndarray_npy::write_npy(&bad, &labels).unwrap();
    let eval = format!("input={}", digits("_eval.npy"));
    let b = bad.to_str().unwrap();
    fails_naming(
        &[
            "quantsim", &model, "--calib", &calib, "--act", "int16", "--eval", &eval, "--labels", b,
            "--quiet", "--out", o,
        ],
        &["label 99"],
    );
    assert_eq!(std::fs::read(out.join("model.encodings")).unwrap(), before);
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| !n.starts_with('.')), "{left:?}");
}

#[test]
fn image_folders_that_do_not_fit_or_do_not_decode_are_named() {
    let dir = common::scratch("images");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 7]));
    img.save(images.join("a.png")).unwrap();
    let folder = format!("input={}", images.display());
    let model = digits(".onnx");
    fails_naming(
        &[
            "quantsim",
            &model,
            "--calib",
            &folder,
            "--image-size",
            "100000",
            "--resize",
            "100000",
            "--quiet",
            "--out",
            out,
        ],
        &["100000", "memory limit"],
    );
    let bytes = std::fs::read(images.join("a.png")).unwrap();
    std::fs::write(images.join("b.png"), &bytes[..bytes.len() / 2]).unwrap();
    fails_naming(
        &["quantsim", &model, "--calib", &folder, "--quiet", "--out", out],
        &["b.png", "not a readable image"],
    );
    // A file larger than the memory limit is refused before it is read.
    std::fs::File::create(images.join("b.png")).unwrap().set_len(3 << 20).unwrap();
    fails_naming(
        &["quantsim", &model, "--calib", &folder, "--max-memory", "2", "--quiet", "--out", out],
        &["b.png", "beyond the memory limit"],
    );
}

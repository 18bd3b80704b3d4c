//! The data a job takes: `.npy`, an array of a `.npz` (named with `FILE.npz:NAME` when it holds
//! several), and integer images turned into the float input with `--offset/--scale` or
//! `--mean/--std` — the same simulation whichever way the same values arrive.

mod common;

use std::path::Path;
use std::process::Command;

use ndarray::Array4;

fn qmix(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qmix")).args(args).output().unwrap()
}

fn encodings(out: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.encodings")).unwrap()).unwrap();
    v["activation_encodings"].clone()
}

#[test]
fn npy_npz_and_integer_images_give_the_same_simulation() {
    let dir = common::scratch("formats");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bars_cnn.onnx");
    let model = model.to_str().unwrap();
    let raw = Array4::from_shape_fn((6, 1, 8, 8), |(n, _, r, c)| ((n * 37 + r * 11 + c * 7) % 256) as u8);
    // The float input the model sees: (raw − 128) · 0.01.
    let float = raw.mapv(|v| (f32::from(v) - 128.0) * 0.01);
    ndarray_npy::write_npy(dir.join("float.npy"), &float).unwrap();
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(dir.join("data.npz")).unwrap());
    npz.add_array("images", &raw).unwrap();
    npz.add_array("other", &ndarray::Array1::<f32>::zeros(3)).unwrap();
    npz.finish().unwrap();
    let run = |calib: &str, extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec!["quantize", model, "--calib", calib, "--quiet", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = qmix(&args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        encodings(&out)
    };
    let from_npy = run(&format!("input={}", dir.join("float.npy").display()), &[], "npy");
    let npz = format!("input={}:images", dir.join("data.npz").display());
    let from_npz = run(&npz, &["--offset=-128", "--scale", "0.01"], "npz");
    assert_eq!(from_npy, from_npz);
    // --mean/--std: (raw/255 − 0.5) / 0.25.
    let standard = raw.mapv(|v| (f32::from(v) / 255.0 - 0.5) / 0.25);
    ndarray_npy::write_npy(dir.join("standard.npy"), &standard).unwrap();
    let a = run(&format!("input={}", dir.join("standard.npy").display()), &[], "standard");
    let b = run(&npz, &["--mean", "0.5", "--std", "0.25"], "meanstd");
    assert_eq!(a, b);
    // A .npz with several arrays needs the name; a wrong name lists what is there.
    let o = qmix(&[
        "quantize",
        model,
        "--calib",
        &format!("input={}", dir.join("data.npz").display()),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("data.npz:NAME"));
    let o = qmix(&[
        "quantize",
        model,
        "--calib",
        &format!("input={}:nope", dir.join("data.npz").display()),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("'nope'") && err.contains("images"), "{err}");
}

#[test]
fn folders_of_images_are_resized_cropped_and_normalised() {
    let dir = common::scratch("images");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for k in 0..3u32 {
        let img = image::RgbImage::from_fn(40 + 4 * k, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, (k * 80) as u8])
        });
        img.save(images.join(format!("img{k}.png"))).unwrap();
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    // x [N, 3, 8, 8] → Conv 1×1 (2 channels) → GlobalAveragePool.
    let mut g = qgraph::Graph::new("rgb");
    let x = g.add_input(
        "input",
        qgraph::DType::F32,
        qgraph::Shape(vec![
            qgraph::Dim::Symbol("N".into()),
            qgraph::Dim::Known(3),
            qgraph::Dim::Known(8),
            qgraph::Dim::Known(8),
        ]),
    );
    let w = g.add_initializer(
        "w",
        qgraph::Tensor::from_vec(&[2, 3, 1, 1], vec![0.5f32, -0.25, 1.0, 0.75, 0.1, -0.5]).unwrap(),
    );
    let c = g.add_op("Conv", "conv", &[x, w], vec![]);
    let y = g.add_op("GlobalAveragePool", "pool", &[c], vec![]);
    g.add_output(y);
    let model = dir.join("rgb.onnx");
    qgraph::save_path(&qgraph::Model::new(g, 13), &model).unwrap();
    let folder = format!("input={}", images.display());
    let out = dir.join("out");
    let o = qmix(&[
        "quantize",
        model.to_str().unwrap(),
        "--calib",
        &folder,
        "--eval",
        &folder,
        "--image-size",
        "8",
        "--resize",
        "10",
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let outputs: ndarray::ArrayD<f32> = ndarray_npy::read_npy(out.join("sim_outputs.npy")).unwrap();
    assert_eq!(outputs.shape(), &[3, 2, 1, 1]);
    // An empty folder, and a crop larger than the resize, are named errors.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = qmix(&[
        "quantize",
        model.to_str().unwrap(),
        "--calib",
        &format!("input={}", empty.display()),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no images (jpg, jpeg, png, bmp"));
    let o = qmix(&[
        "quantize",
        model.to_str().unwrap(),
        "--calib",
        &folder,
        "--image-size",
        "16",
        "--resize",
        "10",
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

//! `cargo xtask models`: builds the small models the repository ships in `models/`, with their data,
//! deterministically (the same bytes on every machine), so the README's main command runs on a
//! fresh clone without the zoo.
//!
//! `bars_cnn`: 8×8 single-channel images of a noisy bar — horizontal, vertical, diagonal or
//! anti-diagonal — classified by four hand-set 3×3 line detectors (Conv + Relu), global average
//! pooling and a linear layer. Files: `bars_cnn.onnx`, `bars_cnn_calib.npy` (100 images),
//! `bars_cnn_eval.npy` (400 images), `bars_cnn_labels.npy` (their classes).

use std::path::Path;

use anyhow::{Context, Result, ensure};
use ndarray::{Array1, Array4, ArrayD};
use qgraph::{Attribute, DType, Dim, Graph, Model, Shape, Tensor};

/// Side of the square images.
const SIDE: usize = 8;

/// A small deterministic generator (64-bit LCG, top bits).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.next() * n as f32) as usize).min(n - 1)
    }
}

/// `n` images of class `i % 4` (shuffled by the generator) and their labels.
fn images(n: usize, seed: u64) -> (Array4<f32>, Array1<i64>) {
    let mut rng = Lcg(seed);
    let mut x = Array4::<f32>::zeros((n, 1, SIDE, SIDE));
    let mut labels = Array1::<i64>::zeros(n);
    for k in 0..n {
        let class = rng.below(4);
        let at = 1 + rng.below(SIDE - 2) as isize;
        let shift = rng.below(5) as isize - 2;
        for r in 0..SIDE as isize {
            for c in 0..SIDE as isize {
                let on = match class {
                    0 => r == at,
                    1 => c == at,
                    2 => c - r == shift,
                    _ => c + r == SIDE as isize - 1 + shift,
                };
                let noise = (rng.next() - 0.5) * 1.6;
                x[[k, 0, r as usize, c as usize]] = f32::from(u8::from(on)) + noise;
            }
        }
        labels[k] = class as i64;
    }
    (x, labels)
}

/// The line detectors: +2 on the line, −1 beside it, divided by 3.
fn detectors() -> Vec<f32> {
    let mut w = vec![0f32; 4 * 9];
    for (o, filter) in w.chunks_mut(9).enumerate() {
        for r in 0..3 {
            for c in 0..3 {
                let on = match o {
                    0 => r == 1,
                    1 => c == 1,
                    2 => r == c,
                    _ => r + c == 2,
                };
                filter[r * 3 + c] = if on { 2.0 / 3.0 } else { -1.0 / 3.0 };
            }
        }
    }
    w
}

/// input [N, 1, 8, 8] → Conv(4, 3×3, pad 1) → Relu → GlobalAveragePool → Flatten → Gemm(4).
fn bars_cnn() -> Result<Model> {
    let mut g = Graph::new("bars_cnn");
    let x = g.add_input(
        "input",
        DType::F32,
        Shape(vec![Dim::Symbol("batch".into()), Dim::Known(1), Dim::Known(SIDE), Dim::Known(SIDE)]),
    );
    let w = g.add_initializer(
        "detectors.weight",
        Tensor::from_vec(&[4, 1, 3, 3], detectors()).expect("4·9 values"),
    );
    let b = g.add_initializer("detectors.bias", Tensor::from_vec(&[4], vec![-0.1f32; 4]).expect("4 values"));
    let conv = g.add_op("Conv", "features", &[x, w, b], vec![("pads", Attribute::Ints(vec![1, 1, 1, 1]))]);
    let relu = g.add_op("Relu", "features_relu", &[conv], vec![]);
    let pooled = g.add_op("GlobalAveragePool", "pooled", &[relu], vec![]);
    let flat = g.add_op("Flatten", "pooled_flat", &[pooled], vec![]);
    let mut fc = vec![0f32; 16];
    (0..4).for_each(|i| fc[i * 4 + i] = 8.0);
    let fw = g.add_initializer("classifier.weight", Tensor::from_vec(&[4, 4], fc).expect("16 values"));
    let fb = g.add_initializer("classifier.bias", Tensor::from_vec(&[4], vec![0f32; 4]).expect("4 values"));
    let logits = g.add_op("Gemm", "logits", &[flat, fw, fb], vec![("transB", Attribute::Int(1))]);
    g.add_output(logits);
    let mut m = Model::new(g, 13);
    m.producer_name = "quantkit xtask models".into();
    Ok(m)
}

pub fn run(which: Option<&str>) -> Result<()> {
    let dir = crate::zoo::workspace_root().join("models");
    match which {
        None | Some("bars") => build(&dir)?,
        Some("digits") => build_digits(&dir)?,
        Some(other) => anyhow::bail!("unknown model '{other}' (bars, digits)"),
    }
    println!("wrote {}", dir.display());
    Ok(())
}

/// Pinned packages of the digits trainer.
const TRAINER_PACKAGES: &[&str] = &["numpy==2.4.6", "scikit-learn==1.5.2"];

/// Trains `digits_cnn` and writes it with its data into `dir`.
fn build_digits(dir: &Path) -> Result<()> {
    let ok = std::process::Command::new("python3").args(["-c", "import numpy, sklearn"]).output();
    if !ok.is_ok_and(|o| o.status.success()) {
        let status = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(TRAINER_PACKAGES)
            .status()?;
        ensure!(status.success(), "pip could not install {}", TRAINER_PACKAGES.join(" "));
    }
    let work = crate::zoo::workspace_root().join("target/xtask/digits");
    std::fs::create_dir_all(&work)?;
    crate::python::run_script("train_digits.py", &[&work.display().to_string()])?;
    let read = |name: &str| -> Result<Tensor> {
        let a: ArrayD<f32> = ndarray_npy::read_npy(work.join(format!("{name}.npy")))
            .with_context(|| format!("reading the trained {name}"))?;
        Ok(Tensor::F32(a.into_shared()))
    };
    let model = digits_cnn(&read)?;
    let eval = read("eval")?;
    let labels: Array1<i64> = ndarray_npy::read_npy(work.join("labels.npy"))?;
    let session = qexec::Session::new(model.clone(), qexec::SessionOptions::threads(1))?;
    let logits = session.run(&[("input", eval)])?;
    let preds = crate::zoo_data::argmax_rows(&logits[0], 0)?;
    let correct = preds.iter().zip(labels.iter()).filter(|(p, l)| p == l).count();
    println!("digits_cnn: FP32 top-1 {correct}/{} on its held-out evaluation digits", labels.len());
    ensure!(
        correct * 10 >= labels.len() * 9,
        "digits_cnn reaches only {correct}/{}: training failed",
        labels.len()
    );
    qgraph::save_path(&model, dir.join("digits_cnn.onnx"))?;
    for f in ["calib", "eval", "labels"] {
        std::fs::copy(work.join(format!("{f}.npy")), dir.join(format!("digits_cnn_{f}.npy")))?;
    }
    Ok(())
}

/// The digits network around trained weights (`weight(name)` reads one).
fn digits_cnn(weight: &dyn Fn(&str) -> Result<Tensor>) -> Result<Model> {
    let mut g = Graph::new("digits_cnn");
    let x = g.add_input(
        "input",
        DType::F32,
        Shape(vec![Dim::Symbol("batch".into()), Dim::Known(1), Dim::Known(SIDE), Dim::Known(SIDE)]),
    );
    let init = |g: &mut Graph, name: &str, file: &str| -> Result<qgraph::ValueId> {
        Ok(g.add_initializer(name, weight(file)?))
    };
    let pads = || ("pads", Attribute::Ints(vec![1, 1, 1, 1]));
    let (zero, six) = (
        g.add_initializer("relu6.min", Tensor::from_vec(&[], vec![0f32]).expect("scalar")),
        g.add_initializer("relu6.max", Tensor::from_vec(&[], vec![6f32]).expect("scalar")),
    );
    let (w, b) = (init(&mut g, "stem.weight", "conv_w")?, init(&mut g, "stem.bias", "conv_b")?);
    let stem = g.add_op("Conv", "stem", &[x, w, b], vec![pads()]);
    let stem_act = g.add_op("Clip", "stem_relu6", &[stem, zero, six], vec![]);
    let (w, b) = (init(&mut g, "depthwise.weight", "dw_w")?, init(&mut g, "depthwise.bias", "dw_b")?);
    let dw = g.add_op("Conv", "depthwise", &[stem_act, w, b], vec![pads(), ("group", Attribute::Int(8))]);
    let dw_act = g.add_op("Clip", "depthwise_relu6", &[dw, zero, six], vec![]);
    let (w, b) = (init(&mut g, "pointwise.weight", "pw_w")?, init(&mut g, "pointwise.bias", "pw_b")?);
    let pw = g.add_op("Conv", "pointwise", &[dw_act, w, b], vec![]);
    let residual = g.add_op("Add", "residual", &[pw, stem_act], vec![]);
    let pooled = g.add_op(
        "AveragePool",
        "pooled",
        &[residual],
        vec![("kernel_shape", Attribute::Ints(vec![2, 2])), ("strides", Attribute::Ints(vec![2, 2]))],
    );
    let flat = g.add_op("Flatten", "flat", &[pooled], vec![]);
    let (w, b) = (init(&mut g, "classifier.weight", "fc_w")?, init(&mut g, "classifier.bias", "fc_b")?);
    let logits = g.add_op("Gemm", "logits", &[flat, w, b], vec![("transB", Attribute::Int(1))]);
    g.add_output(logits);
    let mut m = Model::new(g, 13);
    m.producer_name = "quantkit xtask models digits".into();
    Ok(m)
}

/// Writes every model of `models/` and its data into `dir`.
fn build(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let model = bars_cnn()?;
    let (calib, _) = images(100, 1);
    let (eval, labels) = images(400, 2);
    let session = qexec::Session::new(model.clone(), qexec::SessionOptions::threads(1))?;
    let logits = session.run(&[("input", Tensor::F32(eval.clone().into_dyn().into_shared()))])?;
    let preds = crate::zoo_data::argmax_rows(&logits[0], 0)?;
    let correct = preds.iter().zip(labels.iter()).filter(|(p, l)| p == l).count();
    println!("bars_cnn: FP32 top-1 {correct}/400 on its evaluation images");
    ensure!(correct >= 300, "bars_cnn classifies only {correct}/400: the detectors are wrong");
    qgraph::save_path(&model, dir.join("bars_cnn.onnx"))?;
    write(&dir.join("bars_cnn_calib.npy"), &calib)?;
    write(&dir.join("bars_cnn_eval.npy"), &eval)?;
    ndarray_npy::write_npy(dir.join("bars_cnn_labels.npy"), &labels)?;
    Ok(())
}

fn write(path: &Path, a: &Array4<f32>) -> Result<()> {
    ndarray_npy::write_npy(path, a)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_models_are_what_xtask_models_builds() {
        let dir = std::env::temp_dir().join(format!("xtask-models-{}", std::process::id()));
        super::build(&dir).unwrap();
        let committed = crate::zoo::workspace_root().join("models");
        for f in ["bars_cnn.onnx", "bars_cnn_calib.npy", "bars_cnn_eval.npy", "bars_cnn_labels.npy"] {
            let (a, b) = (std::fs::read(dir.join(f)).unwrap(), std::fs::read(committed.join(f)).unwrap());
            assert!(a == b, "models/{f} is stale: run `cargo xtask models`");
        }
    }
}

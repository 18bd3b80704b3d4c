//! Reading the zoo's data the way its README prescribes: the ImageNet sample with the
//! calibration/evaluation split and per-model preprocessing, the STS-B token files, and the
//! onnxruntime reference outputs.

use std::path::Path;

use anyhow::{Context, Result};
use ndarray::{Array1, Array2, Array4, ArrayD, Axis};
use ndarray_npy::read_npy;
use qgraph::Tensor;

/// An image classifier of the zoo: file stem, its input data file and preprocessing.
pub struct Classifier {
    /// File stem in `models/` and `refs/`.
    pub name: &'static str,
    /// Image data file in `data/`.
    pub images: &'static str,
    /// `x = (u8 + offset) * scale`.
    pub offset: f32,
    /// See `offset`.
    pub scale: f32,
    /// Logit index of class 0 (1 for 1001-class models).
    pub label_offset: usize,
}

/// The three FP32 classifiers.
pub const CLASSIFIERS: &[Classifier] = &[
    Classifier {
        name: "mobilenetv2_keras",
        images: "imagenet500_even_u8_nchw.npy",
        offset: -127.0,
        scale: 0.007_843_138,
        label_offset: 1,
    },
    Classifier {
        name: "mobilenetv1_025_128",
        images: "mobilenetv1_025_128_input_even_u8_nchw.npy",
        offset: -128.0,
        scale: 0.007_812_5,
        label_offset: 1,
    },
    Classifier {
        name: "efficientnet_lite0",
        images: "imagenet500_even_u8_nchw.npy",
        offset: -127.0,
        scale: 0.007_812_5,
        label_offset: 0,
    },
];

/// Raw u8 images [N, 3, H, W].
pub fn raw_images(zoo: &Path, file: &str) -> Result<Array4<u8>> {
    let path = zoo.join("data").join(file);
    read_npy(&path).with_context(|| format!("reading {}", path.display()))
}

impl Classifier {
    /// Rows `rows` of the image file, preprocessed, as one f32 batch.
    pub fn batch(&self, images: &Array4<u8>, rows: &[usize]) -> Tensor {
        let sel = images.select(Axis(0), rows);
        let x = sel.mapv(|v| (f32::from(v) + self.offset) * self.scale);
        Tensor::F32(x.into_dyn().into_shared())
    }
}

/// Class labels 0..999 of the ImageNet sample.
pub fn labels(zoo: &Path) -> Result<Array1<i64>> {
    Ok(read_npy(zoo.join("data/imagenet500_even_labels.npy"))?)
}

/// A reference array from `refs/`.
pub fn reference_f32(zoo: &Path, file: &str) -> Result<ArrayD<f32>> {
    let path = zoo.join("refs").join(file);
    read_npy(&path).with_context(|| format!("reading {}", path.display()))
}

/// Predicted classes from `refs/`.
pub fn reference_pred(zoo: &Path, file: &str) -> Result<Array1<i64>> {
    let path = zoo.join("refs").join(file);
    read_npy(&path).with_context(|| format!("reading {}", path.display()))
}

/// The STS-B token tensors (`input_ids`, `attention_mask`, `token_type_ids`) as [N, 48] i64.
pub fn stsb_tokens(zoo: &Path) -> Result<Vec<(&'static str, Array2<i64>)>> {
    ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|n| {
            let path = zoo.join(format!("data/stsb_test_{n}.npy"));
            let a: Array2<i64> = read_npy(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok((*n, a))
        })
        .collect()
}

/// STS-B token rows `r` (from [`stsb_tokens`]) as named i64 feeds.
pub fn stsb_rows(tokens: &[(&'static str, Array2<i64>)], r: std::ops::Range<usize>) -> Vec<(String, Tensor)> {
    tokens
        .iter()
        .map(|(n, a)| {
            (
                n.to_string(),
                Tensor::I64(a.slice(ndarray::s![r.clone(), ..]).to_owned().into_dyn().into_shared()),
            )
        })
        .collect()
}

/// Argmax (first maximum) of each row of a [N, C] scores tensor of any dtype, minus `label_offset`.
pub fn argmax_rows(logits: &Tensor, label_offset: usize) -> Result<Vec<i64>> {
    let classes = *logits.shape().last().context("logits have no dims")?;
    let data = logits.to_f64_vec();
    Ok(data
        .chunks(classes)
        .map(|row| {
            let best = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
            best as i64 - label_offset as i64
        })
        .collect())
}

/// Writes a classifier's job data as a user would hand it to `qmix`: `calib.npy` (the 100
/// calibration images, every fifth), `eval.npy` and `labels.npy` (the other 400), preprocessed;
/// returns the `qmix` options naming them.
pub fn write_job_files(zoo: &Path, c: &Classifier, dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let images = raw_images(zoo, c.images)?;
    let labels = labels(zoo)?;
    let rows = |calib: bool| -> Vec<usize> { (0..500).filter(|r| (r % 5 == 0) == calib).collect() };
    for (file, calib) in [("calib.npy", true), ("eval.npy", false)] {
        let Tensor::F32(x) = c.batch(&images, &rows(calib)) else { anyhow::bail!("f32 batch expected") };
        ndarray_npy::write_npy(dir.join(file), &x.to_owned())?;
    }
    ndarray_npy::write_npy(dir.join("labels.npy"), &labels.select(ndarray::Axis(0), &rows(false)))?;
    Ok(vec![
        format!("--calib=input={}", dir.join("calib.npy").display()).into(),
        format!("--eval=input={}", dir.join("eval.npy").display()).into(),
        "--labels".into(),
        dir.join("labels.npy").into(),
        "--label-offset".into(),
        c.label_offset.to_string().into(),
    ])
}

//! Training objectives on the model's first output, each returning the loss summed over the
//! samples of a chunk and its gradient by that output: cross-entropy against labels, knowledge
//! distillation from the FP32 model's logits (KL divergence at a temperature, scaled by T² as
//! Hinton et al. do so gradients keep their size), and mean squared error for outputs that are
//! not class scores.

use ndarray::{ArrayD, ArrayViewD};

use crate::error::{Result, TrainError};

/// What the training minimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Cross-entropy of the softmax of the last axis against one class label per sample.
    CrossEntropy,
    /// KL divergence between the softmaxes of the FP32 and the simulated outputs (last axis) at
    /// this temperature, times T².
    Distillation {
        /// The softmax temperature (1 = plain logits).
        temperature: f32,
    },
    /// Mean squared error to the FP32 outputs, per sample.
    Mse,
}

/// Softmax of `row / t` in f64.
fn softmax(row: &[f32], t: f64) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v) / t));
    let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) / t - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// The rows (last axis) of an output, `(rows, classes)`.
fn rows(out: &ArrayViewD<'_, f32>) -> Result<(usize, usize)> {
    let classes = out.shape().last().copied().unwrap_or(1).max(1);
    if out.is_empty() {
        return Err(TrainError::Data("the model's first output is empty".into()));
    }
    Ok((out.len() / classes, classes))
}

impl Objective {
    /// The loss summed over the chunk's samples and its gradient by `out`. `labels`: one class per
    /// sample (cross-entropy); `teacher`: the FP32 output (distillation, MSE).
    pub fn loss(
        &self,
        out: ArrayViewD<'_, f32>,
        labels: &[usize],
        teacher: Option<ArrayViewD<'_, f32>>,
    ) -> Result<(f64, ArrayD<f32>)> {
        let out = out.as_standard_layout();
        let data = out.as_slice().expect("standard layout");
        let mut grad = vec![0.0f32; data.len()];
        let (n, c) = rows(&out.view())?;
        let teacher = teacher.map(|t| t.as_standard_layout().to_owned());
        let target = |what: &str| -> Result<&[f32]> {
            let t =
                teacher.as_ref().ok_or_else(|| TrainError::Data(format!("{what} needs the FP32 outputs")))?;
            if t.shape() != out.shape() {
                return Err(TrainError::Data(format!(
                    "FP32 output {:?} and simulated output {:?} differ",
                    t.shape(),
                    out.shape()
                )));
            }
            Ok(t.as_slice().expect("standard layout"))
        };
        let mut loss = 0.0f64;
        match *self {
            Objective::CrossEntropy => {
                if labels.len() != n {
                    return Err(TrainError::Data(format!("{} labels for {n} output rows", labels.len())));
                }
                for ((row, g), &label) in data.chunks(c).zip(grad.chunks_mut(c)).zip(labels) {
                    if label >= c {
                        return Err(TrainError::Data(format!("label {label} outside {c} classes")));
                    }
                    let p = softmax(row, 1.0);
                    loss -= p[label].max(f64::MIN_POSITIVE).ln();
                    for (k, (gk, pk)) in g.iter_mut().zip(&p).enumerate() {
                        *gk = (*pk - if k == label { 1.0 } else { 0.0 }) as f32;
                    }
                }
            }
            Objective::Distillation { temperature } => {
                let t = f64::from(temperature);
                if !(t > 0.0 && t.is_finite()) {
                    return Err(TrainError::Data(format!("temperature {temperature} is not positive")));
                }
                let teacher = target("distillation")?;
                for ((row, g), trow) in data.chunks(c).zip(grad.chunks_mut(c)).zip(teacher.chunks(c)) {
                    let (ps, pt) = (softmax(row, t), softmax(trow, t));
                    for (k, gk) in g.iter_mut().enumerate() {
                        if pt[k] > 0.0 {
                            loss += t * t * pt[k] * (pt[k].ln() - ps[k].max(f64::MIN_POSITIVE).ln());
                        }
                        *gk = (t * (ps[k] - pt[k])) as f32;
                    }
                }
            }
            Objective::Mse => {
                let teacher = target("MSE")?;
                let per_sample =
                    (data.len() / out.shape().first().copied().unwrap_or(1).max(1)).max(1) as f64;
                for ((&y, &t), g) in data.iter().zip(teacher).zip(grad.iter_mut()) {
                    let d = f64::from(y) - f64::from(t);
                    loss += d * d / per_sample;
                    *g = (2.0 * d / per_sample) as f32;
                }
            }
        }
        Ok((loss, ArrayD::from_shape_vec(out.raw_dim(), grad).expect("sizes agree")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;
    use qgrad::check::{compare, numeric_gradient, sample_values};

    fn check(objective: Objective, labels: &[usize], teacher: Option<&ArrayD<f32>>) {
        let x = sample_values(12, 4).iter().map(|v| v * 3.0).collect::<Vec<f32>>();
        let arr = |v: &[f32]| ArrayD::from_shape_vec(IxDyn(&[3, 4]), v.to_vec()).unwrap();
        let (_, grad) = objective.loss(arr(&x).view(), labels, teacher.map(|t| t.view())).unwrap();
        let mut f = |v: &[f32]| objective.loss(arr(v).view(), labels, teacher.map(|t| t.view())).unwrap().0;
        let numeric = numeric_gradient(&mut f, &x, 1e-3);
        compare(grad.as_slice().unwrap(), &numeric, 1e-2).unwrap();
    }

    #[test]
    fn every_objective_matches_finite_differences() {
        let teacher = ArrayD::from_shape_vec(IxDyn(&[3, 4]), sample_values(12, 9)).unwrap();
        check(Objective::CrossEntropy, &[0, 3, 1], None);
        check(Objective::Distillation { temperature: 2.0 }, &[], Some(&teacher));
        check(Objective::Mse, &[], Some(&teacher));
    }

    #[test]
    fn distillation_from_itself_is_zero() {
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0]).unwrap();
        let (loss, grad) =
            Objective::Distillation { temperature: 1.0 }.loss(x.view(), &[], Some(x.view())).unwrap();
        assert!(loss.abs() < 1e-12 && grad.iter().all(|g| g.abs() < 1e-7));
    }

    #[test]
    fn a_label_outside_the_classes_is_an_error() {
        let x = ArrayD::zeros(IxDyn(&[1, 3]));
        let err = Objective::CrossEntropy.loss(x.view(), &[3], None).unwrap_err();
        assert!(err.to_string().contains("label 3 outside 3 classes"), "{err}");
    }
}

//! Normalisations and softmax: `BatchNormalization` (inference, and `training_mode` with the
//! batch's statistics and the updated running ones), `LayerNormalization`,
//! `InstanceNormalization`, `LRN` (across channels, as AlexNet and Inception v1 use it), and
//! `Softmax`/`LogSoftmax`/`Hardmax` along an axis (opset < 13: over all dims from the axis on).

use qgraph::{Node, Tensor};

use qkernels::fastmath;

use super::{
    Activation, ExecCtx, Kernel, f32_data, input, into_f32_unique, norm_axis, opt_input, take_input,
};
use crate::error::{ExecError, KernelResult, Result};

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    Some(match node.op_type.as_str() {
        "BatchNormalization" => (|| {
            let eps = node.float_attr("epsilon", 1e-5)?;
            let training = match node.int_attr("training_mode", 0)? {
                0 => None,
                _ => Some(Training {
                    momentum: node.float_attr("momentum", 0.9)?,
                    outputs: node.outputs().len(),
                }),
            };
            Ok(Box::new(BatchNorm { eps, training }) as Box<dyn Kernel>)
        })(),
        "InstanceNormalization" => node
            .float_attr("epsilon", 1e-5)
            .map_err(ExecError::from)
            .map(|eps| Box::new(InstanceNorm { eps }) as Box<dyn Kernel>),
        "LRN" => (|| {
            let size = node.int_attr("size", 0)?;
            if size < 1 {
                return Err(super::invalid(node, format!("size {size} is not positive")));
            }
            Ok(Box::new(Lrn {
                size: size as usize,
                alpha: node.float_attr("alpha", 1e-4)?,
                beta: node.float_attr("beta", 0.75)?,
                bias: node.float_attr("bias", 1.0)?,
            }) as Box<dyn Kernel>)
        })(),
        "GroupNormalization" => (|| {
            let groups = node.int_attr("num_groups", 0)?;
            if groups < 1 {
                return Err(super::invalid(node, format!("num_groups {groups} is not positive")));
            }
            Ok(Box::new(GroupNorm {
                groups: groups as usize,
                eps: node.float_attr("epsilon", 1e-5)?,
                per_group_affine: opset < 21,
            }) as Box<dyn Kernel>)
        })(),
        "MeanVarianceNormalization" => (|| {
            let axes = node.ints_attr("axes")?.map_or_else(|| vec![0, 2, 3], <[i64]>::to_vec);
            Ok(Box::new(MeanVarianceNorm { axes }) as Box<dyn Kernel>)
        })(),
        "LayerNormalization" => (|| {
            Ok(Box::new(LayerNorm {
                axis: node.int_attr("axis", -1)?,
                eps: node.float_attr("epsilon", 1e-5)?,
            }) as Box<dyn Kernel>)
        })(),
        op @ ("Softmax" | "LogSoftmax" | "Hardmax") => {
            let kind = match op {
                "Softmax" => SoftmaxKind::Softmax,
                "LogSoftmax" => SoftmaxKind::Log,
                _ => SoftmaxKind::Hard,
            };
            let default = if opset < 13 { 1 } else { -1 };
            node.int_attr("axis", default)
                .map_err(ExecError::from)
                .map(|axis| Box::new(Softmax { kind, axis, flatten: opset < 13 }) as Box<dyn Kernel>)
        }
        _ => return None,
    })
}

/// Per-channel affine data of a normalisation input of length `c`.
fn per_channel(t: &Tensor, c: usize, what: &str) -> KernelResult<Vec<f32>> {
    let v = f32_data(t)?;
    if v.len() != c {
        return Err(format!("{what} has {} values for {c} channels", v.len()));
    }
    Ok(v.into_owned())
}

/// Runs `f(channel, plane)` in place over every [n, c] plane of an NCHW-like f32 tensor.
fn channel_planes(x: Tensor, mut f: impl FnMut(usize, &mut [f32])) -> KernelResult<Vec<Tensor>> {
    let c = x.shape()[1];
    let inner: usize = x.shape()[2..].iter().product();
    let mut a = into_f32_unique(x)?;
    let data = a.as_slice_mut().ok_or("internal")?;
    data.chunks_mut(inner.max(1)).enumerate().for_each(|(i, plane)| f(i % c, plane));
    Ok(vec![Tensor::F32(a)])
}

/// `BatchNormalization` with `training_mode` set: normalised by the batch's own statistics.
struct Training {
    momentum: f32,
    /// Outputs the node asks for (1 to 3: Y, running mean, running variance).
    outputs: usize,
}

struct BatchNorm {
    eps: f32,
    training: Option<Training>,
}

impl Kernel for BatchNorm {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = take_input(inputs, 0)?;
        if x.shape().len() < 2 {
            return Err(format!("BatchNormalization input must have rank ≥ 2, got {:?}", x.shape()));
        }
        let c = x.shape()[1];
        let get = |slot, what| per_channel(input(inputs, slot)?, c, what);
        let (scale, bias, mean, var) = (get(1, "scale")?, get(2, "B")?, get(3, "mean")?, get(4, "var")?);
        let Some(training) = &self.training else {
            return channel_planes(x, |ch, plane| {
                let k = scale[ch] / (var[ch] + self.eps).sqrt();
                let b = bias[ch] - mean[ch] * k;
                plane.iter_mut().for_each(|v| *v = *v * k + b);
            });
        };
        let (batch_mean, batch_var) = batch_moments(&x)?;
        let mut outputs = channel_planes(x, |ch, plane| {
            let k = scale[ch] / (batch_var[ch] + self.eps).sqrt();
            plane.iter_mut().for_each(|v| *v = (*v - batch_mean[ch]) * k + bias[ch]);
        })?;
        let m = training.momentum;
        let running = |stored: &[f32], batch: &[f32]| -> Vec<f32> {
            stored.iter().zip(batch).map(|(&s, &b)| s * m + b * (1.0 - m)).collect()
        };
        outputs.push(Tensor::from_vec(&[c], running(&mean, &batch_mean)).ok_or("internal")?);
        outputs.push(Tensor::from_vec(&[c], running(&var, &batch_var)).ok_or("internal")?);
        outputs.truncate(training.outputs.max(1));
        Ok(outputs)
    }
}

/// Per-channel mean and (population) variance of `x` over every axis but 1, summed in f64.
fn batch_moments(x: &Tensor) -> KernelResult<(Vec<f32>, Vec<f32>)> {
    let c = x.shape()[1];
    let inner: usize = x.shape()[2..].iter().product();
    let data = f32_data(x)?;
    let count = (data.len() / c.max(1)).max(1) as f64;
    let (mut sum, mut squares) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (i, plane) in data.chunks(inner.max(1)).enumerate() {
        let ch = i % c;
        sum[ch] += plane.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    for (i, plane) in data.chunks(inner.max(1)).enumerate() {
        let ch = i % c;
        squares[ch] += plane.iter().map(|&v| (f64::from(v) - mean[ch]).powi(2)).sum::<f64>();
    }
    Ok((mean.iter().map(|&v| v as f32).collect(), squares.iter().map(|&s| (s / count) as f32).collect()))
}

struct InstanceNorm {
    eps: f32,
}

impl Kernel for InstanceNorm {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = take_input(inputs, 0)?;
        if x.shape().len() < 3 {
            return Err(format!("InstanceNormalization input must have rank ≥ 3, got {:?}", x.shape()));
        }
        let c = x.shape()[1];
        let (scale, bias) =
            (per_channel(input(inputs, 1)?, c, "scale")?, per_channel(input(inputs, 2)?, c, "B")?);
        channel_planes(x, |ch, plane| {
            let (mean, inv) = moments(plane, self.eps);
            plane.iter_mut().for_each(|v| *v = (*v - mean) * inv * scale[ch] + bias[ch]);
        })
    }
}

/// `GroupNormalization`: each group of `C / num_groups` channels of a sample normalised over
/// its channels and positions, then scaled and shifted per channel (opset 21) or, as opset 18
/// defined it, per group.
struct GroupNorm {
    groups: usize,
    eps: f32,
    per_group_affine: bool,
}

impl Kernel for GroupNorm {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = into_f32_unique(take_input(inputs, 0)?)?;
        let shape = x.shape().to_vec();
        if shape.len() < 2 || shape[1] % self.groups != 0 {
            return Err(format!("input {shape:?} does not split into {} groups", self.groups));
        }
        let c = shape[1];
        let affine = if self.per_group_affine { self.groups } else { c };
        let (scale, bias) = (
            per_channel(input(inputs, 1)?, affine, "scale")?,
            per_channel(input(inputs, 2)?, affine, "bias")?,
        );
        let plane: usize = shape[2..].iter().product();
        let per_group = c / self.groups * plane;
        let mut x = x;
        let data = x.as_slice_mut().ok_or("internal: layout")?;
        for (g_flat, chunk) in data.chunks_mut(per_group.max(1)).enumerate() {
            let (mean, inv) = moments(chunk, self.eps);
            let g = g_flat % self.groups;
            for (i, v) in chunk.iter_mut().enumerate() {
                let ch = g * (c / self.groups) + i / plane.max(1);
                let k = if self.per_group_affine { g } else { ch };
                *v = (*v - mean) * inv * scale[k] + bias[k];
            }
        }
        Ok(vec![Tensor::F32(x)])
    }
}

/// `MeanVarianceNormalization`: `(x − mean) / (std + 1e-9)` over `axes`, as the ONNX function
/// defines it.
struct MeanVarianceNorm {
    axes: Vec<i64>,
}

impl Kernel for MeanVarianceNorm {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = into_f32_unique(take_input(inputs, 0)?)?;
        let shape = x.shape().to_vec();
        let rank = shape.len();
        let mut reduced = vec![false; rank];
        for &a in &self.axes {
            reduced[super::norm_axis(a, rank)?] = true;
        }
        let strides = super::strides_of(&shape);
        // The flat index over the kept axes of each element's group.
        let kept: Vec<usize> = (0..rank).filter(|&d| !reduced[d]).collect();
        let groups: usize = kept.iter().map(|&d| shape[d]).product();
        let key =
            |flat: usize| kept.iter().fold(0usize, |k, &d| k * shape[d] + (flat / strides[d]) % shape[d]);
        let mut x = x;
        let data = x.as_slice_mut().ok_or("internal: layout")?;
        let (mut sum, mut count) = (vec![0f64; groups], vec![0usize; groups]);
        for (i, &v) in data.iter().enumerate() {
            sum[key(i)] += f64::from(v);
            count[key(i)] += 1;
        }
        let mean: Vec<f64> = sum.iter().zip(&count).map(|(s, &n)| s / n.max(1) as f64).collect();
        let mut var = vec![0f64; groups];
        for (i, &v) in data.iter().enumerate() {
            var[key(i)] += (f64::from(v) - mean[key(i)]).powi(2);
        }
        let std: Vec<f64> = var.iter().zip(&count).map(|(v, &n)| (v / n.max(1) as f64).sqrt()).collect();
        for (i, v) in data.iter_mut().enumerate() {
            let k = key(i);
            *v = ((f64::from(*v) - mean[k]) / (std[k] + 1e-9)) as f32;
        }
        Ok(vec![Tensor::F32(x)])
    }
}

/// `LRN`: `y = x / (bias + alpha/size · Σ x²)^beta`, the sum over the channels from
/// `c − ⌊(size−1)/2⌋` to `c + ⌈(size−1)/2⌉` at the same position.
struct Lrn {
    size: usize,
    alpha: f32,
    beta: f32,
    bias: f32,
}

impl Kernel for Lrn {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let shape = x.shape().to_vec();
        if shape.len() < 3 {
            return Err(format!("LRN input must have rank ≥ 3, got {shape:?}"));
        }
        let (n, c) = (shape[0], shape[1]);
        let plane: usize = shape[2..].iter().product();
        let data = f32_data(x)?;
        let before = (self.size - 1) / 2;
        let after = self.size - 1 - before;
        let scale = f64::from(self.alpha) / self.size as f64;
        let mut out = vec![0f32; data.len()];
        for img in 0..n {
            let base = img * c * plane;
            for ch in 0..c {
                let (lo, hi) = (ch.saturating_sub(before), (ch + after).min(c - 1));
                for p in 0..plane {
                    let sum: f64 = (lo..=hi).map(|k| f64::from(data[base + k * plane + p]).powi(2)).sum();
                    let at = base + ch * plane + p;
                    let denom = (f64::from(self.bias) + scale * sum).powf(f64::from(self.beta));
                    out[at] = (f64::from(data[at]) / denom) as f32;
                }
            }
        }
        Ok(vec![super::tensor_from(&shape, out)?])
    }
}

/// Mean and 1/sqrt(variance + eps) of `v` (population variance, f64 accumulation).
fn moments(v: &[f32], eps: f32) -> (f32, f32) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + f64::from(eps)).sqrt()) as f32)
}

struct LayerNorm {
    axis: i64,
    eps: f32,
}

impl Kernel for LayerNorm {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = take_input(inputs, 0)?;
        let shape = x.shape().to_vec();
        let axis = norm_axis(self.axis, shape.len())?;
        let inner: usize = shape[axis..].iter().product();
        let outer: usize = shape[..axis].iter().product();
        let affine = |slot: usize, default: f32| -> KernelResult<Vec<f32>> {
            match opt_input(inputs, slot) {
                None => Ok(vec![default; inner]),
                Some(t) => {
                    let b = super::elementwise::broadcast_to(super::typed::<f32>(t)?, &shape[axis..])?;
                    Ok(b.iter().copied().collect())
                }
            }
        };
        let (scale, bias) = (affine(1, 1.0)?, affine(2, 0.0)?);
        let mut a = into_f32_unique(x)?;
        let data = a.as_slice_mut().ok_or("internal")?;
        let (mut means, mut invs) = (Vec::with_capacity(outer), Vec::with_capacity(outer));
        for row in data.chunks_mut(inner.max(1)) {
            let (mean, inv) = moments(row, self.eps);
            row.iter_mut().zip(&scale).zip(&bias).for_each(|((v, &s), &b)| *v = (*v - mean) * inv * s + b);
            means.push(mean);
            invs.push(inv);
        }
        let mut stat_shape = shape[..axis].to_vec();
        stat_shape.extend(std::iter::repeat_n(1, shape.len() - axis));
        Ok(vec![
            Tensor::F32(a),
            super::tensor_from(&stat_shape, means)?,
            super::tensor_from(&stat_shape, invs)?,
        ])
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SoftmaxKind {
    Softmax,
    Log,
    Hard,
}

struct Softmax {
    kind: SoftmaxKind,
    axis: i64,
    flatten: bool,
}

impl Kernel for Softmax {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = take_input(inputs, 0)?;
        let shape = x.shape().to_vec();
        let axis = norm_axis(self.axis, shape.len())?;
        let outer: usize = shape[..axis].iter().product();
        let (n, inner) = if self.flatten {
            (shape[axis..].iter().product::<usize>(), 1)
        } else {
            (shape.get(axis).copied().unwrap_or(1), shape[axis + 1..].iter().product::<usize>())
        };
        let mut a = into_f32_unique(x)?;
        let data = a.as_slice_mut().ok_or("internal")?;
        if inner == 1 && self.kind == SoftmaxKind::Softmax {
            let n = n.max(1);
            let grain = super::even_chunk(ctx, data.len(), n);
            super::for_each_chunk_mut(ctx, data, grain, |_, c| c.chunks_mut(n).for_each(softmax_row));
            return Ok(vec![Tensor::F32(a)]);
        }
        let mut lane = vec![0f32; n];
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| o * n * inner + j * inner + i;
                lane.iter_mut().enumerate().for_each(|(j, v)| *v = data[at(j)]);
                self.lane(&mut lane);
                lane.iter().enumerate().for_each(|(j, &v)| data[at(j)] = v);
            }
        }
        Ok(vec![Tensor::F32(a)])
    }
}

qkernels::multiversion! {
    /// Softmax of one contiguous row, in place.
    fn softmax_row(v: &mut [f32]) {
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        v.iter_mut().for_each(|x| {
            *x = fastmath::exp(*x - max);
            sum += *x;
        });
        let inv = 1.0 / sum;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

impl Softmax {
    fn lane(&self, v: &mut [f32]) {
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match self.kind {
            SoftmaxKind::Hard => {
                let first = v.iter().position(|&x| x == max).unwrap_or(0);
                v.iter_mut().enumerate().for_each(|(j, x)| *x = if j == first { 1.0 } else { 0.0 });
            }
            SoftmaxKind::Softmax => {
                let mut sum = 0f32;
                v.iter_mut().for_each(|x| {
                    *x = fastmath::exp(*x - max);
                    sum += *x;
                });
                v.iter_mut().for_each(|x| *x /= sum);
            }
            SoftmaxKind::Log => log_softmax_lane(v),
        }
    }
}

/// Log-softmax of one lane, in place (the exponentials summed in f64).
pub(super) fn log_softmax_lane(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = v.iter().map(|&x| f64::from(x - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    v.iter_mut().for_each(|x| *x = *x - max - log_sum);
}

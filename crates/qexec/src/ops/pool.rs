//! Pooling in NCHW (1-D pools run as 2-D with a unit height): `MaxPool` (dilations, ceil mode),
//! `AveragePool` (with or without padded cells counted), and the global pools over all spatial dims.

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input};
use crate::error::{KernelResult, Result};

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let ints = |name: &str| node.ints_attr(name).map(|v| v.map(<[i64]>::to_vec));
    let kind = match node.op_type.as_str() {
        "GlobalAveragePool" => return Some(Ok(Box::new(GlobalPool { max: false }))),
        "GlobalMaxPool" => return Some(Ok(Box::new(GlobalPool { max: true }))),
        "MaxPool" => PoolKind::Max,
        "AveragePool" => PoolKind::Average,
        _ => return None,
    };
    Some((|| {
        if node.outputs().len() > 1 {
            return Err(super::invalid(node, "the Indices output of MaxPool is not supported"));
        }
        super::check_size_attributes(node, &["kernel_shape", "strides", "dilations", "pads"])?;
        let kernel = ints("kernel_shape")?.ok_or_else(|| super::invalid(node, "kernel_shape is required"))?;
        Ok(Box::new(Pool {
            kind,
            kernel,
            strides: ints("strides")?,
            dilations: ints("dilations")?,
            pads: ints("pads")?,
            auto_pad: node.string_attr("auto_pad")?.unwrap_or("NOTSET").to_string(),
            ceil_mode: node.int_attr("ceil_mode", 0)? != 0,
            count_include_pad: node.int_attr("count_include_pad", 0)? != 0,
        }) as Box<dyn Kernel>)
    })())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PoolKind {
    Max,
    Average,
}

struct Pool {
    kind: PoolKind,
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    auto_pad: String,
    ceil_mode: bool,
    count_include_pad: bool,
}

/// One spatial axis of a pooling window.
#[derive(Debug, Clone, Copy)]
struct Axis1 {
    len: usize,
    k: usize,
    s: usize,
    d: usize,
    pad_begin: i64,
    pad_end: i64,
    out: usize,
}

impl Pool {
    fn axes(&self, spatial: &[usize]) -> KernelResult<Vec<Axis1>> {
        let n = spatial.len();
        let get = |v: &Option<Vec<i64>>, len: usize, default: i64| -> KernelResult<Vec<i64>> {
            let v = v.clone().unwrap_or_else(|| vec![default; len]);
            if v.len() == len {
                Ok(v)
            } else {
                Err(format!("attribute {v:?} does not match {n} spatial dims"))
            }
        };
        if self.kernel.len() != n {
            return Err(format!("kernel_shape {:?} does not match {n} spatial dims", self.kernel));
        }
        let (s, d, p) = (get(&self.strides, n, 1)?, get(&self.dilations, n, 1)?, get(&self.pads, 2 * n, 0)?);
        let mut axes = Vec::with_capacity(n);
        for i in 0..n {
            let (len, k) = (spatial[i] as i64, self.kernel[i]);
            if k <= 0 || s[i] <= 0 || d[i] <= 0 {
                return Err("kernel, strides and dilations must be positive".into());
            }
            let span = (k - 1) * d[i] + 1;
            let (mut pb, mut pe) = (p[i], p[i + n]);
            let out = match self.auto_pad.as_str() {
                "SAME_UPPER" | "SAME_LOWER" => {
                    let o = (len + s[i] - 1) / s[i];
                    let total = ((o - 1) * s[i] + span - len).max(0);
                    (pb, pe) = if self.auto_pad == "SAME_UPPER" {
                        (total / 2, total - total / 2)
                    } else {
                        (total - total / 2, total / 2)
                    };
                    o
                }
                "VALID" => {
                    (pb, pe) = (0, 0);
                    (len - span) / s[i] + 1
                }
                _ => {
                    let padded = len + pb + pe - span;
                    if self.ceil_mode {
                        let mut o = (padded + s[i] - 1).div_euclid(s[i]) + 1;
                        if (o - 1) * s[i] >= len + pb {
                            o -= 1;
                        }
                        o
                    } else {
                        padded.div_euclid(s[i]) + 1
                    }
                }
            };
            if out <= 0 {
                return Err(format!("input dim {len} too small for pooling kernel {k}"));
            }
            axes.push(Axis1 {
                len: len as usize,
                k: k as usize,
                s: s[i] as usize,
                d: d[i] as usize,
                pad_begin: pb,
                pad_end: pe,
                out: out as usize,
            });
        }
        Ok(axes)
    }
}

impl Kernel for Pool {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let tx = input(inputs, 0)?;
        let shape = tx.shape().to_vec();
        if shape.len() != 3 && shape.len() != 4 {
            return Err(format!("only 1-D and 2-D pooling is supported (input shape {shape:?})"));
        }
        let x = f32_data(tx)?;
        let axes = self.axes(&shape[2..])?;
        let (ay, ax) = if axes.len() == 1 {
            (Axis1 { len: 1, k: 1, s: 1, d: 1, pad_begin: 0, pad_end: 0, out: 1 }, axes[0])
        } else {
            (axes[0], axes[1])
        };
        ctx.checked_len(&[shape[0], shape[1], ay.out, ax.out], 4)?;
        let planes = shape[0] * shape[1];
        let (hw, ohw) = (ay.len * ax.len, ay.out * ax.out);
        let mut out = vec![0f32; planes * ohw];
        for (p, dst) in out.chunks_mut(ohw).enumerate() {
            let src = &x[p * hw..(p + 1) * hw];
            for oy in 0..ay.out {
                let y0 = (oy * ay.s) as i64 - ay.pad_begin;
                for ox in 0..ax.out {
                    let x0 = (ox * ax.s) as i64 - ax.pad_begin;
                    let (mut acc, mut count) =
                        (if self.kind == PoolKind::Max { f32::NEG_INFINITY } else { 0.0 }, 0usize);
                    for ky in 0..ay.k {
                        let iy = y0 + (ky * ay.d) as i64;
                        if iy < 0 || iy >= ay.len as i64 {
                            continue;
                        }
                        for kx in 0..ax.k {
                            let ix = x0 + (kx * ax.d) as i64;
                            if ix < 0 || ix >= ax.len as i64 {
                                continue;
                            }
                            let v = src[iy as usize * ax.len + ix as usize];
                            match self.kind {
                                PoolKind::Max => acc = if v > acc || v.is_nan() { v } else { acc },
                                PoolKind::Average => acc += v,
                            }
                            count += 1;
                        }
                    }
                    dst[oy * ax.out + ox] = match self.kind {
                        PoolKind::Max => acc,
                        PoolKind::Average if self.count_include_pad => {
                            let cells = |a: &Axis1, start: i64| {
                                let end = (start + a.k as i64).min(a.len as i64 + a.pad_end);
                                (end - start).max(0) as f32
                            };
                            acc / (cells(&ay, y0) * cells(&ax, x0))
                        }
                        PoolKind::Average => acc / count.max(1) as f32,
                    };
                }
            }
        }
        let mut out_shape = shape[..2].to_vec();
        out_shape.extend(axes.iter().map(|a| a.out));
        Ok(vec![super::tensor_from(&out_shape, out)?])
    }
}

/// `GlobalAveragePool` / `GlobalMaxPool` over every dim after the channel dim.
struct GlobalPool {
    max: bool,
}

impl Kernel for GlobalPool {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let tx = input(inputs, 0)?;
        let shape = tx.shape().to_vec();
        if shape.len() < 3 {
            return Err(format!("global pooling needs rank ≥ 3, got {shape:?}"));
        }
        let x = f32_data(tx)?;
        let plane: usize = shape[2..].iter().product();
        let out: Vec<f32> = x
            .chunks(plane.max(1))
            .map(|p| {
                if self.max {
                    p.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                } else {
                    (p.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64) as f32
                }
            })
            .collect();
        let mut out_shape = shape[..2].to_vec();
        out_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
        Ok(vec![super::tensor_from(&out_shape, out)?])
    }
}

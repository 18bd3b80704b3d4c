//! Pooling in NCHW (1-D pools run as 2-D with a unit height, 3-D and more through a general
//! window walk): `MaxPool` (dilations, ceil mode; f32, and 8-bit integers through f32, which
//! holds them exactly; the optional `Indices` output in row- or column-major order),
//! `AveragePool` (with or without padded cells counted), `LpPool`, the global pools over all
//! spatial dims, and `MaxUnpool`, which scatters pooled values back to their indices.

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
        "LpPool" => match node.int_attr("p", 2) {
            Ok(p) if p > 0 => PoolKind::Lp(p as f32),
            Ok(p) => return Some(Err(super::invalid(node, format!("p {p} is not positive")))),
            Err(e) => return Some(Err(e.into())),
        },
        "MaxUnpool" => return Some(MaxUnpool::from_node(node)),
        _ => return None,
    };
    Some((|| {
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
            indices: node.outputs().get(1).is_some_and(Option::is_some),
            column_major: node.int_attr("storage_order", 0)? != 0,
        }) as Box<dyn Kernel>)
    })())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PoolKind {
    Max,
    Average,
    /// `(Σ |x|^p)^(1/p)` over the window.
    Lp(f32),
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
    /// Whether MaxPool's second output (the flat input index of each maximum) is wanted.
    indices: bool,
    /// Indices in column-major order of the spatial dims (`storage_order` 1).
    column_major: bool,
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
        if shape.len() < 3 {
            return Err(format!("pooling needs an input of rank 3 or more, got shape {shape:?}"));
        }
        if let Some(back) = integer_through_f32(tx, self.kind)? {
            let mut as_float = [Some(back.0)];
            let mut out = self.run(&mut as_float, ctx, None)?;
            out[0] = (back.1)(&out[0])?;
            return Ok(out);
        }
        let x = f32_data(tx)?;
        let axes = self.axes(&shape[2..])?;
        if axes.len() > 2 || self.indices || matches!(self.kind, PoolKind::Lp(_)) {
            return self.run_nd(&x, &shape, &axes, ctx);
        }
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
                                PoolKind::Average | PoolKind::Lp(_) => acc += v,
                            }
                            count += 1;
                        }
                    }
                    dst[oy * ax.out + ox] = match self.kind {
                        PoolKind::Max | PoolKind::Lp(_) => acc,
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

impl Pool {
    /// Any number of spatial dims: each output cell walks its window odometer-style.
    fn run_nd(
        &self,
        x: &[f32],
        shape: &[usize],
        axes: &[Axis1],
        ctx: &ExecCtx<'_>,
    ) -> KernelResult<Vec<Tensor>> {
        let mut out_shape = shape[..2].to_vec();
        out_shape.extend(axes.iter().map(|a| a.out));
        let total = ctx.checked_len(&out_shape, 4)?;
        let planes = shape[0] * shape[1];
        let plane_in: usize = axes.iter().map(|a| a.len).product();
        let plane_out = total / planes.max(1);
        let n = axes.len();
        // Row-major strides of the input plane.
        let mut stride = vec![1usize; n];
        for i in (0..n.saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * axes[i + 1].len;
        }
        let mut out = vec![0f32; total];
        let mut argmax = vec![0i64; if self.indices { total } else { 0 }];
        // The spatial strides the Indices output counts in (reversed dims for column-major).
        let mut index_stride = vec![1usize; n];
        if self.column_major {
            for i in 1..n {
                index_stride[i] = index_stride[i - 1] * axes[i - 1].len;
            }
        } else {
            index_stride.clone_from(&stride);
        }
        let (mut o_idx, mut k_idx) = (vec![0usize; n], vec![0usize; n]);
        let mut taps = vec![(0usize, 0usize); n];
        for p in 0..planes {
            let src = &x[p * plane_in..(p + 1) * plane_in];
            o_idx.iter_mut().for_each(|v| *v = 0);
            for cell in 0..plane_out {
                let start: Vec<i64> =
                    (0..n).map(|i| (o_idx[i] * axes[i].s) as i64 - axes[i].pad_begin).collect();
                let (mut acc, mut count) =
                    (if self.kind == PoolKind::Max { f32::NEG_INFINITY } else { 0.0 }, 0usize);
                let mut best = 0usize;
                // Per axis, the kernel taps that land inside the input (padding is skipped, so a
                // huge kernel costs no more than the input it covers).
                let mut empty = false;
                for i in 0..n {
                    let a = &axes[i];
                    let (d, len) = (a.d as i64, a.len as i64);
                    let lo = if start[i] < 0 { (-start[i] + d - 1) / d } else { 0 };
                    let hi = ((len - 1 - start[i]).div_euclid(d) + 1).min(a.k as i64);
                    taps[i] = (lo.max(0) as usize, hi.max(0) as usize);
                    empty |= taps[i].0 >= taps[i].1;
                }
                if !empty {
                    for i in 0..n {
                        k_idx[i] = taps[i].0;
                    }
                    'window: loop {
                        let offset: usize = (0..n)
                            .map(|i| (start[i] + (k_idx[i] * axes[i].d) as i64) as usize * stride[i])
                            .sum();
                        let v = src[offset];
                        match self.kind {
                            PoolKind::Max => {
                                if v > acc || (v.is_nan() && !acc.is_nan()) || count == 0 {
                                    acc = v;
                                    best = (0..n)
                                        .map(|i| {
                                            (start[i] + (k_idx[i] * axes[i].d) as i64) as usize
                                                * index_stride[i]
                                        })
                                        .sum();
                                }
                            }
                            PoolKind::Average => acc += v,
                            PoolKind::Lp(p) => acc += v.abs().powf(p),
                        }
                        count += 1;
                        for i in (0..n).rev() {
                            k_idx[i] += 1;
                            if k_idx[i] < taps[i].1 {
                                continue 'window;
                            }
                            k_idx[i] = taps[i].0;
                        }
                        break;
                    }
                }
                if self.indices {
                    argmax[p * plane_out + cell] = (p * plane_in + best) as i64;
                }
                out[p * plane_out + cell] = match self.kind {
                    PoolKind::Max => acc,
                    PoolKind::Lp(p) => acc.powf(1.0 / p),
                    PoolKind::Average if self.count_include_pad => {
                        let cells: f32 = (0..n)
                            .map(|i| {
                                let a = &axes[i];
                                let end = (start[i] + a.k as i64).min(a.len as i64 + a.pad_end);
                                (end - start[i]).max(0) as f32
                            })
                            .product();
                        acc / cells
                    }
                    PoolKind::Average => acc / count.max(1) as f32,
                };
                for i in (0..n).rev() {
                    o_idx[i] += 1;
                    if o_idx[i] < axes[i].out {
                        break;
                    }
                    o_idx[i] = 0;
                }
            }
        }
        let mut outs = vec![super::tensor_from(&out_shape, out)?];
        if self.indices {
            outs.push(super::tensor_from(&out_shape, argmax)?);
        }
        Ok(outs)
    }
}

/// A tensor converted back from f32 to its integer dtype.
type BackToInteger = fn(&Tensor) -> KernelResult<Tensor>;

/// For an 8-bit integer input of MaxPool: the input as f32 (exact) and the way back.
fn integer_through_f32(t: &Tensor, kind: PoolKind) -> KernelResult<Option<(Tensor, BackToInteger)>> {
    // The pooled values are input values, so the casts are exact.
    fn back_u8(t: &Tensor) -> KernelResult<Tensor> {
        let a = super::typed::<f32>(t)?;
        super::tensor_from(a.shape(), a.iter().map(|&v| v as u8).collect())
    }
    fn back_i8(t: &Tensor) -> KernelResult<Tensor> {
        let a = super::typed::<f32>(t)?;
        super::tensor_from(a.shape(), a.iter().map(|&v| v as i8).collect())
    }
    let as_f32 = |t: &Tensor| t.to_f64_vec().into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    match (t, kind) {
        (Tensor::F32(_), _) => Ok(None),
        (Tensor::U8(_), PoolKind::Max) => Ok(Some((super::tensor_from(t.shape(), as_f32(t))?, back_u8))),
        (Tensor::I8(_), PoolKind::Max) => Ok(Some((super::tensor_from(t.shape(), as_f32(t))?, back_i8))),
        (other, _) => Err(format!("expected a float tensor, got {}", other.dtype())),
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

/// `MaxUnpool`: each pooled value written at its flat index in a zero tensor of the unpooled
/// shape (given, or computed from the pooling attributes).
struct MaxUnpool {
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
}

impl MaxUnpool {
    fn from_node(node: &Node) -> Result<Box<dyn Kernel>> {
        let ints = |name: &str| node.ints_attr(name).map(|v| v.map(<[i64]>::to_vec));
        super::check_size_attributes(node, &["kernel_shape", "strides", "pads"])?;
        let kernel = ints("kernel_shape")?.ok_or_else(|| super::invalid(node, "kernel_shape is required"))?;
        Ok(Box::new(MaxUnpool { kernel, strides: ints("strides")?, pads: ints("pads")? }))
    }
}

impl Kernel for MaxUnpool {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tx, ti) = (input(inputs, 0)?, input(inputs, 1)?);
        let xs = tx.shape();
        let n = xs.len().saturating_sub(2);
        if n == 0 || ti.shape() != xs || self.kernel.len() != n {
            return Err(format!(
                "input {xs:?}, indices {:?} and kernel {:?} do not agree",
                ti.shape(),
                self.kernel
            ));
        }
        // The unpooled shape the pooling attributes give; indices count in it.
        let s = self.strides.clone().unwrap_or_else(|| vec![1; n]);
        let p = self.pads.clone().unwrap_or_else(|| vec![0; 2 * n]);
        if s.len() != n || p.len() != 2 * n {
            return Err(format!("strides {s:?} or pads {p:?} do not match {n} spatial dims"));
        }
        let mut dims: Vec<i64> = xs[..2].iter().map(|&d| d as i64).collect();
        for i in 0..n {
            dims.push((xs[i + 2] as i64 - 1) * s[i] - (p[i] + p[i + n]) + self.kernel[i]);
        }
        let inferred = ctx.checked_shape(&dims, 4)?;
        let shape: Vec<usize> = match super::opt_input(inputs, 2) {
            Some(t) => ctx.checked_shape(&super::ints_of(t)?, 4)?,
            None => inferred.clone(),
        };
        if shape.len() != xs.len() || shape[..2] != xs[..2] {
            return Err(format!("output shape {shape:?} does not fit input {xs:?}"));
        }
        let total = ctx.checked_len(&shape, 4)?;
        let inferred_total: usize = inferred.iter().product();
        let (from, to) = (super::strides_of(&inferred), super::strides_of(&shape));
        let (x, idx) = (f32_data(tx)?, super::ints_of(ti)?);
        let mut out = vec![0f32; total];
        for (&v, &i) in x.iter().zip(&idx) {
            let flat = usize::try_from(i).ok().filter(|&i| i < inferred_total).ok_or_else(|| {
                format!("index {i} is out of range for an unpooled tensor of {inferred_total} elements")
            })?;
            let mut at = 0;
            for d in 0..shape.len() {
                let coord = (flat / from[d]) % inferred[d];
                if coord >= shape[d] {
                    return Err(format!("index {i} falls outside the output shape {shape:?}"));
                }
                at += coord * to[d];
            }
            out[at] = v;
        }
        Ok(vec![super::tensor_from(&shape, out)?])
    }
}

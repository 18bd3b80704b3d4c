//! The integer ops of already-quantized models: `MatMulInteger`, `ConvInteger` (int32 results),
//! `QLinearMatMul`, `QLinearConv` (requantized 8-bit results) and `DynamicQuantizeLinear`. The
//! products are exact (int32 accumulation, as onnxruntime's kernels accumulate) and requantizing
//! follows onnxruntime: the f32 multiplier `in_scale · w_scale / out_scale`, round half to even,
//! add the zero point, saturate.

use qgraph::{DType, Node, Tensor};

use super::conv::ConvAttrs;
use super::conv_nd::{axes, walk};
use super::elementwise::broadcast_shape;
use super::{Activation, ExecCtx, Kernel, f32_data, input, opt_input, tensor_from};
use crate::error::{KernelResult, Result};

enum Integer {
    MatMul,
    QLinearMatMul,
    Conv(ConvAttrs),
    QLinearConv(ConvAttrs),
    DynamicQuantize,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let k = |i: Integer| Ok(Box::new(i) as Box<dyn Kernel>);
    Some(match node.op_type.as_str() {
        "MatMulInteger" => k(Integer::MatMul),
        "QLinearMatMul" => k(Integer::QLinearMatMul),
        "ConvInteger" => ConvAttrs::from_node(node).and_then(|a| k(Integer::Conv(a))),
        "QLinearConv" => ConvAttrs::from_node(node).and_then(|a| k(Integer::QLinearConv(a))),
        "DynamicQuantizeLinear" => k(Integer::DynamicQuantize),
        _ => return None,
    })
}

/// An 8-bit (or int32) tensor as i32 values.
fn int_values(t: &Tensor, what: &str) -> KernelResult<Vec<i32>> {
    match t.dtype() {
        DType::U8 | DType::I8 | DType::U16 | DType::I16 | DType::I32 => {
            Ok(t.to_i64_vec().ok_or("internal")?.into_iter().map(|v| v as i32).collect())
        }
        d => Err(format!("{what} must be an 8- or 16-bit integer tensor, got {d}")),
    }
}

/// Zero points: absent (0), one for all, or one per row/column/channel (`count`).
fn zero_points(t: Option<&Tensor>, count: usize, what: &str) -> KernelResult<Vec<i32>> {
    let Some(t) = t else { return Ok(vec![0]) };
    let z = int_values(t, what)?;
    if z.len() == 1 || z.len() == count {
        Ok(z)
    } else {
        Err(format!("{what} has {} values, not 1 or {count}", z.len()))
    }
}

/// Scales: one for all, or one per row/column/channel (`count`).
fn scales(t: &Tensor, count: usize, what: &str) -> KernelResult<Vec<f32>> {
    let s = f32_data(t).map_err(|e| format!("{what}: {e}"))?.into_owned();
    if s.len() == 1 || s.len() == count {
        Ok(s)
    } else {
        Err(format!("{what} has {} values, not 1 or {count}", s.len()))
    }
}

fn pick<T: Copy>(v: &[T], i: usize) -> T {
    if v.len() == 1 { v[0] } else { v[i] }
}

/// `round_half_even(acc · multiplier) + zero`, saturated to `to`'s range.
fn requantize(acc: i32, multiplier: f32, zero: i32, to: DType) -> i64 {
    let (lo, hi) = if to == DType::I8 { (-128, 127) } else { (0, 255) };
    ((acc as f32 * multiplier).round_ties_even() as i64 + i64::from(zero)).clamp(lo, hi)
}

/// `(A − a_zero) · (B − b_zero)` in int32 with numpy matmul broadcasting; A's zero point per row
/// or for all, B's per column or for all. Returns the product and its shape (and N, for the
/// per-column parameters).
fn matmul_integer(
    a: &Tensor,
    b: &Tensor,
    a_zero: Option<&Tensor>,
    b_zero: Option<&Tensor>,
    ctx: &ExecCtx<'_>,
) -> KernelResult<(Vec<i32>, Vec<usize>, usize, usize)> {
    let (mut ash, mut bsh) = (a.shape().to_vec(), b.shape().to_vec());
    if ash.is_empty() || bsh.is_empty() {
        return Err("MatMul operands must have rank ≥ 1".into());
    }
    let (a_vec, b_vec) = (ash.len() == 1, bsh.len() == 1);
    if a_vec {
        ash.insert(0, 1);
    }
    if b_vec {
        bsh.push(1);
    }
    let (m, k) = (ash[ash.len() - 2], ash[ash.len() - 1]);
    let (k2, n) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        return Err(format!("shapes {:?} and {:?} do not multiply", a.shape(), b.shape()));
    }
    let batch = broadcast_shape(&ash[..ash.len() - 2], &bsh[..bsh.len() - 2])?;
    let mut shape = batch.clone();
    shape.extend([m, n]);
    ctx.checked_len(&shape, 4)?;
    let az = zero_points(a_zero, m, "A's zero point")?;
    let bz = zero_points(b_zero, n, "B's zero point")?;
    let (av, bv) = (int_values(a, "A")?, int_values(b, "B")?);
    let (abatch, bbatch) = (&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]);
    let count: usize = batch.iter().product();
    let mut out = vec![0i32; count * m * n];
    let offset = |dims: &[usize], flat: usize| -> usize {
        // The operand's batch index for the broadcast batch index `flat`.
        let mut rem = flat;
        let mut idx = 0;
        let mut stride = 1;
        for (d, &full) in batch.iter().enumerate().rev() {
            let coord = rem % full;
            rem /= full;
            let lead = batch.len() - dims.len();
            if d >= lead {
                let own = dims[d - lead];
                idx += if own == 1 { 0 } else { coord } * stride;
                stride *= own;
            }
        }
        idx
    };
    let mut row = vec![0i32; k];
    for p in 0..count {
        let (ao, bo) = (offset(abatch, p) * m * k, offset(bbatch, p) * k * n);
        for i in 0..m {
            let zi = pick(&az, i);
            row.iter_mut().zip(&av[ao + i * k..ao + (i + 1) * k]).for_each(|(r, &v)| *r = v - zi);
            let dst = &mut out[(p * m + i) * n..(p * m + i + 1) * n];
            for (kk, &x) in row.iter().enumerate() {
                let brow = &bv[bo + kk * n..bo + (kk + 1) * n];
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = d.wrapping_add(x.wrapping_mul(brow[j] - pick(&bz, j)));
                }
            }
        }
    }
    if a_vec {
        shape.remove(shape.len() - 2);
    }
    if b_vec {
        shape.pop();
    }
    Ok((out, shape, m, n))
}

/// `conv(x − x_zero, w − w_zero)` in int32 (w's zero point per output channel or for all).
fn conv_integer(
    attrs: &ConvAttrs,
    x: &Tensor,
    w: &Tensor,
    x_zero: Option<&Tensor>,
    w_zero: Option<&Tensor>,
    ctx: &ExecCtx<'_>,
) -> KernelResult<(Vec<i32>, Vec<usize>)> {
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() < 3 {
        return Err(format!("a convolution needs an input of rank 3 or more, got {xs:?}"));
    }
    let nd = attrs.nd();
    let geometry = axes(&nd, xs, ws, false)?;
    let g = nd.group;
    let (n, c, m) = (xs[0], xs[1], ws[0]);
    if c % g != 0 || m % g != 0 || ws[1] * g != c {
        return Err(format!("input {xs:?}, weight {ws:?} and group {g} do not agree"));
    }
    let (cg, mg) = (c / g, m / g);
    let kernel_cells: usize = geometry.iter().map(|a| a.k).product();
    let in_cells: usize = geometry.iter().map(|a| a.len).product();
    let out_cells: usize = geometry.iter().map(|a| a.out).product();
    let mut shape = vec![n, m];
    shape.extend(geometry.iter().map(|a| a.out));
    ctx.checked_len(&shape, 4)?;
    ctx.checked_len(&[kernel_cells, out_cells], 16)?;
    let xz = zero_points(x_zero, 1, "x's zero point")?[0];
    let wz = zero_points(w_zero, m, "w's zero point")?;
    let xv: Vec<i32> = int_values(x, "x")?.into_iter().map(|v| v - xz).collect();
    let wv = int_values(w, "w")?;
    let mut taps: Vec<(usize, usize, usize)> = Vec::new();
    walk(&geometry, |kc, at, oc| {
        if let Some(ic) = at {
            taps.push((kc, ic, oc));
        }
    });
    let mut out = vec![0i32; n * m * out_cells];
    for img in 0..n {
        for oc in 0..m {
            let grp = oc / mg;
            let z = pick(&wz, oc);
            let dst = &mut out[(img * m + oc) * out_cells..(img * m + oc + 1) * out_cells];
            for ch in 0..cg {
                let src = &xv[(img * c + grp * cg + ch) * in_cells..][..in_cells];
                let kern = &wv[(oc * cg + ch) * kernel_cells..][..kernel_cells];
                for &(kc, ic, o) in &taps {
                    dst[o] = dst[o].wrapping_add(src[ic].wrapping_mul(kern[kc] - z));
                }
            }
        }
    }
    Ok((out, shape))
}

/// The 8-bit dtype of an output zero point.
fn output_dtype(zero: &Tensor) -> KernelResult<DType> {
    match zero.dtype() {
        d @ (DType::U8 | DType::I8) => Ok(d),
        d => Err(format!("the output zero point must be uint8 or int8, got {d}")),
    }
}

impl Kernel for Integer {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        match self {
            Integer::MatMul => {
                let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
                let (out, shape, ..) = matmul_integer(a, b, opt_input(inputs, 2), opt_input(inputs, 3), ctx)?;
                Ok(vec![tensor_from(&shape, out)?])
            }
            Integer::QLinearMatMul => {
                let (a, b) = (input(inputs, 0)?, input(inputs, 3)?);
                let (yz, to) = (input(inputs, 7)?, output_dtype(input(inputs, 7)?)?);
                let (acc, shape, m, n) =
                    matmul_integer(a, b, Some(input(inputs, 2)?), Some(input(inputs, 5)?), ctx)?;
                let a_scale = scales(input(inputs, 1)?, m, "A's scale")?;
                let b_scale = scales(input(inputs, 4)?, n, "B's scale")?;
                let y_scale = scales(input(inputs, 6)?, 1, "Y's scale")?[0];
                let y_zero = int_values(yz, "Y's zero point")?[0];
                let q: Vec<i64> = acc
                    .iter()
                    .enumerate()
                    .map(|(flat, &v)| {
                        let (i, j) = ((flat / n) % m, flat % n);
                        requantize(v, pick(&a_scale, i) * pick(&b_scale, j) / y_scale, y_zero, to)
                    })
                    .collect();
                Ok(vec![Tensor::from_i64s(to, &shape, &q).ok_or("internal: requantized shape")?])
            }
            Integer::Conv(attrs) => {
                let (x, w) = (input(inputs, 0)?, input(inputs, 1)?);
                let (out, shape) =
                    conv_integer(attrs, x, w, opt_input(inputs, 2), opt_input(inputs, 3), ctx)?;
                Ok(vec![tensor_from(&shape, out)?])
            }
            Integer::QLinearConv(attrs) => {
                let (x, w) = (input(inputs, 0)?, input(inputs, 3)?);
                let m = *w.shape().first().ok_or("the weight has rank 0")?;
                let (yz, to) = (input(inputs, 7)?, output_dtype(input(inputs, 7)?)?);
                let (mut acc, shape) =
                    conv_integer(attrs, x, w, Some(input(inputs, 2)?), Some(input(inputs, 5)?), ctx)?;
                let x_scale = scales(input(inputs, 1)?, 1, "x's scale")?[0];
                let w_scale = scales(input(inputs, 4)?, m, "w's scale")?;
                let y_scale = scales(input(inputs, 6)?, 1, "y's scale")?[0];
                let y_zero = int_values(yz, "y's zero point")?[0];
                let plane: usize = shape[2..].iter().product();
                if let Some(bias) = opt_input(inputs, 8) {
                    let b = int_values(bias, "B")?;
                    if b.len() != m {
                        return Err(format!("B has {} values for {m} output channels", b.len()));
                    }
                    for (p, chunk) in acc.chunks_mut(plane.max(1)).enumerate() {
                        chunk.iter_mut().for_each(|v| *v = v.wrapping_add(b[p % m]));
                    }
                }
                let q: Vec<i64> = acc
                    .iter()
                    .enumerate()
                    .map(|(flat, &v)| {
                        let oc = (flat / plane.max(1)) % m;
                        requantize(v, x_scale * pick(&w_scale, oc) / y_scale, y_zero, to)
                    })
                    .collect();
                Ok(vec![Tensor::from_i64s(to, &shape, &q).ok_or("internal: requantized shape")?])
            }
            Integer::DynamicQuantize => {
                let x = input(inputs, 0)?;
                let v = f32_data(x)?;
                let (lo, hi) = v.iter().fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                if !(lo.is_finite() && hi.is_finite()) {
                    return Err("the input holds a non-finite value".into());
                }
                let scale = (hi - lo) / 255.0;
                let zero = if scale == 0.0 { 0.0 } else { (-lo / scale).round_ties_even().clamp(0.0, 255.0) };
                let q: Vec<u8> = v
                    .iter()
                    .map(|&x| {
                        let level = if scale == 0.0 { 0.0 } else { (x / scale).round_ties_even() };
                        (level + zero).clamp(0.0, 255.0) as u8
                    })
                    .collect();
                Ok(vec![tensor_from(x.shape(), q)?, Tensor::scalar(scale), Tensor::scalar(zero as u8)])
            }
        }
    }
}

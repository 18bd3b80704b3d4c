//! The f32 engine of numpy-broadcast binary arithmetic: operand strides over the output shape
//! (0 along broadcast dims), adjacent dims merged while both operands stay contiguous or both stay
//! broadcast, then an odometer over the outer dims and a vectorisable inner loop for each of the
//! three common inner cases (both contiguous, one operand constant along the row).

use super::elementwise::broadcast_shape;
use crate::error::KernelResult;

/// The f32 binary operations the engine computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum F32Op {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    PRelu,
}

/// Output shape and merged strides of a broadcast pair.
pub(crate) struct Plan {
    /// The broadcast output shape (as ONNX defines it).
    pub shape: Vec<usize>,
    dims: Vec<usize>,
    sa: Vec<usize>,
    sb: Vec<usize>,
}

fn strides(own: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - own.len();
    let mut s = vec![0; out.len()];
    let mut acc = 1;
    for i in (0..own.len()).rev() {
        s[pad + i] = if own[i] == 1 { 0 } else { acc };
        acc *= own[i];
    }
    s
}

impl Plan {
    pub(crate) fn new(a: &[usize], b: &[usize]) -> KernelResult<Plan> {
        let shape = broadcast_shape(a, b)?;
        let (fa, fb) = (strides(a, &shape), strides(b, &shape));
        let (mut dims, mut sa, mut sb) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..shape.len() {
            if shape[i] == 1 {
                continue;
            }
            if let Some(&last) = dims.last() {
                let k = dims.len() - 1;
                // Merge the previous (outer) dim into this one when, for both operands, it steps
                // exactly over this dim (contiguous, or both broadcast).
                if sa[k] == fa[i] * shape[i] && sb[k] == fb[i] * shape[i] {
                    dims[k] = last * shape[i];
                    sa[k] = fa[i];
                    sb[k] = fb[i];
                    continue;
                }
            }
            dims.push(shape[i]);
            sa.push(fa[i]);
            sb.push(fb[i]);
        }
        if dims.is_empty() {
            dims.push(1);
            sa.push(0);
            sb.push(0);
        }
        Ok(Plan { shape, dims, sa, sb })
    }

    /// Element count of the output.
    pub(crate) fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Elements of one output row (the innermost dimension of the plan): callers split the
    /// output at multiples of it for [`Plan::run_rows`].
    pub(crate) fn row_len(&self) -> usize {
        self.dims.last().copied().unwrap_or(1)
    }

    /// `out[i] = op(a[…], b[…])` over the output rows `first_row..` that `out` holds (whole rows;
    /// the whole output is `self.len()` elements from row 0). With `a_is_out`, `a` is read from
    /// `out` itself (in place; `a` must then have the output shape).
    pub(crate) fn run_rows(
        &self,
        op: F32Op,
        a: &[f32],
        b: &[f32],
        out: &mut [f32],
        first_row: usize,
        a_is_out: bool,
    ) {
        let rank = self.dims.len();
        let inner = self.dims[rank - 1];
        let (ia, ib) = (self.sa[rank - 1], self.sb[rank - 1]);
        let outer = out.len() / inner.max(1);
        // The coordinates and input offsets of the first row.
        let mut idx = vec![0usize; rank - 1];
        let (mut oa, mut ob) = (0usize, 0usize);
        let mut rest = first_row;
        for d in (0..rank - 1).rev() {
            idx[d] = rest % self.dims[d];
            rest /= self.dims[d];
            oa += idx[d] * self.sa[d];
            ob += idx[d] * self.sb[d];
        }
        for o in 0..outer {
            let dst = &mut out[o * inner..(o + 1) * inner];
            let rb = &b[ob..];
            if a_is_out {
                row_inplace(op, dst, rb, ib);
            } else {
                row(op, &a[oa..], ia, rb, ib, dst);
            }
            for d in (0..rank - 1).rev() {
                idx[d] += 1;
                oa += self.sa[d];
                ob += self.sb[d];
                if idx[d] < self.dims[d] {
                    break;
                }
                oa -= self.sa[d] * self.dims[d];
                ob -= self.sb[d] * self.dims[d];
                idx[d] = 0;
            }
        }
    }
}

#[inline(always)]
fn apply(op: F32Op, x: f32, y: f32) -> f32 {
    match op {
        F32Op::Add => x + y,
        F32Op::Sub => x - y,
        F32Op::Mul => x * y,
        F32Op::Div => x / y,
        F32Op::Pow => x.powf(y),
        F32Op::PRelu => {
            if x < 0.0 {
                x * y
            } else {
                x
            }
        }
    }
}

#[inline(always)]
fn row_with(op: F32Op, a: &[f32], ia: usize, b: &[f32], ib: usize, out: &mut [f32]) {
    let n = out.len();
    match (ia, ib) {
        (1, 1) => {
            // Indexed over equal-length slices rather than a two-level zip, whose fold the
            // compiler leaves out of line, without the caller's target features.
            let (a, b) = (&a[..n], &b[..n]);
            for i in 0..n {
                out[i] = apply(op, a[i], b[i]);
            }
        }
        (1, 0) => {
            let y = b[0];
            out.iter_mut().zip(&a[..n]).for_each(|(o, &x)| *o = apply(op, x, y));
        }
        (0, 1) => {
            let x = a[0];
            out.iter_mut().zip(&b[..n]).for_each(|(o, &y)| *o = apply(op, x, y));
        }
        _ => out.iter_mut().enumerate().for_each(|(i, o)| *o = apply(op, a[i * ia], b[i * ib])),
    }
}

qkernels::multiversion! {
    /// One output row from two operand rows with inner strides `ia`, `ib`.
    fn row(op: F32Op, a: &[f32], ia: usize, b: &[f32], ib: usize, out: &mut [f32]) {
        match op {
            F32Op::Add => row_with(F32Op::Add, a, ia, b, ib, out),
            F32Op::Sub => row_with(F32Op::Sub, a, ia, b, ib, out),
            F32Op::Mul => row_with(F32Op::Mul, a, ia, b, ib, out),
            F32Op::Div => row_with(F32Op::Div, a, ia, b, ib, out),
            F32Op::Pow => row_with(F32Op::Pow, a, ia, b, ib, out),
            F32Op::PRelu => row_with(F32Op::PRelu, a, ia, b, ib, out),
        }
    }
}

#[inline(always)]
fn row_inplace_with(op: F32Op, out: &mut [f32], b: &[f32], ib: usize) {
    let n = out.len();
    match ib {
        1 => out.iter_mut().zip(&b[..n]).for_each(|(o, &y)| *o = apply(op, *o, y)),
        0 => {
            let y = b[0];
            out.iter_mut().for_each(|o| *o = apply(op, *o, y));
        }
        _ => out.iter_mut().enumerate().for_each(|(i, o)| *o = apply(op, *o, b[i * ib])),
    }
}

qkernels::multiversion! {
    /// One output row computed in place over the `a` operand.
    fn row_inplace(op: F32Op, out: &mut [f32], b: &[f32], ib: usize) {
        match op {
            F32Op::Add => row_inplace_with(F32Op::Add, out, b, ib),
            F32Op::Sub => row_inplace_with(F32Op::Sub, out, b, ib),
            F32Op::Mul => row_inplace_with(F32Op::Mul, out, b, ib),
            F32Op::Div => row_inplace_with(F32Op::Div, out, b, ib),
            F32Op::Pow => row_inplace_with(F32Op::Pow, out, b, ib),
            F32Op::PRelu => row_inplace_with(F32Op::PRelu, out, b, ib),
        }
    }
}

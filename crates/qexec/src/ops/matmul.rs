//! Matrix products: the one `sgemm` entry point every product goes through (the `gemm` crate's
//! runtime-dispatched SIMD kernels), the `MatMul` (numpy-batched) and `Gemm` ops, and `Det`
//! (LU decomposition with partial pivoting, per matrix of a batch).

use qgraph::{Node, Tensor};
use rayon::prelude::*;

use super::{Activation, ExecCtx, Kernel, f32_data, input, opt_input};
use crate::error::{KernelResult, Result};

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    Some(match node.op_type.as_str() {
        "MatMul" => Ok(Box::new(MatMul)),
        "Det" => Ok(Box::new(Det)),
        "Gemm" => (|| {
            Ok(Box::new(GemmOp {
                alpha: node.float_attr("alpha", 1.0)?,
                beta: node.float_attr("beta", 1.0)?,
                trans_a: node.int_attr("transA", 0)? != 0,
                trans_b: node.int_attr("transB", 0)? != 0,
            }) as Box<dyn Kernel>)
        })(),
        _ => return None,
    })
}

/// A strided read-only matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl MatRef<'_> {
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `c[m×n] (row stride c_rs) = (accumulate ? c : 0) + alpha · a[m×k] · b[k×n]`; an error when an
/// operand is too small for its extent.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    alpha: f32,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    par: gemm::Parallelism,
) -> std::result::Result<(), String> {
    let (ptr, len) = (c.as_mut_ptr(), c.len());
    // SAFETY: `c` is borrowed mutably for the call, so the product is the only access to it, and
    // it is valid for its `len` elements.
    unsafe { sgemm_into(m, n, k, a, b, alpha, ptr, len, c_rs, accumulate, par) }
}

/// [`sgemm`] into a raw output of `c_len` elements, for threads that write disjoint columns of
/// one output (no `&mut` slice of it may exist while they run). Checks every operand's extent.
///
/// # Safety
/// `c` is valid for reads and writes of `c_len` elements, and nothing else reads or writes the
/// elements the product writes (rows `0..m`, columns `0..n`, row stride `c_rs`) during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_into(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    alpha: f32,
    c: *mut f32,
    c_len: usize,
    c_rs: usize,
    accumulate: bool,
    par: gemm::Parallelism,
) -> KernelResult<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let c_fits = (m - 1) * c_rs + n <= c_len && c_rs >= n;
    if !a.fits(m, k) || !b.fits(k, n) || !c_fits {
        return Err(format!("internal: gemm operands too small for {m}x{k}x{n}"));
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row `i`'s first `n` elements lie within `c_len` (checked above) and
                // belong to this call (the caller's contract).
                unsafe { std::slice::from_raw_parts_mut(c.add(i * c_rs), n) }.fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: the checks above guarantee that every (row, col) index the product reads from `a`
    // (m×k), `b` (k×n) and writes to `c` (m×n, row stride `c_rs`, unit column stride) lies inside
    // their extents; the caller guarantees those writes alias nothing the product reads (`a` and
    // `b` are shared borrows, which a region only this call accesses cannot overlap).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Runs `f(first_row, band)` over bands of the rows of a row-major [rows, cols] output: one band
/// per thread when the context has several and the product is large enough to share, else one.
fn row_bands(
    ctx: &ExecCtx<'_>,
    rows: usize,
    cols: usize,
    out: &mut [f32],
    f: impl Fn(usize, &mut [f32]) -> KernelResult<()> + Sync + Send,
) -> KernelResult<()> {
    if ctx.threads > 1 && rows >= 2 * ctx.threads && rows * cols >= 4096 {
        let band = rows.div_ceil(ctx.threads);
        out.par_chunks_mut(band * cols.max(1)).enumerate().try_for_each(|(i, chunk)| f(i * band, chunk))
    } else {
        f(0, out)
    }
}

/// Whether a product of `rows` × `cols` is better shared out by columns: few rows (a batch-1
/// transformer's tokens) against a wide weight, where row bands would make every thread pack the
/// whole weight for a few rows each.
fn wide_and_short(ctx: &ExecCtx<'_>, rows: usize, cols: usize) -> bool {
    ctx.threads > 1 && rows <= 64 * ctx.threads && cols >= 64 * ctx.threads
}

/// `out = a · b` ([rows, k] · [k, n]) with one band of columns of `b` per thread, each written
/// straight into its columns of `out`.
fn column_bands(
    ctx: &ExecCtx<'_>,
    rows: usize,
    k: usize,
    n: usize,
    a: MatRef<'_>,
    b: &[f32],
    out: &mut [f32],
) -> KernelResult<()> {
    let band = n.div_ceil(ctx.threads).next_multiple_of(16);
    let shared = SharedOutput { ptr: out.as_mut_ptr(), len: out.len() };
    (0..n).into_par_iter().step_by(band).try_for_each(|c0| {
        let w = band.min(n - c0);
        let bm = MatRef { data: &b[c0..], rs: n, cs: 1 };
        let (dst, len) = shared.from(c0)?;
        // SAFETY: the bands write disjoint columns (`c0..c0 + w` of every row, row stride `n`) of
        // `out`, which nothing else touches until they all finish; `sgemm_into` checks the extent.
        unsafe { sgemm_into(rows, w, k, a, bm, 1.0, dst, len, n, false, gemm::Parallelism::None) }
    })
}

/// An output that threads share, each writing a disjoint block of it.
#[derive(Clone, Copy)]
struct SharedOutput {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the pointer is only written through `sgemm_into` by `column_bands`, which gives each
// thread a disjoint block of the output.
unsafe impl Send for SharedOutput {}
// SAFETY: as above.
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// The output from element `at` on: its first element and how many follow.
    fn from(&self, at: usize) -> KernelResult<(*mut f32, usize)> {
        if at > self.len {
            return Err("internal: product block outside its output".into());
        }
        Ok((self.ptr.wrapping_add(at), self.len - at))
    }
}

/// `MatMul` with numpy semantics: 1-D operands promoted, batch dims broadcast.
struct MatMul;

impl Kernel for MatMul {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        fused: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (ta, tb) = (input(inputs, 0)?, input(inputs, 1)?);
        let (a, b) = (f32_data(ta)?, f32_data(tb)?);
        let (mut sa, mut sb) = (ta.shape().to_vec(), tb.shape().to_vec());
        if sa.is_empty() || sb.is_empty() {
            return Err("MatMul operands must have rank ≥ 1".into());
        }
        let (a_vec, b_vec) = (sa.len() == 1, sb.len() == 1);
        if a_vec {
            sa.insert(0, 1);
        }
        if b_vec {
            sb.push(1);
        }
        let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
        let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
        if k != k2 {
            return Err(format!("MatMul inner dims differ: {:?} × {:?}", ta.shape(), tb.shape()));
        }
        let batch = super::elementwise::broadcast_shape(&sa[..sa.len() - 2], &sb[..sb.len() - 2])?;
        let count: usize = batch.iter().product();
        let mut out = ctx.pool.take(count * m * n);
        let offsets = |shape: &[usize], size: usize| -> Vec<usize> {
            let own = &shape[..shape.len() - 2];
            let mut offs = Vec::with_capacity(count);
            let mut idx = vec![0usize; batch.len()];
            for _ in 0..count {
                let mut off = 0;
                let mut stride = size;
                for d in (0..own.len()).rev() {
                    let bi = idx[batch.len() - own.len() + d];
                    off += if own[d] == 1 { 0 } else { bi * stride };
                    stride *= own[d];
                }
                offs.push(off);
                for d in (0..batch.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < batch[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            offs
        };
        let (oa, ob) = (offsets(&sa, m * k), offsets(&sb, k * n));
        let b_shared = ob.iter().all(|&o| o == 0) && oa.windows(2).all(|w| w[1] == w[0] + m * k);
        if b_shared && count > 0 && wide_and_short(ctx, count * m, n) {
            column_bands(ctx, count * m, k, n, MatRef { data: &a[oa[0]..], rs: k, cs: 1 }, &b, &mut out)?;
        } else if b_shared && count > 0 {
            // One product with the batch folded into the rows of `a`, split in row bands.
            let a_rows = MatRef { data: &a[oa[0]..], rs: k, cs: 1 };
            row_bands(ctx, count * m, n, &mut out, |r0, band| {
                let am = MatRef { data: &a_rows.data[r0 * k..], rs: k, cs: 1 };
                sgemm(
                    band.len() / n.max(1),
                    n,
                    k,
                    am,
                    MatRef { data: &b, rs: n, cs: 1 },
                    1.0,
                    band,
                    n,
                    false,
                    gemm::Parallelism::None,
                )
            })?;
        } else if ctx.threads > 1 && count > 1 {
            out.par_chunks_mut((m * n).max(1)).enumerate().try_for_each(|(i, c)| {
                let (am, bm) =
                    (MatRef { data: &a[oa[i]..], rs: k, cs: 1 }, MatRef { data: &b[ob[i]..], rs: n, cs: 1 });
                sgemm(m, n, k, am, bm, 1.0, c, n, false, gemm::Parallelism::None)
            })?;
        } else {
            for (i, c) in out.chunks_mut((m * n).max(1)).enumerate().take(count) {
                let (am, bm) =
                    (MatRef { data: &a[oa[i]..], rs: k, cs: 1 }, MatRef { data: &b[ob[i]..], rs: n, cs: 1 });
                sgemm(m, n, k, am, bm, 1.0, c, n, false, ctx.gemm_parallelism())?;
            }
        }
        if let Some(act) = fused {
            act.apply(&mut out);
        }
        let mut shape = batch;
        if !a_vec {
            shape.push(m);
        }
        if !b_vec {
            shape.push(n);
        }
        Ok(vec![out.into_tensor(&shape)?])
    }

    fn fuses_activation(&self) -> bool {
        true
    }
}

/// `Gemm`: `alpha · A' · B' + beta · C` with optional transposes and a broadcast `C`.
struct GemmOp {
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
}

impl Kernel for GemmOp {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        fused: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (ta, tb) = (input(inputs, 0)?, input(inputs, 1)?);
        super::expect_rank(ta, 2, "Gemm input A")?;
        super::expect_rank(tb, 2, "Gemm input B")?;
        let (a, b) = (f32_data(ta)?, f32_data(tb)?);
        let (sa, sb) = (ta.shape(), tb.shape());
        let (m, k) = if self.trans_a { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
        let (k2, n) = if self.trans_b { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
        if k != k2 {
            return Err(format!(
                "Gemm inner dims differ: A {sa:?} (transA {}) × B {sb:?} (transB {})",
                self.trans_a, self.trans_b
            ));
        }
        let mut out = ctx.pool.take(m * n);
        let c = opt_input(inputs, 2).filter(|_| self.beta != 0.0);
        if let Some(tc) = c {
            let bias = super::typed::<f32>(tc)?;
            let view = super::elementwise::broadcast_to(bias, &[m, n])?;
            out.iter_mut().zip(view.iter()).for_each(|(o, &v)| *o = self.beta * v);
        }
        let bm =
            if self.trans_b { MatRef { data: &b, rs: 1, cs: k } } else { MatRef { data: &b, rs: n, cs: 1 } };
        row_bands(ctx, m, n, &mut out, |r0, band| {
            let am = if self.trans_a {
                MatRef { data: &a[r0..], rs: 1, cs: m }
            } else {
                MatRef { data: &a[r0 * k..], rs: k, cs: 1 }
            };
            sgemm(
                band.len() / n.max(1),
                n,
                k,
                am,
                bm,
                self.alpha,
                band,
                n,
                c.is_some(),
                gemm::Parallelism::None,
            )
        })?;
        if let Some(act) = fused {
            act.apply(&mut out);
        }
        Ok(vec![out.into_tensor(&[m, n])?])
    }

    fn fuses_activation(&self) -> bool {
        true
    }
}

/// `Det`: the determinant of each trailing square matrix, in f64.
struct Det;

/// The determinant of the `n×n` row-major matrix `m` (overwritten by its LU factors).
fn determinant(m: &mut [f64], n: usize) -> f64 {
    let mut det = 1.0;
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&a, &b| m[a * n + col].abs().total_cmp(&m[b * n + col].abs())).unwrap_or(col);
        if m[pivot * n + col] == 0.0 {
            return 0.0;
        }
        if pivot != col {
            for k in 0..n {
                m.swap(col * n + k, pivot * n + k);
            }
            det = -det;
        }
        let p = m[col * n + col];
        det *= p;
        for row in col + 1..n {
            let f = m[row * n + col] / p;
            for k in col..n {
                m[row * n + k] -= f * m[col * n + k];
            }
        }
    }
    det
}

impl Kernel for Det {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let shape = x.shape();
        let r = shape.len();
        if r < 2 || shape[r - 1] != shape[r - 2] {
            return Err(format!("Det needs square trailing matrices, got shape {shape:?}"));
        }
        let n = shape[r - 1];
        let v: Vec<f64> = f32_data(x)?.iter().map(|&v| f64::from(v)).collect();
        let out: Vec<f32> = if n == 0 {
            vec![1.0; shape[..r - 2].iter().product()]
        } else {
            v.chunks(n * n).map(|m| determinant(&mut m.to_vec(), n) as f32).collect()
        };
        super::tensor_from(&shape[..r - 2], out).map(|t| vec![t])
    }
}

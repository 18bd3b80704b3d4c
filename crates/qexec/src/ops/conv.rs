//! Convolutions in NCHW (1-D convs run as 2-D with a unit height): `Conv` as one matrix product per
//! image and group (1×1 kernels read the input directly; others go through an im2col buffer),
//! depthwise convolutions through `depthwise`, and `ConvTranspose` as a product followed by col2im.
//! Bias and a following Relu/Clip are applied while the output is still in cache.

use qgraph::{Node, Tensor};
use rayon::prelude::*;

use super::conv_nd::{self, NdAttrs};
use super::depthwise;
use super::matmul::{MatRef, sgemm, sgemm_into};
use super::{Activation, ExecCtx, Kernel, f32_data, input, opt_input};
use crate::error::{KernelResult, Result};

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let transpose = match node.op_type.as_str() {
        "Conv" => false,
        "ConvTranspose" => true,
        "Col2Im" => {
            let ints = |name: &str| node.ints_attr(name).map(|v| v.map(<[i64]>::to_vec));
            return Some((|| {
                super::check_size_attributes(node, &["strides", "dilations", "pads"])?;
                Ok(Box::new(conv_nd::Col2Im {
                    dilations: ints("dilations")?,
                    pads: ints("pads")?,
                    strides: ints("strides")?,
                }) as Box<dyn Kernel>)
            })());
        }
        _ => return None,
    };
    Some(ConvAttrs::from_node(node).map(|attrs| {
        if transpose { Box::new(ConvTranspose(attrs)) as Box<dyn Kernel> } else { Box::new(Conv(attrs)) }
    }))
}

/// Attributes shared by `Conv` and `ConvTranspose` (and the integer convolutions).
pub(super) struct ConvAttrs {
    group: usize,
    kernel: Option<Vec<i64>>,
    strides: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    auto_pad: String,
    output_padding: Option<Vec<i64>>,
    output_shape: Option<Vec<i64>>,
}

/// The 2-D geometry of one convolution call: batch, channels, input and output sizes, kernel,
/// strides, dilations, and the top/left padding.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub pt: isize,
    pub pl: isize,
}

impl ConvAttrs {
    /// The attributes of `node`, checked: a positive group and bounded sizes.
    pub(super) fn from_node(node: &Node) -> Result<ConvAttrs> {
        let ints = |name: &str| node.ints_attr(name).map(|v| v.map(<[i64]>::to_vec));
        let group = node.int_attr("group", 1)?;
        if group < 1 {
            return Err(super::invalid(node, format!("group {group} is not positive")));
        }
        super::check_size_attributes(
            node,
            &["kernel_shape", "strides", "dilations", "pads", "output_padding", "output_shape"],
        )?;
        Ok(ConvAttrs {
            group: group as usize,
            kernel: ints("kernel_shape")?,
            strides: ints("strides")?,
            dilations: ints("dilations")?,
            pads: ints("pads")?,
            auto_pad: node.string_attr("auto_pad")?.unwrap_or("NOTSET").to_string(),
            output_padding: ints("output_padding")?,
            output_shape: ints("output_shape")?,
        })
    }

    /// Per-spatial-dim attribute, expanded to 2-D (1-D convs get a unit leading dim).
    fn pair(v: &Option<Vec<i64>>, rank: usize, default: i64) -> KernelResult<[i64; 2]> {
        let v = v.clone().unwrap_or_else(|| vec![default; rank]);
        match (rank, v.as_slice()) {
            (1, [x]) => Ok([default, *x]),
            (2, [y, x]) => Ok([*y, *x]),
            _ => Err(format!("attribute {v:?} does not match {rank} spatial dims")),
        }
    }

    fn pads4(&self, rank: usize) -> KernelResult<[i64; 4]> {
        let p = self.pads.clone().unwrap_or_else(|| vec![0; 2 * rank]);
        match (rank, p.as_slice()) {
            (1, [b, e]) => Ok([0, *b, 0, *e]),
            (2, [t, l, b, r]) => Ok([*t, *l, *b, *r]),
            _ => Err(format!("pads {p:?} do not match {rank} spatial dims")),
        }
    }

    /// Spatial rank of `x` (rank 3 or 4 supported) and its dims as 2-D.
    fn spatial(x: &[usize]) -> KernelResult<(usize, [usize; 2])> {
        match x.len() {
            3 => Ok((1, [1, x[2]])),
            4 => Ok((2, [x[2], x[3]])),
            r => Err(format!("a convolution needs an input of rank 3 or more, got rank {r}")),
        }
    }
}

/// Splits a total padding into (begin, end) as `auto_pad` asks.
pub(super) fn split_pad(total: i64, upper: bool) -> (i64, i64) {
    let total = total.max(0);
    if upper { (total / 2, total - total / 2) } else { (total - total / 2, total / 2) }
}

/// `Conv`.
struct Conv(ConvAttrs);

impl Conv {
    fn geometry(&self, x: &[usize], w: &[usize]) -> KernelResult<(Geometry, usize)> {
        let a = &self.0;
        let (rank, [h, wd]) = ConvAttrs::spatial(x)?;
        if w.len() != x.len() {
            return Err(format!("weight shape {w:?} does not match input shape {x:?}"));
        }
        let (kh, kw) = if rank == 1 { (1, w[2]) } else { (w[2], w[3]) };
        if kh == 0 || kw == 0 {
            return Err(format!("weight shape {w:?} has an empty kernel"));
        }
        if let Some(k) = &a.kernel {
            let expect: Vec<i64> = if rank == 1 { vec![kw as i64] } else { vec![kh as i64, kw as i64] };
            if *k != expect {
                return Err(format!("kernel_shape {k:?} does not match weight shape {w:?}"));
            }
        }
        let [sh, sw] = ConvAttrs::pair(&a.strides, rank, 1)?;
        let [dh, dw] = ConvAttrs::pair(&a.dilations, rank, 1)?;
        if sh <= 0 || sw <= 0 || dh <= 0 || dw <= 0 {
            return Err("strides and dilations must be positive".into());
        }
        let mut p = a.pads4(rank)?;
        let dims = [(h, kh, sh, dh), (wd, kw, sw, dw)];
        let mut out = [0usize; 2];
        for (i, &(d, k, s, dil)) in dims.iter().enumerate() {
            let span = (k as i64 - 1) * dil + 1;
            let o = match a.auto_pad.as_str() {
                "SAME_UPPER" | "SAME_LOWER" => {
                    let o = (d as i64 + s - 1) / s;
                    let (b, e) = split_pad((o - 1) * s + span - d as i64, a.auto_pad == "SAME_UPPER");
                    p[i] = b;
                    p[i + 2] = e;
                    o
                }
                "VALID" => {
                    p[i] = 0;
                    p[i + 2] = 0;
                    (d as i64 - span) / s + 1
                }
                "NOTSET" | "" => (d as i64 + p[i] + p[i + 2] - span).div_euclid(s) + 1,
                other => return Err(format!("unknown auto_pad '{other}'")),
            };
            if o <= 0 {
                return Err(format!("input {x:?} is too small for kernel {w:?}"));
            }
            out[i] = o as usize;
        }
        let (c, m, g) = (x[1], w[0], a.group);
        if c % g != 0 || m % g != 0 || w[1] * g != c {
            return Err(format!("input channels {c}, weight {w:?} and group {g} do not agree"));
        }
        let geo = Geometry {
            n: x[0],
            c,
            h,
            w: wd,
            m,
            kh,
            kw,
            oh: out[0],
            ow: out[1],
            sh: sh as usize,
            sw: sw as usize,
            dh: dh as usize,
            dw: dw as usize,
            pt: p[0] as isize,
            pl: p[1] as isize,
        };
        Ok((geo, rank))
    }
}

/// Output index range `[lo, hi)` along one axis for which `o * s + off` lies in `[0, len)`.
pub(super) fn valid_range(off: isize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let s = s as isize;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = if len as isize - off <= 0 { 0 } else { (len as isize - off + s - 1) / s };
    let (lo, hi) = (lo.max(0) as usize, (hi.max(0) as usize).min(out));
    (lo.min(hi), hi)
}

/// Floats of output a column block of a Conv product holds (about 256 KiB: an L2-sized tile).
const COLUMN_BLOCK_FLOATS: usize = 64 * 1024;

qkernels::multiversion! {
    /// Unrolls the receptive fields of output rows `oys` of one group of one image into `col`
    /// ([c·kh·kw, oys.len()·ow]).
    fn im2col(x: &[f32], g: &Geometry, channels: usize, oys: std::ops::Range<usize>, col: &mut [f32]) {
        let ohw = oys.len() * g.ow;
        for c in 0..channels {
            let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = &mut col[((c * g.kh + ky) * g.kw + kx) * ohw..][..ohw];
                    let offx = kx as isize * g.dw as isize - g.pl;
                    let (xlo, xhi) = valid_range(offx, g.sw, g.w, g.ow);
                    for (i, oy) in oys.clone().enumerate() {
                        let dst = &mut row[i * g.ow..(i + 1) * g.ow];
                        let iy = (oy * g.sh) as isize - g.pt + (ky * g.dh) as isize;
                        if iy < 0 || iy >= g.h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        dst[..xlo].fill(0.0);
                        dst[xhi..].fill(0.0);
                        if xhi == xlo {
                            // No output of this row reads the input (kernel tap wholly in the
                            // padding); `start` would lie before the row.
                            continue;
                        }
                        if g.sw == 1 {
                            let start = (xlo as isize + offx) as usize;
                            dst[xlo..xhi].copy_from_slice(&src[start..start + (xhi - xlo)]);
                        } else if g.sw == 2 {
                            // Every other input: sixteen outputs at a time from arrays of fixed
                            // length (vector loads and shuffles, no bounds checks), the few
                            // remaining pairs one by one, then the last input alone.
                            let start = (xlo as isize * 2 + offx) as usize;
                            let Some((last, d)) = dst[xlo..xhi].split_last_mut() else { continue };
                            let pairs = &src[start..start + 2 * d.len()];
                            let (mut outs, mut ins) = (d.chunks_exact_mut(16), pairs.chunks_exact(32));
                            for (o, i) in outs.by_ref().zip(ins.by_ref()) {
                                let (o, i): (&mut [f32; 16], &[f32; 32]) =
                                    (o.try_into().expect("16 outputs"), i.try_into().expect("32 inputs"));
                                for j in 0..16 {
                                    o[j] = i[2 * j];
                                }
                            }
                            let rest = ins.remainder().chunks_exact(2);
                            for (o, pair) in outs.into_remainder().iter_mut().zip(rest) {
                                *o = pair[0];
                            }
                            *last = src[start + pairs.len()];
                        } else {
                            // Every sw-th input from `start`: the first of each whole sw-run, then
                            // the last one alone (it may have no full run left after it).
                            let start = (xlo as isize * g.sw as isize + offx) as usize;
                            let n = xhi - xlo;
                            let whole = n.min((src.len() - start) / g.sw);
                            let runs = src[start..].chunks_exact(g.sw);
                            for (d, run) in dst[xlo..xlo + whole].iter_mut().zip(runs) {
                                *d = run[0];
                            }
                            for i in whole..n {
                                dst[xlo + i] = src[start + i * g.sw];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Fills each channel plane of `out` with its bias.
fn fill_bias(out: &mut [f32], bias: Option<&[f32]>, plane: usize) {
    match bias {
        Some(b) => out.chunks_mut(plane).zip(b).for_each(|(p, &v)| p.fill(v)),
        None => out.fill(0.0),
    }
}

impl Conv {
    /// Computes one image: `x` is [c, h, w], `out` is [m, oh, ow], with the fused activation.
    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        act: Option<Activation>,
        g: &Geometry,
        ctx: &ExecCtx<'_>,
        out: &mut [f32],
    ) -> KernelResult<()> {
        let groups = self.0.group;
        let (cg, mg, ohw) = (g.c / groups, g.m / groups, g.oh * g.ow);
        let kk = cg * g.kh * g.kw;
        if groups == g.c && g.m == g.c {
            depthwise::image(&depthwise::Image { x, k: w, bias, act, g }, ctx, out);
            return Ok(());
        }
        let direct = g.kh == 1
            && g.kw == 1
            && g.sh == 1
            && g.sw == 1
            && g.pt == 0
            && g.pl == 0
            && g.oh == g.h
            && g.ow == g.w;
        let threads = ctx.threads;
        // Wide outputs (early CNN layers) on several threads: bands of output rows (columns of
        // the product) in parallel, from `threads · 512` columns up (on 28×28 planes, bands of
        // rows measured slower than bands of channels). Tall or small ones: bands of output
        // channels in parallel, after one im2col of the whole image. On one thread: bands of
        // output rows in sequence. Row bands unroll (im2col) only their own part of the input,
        // at most an L2-sized tile of it.
        let by_columns = threads > 1 && ohw >= mg && ohw >= threads * 512;
        let by_channels = threads > 1 && !by_columns && mg >= 2 * threads;
        let per_thread = if by_columns { g.oh.div_ceil(threads) } else { g.oh };
        let band =
            if direct { per_thread } else { (COLUMN_BLOCK_FLOATS / (kk * g.ow).max(1)).clamp(1, per_thread) };
        // im2col writes every element, so a recycled buffer will do.
        let mut col = (!direct && by_channels).then(|| ctx.pool.take(kk * ohw));
        for grp in 0..groups {
            let xg = &x[grp * cg * g.h * g.w..(grp + 1) * cg * g.h * g.w];
            let w_g = &w[grp * mg * kk..(grp + 1) * mg * kk];
            let dst = &mut out[grp * mg * ohw..(grp + 1) * mg * ohw];
            let bias_g = bias.map(|b| &b[grp * mg..(grp + 1) * mg]);
            let product = GroupProduct { w: w_g, bias: bias_g, act, epilogue: ctx.epilogue, kk, ohw };
            let out = SharedRows { ptr: dst.as_mut_ptr(), rows: mg, ohw };
            if by_channels {
                let src: &[f32] = match col.as_mut() {
                    None => xg,
                    Some(col) => {
                        im2col(xg, g, cg, 0..g.oh, col);
                        col
                    }
                };
                let band = mg.div_ceil(threads);
                (0..mg).into_par_iter().step_by(band).try_for_each(|r0| {
                    // SAFETY: the bands' row ranges are disjoint and `dst` is not otherwise
                    // accessed until they all finish.
                    unsafe { product.run(out, r0..(r0 + band).min(mg), 0..ohw, src, ohw) }
                })?;
                continue;
            }
            let rows_band = |oy0: usize| -> KernelResult<()> {
                let oys = oy0..(oy0 + band).min(g.oh);
                let cols = oys.start * g.ow..oys.end * g.ow;
                if direct {
                    // SAFETY: the bands' column ranges are disjoint and `dst` is not otherwise
                    // accessed until they all finish.
                    return unsafe { product.run(out, 0..mg, cols.clone(), &xg[cols.start..], ohw) };
                }
                let mut part = ctx.pool.take(kk * cols.len());
                im2col(xg, g, cg, oys, &mut part);
                // SAFETY: as above.
                let done = unsafe { product.run(out, 0..mg, cols.clone(), &part, cols.len()) };
                ctx.pool.put(part);
                done
            };
            if by_columns {
                (0..g.oh).into_par_iter().step_by(band).try_for_each(rows_band)?;
            } else {
                (0..g.oh).step_by(band).try_for_each(rows_band)?;
            }
        }
        if let Some(col) = col {
            ctx.pool.put(col);
        }
        Ok(())
    }
}

/// One group's product `out[r, :] = epilogue(act(bias[r] + w[r, :] · src))`, `w` [rows, kk]
/// against `src` [kk, ohw] (which [`GroupProduct::run`] gets in parts).
struct GroupProduct<'a> {
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    act: Option<Activation>,
    epilogue: Option<crate::hook::Epilogue<'a>>,
    kk: usize,
    ohw: usize,
}

/// A [rows, ohw] output that threads share, each computing a disjoint block of it.
#[derive(Clone, Copy)]
struct SharedRows {
    ptr: *mut f32,
    rows: usize,
    ohw: usize,
}

// SAFETY: the pointer is only written through `GroupProduct::run`, whose callers give each thread
// a disjoint block of the output.
unsafe impl Send for SharedRows {}
// SAFETY: as above.
unsafe impl Sync for SharedRows {}

impl GroupProduct<'_> {
    /// Computes rows `rows` × columns `cols` of `out`, single-threaded, in column blocks small
    /// enough that each block's bias, product, activation and epilogue happen while it is in
    /// cache. `src` holds the columns `cols` of the source, row stride `src_rs`.
    ///
    /// # Safety
    /// `out.ptr` is valid for `out.rows × out.ohw` elements, and nothing else reads or writes the
    /// block `rows × cols` of it during the call.
    unsafe fn run(
        &self,
        out: SharedRows,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        src: &[f32],
        src_rs: usize,
    ) -> KernelResult<()> {
        let (kk, ohw) = (self.kk, self.ohw);
        if rows.end > out.rows || cols.end > ohw || out.ohw != ohw || self.w.len() < rows.end * kk {
            return Err("internal: conv product block outside its output".into());
        }
        let m = rows.len();
        let block = (COLUMN_BLOCK_FLOATS / m.max(1)).clamp(64, ohw.max(64)).next_multiple_of(16);
        let lhs = MatRef { data: &self.w[rows.start * kk..rows.end * kk], rs: kk, cs: 1 };
        let (lo, hi) = Activation::bounds(self.act);
        let first = rows.start * ohw;
        for c0 in cols.clone().step_by(block) {
            let n = block.min(cols.end - c0);
            let rhs = MatRef { data: src.get(c0 - cols.start..).unwrap_or_default(), rs: src_rs, cs: 1 };
            let len = (out.rows * ohw).saturating_sub(first + c0);
            // SAFETY: the block starts inside the output (checked above) with `len` elements
            // after it; the caller gives this call the rows × cols block alone.
            unsafe {
                sgemm_into(
                    m,
                    n,
                    kk,
                    lhs,
                    rhs,
                    1.0,
                    out.ptr.add(first + c0),
                    len,
                    ohw,
                    false,
                    gemm::Parallelism::None,
                )?
            };
            if self.bias.is_none() && self.act.is_none() && self.epilogue.is_none() {
                continue;
            }
            for r in rows.clone() {
                // SAFETY: row `r`'s columns `c0..c0 + n` lie in this call's block.
                let row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * ohw + c0), n) };
                if self.bias.is_some() || self.act.is_some() {
                    bias_clamp(row, self.bias.map_or(0.0, |b| b[r]), lo, hi);
                }
                if let Some(f) = self.epilogue {
                    f(row);
                }
            }
        }
        Ok(())
    }
}

qkernels::multiversion! {
    /// `v = clamp(v + bias, lo, hi)` over a row (NaN stays NaN).
    fn bias_clamp(row: &mut [f32], bias: f32, lo: f32, hi: f32) {
        row.iter_mut().for_each(|v| *v = super::clamp_keep_nan(*v + bias, lo, hi));
    }
}

/// Runs `f(image, out_chunk)` for every image, in parallel across images when there are several
/// and threads to spare (each image then single-threaded).
fn per_image(
    ctx: &ExecCtx<'_>,
    out: &mut [f32],
    per: usize,
    f: impl Fn(usize, &mut [f32], &ExecCtx<'_>) -> KernelResult<()> + Sync + Send,
) -> KernelResult<()> {
    let images = out.len() / per.max(1);
    if ctx.threads > 1 && images > 1 {
        let single = ctx.single_threaded();
        out.par_chunks_mut(per).enumerate().try_for_each(|(i, o)| f(i, o, &single))
    } else {
        out.chunks_mut(per.max(1)).enumerate().try_for_each(|(i, o)| f(i, o, ctx))
    }
}

/// What `Conv` and `ConvTranspose` share around their per-image computation: operands, the
/// geometry, the bias check, the output buffer, the split across images and the output shape.
/// `image(x, w, bias, geometry, ctx, out)` computes one image ([c, h, w] → [m, oh, ow]).
fn convolve(
    inputs: &mut [Option<Tensor>],
    ctx: &ExecCtx<'_>,
    geometry: impl Fn(&[usize], &[usize]) -> KernelResult<(Geometry, usize)>,
    image: impl Fn(&[f32], &[f32], Option<&[f32]>, &Geometry, &ExecCtx<'_>, &mut [f32]) -> KernelResult<()>
    + Sync
    + Send,
) -> KernelResult<Vec<Tensor>> {
    let (tx, tw) = (input(inputs, 0)?, input(inputs, 1)?);
    let (g, rank) = geometry(tx.shape(), tw.shape())?;
    let (x, w) = (f32_data(tx)?, f32_data(tw)?);
    let bias = opt_input(inputs, 2).map(f32_data).transpose()?;
    if let Some(b) = bias.as_ref().filter(|b| b.len() != g.m) {
        return Err(format!("bias has {} values for {} output channels", b.len(), g.m));
    }
    ctx.checked_len(&[g.n, g.m, g.oh, g.ow], 4)?;
    let per = g.m * g.oh * g.ow;
    let mut out = ctx.pool.take(g.n * per);
    let plane = g.c * g.h * g.w;
    per_image(ctx, &mut out, per, |i, o, ctx| {
        image(&x[i * plane..(i + 1) * plane], &w, bias.as_deref(), &g, ctx, o)
    })?;
    let shape: Vec<usize> = if rank == 1 { vec![g.n, g.m, g.ow] } else { vec![g.n, g.m, g.oh, g.ow] };
    Ok(vec![out.into_tensor(&shape)?])
}

impl ConvAttrs {
    /// The attributes as the N-D kernels read them.
    pub(super) fn nd(&self) -> NdAttrs<'_> {
        NdAttrs {
            group: self.group,
            kernel: self.kernel.as_deref(),
            strides: self.strides.as_deref(),
            dilations: self.dilations.as_deref(),
            pads: self.pads.as_deref(),
            auto_pad: &self.auto_pad,
            output_padding: self.output_padding.as_deref(),
            output_shape: self.output_shape.as_deref(),
        }
    }
}

/// Whether the node's data input has three or more spatial dims.
fn is_nd(inputs: &[Option<Tensor>]) -> bool {
    inputs.first().and_then(Option::as_ref).is_some_and(|x| x.shape().len() > 4)
}

impl Kernel for Conv {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        fused: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        if is_nd(inputs) {
            return conv_nd::run(&self.0.nd(), false, inputs, ctx, fused);
        }
        convolve(
            inputs,
            ctx,
            |x, w| self.geometry(x, w),
            |x, w, bias, g, ctx, out| self.image(x, w, bias, fused, g, ctx, out),
        )
    }

    fn fuses_activation(&self) -> bool {
        true
    }

    fn applies_epilogue(&self) -> bool {
        true
    }
}

/// `ConvTranspose`.
struct ConvTranspose(ConvAttrs);

impl ConvTranspose {
    fn geometry(&self, x: &[usize], w: &[usize]) -> KernelResult<(Geometry, usize)> {
        let a = &self.0;
        let (rank, [h, wd]) = ConvAttrs::spatial(x)?;
        if w.len() != x.len() || w[0] != x[1] || x[1] % a.group != 0 {
            return Err(format!(
                "weight shape {w:?} does not match input shape {x:?} with group {}",
                a.group
            ));
        }
        let (kh, kw) = if rank == 1 { (1, w[2]) } else { (w[2], w[3]) };
        if kh == 0 || kw == 0 || h == 0 || wd == 0 {
            return Err(format!("empty input {x:?} or kernel {w:?}"));
        }
        let [sh, sw] = ConvAttrs::pair(&a.strides, rank, 1)?;
        let [dh, dw] = ConvAttrs::pair(&a.dilations, rank, 1)?;
        let [oph, opw] = ConvAttrs::pair(&a.output_padding, rank, 0)?;
        if sh <= 0 || sw <= 0 || dh <= 0 || dw <= 0 {
            return Err("strides and dilations must be positive".into());
        }
        let mut p = a.pads4(rank)?;
        let target =
            a.output_shape.as_ref().map(|s| ConvAttrs::pair(&Some(s.clone()), rank, 1)).transpose()?;
        let dims = [(h, kh, sh, dh, oph), (wd, kw, sw, dw, opw)];
        let mut out = [0usize; 2];
        for (i, &(d, k, s, dil, op)) in dims.iter().enumerate() {
            let full = s * (d as i64 - 1) + op + (k as i64 - 1) * dil + 1;
            let auto = a.auto_pad.as_str();
            let o = match (target, auto) {
                (Some(t), _) => {
                    let (b, e) = split_pad(full - t[i], auto != "SAME_LOWER");
                    (p[i], p[i + 2]) = (b, e);
                    t[i]
                }
                (None, "SAME_UPPER" | "SAME_LOWER") => {
                    let o = d as i64 * s;
                    let (b, e) = split_pad(full - o, auto == "SAME_UPPER");
                    (p[i], p[i + 2]) = (b, e);
                    o
                }
                (None, _) => full - p[i] - p[i + 2],
            };
            if o <= 0 {
                return Err(format!("ConvTranspose output dim {o} is not positive"));
            }
            out[i] = o as usize;
        }
        let geo = Geometry {
            n: x[0],
            c: x[1],
            h,
            w: wd,
            m: w[1] * a.group,
            kh,
            kw,
            oh: out[0],
            ow: out[1],
            sh: sh as usize,
            sw: sw as usize,
            dh: dh as usize,
            dw: dw as usize,
            pt: p[0] as isize,
            pl: p[1] as isize,
        };
        Ok((geo, rank))
    }

    fn image(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        g: &Geometry,
        ctx: &ExecCtx<'_>,
        out: &mut [f32],
    ) -> KernelResult<()> {
        let groups = self.0.group;
        let (cg, mg, hw, ohw) = (g.c / groups, g.m / groups, g.h * g.w, g.oh * g.ow);
        let rows = mg * g.kh * g.kw;
        fill_bias(out, bias, ohw);
        let mut col = vec![0f32; rows * hw];
        for grp in 0..groups {
            let wg = &w[grp * cg * rows..(grp + 1) * cg * rows];
            let xg = &x[grp * cg * hw..(grp + 1) * cg * hw];
            sgemm(
                rows,
                hw,
                cg,
                MatRef { data: wg, rs: 1, cs: rows },
                MatRef { data: xg, rs: hw, cs: 1 },
                1.0,
                &mut col,
                hw,
                false,
                ctx.gemm_parallelism(),
            )?;
            let dst = &mut out[grp * mg * ohw..(grp + 1) * mg * ohw];
            for (r, src) in col.chunks(hw).enumerate() {
                let (mo, ky, kx) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
                let plane = &mut dst[mo * ohw..(mo + 1) * ohw];
                for iy in 0..g.h {
                    let oy = (iy * g.sh + ky * g.dh) as isize - g.pt;
                    if oy < 0 || oy >= g.oh as isize {
                        continue;
                    }
                    for ix in 0..g.w {
                        let ox = (ix * g.sw + kx * g.dw) as isize - g.pl;
                        if ox >= 0 && ox < g.ow as isize {
                            plane[oy as usize * g.ow + ox as usize] += src[iy * g.w + ix];
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Kernel for ConvTranspose {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        fused: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        if is_nd(inputs) {
            return conv_nd::run(&self.0.nd(), true, inputs, ctx, fused);
        }
        convolve(
            inputs,
            ctx,
            |x, w| self.geometry(x, w),
            |x, w, bias, g, ctx, out| {
                self.image(x, w, bias, g, ctx, out)?;
                if let Some(act) = fused {
                    act.apply(out);
                }
                Ok(())
            },
        )
    }

    fn fuses_activation(&self) -> bool {
        true
    }
}

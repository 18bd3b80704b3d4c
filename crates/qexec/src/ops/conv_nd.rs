//! `Conv` and `ConvTranspose` over three or more spatial dims (video and volumetric models):
//! the window geometry per axis, an N-D im2col (Conv) or col2im (ConvTranspose) walked
//! odometer-style, and the same `gemm` product as the 2-D kernels, one group at a time; and the
//! `Col2Im` op, the same col2im on its own.

use qgraph::Tensor;

use super::conv::split_pad;
use super::matmul::{MatRef, sgemm};
use super::{Activation, ExecCtx, f32_data, input, opt_input};
use crate::error::KernelResult;

/// The attributes of a convolution node, as the N-D kernels read them.
pub(super) struct NdAttrs<'a> {
    pub group: usize,
    pub kernel: Option<&'a [i64]>,
    pub strides: Option<&'a [i64]>,
    pub dilations: Option<&'a [i64]>,
    pub pads: Option<&'a [i64]>,
    pub auto_pad: &'a str,
    pub output_padding: Option<&'a [i64]>,
    pub output_shape: Option<&'a [i64]>,
}

/// One spatial axis: input length, kernel, stride, dilation, leading pad and output length.
#[derive(Debug, Clone, Copy)]
pub(super) struct Axis {
    pub len: usize,
    pub k: usize,
    pub s: usize,
    pub d: usize,
    pub pad: i64,
    pub out: usize,
}

fn per_axis(v: Option<&[i64]>, n: usize, default: i64, what: &str) -> KernelResult<Vec<i64>> {
    match v {
        None => Ok(vec![default; n]),
        Some(v) if v.len() == n => Ok(v.to_vec()),
        Some(v) => Err(format!("{what} {v:?} does not match {n} spatial dims")),
    }
}

/// The spatial axes of a convolution (`transpose`: of a ConvTranspose, whose `out` is the
/// output length and `len` the input length).
pub(super) fn axes(a: &NdAttrs<'_>, x: &[usize], w: &[usize], transpose: bool) -> KernelResult<Vec<Axis>> {
    let n = x.len() - 2;
    if w.len() != x.len() {
        return Err(format!("weight shape {w:?} does not match input shape {x:?}"));
    }
    let kernel: Vec<usize> = w[2..].to_vec();
    if kernel.contains(&0) || x[2..].contains(&0) {
        return Err(format!("empty input {x:?} or kernel {w:?}"));
    }
    if let Some(k) = a.kernel
        && k.iter().map(|&v| v as usize).ne(kernel.iter().copied())
    {
        return Err(format!("kernel_shape {k:?} does not match weight shape {w:?}"));
    }
    let s = per_axis(a.strides, n, 1, "strides")?;
    let d = per_axis(a.dilations, n, 1, "dilations")?;
    let p = per_axis(a.pads, 2 * n, 0, "pads")?;
    let op = per_axis(a.output_padding, n, 0, "output_padding")?;
    let target = a.output_shape.map(|t| per_axis(Some(t), n, 1, "output_shape")).transpose()?;
    if s.iter().chain(&d).any(|&v| v <= 0) {
        return Err("strides and dilations must be positive".into());
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (len, k) = (x[i + 2] as i64, kernel[i] as i64);
        let span = (k - 1) * d[i] + 1;
        let (pb, pe) = (p[i], p[i + n]);
        // (output length, leading pad)
        let (o, pad) = if transpose {
            let full = s[i] * (len - 1) + op[i] + span;
            match (&target, a.auto_pad) {
                (Some(t), auto) => (t[i], split_pad(full - t[i], auto != "SAME_LOWER").0),
                (None, "SAME_UPPER" | "SAME_LOWER") => {
                    let o = len * s[i];
                    (o, split_pad(full - o, a.auto_pad == "SAME_UPPER").0)
                }
                (None, _) => (full - pb - pe, pb),
            }
        } else {
            match a.auto_pad {
                "SAME_UPPER" | "SAME_LOWER" => {
                    let o = (len + s[i] - 1) / s[i];
                    (o, split_pad((o - 1) * s[i] + span - len, a.auto_pad == "SAME_UPPER").0)
                }
                "VALID" => ((len - span) / s[i] + 1, 0),
                "NOTSET" | "" => ((len + pb + pe - span).div_euclid(s[i]) + 1, pb),
                other => return Err(format!("unknown auto_pad '{other}'")),
            }
        };
        if o <= 0 {
            return Err(format!("input {x:?} and kernel {w:?} give an output dim of {o}"));
        }
        out.push(Axis {
            len: len as usize,
            k: k as usize,
            s: s[i] as usize,
            d: d[i] as usize,
            pad,
            out: o as usize,
        });
    }
    Ok(out)
}

/// Calls `f(kernel_offset, input_offset_or_none, output_index)` for every kernel cell and output
/// cell: `input` is the flat index of the input cell the pair reads (None in the padding).
pub(super) fn walk(axes: &[Axis], mut f: impl FnMut(usize, Option<usize>, usize)) {
    let n = axes.len();
    let kernel_cells: usize = axes.iter().map(|a| a.k).product();
    let out_cells: usize = axes.iter().map(|a| a.out).product();
    let (mut k_idx, mut o_idx) = (vec![0usize; n], vec![0usize; n]);
    for kc in 0..kernel_cells {
        o_idx.iter_mut().for_each(|v| *v = 0);
        for oc in 0..out_cells {
            let mut flat = 0usize;
            let mut inside = true;
            for i in 0..n {
                let a = &axes[i];
                let at = (o_idx[i] * a.s + k_idx[i] * a.d) as i64 - a.pad;
                if at < 0 || at >= a.len as i64 {
                    inside = false;
                    break;
                }
                flat = flat * a.len + at as usize;
            }
            f(kc, inside.then_some(flat), oc);
            for i in (0..n).rev() {
                o_idx[i] += 1;
                if o_idx[i] < axes[i].out {
                    break;
                }
                o_idx[i] = 0;
            }
        }
        for i in (0..n).rev() {
            k_idx[i] += 1;
            if k_idx[i] < axes[i].k {
                break;
            }
            k_idx[i] = 0;
        }
    }
}

/// `Conv` (`transpose` false) or `ConvTranspose` over three or more spatial dims.
pub(super) fn run(
    a: &NdAttrs<'_>,
    transpose: bool,
    inputs: &mut [Option<Tensor>],
    ctx: &ExecCtx<'_>,
    fused: Option<Activation>,
) -> KernelResult<Vec<Tensor>> {
    let (tx, tw) = (input(inputs, 0)?, input(inputs, 1)?);
    let (xs, ws) = (tx.shape().to_vec(), tw.shape().to_vec());
    let axes = axes(a, &xs, &ws, transpose)?;
    let g = a.group;
    let (n, c) = (xs[0], xs[1]);
    let m = if transpose { ws[1] * g } else { ws[0] };
    if c % g != 0 || m % g != 0 || (!transpose && ws[1] * g != c) || (transpose && ws[0] != c) {
        return Err(format!("input {xs:?}, weight {ws:?} and group {g} do not agree"));
    }
    let (x, w) = (f32_data(tx)?, f32_data(tw)?);
    let bias = opt_input(inputs, 2).map(f32_data).transpose()?;
    if let Some(b) = bias.as_ref().filter(|b| b.len() != m) {
        return Err(format!("bias has {} values for {m} output channels", b.len()));
    }
    let (cg, mg) = (c / g, m / g);
    let kernel_cells: usize = axes.iter().map(|a| a.k).product();
    let in_cells: usize = axes.iter().map(|a| a.len).product();
    let out_cells: usize = axes.iter().map(|a| a.out).product();
    let mut out_shape = vec![n, m];
    out_shape.extend(axes.iter().map(|a| a.out));
    let total = ctx.checked_len(&out_shape, 4)?;
    let mut out = vec![0f32; total];
    let par = ctx.gemm_parallelism();
    if transpose {
        // col[mg·K, in] = Wᵀ · x, then each column cell adds into the output cell it reaches.
        let rows = mg * kernel_cells;
        ctx.checked_len(&[rows, in_cells], 4)?;
        let mut col = vec![0f32; rows * in_cells];
        // For ConvTranspose the walk runs with input and output swapped: output cells are read
        // positions of the transposed view, so axes are mirrored.
        let mirrored: Vec<Axis> = axes
            .iter()
            .map(|ax| Axis { len: ax.out, k: ax.k, s: ax.s, d: ax.d, pad: ax.pad, out: ax.len })
            .collect();
        for img in 0..n {
            for grp in 0..g {
                let wg = &w[grp * cg * rows..(grp + 1) * cg * rows];
                let xg = &x[(img * c + grp * cg) * in_cells..(img * c + (grp + 1) * cg) * in_cells];
                sgemm(
                    rows,
                    in_cells,
                    cg,
                    MatRef { data: wg, rs: 1, cs: rows },
                    MatRef { data: xg, rs: in_cells, cs: 1 },
                    1.0,
                    &mut col,
                    in_cells,
                    false,
                    par,
                )?;
                let dst = &mut out[(img * m + grp * mg) * out_cells..(img * m + (grp + 1) * mg) * out_cells];
                walk(&mirrored, |kc, at, ic| {
                    if let Some(oc) = at {
                        for mo in 0..mg {
                            dst[mo * out_cells + oc] += col[(mo * kernel_cells + kc) * in_cells + ic];
                        }
                    }
                });
            }
        }
    } else {
        // col[cg·K, out] gathered from the input, then out[mg, out] = W · col.
        let rows = cg * kernel_cells;
        ctx.checked_len(&[rows, out_cells], 4)?;
        let mut col = vec![0f32; rows * out_cells];
        for img in 0..n {
            for grp in 0..g {
                let xg = &x[(img * c + grp * cg) * in_cells..(img * c + (grp + 1) * cg) * in_cells];
                col.iter_mut().for_each(|v| *v = 0.0);
                walk(&axes, |kc, at, oc| {
                    if let Some(ic) = at {
                        for ch in 0..cg {
                            col[(ch * kernel_cells + kc) * out_cells + oc] = xg[ch * in_cells + ic];
                        }
                    }
                });
                let wg = &w[grp * mg * rows..(grp + 1) * mg * rows];
                let dst = &mut out[(img * m + grp * mg) * out_cells..(img * m + (grp + 1) * mg) * out_cells];
                sgemm(
                    mg,
                    out_cells,
                    rows,
                    MatRef { data: wg, rs: rows, cs: 1 },
                    MatRef { data: &col, rs: out_cells, cs: 1 },
                    1.0,
                    dst,
                    out_cells,
                    false,
                    par,
                )?;
            }
        }
    }
    if let Some(b) = bias.as_deref() {
        for (plane, v) in out.chunks_mut(out_cells.max(1)).enumerate() {
            let k = b[plane % m];
            v.iter_mut().for_each(|x| *x += k);
        }
    }
    if let Some(act) = fused {
        act.apply(&mut out);
    }
    if let Some(epilogue) = ctx.epilogue {
        epilogue(&mut out);
    }
    Ok(vec![super::tensor_from(&out_shape, out)?])
}

/// `Col2Im`: columns `[N, C·∏block, L]` summed back into images `[N, C, image…]`.
pub(super) struct Col2Im {
    pub dilations: Option<Vec<i64>>,
    pub pads: Option<Vec<i64>>,
    pub strides: Option<Vec<i64>>,
}

impl super::Kernel for Col2Im {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tx, ti, tb) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
        let (image, block) = (super::ints_of(ti)?, super::ints_of(tb)?);
        let xs = tx.shape();
        if xs.len() != 3 || image.len() != block.len() || image.is_empty() {
            return Err(format!("input {xs:?}, image {image:?} and block {block:?} do not agree"));
        }
        let image = ctx.checked_shape(&image, 4)?;
        let block = ctx.checked_shape(&block, 4)?;
        let kernel_cells: usize = block.iter().product();
        if kernel_cells == 0 || xs[1] % kernel_cells != 0 {
            return Err(format!("{} column rows do not split into blocks of {kernel_cells}", xs[1]));
        }
        let (n, c) = (xs[0], xs[1] / kernel_cells);
        let mut image_shape = vec![n, c];
        image_shape.extend(&image);
        let mut weight_shape = vec![1, c];
        weight_shape.extend(&block);
        let attrs = NdAttrs {
            group: 1,
            kernel: None,
            strides: self.strides.as_deref(),
            dilations: self.dilations.as_deref(),
            pads: self.pads.as_deref(),
            auto_pad: "NOTSET",
            output_padding: None,
            output_shape: None,
        };
        let geometry = axes(&attrs, &image_shape, &weight_shape, false)?;
        let blocks: usize = geometry.iter().map(|a| a.out).product();
        if xs[2] != blocks {
            return Err(format!("{} columns for {blocks} block positions", xs[2]));
        }
        let total = ctx.checked_len(&image_shape, 4)?;
        let in_cells: usize = image.iter().product();
        let x = f32_data(tx)?;
        let mut out = vec![0f32; total];
        for img in 0..n {
            for ch in 0..c {
                let dst = &mut out[(img * c + ch) * in_cells..][..in_cells];
                let src = &x[(img * c + ch) * kernel_cells * blocks..][..kernel_cells * blocks];
                walk(&geometry, |kc, at, oc| {
                    if let Some(i) = at {
                        dst[i] += src[kc * blocks + oc];
                    }
                });
            }
        }
        Ok(vec![super::tensor_from(&image_shape, out)?])
    }
}

//! `DeformConv` (2-D): each kernel tap reads the input at its regular position plus a learned
//! offset, bilinearly interpolated (zero outside the image, as the ONNX reference and
//! torchvision's `deform_conv2d` read it), optionally scaled by a mask; the taps gathered into
//! columns, one `sgemm` per group.

use qgraph::{Node, Tensor};

use super::matmul::{MatRef, sgemm};
use super::{Activation, ExecCtx, Kernel, f32_data, input, opt_input, tensor_from};
use crate::error::{KernelResult, Result};

pub(super) struct DeformConv {
    group: usize,
    offset_group: usize,
    strides: [usize; 2],
    dilations: [usize; 2],
    /// Top, left, bottom, right.
    pads: [usize; 4],
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    if node.op_type != "DeformConv" {
        return None;
    }
    Some((|| {
        super::check_size_attributes(node, &["kernel_shape", "strides", "dilations", "pads"])?;
        let positive = |name: &str, default: i64| -> Result<usize> {
            let v = node.int_attr(name, default)?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| super::invalid(node, format!("{name} {v} is not positive")))
        };
        let pair = |name: &str, default: i64, len: usize| -> Result<Vec<usize>> {
            let v = node.ints_attr(name)?.map(<[i64]>::to_vec).unwrap_or_else(|| vec![default; len]);
            if v.len() != len || v.iter().any(|&x| x < 0) {
                return Err(super::invalid(node, format!("{name} {v:?} is not {len} non-negative values")));
            }
            Ok(v.iter().map(|&x| x as usize).collect())
        };
        let (s, d, p) = (pair("strides", 1, 2)?, pair("dilations", 1, 2)?, pair("pads", 0, 4)?);
        if s.contains(&0) || d.contains(&0) {
            return Err(super::invalid(node, "strides and dilations must be positive"));
        }
        Ok(Box::new(DeformConv {
            group: positive("group", 1)?,
            offset_group: positive("offset_group", 1)?,
            strides: [s[0], s[1]],
            dilations: [d[0], d[1]],
            pads: [p[0], p[1], p[2], p[3]],
        }) as Box<dyn Kernel>)
    })())
}

/// `plane` (h × w) at the fractional position (y, x), bilinear, zero outside.
fn sample(plane: &[f32], h: usize, w: usize, y: f32, x: f32) -> f32 {
    if y <= -1.0 || y >= h as f32 || x <= -1.0 || x >= w as f32 {
        return 0.0;
    }
    let (y0, x0) = (y.floor(), x.floor());
    let (ly, lx) = (y - y0, x - x0);
    let at = |yy: f32, xx: f32| -> f32 {
        if yy < 0.0 || xx < 0.0 || yy >= h as f32 || xx >= w as f32 {
            0.0
        } else {
            plane[yy as usize * w + xx as usize]
        }
    };
    (1.0 - ly) * (1.0 - lx) * at(y0, x0)
        + (1.0 - ly) * lx * at(y0, x0 + 1.0)
        + ly * (1.0 - lx) * at(y0 + 1.0, x0)
        + ly * lx * at(y0 + 1.0, x0 + 1.0)
}

impl Kernel for DeformConv {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tx, tw, toff) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
        let (&[n, c, h, w], &[m, cg, kh, kw]) = (tx.shape(), tw.shape()) else {
            return Err(format!("input {:?} and weight {:?} must be 4-D", tx.shape(), tw.shape()));
        };
        let (g, og) = (self.group, self.offset_group);
        if c != cg * g || m % g != 0 || c % og != 0 || kh == 0 || kw == 0 {
            return Err(format!(
                "input {:?}, weight {:?}, group {g} and offset_group {og} do not agree",
                tx.shape(),
                tw.shape()
            ));
        }
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        let [pt, pl, pb, pr] = self.pads;
        let out_len = |len: usize, pads: usize, k: usize, d: usize, s: usize| -> KernelResult<usize> {
            let span = (k - 1) * d + 1;
            (len + pads)
                .checked_sub(span)
                .map(|v| v / s + 1)
                .ok_or_else(|| format!("input dim {len} is smaller than the kernel span {span}"))
        };
        let (oh, ow) = (out_len(h, pt + pb, kh, dh, sh)?, out_len(w, pl + pr, kw, dw, sw)?);
        let k = kh * kw;
        if toff.shape() != [n, og * 2 * k, oh, ow] {
            return Err(format!("offset {:?} should be {:?}", toff.shape(), [n, og * 2 * k, oh, ow]));
        }
        let mask = opt_input(inputs, 4).map(f32_data).transpose()?;
        if let Some(msk) = &mask
            && msk.len() != n * og * k * oh * ow
        {
            return Err(format!("mask has {} values, expected {}", msk.len(), n * og * k * oh * ow));
        }
        let bias = opt_input(inputs, 3).map(f32_data).transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != m) {
            return Err(format!("bias has {} values for {m} output channels", bias.map_or(0, |b| b.len())));
        }
        let shape = [n, m, oh, ow];
        let total = ctx.checked_len(&shape, 4)?;
        let cells = oh * ow;
        ctx.checked_len(&[c * k, cells], 4)?;
        let (x, wt, off) = (f32_data(tx)?, f32_data(tw)?, f32_data(toff)?);
        let mut out = vec![0f32; total];
        let mut col = vec![0f32; c * k * cells];
        let per_offset_group = c / og;
        for img in 0..n {
            for ch in 0..c {
                let plane = &x[(img * c + ch) * h * w..][..h * w];
                let grp = ch / per_offset_group;
                for tap in 0..k {
                    let (i, j) = (tap / kw, tap % kw);
                    let dy = &off[((img * og + grp) * 2 * k + 2 * tap) * cells..][..cells];
                    let dx = &off[((img * og + grp) * 2 * k + 2 * tap + 1) * cells..][..cells];
                    let row = &mut col[(ch * k + tap) * cells..][..cells];
                    for (cell, v) in row.iter_mut().enumerate() {
                        let (yo, xo) = (cell / ow, cell % ow);
                        let y = (yo * sh + i * dh) as f32 - pt as f32 + dy[cell];
                        let xx = (xo * sw + j * dw) as f32 - pl as f32 + dx[cell];
                        let scale =
                            mask.as_ref().map_or(1.0, |msk| msk[((img * og + grp) * k + tap) * cells + cell]);
                        *v = sample(plane, h, w, y, xx) * scale;
                    }
                }
            }
            let mg = m / g;
            for grp in 0..g {
                let rows = cg * k;
                let dst = &mut out[(img * m + grp * mg) * cells..][..mg * cells];
                sgemm(
                    mg,
                    cells,
                    rows,
                    MatRef { data: &wt[grp * mg * rows..(grp + 1) * mg * rows], rs: rows, cs: 1 },
                    MatRef { data: &col[grp * rows * cells..(grp + 1) * rows * cells], rs: cells, cs: 1 },
                    1.0,
                    dst,
                    cells,
                    false,
                    ctx.gemm_parallelism(),
                )?;
            }
        }
        if let Some(b) = bias.as_deref() {
            for (p, v) in out.chunks_mut(cells.max(1)).enumerate() {
                v.iter_mut().for_each(|x| *x += b[p % m]);
            }
        }
        Ok(vec![tensor_from(&shape, out)?])
    }
}

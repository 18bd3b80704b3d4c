//! A layer's reconstruction objective in one fused pass — AdaRound's inner step: the product,
//! the activation, AIMET's channel MSE against a target and the weight's gradient, computed
//! block of columns by block of columns so every intermediate stays in cache, the blocks shared
//! between threads (each with its own gradient, summed at the end).

use qexec::{MatRef, Parallelism, sgemm};
use rayon::prelude::*;

use super::{Columns, Linear, PlaneLayout, depthwise_channel, depthwise_channel_grad, product_error};
use crate::activation::Activation;
use crate::error::Result;
use crate::loss::{clipped_row, error_row};

/// Floats the intermediates of one block should hold (they stay in the core's cache).
const BLOCK_FLOATS: usize = 1 << 16;

impl Linear {
    /// AIMET's reconstruction loss of weights `w` (and `bias`) on `cols` against the channel-major
    /// `target`, taken after `act`; with `dw`, also writes its gradient by the weight.
    pub fn reconstruction(
        &self,
        w: &[f32],
        bias: Option<&[f32]>,
        act: Option<&Activation>,
        cols: &Columns,
        target: &[f32],
        mut dw: Option<&mut [f32]>,
    ) -> Result<f64> {
        let (c, m, k) = (self.out_channels, cols.m, self.k);
        self.check("weight", w.len(), c * k)?;
        self.check("target", target.len(), c * m)?;
        if let Some(b) = bias {
            self.check("bias", b.len(), c)?;
        }
        if let Some(d) = dw.as_deref() {
            self.check("weight gradient", d.len(), c * k)?;
        }
        // Blocks: whole samples for depthwise planes, else any run of columns.
        let unit = self.depthwise().map_or(1, |g| g.positions()).max(1);
        let per_column = (k + 2 * c).max(1);
        let block = (BLOCK_FLOATS / per_column).max(64).div_ceil(unit) * unit;
        let blocks = m.div_ceil(block.max(1));
        let threads = if self.threads > 1 && blocks >= 2 && c * k * m >= 1 << 18 {
            self.threads.min(blocks)
        } else {
            1
        };
        let per_thread = blocks.div_ceil(threads);
        let want_grad = dw.is_some();
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        scratch.resize_with(threads, Vec::new);
        for (i, buffer) in scratch.iter_mut().enumerate() {
            // The block's output and the loss's scratch; thread 0 sums into `dw` itself, the
            // others need their own gradient.
            let len = 3 * c * block + if want_grad && i > 0 { c * k } else { 0 };
            buffer.resize(len, 0.0);
        }
        let run = |(t, buffer): (usize, &mut Vec<f32>), dw: Option<&mut [f32]>| -> Result<f64> {
            let (y, rest) = buffer.split_at_mut(c * block);
            let (out, rest) = rest.split_at_mut(c * block);
            let (loss_grad, own) = rest.split_at_mut(c * block);
            let grad: Option<&mut [f32]> = if t == 0 {
                dw
            } else if want_grad {
                Some(own)
            } else {
                None
            };
            let mut grad = grad;
            if let Some(g) = grad.as_deref_mut() {
                g.fill(0.0);
            }
            let mut loss = 0.0f64;
            for b in t * per_thread..((t + 1) * per_thread).min(blocks) {
                let (m0, m1) = (b * block, ((b + 1) * block).min(m));
                let width = m1 - m0;
                let y = &mut y[..c * width];
                self.block_forward(w, cols, m0, m1, y)?;
                let (out, loss_grad) = (&mut out[..c * width], &mut loss_grad[..c * width]);
                loss += block_loss(act, bias, y, target, (m, m0, width), out, loss_grad);
                if let Some(g) = grad.as_deref_mut() {
                    self.block_weight_grad(y, cols, m0, m1, g)?;
                }
            }
            Ok(loss)
        };
        let (first, rest) = scratch.split_at_mut(1);
        let mut loss = 0.0;
        if threads > 1 {
            let (l0, others) = rayon::join(
                || run((0, &mut first[0]), dw.as_deref_mut()),
                || {
                    rest.par_iter_mut()
                        .enumerate()
                        .map(|(i, b)| run((i + 1, b), None))
                        .collect::<Result<Vec<f64>>>()
                },
            );
            loss += l0?;
            loss += others?.iter().sum::<f64>();
            if let Some(d) = dw.as_deref_mut() {
                for b in rest.iter() {
                    d.iter_mut().zip(&b[3 * c * block..]).for_each(|(a, g)| *a += g);
                }
            }
        } else {
            loss = run((0, &mut first[0]), dw)?;
        }
        Ok(loss / m.max(1) as f64)
    }

    /// `y[C, m1 − m0] = W·cols[:, m0..m1]` (no bias).
    fn block_forward(&self, w: &[f32], cols: &Columns, m0: usize, m1: usize, y: &mut [f32]) -> Result<()> {
        let (c, m, k, width) = (self.out_channels, cols.m, self.k, m1 - m0);
        if let Some(g) = self.depthwise() {
            let (taps, mult) = (g.taps(), g.out_channels / g.group);
            let block = SampleBlock::of(g, cols, m0, width);
            let mut wide = Vec::new();
            for (o, yo) in y.chunks_exact_mut(width.max(1)).enumerate() {
                let plane = block.plane(cols, o / mult);
                depthwise_channel(g, &w[o * taps..][..taps], plane, block.samples, yo, &mut wide);
            }
            return Ok(());
        }
        let cg = c / self.groups;
        for gi in 0..self.groups {
            let a = MatRef { data: &w[gi * cg * k..], rs: self.w_rs, cs: self.w_cs };
            let b = MatRef { data: &cols.data[gi * k * m + m0..], rs: m, cs: 1 };
            sgemm(cg, width, k, a, b, 1.0, &mut y[gi * cg * width..], width, false, Parallelism::None)
                .map_err(product_error(&self.op))?;
        }
        Ok(())
    }

    /// Adds `grad[C, m1 − m0]·cols[:, m0..m1]ᵀ` to the weight gradient `dw`.
    fn block_weight_grad(
        &self,
        grad: &[f32],
        cols: &Columns,
        m0: usize,
        m1: usize,
        dw: &mut [f32],
    ) -> Result<()> {
        let (c, m, k, width) = (self.out_channels, cols.m, self.k, m1 - m0);
        if let Some(g) = self.depthwise() {
            let (taps, mult) = (g.taps(), g.out_channels / g.group);
            let block = SampleBlock::of(g, cols, m0, width);
            let mut wide = Vec::new();
            for (o, d) in grad.chunks_exact(width.max(1)).enumerate() {
                let plane = block.plane(cols, o / mult);
                depthwise_channel_grad(g, d, plane, block.samples, &mut dw[o * taps..][..taps], &mut wide);
            }
            return Ok(());
        }
        let cg = c / self.groups;
        for gi in 0..self.groups {
            let g_rows = &grad[gi * cg * width..];
            let cols_g = &cols.data[gi * k * m + m0..];
            if self.w_cs == 1 {
                let a = MatRef { data: g_rows, rs: width, cs: 1 };
                let b = MatRef { data: cols_g, rs: 1, cs: m };
                sgemm(cg, k, width, a, b, 1.0, &mut dw[gi * cg * k..], self.w_rs, true, Parallelism::None)
            } else {
                let a = MatRef { data: cols_g, rs: m, cs: 1 };
                let b = MatRef { data: g_rows, rs: 1, cs: width };
                sgemm(k, cg, width, a, b, 1.0, dw, self.w_cs, true, Parallelism::None)
            }
            .map_err(product_error(&self.op))?;
        }
        Ok(())
    }
}

/// The samples of a block of columns of depthwise planes.
struct SampleBlock {
    layout: PlaneLayout,
    first: usize,
    samples: usize,
    /// Values of one channel's planes over the whole batch.
    channel_len: usize,
}

impl SampleBlock {
    /// The block of `width` columns from `m0` (whole samples).
    fn of(g: &super::ConvGeometry, cols: &Columns, m0: usize, width: usize) -> SampleBlock {
        let layout = PlaneLayout::of(g);
        let p = g.positions().max(1);
        let channel_len = layout.channel_len(cols.samples);
        SampleBlock { layout, first: m0 / p, samples: width / p, channel_len }
    }

    /// Input channel `c`'s planes of the block's samples (with what follows them in the channel,
    /// which the last taps' runs reach into).
    fn plane<'a>(&self, cols: &'a Columns, c: usize) -> &'a [f32] {
        let start = self.first * self.layout.sample_len();
        &cols.data[c * self.channel_len + start..(c + 1) * self.channel_len]
    }
}

/// Adds the bias, applies `act`, and turns the block `y[C, width]` (columns `m0..` of `m`) into
/// the gradient of the loss sum by the pre-activation; returns the sum of squared errors. `out`
/// and `grad` are scratch of `y`'s length.
fn block_loss(
    act: Option<&Activation>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    target: &[f32],
    (m, m0, width): (usize, usize, usize),
    out: &mut [f32],
    grad: &mut [f32],
) -> f64 {
    let scale = 2.0 / m.max(1) as f32;
    let width = width.max(1);
    let target_row = |o: usize| &target[o * m + m0..][..width];
    let (lo, hi) = match act.map(|a| (a, a.clip_bounds())) {
        None => (f32::NEG_INFINITY, f32::INFINITY),
        Some((_, Some(bounds))) => bounds,
        Some((act, None)) => {
            if let Some(b) = bias {
                for (row, &bo) in y.chunks_exact_mut(width).zip(b) {
                    row.iter_mut().for_each(|v| *v += bo);
                }
            }
            act.forward(y, out, width);
            let rows = grad.chunks_exact_mut(width).zip(out.chunks_exact(width)).enumerate();
            let sum = rows.map(|(o, (g, r))| error_row(r, target_row(o), scale, g)).sum();
            act.backward(y, out, grad, width);
            y.copy_from_slice(grad);
            return sum;
        }
    };
    let rows = y.chunks_exact_mut(width).zip(out.chunks_exact_mut(width)).enumerate();
    rows.map(|(o, (row, out))| {
        clipped_row(row, bias.map_or(0.0, |b| b[o]), lo, hi, target_row(o), scale, out)
    })
    .sum()
}

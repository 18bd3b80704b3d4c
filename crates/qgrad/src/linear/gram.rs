//! The second moments of a layer's input and the output distances they give without running the
//! layer: for weights `a` and `b`, output channel `o`'s `Σ_columns ((a_o − b_o)·x)²` is
//! `dᵀ G d` with `d = a_o − b_o` and `G = Σ_columns x xᵀ` the Gram matrix of the columns of the
//! channel's group (for depthwise convolutions, of its input channel's taps). The bias cancels.
//! Sequential MSE compares many candidate weights this way at the cost of one product.

use qexec::{MatRef, Parallelism, sgemm};
use rayon::prelude::*;

use super::{Columns, Linear, PlaneLayout, product_error};
use crate::error::Result;

/// Columns per product of the Gram matrix: the f32 partial sums stay short, their sums are f64.
const GRAM_BLOCK: usize = 4096;

/// Per group (depthwise: per input channel), `Σ x xᵀ` over every column seen, `[K, K]` in f64.
#[derive(Debug, Clone)]
pub struct Gram {
    k: usize,
    data: Vec<f64>,
}

impl Gram {
    /// Columns summed so far are none.
    fn zeros(blocks: usize, k: usize) -> Gram {
        Gram { k, data: vec![0.0; blocks * k * k] }
    }

    /// Block `i`'s matrix.
    fn block(&self, i: usize) -> &[f64] {
        &self.data[i * self.k * self.k..][..self.k * self.k]
    }
}

impl Linear {
    /// An empty Gram matrix for this layer's columns.
    pub fn gram(&self) -> Gram {
        match self.depthwise() {
            Some(g) => Gram::zeros(g.in_channels, g.taps()),
            None => Gram::zeros(self.groups, self.k),
        }
    }

    /// Adds the columns `cols` to `gram`.
    pub fn add_to_gram(&self, cols: &Columns, gram: &mut Gram) -> Result<()> {
        if let Some(g) = self.depthwise() {
            let layout = PlaneLayout::of(g);
            let channel_len = layout.channel_len(cols.samples);
            let kk = gram.k * gram.k;
            let per_channel = |(c, out): (usize, &mut [f64])| {
                let plane = &cols.data[c * channel_len..][..channel_len];
                depthwise_gram(g, &layout, plane, cols.samples, out);
            };
            if self.threads > 1 {
                gram.data.par_chunks_mut(kk.max(1)).enumerate().for_each(per_channel);
            } else {
                gram.data.chunks_mut(kk.max(1)).enumerate().for_each(per_channel);
            }
            return Ok(());
        }
        let (k, m) = (self.k, cols.m);
        let blocks: Vec<(usize, usize)> =
            (0..self.groups).flat_map(|gi| (0..m.div_ceil(GRAM_BLOCK)).map(move |b| (gi, b))).collect();
        // Blocks in rounds of one per thread, each summed by one product, the rounds added in
        // order: the sums do not depend on the thread count.
        let threads = self.threads.max(1);
        let mut scratch = vec![vec![0.0f32; k * k]; threads.min(blocks.len())];
        for round in blocks.chunks(threads) {
            let product = |(&(gi, b), c): (&(usize, usize), &mut Vec<f32>)| {
                let (m0, m1) = (b * GRAM_BLOCK, ((b + 1) * GRAM_BLOCK).min(m));
                let x = &cols.data[gi * k * m + m0..];
                let a = MatRef { data: x, rs: m, cs: 1 };
                let bt = MatRef { data: x, rs: 1, cs: m };
                sgemm(k, k, m1 - m0, a, bt, 1.0, c, k, false, Parallelism::None)
                    .map_err(product_error(&self.op))
            };
            if threads > 1 {
                round.par_iter().zip(scratch.par_iter_mut()).map(product).collect::<Result<Vec<()>>>()?;
            } else {
                round.iter().zip(scratch.iter_mut()).map(product).collect::<Result<Vec<()>>>()?;
            }
            for (&(gi, _), c) in round.iter().zip(&scratch) {
                let into = &mut gram.data[gi * k * k..][..k * k];
                into.iter_mut().zip(c).for_each(|(s, &v)| *s += f64::from(v));
            }
        }
        Ok(())
    }

    /// Per output channel, `Σ ((a − b)·x)²` over the columns `gram` summed, for weights `a` and
    /// `b` in the layer's weight layout.
    pub fn output_distances(&self, gram: &Gram, a: &[f32], b: &[f32]) -> Result<Vec<f64>> {
        let (c, k) = (self.out_channels, self.k);
        self.check("weight", a.len(), c * k)?;
        self.check("weight", b.len(), c * k)?;
        if let Some(g) = self.depthwise() {
            let (taps, mult) = (g.taps(), g.out_channels / g.group);
            return Ok((0..c)
                .map(|o| {
                    let d: Vec<f64> = a[o * taps..][..taps]
                        .iter()
                        .zip(&b[o * taps..])
                        .map(|(&x, &y)| f64::from(x - y))
                        .collect();
                    quadratic_form(gram.block(o / mult), &d)
                })
                .collect());
        }
        let cg = c / self.groups;
        let at = |o: usize, i: usize| (o / cg) * cg * k + (o % cg) * self.w_rs + i * self.w_cs;
        // Each channel's difference in a row, then `E = D·G` per group by one product.
        let d: Vec<f32> = (0..c).flat_map(|o| (0..k).map(move |i| a[at(o, i)] - b[at(o, i)])).collect();
        let mut e = vec![0.0f32; c * k];
        for gi in 0..self.groups {
            let g32: Vec<f32> = gram.block(gi).iter().map(|&v| v as f32).collect();
            let dm = MatRef { data: &d[gi * cg * k..], rs: k, cs: 1 };
            let gm = MatRef { data: &g32, rs: k, cs: 1 };
            sgemm(cg, k, k, dm, gm, 1.0, &mut e[gi * cg * k..], k, false, self.par(cg * k * k))
                .map_err(product_error(&self.op))?;
        }
        Ok(d.chunks_exact(k.max(1))
            .zip(e.chunks_exact(k.max(1)))
            .map(|(d, e)| qkernels::dot_sum(d, e))
            .collect())
    }
}

/// `dᵀ G d`.
fn quadratic_form(g: &[f64], d: &[f64]) -> f64 {
    g.chunks_exact(d.len().max(1))
        .zip(d)
        .map(|(row, &di)| di * row.iter().zip(d).map(|(g, dj)| g * dj).sum::<f64>())
        .sum()
}

/// One input channel's `[taps, taps]` Gram matrix over `n` samples of its depthwise `plane`,
/// added to `out`: each tap's run over the wide grid with the unused columns and rows zeroed,
/// then one dot product per pair of taps.
fn depthwise_gram(g: &super::ConvGeometry, layout: &PlaneLayout, plane: &[f32], n: usize, out: &mut [f64]) {
    let taps = g.taps();
    let len = n * layout.phase_len();
    let (ho, wo) = (g.out_hw[0], g.out_hw[1]);
    let mut runs = vec![0.0f32; taps * len];
    for ky in 0..g.kernel[0] {
        for kx in 0..g.kernel[1] {
            let t = ky * g.kernel[1] + kx;
            let offset = layout.tap_offset(g, ky, kx);
            let run = &mut runs[t * len..][..len];
            for (at, src, l) in layout.runs(n) {
                run[at..at + l].copy_from_slice(&plane[src + offset..src + offset + l]);
            }
            for (row, values) in run.chunks_exact_mut(layout.wq.max(1)).enumerate() {
                if row % layout.hq >= ho {
                    values.fill(0.0);
                } else {
                    let width = values.len();
                    values[wo.min(width)..].fill(0.0);
                }
            }
        }
    }
    for a in 0..taps {
        for b in a..taps {
            let v = qkernels::dot_sum(&runs[a * len..][..len], &runs[b * len..][..len]);
            out[a * taps + b] += v;
            if a != b {
                out[b * taps + a] += v;
            }
        }
    }
}

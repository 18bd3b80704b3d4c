//! Depthwise convolution on planes, for large planes (the early layers of MobileNet-style
//! networks): each channel's input is laid out once as zero-padded rows split into their stride
//! phases, so every kernel tap reads a contiguous run with no bounds checks; outputs are computed
//! in register blocks (two rows × `BLOCK` columns, four rows × `BLOCK / 2` for narrow planes) with
//! all taps accumulated before one clamped store (the fused Relu/Clip).

use rayon::prelude::*;

use super::super::conv::{Geometry, valid_range};
use super::super::{Activation, ExecCtx, clamp_keep_nan};
use super::{Image, padded};
use crate::buffers::{BufferPool, Lease};

/// Output columns a register block computes at once.
const BLOCK: usize = 16;

/// What every channel of one layer shares: the padded-row layout and the tap offsets.
struct Layout {
    /// Floats of one stride phase of a padded row (with `BLOCK` floats of slack, so full-width
    /// blocks never read past the row).
    phase_len: usize,
    /// Padded rows (top and bottom padding included).
    rows: usize,
    /// For phase p: the valid element range and its first input column.
    spans: Vec<(usize, usize, usize)>,
    /// Offset of tap (ky, kx) from the first padded row of an output row, in kernel order.
    taps: Vec<usize>,
    /// The fused activation as bounds.
    lo: f32,
    hi: f32,
}

impl Layout {
    fn new(g: &Geometry, act: Option<Activation>) -> Layout {
        let s = g.sw;
        let (padded_rows, padded_width) = padded(g);
        let phase_len = padded_width.div_ceil(s) + BLOCK;
        let row_len = s * phase_len;
        // Phase element j holds padded column p + j·s, i.e. input column p + j·s − pl.
        let spans = (0..s)
            .map(|p| {
                let (lo, hi) = valid_range(p as isize - g.pl, s, g.w, phase_len);
                (lo, hi, (p as isize + (lo * s) as isize - g.pl).max(0) as usize)
            })
            .collect();
        let taps = (0..g.kh)
            .flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| {
                let off = kx * g.dw;
                ky * g.dh * row_len + (off % s) * phase_len + off / s
            })
            .collect();
        let (lo, hi) = Activation::bounds(act);
        Layout { phase_len, rows: padded_rows, spans, taps, lo, hi }
    }

    /// A zeroed buffer for one channel's padded rows. Channels overwrite only the valid regions,
    /// which are the same for all of them, so the padding stays zero.
    fn buffer<'p>(&self, g: &Geometry, pool: &'p BufferPool) -> Lease<'p> {
        pool.lease_zeroed(self.rows * g.sw * self.phase_len)
    }
}

/// Depthwise convolution of one image, channel by channel.
pub(super) fn image(im: &Image<'_>, ctx: &ExecCtx<'_>, out: &mut [f32]) {
    let Image { x, k, bias, act, g } = *im;
    let layout = Layout::new(g, act);
    let (hw, khw, ohw) = (g.h * g.w, g.kh * g.kw, g.oh * g.ow);
    let channel = |rows: &mut Lease<'_>, ch: usize, plane: &mut [f32]| {
        build_rows(&x[ch * hw..(ch + 1) * hw], &layout.spans, g, layout.phase_len, rows);
        let c = Channel {
            taps: &layout.taps,
            k: &k[ch * khw..(ch + 1) * khw],
            bias: bias.map_or(0.0, |b| b[ch]),
            lo: layout.lo,
            hi: layout.hi,
            step: g.sh * g.sw * layout.phase_len,
        };
        rows_product(rows, &c, g.ow, plane);
        if let Some(f) = ctx.epilogue {
            f(plane);
        }
    };
    if ctx.threads > 1 {
        out.par_chunks_mut(ohw)
            .enumerate()
            .for_each_init(|| layout.buffer(g, ctx.pool), |rows, (ch, p)| channel(rows, ch, p));
    } else {
        let mut rows = layout.buffer(g, ctx.pool);
        out.chunks_mut(ohw).enumerate().for_each(|(ch, p)| channel(&mut rows, ch, p));
    }
}

qkernels::multiversion! {
    /// Copies the valid part of each input row into its padded, phase-split place in `rows`.
    fn build_rows(x: &[f32], spans: &[(usize, usize, usize)], g: &Geometry, phase_len: usize, rows: &mut [f32]) {
        let s = g.sw;
        for (iy, src) in x.chunks_exact(g.w).enumerate() {
            let at = (iy as isize + g.pt) as usize * s * phase_len;
            let Some(phased) = rows.get_mut(at..at + s * phase_len) else { break };
            if s == 2 {
                split_pairs(src, spans, g.pl, phased, phase_len);
                continue;
            }
            for (dst, &(lo, hi, start)) in phased.chunks_mut(phase_len).zip(spans) {
                let dst = &mut dst[lo..hi];
                if s == 1 {
                    dst.copy_from_slice(&src[start..start + dst.len()]);
                } else {
                    dst.iter_mut().zip(src[start..].iter().step_by(s)).for_each(|(d, &v)| *d = v);
                }
            }
        }
    }
}

/// Stride 2: one pass over an input row writes both phases. Phase `p` element `j` holds input
/// column `2j + p − pl`; where both phases are valid, input pairs split into the two phases.
#[inline(always)]
fn split_pairs(
    src: &[f32],
    spans: &[(usize, usize, usize)],
    pl: isize,
    phased: &mut [f32],
    phase_len: usize,
) {
    let (p0, p1) = phased.split_at_mut(phase_len);
    let (lo, hi) = (spans[0].0.max(spans[1].0), spans[0].1.min(spans[1].1));
    let common = lo < hi && (2 * lo) as isize >= pl;
    if common {
        // An indexed loop over equal-length slices, which the loop vectoriser turns into
        // vector loads and shuffles (iterator zips of pairs stay scalar).
        let src = &src[((2 * lo) as isize - pl) as usize..];
        let n = (hi - lo).min(src.len() / 2);
        let (even, odd, src) = (&mut p0[lo..lo + n], &mut p1[lo..lo + n], &src[..2 * n]);
        for j in 0..n {
            even[j] = src[2 * j];
            odd[j] = src[2 * j + 1];
        }
    }
    // The few elements outside the common range (and everything if there is none).
    for (p, dst) in [p0, p1].into_iter().enumerate() {
        let (plo, phi, start) = spans[p];
        let edges = if common {
            [(plo, lo.clamp(plo, phi)), (hi.clamp(plo, phi), phi)]
        } else {
            [(plo, phi), (phi, phi)]
        };
        for (a, b) in edges {
            for j in a..b {
                dst[j] = src[start + 2 * (j - plo)];
            }
        }
    }
}

/// One register block: `W` outputs of `R` output rows starting at `bases` in `rows`, all taps
/// accumulated onto the bias (a multiply and an add each, not fused: as fast on AVX2 cores with
/// separate add ports, and the results stay those AIMET's reference runs were compared with),
/// then clamped to `[lo, hi]`.
///
/// # Safety
/// `bases[r] + taps[t] + W <= rows.len()` for every row `r` and tap `t`.
#[inline(always)]
unsafe fn block<const R: usize, const W: usize>(
    rows: &[f32],
    c: &Channel<'_>,
    bases: [usize; R],
) -> [[f32; W]; R] {
    let mut acc = [[c.bias; W]; R];
    for (&off, &w) in c.taps.iter().zip(c.k) {
        for r in 0..R {
            // SAFETY: the caller guarantees the window lies inside `rows`.
            let v = unsafe { &*rows.as_ptr().add(bases[r] + off).cast::<[f32; W]>() };
            for i in 0..W {
                acc[r][i] += w * v[i];
            }
        }
    }
    for row in &mut acc {
        for v in row.iter_mut() {
            *v = clamp_keep_nan(*v, c.lo, c.hi);
        }
    }
    acc
}

/// What one channel's product needs besides its rows and output.
struct Channel<'a> {
    taps: &'a [usize],
    k: &'a [f32],
    bias: f32,
    lo: f32,
    hi: f32,
    /// Distance between the first padded rows of consecutive output rows.
    step: usize,
}

/// Stores a block's row into `dst` (at most `W` long): whole as a fixed-size array (vector
/// stores), a tail element by element.
#[inline(always)]
fn store<const W: usize>(dst: &mut [f32], acc: &[f32; W]) {
    match <&mut [f32; W]>::try_from(&mut *dst) {
        Ok(full) => *full = *acc,
        Err(_) => dst.iter_mut().zip(acc).for_each(|(d, v)| *d = *v),
    }
}

/// The product in blocks of `R` rows × `W` columns (then single rows).
#[inline(always)]
fn blocked_product<const R: usize, const W: usize>(
    rows: &[f32],
    c: &Channel<'_>,
    ow: usize,
    out: &mut [f32],
) {
    let rows_out = out.len() / ow.max(1);
    let last_base = rows_out.saturating_sub(1) * c.step + (ow.max(1) - 1) / W * W;
    let reach = last_base + c.taps.iter().copied().max().unwrap_or(0) + W;
    assert!(reach <= rows.len() && c.k.len() >= c.taps.len(), "depthwise rows too short for the taps");
    let mut groups = out.chunks_exact_mut(R * ow);
    let mut oy = 0;
    for group in groups.by_ref() {
        for x0 in (0..ow).step_by(W) {
            let bases = std::array::from_fn(|r| (oy + r) * c.step + x0);
            // SAFETY: every base is at most `last_base`, checked against `rows` above.
            let acc = unsafe { block::<R, W>(rows, c, bases) };
            let n = W.min(ow - x0);
            for (r, acc) in acc.iter().enumerate() {
                store(&mut group[r * ow + x0..r * ow + x0 + n], acc);
            }
        }
        oy += R;
    }
    for row in groups.into_remainder().chunks_mut(ow.max(1)) {
        for x0 in (0..ow).step_by(W) {
            // SAFETY: as above.
            let acc = unsafe { block::<1, W>(rows, c, [oy * c.step + x0]) };
            store(&mut row[x0..x0 + W.min(ow - x0)], &acc[0]);
        }
        oy += 1;
    }
}

qkernels::multiversion! {
    /// The multiply-adds of one channel over its padded rows, outputs clamped to `[lo, hi]`:
    /// blocks of 2 rows × 16 columns, or 4 × 8 for rows of at most 8 outputs.
    fn rows_product(rows: &[f32], c: &Channel<'_>, ow: usize, out: &mut [f32]) {
        if ow <= BLOCK / 2 {
            blocked_product::<4, { BLOCK / 2 }>(rows, c, ow, out);
        } else {
            blocked_product::<2, BLOCK>(rows, c, ow, out);
        }
    }
}

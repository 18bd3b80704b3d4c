//! Depthwise convolution (one filter per channel), the memory-bound half of MobileNet-style
//! networks. Each channel's input is laid out once as zero-padded rows split into their stride
//! phases, so every kernel tap reads a contiguous run with no bounds checks; outputs are computed
//! in register blocks of two rows × `BLOCK` columns with all taps accumulated before one clamped
//! store (the fused Relu/Clip).

use rayon::prelude::*;

use super::conv::{Geometry, valid_range};
use super::{Activation, ExecCtx, clamp_keep_nan};

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
        let padded = (g.ow - 1) * s + (g.kw - 1) * g.dw + 1;
        let phase_len = padded.div_ceil(s) + BLOCK;
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
        Layout { phase_len, rows: (g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1, spans, taps, lo, hi }
    }

    /// A zeroed buffer for one channel's padded rows. Channels overwrite only the valid regions,
    /// which are the same for all of them, so the padding stays zero.
    fn buffer(&self, g: &Geometry) -> Vec<f32> {
        vec![0.0; self.rows * g.sw * self.phase_len]
    }
}

/// Depthwise convolution of one image: `x` is [c, h, w], `k` [c, kh, kw], `out` [c, oh, ow].
pub(super) fn image(
    x: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    act: Option<Activation>,
    g: &Geometry,
    ctx: &ExecCtx<'_>,
    out: &mut [f32],
) {
    let layout = Layout::new(g, act);
    let (hw, khw, ohw) = (g.h * g.w, g.kh * g.kw, g.oh * g.ow);
    let channel = |rows: &mut Vec<f32>, ch: usize, plane: &mut [f32]| {
        build_rows(&x[ch * hw..(ch + 1) * hw], &layout.spans, g, layout.phase_len, rows);
        let b = bias.map_or(0.0, |b| b[ch]);
        let step = g.sh * g.sw * layout.phase_len;
        rows_product(
            rows,
            &layout.taps,
            &k[ch * khw..(ch + 1) * khw],
            b,
            layout.lo,
            layout.hi,
            step,
            g.ow,
            plane,
        );
        if let Some(f) = ctx.epilogue {
            f(plane);
        }
    };
    if ctx.threads > 1 {
        out.par_chunks_mut(ohw)
            .enumerate()
            .for_each_init(|| layout.buffer(g), |rows, (ch, p)| channel(rows, ch, p));
    } else {
        let mut rows = layout.buffer(g);
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
        let pairs = src[((2 * lo) as isize - pl) as usize..].chunks_exact(2);
        for ((a, b), pair) in p0[lo..hi].iter_mut().zip(&mut p1[lo..hi]).zip(pairs) {
            *a = pair[0];
            *b = pair[1];
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

/// One register block: `BLOCK` outputs of `R` output rows starting at `bases` in `rows`.
///
/// # Safety
/// `bases[r] + taps[t] + BLOCK <= rows.len()` for every row `r` and tap `t`.
#[inline(always)]
unsafe fn block<const R: usize>(
    rows: &[f32],
    taps: &[usize],
    k: &[f32],
    bases: [usize; R],
    bias: f32,
) -> [[f32; BLOCK]; R] {
    let mut acc = [[bias; BLOCK]; R];
    for (&off, &w) in taps.iter().zip(k) {
        for r in 0..R {
            // SAFETY: the caller guarantees the window lies inside `rows`.
            let v = unsafe { &*rows.as_ptr().add(bases[r] + off).cast::<[f32; BLOCK]>() };
            for i in 0..BLOCK {
                acc[r][i] += w * v[i];
            }
        }
    }
    acc
}

qkernels::multiversion! {
    /// The multiply-adds of one channel over its padded rows; `step` is the distance between
    /// the first padded rows of consecutive output rows; outputs are clamped to `[lo, hi]`.
    #[allow(clippy::too_many_arguments)]
    fn rows_product(rows: &[f32], taps: &[usize], k: &[f32], bias: f32, lo: f32, hi: f32, step: usize, ow: usize, out: &mut [f32]) {
        let store = |dst: &mut [f32], acc: &[f32; BLOCK]| {
            let mut clamped = [0f32; BLOCK];
            for i in 0..BLOCK {
                clamped[i] = clamp_keep_nan(acc[i], lo, hi);
            }
            // Full and half blocks as fixed-size copies (vector stores, no call); other tails as slices.
            if let Ok(full) = <&mut [f32; BLOCK]>::try_from(&mut *dst) {
                *full = clamped;
            } else if let Ok(half) = <&mut [f32; BLOCK / 2]>::try_from(&mut *dst) {
                half.copy_from_slice(&clamped[..BLOCK / 2]);
            } else {
                dst.copy_from_slice(&clamped[..dst.len()]);
            }
        };
        let rows_out = out.len() / ow.max(1);
        let last_base = rows_out.saturating_sub(1) * step + (ow.max(1) - 1) / BLOCK * BLOCK;
        let reach = last_base + taps.iter().copied().max().unwrap_or(0) + BLOCK;
        assert!(reach <= rows.len() && k.len() >= taps.len(), "depthwise rows too short for the taps");
        let mut pairs = out.chunks_exact_mut(2 * ow);
        let mut oy = 0;
        for pair in pairs.by_ref() {
            let (top, bottom) = pair.split_at_mut(ow);
            for x0 in (0..ow).step_by(BLOCK) {
                // SAFETY: every base is at most `last_base`, checked against `rows` above.
                let acc = unsafe { block::<2>(rows, taps, k, [oy * step + x0, (oy + 1) * step + x0], bias) };
                let n = BLOCK.min(ow - x0);
                store(&mut top[x0..x0 + n], &acc[0]);
                store(&mut bottom[x0..x0 + n], &acc[1]);
            }
            oy += 2;
        }
        let last = pairs.into_remainder();
        for x0 in (0..last.len()).step_by(BLOCK) {
            // SAFETY: as above.
            let acc = unsafe { block::<1>(rows, taps, k, [oy * step + x0], bias) };
            let n = BLOCK.min(ow - x0);
            store(&mut last[x0..x0 + n], &acc[0]);
        }
    }
}

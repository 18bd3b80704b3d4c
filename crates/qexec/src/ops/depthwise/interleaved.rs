//! Depthwise convolution on channel groups interleaved eight at a time, for small planes (the
//! later layers of MobileNet-style networks, where the planar kernel's per-channel set-up and
//! part-filled register blocks dominate) and their strided layers. A group's input is transposed
//! (8×8 blocks) into pixel vectors of its channels, zero-padded, so every tap of every output
//! pixel, at any stride or dilation, is one vector load; the output vectors are transposed back
//! into planes.

use rayon::prelude::*;

use super::super::conv::Geometry;
use super::super::{Activation, ExecCtx, clamp_keep_nan};
use super::{Image, padded};
use crate::buffers::Lease;

/// Kernel sizes (taps) the interleaved layout serves: 3×3 and 5×5.
pub(super) const TAPS: [usize; 2] = [9, 25];

/// Channels one interleaved group holds: one AVX2 vector of f32.
const LANES: usize = 8;
/// Output pixels an interleaved register block computes at once.
const PIXELS: usize = 4;

/// A group of up to `LANES` channels with its input interleaved: pixel `(y, x)` of the padded
/// input is the vector `buf[y * wp + x]` of the group's channels, so every tap of every output
/// pixel, at any stride or dilation, is one vector load.
struct Interleaved {
    /// Padded input width and height.
    wp: usize,
    hp: usize,
    /// Offset (in pixels) of tap (ky, kx) from an output pixel's first input pixel.
    taps: Vec<usize>,
    /// The input rows inside the padded input, each with the pixel its valid part starts at.
    rows: Vec<(usize, usize)>,
    /// The valid input columns (the same for every row).
    columns: (usize, usize),
    lo: f32,
    hi: f32,
}

impl Interleaved {
    fn new(g: &Geometry, act: Option<Activation>) -> Interleaved {
        let (hp, wp) = padded(g);
        let taps = (0..g.kh).flat_map(|ky| (0..g.kw).map(move |kx| ky * g.dh * wp + kx * g.dw)).collect();
        let (x_lo, x_hi) = ((-g.pl).max(0) as usize, (wp as isize - g.pl).clamp(0, g.w as isize) as usize);
        let rows = (0..g.h)
            .filter_map(|iy| {
                let py = iy as isize + g.pt;
                (py >= 0 && py < hp as isize && x_lo < x_hi)
                    .then(|| (iy, py as usize * wp + (x_lo as isize + g.pl) as usize))
            })
            .collect();
        let (lo, hi) = Activation::bounds(act);
        Interleaved { wp, hp, taps, rows, columns: (x_lo, x_hi), lo, hi }
    }
}

/// An 8×8 transpose: AVX shuffles where the CPU has them (the vectoriser leaves the portable
/// form scalar).
#[inline(always)]
fn transpose(m: &[[f32; LANES]; LANES]) -> [[f32; LANES]; LANES] {
    #[cfg(target_arch = "x86_64")]
    if qkernels::dispatch::detected() >= qkernels::dispatch::Isa::Avx2 {
        // SAFETY: the CPU supports AVX (AVX2 implies it), checked just above.
        return unsafe { avx::transpose(m) };
    }
    portable_transpose(m)
}

#[inline(always)]
fn portable_transpose(m: &[[f32; LANES]; LANES]) -> [[f32; LANES]; LANES] {
    std::array::from_fn(|j| std::array::from_fn(|c| m[c][j]))
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::{
        __m256, _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps, _mm256_storeu_ps,
        _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };

    use super::LANES;

    /// Row `j` of the result is column `j` of `m`: pairs interleaved (unpack), then quads
    /// (shuffle), then the 128-bit halves swapped across (permute).
    #[target_feature(enable = "avx")]
    #[inline]
    pub(super) fn transpose(m: &[[f32; LANES]; LANES]) -> [[f32; LANES]; LANES] {
        // SAFETY: each row holds exactly 8 f32, one unaligned 256-bit load.
        let r: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(m[i].as_ptr()) });
        // pairs[2i], pairs[2i + 1]: rows 2i and 2i + 1 interleaved, low and high halves.
        let pairs: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
        });
        // Within each half of the rows (i / 4), quads of one column pair from four rows.
        let quads: [__m256; 8] = std::array::from_fn(|i| {
            let first = 4 * (i / 4) + (i % 4) / 2;
            let (a, b) = (pairs[first], pairs[first + 2]);
            if i % 2 == 0 { _mm256_shuffle_ps::<0x44>(a, b) } else { _mm256_shuffle_ps::<0xEE>(a, b) }
        });
        // Columns 0–3 from the low 128-bit lanes of both halves, 4–7 from the high ones.
        let rows: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (quads[i % 4], quads[i % 4 + 4]);
            if i < 4 { _mm256_permute2f128_ps::<0x20>(a, b) } else { _mm256_permute2f128_ps::<0x31>(a, b) }
        });
        let mut out = [[0f32; LANES]; LANES];
        for (o, v) in out.iter_mut().zip(rows) {
            // SAFETY: each row holds exactly 8 f32, one unaligned 256-bit store.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
        }
        out
    }
}

qkernels::multiversion! {
    /// For each `(iy, at)` in `rows`: the input columns `columns` (a range) of row `iy` of every
    /// plane (planes `plane` floats apart, rows `w` apart) into the vectors `buf[at..]`, eight
    /// columns at a time through a transpose. Lanes past the last plane get zeros.
    fn interleave_rows(
        planes: &[f32],
        plane: usize,
        w: usize,
        columns: (usize, usize),
        rows: &[(usize, usize)],
        buf: &mut [[f32; LANES]],
    ) {
        let channels = planes.len() / plane.max(1);
        let (x_lo, x_hi) = columns;
        for &(iy, at) in rows {
            let dst = &mut buf[at..at + (x_hi - x_lo)];
            let src = |c: usize| &planes[c * plane + iy * w + x_lo..c * plane + iy * w + x_hi];
            let mut chunks = dst.chunks_exact_mut(LANES);
            let mut x = 0;
            for out in chunks.by_ref() {
                let m = std::array::from_fn(|c| {
                    if c < channels { src(c)[x..x + LANES].try_into().expect("eight columns") } else { [0.0; LANES] }
                });
                out.copy_from_slice(&transpose(&m));
                x += LANES;
            }
            let tail = chunks.into_remainder();
            let n = tail.len();
            if n > 0 {
                // Eight floats from each plane where they lie inside `planes` (the ones past the
                // row only reach vectors that are not stored), else a fixed-length loop with a
                // condition (a `copy_from_slice` of a few floats would call `memmove`).
                let mut m = [[0f32; LANES]; LANES];
                for (c, row) in m.iter_mut().enumerate().take(channels) {
                    let start = c * plane + iy * w + x_lo + x;
                    if let Some(eight) = planes.get(start..start + LANES) {
                        row.copy_from_slice(eight);
                        continue;
                    }
                    let src = &src(c)[x..];
                    for j in 0..LANES {
                        if j < n {
                            row[j] = src[j];
                        }
                    }
                }
                let t = transpose(&m);
                for j in 0..LANES {
                    if j < n {
                        tail[j] = t[j];
                    }
                }
            }
        }
    }
}

qkernels::multiversion! {
    /// The inverse of [`interleave_rows`] for a whole output: pixel vector `p` of `obuf` into
    /// element `p` of each plane of `planes` (`ohw` floats each, at most `LANES` planes).
    fn deinterleave(obuf: &[[f32; LANES]], ohw: usize, planes: &mut [f32]) {
        let channels = planes.len() / ohw.max(1);
        let mut p = 0;
        for block in obuf[..ohw].chunks_exact(LANES) {
            let t = transpose(block.try_into().expect("eight pixels"));
            for (c, row) in t.iter().enumerate().take(channels) {
                planes[c * ohw + p..c * ohw + p + LANES].copy_from_slice(row);
            }
            p += LANES;
        }
        let tail = &obuf[p..ohw];
        let n = tail.len();
        if n > 0 {
            // As in `interleave_rows`, loops of fixed length rather than calls to `memmove`.
            let mut m = [[0f32; LANES]; LANES];
            for j in 0..LANES {
                if j < n {
                    m[j] = tail[j];
                }
            }
            for (c, row) in transpose(&m).iter().enumerate().take(channels) {
                let dst = &mut planes[c * ohw + p..(c + 1) * ohw];
                for j in 0..LANES {
                    if j < n {
                        dst[j] = row[j];
                    }
                }
            }
        }
    }
}

/// One interleaved register block: `P` output pixels (`bases`: their first input pixels), each
/// a vector of the group's channels, all `T` taps accumulated onto the bias in kernel order (a
/// multiply and an add each, as in the planar kernel, so both layouts give the same bits), clamped.
///
/// # Safety
/// `bases[p] + taps[t] < buf.len()` for every pixel `p` and tap `t`.
#[inline(always)]
unsafe fn pixels<const P: usize, const T: usize>(
    buf: &[[f32; LANES]],
    taps: &[usize; T],
    k: &[[f32; LANES]; T],
    bias: [f32; LANES],
    bases: [usize; P],
    (lo, hi): (f32, f32),
) -> [[f32; LANES]; P] {
    let mut acc = [bias; P];
    for (&off, w) in taps.iter().zip(k) {
        for p in 0..P {
            // SAFETY: the caller guarantees the tap lies inside `buf`.
            let v = unsafe { buf.get_unchecked(bases[p] + off) };
            for i in 0..LANES {
                acc[p][i] += w[i] * v[i];
            }
        }
    }
    for px in &mut acc {
        for v in px.iter_mut() {
            *v = clamp_keep_nan(*v, lo, hi);
        }
    }
    acc
}

/// One group's operands: its interleaved input, a weight vector per tap, the bias vector.
struct Operands<'a> {
    input: &'a [[f32; LANES]],
    weights: &'a [[f32; LANES]],
    bias: [f32; LANES],
}

/// One group's product for a kernel of `T` taps: every output pixel as a vector of the group's
/// channels, into `obuf`.
#[inline(always)]
fn taps_product<const T: usize>(
    ops: &Operands<'_>,
    layout: &Interleaved,
    g: &Geometry,
    obuf: &mut [[f32; LANES]],
) {
    let (buf, bias) = (ops.input, ops.bias);
    let taps: &[usize; T] = layout.taps.as_slice().try_into().expect("taps of the kernel size");
    let k: &[[f32; LANES]; T] = ops.weights.try_into().expect("a weight vector per tap");
    let reach = ((g.oh - 1) * g.sh * layout.wp + (g.ow - 1) * g.sw) + taps.iter().copied().max().unwrap_or(0);
    assert!(reach < buf.len() && obuf.len() >= g.oh * g.ow, "interleaved depthwise buffers too short");
    let bounds = (layout.lo, layout.hi);
    for (oy, row) in obuf.chunks_exact_mut(g.ow).take(g.oh).enumerate() {
        let first = oy * g.sh * layout.wp;
        let mut blocks = row.chunks_exact_mut(PIXELS);
        let mut ox = 0;
        for out in blocks.by_ref() {
            let bases = std::array::from_fn(|p| first + (ox + p) * g.sw);
            // SAFETY: every base is at most the last pixel's, checked against `buf` above.
            *<&mut [_; PIXELS]>::try_from(out).expect("block of PIXELS") =
                unsafe { pixels::<PIXELS, T>(buf, taps, k, bias, bases, bounds) };
            ox += PIXELS;
        }
        for out in blocks.into_remainder() {
            // SAFETY: as above.
            *out = unsafe { pixels::<1, T>(buf, taps, k, bias, [first + ox * g.sw], bounds) }[0];
            ox += 1;
        }
    }
}

qkernels::multiversion! {
    /// One group's product, for the kernel sizes the interleaved layout serves (3×3 and 5×5).
    fn interleaved_product(ops: &Operands<'_>, layout: &Interleaved, g: &Geometry, obuf: &mut [[f32; LANES]]) {
        match layout.taps.len() {
            9 => taps_product::<9>(ops, layout, g, obuf),
            25 => taps_product::<25>(ops, layout, g, obuf),
            n => unreachable!("interleaved depthwise for {n} taps"),
        }
    }
}

/// What one thread reuses from group to group: the interleaved input (zeroed once; its padding
/// stays zero), the interleaved output (every vector overwritten, so not zeroed), and the
/// weights as one vector per tap.
struct Buffers<'p> {
    input: Lease<'p>,
    output: Lease<'p>,
    weights: Vec<[f32; LANES]>,
}

/// A buffer of floats as whole vectors of `LANES` (a trailing part-vector left out).
fn vectors(floats: &mut [f32]) -> &mut [[f32; LANES]] {
    let n = floats.len() / LANES;
    // SAFETY: `[f32; LANES]` has the size of `LANES` floats and the alignment of one, so the
    // first `n · LANES` floats are `n` such arrays; the borrow of `floats` covers them all.
    unsafe { std::slice::from_raw_parts_mut(floats.as_mut_ptr().cast::<[f32; LANES]>(), n) }
}

/// Depthwise convolution of one image through channel groups interleaved `LANES` at a time
/// (the kernel's `kh · kw` one of [`TAPS`]).
pub(super) fn image(im: &Image<'_>, ctx: &ExecCtx<'_>, out: &mut [f32]) {
    let Image { x, k, bias, act, g } = *im;
    let layout = Interleaved::new(g, act);
    let (hw, khw, ohw) = (g.h * g.w, g.kh * g.kw, g.oh * g.ow);
    let buffers = || Buffers {
        input: ctx.pool.lease_zeroed(layout.hp * layout.wp * LANES),
        output: ctx.pool.lease(ohw * LANES),
        weights: vec![[0f32; LANES]; khw],
    };
    let group = |b: &mut Buffers<'_>, (gi, planes): (usize, &mut [f32])| {
        let (buf, obuf) = (vectors(&mut b.input), vectors(&mut b.output));
        let kv = &mut b.weights;
        let c0 = gi * LANES;
        let channels = planes.len() / ohw;
        interleave_rows(&x[c0 * hw..(c0 + channels) * hw], hw, g.w, layout.columns, &layout.rows, buf);
        let mut bv = [0f32; LANES];
        for c in 0..channels {
            for (t, w) in kv.iter_mut().enumerate() {
                w[c] = k[(c0 + c) * khw + t];
            }
            bv[c] = bias.map_or(0.0, |b| b[c0 + c]);
        }
        interleaved_product(&Operands { input: buf, weights: kv, bias: bv }, &layout, g, obuf);
        deinterleave(obuf, ohw, planes);
        if let Some(f) = ctx.epilogue {
            planes.chunks_exact_mut(ohw).for_each(f);
        }
    };
    if ctx.threads > 1 {
        out.par_chunks_mut(LANES * ohw).enumerate().for_each_init(buffers, |b, item| group(b, item));
    } else {
        let mut b = buffers();
        out.chunks_mut(LANES * ohw).enumerate().for_each(|item| group(&mut b, item));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx_transpose_equals_the_portable_one() {
        let m: [[f32; LANES]; LANES] =
            std::array::from_fn(|i| std::array::from_fn(|j| (i * 8 + j) as f32 * 0.5));
        let want = portable_transpose(&m);
        assert_eq!(want[3][5], m[5][3]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: AVX was detected just above.
            assert_eq!(unsafe { avx::transpose(&m) }, want);
        }
    }
}

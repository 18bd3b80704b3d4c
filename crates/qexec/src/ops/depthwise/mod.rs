//! Depthwise convolution (one filter per channel), the memory-bound half of MobileNet-style
//! networks, in two layouts chosen per layer: channel planes for large planes, channel groups
//! interleaved eight at a time for small ones. Both accumulate every output as the bias plus
//! each tap's product in kernel order (a multiply and an add, not fused), so they give the same
//! bits and the choice never changes a result.

mod interleaved;
mod planar;

use super::conv::Geometry;
use super::{Activation, ExecCtx};

/// Padded input planes up to this many pixels (64 × 64) go through the interleaved layout: an
/// eight-channel group then stays in L2 and the planar kernel's per-channel costs would dominate.
const INTERLEAVED_MAX_PIXELS: usize = 64 * 64;

/// One image's depthwise convolution: `x` is [c, h, w], `k` [c, kh, kw], the output [c, oh, ow].
#[derive(Clone, Copy)]
pub(super) struct Image<'a> {
    pub x: &'a [f32],
    pub k: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub act: Option<Activation>,
    pub g: &'a Geometry,
}

/// The padded input's (height, width) that the outputs read, padding included (for `oh, ow ≥ 1`).
fn padded(g: &Geometry) -> (usize, usize) {
    ((g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1, (g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1)
}

/// Computes `im` into `out` in the layout that suits its size.
pub(super) fn image(im: &Image<'_>, ctx: &ExecCtx<'_>, out: &mut [f32]) {
    let g = im.g;
    if g.oh == 0 || g.ow == 0 {
        return;
    }
    let (hp, wp) = padded(g);
    if interleaved::TAPS.contains(&(g.kh * g.kw)) && hp * wp <= INTERLEAVED_MAX_PIXELS {
        interleaved::image(im, ctx, out);
    } else {
        planar::image(im, ctx, out);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::buffers::BufferPool;

    /// The geometry of a square-kernel depthwise convolution, if its output is not empty.
    fn geometry(
        c: usize,
        (h, w): (usize, usize),
        k: usize,
        s: usize,
        d: usize,
        pads: [usize; 4],
    ) -> Option<Geometry> {
        let reach = (k - 1) * d + 1;
        let oh = (h + pads[0] + pads[2]).checked_sub(reach)? / s + 1;
        let ow = (w + pads[1] + pads[3]).checked_sub(reach)? / s + 1;
        let (pt, pl) = (pads[0] as isize, pads[1] as isize);
        Some(Geometry { n: 1, c, h, w, m: c, kh: k, kw: k, oh, ow, sh: s, sw: s, dh: d, dw: d, pt, pl })
    }

    /// Reproducible values in [−4, 4), with a NaN and infinities where `specials` says.
    fn values(n: usize, seed: u64, specials: bool) -> Vec<f32> {
        let mut state = seed | 1;
        (0..n)
            .map(|i| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                match (specials, i % 97) {
                    (true, 13) => f32::NAN,
                    (true, 41) => f32::INFINITY,
                    (true, 71) => f32::NEG_INFINITY,
                    _ => ((state >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0,
                }
            })
            .collect()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Every geometry either layout may get (strides, dilations, uneven padding, 3×3 and
        /// 5×5, partial channel groups, activations, NaN and infinities, 1 and 2 threads):
        /// both give the same bits.
        #[test]
        fn interleaved_and_planar_layouts_give_the_same_bits(
            c in 1usize..20,
            h in 1usize..24,
            w in 1usize..24,
            k in prop::sample::select(vec![3usize, 5]),
            s in 1usize..3,
            d in 1usize..3,
            pads in [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            act in 0usize..3,
            with_bias in any::<bool>(),
            specials in any::<bool>(),
            threads in 1usize..3,
            seed in any::<u64>(),
        ) {
            let Some(g) = geometry(c, (h, w), k, s, d, pads) else { return Ok(()) };
            let x = values(c * h * w, seed, specials);
            let kernel = values(c * k * k, seed ^ 0x5555, false);
            let bias = values(c, seed ^ 0xAAAA, false);
            let bias = with_bias.then_some(bias.as_slice());
            let act = [None, Some(Activation::Relu), Some(Activation::Clip(-1.0, 2.5))][act];
            let pool = BufferPool::default();
            let ctx = ExecCtx { threads, pool: &pool, epilogue: None, max_bytes: usize::MAX };
            let im = Image { x: &x, k: &kernel, bias, act, g: &g };
            let run = |interleaved_layout: bool| {
                let mut out = vec![0f32; c * g.oh * g.ow];
                if interleaved_layout {
                    interleaved::image(&im, &ctx, &mut out);
                } else {
                    planar::image(&im, &ctx, &mut out);
                }
                out
            };
            let (planar, interleaved) = if threads > 1 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
                pool.install(|| (run(false), run(true)))
            } else {
                (run(false), run(true))
            };
            prop_assert!(same_bits(&planar, &interleaved), "{g:?}");
        }
    }
}

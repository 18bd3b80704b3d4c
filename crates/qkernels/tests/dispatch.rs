//! Every dispatched kernel at every instruction-set level this CPU has, against a plain scalar
//! reference written from the spec (§1.2): outputs must be bit-identical, on random data with
//! NaN, ±inf, −0, subnormals, values on the encoding's bounds and exact rounding ties.

use std::sync::Mutex;

use proptest::prelude::*;
use qkernels::dispatch::{self, Isa};
use qkernels::{Encoding, MinMax, QuantSpec, Rounding, TfHistogram};

/// `dispatch::force` is process-wide: tests that force a level take turns.
static LEVEL: Mutex<()> = Mutex::new(());

fn at_every_level(mut f: impl FnMut(Isa)) {
    let _turn = LEVEL.lock().unwrap_or_else(|e| e.into_inner());
    for level in dispatch::available() {
        dispatch::force(Some(level));
        f(level);
    }
    dispatch::force(None);
}

/// The spec's quantize-dequantize, one element at a time.
fn reference(x: f32, e: &Encoding, rounding: Rounding) -> f32 {
    let (min, max, delta, offset) = (e.min as f32, e.max as f32, e.delta as f32, e.offset as f32);
    let v = if x.is_nan() { min } else { x.max(min).min(max) };
    let t = v / delta - offset;
    let q = match rounding {
        Rounding::HalfAwayFromZero => t.round(),
        Rounding::HalfToEven => t.round_ties_even(),
    };
    delta * (q.max(0.0).min(e.steps as f32) + offset)
}

fn value(e: Encoding) -> impl Strategy<Value = f32> {
    let (d, o) = (e.delta as f32, e.offset as f32);
    prop_oneof![
        4 => -3.0f32..3.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(1e-40f32),
        1 => Just(-0.0f32),
        1 => Just(e.min as f32),
        1 => Just(e.max as f32),
        // x/Δ − offset exactly on a .5 tie.
        2 => (0i32..255).prop_map(move |k| (k as f32 + 0.5 + o) * d),
    ]
}

/// Encodings from ranges, one in four with min/max moved off the grid (hand-made encodings the
/// kernel must clamp on the index as well).
fn encoding() -> impl Strategy<Value = Encoding> {
    let skew = prop_oneof![3 => Just(1.0f64), 1 => 0.5f64..1.5];
    (2u32..=16, -2.0f64..0.0, 0.0f64..3.0, any::<bool>(), skew).prop_map(|(b, lo, hi, sym, skew)| {
        let spec = if sym { QuantSpec::symmetric(b) } else { QuantSpec::asymmetric(b) };
        let e = Encoding::from_range(lo, hi, spec).unwrap();
        Encoding { min: e.min * skew, max: e.max * (2.0 - skew), ..e }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn fake_quant_is_bit_identical_at_every_level(
        (e, data) in encoding().prop_flat_map(|e| (Just(e), proptest::collection::vec(value(e), 0..300))),
        even in any::<bool>(),
    ) {
        let rounding = if even { Rounding::HalfToEven } else { Rounding::HalfAwayFromZero };
        let want: Vec<u32> = data.iter().map(|&x| reference(x, &e, rounding).to_bits()).collect();
        at_every_level(|level| {
            let mut got = data.clone();
            qkernels::fake_quant_with(&mut got, &e, rounding);
            let got: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "{level:?}");
        });
    }

    #[test]
    fn per_channel_fake_quant_matches_per_tensor_at_every_level(
        encs in proptest::collection::vec(encoding(), 1..5),
        inner in 1usize..40,
        seed in 0u32..1000,
    ) {
        let channels = encs.len();
        let data: Vec<f32> = (0..2 * channels * inner).map(|i| ((i as u32 * 7 + seed) % 61) as f32 / 10.0 - 3.0).collect();
        let mut want = data.clone();
        for (block, chunk) in want.chunks_mut(inner).enumerate() {
            chunk.iter_mut().for_each(|x| *x = reference(*x, &encs[block % channels], Rounding::HalfAwayFromZero));
        }
        at_every_level(|level| {
            let mut got = data.clone();
            qkernels::fake_quant_per_channel(&mut got, &[2, channels, inner], 1, &encs, Rounding::HalfAwayFromZero).unwrap();
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{level:?}");
        });
    }

    #[test]
    fn min_max_ignores_nan_at_every_level(data in proptest::collection::vec(prop_oneof![4 => -1e6f32..1e6, 1 => Just(f32::NAN), 1 => Just(f32::NEG_INFINITY)], 0..200)) {
        let finite: Vec<f32> = data.iter().copied().filter(|x| !x.is_nan()).collect();
        let want = (finite.iter().copied().fold(f32::INFINITY, f32::min), finite.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        at_every_level(|level| {
            let mut m = MinMax::default();
            m.observe(&data);
            assert_eq!((m.min.to_bits(), m.max.to_bits()), (want.0.to_bits(), want.1.to_bits()), "{level:?}");
        });
    }
}

#[test]
fn this_cpu_runs_more_than_the_baseline() {
    // On x86-64 machines of the last decade at least AVX2 is present; the suite above then
    // really compares two or three compiled copies.
    if cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("avx2") {
        assert!(dispatch::available().len() >= 2);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn fake_casts_equal_the_half_crate_at_every_level(bits in proptest::collection::vec(any::<u32>(), 0..300)) {
        let data: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let same = |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        let f16: Vec<f32> = data.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        let bf16: Vec<f32> = data.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        let mut first: Option<Vec<u32>> = None;
        at_every_level(|level| {
            let mut a = data.clone();
            qkernels::fake_cast_f16(&mut a);
            assert!(same(&a, &f16), "f16 at {level:?}");
            // NaN payloads too: every level gives the same bits.
            let bits: Vec<u32> = a.iter().map(|x| x.to_bits()).collect();
            assert_eq!(first.get_or_insert_with(|| bits.clone()), &bits, "f16 bits at {level:?}");
            let mut b = data.clone();
            qkernels::fake_cast_bf16(&mut b);
            assert!(same(&b, &bf16), "bf16 at {level:?}");
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn per_block_fake_quant_matches_the_coordinate_reference(
        dims in proptest::collection::vec(1usize..4, 2..4),
        axes in (0usize..4, 0usize..4),
        block in 1usize..3,
        encs in proptest::collection::vec(encoding(), 64),
    ) {
        let rank = dims.len();
        let (ca, ba) = (axes.0 % rank, axes.1 % rank);
        prop_assume!(ca != ba);
        let mut shape = dims.clone();
        shape[ba] *= block;
        let len: usize = shape.iter().product();
        let enc_shape: Vec<usize> = (0..rank).map(|d| if d == ca { shape[d] } else if d == ba { shape[d] / block } else { 1 }).collect();
        let count: usize = enc_shape.iter().product();
        let encs = &encs[..count];
        let data: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37) % 5.0 - 2.5).collect();
        let want: Vec<u32> = (0..len)
            .map(|flat| {
                let mut rest = flat;
                let mut coords = vec![0; rank];
                for d in (0..rank).rev() {
                    coords[d] = rest % shape[d];
                    rest /= shape[d];
                }
                let idx = (0..rank).fold(0, |acc, d| {
                    let c = if d == ca { coords[d] } else if d == ba { coords[d] / block } else { 0 };
                    acc * enc_shape[d] + c
                });
                reference(data[flat], &encs[idx], Rounding::HalfAwayFromZero).to_bits()
            })
            .collect();
        at_every_level(|level| {
            let mut got = data.clone();
            qkernels::fake_quant_per_block(&mut got, &shape, ca, ba, block, encs, Rounding::HalfAwayFromZero).unwrap();
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "{level:?}");
        });
    }
}

#[test]
fn per_block_layout_errors_name_the_problem() {
    let e = Encoding::from_range(-1.0, 1.0, QuantSpec::symmetric(8)).unwrap();
    let mut data = vec![0f32; 12];
    let err =
        qkernels::fake_quant_per_block(&mut data, &[3, 4], 0, 1, 3, &[e; 4], Rounding::HalfAwayFromZero)
            .unwrap_err();
    assert!(err.to_string().contains("block size 3"), "{err}");
    let err =
        qkernels::fake_quant_per_block(&mut data, &[3, 4], 0, 1, 2, &[e; 5], Rounding::HalfAwayFromZero)
            .unwrap_err();
    assert!(err.to_string().contains("5 encodings"), "{err}");
    assert!(
        qkernels::fake_quant_per_block(&mut data, &[3, 4], 1, 1, 2, &[e; 6], Rounding::HalfAwayFromZero)
            .is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn tf_histogram_counts_as_the_spec_at_every_level(
        first in proptest::collection::vec(-4.0f32..4.0, 1..50),
        second in proptest::collection::vec(prop_oneof![8 => -20.0f32..20.0, 1 => Just(f32::NAN), 1 => Just(f32::INFINITY)], 0..700),
    ) {
        // The second batch, counted on the grid the first one fixed: ⌊x · f32(1/w)⌋ − base.
        let mut fixed = TfHistogram::new();
        fixed.observe(&first);
        let Some((base, width, _, _)) = fixed.parts() else { return Ok(()) };
        let inv = (1.0 / width) as f32;
        let mut counts = vec![0u64; qkernels::TF_BUCKETS];
        for &x in &second {
            let i = f64::from((x * inv).floor()) - base as f64;
            if i >= 0.0 && i < qkernels::TF_BUCKETS as f64 {
                counts[i as usize] += 1;
            }
        }
        at_every_level(|level| {
            let mut h = TfHistogram::new();
            h.observe(&first);
            let before: Vec<f64> = h.parts().unwrap().2.to_vec();
            h.observe(&second);
            let n = second.len().max(1) as f64;
            let want: Vec<u64> = before.iter().zip(&counts).map(|(p, &c)| ((p + c as f64 / n) / 2.0).to_bits()).collect();
            let got: Vec<u64> = h.parts().unwrap().2.iter().map(|p| p.to_bits()).collect();
            assert_eq!(got, want, "{level:?}");
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The fast sums of squared differences and of products agree with the exact f64 sums at every
    /// level.
    #[test]
    fn sums_of_squares_and_products_match_the_f64_sums_at_every_level(
        pairs in proptest::collection::vec((-1e3f32..1e3, -1e3f32..1e3), 0..3000),
    ) {
        let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
        let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
        at_every_level(|level| {
            let fast = qkernels::squared_error_sum(&a, &b);
            assert!((fast - exact).abs() <= 1e-5 * exact.max(1e-30), "{level:?}: {fast} vs {exact}");
            let dot = qkernels::dot_sum(&a, &b);
            let (want, scale): (f64, f64) = a.iter().zip(&b).fold((0.0, 0.0), |(s, m), (&x, &y)| {
                let p = f64::from(x) * f64::from(y);
                (s + p, m + p.abs())
            });
            assert!((dot - want).abs() <= 1e-5 * scale.max(1e-30), "{level:?}: {dot} vs {want}");
        });
    }
}

//! fp16 / bf16 fake-casts: each f32 is rounded to the narrow type (round to nearest even,
//! overflow to ±inf, subnormals kept, NaN stays NaN) and widened back, as AIMET's float16
//! quantizer does (spec §1.5), computed on the bit pattern so the loops vectorise (checked
//! against the `half` crate on every exponent).

/// Rounds every value through IEEE half precision in place.
pub fn fake_cast_f16(data: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::dispatch::detected() >= crate::dispatch::Isa::Avx2 && is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU supports AVX and F16C (checked just above; AVX2 implies AVX).
        #[allow(unsafe_code)]
        unsafe {
            f16c::cast(data)
        };
        return;
    }
    cast_slice(data, false);
}

/// The fp16 fake-cast on the hardware conversions of x86's F16C extension (`vcvtps2ph` with
/// round-to-nearest-even, `vcvtph2ps`): the same bits as [`through_f16`] (subnormals, ±inf on
/// overflow, NaNs quieted with their payload cut to f16's) at memory speed.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod f16c {
    use std::arch::x86_64::{
        _MM_FROUND_TO_NEAREST_INT, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
    };

    #[target_feature(enable = "avx,f16c")]
    pub(super) fn cast(data: &mut [f32]) {
        let mut chunks = data.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            // SAFETY: `c` holds exactly 8 f32, one unaligned 256-bit load and store.
            let x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            let y = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            // SAFETY: as for the load.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), y) };
        }
        chunks.into_remainder().iter_mut().for_each(|x| *x = super::through_f16(*x));
    }
}

/// Rounds every value through bfloat16 in place.
pub fn fake_cast_bf16(data: &mut [f32]) {
    cast_slice(data, true);
}

/// Largest finite f16, and the smallest normal one (2⁻¹⁴).
const F16_MAX: f32 = 65504.0;
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;
/// 2²⁴: f16 subnormals are the multiples of 2⁻²⁴.
const F16_SUBNORMAL_SCALE: f32 = 16_777_216.0;

/// `x` rounded to the nearest f16 (ties to even) and widened back, in f32 arithmetic that
/// vectorises: the mantissa is rounded to 10 bits on the bit pattern (a carry moves into the
/// exponent as it should), f16 subnormals are rounded on the 2⁻²⁴ grid, overflow gives ±inf.
#[inline(always)]
pub(crate) fn through_f16(x: f32) -> f32 {
    let bits = x.to_bits();
    let normal = f32::from_bits(bits.wrapping_add(0x0FFF + ((bits >> 13) & 1)) & !0x1FFF);
    let subnormal = (x * F16_SUBNORMAL_SCALE).round_ties_even() / F16_SUBNORMAL_SCALE;
    let r = if x.abs() < F16_MIN_NORMAL { subnormal } else { normal };
    if x.is_nan() {
        // A quiet NaN with the payload's top 9 bits, as the f16 NaN keeps them (F16C's result).
        f32::from_bits((bits | 0x0040_0000) & !0x1FFF)
    } else if r.abs() > F16_MAX {
        f32::INFINITY.copysign(x)
    } else {
        r
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even) and widened back: bfloat16 is the top
/// half of an f32, so rounding the low 16 bits is the whole cast (overflow carries into ±inf).
#[inline(always)]
pub(crate) fn through_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let r = f32::from_bits(bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000);
    if x.is_nan() { x } else { r }
}

crate::multiversion! {
    /// The fake-cast loop, one copy per format so each vectorises.
    fn cast_slice(data: &mut [f32], bf16: bool) {
        if bf16 {
            data.iter_mut().for_each(|x| *x = through_bf16(*x));
        } else {
            data.iter_mut().for_each(|x| *x = through_f16(*x));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn bit_tricks_equal_the_half_crate_on_every_exponent() {
        // Every f32 exponent, with mantissas on and around rounding ties.
        for exp in 0u32..256 {
            for m in
                [0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x1_8000, 0x7F_FFFF]
            {
                for sign in [0u32, 0x8000_0000] {
                    let x = f32::from_bits(sign | (exp << 23) | m);
                    let (a, b) = (through_f16(x), f16::from_f32(x).to_f32());
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "f16 of {x:e}: {a:e} vs {b:e}"
                    );
                    let (a, b) = (through_bf16(x), bf16::from_f32(x).to_f32());
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "bf16 of {x:e}: {a:e} vs {b:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn half_rounding_matches_the_spec() {
        let mut x = [1.0 + 2f32.powi(-11), 65519.0, 65520.0, f32::NAN, 2f32.powi(-24), -70000.0];
        fake_cast_f16(&mut x);
        assert_eq!(x[0], 1.0);
        assert_eq!(x[1], 65504.0);
        assert_eq!(x[2], f32::INFINITY);
        assert!(x[3].is_nan());
        assert_eq!(x[4], 2f32.powi(-24), "subnormals kept");
        assert_eq!(x[5], f32::NEG_INFINITY);
        // A signalling NaN comes back quiet, its payload cut to f16's 10 bits.
        // Nine values: eight through the vector path (where the CPU has one), one through the tail.
        let mut nan = [f32::from_bits(0xFF80_1FFF), f32::from_bits(0x7FBF_FFFF)].repeat(5);
        fake_cast_f16(&mut nan[1..]);
        assert!(
            nan[1..].iter().zip([0x7FFF_E000, 0xFFC0_0000].iter().cycle()).all(|(x, &b)| x.to_bits() == b)
        );
    }

    #[test]
    fn bfloat_keeps_eight_bits_of_mantissa() {
        let mut x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 3.0e38];
        fake_cast_bf16(&mut x);
        assert_eq!(x[0], 1.0, "tie to even");
        assert_eq!(x[1], 1.0 + 2f32.powi(-6));
        assert!(x[2].is_finite());
    }
}

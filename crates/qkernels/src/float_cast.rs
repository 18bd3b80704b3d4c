//! fp16 / bf16 fake-casts: each f32 is rounded to the narrow type (round to nearest even,
//! overflow to ±inf, subnormals kept, NaN stays NaN) and widened back, as AIMET's float16
//! quantizer does (spec §1.5).

use half::{bf16, f16};

/// Rounds every value through IEEE half precision in place.
pub fn fake_cast_f16(data: &mut [f32]) {
    for x in data {
        *x = f16::from_f32(*x).to_f32();
    }
}

/// Rounds every value through bfloat16 in place.
pub fn fake_cast_bf16(data: &mut [f32]) {
    for x in data {
        *x = bf16::from_f32(*x).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

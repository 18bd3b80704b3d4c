//! Branch-free `exp`, `ln` and `erf` for f32 that the compiler can vectorise (the standard
//! library's call into libm one element at a time). `exp` is Cephes' range reduction with a
//! degree-6 polynomial (relative error ~1e-7); `ln` is Cephes' `logf` (mantissa in [√½, √2), a
//! degree-8 polynomial; error ~1e-7); `erf` uses its Taylor series near 0 and Abramowitz–Stegun
//! 7.1.26 elsewhere (absolute error below 4e-7), like the approximations onnxruntime's MLAS uses.

/// e^x.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E).round();
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let v = y * scale;
    if x > 88.7 {
        f32::INFINITY
    } else if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// The natural logarithm of a positive, finite, normal `x` (others: NaN for negatives, −∞ for 0
/// and subnormals, +∞ for +∞).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    // The mantissa as a value in [0.5, 1).
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    if m < std::f32::consts::FRAC_1_SQRT_2 {
        m += m;
        e -= 1;
    }
    let f = m - 1.0;
    let z = f * f;
    let mut p = 7.037_683_6e-2f32;
    for c in [
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ] {
        p = p * f + c;
    }
    let ef = e as f32;
    let r = f + (f * z * p - 0.5 * z) + ef * -2.121_944_4e-4 + ef * 0.693_359_4;
    if (f32::MIN_POSITIVE..f32::INFINITY).contains(&x) {
        r
    } else if x == f32::INFINITY {
        x
    } else if x >= 0.0 {
        f32::NEG_INFINITY
    } else {
        f32::NAN
    }
}

/// The error function.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    // Taylor series 2/√π (x − x³/3 + x⁵/10 − x⁷/42 + x⁹/216 − x¹¹/1320) for |x| < 0.5.
    let z = x * x;
    let small = x
        * (std::f32::consts::FRAC_2_SQRT_PI
            + z * (-0.376_126_4
                + z * (0.112_837_9 + z * (-0.026_866_17 + z * (0.005_223_977 + z * -0.000_854_833)))));
    // Abramowitz–Stegun 7.1.26 for |x| ≥ 0.5.
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly =
        t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let large = (1.0 - poly * exp(-a * a)).copysign(x);
    if a < 0.5 { small } else { large }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulps() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.043;
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 4e-7 * want, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn ln_matches_std() {
        for i in 1..=40_000 {
            let x = if i % 2 == 0 { i as f32 * 0.000_37 } else { (i as f32 * 0.005 - 100.0).exp2() };
            let (got, want) = (ln(x), x.ln());
            assert!((got - want).abs() <= 3e-7 * (1.0 + want.abs()), "ln({x}) = {got}, want {want}");
        }
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert!(ln(-1.0).is_nan());
    }

    #[test]
    fn erf_is_within_4e7_of_libm() {
        for i in -4000..=4000 {
            let x = i as f32 * 0.0015;
            let (got, want) = (erf(x), libm::erff(x));
            assert!((got - want).abs() <= 4e-7, "erf({x}) = {got}, want {want}");
        }
    }
}

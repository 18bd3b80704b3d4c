//! Integer encodings (scale/offset grids) computed from an observed range, following AIMET's
//! min-max rules (spec §1.1, confirmed by the black-box checks of §12): zero forced into the range,
//! `N = 2^b − 1` steps (one fewer when strict symmetric), a minimum scale of 2⁻²³ for degenerate
//! ranges, offset rounded half away from zero, and min/max re-derived from the grid.

use crate::error::KernelError;

/// The smallest scale an encoding takes (2⁻²³): all-zero and tiny ranges export exactly this.
pub const MIN_SCALE: f64 = 1.0 / 8_388_608.0;

/// How a quantizer maps its range onto the integer grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// Bits: 2..=16, or 32 (bias bookkeeping only).
    pub bitwidth: u32,
    /// Symmetric grid around zero.
    pub symmetric: bool,
    /// Strict symmetric: one step fewer, so the grid is `[−Npos, Npos]`.
    pub strict: bool,
    /// Unsigned symmetric: a symmetric quantizer whose range is non-negative uses offset 0.
    pub unsigned_symmetric: bool,
}

impl QuantSpec {
    /// Asymmetric (activations by default).
    pub fn asymmetric(bitwidth: u32) -> QuantSpec {
        QuantSpec { bitwidth, symmetric: false, strict: false, unsigned_symmetric: false }
    }

    /// Signed symmetric, non-strict (weights by default).
    pub fn symmetric(bitwidth: u32) -> QuantSpec {
        QuantSpec { bitwidth, symmetric: true, strict: false, unsigned_symmetric: false }
    }

    /// Number of steps `N` of the grid.
    pub fn steps(&self) -> f64 {
        let n = 2f64.powi(self.bitwidth as i32) - 1.0;
        if self.symmetric && self.strict { n - 1.0 } else { n }
    }
}

/// A quantization grid: `x ≈ delta · (q + offset)` for integer `q ∈ [0, N]`. Stored in f64 as
/// AIMET's encodings files store them; kernels cast to f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    /// Smallest representable value (`delta · offset`).
    pub min: f64,
    /// Largest representable value (`delta · (offset + N)`).
    pub max: f64,
    /// Step size (scale).
    pub delta: f64,
    /// Offset on the unsigned grid (≤ 0; the zero point is `−offset`).
    pub offset: f64,
    /// Bits.
    pub bitwidth: u32,
    /// Number of steps `N`.
    pub steps: f64,
}

/// C `round`: half away from zero.
fn round_half_away(x: f64) -> f64 {
    x.round()
}

impl Encoding {
    /// The encoding of the observed range `[min, max]` under `spec`.
    pub fn from_range(min: f64, max: f64, spec: QuantSpec) -> Result<Encoding, KernelError> {
        if !(2..=16).contains(&spec.bitwidth) && spec.bitwidth != 32 {
            return Err(KernelError::Bitwidth(spec.bitwidth));
        }
        if min.is_nan() || max.is_nan() {
            return Err(KernelError::NanRange { min, max });
        }
        let limit = 0.99 * f64::from(f32::MAX);
        let mn = min.min(0.0).max(-limit);
        let mx = max.max(0.0).min(limit);
        let n = spec.steps();
        let unsigned = spec.unsigned_symmetric && mn >= 0.0;
        let (mut delta, offset) = if spec.symmetric && !unsigned {
            let npos = (n / 2.0).floor();
            let nneg = n - npos;
            let pos = if n == 3.0 { npos + 1.0 } else { npos };
            ((mx / pos).max(-mn / nneg), -nneg)
        } else {
            let delta = ((mx - mn) / n).max(MIN_SCALE);
            (delta, round_half_away(mn / delta).clamp(-n, 0.0))
        };
        delta = delta.max(MIN_SCALE);
        // Overflow guard: keep the grid ends finite in f32.
        if offset < 0.0 {
            delta = delta.min(limit / -offset);
        }
        if offset + n > 0.0 {
            delta = delta.min(limit / (offset + n));
        }
        let grid_min = delta * offset;
        Ok(Encoding {
            min: grid_min,
            max: grid_min + n * delta,
            delta,
            offset,
            bitwidth: spec.bitwidth,
            steps: n,
        })
    }

    /// An encoding given directly by scale and offset (e.g. loaded from an encodings file).
    pub fn from_scale_offset(delta: f64, offset: f64, bitwidth: u32, steps: f64) -> Encoding {
        let min = delta * offset;
        Encoding { min, max: min + steps * delta, delta, offset, bitwidth, steps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asym(min: f64, max: f64, b: u32) -> Encoding {
        Encoding::from_range(min, max, QuantSpec::asymmetric(b)).unwrap()
    }

    #[test]
    fn asymmetric_examples_of_the_spec() {
        let e = asym(-1.0, 2.0, 8);
        assert_eq!((e.delta, e.offset), (0.011764705882352941, -85.0));
        assert_eq!(asym(-1.0, 2.0, 4).offset, -5.0);
        assert!((asym(-1.0, 2.0, 4).delta - 0.2).abs() < 1e-15);
        let e16 = asym(-1.0, 2.0, 16);
        assert_eq!((e16.delta, e16.offset), (4.5777065690089265e-05, -21845.0));
        let e = asym(0.3, 5.0, 8);
        assert_eq!((e.delta, e.offset), (5.0 / 255.0, 0.0));
        let e = asym(-5.0, -0.3, 8);
        assert_eq!((e.delta, e.offset), (5.0 / 255.0, -255.0));
        let e = asym(-0.7, 1.3, 8);
        assert_eq!(e.offset, -89.0);
        assert!((e.delta - 0.007843137021158256).abs() < 1e-9);
        assert_eq!(e.min, e.delta * e.offset);
        assert_eq!(e.max, e.min + 255.0 * e.delta);
    }

    #[test]
    fn degenerate_ranges_take_the_minimum_scale() {
        for b in [4, 8, 16] {
            for (lo, hi) in [(0.0, 0.0), (0.0, 1e-9), (-1e-9, 1e-9)] {
                let e = asym(lo, hi, b);
                assert_eq!(e.delta, 1.1920928955078125e-07, "[{lo}, {hi}] at {b} bits");
            }
        }
        let e = Encoding::from_range(0.0, 0.0, QuantSpec::symmetric(8)).unwrap();
        assert_eq!(e.delta, MIN_SCALE);
    }

    #[test]
    fn symmetric_uses_the_wider_side() {
        for (b, want) in [(4, 5.0 / 8.0), (8, 5.0 / 128.0), (16, 5.0 / 32768.0)] {
            let e = Encoding::from_range(-5.0, -0.3, QuantSpec::symmetric(b)).unwrap();
            assert_eq!(e.delta, want);
            assert_eq!(e.offset, -(2f64.powi(b as i32 - 1)));
        }
        let e = Encoding::from_range(-1.0, 2.0, QuantSpec::symmetric(8)).unwrap();
        assert_eq!((e.delta, e.offset), (2.0 / 127.0, -128.0));
        let strict = QuantSpec { strict: true, ..QuantSpec::symmetric(8) };
        let e = Encoding::from_range(-1.0, 2.0, strict).unwrap();
        assert_eq!((e.delta, e.offset, e.steps), (2.0 / 127.0, -127.0, 254.0));
    }

    #[test]
    fn unsigned_symmetric_on_a_non_negative_range() {
        let spec = QuantSpec { unsigned_symmetric: true, ..QuantSpec::symmetric(8) };
        let e = Encoding::from_range(0.0, 5.1, spec).unwrap();
        assert_eq!((e.offset, e.delta), (0.0, 5.1 / 255.0));
        let e = Encoding::from_range(-1.0, 5.1, spec).unwrap();
        assert_eq!(e.offset, -128.0);
    }

    #[test]
    fn invalid_settings_are_errors() {
        assert_eq!(Encoding::from_range(0.0, 1.0, QuantSpec::asymmetric(1)), Err(KernelError::Bitwidth(1)));
        assert!(Encoding::from_range(f64::NAN, 1.0, QuantSpec::asymmetric(8)).is_err());
        let e = Encoding::from_range(f64::NEG_INFINITY, f64::INFINITY, QuantSpec::asymmetric(8)).unwrap();
        assert!((e.min as f32).is_finite() && (e.max as f32).is_finite());
    }
}

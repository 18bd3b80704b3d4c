//! Error metrics between a reference and a quantized tensor: MSE, SQNR in dB and AIMET's PSNR
//! exactly as `compute_psnr` defines it (spec §5.2), accumulated in f64 for reports; and the
//! vectorised sums of squared differences and of products the optimisation loops call many times
//! per step.

use crate::error::KernelError;

fn check(a: &[f32], b: &[f32]) -> Result<(), KernelError> {
    if a.len() == b.len() { Ok(()) } else { Err(KernelError::LengthMismatch(a.len(), b.len())) }
}

/// Mean squared error.
pub fn mse(reference: &[f32], actual: &[f32]) -> Result<f64, KernelError> {
    check(reference, actual)?;
    if reference.is_empty() {
        return Ok(0.0);
    }
    let sum: f64 = reference.iter().zip(actual).map(|(&r, &a)| (f64::from(r) - f64::from(a)).powi(2)).sum();
    Ok(sum / reference.len() as f64)
}

crate::multiversion! {
    /// `Σ (a − b)²` over the common length, fast: f32 partial sums in sixteen lanes over runs of
    /// 1,024 values, the runs added up in f64 (relative error of order 1e−7 against [`mse`]'s
    /// exact f64 sum, which reports use).
    pub fn squared_error_sum(a: &[f32], b: &[f32]) -> f64 {
        let mut total = 0.0f64;
        for (a, b) in a.chunks(1024).zip(b.chunks(1024)) {
            let mut acc = [0.0f32; 16];
            let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
            let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| (x - y) * (x - y)).sum();
            for (x, y) in ca.zip(cb) {
                for i in 0..16 {
                    let d = x[i] - y[i];
                    acc[i] += d * d;
                }
            }
            total += acc.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(tail);
        }
        total
    }
}

crate::multiversion! {
    /// `Σ a·b` over the common length, summed as [`squared_error_sum`] sums.
    pub fn dot_sum(a: &[f32], b: &[f32]) -> f64 {
        let mut total = 0.0f64;
        for (a, b) in a.chunks(1024).zip(b.chunks(1024)) {
            let mut acc = [0.0f32; 16];
            let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
            let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
            for (x, y) in ca.zip(cb) {
                for i in 0..16 {
                    acc[i] += x[i] * y[i];
                }
            }
            total += acc.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(tail);
        }
        total
    }
}

/// Signal-to-quantization-noise ratio in dB: `10·log10(Σ ref² / Σ (ref − actual)²)`; `+inf` when
/// the tensors are equal.
pub fn sqnr_db(reference: &[f32], actual: &[f32]) -> Result<f64, KernelError> {
    check(reference, actual)?;
    let (mut signal, mut noise) = (0f64, 0f64);
    for (&r, &a) in reference.iter().zip(actual) {
        signal += f64::from(r).powi(2);
        noise += (f64::from(r) - f64::from(a)).powi(2);
    }
    Ok(10.0 * (signal / noise).log10())
}

/// AIMET's PSNR: `range = max(max(e) − min(e), max|e|)` floored at 1e−10, `noise = sqrt(mse)`
/// floored at 1e−15, `20·log10(range/noise)` clipped to [−100, 100]; −100 when `actual` holds a
/// non-finite value. `expected` must be finite (AIMET raises otherwise; here: `None`).
pub fn psnr_aimet(expected: &[f32], actual: &[f32]) -> Result<Option<f64>, KernelError> {
    const MAX_PSNR: f64 = 100.0;
    check(expected, actual)?;
    if expected.iter().any(|v| !v.is_finite()) {
        return Ok(None);
    }
    if actual.iter().any(|v| !v.is_finite()) {
        return Ok(Some(-MAX_PSNR));
    }
    let (lo, hi, amax) =
        expected.iter().fold((f64::INFINITY, f64::NEG_INFINITY, 0f64), |(lo, hi, am), &v| {
            let v = f64::from(v);
            (lo.min(v), hi.max(v), am.max(v.abs()))
        });
    let range = if expected.is_empty() { 0.0 } else { (hi - lo).max(amax) }.max(1e-10);
    let noise = mse(expected, actual)?.sqrt().max(1e-10 * 10f64.powf(-MAX_PSNR / 20.0));
    Ok(Some((20.0 * (range / noise).log10()).clamp(-MAX_PSNR, MAX_PSNR)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_values() {
        let r = [1.0f32, -1.0, 2.0, 0.0];
        let a = [1.0f32, -1.0, 1.0, 0.0];
        assert_eq!(mse(&r, &a).unwrap(), 0.25);
        assert!((sqnr_db(&r, &a).unwrap() - 10.0 * 6f64.log10()).abs() < 1e-12);
        // range = max(2 − (−1), 2) = 3; noise = 0.5 ⇒ 20·log10(6).
        assert!((psnr_aimet(&r, &a).unwrap().unwrap() - 20.0 * 6f64.log10()).abs() < 1e-12);
        assert_eq!(psnr_aimet(&r, &r).unwrap(), Some(100.0));
        assert_eq!(psnr_aimet(&r, &[f32::NAN, 0.0, 0.0, 0.0]).unwrap(), Some(-100.0));
        assert_eq!(psnr_aimet(&[f32::INFINITY], &[0.0]).unwrap(), None);
        assert!(mse(&r, &a[..2]).is_err());
        assert_eq!(squared_error_sum(&r, &a), 1.0);
        assert_eq!(dot_sum(&r, &a), 4.0);
    }
}

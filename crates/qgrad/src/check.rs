//! Gradient checks against central finite differences (as JAX's `check_grads` and PyTorch's
//! `gradcheck`): every rule of this crate is tested with them, and so can be a caller's loss.

/// `∂f/∂x` by central differences of step `eps`, `f` evaluated in f64.
pub fn numeric_gradient(f: &mut dyn FnMut(&[f32]) -> f64, x: &[f32], eps: f32) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = probe[i];
            probe[i] = orig + eps;
            let up = f(&probe);
            probe[i] = orig - eps;
            let down = f(&probe);
            probe[i] = orig;
            let h = f64::from(orig + eps) - f64::from(orig - eps);
            (up - down) / h
        })
        .collect()
}

/// Whether every analytic gradient is within `tol·(1 + |numeric|)` of the numeric one; the first
/// mismatch as an error.
pub fn compare(analytic: &[f32], numeric: &[f64], tol: f64) -> Result<(), String> {
    if analytic.len() != numeric.len() {
        return Err(format!("{} analytic against {} numeric values", analytic.len(), numeric.len()));
    }
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        if (f64::from(a) - n).abs() > tol * (1.0 + n.abs()) {
            return Err(format!("element {i}: analytic {a}, numeric {n}"));
        }
    }
    Ok(())
}

/// `n` deterministic pseudo-random values in `[-1, 1)` from `seed` (a linear congruential
/// generator): test inputs that are the same on every machine.
pub fn sample_values(n: usize, seed: u64) -> Vec<f32> {
    let step = |s: u64| s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    let mut s = step(seed);
    (0..n)
        .map(|_| {
            s = step(s);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

//! The straight-through estimator of fake-quant (AIMET's and LSQ's): the gradient passes where
//! the input lies inside the encoding's range and stops where it is clamped; the gradients of
//! the scale and offset that range learning needs treat rounding as the identity.

use qkernels::Encoding;

/// Gradients of a loss by an encoding's scale and offset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EncodingGrad {
    /// By the scale `Δ`.
    pub delta: f64,
    /// By the offset (as a continuous value).
    pub offset: f64,
}

/// Backward of `y = Δ·(clamp(round(x/Δ − o), 0, N) + o)` (inputs outside `[min, max]` clamp):
/// writes `∂L/∂x` into `dx` from `dy = ∂L/∂y` and returns `∂L/∂Δ`, `∂L/∂o`.
pub fn fake_quant_backward(x: &[f32], enc: &Encoding, dy: &[f32], dx: &mut [f32]) -> EncodingGrad {
    let mut grad = EncodingGrad::default();
    for ((&x, &g), d) in x.iter().zip(dy).zip(dx.iter_mut()) {
        *d = element_backward(x, g, enc, &mut grad);
    }
    grad
}

/// [`fake_quant_backward`] of a tensor with several encodings (per channel or per block):
/// element `i` is on encoding `index[i]`, whose gradients accumulate in `grads[index[i]]`.
pub fn fake_quant_backward_indexed(
    x: &[f32],
    encs: &[Encoding],
    index: &[usize],
    dy: &[f32],
    dx: &mut [f32],
    grads: &mut [EncodingGrad],
) {
    for (((&x, &g), d), &e) in x.iter().zip(dy).zip(dx.iter_mut()).zip(index) {
        if let (Some(enc), Some(grad)) = (encs.get(e), grads.get_mut(e)) {
            *d = element_backward(x, g, enc, grad);
        }
    }
}

/// One element's input gradient; its scale and offset gradients are added to `grad`.
#[inline]
fn element_backward(x: f32, g: f32, enc: &Encoding, grad: &mut EncodingGrad) -> f32 {
    let (delta, offset, n) = (enc.delta, enc.offset, enc.steps);
    let t = f64::from(x) / delta - offset;
    let g64 = f64::from(g);
    if t < 0.0 {
        grad.delta += g64 * offset;
        grad.offset += g64 * delta;
        0.0
    } else if t > n {
        grad.delta += g64 * (n + offset);
        grad.offset += g64 * delta;
        0.0
    } else {
        grad.delta += g64 * (t.round() - t);
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{compare, numeric_gradient};
    use qkernels::QuantSpec;

    /// The estimator's surrogate: fake-quant with each rounding residual `r − t` held constant.
    fn surrogate(x: &[f32], residual: &[f64], delta: f64, offset: f64, n: f64) -> Vec<f64> {
        x.iter()
            .zip(residual)
            .map(|(&x, &r)| {
                let t = f64::from(x) / delta - offset;
                let q = if t < 0.0 {
                    0.0
                } else if t > n {
                    n
                } else {
                    t + r
                };
                delta * (q + offset)
            })
            .collect()
    }

    #[test]
    fn the_estimator_is_the_gradient_of_its_surrogate() {
        let enc = Encoding::from_range(-1.0, 2.0, QuantSpec::asymmetric(4)).unwrap();
        let x: Vec<f32> = (0..40).map(|i| -1.7 + i as f32 * 0.1 + 0.013).collect();
        let dy: Vec<f32> = (0..40).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let mut dx = vec![0.0; 40];
        let grad = fake_quant_backward(&x, &enc, &dy, &mut dx);
        let residual: Vec<f64> = x
            .iter()
            .map(|&x| {
                let t = f64::from(x) / enc.delta - enc.offset;
                t.round() - t
            })
            .collect();
        let loss = |x: &[f32], delta: f64, offset: f64| -> f64 {
            surrogate(x, &residual, delta, offset, enc.steps)
                .iter()
                .zip(&dy)
                .map(|(y, &g)| y * f64::from(g))
                .sum()
        };
        let num_x = numeric_gradient(&mut |v: &[f32]| loss(v, enc.delta, enc.offset), &x, 1e-3);
        compare(&dx, &num_x, 1e-3).unwrap();
        let h = 1e-6;
        let d_delta = (loss(&x, enc.delta + h, enc.offset) - loss(&x, enc.delta - h, enc.offset)) / (2.0 * h);
        let d_offset =
            (loss(&x, enc.delta, enc.offset + h) - loss(&x, enc.delta, enc.offset - h)) / (2.0 * h);
        assert!((grad.delta - d_delta).abs() < 1e-4, "{} vs {d_delta}", grad.delta);
        assert!((grad.offset - d_offset).abs() < 1e-4, "{} vs {d_offset}", grad.offset);
    }
}

//! Reconstruction losses on channel-major `[C, m]` outputs, with their gradients: AIMET's
//! AdaRound loss and the row kernels the fused reconstruction pass shares with it.

use crate::activation::Activation;

/// AIMET's AdaRound reconstruction loss: the squared L2 norm over channels of `out − target`,
/// averaged over the `m` columns (samples × positions). Writes `∂loss/∂out` into `grad` and
/// returns the loss.
pub fn channel_mse(out: &[f32], target: &[f32], m: usize, grad: &mut [f32]) -> f64 {
    error_row(out, target, 2.0 / m.max(1) as f32, grad) / m.max(1) as f64
}

/// [`channel_mse`] of `act(pre)` against `target`, in one pass for the clipping activations:
/// writes `∂loss/∂pre` into `grad` and `act(pre)` into `out`; returns the loss.
pub fn channel_mse_after(
    act: Option<&Activation>,
    pre: &[f32],
    target: &[f32],
    m: usize,
    out: &mut [f32],
    grad: &mut [f32],
) -> f64 {
    let scale = 2.0 / m.max(1) as f32;
    let sum = match act {
        None => {
            out.copy_from_slice(pre);
            error_row(pre, target, scale, grad)
        }
        Some(a) => match a.clip_bounds() {
            Some((lo, hi)) => {
                grad.copy_from_slice(pre);
                clipped_row(grad, 0.0, lo, hi, target, scale, out)
            }
            None => {
                a.forward(pre, out, m);
                let sum = error_row(out, target, scale, grad);
                a.backward(pre, out, grad, m);
                sum
            }
        },
    };
    sum / m.max(1) as f64
}

qkernels::multiversion! {
    /// `scale·(out − target)` into `grad`; returns `Σ (out − target)²`.
    pub(crate) fn error_row(out: &[f32], target: &[f32], scale: f32, grad: &mut [f32]) -> f64 {
        let n = grad.len();
        let (out, target) = (&out[..n], &target[..n]);
        for i in 0..n {
            grad[i] = scale * (out[i] - target[i]);
        }
        qkernels::squared_error_sum(out, target)
    }
}

qkernels::multiversion! {
    /// The loss row of a clipping activation: `row` holds pre-activations less `bias` and becomes
    /// `scale·(clip(pre) − target)` where the clip passes the gradient, else 0; `out` receives
    /// `clip(pre)`. Returns `Σ (clip(pre) − target)²`.
    pub(crate) fn clipped_row(row: &mut [f32], bias: f32, lo: f32, hi: f32, target: &[f32], scale: f32, out: &mut [f32]) -> f64 {
        let n = row.len();
        let (target, out) = (&target[..n], &mut out[..n]);
        for i in 0..n {
            let pre = row[i] + bias;
            let above = if pre > lo { pre } else { lo };
            let y = if above < hi { above } else { hi };
            out[i] = y;
            row[i] = if pre > lo && pre < hi { scale * (y - target[i]) } else { 0.0 };
        }
        qkernels::squared_error_sum(out, target)
    }
}

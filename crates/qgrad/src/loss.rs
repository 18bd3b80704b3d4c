//! Reconstruction losses on channel-major `[C, m]` outputs, with their gradients.

use crate::activation::Activation;

/// AIMET's AdaRound reconstruction loss: the squared L2 norm over channels of `out − target`,
/// averaged over the `m` columns (samples × positions). Writes `∂loss/∂out` into `grad` and
/// returns the loss.
pub fn channel_mse(out: &[f32], target: &[f32], m: usize, grad: &mut [f32]) -> f64 {
    let scale = 2.0 / m.max(1) as f32;
    let mut sum = 0.0f64;
    // f32 partial sums in eight lanes over short chunks (vectorisable), added up in f64.
    for ((g, o), t) in grad.chunks_mut(1024).zip(out.chunks(1024)).zip(target.chunks(1024)) {
        let mut acc = [0.0f32; 8];
        for ((g, o), t) in g.chunks_mut(8).zip(o.chunks(8)).zip(t.chunks(8)) {
            for i in 0..g.len() {
                let d = o[i] - t[i];
                g[i] = scale * d;
                acc[i] += d * d;
            }
        }
        sum += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    sum / m.max(1) as f64
}

/// [`channel_mse`] of `act(pre)` against `target`, in one pass for the elementwise activations:
/// writes `∂loss/∂pre` into `grad` and `act(pre)` into `out`; returns the loss.
pub fn channel_mse_after(
    act: Option<&Activation>,
    pre: &[f32],
    target: &[f32],
    m: usize,
    out: &mut [f32],
    grad: &mut [f32],
) -> f64 {
    match act {
        None => {
            out.copy_from_slice(pre);
            channel_mse(pre, target, m, grad)
        }
        Some(Activation::Clip { min, max }) => clipped_mse(pre, target, m, *min, *max, grad, out),
        Some(Activation::Relu) => clipped_mse(pre, target, m, 0.0, f32::INFINITY, grad, out),
        Some(a) => {
            a.forward(pre, out, m);
            let loss = channel_mse(out, target, m, grad);
            a.backward(pre, out, grad, m);
            loss
        }
    }
}

/// One pass of `clip(pre)`, its loss and gradient.
fn clipped_mse(
    pre: &[f32],
    target: &[f32],
    m: usize,
    lo: f32,
    hi: f32,
    grad: &mut [f32],
    out: &mut [f32],
) -> f64 {
    let scale = 2.0 / m.max(1) as f32;
    let mut sum = 0.0f64;
    for (((g, o), p), t) in
        grad.chunks_mut(1024).zip(out.chunks_mut(1024)).zip(pre.chunks(1024)).zip(target.chunks(1024))
    {
        let mut acc = [0.0f32; 8];
        for (((g, o), p), t) in g.chunks_mut(8).zip(o.chunks_mut(8)).zip(p.chunks(8)).zip(t.chunks(8)) {
            for i in 0..g.len() {
                let y = p[i].max(lo).min(hi);
                o[i] = y;
                let d = y - t[i];
                g[i] = if p[i] > lo && p[i] < hi { scale * d } else { 0.0 };
                acc[i] += d * d;
            }
        }
        sum += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    sum / m.max(1) as f64
}

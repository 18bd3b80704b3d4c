//! Optimizers over flat parameter slices: Adam (PyTorch's defaults and update rule) and SGD with
//! momentum. Large slices are updated in chunks on the thread pool.

use rayon::prelude::*;

/// Parameters per parallel chunk of an update.
const CHUNK: usize = 1 << 15;

/// Adam (Kingma & Ba), with bias correction, as `torch.optim.Adam` computes it.
#[derive(Debug, Clone)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    /// Adam over `len` parameters at learning rate `lr`, betas (0.9, 0.999), eps 1e-8.
    pub fn new(len: usize, lr: f32) -> Adam {
        Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, m: vec![0.0; len], v: vec![0.0; len], t: 0 }
    }

    /// The first and second moments and the step count (what a checkpoint keeps).
    pub fn state(&self) -> (&[f32], &[f32], i32) {
        (&self.m, &self.v, self.t)
    }

    /// Restores [`Adam::state`]; `false` (and nothing changed) when the lengths differ from
    /// this optimizer's.
    pub fn restore(&mut self, m: &[f32], v: &[f32], t: i32) -> bool {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return false;
        }
        self.m.copy_from_slice(m);
        self.v.copy_from_slice(v);
        self.t = t;
        true
    }

    /// One update of `params` by `grads`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        self.t = self.t.saturating_add(1);
        let c1 = 1.0 - self.beta1.powi(self.t);
        let c2 = 1.0 - self.beta2.powi(self.t);
        let step = self.lr / c1;
        let c2_sqrt = c2.sqrt();
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let chunks = params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK))
            .zip(self.v.par_chunks_mut(CHUNK));
        chunks.for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                // Moments that decay below f32's normal range are flushed to zero: subnormal
                // arithmetic is two orders of magnitude slower and changes nothing here.
                let mn = b1 * *m + (1.0 - b1) * g;
                let vn = b2 * *v + (1.0 - b2) * g * g;
                *m = if mn.abs() < f32::MIN_POSITIVE { 0.0 } else { mn };
                *v = if vn < f32::MIN_POSITIVE { 0.0 } else { vn };
                *p -= step * *m / (v.sqrt() / c2_sqrt + eps);
            }
        });
    }
}

/// Stochastic gradient descent with momentum (PyTorch's form: `buf = μ·buf + g`, `p −= lr·buf`).
#[derive(Debug, Clone)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum.
    pub momentum: f32,
    buf: Vec<f32>,
}

impl Sgd {
    /// SGD over `len` parameters.
    pub fn new(len: usize, lr: f32, momentum: f32) -> Sgd {
        Sgd { lr, momentum, buf: vec![0.0; len] }
    }

    /// One update of `params` by `grads`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        for ((p, &g), b) in params.iter_mut().zip(grads).zip(&mut self.buf) {
            *b = self.momentum * *b + g;
            *p -= self.lr * *b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_minimises_a_quadratic() {
        let mut x = vec![3.0f32, -2.0];
        let mut adam = Adam::new(2, 0.05);
        for _ in 0..2000 {
            let g: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
            adam.step(&mut x, &g);
        }
        assert!(x.iter().all(|v| v.abs() < 1e-2), "{x:?}");
    }

    #[test]
    fn adam_first_step_is_lr_times_sign() {
        // With bias correction the first step is lr·g/(|g| + eps).
        let mut x = vec![1.0f32, 1.0];
        Adam::new(2, 1e-3).step(&mut x, &[0.5, -4.0]);
        assert!((x[0] - (1.0 - 1e-3)).abs() < 1e-6 && (x[1] - (1.0 + 1e-3)).abs() < 1e-6, "{x:?}");
    }

    #[test]
    fn sgd_with_momentum_accumulates() {
        let mut x = vec![0.0f32];
        let mut sgd = Sgd::new(1, 0.1, 0.9);
        sgd.step(&mut x, &[1.0]);
        sgd.step(&mut x, &[1.0]);
        assert!((x[0] + 0.1 + 0.19).abs() < 1e-6, "{x:?}");
    }
}

//! Running statistics for calibration: NaN-aware min/max per tensor and per channel. They keep
//! only extremes, never raw activations, so calibration memory is bounded.

use crate::error::KernelError;

/// Running min/max over every value observed (NaNs ignored). Empty until a finite or infinite
/// value is seen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinMax {
    /// Smallest value seen (`+inf` when none).
    pub min: f32,
    /// Largest value seen (`−inf` when none).
    pub max: f32,
}

impl Default for MinMax {
    fn default() -> Self {
        MinMax { min: f32::INFINITY, max: f32::NEG_INFINITY }
    }
}

impl MinMax {
    /// Folds `data` into the running extremes.
    pub fn observe(&mut self, data: &[f32]) {
        let (mn, mx) = extremes(data);
        self.min = self.min.min(mn);
        self.max = self.max.max(mx);
    }

    /// Whether any non-NaN value was observed.
    pub fn is_empty(&self) -> bool {
        self.min > self.max
    }

    /// Merges another running statistic (e.g. from another thread).
    pub fn merge(&mut self, other: &MinMax) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// Lanes of [`extremes`]: four AVX2 registers (two AVX-512 ones) of independent running extremes,
/// so the loop is bound by loads rather than by the latency of one min/max chain.
const LANES: usize = 32;

crate::multiversion! {
    /// Smallest and largest non-NaN value (`(+inf, −inf)` when there is none), over interleaved
    /// lanes so the loop vectorises. A compare-and-select (`x < lo`) is one min instruction and
    /// skips a NaN `x` (the comparison is false), where `f32::min` needs extra NaN handling.
    fn extremes(data: &[f32]) -> (f32, f32) {
        let mut lo = [f32::INFINITY; LANES];
        let mut hi = [f32::NEG_INFINITY; LANES];
        let mut chunks = data.chunks_exact(LANES);
        for c in chunks.by_ref() {
            for i in 0..LANES {
                lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
                hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
            }
        }
        for (i, &x) in chunks.remainder().iter().enumerate() {
            lo[i] = if x < lo[i] { x } else { lo[i] };
            hi[i] = if x > hi[i] { x } else { hi[i] };
        }
        (lo.iter().copied().fold(f32::INFINITY, f32::min), hi.iter().copied().fold(f32::NEG_INFINITY, f32::max))
    }
}

/// Running min/max per index of one axis.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMinMax {
    /// One statistic per channel.
    pub channels: Vec<MinMax>,
    axis: usize,
}

impl ChannelMinMax {
    /// Statistics for `channels` channels along `axis`.
    pub fn new(channels: usize, axis: usize) -> ChannelMinMax {
        ChannelMinMax { channels: vec![MinMax::default(); channels], axis }
    }

    /// Folds a row-major tensor of `shape` into the per-channel extremes.
    pub fn observe(&mut self, data: &[f32], shape: &[usize]) -> Result<(), KernelError> {
        let axis = self.axis;
        if axis >= shape.len()
            || shape[axis] != self.channels.len()
            || shape.iter().product::<usize>() != data.len()
        {
            return Err(KernelError::Layout(format!(
                "shape {shape:?} of {} elements does not have {} channels on axis {axis}",
                data.len(),
                self.channels.len()
            )));
        }
        let inner: usize = shape[axis + 1..].iter().product();
        if inner == 0 {
            return Ok(());
        }
        let c = self.channels.len();
        for (block, chunk) in data.chunks(inner).enumerate() {
            self.channels[block % c].observe(chunk);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_values_are_ignored() {
        let mut m = MinMax::default();
        assert!(m.is_empty());
        m.observe(&[f32::NAN, 2.0, -1.0, f32::NAN]);
        assert_eq!((m.min, m.max), (-1.0, 2.0));
        let mut n = MinMax::default();
        n.observe(&[f32::NAN]);
        assert!(n.is_empty());
    }

    #[test]
    fn per_channel_extremes() {
        let mut s = ChannelMinMax::new(2, 1);
        s.observe(&[1.0, -5.0, 3.0, 7.0], &[2, 2]).unwrap();
        assert_eq!((s.channels[0].min, s.channels[0].max), (1.0, 3.0));
        assert_eq!((s.channels[1].min, s.channels[1].max), (-5.0, 7.0));
        assert!(s.observe(&[1.0; 3], &[3, 1]).is_err());
    }
}

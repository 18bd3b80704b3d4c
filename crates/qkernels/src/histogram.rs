//! Histograms for calibration schemes that look at the shape of a distribution, not only its
//! extremes. Both keep a fixed number of counters, never raw activations, so memory is bounded.
//!
//! - [`TfHistogram`]: the PDF of AIMET 2.42's TF-enhanced analyzer: 1536 buckets over the first
//!   non-all-zero batch's range widened 3× about its centre, bucket edges on multiples of the
//!   bucket width; later values outside it are dropped; each batch's normalised counts are
//!   averaged with equal weight per batch.
//! - [`MergeableHistogram`]: a zero-centred histogram whose range doubles (pairs of bins merge
//!   exactly) when data exceeds it, so no value is ever dropped and two histograms — from two
//!   threads, shards or machines — merge exactly and in any order into the same result.

/// Buckets of the TF-enhanced PDF: three times the 512 buckets that span the first batch.
pub const TF_BUCKETS: usize = 1536;

/// Largest magnitude of the first bucket's grid index (2⁵³): every bucket index stays exact in
/// f64 and far from i64 overflow.
const MAX_BASE: i64 = 1 << 53;

/// AIMET 2.42's TF-enhanced histogram (a running mean of per-batch PDFs over a fixed range).
///
/// The arithmetic is AIMET's, measured bucket for bucket against its compiled analyzer: the
/// first batch's extremes `mn`, `mx` (float32) give the centre `c = (mx + mn)/2`, the widened
/// range `lo = c − 3(c − mn)`, `hi = c + 3(mx − c)` (float32), the bucket width
/// `w = (hi − lo)/1536` (f64) and the first bucket `base = ⌊lo/w⌋`, so bucket `i` starts at
/// `(base + i)·w`. A value `x` falls in bucket `⌊x · f32(1/w)⌋ − base`, the product in float32.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TfHistogram {
    /// First bucket's index on the grid of multiples of the width, and the width, once initialised.
    range: Option<(i64, f64)>,
    pdf: Vec<f64>,
    batches: u64,
}

crate::multiversion! {
    /// The TF-enhanced bucket of each value, `⌊x · inv⌋ − base` with the product in float32, or
    /// `u32::MAX` for NaN, infinite and out-of-range values (which are dropped). Apart from the
    /// counting, so this part vectorises.
    fn tf_buckets(values: &[f32], inv: f32, base: f64, buckets: &mut [u32]) {
        for (b, &x) in buckets.iter_mut().zip(values) {
            let i = f64::from((x * inv).floor()) - base;
            *b = if i >= 0.0 && i < TF_BUCKETS as f64 { i as u32 } else { u32::MAX };
        }
    }
}

/// The first batch's grid: `(base, width)`, or `None` when the batch cannot fix one (no finite
/// value, only zeros, or a range that overflows float32).
fn tf_grid(batch: &[f32]) -> Option<(i64, f64)> {
    let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in batch.iter().filter(|x| x.is_finite()) {
        mn = mn.min(x);
        mx = mx.max(x);
    }
    if mn > mx || (mn == 0.0 && mx == 0.0) {
        return None;
    }
    if mn == mx {
        mx = mn + 0.01;
    }
    let c = (mx + mn) / 2.0;
    let (lo, hi) = (c - 3.0 * (c - mn), c + 3.0 * (mx - c));
    let width = (f64::from(hi) - f64::from(lo)) / TF_BUCKETS as f64;
    let base = (f64::from(lo) / width).floor();
    (width.is_finite() && width > 0.0 && base.abs() < MAX_BASE as f64).then_some((base as i64, width))
}

impl TfHistogram {
    /// An empty (uninitialised) histogram.
    pub fn new() -> TfHistogram {
        TfHistogram::default()
    }

    /// Adds one batch. The first batch that is not all zeros (NaNs and infinities ignored) fixes
    /// the range; batches before it are ignored; after it, values outside the range are dropped
    /// but still count in the batch size the PDF is normalised by.
    pub fn observe(&mut self, batch: &[f32]) {
        if self.range.is_none() {
            let Some(grid) = tf_grid(batch) else { return };
            self.range = Some(grid);
            self.pdf = vec![0.0; TF_BUCKETS];
        }
        let Some((base, width)) = self.range else { return };
        let inv = (1.0 / width) as f32;
        let mut counts = [0u64; TF_BUCKETS];
        let mut buckets = [0u32; 256];
        for chunk in batch.chunks(buckets.len()) {
            let buckets = &mut buckets[..chunk.len()];
            tf_buckets(chunk, inv, base as f64, buckets);
            for &b in buckets.iter() {
                if let Some(c) = counts.get_mut(b as usize) {
                    *c += 1;
                }
            }
        }
        let n = batch.len().max(1) as f64;
        let b = self.batches as f64;
        for (p, &c) in self.pdf.iter_mut().zip(&counts) {
            // An empty bucket stays exactly 0: skip it (most of a weight channel's buckets).
            if c != 0 || *p != 0.0 {
                *p = (*p * b + c as f64 / n) / (b + 1.0);
            }
        }
        self.batches += 1;
    }

    /// The saved form: the first bucket's index on the width grid, the bucket width, the PDF and
    /// the batch count (`None` before initialisation).
    pub fn parts(&self) -> Option<(i64, f64, &[f64], u64)> {
        self.range.map(|(base, w)| (base, w, self.pdf.as_slice(), self.batches))
    }

    /// Rebuilds a histogram from [`TfHistogram::parts`]: exactly [`TF_BUCKETS`] finite,
    /// non-negative PDF values, a finite positive width and finite bucket edges.
    pub fn from_parts(
        base: i64,
        width: f64,
        pdf: Vec<f64>,
        batches: u64,
    ) -> Result<TfHistogram, crate::KernelError> {
        let valid = width.is_finite()
            && width > 0.0
            && base.unsigned_abs() < MAX_BASE as u64
            && (base as f64 * width).is_finite()
            && ((base as f64 + TF_BUCKETS as f64) * width).is_finite()
            && pdf.len() == TF_BUCKETS
            && pdf.iter().all(|p| p.is_finite() && *p >= 0.0);
        if !valid {
            return Err(crate::KernelError::Layout(format!(
                "histogram of {} buckets from bucket {base} of width {width} is not a valid TF-enhanced PDF \
                 ({TF_BUCKETS} buckets expected)",
                pdf.len()
            )));
        }
        Ok(TfHistogram { range: Some((base, width)), pdf, batches })
    }

    /// Whether a non-zero batch has fixed the range.
    pub fn is_initialised(&self) -> bool {
        self.range.is_some()
    }

    /// The bucket width (`None` before initialisation).
    pub fn width(&self) -> Option<f64> {
        self.range.map(|(_, w)| w)
    }

    /// Left edge of bucket `i` (any `i`, also outside the histogram): `(base + i)·width`.
    /// `None` before initialisation.
    pub fn edge(&self, i: i64) -> Option<f64> {
        self.range.map(|(base, w)| (base as f64 + i as f64) * w)
    }

    /// The bucket `x` falls in on the width grid, relative to bucket 0 (negative or beyond the
    /// last bucket for values outside the histogram), `⌊x/width⌋ − base` in f64. `None` before
    /// initialisation.
    pub fn bucket_of(&self, x: f64) -> Option<f64> {
        self.range.map(|(base, w)| (x / w).floor() - base as f64)
    }

    /// Left edge of every bucket (`xLeft`), empty before initialisation.
    pub fn x_left(&self) -> Vec<f64> {
        self.range.map_or_else(Vec::new, |(base, w)| {
            (0..TF_BUCKETS as i64).map(|i| (base + i) as f64 * w).collect()
        })
    }

    /// The averaged PDF, one value per bucket (empty before initialisation).
    pub fn pdf(&self) -> &[f64] {
        &self.pdf
    }

    /// AIMET's `_findRangeOfAggregateStats`: the left edges of the first and last non-empty
    /// buckets (the last searched down to bucket 1), zero included, at least 0.01 wide.
    /// `None` before initialisation.
    pub fn range_of_stats(&self) -> Option<(f64, f64)> {
        let (base, w) = self.range?;
        let first = self.pdf.iter().position(|&p| p > 0.0).unwrap_or(0);
        let last = (1..TF_BUCKETS).rev().find(|&i| self.pdf[i] > 0.0).unwrap_or(TF_BUCKETS - 1);
        let mn = ((base + first as i64) as f64 * w).min(0.0);
        let mx = ((base + last as i64) as f64 * w).max(0.0).max(mn + 0.01);
        Some((mn, mx))
    }
}

/// A zero-centred histogram over `[-half_range, half_range)` with a fixed, even bin count; the
/// range doubles when data falls outside it (bins merge in pairs, so counts stay exact).
#[derive(Debug, Clone, PartialEq)]
pub struct MergeableHistogram {
    counts: Vec<u64>,
    /// Half the covered range; 0 until the first non-zero finite value.
    half_range: f64,
    /// Values equal to zero seen before any non-zero value set the range.
    pending_zeros: u64,
    /// NaN and infinite values seen (not binned).
    non_finite: u64,
}

impl MergeableHistogram {
    /// An empty histogram with `bins` bins (rounded up to an even count, at least 2).
    pub fn new(bins: usize) -> MergeableHistogram {
        MergeableHistogram {
            counts: vec![0; bins.max(2).next_multiple_of(2)],
            half_range: 0.0,
            pending_zeros: 0,
            non_finite: 0,
        }
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.counts.len()
    }

    /// The covered range `[-h, h)` as `h` (0 while only zeros were seen).
    pub fn half_range(&self) -> f64 {
        self.half_range
    }

    /// Bin counts, bin `i` covering `[-h + i·2h/bins, -h + (i+1)·2h/bins)`.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// NaN and infinite values seen (they are not binned).
    pub fn non_finite(&self) -> u64 {
        self.non_finite
    }

    /// Total values binned (zeros seen before the range was known included).
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.pending_zeros
    }

    /// Widens the range to `target` (a power of two): the first range just takes it (zeros seen
    /// so far go to the middle bin); later ones double, merging bins in pairs, so counts stay
    /// exact and two histograms always reach a common range.
    fn widen_to(&mut self, target: f64) {
        if self.half_range == 0.0 {
            self.half_range = target;
            let mid = self.counts.len() / 2;
            self.counts[mid] += std::mem::take(&mut self.pending_zeros);
            return;
        }
        while self.half_range < target {
            let n = self.counts.len();
            let mut merged = vec![0u64; n];
            for (i, pair) in self.counts.chunks_exact(2).enumerate() {
                merged[n / 4 + i] = pair[0] + pair[1];
            }
            self.counts = merged;
            self.half_range *= 2.0;
        }
    }

    fn bin_of(&self, x: f64) -> usize {
        let n = self.counts.len();
        (((x + self.half_range) / (2.0 * self.half_range) * n as f64).floor() as usize).min(n - 1)
    }

    /// Adds values (NaN and infinities are only counted).
    pub fn observe(&mut self, data: &[f32]) {
        let peak = data.iter().filter(|x| x.is_finite()).fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        if peak > 0.0 {
            // The smallest power of two strictly above the peak.
            self.widen_to(2f64.powi(peak.log2().floor() as i32 + 1));
        }
        for &x in data {
            if !x.is_finite() {
                self.non_finite += 1;
            } else if self.half_range == 0.0 {
                self.pending_zeros += 1;
            } else {
                let b = self.bin_of(f64::from(x));
                self.counts[b] += 1;
            }
        }
    }

    /// The saved form: counts, half range, zeros seen before any range, non-finite values.
    pub fn parts(&self) -> (&[u64], f64, u64, u64) {
        (&self.counts, self.half_range, self.pending_zeros, self.non_finite)
    }

    /// Rebuilds a histogram from [`MergeableHistogram::parts`]: an even, non-zero bin count and
    /// a half range that is 0 or a finite power of two.
    pub fn from_parts(
        counts: Vec<u64>,
        half_range: f64,
        pending_zeros: u64,
        non_finite: u64,
    ) -> Result<MergeableHistogram, crate::KernelError> {
        let power_of_two = half_range == 0.0 || (half_range.is_finite() && half_range.log2().fract() == 0.0);
        if counts.is_empty() || counts.len() % 2 != 0 || !power_of_two {
            return Err(crate::KernelError::Layout(format!(
                "{} bins over ±{half_range} is not a mergeable histogram",
                counts.len()
            )));
        }
        Ok(MergeableHistogram { counts, half_range, pending_zeros, non_finite })
    }

    /// Adds another histogram with the same bin count. Exact and order-independent.
    pub fn merge(&mut self, other: &MergeableHistogram) -> Result<(), crate::KernelError> {
        if other.counts.len() != self.counts.len() {
            return Err(crate::KernelError::Layout(format!(
                "cannot merge histograms of {} and {} bins",
                self.counts.len(),
                other.counts.len()
            )));
        }
        let mut other = other.clone();
        let target = self.half_range.max(other.half_range);
        if target > 0.0 {
            self.widen_to(target);
            other.widen_to(target);
        }
        self.counts.iter_mut().zip(&other.counts).for_each(|(a, b)| *a += b);
        self.pending_zeros += other.pending_zeros;
        self.non_finite += other.non_finite;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_histogram_fixes_a_widened_range_on_the_first_nonzero_batch() {
        let mut h = TfHistogram::new();
        h.observe(&[0.0, 0.0]);
        assert!(!h.is_initialised());
        h.observe(&[-1.0, 0.0, 1.0, 2.0]);
        // Centre 0.5, widened 3×: [-4, 5], 1536 buckets of 9/1536 from bucket ⌊-4·1536/9⌋.
        let (base, w, pdf, batches) = h.parts().unwrap();
        assert_eq!((base, w, batches), (-683, 9.0 / 1536.0, 1));
        assert_eq!(h.x_left()[0], -683.0 * 9.0 / 1536.0);
        // 0 and 1 fall exactly on bucket edges: ⌊x/w⌋ − base.
        assert_eq!(pdf[683], 0.25);
        assert_eq!(pdf[683 + 170], 0.25);
        assert!((pdf.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Later out-of-range values are dropped but count in the batch size.
        h.observe(&[100.0, 0.0]);
        assert!((h.pdf().iter().sum::<f64>() - 0.75).abs() < 1e-12);
        let (mn, mx) = h.range_of_stats().unwrap();
        assert!((mn + 1.0).abs() <= w, "{mn}");
        assert!((mx - 2.0).abs() <= w, "{mx}");
    }

    #[test]
    fn tf_histogram_of_a_one_sided_batch_ends_on_its_extremes() {
        // A ReLU6 output: the range of the stats is [0, 6] exactly, as AIMET's is.
        let mut h = TfHistogram::new();
        h.observe(&[0.0, 1.5, 6.0, 6.0]);
        assert_eq!(h.range_of_stats(), Some((0.0, 6.0)));
        assert_eq!(h.parts().unwrap().0, -512);
    }

    #[test]
    fn tf_histogram_of_a_constant_batch_is_0_01_wide() {
        let mut h = TfHistogram::new();
        h.observe(&[3.0; 8]);
        let w = h.width().unwrap();
        assert!((w - 0.03 / 1536.0).abs() < 1e-9, "{w}");
        let (mn, mx) = h.range_of_stats().unwrap();
        assert_eq!(mn, 0.0);
        assert!((mx - 3.0).abs() <= w, "{mx}");
    }

    #[test]
    fn tf_histogram_ignores_batches_that_cannot_fix_a_range() {
        let mut h = TfHistogram::new();
        h.observe(&[f32::NAN, f32::INFINITY]);
        h.observe(&[-f32::MAX, f32::MAX]);
        assert!(!h.is_initialised());
        assert!(TfHistogram::from_parts(0, 1.0, vec![0.0; 512], 1).is_err());
        assert!(TfHistogram::from_parts(i64::MAX, 1e300, vec![0.0; TF_BUCKETS], 1).is_err());
        assert!(TfHistogram::from_parts(i64::MIN, 1e-300, vec![0.0; TF_BUCKETS], 1).is_err());
    }

    #[test]
    fn mergeable_histogram_doubles_exactly_and_merges_in_any_order() {
        let data: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0 - 5.0).collect();
        let mut whole = MergeableHistogram::new(64);
        whole.observe(&[0.0, 0.0]);
        whole.observe(&data[..10]);
        whole.observe(&data[10..]);
        whole.observe(&[f32::NAN, 300.0]);
        let mut parts: Vec<MergeableHistogram> = Vec::new();
        for chunk in [&[0.0f32, 0.0][..], &data[..10], &data[10..500], &data[500..], &[f32::NAN, 300.0]] {
            let mut h = MergeableHistogram::new(64);
            h.observe(chunk);
            parts.push(h);
        }
        let mut forward = MergeableHistogram::new(64);
        parts.iter().for_each(|p| forward.merge(p).unwrap());
        let mut backward = MergeableHistogram::new(64);
        parts.iter().rev().for_each(|p| backward.merge(p).unwrap());
        assert_eq!(forward, backward);
        assert_eq!(forward.counts(), whole.counts());
        assert_eq!(whole.total(), 1003);
        assert_eq!(whole.non_finite(), 1);
        assert_eq!(whole.half_range(), 512.0);
        assert!(MergeableHistogram::new(32).merge(&whole).is_err());
    }
}

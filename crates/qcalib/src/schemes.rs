//! Calibration schemes: how the statistics a quantizer gathered become an encoding. Min-max uses
//! the running extremes (spec §2.2, §1.1); TF-enhanced searches AIMET's candidate grids on the
//! 512-bucket PDF for the lowest saturation-weighted quantization cost (§2.3); percentile cuts the
//! same PDF at a user percentile (§2.4); MSE picks the clipping range with the smallest expected
//! squared error on it, entropy the symmetric threshold of least KL divergence on a fine
//! histogram of `|x|` (neither is reachable from aimet-onnx). Statistics do not depend on the bitwidth, so encodings for
//! any precision derive from one calibration pass. Fixed ranges (`encoding_constraints`) go
//! through AIMET's Python grid rule (§3.6).

use qkernels::{Encoding, KernelError, MergeableHistogram, MinMax, QuantSpec, TfHistogram};

/// A calibration scheme.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Scheme {
    /// Running min/max (AIMET `min_max`, alias `tf`).
    #[default]
    MinMax,
    /// AIMET's TF-enhanced SQNR search on a 512-bucket histogram.
    TfEnhanced,
    /// Range cut at a percentile of the 512-bucket histogram (100 reproduces AIMET's percentile
    /// scheme, whose percentile cannot be set from aimet-onnx).
    Percentile(f64),
    /// The clipping range (a fraction 0.01…1 of the observed one) whose grid has the smallest
    /// expected squared error over the 512-bucket histogram, saturation included.
    Mse,
    /// The symmetric clipping threshold whose quantized distribution of `|x|` is closest (least
    /// KL divergence) to the observed one, as TensorRT and onnxruntime calibrate (on a
    /// 4096-bin exactly mergeable histogram).
    Entropy,
}

impl Scheme {
    /// Parses `min_max`/`tf`, `tf_enhanced`, `percentile` or `percentile:99.99`.
    pub fn parse(s: &str) -> Option<Scheme> {
        match s {
            "min_max" | "minmax" | "tf" => Some(Scheme::MinMax),
            "tf_enhanced" | "tfe" => Some(Scheme::TfEnhanced),
            "percentile" => Some(Scheme::Percentile(99.99)),
            "mse" => Some(Scheme::Mse),
            "entropy" => Some(Scheme::Entropy),
            _ => {
                let p: f64 = s.strip_prefix("percentile:")?.parse().ok()?;
                (p > 50.0 && p <= 100.0).then_some(Scheme::Percentile(p))
            }
        }
    }

    /// The name AIMET writes in `quantizer_args.quant_scheme`.
    pub fn aimet_name(self) -> &'static str {
        match self {
            Scheme::MinMax => "min_max",
            Scheme::TfEnhanced => "post_training_tf_enhanced",
            Scheme::Percentile(_) => "post_training_percentile",
            Scheme::Mse => "mse",
            Scheme::Entropy => "entropy",
        }
    }

    /// Whether the scheme needs AIMET's 512-bucket histogram.
    pub fn uses_histogram(self) -> bool {
        matches!(self, Scheme::TfEnhanced | Scheme::Percentile(_) | Scheme::Mse)
    }

    /// Whether the scheme needs the fine, mergeable histogram.
    pub fn uses_fine_histogram(self) -> bool {
        matches!(self, Scheme::Entropy)
    }
}

/// The statistics of one channel (or of a whole per-tensor quantizer).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChannelStats {
    /// Running extremes (NaN ignored).
    pub minmax: MinMax,
    /// AIMET's PDF, for histogram schemes.
    pub histogram: Option<TfHistogram>,
    /// A fine zero-centred histogram, for the entropy scheme.
    pub fine: Option<MergeableHistogram>,
}

/// Bins of the entropy scheme's histogram (2048 per sign).
pub const ENTROPY_BINS: usize = 4096;

impl ChannelStats {
    /// Empty statistics; with a histogram if `scheme` needs one.
    pub fn new(scheme: Scheme) -> ChannelStats {
        ChannelStats {
            minmax: MinMax::default(),
            histogram: scheme.uses_histogram().then(TfHistogram::new),
            fine: scheme.uses_fine_histogram().then(|| MergeableHistogram::new(ENTROPY_BINS)),
        }
    }

    /// Folds one batch in.
    pub fn observe(&mut self, data: &[f32]) {
        self.minmax.observe(data);
        if let Some(h) = &mut self.histogram {
            h.observe(data);
        }
        if let Some(h) = &mut self.fine {
            h.observe(data);
        }
    }

    /// Whether any non-NaN value was seen.
    pub fn is_empty(&self) -> bool {
        self.minmax.is_empty()
    }

    /// The encoding under `scheme` for the grid rule `spec`. `None` when no data was seen.
    pub fn encoding(&self, scheme: Scheme, spec: QuantSpec) -> Result<Option<Encoding>, KernelError> {
        if self.is_empty() {
            return Ok(None);
        }
        let observed = (f64::from(self.minmax.min), f64::from(self.minmax.max));
        if let (Scheme::Entropy, Some(h)) = (scheme, &self.fine) {
            let t = entropy_threshold(h, spec.bitwidth).unwrap_or(f64::INFINITY);
            return Encoding::from_range(observed.0.max(-t), observed.1.min(t), spec).map(Some);
        }
        match (scheme, &self.histogram) {
            (Scheme::MinMax | Scheme::Entropy, _) | (_, None) => {
                Encoding::from_range(observed.0, observed.1, spec).map(Some)
            }
            (Scheme::TfEnhanced, Some(h)) => Ok(Some(tf_enhanced(h, spec)?)),
            (Scheme::Mse, Some(h)) => mse_encoding(h, observed, spec).map(Some),
            (Scheme::Percentile(p), Some(h)) => {
                let (lo, hi) = percentile_range(h, p).unwrap_or((-1.0, 1.0));
                Encoding::from_range(lo, hi, spec).map(Some)
            }
        }
    }
}

/// AIMET's Python grid rule for fixed ranges (`recompute_grid_params`): zero included, at least
/// 0.01 wide, offsets rounded half to even, and (unlike the C++ rule) no unsigned symmetric.
pub fn encoding_from_fixed_range(min: f64, max: f64, spec: QuantSpec) -> Encoding {
    let mn = min.min(0.0);
    let mx = max.max(0.0).max(mn + 0.01);
    let b = spec.bitwidth as i32;
    if spec.symmetric {
        let npos = 2f64.powi(b - 1) - 1.0;
        let nneg = 2f64.powi(b - 1);
        let delta = (mx / npos).abs().max((mn / nneg).abs());
        let offset = -(nneg - if spec.strict { 1.0 } else { 0.0 });
        let steps = npos - offset;
        Encoding { min: delta * offset, max: delta * npos, delta, offset, bitwidth: spec.bitwidth, steps }
    } else {
        let steps = 2f64.powi(b) - 1.0;
        let delta = (mx - mn) / steps;
        let offset = (mn / delta).round_ties_even();
        let min = delta * offset;
        Encoding { min, max: min + delta * steps, delta, offset, bitwidth: spec.bitwidth, steps }
    }
}

/// Grid steps the TF-enhanced search uses for a candidate's extent (`2^b − 1`, even when strict).
fn cost_steps(spec: QuantSpec) -> f64 {
    2f64.powi(spec.bitwidth as i32) - 1.0
}

/// Saturation cost weight (AIMET's GAMMA).
const GAMMA: f64 = 3.0;

/// AIMET's TF-enhanced encoding from a histogram (spec §2.3).
pub fn tf_enhanced(h: &TfHistogram, spec: QuantSpec) -> Result<Encoding, KernelError> {
    let n = spec.steps();
    let Some((min_val, max_val)) = h.range_of_stats() else {
        // Only all-zero data was seen.
        let delta = 2.0 / n;
        let offset = (-1.0 / delta).floor();
        return Ok(Encoding::from_scale_offset(delta, offset, spec.bitwidth, n));
    };
    let candidates = if spec.symmetric {
        symmetric_candidates(min_val, max_val, spec)
    } else {
        asymmetric_candidates(min_val, max_val, n)
    };
    let x_left = h.x_left();
    let pdf = h.pdf();
    let mut best: Option<(f64, f64, f64)> = None;
    for (delta, offset) in candidates {
        let cost = candidate_cost(&x_left, pdf, delta, offset, cost_steps(spec));
        if best.is_none_or(|(c, _, _)| cost < c) {
            best = Some((cost, delta, offset));
        }
    }
    let (_, delta, offset) = best.ok_or(KernelError::NanRange { min: min_val, max: max_val })?;
    Ok(Encoding::from_scale_offset(delta, offset, spec.bitwidth, n))
}

fn asymmetric_candidates(min_val: f64, max_val: f64, n: f64) -> Vec<(f64, f64)> {
    let delta0 = (max_val - min_val) / n;
    let offset0 = (min_val / delta0).round();
    let (lo_obs, hi_obs) = (delta0 * offset0, delta0 * (offset0 + n));
    let mut out = Vec::with_capacity(17 * 21 + 1);
    for k in 1..=17 {
        let f = f64::from(k) / 16.0;
        for i in 0..=20 {
            let delta = f * delta0;
            let offset = (-n + n / 20.0 * f64::from(i)).trunc();
            let (lo, hi) = (delta * offset, delta * (offset + n));
            if lo < lo_obs && hi > hi_obs {
                continue;
            }
            let (lo, hi) = (lo.max(lo_obs), hi.min(hi_obs));
            if lo >= hi {
                continue;
            }
            let d = (hi - lo) / n;
            out.push((d, (lo / d).round()));
        }
    }
    out.push((delta0, offset0));
    out
}

fn symmetric_candidates(min_val: f64, max_val: f64, spec: QuantSpec) -> Vec<(f64, f64)> {
    let n = spec.steps();
    let (delta_max, offset) = if min_val == 0.0 && spec.unsigned_symmetric {
        (max_val / n, 0.0)
    } else {
        (max_val.abs().max(min_val.abs()) / (n / 2.0), (-n / 2.0).floor())
    };
    let mut f = 0.01f32;
    let mut out = Vec::with_capacity(101);
    for _ in 0..101 {
        out.push((f64::from(f) * delta_max, offset));
        f += 0.01;
    }
    out
}

/// Saturation (weighted by [`GAMMA`]) plus rounding error of one candidate grid on the PDF.
fn candidate_cost(x_left: &[f64], pdf: &[f64], delta: f64, offset: f64, steps: f64) -> f64 {
    let buckets = pdf.len();
    let (p0, w) = (x_left[0], x_left[1] - x_left[0]);
    let index = |x: f64| (((x - p0) / w).floor()).clamp(0.0, (buckets - 1) as f64) as usize;
    let (lo, hi) = (delta * offset, delta * (offset + steps));
    let (i_min, i_max) = (index(lo), index(hi));
    let centre = |i: usize| p0 + i as f64 * w + w / 2.0;
    let (c_min, c_max) = (centre(i_min), centre(i_max));
    let mut sat = 0.0;
    let mut quant = 0.0;
    for (i, &p) in pdf.iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let m = centre(i);
        if i < i_min {
            sat += p * (m - c_min) * (m - c_min);
        } else if i >= i_max {
            sat += p * (m - c_max) * (m - c_max);
        } else {
            let q = delta * ((m / delta - offset).round() + offset);
            quant += p * (m - q) * (m - q);
        }
    }
    GAMMA * sat + quant
}

/// Expected squared quantize-dequantize error of `enc` over the histogram (bucket centres).
fn expected_error(x_left: &[f64], pdf: &[f64], enc: &Encoding) -> f64 {
    let w = x_left[1] - x_left[0];
    x_left
        .iter()
        .zip(pdf)
        .filter(|(_, p)| **p > 0.0)
        .map(|(&x, &p)| {
            let m = x + w / 2.0;
            let q = ((m.clamp(enc.min, enc.max) / enc.delta - enc.offset).round()).clamp(0.0, enc.steps);
            let y = enc.delta * (q + enc.offset);
            p * (m - y) * (m - y)
        })
        .sum()
}

/// The MSE scheme: among the observed range scaled by 1/100 … 100/100 (AIMET's grid rule for
/// each), the encoding with the smallest expected squared error on the histogram.
fn mse_encoding(h: &TfHistogram, observed: (f64, f64), spec: QuantSpec) -> Result<Encoding, KernelError> {
    let full = Encoding::from_range(observed.0, observed.1, spec)?;
    if !h.is_initialised() {
        return Ok(full);
    }
    let (x_left, pdf) = (h.x_left(), h.pdf());
    let mut best = (expected_error(&x_left, pdf, &full), full);
    for k in 1..100 {
        let f = f64::from(k) / 100.0;
        let enc = Encoding::from_range(observed.0 * f, observed.1 * f, spec)?;
        let cost = expected_error(&x_left, pdf, &enc);
        if cost < best.0 {
            best = (cost, enc);
        }
    }
    Ok(best.1)
}

/// TensorRT's entropy calibration on the `|x|` distribution: for every candidate threshold bin
/// `i`, the reference distribution is the first `i` bins with everything beyond folded into the
/// last; its quantized version spreads each of `2^(b−1)` equal groups' mass evenly over the
/// group's non-empty bins; the threshold with the smallest KL divergence wins. `None` when only
/// zeros were seen.
fn entropy_threshold(h: &MergeableHistogram, bitwidth: u32) -> Option<f64> {
    let (counts, half_range, _, _) = h.parts();
    if half_range == 0.0 {
        return None;
    }
    let half = counts.len() / 2;
    // |x| bins: the positive side plus the mirrored negative side.
    let abs: Vec<f64> = (0..half).map(|i| (counts[half + i] + counts[half - 1 - i]) as f64).collect();
    let width = half_range / half as f64;
    let levels = (1usize << (bitwidth - 1)).min(half);
    let last = abs.iter().rposition(|&c| c > 0.0)? + 1;
    let end = last.max(levels);
    // suffix[i]: the mass at or beyond bin i, folded into the last bin of a threshold at i.
    let mut suffix = vec![0.0; end + 1];
    for i in (0..end).rev() {
        suffix[i] = suffix[i + 1] + abs.get(i).copied().unwrap_or(0.0);
    }
    let mut best: Option<(f64, usize)> = None;
    for i in levels..=end {
        let mut p: Vec<f64> = abs[..i].to_vec();
        p[i - 1] += suffix[i];
        let mut q = vec![0.0; i];
        for k in 0..levels {
            let (a, b) = (k * i / levels, ((k + 1) * i / levels).max(k * i / levels + 1).min(i));
            let group = &abs[a..b];
            let total: f64 = group.iter().sum();
            let nonzero = group.iter().filter(|&&c| c > 0.0).count();
            if nonzero == 0 {
                continue;
            }
            for (j, &c) in group.iter().enumerate() {
                if c > 0.0 {
                    q[a + j] = total / nonzero as f64;
                }
            }
        }
        let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
        if sp == 0.0 || sq == 0.0 {
            continue;
        }
        let kl: f64 = p
            .iter()
            .zip(&q)
            .filter(|(pi, _)| **pi > 0.0)
            .map(|(&pi, &qi)| {
                let (pn, qn) = (pi / sp, (qi / sq).max(1e-12));
                pn * (pn / qn).ln()
            })
            .sum();
        if best.is_none_or(|(b, _)| kl < b) {
            best = Some((kl, i));
        }
    }
    best.map(|(_, i)| (i as f64 + 0.5) * width)
}

/// The percentile range of AIMET's PDF: at 100, the first and last non-empty buckets; below,
/// the buckets where the cumulative distribution crosses `1 − p/100` and `p/100`.
fn percentile_range(h: &TfHistogram, p: f64) -> Option<(f64, f64)> {
    let (min_val, max_val) = h.range_of_stats()?;
    if p >= 100.0 {
        return Some((min_val, max_val));
    }
    let x_left = h.x_left();
    let w = x_left[1] - x_left[0];
    let total: f64 = h.pdf().iter().sum();
    let mut cdf = 0.0;
    let mut lo = None;
    let mut hi = x_left[0] + w;
    for (i, &pi) in h.pdf().iter().enumerate() {
        cdf += pi / total;
        if lo.is_none() && cdf >= 1.0 - p / 100.0 {
            lo = Some(x_left[i]);
        }
        if cdf < p / 100.0 && x_left[i] < max_val {
            hi = x_left[i] + w;
        }
    }
    let lo = lo.unwrap_or(min_val).min(0.0);
    let hi = hi.max(0.0).max(lo + 0.01);
    Some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` Laplace-distributed values (deterministic quantiles): a bulk and long thin tails.
    fn laplace(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = (i as f64 + 0.5) / n as f64;
                (if u < 0.5 { (2.0 * u).ln() } else { -(2.0 * (1.0 - u)).ln() }) as f32
            })
            .collect()
    }

    #[test]
    fn fixed_range_follows_the_python_rule() {
        let e = encoding_from_fixed_range(0.0, 1.0, QuantSpec::asymmetric(8));
        assert_eq!((e.delta, e.offset), (1.0 / 255.0, 0.0));
        let e = encoding_from_fixed_range(-1.0, 1.0, QuantSpec::symmetric(8));
        assert_eq!((e.delta, e.offset, e.max), (1.0 / 127.0, -128.0, 1.0));
        // Zero-width ranges are widened to 0.01.
        let e = encoding_from_fixed_range(0.0, 0.0, QuantSpec::asymmetric(8));
        assert_eq!(e.delta, 0.01 / 255.0);
    }

    #[test]
    fn tf_enhanced_clips_a_long_tail_min_max_does_not() {
        // Laplace-distributed values (deterministic quantiles): a few far-out values set the
        // min-max range; TF-enhanced trades their saturation for finer steps in the bulk.
        let data = laplace(200_000);
        let mut s = ChannelStats::new(Scheme::TfEnhanced);
        s.observe(&data);
        let spec = QuantSpec::asymmetric(8);
        let tf = s.encoding(Scheme::TfEnhanced, spec).unwrap().unwrap();
        let mm = s.encoding(Scheme::MinMax, spec).unwrap().unwrap();
        assert!(tf.max < 0.8 * mm.max && tf.min > 0.8 * mm.min, "tf {tf:?} mm {mm:?}");
    }

    #[test]
    fn mse_clips_less_than_tf_enhanced_weights_saturation_more_than_min_max() {
        let data = laplace(200_000);
        let mut s = ChannelStats::new(Scheme::Mse);
        s.observe(&data);
        let spec = QuantSpec::asymmetric(8);
        let mse = s.encoding(Scheme::Mse, spec).unwrap().unwrap();
        let mm = s.encoding(Scheme::MinMax, spec).unwrap().unwrap();
        assert!(mse.max < mm.max && mse.max > 0.3 * mm.max, "mse {mse:?} mm {mm:?}");
        let x_left = s.histogram.as_ref().unwrap().x_left();
        let pdf = s.histogram.as_ref().unwrap().pdf().to_vec();
        assert!(expected_error(&x_left, &pdf, &mse) <= expected_error(&x_left, &pdf, &mm));
    }

    #[test]
    fn entropy_clips_a_long_tail() {
        let data = laplace(200_000);
        let mut s = ChannelStats::new(Scheme::Entropy);
        s.observe(&data);
        let spec = QuantSpec::symmetric(8);
        let e = s.encoding(Scheme::Entropy, spec).unwrap().unwrap();
        let mm = s.encoding(Scheme::MinMax, spec).unwrap().unwrap();
        assert!(e.max < 0.9 * mm.max && e.max > 0.2 * mm.max, "entropy {e:?} min-max {mm:?}");
        // Only zeros: the full (minimum-scale) range.
        let mut z = ChannelStats::new(Scheme::Entropy);
        z.observe(&[0.0; 10]);
        assert_eq!(z.encoding(Scheme::Entropy, spec).unwrap().unwrap().delta, qkernels::MIN_SCALE);
    }

    #[test]
    fn no_data_gives_no_encoding() {
        let mut s = ChannelStats::new(Scheme::MinMax);
        s.observe(&[f32::NAN]);
        assert_eq!(s.encoding(Scheme::MinMax, QuantSpec::asymmetric(8)).unwrap(), None);
    }

    #[test]
    fn schemes_parse() {
        assert_eq!(Scheme::parse("tf"), Some(Scheme::MinMax));
        assert_eq!(Scheme::parse("mse"), Some(Scheme::Mse));
        assert_eq!(Scheme::parse("entropy"), Some(Scheme::Entropy));
        assert_eq!(Scheme::parse("percentile:99.9"), Some(Scheme::Percentile(99.9)));
        assert_eq!(Scheme::parse("percentile:20"), None);
    }
}

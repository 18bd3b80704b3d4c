//! Calibration schemes: how the statistics a quantizer gathered become an encoding. Min-max uses
//! the running extremes (spec §2.2, §1.1); TF-enhanced searches AIMET's candidate grids on its
//! 1536-bucket PDF for the lowest saturation-weighted quantization cost (§2.3, with AIMET 2.42's
//! histogram and arithmetic); percentile cuts the same PDF at a user percentile (§2.4); MSE picks the clipping range with the smallest expected
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
    /// AIMET's TF-enhanced SQNR search on its 1536-bucket histogram.
    TfEnhanced,
    /// Range cut at a percentile of the TF-enhanced histogram (100 reproduces AIMET's percentile
    /// scheme, whose percentile cannot be set from aimet-onnx).
    Percentile(f64),
    /// The clipping range (a fraction 0.01…1 of the observed one) whose grid has the smallest
    /// expected squared error over the TF-enhanced histogram, saturation included.
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

    /// Whether the scheme needs AIMET's TF-enhanced histogram.
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

    /// Folds in statistics gathered apart (another thread's samples). Exact, in any order, for
    /// the extremes and the fine histogram; `None` when `self` keeps the TF-enhanced PDF, whose
    /// per-batch averaging cannot be merged.
    pub fn merge(&mut self, other: &ChannelStats) -> Option<()> {
        if self.histogram.is_some() || other.histogram.is_some() {
            return None;
        }
        self.minmax.merge(&other.minmax);
        match (&mut self.fine, &other.fine) {
            (Some(h), Some(o)) => h.merge(o).ok(),
            (None, None) => Some(()),
            _ => None,
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

/// AIMET 2.42's TF-enhanced encoding from a histogram (spec §2.3, with the arithmetic of the
/// compiled analyzer as measured against it: the observed grid and the symmetric candidates in
/// float32, the grid factors summed in float32, the clamping of asymmetric candidates in f64 with
/// the result stored in float32, costs in f64 on the histogram's grid).
pub fn tf_enhanced(h: &TfHistogram, spec: QuantSpec) -> Result<Encoding, KernelError> {
    let n = spec.steps();
    let Some((min_val, max_val)) = h.range_of_stats() else {
        // Only all-zero data was seen: AIMET's [−1, 1] grid, its delta a float32.
        let delta = f64::from((2.0 / n) as f32);
        let offset = (-1.0 / delta).floor();
        return Ok(Encoding::from_scale_offset(delta, offset, spec.bitwidth, n));
    };
    let (mn, mx) = (min_val as f32, max_val as f32);
    let candidates = if spec.symmetric {
        symmetric_candidates(mn, mx, spec)
    } else {
        asymmetric_candidates(mn, mx, n as f32)
    };
    // The occupied buckets, in order: a weight channel's few values occupy a few of the 1536.
    let occupied: Vec<(usize, f64)> =
        h.pdf().iter().copied().enumerate().filter(|&(_, p)| p != 0.0).collect();
    let mut best: Option<(f64, f64, f64)> = None;
    for (delta, offset) in candidates {
        let cost = candidate_cost(h, &occupied, delta, offset, cost_steps(spec));
        if best.is_none_or(|(c, _, _)| cost < c) {
            best = Some((cost, delta, offset));
        }
    }
    let (_, delta, offset) = best.ok_or(KernelError::NanRange { min: min_val, max: max_val })?;
    Ok(Encoding::from_scale_offset(delta, offset, spec.bitwidth, n))
}

/// 17 grid factors `k/16` × 21 offsets from `−N` to 0, each clamped to the observed range
/// snapped to its own grid, then the observed grid itself. Deltas are float32 values.
fn asymmetric_candidates(mn: f32, mx: f32, n: f32) -> Vec<(f64, f64)> {
    let delta0 = (mx - mn) / n;
    let offset0 = (mn / delta0).round();
    let (steps, observed) = (f64::from(n), f64::from(delta0));
    let lo_obs = observed * f64::from(offset0);
    let hi_obs = lo_obs + observed * steps;
    let mut out = Vec::with_capacity(17 * 21 + 1);
    let step = 1.0f32 / 16.0;
    let mut f = step;
    while f <= 1.0 + step {
        for i in 0..=20 {
            let delta = f64::from(f) * observed;
            let offset = (-steps + steps / 20.0 * f64::from(i)).trunc();
            let lo = delta * offset;
            let hi = lo + delta * steps;
            if lo < lo_obs && hi > hi_obs {
                continue;
            }
            let (lo, hi) = (lo.max(lo_obs), hi.min(hi_obs));
            let d = ((hi - lo) / steps) as f32;
            if d > 0.0 {
                out.push((f64::from(d), (lo / f64::from(d)).round()));
            }
        }
        f += step;
    }
    out.push((observed, f64::from(offset0)));
    out
}

/// 101 grid factors 0.01 … 1.01 (summed in float32, as AIMET) of the widest symmetric grid.
fn symmetric_candidates(mn: f32, mx: f32, spec: QuantSpec) -> Vec<(f64, f64)> {
    let n = spec.steps() as f32;
    let (delta_max, offset) = if mn == 0.0 && spec.unsigned_symmetric {
        (mx / n, 0.0)
    } else {
        (2.0 * mx.abs().max(mn.abs()) / n, (-n / 2.0).floor())
    };
    let step = 0.01f32;
    let mut f = step;
    let mut out = Vec::with_capacity(101);
    while f <= 1.0 + step {
        out.push((f64::from(f * delta_max), f64::from(offset)));
        f += step;
    }
    out
}

/// Saturation (weighted by [`GAMMA`]) plus rounding error of one candidate grid on the PDF's
/// `occupied` buckets (index and probability, in order): the buckets below the one holding the
/// grid's minimum (above the one holding its maximum) saturate to that bucket's centre; the
/// others round to the grid.
fn candidate_cost(h: &TfHistogram, occupied: &[(usize, f64)], delta: f64, offset: f64, steps: f64) -> f64 {
    let (Some(w), Some(p0)) = (h.width(), h.edge(0)) else { return f64::INFINITY };
    let last = (h.pdf().len().max(1) - 1) as f64;
    let index = |x: f64| h.bucket_of(x).unwrap_or(0.0).clamp(0.0, last) as usize;
    let lo = delta * offset;
    let hi = delta * steps + lo;
    let (i_min, i_max) = (index(lo), index(hi));
    let centre = |i: usize| p0 + i as f64 * w + w / 2.0;
    let (c_min, c_max) = (centre(i_min), centre(i_max));
    let mut sat = 0.0;
    let mut quant = 0.0;
    for &(i, p) in occupied {
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
    fn tf_enhanced_of_a_long_tail_depends_on_the_batches_as_aimet_does() {
        // Laplace-distributed values (deterministic quantiles). In one batch the first batch's
        // range holds the whole tail and TF-enhanced keeps almost all of it; in ten strided
        // batches the later batches' extremes fall outside that range and are dropped, so it
        // clips. Both as AIMET 2.42's compiled analyzer gives them (min, max of the encoding).
        let data = laplace(200_000);
        let spec = QuantSpec::asymmetric(8);
        let mut one = ChannelStats::new(Scheme::TfEnhanced);
        one.observe(&data);
        let e = one.encoding(Scheme::TfEnhanced, spec).unwrap().unwrap();
        assert!(
            (e.min + 12.20588493347168).abs() < 1e-5 && (e.max - 12.110526084899902).abs() < 1e-5,
            "{e:?}"
        );
        let mut ten = ChannelStats::new(Scheme::TfEnhanced);
        for i in 0..10 {
            let batch: Vec<f32> = data.iter().skip(i).step_by(10).copied().collect();
            ten.observe(&batch);
        }
        let e = ten.encoding(Scheme::TfEnhanced, spec).unwrap().unwrap();
        assert!(
            (e.min + 10.652606010437012).abs() < 1e-5 && (e.max - 10.73648452758789).abs() < 1e-5,
            "{e:?}"
        );
        let mm = ten.encoding(Scheme::MinMax, spec).unwrap().unwrap();
        assert!(e.max < 0.9 * mm.max && e.min > 0.9 * mm.min, "tf {e:?} mm {mm:?}");
    }

    /// A deterministic generator both this test and a script driving AIMET's compiled analyzer
    /// reproduce bit for bit (integer LCG, float32 arithmetic only).
    fn aimet_probe_data(kind: &str, seed: u32, n: usize) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / 16_777_216.0
        };
        (0..n)
            .map(|_| {
                let (a, b) = (uniform(), uniform());
                match kind {
                    "tail" => (a - 0.5) / (b + 0.05),
                    "bell" => (a + b - 1.0) * 3.0,
                    "relu" => ((a - 0.4) / (b + 0.1)).max(0.0),
                    _ => (((a - 0.3) * 8.0) / (b + 0.5)).clamp(0.0, 6.0),
                }
            })
            .collect()
    }

    #[test]
    fn tf_enhanced_equals_aimet_2_42_on_probe_data() {
        // (data, bitwidth, symmetric, strict, unsigned symmetric, AIMET's delta, AIMET's offset):
        // aimet-onnx 2.42's compiled analyzer (libpymo BlockTensorQuantizer, TF-enhanced) fed the
        // same three batches of 1000 values.
        let cases = [
            ("tail", 8, false, false, false, 0.070222407579422, -131.0),
            ("relu", 8, false, false, false, 0.021602358669042587, 0.0),
            ("tail", 8, true, false, false, 0.07047710567712784, -128.0),
            ("relu6", 8, true, false, true, 0.02376469224691391, 0.0),
            ("bell", 8, true, true, false, 0.023178311064839363, -127.0),
            ("bell", 16, false, false, false, 8.92440220923163e-05, -33082.0),
            ("relu6", 8, false, false, false, 0.0235294122248888, 0.0),
            ("tail", 4, false, false, false, 0.9346688985824585, -8.0),
        ];
        for (kind, bitwidth, symmetric, strict, unsigned_symmetric, delta, offset) in cases {
            let mut s = ChannelStats::new(Scheme::TfEnhanced);
            for k in 0..3u32 {
                s.observe(&aimet_probe_data(kind, 7 + 100 * k + bitwidth, 1000));
            }
            let spec = QuantSpec { bitwidth, symmetric, strict, unsigned_symmetric };
            let e = s.encoding(Scheme::TfEnhanced, spec).unwrap().unwrap();
            assert_eq!((e.delta, e.offset), (delta, offset), "{kind} {spec:?}");
        }
    }

    #[test]
    fn percentile_100_equals_aimet_2_42_on_probe_data() {
        // AIMET's percentile scheme at its default (and, from aimet-onnx, only) percentile 100:
        // the extremes of the TF-enhanced histogram through the min-max grid rule.
        for (kind, delta, offset) in
            [("tail", 0.07100556317497703, -130.0), ("relu", 0.021602359472536574, 0.0)]
        {
            let mut s = ChannelStats::new(Scheme::Percentile(100.0));
            for k in 0..3u32 {
                s.observe(&aimet_probe_data(kind, 7 + 100 * k + 8, 1000));
            }
            let e = s.encoding(Scheme::Percentile(100.0), QuantSpec::asymmetric(8)).unwrap().unwrap();
            // AIMET rounds somewhere in float32: equal to 1e-7 relative.
            assert!((e.delta - delta).abs() < 1e-7 * delta && e.offset == offset, "{kind}: {e:?}");
        }
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

//! Lite-MP (spec §6): flip the most sensitive layers to a higher precision. Layers are sorted most
//! sensitive first (lowest score, or highest for a lower-is-better metric such as MSE), ties in
//! their analysis order; the first
//! `ceil(n · percent / 100)` are flipped: their producer-less inputs and outputs to the
//! activation precision, every parameter (enabled or not) to the parameter precision; then the
//! config's exception rules are applied again. As in AIMET, the caller recalibrates afterwards
//! (flipped quantizers lose their encodings).
//! Variants: flip a given count, or the fewest layers that bring the whole simulation's score to a
//! target (binary search on the count, each probe recalibrated and scored).

use qanalyze::{FloatReference, LayerScore, Metric};
use qcalib::{Feeds, Precision, QuantSim};

/// Errors of Lite-MP.
#[derive(Debug, thiserror::Error)]
pub enum FlipError {
    /// A percentage outside 0..=100.
    #[error("percent to flip must be within 0..=100, got {0}")]
    Percent(f64),
    /// An activation precision Lite-MP does not allow.
    #[error("Lite-MP flips activations to int16 or float16, not {0}")]
    Activation(Precision),
    /// A scored layer that is not a node of the model.
    #[error("layer '{0}' is not a node of the model")]
    UnknownLayer(String),
    /// More layers asked for than were scored.
    #[error("cannot flip {count} layers: only {scored} were scored")]
    Count {
        /// Layers asked for.
        count: usize,
        /// Layers scored.
        scored: usize,
    },
    /// Recalibration failed.
    #[error(transparent)]
    Sim(#[from] qcalib::CalibError),
    /// Scoring failed.
    #[error(transparent)]
    Analyze(#[from] qanalyze::AnalyzeError),
}

/// The result of [`flip_until`].
#[derive(Debug, Clone, PartialEq)]
pub struct FlipUntil {
    /// The flipped layers, most sensitive first.
    pub flipped: Vec<Flipped>,
    /// The whole simulation's score with them flipped (recalibrated).
    pub score: f64,
    /// Whether the score reaches the target (if not, every layer is flipped).
    pub reached: bool,
}

/// One flipped layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Flipped {
    /// The node name.
    pub layer: String,
    /// Its sensitivity score.
    pub score: f64,
}

/// Flips the `percent` most sensitive layers of `scores` to `param` / `activation` precision and
/// returns them, most sensitive first.
pub fn flip_layers_to_higher_precision(
    sim: &mut QuantSim,
    scores: &[LayerScore],
    percent: f64,
    param: Precision,
    activation: Precision,
) -> Result<Vec<Flipped>, FlipError> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(FlipError::Percent(percent));
    }
    let count = (scores.len() as f64 * percent / 100.0).ceil() as usize;
    flip_count(sim, scores, count, param, activation)
}

/// Flips the `count` most sensitive layers of `scores` (see the module doc).
pub fn flip_count(
    sim: &mut QuantSim,
    scores: &[LayerScore],
    count: usize,
    param: Precision,
    activation: Precision,
) -> Result<Vec<Flipped>, FlipError> {
    if !matches!(activation, Precision::Int(16) | Precision::Float16) {
        return Err(FlipError::Activation(activation));
    }
    if count > scores.len() {
        return Err(FlipError::Count { count, scored: scores.len() });
    }
    let mut ranked: Vec<&LayerScore> = scores.iter().collect();
    ranked.sort_by(|a, b| b.sensitivity().total_cmp(&a.sensitivity()));
    let mut flipped = Vec::with_capacity(count);
    for s in ranked.into_iter().take(count) {
        let g = &sim.model().graph;
        let node = g.node_id(&s.layer).ok_or_else(|| FlipError::UnknownLayer(s.layer.clone()))?;
        let qs = sim.placement().op_quantizers(g, node);
        let p = sim.placement_mut();
        for q in qs {
            let quantizer = p.quantizer_mut(q);
            let precision = if quantizer.is_param { param } else { activation };
            quantizer.set_precision(precision);
        }
        flipped.push(Flipped { layer: s.layer.clone(), score: s.score });
    }
    sim.apply_exception_rules()?;
    Ok(flipped)
}

/// Flips the fewest most-sensitive layers for which the recalibrated simulation scores at least
/// `target` on `reference` (assuming the score grows with the count), recalibrating on
/// `calibration` after each probe. The simulation is left with that flip, calibrated.
#[allow(clippy::too_many_arguments)]
pub fn flip_until(
    sim: &mut QuantSim,
    scores: &[LayerScore],
    param: Precision,
    activation: Precision,
    calibration: &[Feeds],
    reference: &FloatReference,
    metric: Metric,
    target: f64,
) -> Result<FlipUntil, FlipError> {
    let original = sim.placement().clone();
    let probe = |sim: &mut QuantSim, count: usize| -> Result<(Vec<Flipped>, f64), FlipError> {
        *sim.placement_mut() = original.clone();
        let flipped = flip_count(sim, scores, count, param, activation)?;
        sim.calibrate(calibration.iter().cloned(), &mut |_| {})?;
        Ok((flipped, reference.score(sim, metric)?))
    };
    let (flipped, score) = probe(sim, 0)?;
    if score >= target {
        return Ok(FlipUntil { flipped, score, reached: true });
    }
    let (mut lo, mut hi) = (0usize, scores.len());
    let (mut best, mut best_score) = probe(sim, hi)?;
    if best_score < target {
        return Ok(FlipUntil { flipped: best, score: best_score, reached: false });
    }
    // Invariant: `lo` misses the target, `hi` reaches it.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let (flipped, score) = probe(sim, mid)?;
        if score >= target {
            (hi, best, best_score) = (mid, flipped, score);
        } else {
            lo = mid;
        }
    }
    probe(sim, hi)?;
    Ok(FlipUntil { flipped: best, score: best_score, reached: true })
}

//! Lite-MP (spec §6): flip the most sensitive layers to a higher precision. Layers are sorted by
//! score, lowest (most sensitive) first, ties in their analysis order; the first
//! `ceil(n · percent / 100)` are flipped: their producer-less inputs and outputs to the
//! activation precision, every parameter (enabled or not) to the parameter precision. As in
//! AIMET, the caller recalibrates afterwards (flipped quantizers lose their encodings).

use qanalyze::LayerScore;
use qcalib::{Precision, QuantSim};

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
    if !matches!(activation, Precision::Int(16) | Precision::Float16) {
        return Err(FlipError::Activation(activation));
    }
    let mut ranked: Vec<&LayerScore> = scores.iter().collect();
    ranked.sort_by(|a, b| a.score.total_cmp(&b.score));
    let count = (scores.len() as f64 * percent / 100.0).ceil() as usize;
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
    Ok(flipped)
}

//! Quark-style auto mixed precision: start with every layer at the wide precision and move layers
//! to the narrow one, least sensitive first, recalibrating and scoring after each move; a move
//! that brings the score below the target is undone — and ends the walk, or with `skip_failures`
//! is skipped while the walk goes on. Layer sensitivities come from an enable-one analysis at the
//! narrow precision (higher score = less sensitive). Exception rules are applied after each move.

use qanalyze::LayerScore;
use qcalib::{Feeds, QuantSim};

use crate::AmpError;
use crate::candidate::{Candidate, WeightBlocks};

/// The result of [`narrow_until`]; the simulation is left with `narrowed` at the narrow precision,
/// calibrated.
#[derive(Debug, Clone, PartialEq)]
pub struct NarrowResult {
    /// Layers moved to the narrow precision, in the order they were moved.
    pub narrowed: Vec<String>,
    /// Layers whose move broke the target (undone).
    pub rejected: Vec<String>,
    /// Score of the final state (the wide simulation's if nothing moved).
    pub score: f64,
    /// Metric evaluations made.
    pub evaluations: usize,
}

/// Moves layers of `sim` (built at the wide precision) to `narrow` while `metric` stays at or above
/// `target`; see the module doc. `progress(tried, total)` is called after each layer.
#[allow(clippy::too_many_arguments)]
pub fn narrow_until(
    sim: &mut QuantSim,
    scores: &[LayerScore],
    narrow: Candidate,
    calibration: &[Feeds],
    metric: &mut dyn FnMut(&QuantSim) -> Result<f64, String>,
    target: f64,
    skip_failures: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<NarrowResult, AmpError> {
    let calibrate = |sim: &mut QuantSim| sim.calibrate(calibration.iter().cloned(), &mut |_| {});
    let blocks = WeightBlocks::of(sim);
    calibrate(sim)?;
    let mut result =
        NarrowResult { narrowed: Vec::new(), rejected: Vec::new(), score: f64::NAN, evaluations: 1 };
    result.score = metric(sim).map_err(AmpError::Eval)?;
    let mut order: Vec<&LayerScore> = scores.iter().collect();
    order.sort_by(|a, b| b.score.total_cmp(&a.score));
    for (k, layer) in order.iter().enumerate() {
        let g = &sim.model().graph;
        let node = g.node_id(&layer.layer).ok_or_else(|| {
            AmpError::Settings(format!("layer '{}' is not a node of the model", layer.layer))
        })?;
        let qs = sim.placement().op_quantizers(g, node);
        let before = sim.placement().clone();
        let (params, activations): (Vec<qcalib::QuantizerId>, Vec<qcalib::QuantizerId>) =
            qs.into_iter().partition(|&q| sim.placement().quantizer(q).is_param);
        for q in activations {
            sim.placement_mut().quantizer_mut(q).set_precision(narrow.activation);
        }
        // Weights in blocks where the layer's weights split into them.
        let c = Candidate { block: narrow.block.filter(|&b| blocks.supports(&params, b)), ..narrow };
        blocks.set(sim.placement_mut(), &params, c);
        sim.apply_exception_rules()?;
        calibrate(sim)?;
        let score = metric(sim).map_err(AmpError::Eval)?;
        result.evaluations += 1;
        progress(k + 1, order.len());
        if score >= target {
            result.narrowed.push(layer.layer.clone());
            result.score = score;
            continue;
        }
        *sim.placement_mut() = before;
        calibrate(sim)?;
        result.rejected.push(layer.layer.clone());
        if !skip_failures {
            break;
        }
    }
    Ok(result)
}

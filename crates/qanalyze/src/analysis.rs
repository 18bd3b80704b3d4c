//! The quantization analysis beyond sensitivity scores: per-layer output MSE against FP32, the
//! encoding ranges of every quantizer next to the values calibration saw, and histograms of the
//! most sensitive layers' activations and weights with their encoding bounds.
//!
//! Per-layer MSE runs the whole simulation (every enabled quantizer on) and FP32 side by side and
//! compares each layer's first output, pooled over the batches: the plain mean of squared
//! differences. AIMET's `per_layer_mse_loss` divides that mean once more by the number of batches
//! — a quirk not reproduced here.

use qcalib::{Placement, QuantSim, TensorRole};
use qgraph::{NodeId, Tensor, ValueId};

use crate::sensitivity::{AnalyzeError, FloatReference, layers};

/// One layer's output error with every quantizer on.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerMse {
    /// Node name.
    pub layer: String,
    /// Op type.
    pub op: String,
    /// Mean squared difference of its first output from FP32.
    pub mse: f64,
}

/// One quantizer's range.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeEntry {
    /// The (first) tensor it sits on.
    pub tensor: String,
    /// `param`, `input`, `constant` or `output`.
    pub kind: &'static str,
    /// Precision, e.g. `int8`.
    pub precision: String,
    /// Encodings (channels) it holds.
    pub channels: usize,
    /// Smallest encoding minimum over its channels.
    pub encoding_min: f64,
    /// Largest encoding maximum over its channels.
    pub encoding_max: f64,
    /// Largest step size over its channels.
    pub delta: f64,
    /// Extremes calibration observed (over all channels), if kept.
    pub observed: Option<(f64, f64)>,
}

/// A histogram of one tensor's values with the bounds of its encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorHistogram {
    /// The tensor.
    pub tensor: String,
    /// The layer it belongs to.
    pub layer: String,
    /// `activation` or `weight`.
    pub kind: &'static str,
    /// Lower edge of the first bin.
    pub lo: f64,
    /// Upper edge of the last bin.
    pub hi: f64,
    /// Counts per bin.
    pub counts: Vec<u64>,
    /// Encoding range (per-channel encodings: the widest).
    pub encoding: Option<(f64, f64)>,
}

/// Bins of the histograms.
pub const HISTOGRAM_BINS: usize = 64;

fn mse(a: &Tensor, b: &Tensor) -> Option<(f64, usize)> {
    let (a, b) = (a.as_f32()?, b.as_f32()?);
    if a.len() != b.len() {
        return None;
    }
    let sum = a.iter().zip(b.iter()).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
    Some((sum, a.len()))
}

/// Per-layer output MSE of the simulation against FP32, on `reference`'s batches, in layer order.
pub fn per_layer_mse(sim: &QuantSim, reference: &FloatReference) -> Result<Vec<LayerMse>, AnalyzeError> {
    let g = &sim.model().graph;
    let layers = layers(sim)?;
    let mut sums = vec![(0f64, 0usize); layers.len()];
    reference.for_each_piece(|feeds, fp32| {
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let (_, simulated) = sim.run_keeping_all(&named)?;
        for (k, (node, _)) in layers.iter().enumerate() {
            let Some(out) = g.node(*node).output(0) else { continue };
            if let (Some(a), Some(b)) = (fp32.get(out), simulated.get(out))
                && let Some((s, n)) = mse(a, b)
            {
                sums[k].0 += s;
                sums[k].1 += n;
            }
        }
        Ok(())
    })?;
    Ok(layers
        .iter()
        .zip(sums)
        .map(|((node, _), (s, n))| LayerMse {
            layer: g.node(*node).name.clone(),
            op: g.node(*node).op_type.clone(),
            mse: if n == 0 { 0.0 } else { s / n as f64 },
        })
        .collect())
}

/// The range of every enabled integer quantizer with encodings, in tensor order.
pub fn ranges(sim: &QuantSim) -> Vec<RangeEntry> {
    let g = &sim.model().graph;
    let p: &Placement = sim.placement();
    let mut out = Vec::new();
    for q in p.quantizer_ids() {
        let quantizer = p.quantizer(q);
        let Some(encs) =
            quantizer.encodings.as_ref().filter(|_| quantizer.enabled && quantizer.precision.is_int())
        else {
            continue;
        };
        let Some(first) = p.tensors_of(q).next() else { continue };
        let observed = sim.stats(q).map(|stats| {
            stats.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| {
                (lo.min(f64::from(s.minmax.min)), hi.max(f64::from(s.minmax.max)))
            })
        });
        out.push(RangeEntry {
            tensor: g.value(first.value).name.clone(),
            kind: first.role.kind(),
            precision: quantizer.precision.to_string(),
            channels: encs.len(),
            encoding_min: encs.iter().map(|e| e.min).fold(f64::INFINITY, f64::min),
            encoding_max: encs.iter().map(|e| e.max).fold(f64::NEG_INFINITY, f64::max),
            delta: encs.iter().map(|e| e.delta).fold(0.0, f64::max),
            observed: observed.filter(|(lo, hi)| lo <= hi),
        });
    }
    out
}

fn encoding_range(p: &Placement, v: ValueId) -> Option<(f64, f64)> {
    let q = p.quantizer(p.quantizer_of(v)?);
    let encs = q.encodings.as_ref().filter(|_| q.enabled && q.precision.is_int())?;
    Some((
        encs.iter().map(|e| e.min).fold(f64::INFINITY, f64::min),
        encs.iter().map(|e| e.max).fold(f64::NEG_INFINITY, f64::max),
    ))
}

/// The extremes of the finite values of `values` folded into `(lo, hi)`.
fn fold_extremes((lo, hi): (f64, f64), values: impl Iterator<Item = f32>) -> (f64, f64) {
    values.filter(|v| v.is_finite()).fold((lo, hi), |(l, h), v| (l.min(f64::from(v)), h.max(f64::from(v))))
}

/// The range a histogram spans: the values' extremes and the encoding's range together (`None`
/// without a finite value or encoding).
fn histogram_range((mut lo, mut hi): (f64, f64), encoding: Option<(f64, f64)>) -> Option<(f64, f64)> {
    if let Some((a, b)) = encoding {
        (lo, hi) = (lo.min(a), hi.max(b));
    }
    if !(lo.is_finite() && hi.is_finite()) {
        return None;
    }
    Some((lo, if hi <= lo { lo + 1e-6 } else { hi }))
}

/// Counts the finite `values` into [`HISTOGRAM_BINS`] equal bins over `lo..hi`.
fn count_into(counts: &mut [u64], values: impl Iterator<Item = f32>, (lo, hi): (f64, f64)) {
    let width = (hi - lo) / HISTOGRAM_BINS as f64;
    for v in values.filter(|v| v.is_finite()) {
        let b = (((f64::from(v) - lo) / width) as usize).min(HISTOGRAM_BINS - 1);
        counts[b] += 1;
    }
}

fn histogram(values: &[f32], encoding: Option<(f64, f64)>) -> Option<(f64, f64, Vec<u64>)> {
    let range =
        histogram_range(fold_extremes((f64::INFINITY, f64::NEG_INFINITY), values.iter().copied()), encoding)?;
    let mut counts = vec![0u64; HISTOGRAM_BINS];
    count_into(&mut counts, values.iter().copied(), range);
    Some((range.0, range.1, counts))
}

/// Histograms of the FP32 output (over `reference`'s batches) and of the weight of each of
/// `nodes`, with their encoding ranges.
pub fn histograms(
    sim: &QuantSim,
    reference: &FloatReference,
    nodes: &[NodeId],
) -> Result<Vec<TensorHistogram>, AnalyzeError> {
    let g = &sim.model().graph;
    let p = sim.placement();
    // Two passes over the pieces, the extremes then the counts, so no layer's outputs over every
    // sample are held at once.
    let outputs: Vec<Option<qgraph::ValueId>> = nodes.iter().map(|&n| g.node(n).output(0)).collect();
    fn values_of(
        fp32: &qexec::ValueCache,
        v: Option<qgraph::ValueId>,
    ) -> Option<impl Iterator<Item = f32> + '_> {
        v.and_then(|v| fp32.get(v)).and_then(Tensor::as_f32).map(|a| a.iter().copied())
    }
    let mut extremes = vec![(f64::INFINITY, f64::NEG_INFINITY); nodes.len()];
    reference.for_each_piece(|_, fp32| {
        for (&v, e) in outputs.iter().zip(extremes.iter_mut()) {
            if let Some(values) = values_of(fp32, v) {
                *e = fold_extremes(*e, values);
            }
        }
        Ok(())
    })?;
    let ranges: Vec<Option<(f64, f64)>> = outputs
        .iter()
        .zip(&extremes)
        .map(|(v, &e)| v.and_then(|v| histogram_range(e, encoding_range(p, v))))
        .collect();
    let mut counts = vec![vec![0u64; HISTOGRAM_BINS]; nodes.len()];
    reference.for_each_piece(|_, fp32| {
        for ((&v, range), c) in outputs.iter().zip(&ranges).zip(counts.iter_mut()) {
            if let (Some(range), Some(values)) = (range, values_of(fp32, v)) {
                count_into(c, values, *range);
            }
        }
        Ok(())
    })?;
    let mut out = Vec::new();
    for (((&node, v), range), counts) in nodes.iter().zip(&outputs).zip(&ranges).zip(counts) {
        let n = g.node(node);
        if let (Some(v), Some((lo, hi))) = (*v, *range) {
            out.push(TensorHistogram {
                tensor: g.value(v).name.clone(),
                layer: n.name.clone(),
                kind: "activation",
                lo,
                hi,
                counts,
                encoding: encoding_range(p, v),
            });
        }
        let weight =
            p.param_quantizers(g, node).into_iter().find(|(role, _)| *role == qgraph::ops::ParamRole::Weight);
        if let Some((_, wq)) = weight
            && let Some(t) = p.tensors_of(wq).find(|t| matches!(t.role, TensorRole::Param { .. }))
            && let Some(data) = g.static_value(t.value).and_then(Tensor::as_f32)
        {
            let values: Vec<f32> = data.iter().copied().collect();
            let encoding = encoding_range(p, t.value);
            if let Some((lo, hi, counts)) = histogram(&values, encoding) {
                out.push(TensorHistogram {
                    tensor: g.value(t.value).name.clone(),
                    layer: n.name.clone(),
                    kind: "weight",
                    lo,
                    hi,
                    counts,
                    encoding,
                });
            }
        }
    }
    Ok(out)
}

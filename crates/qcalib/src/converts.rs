//! Precision converts of a mixed-precision simulation: where a quantized activation is read by an
//! op that computes at another integer precision, a deployment converts it (QNN inserts a Convert
//! op, onnxruntime's QDQ format a second `QuantizeLinear → DequantizeLinear` pair after the first).
//!
//! An op computes at the precision of the quantized activation it produces: its own enabled
//! output quantizer, or — for an op without one (a Conv fused with the Relu after it, a Reshape)
//! — the first enabled activation quantizer below it. Parameters and constants are stored at
//! their reader's precision and never converted.
//!
//! Per-channel activation grids (rare) are not converted. Between integer precisions the
//! converted grid spans the same range as the tensor's own: from 8 to 16 bits this is exact
//! (every 8-bit level is a 16-bit level, the step divides by 257 or 256), from 16 to 8 bits it
//! rounds to the coarser grid the reading op sees on the device. A float (fp16/bf16) tensor read
//! by an integer op is quantized for it too — the encoding a device needs there and AIMET's
//! plans lack — on the grid the caller derives from the tensor's calibration statistics at the
//! reader's bits; an integer tensor read by a float op is only dequantized (no convert).

use std::collections::{BTreeMap, HashSet};

use qgraph::{Graph, NodeId, ValueId};
use qkernels::{Encoding, QuantSpec};

use crate::error::{CalibError, Result};
use crate::placement::{Granularity, Placement, Precision, QuantizerId, TensorRole};

/// One tensor read at another integer precision by some of its readers.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionConvert {
    /// The quantized activation.
    pub tensor: ValueId,
    /// Its own precision.
    pub from: Precision,
    /// The precision its `readers` compute at.
    pub to: Precision,
    /// The nodes reading it at `to`.
    pub readers: Vec<NodeId>,
    /// The grid it is converted to: the tensor's range at `to` bits.
    pub encoding: Encoding,
}

/// The precision of the enabled activation quantizer on `v`.
fn activation_precision(placement: &Placement, v: ValueId) -> Option<Precision> {
    let t = placement.tensor(v)?;
    if matches!(t.role, TensorRole::Param { .. } | TensorRole::Constant) {
        return None;
    }
    let q = placement.quantizer(t.quantizer);
    q.enabled.then_some(q.precision)
}

/// The grid a float tensor's quantizer is converted to for readers at an integer precision,
/// from its statistics (`None`: it has none).
pub type FloatGrid<'a> = dyn Fn(QuantizerId, Precision) -> Result<Option<Encoding>> + 'a;

/// Every precision convert of `placement` on `g` (see the module doc), in tensor order;
/// `float_grid` gives the grid of a float tensor read by an integer op.
pub fn precision_converts(
    g: &Graph,
    placement: &Placement,
    float_grid: &FloatGrid<'_>,
) -> Result<Vec<PrecisionConvert>> {
    // (tensor, reader) → the widest precision the reader's results are quantized at.
    let mut wanted: BTreeMap<(ValueId, NodeId), Precision> = BTreeMap::new();
    for t in placement.tensors() {
        let TensorRole::Output { node } = t.role else { continue };
        // An op computing in float reads an integer tensor as it is (dequantized).
        let Some(to) = activation_precision(placement, t.value).filter(|p| p.is_int()) else { continue };
        // Walk up from the producer through ops without a quantized output; each step remembers
        // the node that reads the value.
        let mut stack: Vec<(ValueId, NodeId)> =
            g.node(node).inputs().iter().flatten().map(|&v| (v, node)).collect();
        let mut seen: HashSet<(ValueId, NodeId)> = HashSet::new();
        while let Some((v, reader)) = stack.pop() {
            if !seen.insert((v, reader)) {
                continue;
            }
            if placement.is_enabled(v) {
                if let Some(from) = activation_precision(placement, v)
                    && from != to
                {
                    let slot = wanted.entry((v, reader)).or_insert(to);
                    if to.bits() > slot.bits() {
                        *slot = to;
                    }
                }
            } else if !g.is_static(v)
                && let Some(p) = g.producer(v)
            {
                stack.extend(g.node(p.node).inputs().iter().flatten().map(|&u| (u, p.node)));
            }
        }
    }
    let mut converts: Vec<PrecisionConvert> = Vec::new();
    for ((tensor, reader), to) in wanted {
        if let Some(c) = converts.iter_mut().find(|c| c.tensor == tensor && c.to == to) {
            c.readers.push(reader);
            continue;
        }
        let t = placement.tensor(tensor).expect("only quantized tensors are wanted");
        let q = placement.quantizer(t.quantizer);
        let name = || g.value(tensor).name.clone();
        if !q.precision.is_int() {
            let encoding = float_grid(t.quantizer, to)?.ok_or_else(|| CalibError::NoStatistics {
                tensor: name(),
                detail: format!(
                    "a {} tensor read by an op at {to}: its convert needs the tensor's range (calibrate the plan)",
                    q.precision
                ),
            })?;
            converts.push(PrecisionConvert {
                tensor,
                from: q.precision,
                to,
                readers: vec![reader],
                encoding,
            });
            continue;
        }
        let own = match (q.granularity, q.encodings.as_deref()) {
            (Granularity::PerTensor, Some([e])) => *e,
            (Granularity::PerTensor, _) => {
                return Err(CalibError::Quantizer {
                    tensor: name(),
                    detail: "enabled but not calibrated".into(),
                });
            }
            // A per-channel activation grid has no single range to convert: its readers see it
            // as it is (in the simulation and in the export alike).
            _ => continue,
        };
        let spec = QuantSpec { bitwidth: to.bits(), ..q.spec() };
        let encoding = Encoding::from_range(own.min, own.max, spec)
            .map_err(|e| CalibError::Quantizer { tensor: name(), detail: e.to_string() })?;
        converts.push(PrecisionConvert { tensor, from: q.precision, to, readers: vec![reader], encoding });
    }
    Ok(converts)
}

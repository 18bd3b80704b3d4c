//! Calibration statistics on disk: a compact, versioned binary file (magic, format version, then
//! one prost-encoded [`StatsFile`] message) holding every quantizer's running min/max and, for
//! histogram schemes, its PDF (weights and constants are measured again from the model) — so a later run, or another machine, derives encodings for any
//! precision without touching the calibration data again. Files are written atomically; a
//! corrupt, truncated or foreign file is a typed error naming the file.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use qkernels::{MergeableHistogram, MinMax, TfHistogram};

use crate::error::{CalibError, Result};
use crate::schemes::ChannelStats;
use crate::sim::{QuantSim, QuantizerStats};

/// First bytes of every statistics file.
const MAGIC: &[u8; 8] = b"QKSTATS\0";

/// Format version written after the magic.
const FORMAT_VERSION: u32 = 2;

/// The whole file.
#[derive(Clone, PartialEq, Message)]
pub struct StatsFile {
    /// Name of the graph the statistics belong to.
    #[prost(string, tag = "1")]
    pub graph: String,
    /// One entry per quantizer, named by its first tensor.
    #[prost(message, repeated, tag = "2")]
    pub quantizers: Vec<QuantizerEntry>,
}

/// The statistics of one quantizer.
#[derive(Clone, PartialEq, Message)]
pub struct QuantizerEntry {
    /// The tensor the quantizer sits on (the first one if shared).
    #[prost(string, tag = "1")]
    pub tensor: String,
    /// One entry per encoding.
    #[prost(message, repeated, tag = "2")]
    pub channels: Vec<ChannelEntry>,
}

/// The statistics behind one encoding.
#[derive(Clone, PartialEq, Message)]
pub struct ChannelEntry {
    /// Smallest value seen.
    #[prost(float, tag = "1")]
    pub min: f32,
    /// Largest value seen.
    #[prost(float, tag = "2")]
    pub max: f32,
    /// The TF-enhanced PDF, for histogram schemes.
    #[prost(message, optional, tag = "3")]
    pub histogram: Option<HistogramEntry>,
    /// The fine mergeable histogram, for the entropy scheme.
    #[prost(message, optional, tag = "4")]
    pub fine: Option<FineHistogramEntry>,
}

/// A saved [`qkernels::MergeableHistogram`].
#[derive(Clone, PartialEq, Message)]
pub struct FineHistogramEntry {
    /// Bin counts.
    #[prost(uint64, repeated, tag = "1")]
    pub counts: Vec<u64>,
    /// Half the covered range (a power of two, or 0).
    #[prost(double, tag = "2")]
    pub half_range: f64,
    /// Zeros seen before the range was known.
    #[prost(uint64, tag = "3")]
    pub pending_zeros: u64,
    /// NaN and infinite values seen.
    #[prost(uint64, tag = "4")]
    pub non_finite: u64,
}

/// A saved [`TfHistogram`].
#[derive(Clone, PartialEq, Message)]
pub struct HistogramEntry {
    /// Index of bucket 0 on the grid of multiples of the width (its left edge is `base·width`).
    #[prost(sint64, tag = "5")]
    pub base: i64,
    /// Bucket width.
    #[prost(double, tag = "2")]
    pub width: f64,
    /// Averaged PDF, one value per bucket.
    #[prost(double, repeated, tag = "3")]
    pub pdf: Vec<f64>,
    /// Batches averaged.
    #[prost(uint64, tag = "4")]
    pub batches: u64,
}

fn stats_error(path: &Path, detail: impl Into<String>) -> CalibError {
    CalibError::Statistics { path: path.display().to_string(), detail: detail.into() }
}

/// Writes the simulation's statistics to `path` atomically.
pub fn save_stats(sim: &QuantSim, path: &Path) -> Result<()> {
    let g = &sim.model().graph;
    let mut quantizers = Vec::new();
    for q in sim.placement().quantizer_ids() {
        let Some(stats) = sim.stats(q) else { continue };
        let Some(first) = sim.placement().tensors_of(q).next() else { continue };
        if g.is_static(first.value) {
            // Weights and constants are measured again from the model on load.
            continue;
        }
        let channels = stats
            .iter()
            .map(|s| ChannelEntry {
                min: s.minmax.min,
                max: s.minmax.max,
                // An uninitialised histogram (only zeros seen) is saved with an empty PDF.
                histogram: s.histogram.as_ref().map(|h| match h.parts() {
                    Some((base, width, pdf, batches)) => {
                        HistogramEntry { base, width, pdf: pdf.to_vec(), batches }
                    }
                    None => HistogramEntry::default(),
                }),
                fine: s.fine.as_ref().map(|h| {
                    let (counts, half_range, pending_zeros, non_finite) = h.parts();
                    FineHistogramEntry { counts: counts.to_vec(), half_range, pending_zeros, non_finite }
                }),
            })
            .collect();
        quantizers.push(QuantizerEntry { tensor: g.value(first.value).name.clone(), channels });
    }
    let file = StatsFile { graph: g.name.clone(), quantizers };
    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + file.encoded_len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.encode(&mut bytes).map_err(|e| stats_error(path, e.to_string()))?;
    qgraph::write_atomically(path, &bytes).map_err(CalibError::from)
}

/// Reads statistics saved by [`save_stats`] for the model of `sim` and recomputes encodings from
/// them. Errors name the file and what does not fit (format, version, unknown tensor, channel
/// count, a histogram the scheme needs but the file lacks).
pub fn load_stats(sim: &mut QuantSim, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|source| CalibError::Io { path: path.to_path_buf(), source })?;
    if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(stats_error(path, "not a statistics file (wrong magic bytes)"));
    }
    let version = u32::from_le_bytes(bytes[MAGIC.len()..MAGIC.len() + 4].try_into().expect("four bytes"));
    if version != FORMAT_VERSION {
        return Err(stats_error(
            path,
            format!("format version {version}; this build reads {FORMAT_VERSION}"),
        ));
    }
    let file = StatsFile::decode(&bytes[MAGIC.len() + 4..])
        .map_err(|e| stats_error(path, format!("corrupt or truncated: {e}")))?;
    let needs_histogram = sim.options().scheme.uses_histogram();
    let g = &sim.model().graph;
    let mut stats: HashMap<_, QuantizerStats> = HashMap::new();
    for entry in file.quantizers {
        let q = g.value_id(&entry.tensor).and_then(|v| sim.placement().quantizer_of(v)).ok_or_else(|| {
            stats_error(path, format!("tensor '{}' has no quantizer in this model", entry.tensor))
        })?;
        if !sim.placement().quantizer(q).is_param && entry.channels.len() != 1 {
            return Err(stats_error(
                path,
                format!("'{}': {} channels for a per-tensor activation", entry.tensor, entry.channels.len()),
            ));
        }
        let mut channels = Vec::with_capacity(entry.channels.len());
        for c in entry.channels {
            let histogram = match c.histogram {
                Some(h) if h.pdf.is_empty() => Some(TfHistogram::new()),
                Some(h) => Some(
                    TfHistogram::from_parts(h.base, h.width, h.pdf, h.batches)
                        .map_err(|e| stats_error(path, format!("'{}': {e}", entry.tensor)))?,
                ),
                None if needs_histogram && c.min <= c.max => {
                    return Err(stats_error(
                        path,
                        format!(
                            "'{}' has no histogram, which the {:?} scheme needs",
                            entry.tensor,
                            sim.options().scheme
                        ),
                    ));
                }
                None => None,
            };
            let fine = match c.fine {
                Some(f) => Some(
                    MergeableHistogram::from_parts(f.counts, f.half_range, f.pending_zeros, f.non_finite)
                        .map_err(|e| stats_error(path, format!("'{}': {e}", entry.tensor)))?,
                ),
                None if sim.options().scheme.uses_fine_histogram() && c.min <= c.max => {
                    return Err(stats_error(
                        path,
                        format!("'{}' has no fine histogram, which the entropy scheme needs", entry.tensor),
                    ));
                }
                None => None,
            };
            channels.push(ChannelStats { minmax: MinMax { min: c.min, max: c.max }, histogram, fine });
        }
        stats.insert(q, channels);
    }
    sim.set_stats(stats)
}

//! `QuantSim`: a float model, its quantizer side table, the statistics gathered on calibration
//! data, and the interpreter session that runs the model with fake-quant on.
//!
//! Calibration follows AIMET's protocol (spec §2.1): parameter encodings are computed from the
//! weights first and the weights are quantized while activation statistics are gathered with
//! activations left in float (fp16 activation quantizers pass through). Statistics are kept per
//! quantizer and do not depend on bitwidth, so [`QuantSim::compute_encodings`] can re-derive
//! encodings after precisions change without another pass over the data. After every encoding
//! computation weight scales are adjusted against accumulator overflow (spec §8.4).
//!
//! Simulation never rewrites the graph: quantized weights and constants are substituted as data
//! in a copy of the model, and activations are fake-quantized by a `qexec` hook. Only simulated
//! precision converts add nodes to that copy (an `Identity` per convert, its output quantized).

use std::collections::HashMap;

use qexec::{Hook, HookError, RunOptions, Session, SessionOptions, TensorEvent};
use qgraph::{DimBindings, Model, Tensor, ValueId};
use qkernels::{Encoding, QuantSpec, Rounding};

use crate::config::QuantsimConfig;
use crate::converts::{PrecisionConvert, precision_converts};
use crate::error::{CalibError, Result};
use crate::placement::{
    DefaultPrecision, Granularity, Placement, Precision, Quantizer, QuantizerId, TensorRole,
};
use crate::schemes::{ChannelStats, Scheme, encoding_from_fixed_range};

mod training;

pub use training::TrainingRun;

/// Settings of a simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimOptions {
    /// Default parameter and activation precision.
    pub precision: DefaultPrecision,
    /// Calibration scheme.
    pub scheme: Scheme,
    /// Interpreter threads (0 = all cores, 1 = single-threaded).
    pub threads: usize,
    /// Gather activation statistics with float weights instead of quantized ones.
    pub calibrate_with_float_weights: bool,
    /// How activation fake-quant rounds ties: away from zero as AIMET does (default), or to even
    /// as ONNX `QuantizeLinear` does — the exact semantics of the QDQ export. Weights and
    /// constants are always rounded as AIMET rounds them (the export stores those values).
    pub rounding: Rounding,
    /// Simulate the precision converts a device inserts where an op reads a tensor at another
    /// integer precision (see [`crate::precision_converts`]): those readers see the tensor on
    /// their own grid, as on the device, and the QDQ export writes the convert pairs. Off by
    /// default, as AIMET simulates mixed precision (every reader sees the producer's grid).
    pub converts: bool,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            precision: DefaultPrecision::default(),
            scheme: Scheme::MinMax,
            threads: 1,
            calibrate_with_float_weights: false,
            rounding: Rounding::HalfAwayFromZero,
            converts: false,
        }
    }
}

/// Named input tensors of one batch.
pub type Feeds = Vec<(String, Tensor)>;

/// The statistics of one quantizer: one entry per encoding it will hold.
pub type QuantizerStats = Vec<ChannelStats>;

/// A quantization simulation of one model.
pub struct QuantSim {
    model: Model,
    config: QuantsimConfig,
    placement: Placement,
    options: SimOptions,
    stats: HashMap<QuantizerId, QuantizerStats>,
    session: Option<Session>,
    /// The simulated converts' values in the session model, with their quantizers.
    convert_quantizers: Vec<(ValueId, Quantizer)>,
    warnings: Vec<String>,
}

/// Largest exact bias magnitude the accumulator keeps (`2^31 − 2^15`, spec §8.4).
const ACCUMULATOR_LIMIT: f64 = 2_147_450_880.0;

impl QuantSim {
    /// Places quantizers on `model` under `config`.
    pub fn new(mut model: Model, config: QuantsimConfig, options: SimOptions) -> Result<QuantSim> {
        for p in [options.precision.param, options.precision.activation] {
            Placement::check_precision("(default precision)", p)?;
        }
        model.infer_shapes(&DimBindings::default())?;
        let placement = Placement::build(&model.graph, &config, options.precision)?;
        Ok(QuantSim {
            model,
            config,
            placement,
            options,
            stats: HashMap::new(),
            session: None,
            convert_quantizers: Vec::new(),
            warnings: Vec::new(),
        })
    }

    /// The float model (dtypes and shapes inferred).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The config the placement came from.
    pub fn config(&self) -> &QuantsimConfig {
        &self.config
    }

    /// The options.
    pub fn options(&self) -> &SimOptions {
        &self.options
    }

    /// Switches tie rounding (AIMET's away-from-zero, or ONNX's to-even) and rebuilds the
    /// simulation; encodings are unchanged.
    pub fn set_rounding(&mut self, rounding: Rounding) -> Result<()> {
        self.options.rounding = rounding;
        if self.session.is_some() { self.refresh() } else { Ok(()) }
    }

    /// The precision converts the simulation applies: those of its placement with
    /// [`SimOptions::converts`], none without.
    pub fn converts(&self) -> Result<Vec<PrecisionConvert>> {
        if self.options.converts {
            precision_converts(&self.model.graph, &self.placement, &|q, to| self.float_grid(q, to))
        } else {
            Ok(Vec::new())
        }
    }

    /// The grid of float quantizer `q`'s tensor at integer precision `to`, from its statistics
    /// under the calibration scheme (`None` without statistics).
    fn float_grid(&self, q: QuantizerId, to: Precision) -> Result<Option<Encoding>> {
        let Some([stats]) = self.stats.get(&q).map(Vec::as_slice) else { return Ok(None) };
        let spec = QuantSpec { bitwidth: to.bits(), ..self.placement.quantizer(q).spec() };
        stats.encoding(self.options.scheme, spec).map_err(|source| CalibError::Kernel {
            context: format!("convert grid of '{}'", self.quantizer_name(q)),
            source,
        })
    }

    /// Turns the simulation of precision converts on or off ([`SimOptions::converts`]); a
    /// calibrated simulation re-derives its encodings (weight scales depend on the grids their
    /// layers read).
    pub fn set_converts(&mut self, converts: bool) -> Result<()> {
        self.options.converts = converts;
        match (&self.session, self.stats.is_empty()) {
            (None, _) => Ok(()),
            // Loaded encodings: nothing to re-derive them from.
            (Some(_), true) => self.refresh(),
            (Some(_), false) => self.compute_encodings(),
        }
    }

    /// The quantizer side table.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The quantizer side table, mutably. Changes take effect at the next
    /// [`QuantSim::compute_encodings`] (for precision/symmetry changes) or
    /// [`QuantSim::refresh`] (for enabling, disabling or loaded encodings).
    pub fn placement_mut(&mut self) -> &mut Placement {
        self.session = None;
        &mut self.placement
    }

    /// Applies the config's exception rules to the current precisions (after mixed-precision
    /// changes, as AIMET does before recalibrating).
    pub fn apply_exception_rules(&mut self) -> Result<()> {
        self.session = None;
        self.placement.reapply_exception_rules(&self.model.graph, &self.config)
    }

    /// The gathered statistics of a quantizer.
    pub fn stats(&self, q: QuantizerId) -> Option<&QuantizerStats> {
        self.stats.get(&q)
    }

    /// Replaces the activation statistics (e.g. loaded from a file), recomputes those of weights
    /// and constants from their data, and computes encodings — no forward pass needed.
    pub fn set_stats(&mut self, stats: HashMap<QuantizerId, QuantizerStats>) -> Result<()> {
        self.stats = stats;
        self.gather_static_stats()?;
        self.compute_encodings()
    }

    /// Every statistic gathered, by quantizer.
    pub fn all_stats(&self) -> &HashMap<QuantizerId, QuantizerStats> {
        &self.stats
    }

    fn name(&self, v: ValueId) -> &str {
        &self.model.graph.value(v).name
    }

    fn quantizer_name(&self, q: QuantizerId) -> String {
        self.placement
            .tensors_of(q)
            .next()
            .map_or_else(|| format!("quantizer {}", q.0), |t| self.name(t.value).to_string())
    }

    /// Blockwise weights on the nodes of `op_types` (see [`Placement::set_blockwise_weights`]);
    /// the weights it skips, with the reason. On a calibrated simulation the weights' statistics
    /// and every encoding are recomputed; otherwise calibrate next.
    pub fn set_blockwise_weights(
        &mut self,
        op_types: &[&str],
        bits: u32,
        symmetric: bool,
        block_size: usize,
    ) -> Result<Vec<(String, String)>> {
        let skipped =
            self.placement.set_blockwise_weights(&self.model.graph, op_types, bits, symmetric, block_size)?;
        if !self.stats.is_empty() {
            self.stats.retain(|q, _| !self.placement.quantizer(*q).is_param);
            self.gather_static_stats()?;
            self.compute_encodings()?;
        }
        Ok(skipped)
    }

    /// Calibrates on `batches`: parameter statistics from the weights, activation statistics from
    /// forward passes, then encodings for every enabled, non-frozen integer quantizer.
    /// `progress` is called after each batch with the number done.
    pub fn calibrate<I>(&mut self, batches: I, progress: &mut dyn FnMut(usize)) -> Result<()>
    where
        I: IntoIterator<Item = Feeds>,
    {
        self.stats.retain(|q, _| self.placement.quantizer(*q).frozen);
        self.gather_static_stats()?;
        self.compute_param_encodings()?;
        let session =
            Session::new(self.substituted_model(true)?, SessionOptions::threads(self.options.threads))?;
        let mut targets: Vec<Option<QuantizerId>> = vec![None; self.model.graph.value_count()];
        for t in self.placement.tensors() {
            let q = self.placement.quantizer(t.quantizer);
            let dynamic = matches!(t.role, TensorRole::GraphInput | TensorRole::Output { .. });
            // Float quantizers too: an integer op reading their tensor needs its range.
            if dynamic && q.enabled && !q.frozen {
                targets[t.value.index()] = Some(t.quantizer);
                self.stats.entry(t.quantizer).or_insert_with(|| vec![ChannelStats::new(self.options.scheme)]);
            }
        }
        // Statistics that merge exactly (not the TF-enhanced PDF, averaged per batch) are gathered
        // sample by sample where the model keeps samples apart: the same statistics, without
        // every layer's output for the whole batch in memory at once.
        let per_sample = session.keeps_samples_apart() && !self.options.scheme.uses_histogram();
        let mut count = 0usize;
        for (i, feeds) in batches.into_iter().enumerate() {
            let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let batch_error = |e: String| CalibError::Data(format!("batch {i}: {e}"));
            let scheme = self.options.scheme;
            let merged = per_sample
                && observe_per_sample(&session, &named, &targets, scheme, &mut self.stats)
                    .map_err(batch_error)?;
            if !merged {
                let mut hook = ObserveHook { targets: &targets, stats: &mut self.stats };
                let opts = RunOptions { hook: Some(&mut hook), hook_inputs: true, ..RunOptions::default() };
                session.run_with(&named, opts).map_err(|e| batch_error(e.to_string()))?;
            }
            count += 1;
            progress(count);
        }
        if count == 0 {
            return Err(CalibError::Data("no calibration batches were given".into()));
        }
        self.compute_encodings()
    }

    /// Statistics of quantizers on static tensors (weights, constants), from their data.
    fn gather_static_stats(&mut self) -> Result<()> {
        let g = &self.model.graph;
        for t in self.placement.tensors() {
            let q = self.placement.quantizer(t.quantizer);
            if !q.enabled || q.frozen || !q.precision.is_int() {
                continue;
            }
            // Read, not kept: lazy weights pass through memory one at a time.
            let Some(data) = g.load_static(t.value)? else { continue };
            let Some(arr) = data.as_f32() else { continue };
            let values: Vec<f32> = arr.iter().copied().collect();
            let groups = split_by_encoding(&values, arr.shape(), q.granularity)
                .map_err(|detail| CalibError::Quantizer { tensor: g.value(t.value).name.clone(), detail })?;
            let scheme = match self.options.scheme {
                Scheme::Entropy if q.is_param => Scheme::MinMax,
                scheme => scheme,
            };
            let stats = groups
                .iter()
                .map(|vals| {
                    let mut s = ChannelStats::new(scheme);
                    s.observe(vals);
                    s
                })
                .collect();
            self.stats.insert(t.quantizer, stats);
        }
        Ok(())
    }

    fn encodings_from_stats(&self, q: QuantizerId) -> Result<Option<Vec<Encoding>>> {
        let quantizer = self.placement.quantizer(q);
        let Some(stats) = self.stats.get(&q) else { return Ok(None) };
        let spec = quantizer.spec();
        let mut out = Vec::with_capacity(stats.len());
        for (c, s) in stats.iter().enumerate() {
            // Entropy calibration is for activations (as in TensorRT); weights use their extremes.
            let scheme = match self.options.scheme {
                Scheme::Entropy if quantizer.is_param => Scheme::MinMax,
                scheme => scheme,
            };
            let enc = s.encoding(scheme, spec).map_err(|source| CalibError::Kernel {
                context: format!("encoding of '{}' (channel {c})", self.quantizer_name(q)),
                source,
            })?;
            let Some(mut enc) = enc else {
                return Err(CalibError::NoStatistics {
                    tensor: self.quantizer_name(q),
                    detail: if stats.len() > 1 {
                        format!("channel {c} held only NaN")
                    } else {
                        "no finite value".into()
                    },
                });
            };
            if let Some((lo, hi)) = quantizer.fixed_range {
                enc = encoding_from_fixed_range(lo.unwrap_or(enc.min), hi.unwrap_or(enc.max), spec);
            }
            out.push(enc);
        }
        if let (Some(decompressed), Granularity::PerBlock { channel_axis, block_axis, block_size }) =
            (quantizer.lpbq, quantizer.granularity)
        {
            let shape = self.param_shape(q).ok_or_else(|| CalibError::Quantizer {
                tensor: self.quantizer_name(q),
                detail: "LPBQ needs a weight of known shape".into(),
            })?;
            let enc_shape = crate::lpbq::block_encoding_shape(&shape, channel_axis, block_axis, block_size);
            let scale_bits = decompressed.saturating_sub(quantizer.precision.bits());
            crate::lpbq::compress(&mut out, &enc_shape, channel_axis, scale_bits);
        }
        Ok(Some(out))
    }

    /// The shape of the static tensor quantizer `q` quantizes, if any.
    fn param_shape(&self, q: QuantizerId) -> Option<Vec<usize>> {
        let t = self.placement.tensors().iter().find(|t| t.quantizer == q)?;
        Some(self.model.graph.static_shape(t.value)?.to_vec())
    }

    /// AIMET's LPBQ on every blockwise weight (`set_grouped_blockwise_quantization_for_weights`):
    /// each per-block scale becomes an integer of `decompressed_bits − bits` bits times one
    /// float scale per output channel. Call after [`QuantSim::set_blockwise_weights`]; returns
    /// how many weights it applies to. On a calibrated simulation the encodings are recomputed.
    pub fn set_lpbq(&mut self, decompressed_bits: u32) -> Result<usize> {
        let ids: Vec<QuantizerId> = self
            .placement
            .quantizer_ids()
            .into_iter()
            .filter(|&q| {
                let quantizer = self.placement.quantizer(q);
                quantizer.is_param && matches!(quantizer.granularity, Granularity::PerBlock { .. })
            })
            .collect();
        for &q in &ids {
            let bits = self.placement.quantizer(q).precision.bits();
            if decompressed_bits <= bits || decompressed_bits > 16 {
                return Err(CalibError::Quantizer {
                    tensor: self.quantizer_name(q),
                    detail: format!(
                        "LPBQ decompresses {bits}-bit weights to {decompressed_bits} bits: it needs more than {bits} and at most 16"
                    ),
                });
            }
            self.placement.quantizer_mut(q).lpbq = Some(decompressed_bits);
        }
        if !self.stats.is_empty() {
            self.compute_encodings()?;
        }
        Ok(ids.len())
    }

    fn compute_param_encodings(&mut self) -> Result<()> {
        for q in self.placement.quantizer_ids() {
            let quantizer = self.placement.quantizer(q);
            if quantizer.is_param && quantizer.enabled && !quantizer.frozen && quantizer.precision.is_int() {
                let encs = self.encodings_from_stats(q)?;
                self.placement.quantizer_mut(q).encodings = encs;
            }
        }
        Ok(())
    }

    /// (Re)computes every enabled, non-frozen integer quantizer's encodings from the gathered
    /// statistics under its current precision and symmetry, adjusts weight scales against
    /// overflow, and rebuilds the simulation session.
    pub fn compute_encodings(&mut self) -> Result<()> {
        for q in self.placement.quantizer_ids() {
            let quantizer = self.placement.quantizer(q);
            if quantizer.frozen || !quantizer.enabled {
                continue;
            }
            let encs = if quantizer.precision.is_int() { self.encodings_from_stats(q)? } else { None };
            if quantizer.precision.is_int() && encs.is_none() {
                return Err(CalibError::NoStatistics {
                    tensor: self.quantizer_name(q),
                    detail: "no calibration batch reached it".into(),
                });
            }
            self.placement.quantizer_mut(q).encodings = encs;
        }
        self.adjust_weight_scales()?;
        self.warnings = self.range_warnings();
        self.refresh()
    }

    /// Problems found by the last encoding computation that do not stop the simulation but
    /// likely ruin it (e.g. a quantizer whose range reaches the float limits).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Quantizers whose range is so wide (attention masks of `finfo.min`, infinities) that every
    /// value sharing them is rounded to zero.
    fn range_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for q in self.placement.quantizer_ids() {
            let quantizer = self.placement.quantizer(q);
            let Some(encs) = int_encodings(quantizer) else { continue };
            if let Some(e) = encs.iter().find(|e| e.min.abs().max(e.max.abs()) >= 1e30) {
                out.push(format!(
                    "quantizer of '{}' spans [{:e}, {:e}] (step {:e}): every value on it becomes 0 or an extreme; \
                     an attention mask or an infinity reaches it — disable it or keep that tensor in float",
                    self.quantizer_name(q),
                    e.min,
                    e.max,
                    e.delta
                ));
            }
        }
        out
    }

    /// Spec §8.4: for Conv/ConvTranspose/Gemm/MatMul with calibrated integer input and weight
    /// quantizers, weight scales grow so the int32 bias cannot overflow and the requantization
    /// scale stays representable.
    fn adjust_weight_scales(&mut self) -> Result<()> {
        let converts = self.converts()?;
        let g = &self.model.graph;
        let mut updates: Vec<(QuantizerId, Vec<Encoding>)> = Vec::new();
        for (id, n) in g.nodes() {
            if !["Conv", "ConvTranspose", "Gemm", "MatMul"].contains(&n.op_type.as_str()) {
                continue;
            }
            let Some(input) = n.input(0) else { continue };
            let Some((xq, path)) = self.placement.effective_quantizer(g, input) else { continue };
            let Some(x_enc) = int_encodings(self.placement.quantizer(xq)) else { continue };
            // Through a convert, the op reads the input on the convert's grid.
            let quantized = *path.last().expect("the walk starts at the input");
            let reader = match path.len() {
                1 => Some(id),
                k => g.producer(path[k - 2]).map(|o| o.node),
            };
            let converted = converts
                .iter()
                .find(|c| c.tensor == quantized && reader.is_some_and(|r| c.readers.contains(&r)))
                .map(|c| c.encoding.delta);
            let Some(w) = n.input(1).and_then(|w| g.static_root(w)).map(|(r, _)| r) else { continue };
            let Some(wq) = self.placement.quantizer_of(w) else { continue };
            let wquant = self.placement.quantizer(wq);
            if wquant.frozen || matches!(wquant.granularity, Granularity::PerBlock { .. }) {
                continue;
            }
            let Some(w_encs) = int_encodings(wquant) else { continue };
            let sx = converted.unwrap_or(x_enc[0].delta);
            let channels = w_encs.len();
            let bias: Vec<f64> = n
                .input(2)
                .and_then(|b| g.static_root(b))
                .and_then(|(r, _)| g.static_value(r))
                .map(|t| t.to_f64_vec())
                .unwrap_or_default();
            let bias_of = |c: usize| -> f64 {
                if channels == 1 {
                    bias.iter().fold(0.0f64, |m, b| m.max(b.abs()))
                } else {
                    bias.get(c).map_or(0.0, |b| b.abs())
                }
            };
            let out_enc = n
                .output(0)
                .and_then(|o| self.placement.quantizer_of(o))
                .map(|q| self.placement.quantizer(q))
                .filter(|q| q.enabled)
                .and_then(int_encodings)
                .map(|e| e[0]);
            let mut changed = false;
            let adjusted: Vec<Encoding> = w_encs
                .iter()
                .enumerate()
                .map(|(c, e)| {
                    let b = bias_of(c);
                    let mut sw = e.delta.max(b / (ACCUMULATOR_LIMIT * sx));
                    if let Some(y) = out_enc {
                        sw = sw.max(2f64.powf(-23.5) * y.delta / sx);
                        let signed_bias = if channels == 1 { b } else { bias.get(c).copied().unwrap_or(0.0) };
                        sw = sw.max((signed_bias + y.offset * y.delta).abs() / (sx * ACCUMULATOR_LIMIT));
                    }
                    if sw != e.delta {
                        changed = true;
                    }
                    Encoding::from_scale_offset(sw, e.offset, e.bitwidth, e.steps)
                })
                .collect();
            if changed {
                updates.push((wq, adjusted));
            }
        }
        for (q, encs) in updates {
            self.placement.quantizer_mut(q).encodings = Some(encs);
        }
        Ok(())
    }

    /// Rebuilds the simulation session from the current quantizer states and encodings.
    pub fn refresh(&mut self) -> Result<()> {
        for t in self.placement.tensors() {
            let q = self.placement.quantizer(t.quantizer);
            if q.enabled && q.precision.is_int() && q.encodings.is_none() {
                return Err(CalibError::Quantizer {
                    tensor: self.name(t.value).to_string(),
                    detail: "enabled but has no encodings (calibrate or load encodings first)".into(),
                });
            }
        }
        let mut model = self.substituted_model(false)?;
        self.convert_quantizers = self.insert_converts(&mut model)?;
        let mut session = Session::new(model, SessionOptions::threads(self.options.threads))?;
        if let Some(previous) = self.session.take() {
            session.reuse_buffers(previous);
        }
        self.session = Some(session);
        Ok(())
    }

    /// A copy of the model whose quantized static tensors hold their fake-quantized values:
    /// weights always (unless calibrating with float weights), constants read as activations
    /// only for simulation (during calibration they pass through, as in AIMET).
    fn substituted_model(&self, calibrating: bool) -> Result<Model> {
        let mut model = self.model.clone();
        for t in self.placement.tensors() {
            let q = self.placement.quantizer(t.quantizer);
            let is_param = matches!(t.role, TensorRole::Param { .. });
            if !q.enabled || (calibrating && (!is_param || self.options.calibrate_with_float_weights)) {
                continue;
            }
            let value = self.model.graph.value(t.value);
            if let (None, Some(lazy)) = (&value.data, &value.lazy) {
                // Quantized when read, as the session reaches the weight.
                let q = q.clone();
                model.graph.value_mut(t.value).lazy =
                    Some(lazy.derive(lazy.dtype(), lazy.shape(), move |data| fake_quant_tensor(&data, &q)));
                continue;
            }
            let Some(data) = self.model.graph.static_value(t.value) else { continue };
            let quantized = fake_quant_tensor(data, q)
                .map_err(|detail| CalibError::Quantizer { tensor: self.name(t.value).to_string(), detail })?;
            model.graph.value_mut(t.value).data = Some(quantized);
        }
        Ok(model)
    }

    /// Puts an `Identity` in front of the readers of each simulated convert in the session's
    /// `model` (new values are appended, so every other value keeps its id) and returns the
    /// new values with the quantizers that put them on the convert's grid.
    fn insert_converts(&self, model: &mut Model) -> Result<Vec<(ValueId, Quantizer)>> {
        let converts = self.converts()?;
        if converts.is_empty() {
            return Ok(Vec::new());
        }
        let g = &mut model.graph;
        let mut out = Vec::with_capacity(converts.len());
        for c in &converts {
            let name = format!("{}_int{}", g.value(c.tensor).name, c.to.bits());
            let v = g.add_op("Identity", &name, &[c.tensor], Vec::new());
            for &r in &c.readers {
                let slots: Vec<usize> = g
                    .node(r)
                    .inputs()
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| **i == Some(c.tensor))
                    .map(|(slot, _)| slot)
                    .collect();
                for slot in slots {
                    g.set_input(r, slot, Some(v));
                }
            }
            let own = self
                .placement
                .quantizer(self.placement.quantizer_of(c.tensor).expect("converts are of quantized tensors"));
            let mut q = own.clone();
            q.precision = c.to;
            q.encodings = Some(vec![c.encoding]);
            out.push((v, q));
        }
        g.sort_topologically()?;
        Ok(out)
    }

    /// The simulation session and a fake-quant hook for one run (`serial`: the run stays on the
    /// calling thread).
    fn session_and_hook(&self, serial: bool) -> Result<(&Session, FakeQuantHook<'_>)> {
        Ok((self.session()?, self.hook(serial)))
    }

    fn session(&self) -> Result<&Session> {
        self.session.as_ref().ok_or_else(|| CalibError::Quantizer {
            tensor: "(model)".into(),
            detail: "the simulation has no encodings yet: calibrate or load encodings first".into(),
        })
    }

    fn hook(&self, serial: bool) -> FakeQuantHook<'_> {
        FakeQuantHook::new(
            &self.placement,
            &self.convert_quantizers,
            self.model.graph.value_count() + self.convert_quantizers.len(),
            self.options.threads != 1 && !serial,
            self.options.rounding,
        )
    }

    /// Runs the simulated model (calibrate or load encodings first).
    pub fn run(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        self.run_on(feeds, false)
    }

    /// Runs the simulated model with every kernel on the calling thread, for callers that run
    /// several inputs at once, one per thread (same results as [`QuantSim::run`]).
    pub fn run_serial(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        self.run_on(feeds, true)
    }

    /// A batch runs sample by sample when the model allows it (qexec `run_per_sample`), each
    /// sample with its own hook: fake-quant is elementwise, so the values are the batch's.
    fn run_on(&self, feeds: &[(&str, Tensor)], serial: bool) -> Result<Vec<Tensor>> {
        let session = self.session()?;
        let run = |feeds: &[(&str, Tensor)], serial: bool| {
            let mut hook = self.hook(serial);
            let opts =
                RunOptions { hook: Some(&mut hook), hook_inputs: true, serial, ..RunOptions::default() };
            session.run_with(feeds, opts)
        };
        if !serial && let Some(result) = session.run_per_sample(feeds, |f| run(f, true))? {
            return Ok(result.outputs);
        }
        Ok(run(feeds, serial)?.outputs)
    }

    /// Runs the simulated model, showing `observer` every value it observes after the fake-quant
    /// hook has quantized it (what the next op reads).
    pub fn run_observed(
        &self,
        feeds: &[(&str, Tensor)],
        observer: &mut (dyn Hook + Send),
    ) -> Result<Vec<Tensor>> {
        self.run_observing(feeds, observer, false)
    }

    /// [`QuantSim::run_observed`], the observer seeing each value as its kernel computed it
    /// (`before_quantization`) or as the next op reads it.
    fn run_observing(
        &self,
        feeds: &[(&str, Tensor)],
        observer: &mut (dyn Hook + Send),
        before_quantization: bool,
    ) -> Result<Vec<Tensor>> {
        let (session, fake_quant) = self.session_and_hook(false)?;
        let mut hook = ObservedAfter { fake_quant, observer, before_quantization };
        let opts = RunOptions { hook: Some(&mut hook), hook_inputs: true, ..RunOptions::default() };
        Ok(session.run_with(feeds, opts)?.outputs)
    }

    /// The model with its quantized weights fake-quantized and everything else in float (the
    /// weight encodings are computed from the weights, as calibration computes them).
    pub fn weight_quantized_model(&mut self) -> Result<Model> {
        self.gather_static_stats()?;
        self.compute_param_encodings()?;
        self.substituted_model(true)
    }

    /// Checks the calibrated simulation on one batch for values that turn non-finite only under
    /// quantization — typically a quantizer that rounds to zero what a `Div`, `Reciprocal`,
    /// `Sqrt` or `Log` downstream needs non-zero; the next quantizer then clamps the infinity,
    /// so the outputs stay finite and silently wrong. Each node is looked at as its kernel
    /// computed it: the first whose simulated output is NaN or infinite while its float output
    /// is finite has the quantizers of its inputs disabled, until no such node is left (or
    /// nothing is left to disable). Returns what was disabled, one line each (also added to
    /// [`QuantSim::warnings`]).
    pub fn disable_non_finite_quantizers(&mut self, feeds: &[(&str, Tensor)]) -> Result<Vec<String>> {
        let mut fixed = Vec::new();
        let float = Session::new(self.model.clone(), SessionOptions::threads(self.options.threads))?;
        let values = self.model.graph.value_count();
        let float_bad = non_finite_values(values, &float, feeds, |f, hook, serial| {
            float.run_with(
                f,
                RunOptions { hook: Some(hook), hook_inputs: true, serial, ..RunOptions::default() },
            )
        })?;
        let order = self.model.graph.topological_order()?;
        let norms = crate::patterns::norm_matches(&self.model.graph, &order);
        for _ in 0..16 {
            let (session, _) = self.session_and_hook(false)?;
            let sim_bad = non_finite_values(values, session, feeds, |f, observer, serial| {
                let mut hook =
                    ObservedAfter { fake_quant: self.hook(serial), observer, before_quantization: true };
                session.run_with(
                    f,
                    RunOptions { hook: Some(&mut hook), hook_inputs: true, serial, ..RunOptions::default() },
                )
            })?;
            let g = &self.model.graph;
            let culprit = order.iter().copied().find(|&n| {
                g.node(n).outputs().iter().flatten().any(|v| sim_bad[v.index()] && !float_bad[v.index()])
            });
            let Some(node) = culprit else { break };
            let n = g.node(node);
            let mut disabled = Vec::new();
            for &v in n.inputs().iter().flatten() {
                if let Some((q, _)) = self.placement.effective_quantizer(g, v) {
                    self.placement.quantizer_mut(q).enabled = false;
                    disabled.push(g.value(v).name.clone());
                }
            }
            if disabled.is_empty() {
                break;
            }
            let mut line = format!(
                "the simulated output of '{}' ({}) is NaN or infinite where FP32 is finite: disabled the quantizer of its input(s) {}",
                n.name,
                n.op_type,
                disabled.join(", ")
            );
            if let Some(m) = norms.iter().find(|m| m.inner.contains(&node)) {
                let pass = if m.centred { "LayerNormalization" } else { "RMSNormalization" };
                line.push_str(&format!(
                    " (it lies inside a decomposed normalization: the graph pass {pass} keeps all of its internals in float)"
                ));
            }
            self.warnings.push(line.clone());
            fixed.push(line);
            self.refresh()?;
        }
        Ok(fixed)
    }

    /// Runs the simulated model timing every step (kernel and fake-quant of its outputs).
    pub fn run_profiled(&self, feeds: &[(&str, Tensor)]) -> Result<(Vec<Tensor>, Vec<qexec::StepTime>)> {
        let (session, mut hook) = self.session_and_hook(false)?;
        let opts =
            RunOptions { hook: Some(&mut hook), hook_inputs: true, profile: true, ..RunOptions::default() };
        let run = session.run_with(feeds, opts)?;
        Ok((run.outputs, run.profile))
    }

    /// Runs the simulated model keeping every value it fed or computed, as the fake-quant hook
    /// left it (quantized where a quantizer is enabled): outputs and the values by tensor.
    pub fn run_keeping_all(&self, feeds: &[(&str, Tensor)]) -> Result<(Vec<Tensor>, qexec::ValueCache)> {
        let (session, mut hook) = self.session_and_hook(false)?;
        let opts = RunOptions { hook: Some(&mut hook), hook_inputs: true, ..RunOptions::default() }
            .keep(qexec::Keep::All);
        let run = session.run_with(feeds, opts)?;
        Ok((run.outputs, run.kept))
    }

    /// Runs the simulation again on the batch whose FP32 values `cache` holds (a `Keep::All` run
    /// of the float model), recomputing only the nodes downstream of `changed` — the tensors
    /// whose quantizers differ from FP32 (enabled ones, and the weights and constants they
    /// quantize). Everything upstream is read from the cache. Graph inputs are read from the
    /// cache as they are: one whose quantizer is enabled needs a full [`QuantSim::run`].
    pub fn run_resumed(&self, cache: &qexec::ValueCache, changed: &[ValueId]) -> Result<Vec<Tensor>> {
        self.resume_on(cache, changed, false)
    }

    /// [`QuantSim::run_resumed`] with every kernel on the calling thread (as
    /// [`QuantSim::run_serial`]).
    pub fn run_resumed_serial(&self, cache: &qexec::ValueCache, changed: &[ValueId]) -> Result<Vec<Tensor>> {
        self.resume_on(cache, changed, true)
    }

    fn resume_on(&self, cache: &qexec::ValueCache, changed: &[ValueId], serial: bool) -> Result<Vec<Tensor>> {
        let (session, mut hook) = self.session_and_hook(serial)?;
        Ok(session.resume(cache, changed, RunOptions::with_hook(&mut hook).serial(serial))?.outputs)
    }
}

fn all_finite(t: &Tensor) -> bool {
    t.as_f32().is_none_or(|a| a.iter().all(|v| v.is_finite()))
}

/// Which values of `feeds`' run (`run(feeds, hook, serial)`) hold a NaN or an infinity: sample by
/// sample where `session` allows (each sample's flags merged), else the whole batch at once.
fn non_finite_values(
    values: usize,
    session: &Session,
    feeds: &[(&str, Tensor)],
    run: impl Fn(&[(&str, Tensor)], &mut (dyn Hook + Send), bool) -> qexec::Result<qexec::RunResult> + Sync,
) -> Result<Vec<bool>> {
    let bad = std::sync::Mutex::new(vec![false; values]);
    let flagged = |f: &[(&str, Tensor)], serial: bool| {
        let mut own = vec![false; values];
        let mut hook = |event: TensorEvent<'_>, t: &mut Tensor| -> Result<(), HookError> {
            if let Some(slot) = own.get_mut(event.value.index()) {
                *slot |= !all_finite(t);
            }
            Ok(())
        };
        let result = run(f, &mut hook, serial)?;
        let mut all = bad.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.iter_mut().zip(own).for_each(|(a, b)| *a |= b);
        Ok(result)
    };
    if session.run_per_sample(feeds, |f| flagged(f, true))?.is_none() {
        flagged(feeds, false)?;
    }
    Ok(bad.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
}

fn int_encodings(q: &Quantizer) -> Option<&[Encoding]> {
    if q.enabled && q.precision.is_int() { q.encodings.as_deref() } else { None }
}

/// Splits row-major `data` of `shape` into the groups of values each encoding covers, in
/// row-major order of the encoding shape.
pub fn split_by_encoding(
    data: &[f32],
    shape: &[usize],
    granularity: Granularity,
) -> Result<Vec<Vec<f32>>, String> {
    let (index, groups) = encoding_index(shape, granularity)?;
    if index.len() != data.len() {
        return Err(format!("shape {shape:?} does not hold {} values", data.len()));
    }
    let mut out = vec![Vec::with_capacity(data.len() / groups.max(1)); groups];
    for (&x, &g) in data.iter().zip(&index) {
        out[g].push(x);
    }
    Ok(out)
}

/// For each element of a row-major tensor of `shape`, the index of the encoding that covers it
/// (row-major order of the encoding shape), and the number of encodings.
pub fn encoding_index(shape: &[usize], granularity: Granularity) -> Result<(Vec<usize>, usize), String> {
    let len: usize = shape.iter().product();
    let (channel_axis, block) = match granularity {
        Granularity::PerTensor => return Ok((vec![0; len], 1)),
        Granularity::PerChannel { axis } => (axis, None),
        Granularity::PerBlock { channel_axis, block_axis, block_size } => {
            (channel_axis, Some((block_axis, block_size)))
        }
    };
    if channel_axis >= shape.len() {
        return Err(format!("channel axis {channel_axis} is outside shape {shape:?}"));
    }
    let mut enc_shape = vec![1usize; shape.len()];
    enc_shape[channel_axis] = shape[channel_axis];
    if let Some((axis, size)) = block {
        if axis >= shape.len() || size == 0 || shape[axis] % size != 0 {
            return Err(format!("block size {size} does not divide axis {axis} of shape {shape:?}"));
        }
        enc_shape[axis] = shape[axis] / size;
    }
    let groups: usize = enc_shape.iter().product();
    let mut out = Vec::with_capacity(len);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..len {
        let mut g = 0;
        for d in 0..shape.len() {
            let per = shape[d] / enc_shape[d];
            g = g * enc_shape[d] + idx[d] / per;
        }
        out.push(g);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok((out, groups))
}

/// The fake-quantized (or fake-cast) copy of a static tensor, rounded as AIMET rounds.
fn fake_quant_tensor(t: &Tensor, q: &Quantizer) -> Result<Tensor, String> {
    let Some(arr) = t.as_f32() else { return Ok(t.clone()) };
    let shape = arr.shape().to_vec();
    let mut data: Vec<f32> = arr.iter().copied().collect();
    apply_quantizer(&mut data, &shape, q, Rounding::HalfAwayFromZero)?;
    Tensor::from_vec(&shape, data).ok_or_else(|| "shape and data disagree".to_string())
}

/// Applies one quantizer to a row-major f32 buffer.
pub(crate) fn apply_quantizer(
    data: &mut [f32],
    shape: &[usize],
    q: &Quantizer,
    rounding: Rounding,
) -> Result<(), String> {
    match q.precision {
        Precision::Float16 => qkernels::fake_cast_f16(data),
        Precision::BFloat16 => qkernels::fake_cast_bf16(data),
        Precision::Int(_) => {
            let encs = q.encodings.as_deref().ok_or("no encodings")?;
            match q.granularity {
                Granularity::PerTensor => qkernels::fake_quant_with(data, &encs[0], rounding),
                Granularity::PerChannel { axis } => {
                    qkernels::fake_quant_per_channel(data, shape, axis, encs, rounding)
                        .map_err(|e| e.to_string())?;
                }
                Granularity::PerBlock { channel_axis, block_axis, block_size } => {
                    qkernels::fake_quant_per_block(
                        data,
                        shape,
                        channel_axis,
                        block_axis,
                        block_size,
                        encs,
                        rounding,
                    )
                    .map_err(|e| e.to_string())?
                }
            }
        }
    }
    Ok(())
}

/// A mutable row-major f32 view of a tensor (copied to standard layout if needed); `None` for
/// other dtypes.
fn f32_slice_mut(t: &mut Tensor) -> Option<&mut [f32]> {
    let Tensor::F32(a) = t else { return None };
    if !a.is_standard_layout() {
        *a = a.as_standard_layout().into_owned().into_shared();
    }
    a.as_slice_mut()
}

/// Gathers activation statistics (calibration).
/// Runs `feeds` sample by sample (in parallel where the session has threads), each sample
/// observed into statistics of its own (fresh ones under `scheme`) merged into `stats` as it ends;
/// `false` (nothing run) when the feeds or the model do not allow it.
fn observe_per_sample(
    session: &Session,
    feeds: &[(&str, Tensor)],
    targets: &[Option<QuantizerId>],
    scheme: Scheme,
    stats: &mut HashMap<QuantizerId, QuantizerStats>,
) -> std::result::Result<bool, String> {
    let fresh: HashMap<QuantizerId, QuantizerStats> =
        targets.iter().flatten().map(|&q| (q, vec![ChannelStats::new(scheme)])).collect();
    let merged = std::sync::Mutex::new(std::mem::take(stats));
    let unmergeable = std::sync::atomic::AtomicBool::new(false);
    let ran = session.run_per_sample(feeds, |sample| {
        let mut own = fresh.clone();
        let mut hook = ObserveHook { targets, stats: &mut own };
        let opts =
            RunOptions { hook: Some(&mut hook), hook_inputs: true, serial: true, ..RunOptions::default() };
        let result = session.run_with(sample, opts)?;
        let mut all = merged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (q, channels) in own {
            let Some(into) = all.get_mut(&q) else { continue };
            for (a, b) in into.iter_mut().zip(&channels) {
                if a.merge(b).is_none() {
                    unmergeable.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Ok(result)
    });
    *stats = merged.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    if unmergeable.into_inner() {
        return Err("statistics gathered sample by sample do not merge".into());
    }
    Ok(ran.map_err(|e| e.to_string())?.is_some())
}

struct ObserveHook<'a> {
    targets: &'a [Option<QuantizerId>],
    stats: &'a mut HashMap<QuantizerId, QuantizerStats>,
}

impl Hook for ObserveHook<'_> {
    fn observes(&self, value: ValueId) -> bool {
        self.targets[value.index()].is_some()
    }

    fn on_tensor(&mut self, event: TensorEvent<'_>, tensor: &mut Tensor) -> Result<(), HookError> {
        let Some(q) = self.targets[event.value.index()] else { return Ok(()) };
        let Some(arr) = tensor.as_f32() else { return Ok(()) };
        let stats = self.stats.get_mut(&q).ok_or("statistics missing")?;
        match arr.as_slice_memory_order() {
            Some(s) => stats[0].observe(s),
            None => stats[0].observe(&arr.iter().copied().collect::<Vec<_>>()),
        }
        Ok(())
    }
}

/// The fake-quant hook and an observer on the values it observes, after the fake-quant (the
/// observer sees each value as the next op reads it) or before it (as the kernel computed it);
/// kernels apply no epilogue to the observed values.
struct ObservedAfter<'a, 'o> {
    fake_quant: FakeQuantHook<'a>,
    observer: &'o mut (dyn Hook + Send),
    before_quantization: bool,
}

impl Hook for ObservedAfter<'_, '_> {
    fn observes(&self, value: ValueId) -> bool {
        self.fake_quant.observes(value) || self.observer.observes(value)
    }

    fn on_tensor(&mut self, event: TensorEvent<'_>, tensor: &mut Tensor) -> Result<(), HookError> {
        let observed = self.observer.observes(event.value);
        if observed && self.before_quantization {
            self.observer.on_tensor(event, tensor)?;
        }
        if self.fake_quant.observes(event.value) {
            self.fake_quant.on_tensor(event, tensor)?;
        }
        if observed && !self.before_quantization {
            self.observer.on_tensor(event, tensor)?;
        }
        Ok(())
    }

    fn epilogue(&self, value: ValueId) -> Option<qexec::Epilogue<'_>> {
        if self.observer.observes(value) { None } else { self.fake_quant.epilogue(value) }
    }
}

/// Fake-quantizes activations (simulation).
struct FakeQuantHook<'a> {
    table: Vec<Option<&'a Quantizer>>,
    /// Per value, the elementwise form of its quantizer that Conv kernels apply in place.
    epilogues: Vec<Option<ElementwiseQuantizer>>,
    /// Whether the run may use several threads (the hook then runs inside the session's pool).
    parallel: bool,
    /// Tie rounding of every quantizer.
    rounding: Rounding,
}

/// A quantizer as an elementwise function over f32 slices.
type ElementwiseQuantizer = Box<dyn Fn(&mut [f32]) + Sync + Send>;

/// Elements below which a per-tensor quantizer is applied on one thread.
const PARALLEL_MIN: usize = 1 << 15;

impl<'a> FakeQuantHook<'a> {
    fn new(
        placement: &'a Placement,
        converts: &'a [(ValueId, Quantizer)],
        values: usize,
        parallel: bool,
        rounding: Rounding,
    ) -> FakeQuantHook<'a> {
        let mut table = vec![None; values];
        for t in placement.tensors() {
            let q = placement.quantizer(t.quantizer);
            if q.enabled && matches!(t.role, TensorRole::GraphInput | TensorRole::Output { .. }) {
                table[t.value.index()] = Some(q);
            }
        }
        for (v, q) in converts {
            table[v.index()] = Some(q);
        }
        let epilogues = table
            .iter()
            .map(|q| {
                let q = (*q)?;
                match (q.precision, q.granularity, q.encodings.as_deref()) {
                    (Precision::Int(_), Granularity::PerTensor, Some([enc])) => {
                        let enc = *enc;
                        Some(Box::new(move |x: &mut [f32]| qkernels::fake_quant_with(x, &enc, rounding))
                            as ElementwiseQuantizer)
                    }
                    (Precision::Float16, _, _) => {
                        Some(Box::new(qkernels::fake_cast_f16) as ElementwiseQuantizer)
                    }
                    (Precision::BFloat16, _, _) => {
                        Some(Box::new(qkernels::fake_cast_bf16) as ElementwiseQuantizer)
                    }
                    _ => None,
                }
            })
            .collect();
        FakeQuantHook { table, epilogues, parallel, rounding }
    }
}

impl Hook for FakeQuantHook<'_> {
    fn observes(&self, value: ValueId) -> bool {
        self.table[value.index()].is_some()
    }

    fn epilogue(&self, value: ValueId) -> Option<qexec::Epilogue<'_>> {
        self.epilogues[value.index()].as_deref().map(|f| f as qexec::Epilogue<'_>)
    }

    fn on_tensor(&mut self, event: TensorEvent<'_>, tensor: &mut Tensor) -> Result<(), HookError> {
        let Some(q) = self.table[event.value.index()] else { return Ok(()) };
        let shape = tensor.shape().to_vec();
        let Some(data) = f32_slice_mut(tensor) else { return Ok(()) };
        if self.parallel && q.granularity == Granularity::PerTensor && data.len() >= 2 * PARALLEL_MIN {
            // Elementwise, so chunking cannot change a single bit of the result.
            use rayon::prelude::*;
            return data
                .par_chunks_mut(PARALLEL_MIN)
                .try_for_each(|chunk| apply_quantizer(chunk, &[chunk.len()], q, self.rounding))
                .map_err(HookError::from);
        }
        apply_quantizer(data, &shape, q, self.rounding).map_err(HookError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_by_encoding_groups_channels_and_blocks() {
        let data: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let per_channel = split_by_encoding(&data, &[2, 3, 2], Granularity::PerChannel { axis: 1 }).unwrap();
        assert_eq!(
            per_channel,
            vec![vec![0.0, 1.0, 6.0, 7.0], vec![2.0, 3.0, 8.0, 9.0], vec![4.0, 5.0, 10.0, 11.0]]
        );
        let blocks = split_by_encoding(
            &data,
            &[2, 6],
            Granularity::PerBlock { channel_axis: 0, block_axis: 1, block_size: 3 },
        )
        .unwrap();
        assert_eq!(
            blocks,
            vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0], vec![6.0, 7.0, 8.0], vec![9.0, 10.0, 11.0]]
        );
        assert!(split_by_encoding(&data, &[2, 6], Granularity::PerChannel { axis: 2 }).is_err());
    }
}

//! The `quantkit` Python module: AIMET-style quantization simulation of ONNX models over the
//! native crates, with numpy arrays in and out. Every error is a `ValueError` carrying the Rust
//! error's one-line message; long work releases the GIL. The `QuantSim` class and the module's
//! functions are here; `convert` turns Python data into native data and back, `callbacks` holds
//! what native work calls back into Python.

mod callbacks;
mod convert;

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use qcalib::{DefaultPrecision, EncodingVersion, QdqOptions, QuantsimConfig, Scheme, SimOptions};
use qgraph::Tensor;

use crate::callbacks::{BatchRecorder, Evaluator, StageProgress};
use crate::convert::{batches_of, feeds, json_to_py, parse_metric, precision, to_numpy, value_error};

/// A simulation of `model` with the weight encodings `frozen` (by weight name) kept, its other
/// quantizers calibrated on `batches`.
fn frozen_sim(
    model: qgraph::Model,
    config: QuantsimConfig,
    options: SimOptions,
    frozen: &std::collections::HashMap<String, qcalib::LoadedEncoding>,
    batches: Vec<qcalib::Feeds>,
) -> Result<qcalib::QuantSim, String> {
    let mut sim = qcalib::QuantSim::new(model, config, options).map_err(|e| e.to_string())?;
    qcalib::freeze_encodings(&mut sim, frozen);
    sim.calibrate(batches, &mut |_| {}).map_err(|e| e.to_string())?;
    Ok(sim)
}

#[pyclass(module = "quantkit")]
struct QuantSim {
    inner: qcalib::QuantSim,
}

#[pymethods]
impl QuantSim {
    /// `bind` fixes graph inputs to values (`{"sr": 16000}`, a number or a list per input) as
    /// `--bind` does; then every `If` whose condition is known at load time is replaced by the
    /// branch it takes, as the command line's jobs do.
    #[new]
    #[pyo3(signature = (model_path, config = "default", param = "int8", act = "int8", scheme = "min_max", threads = 0, bind = None))]
    fn new(
        model_path: PathBuf,
        config: &str,
        param: &str,
        act: &str,
        scheme: &str,
        threads: usize,
        bind: Option<std::collections::HashMap<String, Bound<'_, PyAny>>>,
    ) -> PyResult<QuantSim> {
        let mut model = qgraph::load_path(&model_path).map_err(value_error)?;
        for (name, value) in bind.unwrap_or_default() {
            let numbers: Vec<f64> = match value.extract::<f64>() {
                Ok(v) => vec![v],
                Err(_) => value.extract().map_err(|_| {
                    PyValueError::new_err(format!("bind['{name}']: a number or a list of numbers"))
                })?,
            };
            model.graph.bind_input_numbers(&name, &numbers).map_err(value_error)?;
        }
        qgraph::passes::inline_static_ifs(&mut model, &qgraph::DimBindings::default())
            .map_err(value_error)?;
        let config = QuantsimConfig::load(config).map_err(value_error)?;
        let scheme = Scheme::parse(scheme).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown scheme '{scheme}' (min_max, tf_enhanced, percentile, percentile:P, mse, entropy)"
            ))
        })?;
        let options = SimOptions {
            precision: DefaultPrecision {
                param: precision("param", param)?,
                activation: precision("act", act)?,
            },
            scheme,
            threads,
            ..SimOptions::default()
        };
        let inner = qcalib::QuantSim::new(model, config, options).map_err(value_error)?;
        Ok(QuantSim { inner })
    }

    /// Calibrates and computes every quantizer's encodings (AIMET's `compute_encodings`).
    /// `batches` is an iterable of dicts `{input name: array}` (a data loader), or a callable
    /// `forward_pass_callback(runner, forward_pass_callback_args)` as AIMET's: it is called once,
    /// and every dict it passes to `runner.run(inputs)` is a calibration batch. `progress`, if
    /// given, is called with the number of batches done after each one; an exception it raises
    /// is raised when calibration ends.
    #[pyo3(signature = (batches, forward_pass_callback_args = None, progress = None))]
    fn compute_encodings(
        &mut self,
        py: Python<'_>,
        batches: &Bound<'_, PyAny>,
        forward_pass_callback_args: Option<Bound<'_, PyAny>>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let all = if batches.is_callable() {
            let recorder = Bound::new(py, BatchRecorder { batches: Vec::new() })?;
            batches.call1((recorder.clone(), forward_pass_callback_args))?;
            let recorded = std::mem::take(&mut recorder.borrow_mut().batches);
            if recorded.is_empty() {
                return Err(PyValueError::new_err(
                    "the forward-pass callback ran no batch (call runner.run(inputs))",
                ));
            }
            recorded
        } else {
            batches_of(batches)?
        };
        let sim = &mut self.inner;
        let mut failure: Option<PyErr> = None;
        let result = py.detach(|| {
            sim.calibrate(all, &mut |done| {
                if let (Some(cb), None) = (&progress, &failure) {
                    if let Err(e) = Python::attach(|py| cb.call1(py, (done,))) {
                        failure = Some(e);
                    }
                }
            })
        });
        if let Some(e) = failure {
            return Err(e);
        }
        result.map_err(value_error)
    }

    /// Runs the simulation on `inputs` (a dict `{input name: array}`); returns the outputs as a
    /// list of numpy arrays, in the model's output order.
    fn run<'py>(&self, py: Python<'py>, inputs: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyList>> {
        let fed = feeds(inputs)?;
        let sim = &self.inner;
        let outs = py
            .detach(|| {
                let named: Vec<(&str, Tensor)> = fed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
                sim.run(&named)
            })
            .map_err(value_error)?;
        let arrays = outs.iter().map(|t| to_numpy(py, t)).collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, arrays)
    }

    /// Writes `model.onnx` (the model the simulation runs, batch norms folded) and
    /// `model.encodings` (AIMET's format, `version` 0.6.1, 1.0.0 or 2.0.0) into `path`.
    #[pyo3(signature = (path, version = "1.0.0"))]
    fn export(&self, path: PathBuf, version: &str) -> PyResult<()> {
        let version = EncodingVersion::parse(version).ok_or_else(|| {
            PyValueError::new_err(format!("unknown encodings version '{version}' (0.6.1, 1.0.0, 2.0.0)"))
        })?;
        std::fs::create_dir_all(&path).map_err(|e| value_error(format!("{}: {e}", path.display())))?;
        qcalib::write_encodings(&self.inner, version, &path.join("model.encodings")).map_err(value_error)?;
        qgraph::save_path(self.inner.model(), path.join("model.onnx")).map_err(value_error)
    }

    /// Writes the simulation as a QDQ ONNX model that onnxruntime runs; with
    /// `prequantize_weights` the weights are stored as integers (int4 two per byte) behind a
    /// `DequantizeLinear`, with `int32_bias` the biases as int32, with `matmul_nbits` MatMul
    /// layers with 4-bit block weights as onnxruntime's `MatMulNBits`.
    #[pyo3(signature = (path, prequantize_weights = false, int32_bias = false, matmul_nbits = false))]
    fn export_qdq(
        &self,
        path: PathBuf,
        prequantize_weights: bool,
        int32_bias: bool,
        matmul_nbits: bool,
    ) -> PyResult<()> {
        let options = QdqOptions { prequantize_weights, int32_bias, matmul_nbits };
        qcalib::write_qdq_model(&self.inner, options, &path).map_err(value_error)
    }

    /// AIMET's `set_blockwise_quantization_for_weights`: the weights of `op_types` get one
    /// encoding per output channel and block of `block_size` input channels, at `bitwidth`.
    /// Returns the weights left as they were, as `(name, reason)` pairs (input channels the block
    /// size does not divide). Call `compute_encodings` next (on a calibrated simulation the
    /// encodings are recomputed at once).
    #[pyo3(signature = (op_types = vec!["Conv".to_string(), "Gemm".to_string(), "MatMul".to_string()], bitwidth = 4, symmetric = true, block_size = 32))]
    fn set_blockwise_quantization_for_weights(
        &mut self,
        op_types: Vec<String>,
        bitwidth: u32,
        symmetric: bool,
        block_size: usize,
    ) -> PyResult<Vec<(String, String)>> {
        let types: Vec<&str> = op_types.iter().map(String::as_str).collect();
        self.inner.set_blockwise_weights(&types, bitwidth, symmetric, block_size).map_err(value_error)
    }

    /// AIMET's LPBQ on the blockwise weights (`set_grouped_blockwise_quantization_for_weights`):
    /// each block's scale an integer of `decompressed_bw − bitwidth` bits times one float scale
    /// per output channel. Returns how many weights it applies to.
    fn set_lpbq(&mut self, decompressed_bw: u32) -> PyResult<usize> {
        self.inner.set_lpbq(decompressed_bw).map_err(value_error)
    }

    /// Per-layer sensitivity, as AIMET's QuantAnalyzer: with `mode="enable_one"` each layer is
    /// the only one quantized, with `"disable_one"` the only one left in float, and the outputs
    /// on `batches` are scored against FP32 by `metric` (`psnr`, `sqnr`, `mse`, `top5_psnr`,
    /// `top1_agreement`, …). Returns a dict `{layer: score}` in graph order. The simulation must
    /// be calibrated; it is left as it was.
    #[pyo3(signature = (batches, metric = "psnr", mode = "enable_one"))]
    fn per_layer_sensitivity<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
        metric: &str,
        mode: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let metric = parse_metric(metric)?;
        let enable = match mode {
            "enable_one" => true,
            "disable_one" => false,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown mode '{other}' (enable_one, disable_one)"
                )));
            }
        };
        let all = batches_of(batches)?;
        let sim = &mut self.inner;
        let scores = py
            .detach(|| {
                let threads = sim.options().threads;
                let reference =
                    qanalyze::FloatReference::with_budget(sim, &all, threads, qanalyze::ENABLE_ONE_BUDGET)?;
                if enable {
                    qanalyze::enable_one(sim, &reference, metric, &mut |_, _| {})
                } else {
                    qanalyze::disable_one(sim, &reference, metric, &mut |_, _| {})
                }
            })
            .map_err(value_error)?;
        let d = PyDict::new(py);
        for s in scores {
            d.set_item(s.layer, s.score)?;
        }
        Ok(d)
    }

    /// Sets the precision (`int4`..`int16`, `fp16`, `bf16`) of the quantizer on `tensor` and
    /// enables it; encodings follow at the next `compute_encodings`.
    fn set_precision(&mut self, tensor: &str, precision: &str) -> PyResult<()> {
        let p = self::precision(tensor, precision)?;
        let v = self
            .inner
            .model()
            .graph
            .value_id(tensor)
            .ok_or_else(|| PyValueError::new_err(format!("no tensor named '{tensor}' in the model")))?;
        let q = self
            .inner
            .placement()
            .quantizer_of(v)
            .ok_or_else(|| PyValueError::new_err(format!("tensor '{tensor}' carries no quantizer")))?;
        let quantizer = self.inner.placement_mut().quantizer_mut(q);
        quantizer.enabled = true;
        quantizer.set_precision(p);
        self.inner.apply_exception_rules().map_err(value_error)
    }

    /// AIMET's `apply_adaround`: learns the rounding of every quantized Conv, Gemm and MatMul
    /// weight (or of the layers `nodes_to_include` names) on `batches`, `num_iterations` steps
    /// each, then rebuilds the simulation on the rounded weights with their encodings frozen and
    /// calibrates its activations on `batches`. Uses the simulation's config and default
    /// precisions (per-tensor changes made before are not kept). Returns what it did as a dict.
    #[pyo3(signature = (batches, num_iterations = 10000, nodes_to_include = None))]
    fn apply_adaround<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
        num_iterations: usize,
        nodes_to_include: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let all = batches_of(batches)?;
        let settings = qptq::AdaroundOptions {
            iterations: num_iterations,
            nodes: nodes_to_include.unwrap_or_default(),
            ..qptq::AdaroundOptions::default()
        };
        let (config, options) = (self.inner.config().clone(), *self.inner.options());
        let model = self.inner.model().clone();
        let (sim, report) = py
            .detach(|| -> Result<_, String> {
                let rounded = qptq::adaround(&model, &config, options, &all, &settings, &mut |_, _| {})
                    .map_err(|e| e.to_string())?;
                let sim = frozen_sim(rounded.model, config, options, &rounded.encodings, all)?;
                Ok((sim, rounded.report.to_json()))
            })
            .map_err(value_error)?;
        self.inner = sim;
        json_to_py(py, &report)
    }

    /// Quantization-aware training (`qmix qat`): fine-tunes the calibrated simulation on the rows
    /// of `batches` — against `labels` (one class per row, cross-entropy) or, without them, by
    /// distillation from the float model as it is now (KL at `temperature`). `mode` is `regular`
    /// (weights learn; weight encodings follow them) or `range_learning` (every quantizer's scale
    /// and offset learn too). `learning_rate` is in units of each weight's quantization step.
    /// With `eval_batches` and `eval_labels` the simulation is scored (top-1, `label_offset`
    /// as in the CLI) before training and after every epoch and the best epoch is kept;
    /// `checkpoint` is written after every epoch and, with `resume`, continued from. `segments`
    /// > 1 recomputes the forward values in that many segments for the backward pass (less
    /// memory, the same gradients). Returns the report (epochs, losses, scores, the epoch kept)
    /// as a dict.
    #[pyo3(signature = (
        batches, epochs = 10, learning_rate = 1e-3, mode = "regular", batch_size = 32, micro_batch = 8,
        temperature = 4.0, labels = None, eval_batches = None, eval_labels = None, label_offset = 0,
        checkpoint = None, resume = false, seed = 0, segments = 1
    ))]
    #[allow(clippy::too_many_arguments)]
    fn train<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
        epochs: usize,
        learning_rate: f32,
        mode: &str,
        batch_size: usize,
        micro_batch: usize,
        temperature: f32,
        labels: Option<Vec<i64>>,
        eval_batches: Option<&Bound<'py, PyAny>>,
        eval_labels: Option<Vec<i64>>,
        label_offset: usize,
        checkpoint: Option<std::path::PathBuf>,
        resume: bool,
        seed: u64,
        segments: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mode = match mode {
            "regular" => qtrain::QatMode::Regular,
            "range_learning" | "range-learning" => qtrain::QatMode::RangeLearning,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown mode '{other}' (regular, range_learning)"
                )));
            }
        };
        let mut rows = Vec::new();
        for feeds in batches_of(batches)? {
            let n = feeds.first().and_then(|(_, t)| t.shape().first().copied()).unwrap_or(0);
            for r in 0..n {
                let row: Option<qcalib::Feeds> =
                    feeds.iter().map(|(name, t)| t.rows(r, 1).map(|t| (name.clone(), t))).collect();
                rows.push(row.ok_or_else(|| PyValueError::new_err("a batch input has no rows"))?);
            }
        }
        let labels = labels
            .map(|l| {
                l.iter().map(|&c| usize::try_from(c).map(|c| c + label_offset)).collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(|_| PyValueError::new_err("a negative label"))?;
        let eval = match (eval_batches, eval_labels) {
            (Some(b), Some(l)) => Some((batches_of(b)?, l)),
            (None, None) => None,
            _ => return Err(PyValueError::new_err("eval_batches and eval_labels go together")),
        };
        let options = qtrain::QatOptions {
            mode,
            epochs,
            batch_size,
            micro_batch,
            learning_rate,
            objective: match labels {
                Some(_) => qtrain::Objective::CrossEntropy,
                None => qtrain::Objective::Distillation { temperature },
            },
            seed,
            segments,
            ..qtrain::QatOptions::default()
        };
        let sim = &mut self.inner;
        let report = py
            .detach(|| -> Result<serde_json::Value, String> {
                let teacher = sim.model().clone();
                let data = qtrain::TrainingData {
                    samples: &rows,
                    labels: labels.as_deref(),
                    teacher: Some(&teacher),
                };
                let mut top1 = |s: &qcalib::QuantSim| -> qtrain::Result<f64> {
                    let (batches, labels) = eval.as_ref().expect("scored only with evaluation data");
                    let mut hits = 0usize;
                    let mut seen = 0usize;
                    for feeds in batches {
                        let named: Vec<(&str, qgraph::Tensor)> =
                            feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
                        let out = s.run(&named)?;
                        let logits =
                            out.first().ok_or_else(|| qtrain::TrainError::Data("no outputs".into()))?;
                        let classes = logits.shape().last().copied().unwrap_or(1).max(1);
                        for row in logits.to_f64_vec().chunks(classes) {
                            let best =
                                row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
                            hits += usize::from(
                                labels.get(seen).is_some_and(|&l| best as i64 - label_offset as i64 == l),
                            );
                            seen += 1;
                        }
                    }
                    Ok(hits as f64 / seen.max(1) as f64)
                };
                let ckpt = checkpoint.as_deref().map(|p| (p, resume));
                let scorer: Option<qtrain::Evaluate<'_>> =
                    if eval.is_some() { Some(&mut top1) } else { None };
                let r = qtrain::train(sim, data, &options, ckpt, scorer, &mut |_| {})
                    .map_err(|e| e.to_string())?;
                Ok(r.to_json())
            })
            .map_err(value_error)?;
        json_to_py(py, &report)
    }

    /// AIMET's `apply_seq_mse`: chooses each quantized Conv, Gemm and MatMul weight's encodings
    /// among `num_candidates` ranges by the layer's output error on `batches`, freezes them and
    /// calibrates the activations on `batches`. Returns what it did as a dict.
    #[pyo3(signature = (batches, num_candidates = 20, nodes_to_include = None))]
    fn apply_seq_mse<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
        num_candidates: usize,
        nodes_to_include: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let all = batches_of(batches)?;
        let settings =
            qptq::SeqMseOptions { candidates: num_candidates, nodes: nodes_to_include.unwrap_or_default() };
        let (config, options) = (self.inner.config().clone(), *self.inner.options());
        let model = self.inner.model().clone();
        let (sim, report) = py
            .detach(|| -> Result<_, String> {
                let chosen = qptq::seq_mse(&model, &config, options, &all, &settings, &mut |_, _| {})
                    .map_err(|e| e.to_string())?;
                let sim = frozen_sim(model, config, options, &chosen.encodings, all)?;
                Ok((sim, chosen.report.to_json()))
            })
            .map_err(value_error)?;
        self.inner = sim;
        json_to_py(py, &report)
    }

    /// Bias correction (AIMET's `apply_bias_correction`): each quantized layer's bias absorbs the
    /// mean shift quantizing its weights causes on `batches` (`kind="empirical"`), or, after a
    /// batch norm, the shift its statistics predict (`"analytical"`); the simulation is rebuilt
    /// on the corrected model and calibrated on `batches`. Returns what it did as a dict.
    #[pyo3(signature = (batches, kind = "empirical"))]
    fn apply_bias_correction<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
        kind: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kind = match kind {
            "empirical" => qptq::BiasCorrectionKind::Empirical,
            "analytical" => qptq::BiasCorrectionKind::Analytical,
            other => {
                return Err(PyValueError::new_err(format!("unknown kind '{other}' (empirical, analytical)")));
            }
        };
        let all = batches_of(batches)?;
        let (config, options) = (self.inner.config().clone(), *self.inner.options());
        let mut model = self.inner.model().clone();
        let (sim, report) = py
            .detach(|| -> Result<_, String> {
                let report = qptq::correct_bias(&mut model, &config, options, &all, kind)
                    .map_err(|e| e.to_string())?;
                Ok((frozen_sim(model, config, options, &Default::default(), all)?, report.to_json()))
            })
            .map_err(value_error)?;
        self.inner = sim;
        json_to_py(py, &report)
    }

    /// BN re-estimation (AIMET's `reestimate_bn_stats`): every BatchNormalization's mean and
    /// variance re-measured on `batches` with the layers before it quantized; the simulation is
    /// rebuilt on that model and calibrated on `batches`. Returns what it did as a dict.
    fn reestimate_bn_stats<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let all = batches_of(batches)?;
        let (config, options) = (self.inner.config().clone(), *self.inner.options());
        let mut model = self.inner.model().clone();
        let (sim, report) = py
            .detach(|| -> Result<_, String> {
                let report = qptq::reestimate_batch_norms(&mut model, &config, options, &all)
                    .map_err(|e| e.to_string())?;
                Ok((frozen_sim(model, config, options, &Default::default(), all)?, report.to_json()))
            })
            .map_err(value_error)?;
        self.inner = sim;
        json_to_py(py, &report)
    }

    /// After training (AIMET's `reestimate_bn_stats` then `fold_all_batch_norms_to_scale`): every
    /// BatchNormalization's statistics re-measured on `batches` as the trained simulation computes
    /// its input, the batch norms folded into their layers, and the simulation rebuilt with its
    /// encodings kept (a folded layer's per-channel weight grid scaled so each weight keeps its
    /// integer). Returns what it did as a dict.
    fn fold_all_batch_norms_to_scale<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let all = batches_of(batches)?;
        let sim = &mut self.inner;
        let report = py
            .detach(|| qptq::fold_batch_norms_of_simulation(sim, &all).map_err(|e| e.to_string()))
            .map_err(value_error)?;
        json_to_py(py, &report.to_json())
    }

    /// AIMET's QuantAnalyzer in one call: whole-model checks (all quantizers, weights only,
    /// activations only), enable-one (and with `disable_one`, disable-one) sensitivity by
    /// `metric`, per-layer output MSE, quantizer ranges and histograms of the `histograms` most
    /// sensitive layers, scored on `batches`. Returns the analysis as a dict (what
    /// `analysis.json` holds); with `out_dir`, writes `analysis.json`, AIMET's
    /// `layer_sensitivity.json` and the self-contained `report.html` there. The simulation must be
    /// calibrated; it is left as it was. `progress(stage, done, total)` is called as layers are
    /// scored.
    #[pyo3(signature = (batches, out_dir = None, metric = "psnr", disable_one = false, histograms = 6, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn analyze<'py>(
        &mut self,
        py: Python<'py>,
        batches: &Bound<'py, PyAny>,
        out_dir: Option<PathBuf>,
        metric: &str,
        disable_one: bool,
        histograms: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let metric = parse_metric(metric)?;
        let all = batches_of(batches)?;
        let sim = &mut self.inner;
        let options = qanalyze::AnalyzeOptions { metric, disable_one, histograms };
        let mut report_to = StageProgress::new(progress);
        let report = py
            .detach(|| {
                let threads = sim.options().threads;
                let reference =
                    qanalyze::FloatReference::with_budget(sim, &all, threads, qanalyze::ENABLE_ONE_BUDGET)?;
                qanalyze::analyze(sim, &reference, &options, None, &mut |step| match step {
                    qanalyze::AnalyzeStep::Stage { name, total } => report_to.stage(name, total),
                    qanalyze::AnalyzeStep::Layers(done) => report_to.step(done),
                })
            })
            .map_err(value_error);
        report_to.raised()?;
        let report = report?;
        if let Some(dir) = out_dir {
            let mut set = qgraph::OutputSet::begin(&dir).map_err(value_error)?;
            let files = [
                ("analysis.json", qcalib::to_pretty_json(&report.to_json())),
                ("layer_sensitivity.json", report.layer_sensitivity_json()),
                ("report.html", report.to_html()),
            ];
            for (name, text) in files {
                qgraph::write_atomically(&set.staged(name), text.as_bytes()).map_err(value_error)?;
            }
            set.commit().map_err(value_error)?;
        }
        json_to_py(py, &report.to_json())
    }

    /// Lite-MP, as AIMET's `flip_layers_to_higher_precision`: the `percent_to_flip` % most
    /// sensitive layers of `layer_sensitivity` (a dict `{layer: score}` such as
    /// `per_layer_sensitivity` returns; lower scores are more sensitive unless
    /// `higher_is_better=False`) get `param` weights and `act` activations (int16 or fp16).
    /// Returns the flipped layers, most sensitive first; call `compute_encodings` next.
    #[pyo3(signature = (layer_sensitivity, percent_to_flip = 10.0, param = "int16", act = "int16", higher_is_better = true))]
    fn flip_layers_to_higher_precision(
        &mut self,
        layer_sensitivity: &Bound<'_, PyDict>,
        percent_to_flip: f64,
        param: &str,
        act: &str,
        higher_is_better: bool,
    ) -> PyResult<Vec<String>> {
        let scores = layer_sensitivity
            .iter()
            .map(|(layer, score)| {
                Ok(qanalyze::LayerScore {
                    layer: layer.extract()?,
                    score: score.extract()?,
                    higher_is_better,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let (param, act) = (precision("param", param)?, precision("act", act)?);
        let flipped =
            qmix::flip_layers_to_higher_precision(&mut self.inner, &scores, percent_to_flip, param, act)
                .map_err(value_error)?;
        Ok(flipped.into_iter().map(|f| f.layer).collect())
    }

    /// AIMET's auto mixed precision (`choose_mixed_precision`) over `candidates` (`"w16a16"`,
    /// `"w8a16"`, `"w8a8"`, `"w4a8"`, `"fp16"`, …; build the `QuantSim` at the highest of them).
    /// Phase 1 scores each quantizer group at each candidate on `phase1_batches` (default: the
    /// first calibration batch); phase 2 runs the simulation natively on `eval_inputs` (a dict of
    /// arrays, samples along axis 0, in batches of `eval_batch_size`) and calls
    /// `eval_score(first_output)` — a numpy array of every sample's first output — for a score
    /// where higher is better (e.g. top-1 against labels). The simulation is left with the chosen
    /// plan, calibrated on `calibration_batches`. Returns AMP's summary (`amp_info.json`) as a dict
    /// with the Pareto front (`front`: relative bit-ops and score of each phase-2 point); with
    /// `results_dir` the cache (resumable) and the reports are written there.
    /// `progress(stage, done, total)` is called as the stages advance. The CLI's options follow:
    /// `search` (`binary`, `interpolation`, `brute_force`), `budget_search`, `full_front`,
    /// `use_all_amp_candidates`, `target` (a preset such as `htp_v73`, or a JSON file: every plan
    /// scored is made legal for it), `cost_table` (a `qmix profile-costs` table) and `clean_start`.
    #[pyo3(signature = (candidates, calibration_batches, eval_inputs, eval_score, allowed_accuracy_drop = None, phase1_batches = None, eval_batch_size = 32, results_dir = None, progress = None, search = "binary", budget_search = false, full_front = false, use_all_amp_candidates = false, target = None, cost_table = None, clean_start = false))]
    #[allow(clippy::too_many_arguments)]
    fn choose_mixed_precision<'py>(
        &mut self,
        py: Python<'py>,
        candidates: Vec<String>,
        calibration_batches: &Bound<'py, PyAny>,
        eval_inputs: &Bound<'py, PyDict>,
        eval_score: Py<PyAny>,
        allowed_accuracy_drop: Option<f64>,
        phase1_batches: Option<Bound<'py, PyAny>>,
        eval_batch_size: usize,
        results_dir: Option<PathBuf>,
        progress: Option<Py<PyAny>>,
        search: &str,
        budget_search: bool,
        full_front: bool,
        use_all_amp_candidates: bool,
        target: Option<String>,
        cost_table: Option<PathBuf>,
        clean_start: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut report_to = StageProgress::new(progress);
        let search: qmix::SearchAlgo = search.parse().map_err(PyValueError::new_err)?;
        let target = target.as_deref().map(qmix::Target::load).transpose().map_err(value_error)?;
        let cost_table = cost_table.as_deref().map(qmix::CostTable::load).transpose().map_err(value_error)?;
        let candidates = candidates
            .iter()
            .map(|c| {
                qmix::Candidate::parse(c).ok_or_else(|| {
                    PyValueError::new_err(format!("unknown candidate '{c}' (w8a8, w16a16, w4a8, fp16, …)"))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let calibration = batches_of(calibration_batches)?;
        let phase1 = match phase1_batches {
            Some(b) => batches_of(&b)?,
            None => calibration.iter().take(1).cloned().collect(),
        };
        let mut evaluator = Evaluator::new(eval_inputs, eval_batch_size, eval_score)?;
        let mut options = qmix::AmpOptions::new(candidates);
        options.allowed_accuracy_drop = allowed_accuracy_drop;
        options.results_dir = results_dir;
        options.search = search;
        options.budget_search = budget_search;
        options.full_front = full_front;
        options.use_all_amp_candidates = use_all_amp_candidates;
        options.target = target;
        options.cost_table = cost_table;
        options.clean_start = clean_start;
        options.threads = self.inner.options().threads;
        let sim = &mut self.inner;
        let result = py.detach(|| {
            let description = format!("eval_score on {} samples", evaluator.samples);
            let mut eval_fn = |sim: &qcalib::QuantSim| evaluator.score(sim);
            qmix::choose_mixed_precision(
                sim,
                &qmix::AmpData { calibration: &calibration, phase1: &phase1 },
                qmix::Phase2 { description, eval: &mut eval_fn },
                &options,
                &mut |event| match event {
                    qmix::AmpEvent::Stage { name, total } => report_to.stage(name, total),
                    qmix::AmpEvent::Step(done) => report_to.step(done),
                },
            )
        });
        if let Some(e) = evaluator.failure.take() {
            return Err(e);
        }
        report_to.raised()?;
        let result = result.map_err(value_error)?;
        if let Some(dir) = &options.results_dir {
            qmix::write_amp_report(&result, allowed_accuracy_drop, dir).map_err(value_error)?;
        }
        let mut info = qmix::amp_info(&result, allowed_accuracy_drop);
        info["front"] = serde_json::json!(
            result
                .points
                .iter()
                .map(|p| serde_json::json!({"relative_bitops": p.relative_bitops, "score": p.score}))
                .collect::<Vec<_>>()
        );
        json_to_py(py, &info)
    }

    /// Quark-style auto mixed precision on a simulation built at the wide precision: the layers,
    /// least sensitive first (enable-one PSNR at `narrow` on the calibration batches holding the
    /// first `samples` samples), move to `narrow` one by one while `eval_score` of the recalibrated simulation
    /// (run natively on `eval_inputs`, as `choose_mixed_precision` does) stays at or above
    /// `min_score`; a move that breaks it is undone (and the search goes on with
    /// `skip_failures`, else stops). The simulation keeps the result. Returns `{narrowed,
    /// rejected, score, evaluations}`.
    #[pyo3(signature = (narrow, calibration_batches, eval_inputs, eval_score, min_score, samples = 32, eval_batch_size = 32, skip_failures = true))]
    #[allow(clippy::too_many_arguments)]
    fn automp<'py>(
        &mut self,
        py: Python<'py>,
        narrow: &str,
        calibration_batches: &Bound<'py, PyAny>,
        eval_inputs: &Bound<'py, PyDict>,
        eval_score: Py<PyAny>,
        min_score: f64,
        samples: usize,
        eval_batch_size: usize,
        skip_failures: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let narrow = qmix::Candidate::parse(narrow)
            .ok_or_else(|| PyValueError::new_err(format!("unknown candidate '{narrow}' (w4a8, w8a8, …)")))?;
        let calibration = batches_of(calibration_batches)?;
        let mut evaluator = Evaluator::new(eval_inputs, eval_batch_size, eval_score)?;
        let (config, mut options) = (self.inner.config().clone(), *self.inner.options());
        options.precision = DefaultPrecision { param: narrow.param, activation: narrow.activation };
        let model = self.inner.model().clone();
        let wide = &mut self.inner;
        let result = py.detach(|| -> Result<qmix::NarrowResult, String> {
            let mut narrow_sim = qcalib::QuantSim::new(model, config, options).map_err(|e| e.to_string())?;
            narrow_sim.calibrate(calibration.iter().cloned(), &mut |_| {}).map_err(|e| e.to_string())?;
            let mut scored = Vec::new();
            let mut taken = 0;
            for batch in &calibration {
                if taken >= samples.max(1) {
                    break;
                }
                taken += batch.first().and_then(|(_, t)| t.shape().first().copied()).unwrap_or(1);
                scored.push(batch.clone());
            }
            let threads = options.threads;
            let reference = qanalyze::FloatReference::with_budget(
                &narrow_sim,
                &scored,
                threads,
                qanalyze::ENABLE_ONE_BUDGET,
            )
            .map_err(|e| e.to_string())?;
            let scores =
                qanalyze::enable_one(&mut narrow_sim, &reference, qanalyze::Metric::Psnr, &mut |_, _| {})
                    .map_err(|e| e.to_string())?;
            let mut metric = |sim: &qcalib::QuantSim| evaluator.score(sim);
            qmix::narrow_until(
                wide,
                &scores,
                narrow,
                &calibration,
                &mut metric,
                min_score,
                skip_failures,
                &mut |_, _| {},
            )
            .map_err(|e| e.to_string())
        });
        if let Some(e) = evaluator.failure.take() {
            return Err(e);
        }
        let r = result.map_err(value_error)?;
        let out = serde_json::json!({
            "narrowed": r.narrowed, "rejected": r.rejected, "score": r.score, "evaluations": r.evaluations,
        });
        json_to_py(py, &out)
    }

    /// Every quantized tensor: a list of dicts `{tensor, role, enabled, precision}`.
    fn quantizers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let g = &self.inner.model().graph;
        let placement = self.inner.placement();
        let rows = placement
            .tensors()
            .iter()
            .map(|t| {
                let q = placement.quantizer(t.quantizer);
                let d = PyDict::new(py);
                d.set_item("tensor", &g.value(t.value).name)?;
                d.set_item("role", t.role.kind())?;
                d.set_item("enabled", q.enabled)?;
                d.set_item("precision", q.precision.to_string())?;
                Ok(d)
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, rows)
    }
}

/// Cross-layer equalization, as AIMET's `equalize_model`: folds batch norms, scales each chain
/// of layers so their weight ranges match (exactly through ReLU6/Clip), absorbs high biases, and
/// writes the equalized FP32 model to `output_path`. Returns what it did as a dict (`sets`,
/// `bn_folded`, `high_bias`, `sets_skipped`, …). Give the equalized model to `QuantSim`.
#[pyfunction]
#[pyo3(signature = (model_path, output_path, high_bias_fold = true, rescale_quantized = false))]
fn equalize_model<'py>(
    py: Python<'py>,
    model_path: PathBuf,
    output_path: PathBuf,
    high_bias_fold: bool,
    rescale_quantized: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mut model = qgraph::load_path(&model_path).map_err(value_error)?;
    let options = qptq::EqualizeOptions { high_bias_fold, rescale_quantized };
    let report = py.detach(|| qptq::equalize(&mut model, options)).map_err(value_error)?;
    qgraph::save_path(&model, &output_path).map_err(value_error)?;
    json_to_py(py, &report.to_json())
}

/// The module.
#[pymodule]
fn quantkit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<QuantSim>()?;
    m.add_function(wrap_pyfunction!(equalize_model, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

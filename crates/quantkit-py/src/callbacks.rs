//! The Python callbacks long native work calls: a forward-pass recorder (AIMET's
//! `forward_pass_callback`), the evaluator that scores a simulation with a Python `eval_score`,
//! and stage progress. A callback's exception is kept and re-raised once the native work ends.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qgraph::Tensor;

use crate::convert::{feeds, to_numpy};

/// Scores a simulation from Python: runs it natively on the evaluation inputs, in batches, and
/// passes every sample's first output to the user's `eval_score`.
pub(crate) struct Evaluator {
    batches: Vec<qcalib::Feeds>,
    pub(crate) samples: usize,
    eval_score: Py<PyAny>,
    /// The first exception `eval_score` raised, re-raised once the native work ends.
    pub(crate) failure: Option<PyErr>,
}

impl Evaluator {
    pub(crate) fn new(
        inputs: &Bound<'_, PyDict>,
        batch_size: usize,
        eval_score: Py<PyAny>,
    ) -> PyResult<Evaluator> {
        let eval = feeds(inputs)?;
        let samples = eval.first().map_or(0, |(_, t)| t.shape().first().copied().unwrap_or(0));
        let size = batch_size.max(1);
        let batches = (0..samples)
            .step_by(size)
            .map(|start| {
                let n = size.min(samples - start);
                eval.iter()
                    .map(|(name, t)| {
                        t.rows(start, n).map(|r| (name.clone(), r)).ok_or_else(|| {
                            PyValueError::new_err(format!(
                                "eval input '{name}' has fewer than {samples} samples"
                            ))
                        })
                    })
                    .collect::<PyResult<qcalib::Feeds>>()
            })
            .collect::<PyResult<_>>()?;
        Ok(Evaluator { batches, samples, eval_score, failure: None })
    }

    /// `eval_score` of the simulation's first output on every sample.
    pub(crate) fn score(&mut self, sim: &qcalib::QuantSim) -> Result<f64, String> {
        let mut firsts = Vec::with_capacity(self.batches.len());
        for batch in &self.batches {
            let named: Vec<(&str, Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let mut outs = sim.run(&named).map_err(|e| e.to_string())?;
            if outs.is_empty() {
                return Err("the model has no output".into());
            }
            firsts.push(outs.swap_remove(0));
        }
        let all = Tensor::concat_rows(&firsts).ok_or("the first outputs do not stack along axis 0")?;
        let eval_score = &self.eval_score;
        Python::attach(|py| eval_score.call1(py, (to_numpy(py, &all)?,))?.extract::<f64>(py)).map_err(|e| {
            let message = e.to_string();
            self.failure.get_or_insert(e);
            message
        })
    }
}

/// Reports long work to an optional Python callable `progress(stage, done, total)`; the first
/// exception it raises is kept and re-raised once the native work ends.
pub(crate) struct StageProgress {
    callback: Option<Py<PyAny>>,
    stage: &'static str,
    total: usize,
    failure: Option<PyErr>,
}

impl StageProgress {
    pub(crate) fn new(callback: Option<Py<PyAny>>) -> StageProgress {
        StageProgress { callback, stage: "", total: 0, failure: None }
    }

    pub(crate) fn stage(&mut self, stage: &'static str, total: usize) {
        (self.stage, self.total) = (stage, total);
        self.step(0);
    }

    pub(crate) fn step(&mut self, done: usize) {
        if let (Some(cb), None) = (&self.callback, &self.failure) {
            if let Err(e) = Python::attach(|py| cb.call1(py, (self.stage, done, self.total))) {
                self.failure = Some(e);
            }
        }
    }

    /// The callback's exception, if it raised one.
    pub(crate) fn raised(&mut self) -> PyResult<()> {
        self.failure.take().map_or(Ok(()), Err)
    }
}

/// AIMET's QuantSim on an ONNX model: quantizers placed from a quantsim config, calibrated on
/// your data, run, exported as AIMET encodings or as a QDQ model.
///
/// `config` is a preset (`default`, `default_per_tensor`, `htp_v73`) or the path of a JSON
/// config in AIMET's schema; `param`/`act` the default precisions (`int4`..`int16`, `fp16`);
/// `scheme` the calibration (`min_max`, `tf_enhanced`, `percentile`, `mse`, `entropy`);
/// `threads` 0 for every core.
/// What a forward-pass callback runs: each `run(inputs)` records one calibration batch.
#[pyclass(module = "quantkit")]
pub(crate) struct BatchRecorder {
    pub(crate) batches: Vec<qcalib::Feeds>,
}

#[pymethods]
impl BatchRecorder {
    /// Records `inputs` (a dict `{input name: array}`) as a calibration batch.
    pub(crate) fn run(&mut self, inputs: &Bound<'_, PyDict>) -> PyResult<()> {
        self.batches.push(feeds(inputs)?);
        Ok(())
    }
}

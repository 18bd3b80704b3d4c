//! AutoQuant, AIMET's flow of post-training techniques tried in order until one is good enough:
//! the model with batch norms folded, simulated at the given precisions (the baseline); when
//! that misses the target, AIMET's W32 check — the same simulation with every weight in float —
//! and when even that misses it, no weight technique can help: equalization and AdaRound are
//! skipped (an early exit, as AIMET's); else with cross-layer equalization; then AdaRound on the better of those two, as AIMET's
//! AutoQuant does; then, when asked for, auto mixed precision from that same model (AdaRound's
//! rounded weights sit on their precision's grid, which a wider candidate could not undo). The
//! first stage whose score is within `allowed_drop` of FP32 is kept; when none is, the best. Each
//! stage's score goes to a cache file as soon as it is known, AdaRound's rounded model with its
//! encodings beside it, and AMP keeps its own resumable cache there, so an interrupted run
//! resumes where it stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use qcalib::{Feeds, LoadedEncoding, Precision, QuantSim, QuantsimConfig, SimOptions};
use qgraph::Model;
use qkernels::Encoding;
use serde_json::{Value, json};

/// What can stop AutoQuant.
#[derive(Debug, thiserror::Error)]
pub enum AutoQuantError {
    /// The simulation failed.
    #[error(transparent)]
    Sim(#[from] qcalib::CalibError),
    /// The graph is malformed or could not be written.
    #[error(transparent)]
    Graph(#[from] qgraph::GraphError),
    /// Equalization or AdaRound failed.
    #[error(transparent)]
    Technique(#[from] qptq::PtqError),
    /// The AMP stage failed.
    #[error("AutoQuant's AMP stage: {0}")]
    Amp(#[from] crate::AmpError),
    /// Bad settings.
    #[error("AutoQuant: {0}")]
    Settings(String),
    /// A stage could not be scored.
    #[error("AutoQuant stage {stage}: scoring failed: {detail}")]
    Score {
        /// The stage's name.
        stage: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A cache file's contents cannot be used.
    #[error("AutoQuant cache {path}: {detail}")]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The cache folder or a file in it could not be read or written.
    #[error("AutoQuant cache {path}: {source}")]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The stages, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AutoQuantStage {
    /// Batch norms folded, quantized as configured.
    Baseline,
    /// The baseline with every weight in float (AIMET's W32 evaluation): what the activations'
    /// quantization alone leaves. Scored, never kept.
    WeightsInFloat,
    /// Plus cross-layer equalization.
    Equalized,
    /// Plus AdaRound.
    Adarounded,
    /// Plus auto mixed precision.
    MixedPrecision,
}

impl AutoQuantStage {
    /// The stage's name in reports and the cache.
    pub fn name(self) -> &'static str {
        match self {
            AutoQuantStage::Baseline => "batchnorm_folding",
            AutoQuantStage::WeightsInFloat => "w32_evaluation",
            AutoQuantStage::Equalized => "cross_layer_equalization",
            AutoQuantStage::Adarounded => "adaround",
            AutoQuantStage::MixedPrecision => "auto_mixed_precision",
        }
    }
}

/// One stage's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct StageScore {
    /// The stage.
    pub stage: AutoQuantStage,
    /// Its score (e.g. top-1).
    pub score: f64,
    /// Seconds the technique and the scoring took (0 when read from the cache).
    pub seconds: f64,
    /// Whether the score came from the cache.
    pub cached: bool,
}

/// AutoQuant's settings.
#[derive(Debug, Clone)]
pub struct AutoQuantOptions {
    /// Largest score drop below FP32 accepted.
    pub allowed_drop: f64,
    /// AdaRound's settings.
    pub adaround: qptq::AdaroundOptions,
    /// The cache folder (created when missing); `None`: no cache.
    pub cache: Option<PathBuf>,
    /// Text identifying the job (model, data, precisions): a cache made for another job is not
    /// reused.
    pub fingerprint: String,
    /// The AMP stage, when wanted.
    pub amp: Option<AutoQuantAmp>,
}

/// AutoQuant's last stage: AIMET's greedy AMP from the better of the batch-norm-folded and the
/// equalized models, with
/// AutoQuant's allowed drop as its target and the stage scorer as its phase-2 metric.
#[derive(Debug, Clone)]
pub struct AutoQuantAmp {
    /// AMP's settings; its target and results folder are set by AutoQuant (the folder inside
    /// AutoQuant's cache, so AMP resumes too).
    pub options: crate::AmpOptions,
    /// Batches phase 1 scores groups on.
    pub phase1: Vec<Feeds>,
}

/// What AutoQuant chose.
pub struct AutoQuantResult {
    /// FP32 score.
    pub fp32: f64,
    /// `fp32 − allowed_drop`.
    pub target: f64,
    /// The stages run (or read), in order.
    pub stages: Vec<StageScore>,
    /// The stage kept.
    pub chosen: AutoQuantStage,
    /// Whether it meets the target.
    pub met: bool,
    /// Whether the weight techniques were skipped because the simulation with float weights
    /// already missed the target (AIMET's early exit).
    pub early_exit: bool,
    /// The calibrated simulation of the kept stage.
    pub sim: QuantSim,
    /// The AMP stage's result, when it ran.
    pub amp: Option<crate::AmpResult>,
}

impl AutoQuantResult {
    /// The summary as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "fp32": self.fp32,
            "target": self.target,
            "chosen": self.chosen.name(),
            "target_met": self.met,
            "early_exit": self.early_exit,
            "stages": self.stages.iter().map(|s| json!({
                "stage": s.stage.name(), "score": s.score, "drop": self.fp32 - s.score,
                "seconds": s.seconds, "cached": s.cached,
            })).collect::<Vec<_>>(),
            "amp": self.amp.as_ref().map(|r| json!({
                "final_score": r.final_score,
                "relative_bitops": r.final_relative_bitops,
                "chosen_by": r.chosen_by,
                "groups_per_candidate": r.assignment.iter().fold(
                    std::collections::BTreeMap::<String, usize>::new(),
                    |mut counts, c| {
                        *counts.entry(c.to_string()).or_default() += 1;
                        counts
                    },
                ),
            })),
        })
    }

    /// A self-contained HTML page with the summary table.
    pub fn to_html(&self, title: &str) -> String {
        let rows: String = self
            .stages
            .iter()
            .map(|s| {
                let mark = if s.stage == self.chosen { " class=\"chosen\"" } else { "" };
                format!(
                    "<tr{mark}><td>{}</td><td>{:.4}</td><td>{:+.4}</td><td>{}</td><td>{}</td></tr>\n",
                    s.stage.name(),
                    s.score,
                    s.score - self.fp32,
                    if s.cached { "cached".to_string() } else { format!("{:.1} s", s.seconds) },
                    if s.score >= self.target { "yes" } else { "no" }
                )
            })
            .collect();
        let escaped: String = title
            .chars()
            .flat_map(|c| match c {
                '<' => "&lt;".chars().collect::<Vec<_>>(),
                '>' => "&gt;".chars().collect(),
                '&' => "&amp;".chars().collect(),
                c => vec![c],
            })
            .collect();
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>AutoQuant: {escaped}</title>\n<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}tr.chosen{{background:#dfd}}</style></head>\n<body><h1>AutoQuant: {escaped}</h1>\n<p>FP32 score {:.4}; target {:.4} (allowed drop {:.4}). Kept: <b>{}</b>{}.</p>\n<table><tr><th>stage</th><th>score</th><th>vs FP32</th><th>time</th><th>meets target</th></tr>\n{rows}</table></body></html>\n",
            self.fp32,
            self.target,
            self.fp32 - self.target,
            self.chosen.name(),
            match (self.met, self.early_exit) {
                (true, _) => "",
                (false, true) =>
                    " (with float weights the simulation already misses the target: equalization and AdaRound, which change only weights, were skipped; the best is kept)",
                (false, false) => " (no stage met the target: the best is kept)",
            }
        )
    }
}

/// The stage scores and AdaRound's encodings as the cache holds them.
struct Cache {
    dir: Option<PathBuf>,
    fingerprint: String,
    scores: HashMap<String, f64>,
}

impl Cache {
    fn open(dir: Option<&Path>, fingerprint: &str) -> Result<Cache, AutoQuantError> {
        let mut cache = Cache {
            dir: dir.map(Path::to_path_buf),
            fingerprint: fingerprint.into(),
            scores: HashMap::new(),
        };
        let Some(dir) = dir else { return Ok(cache) };
        let path = dir.join("scores.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cache),
            Err(source) => return Err(AutoQuantError::Io { path, source }),
        };
        let bad = |detail: &str| AutoQuantError::Cache { path: path.clone(), detail: detail.into() };
        let doc: Value = serde_json::from_str(&text).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        if doc["fingerprint"].as_str() != Some(fingerprint) {
            // Made for another job: start afresh (AMP's cache would refuse the new settings).
            let amp = dir.join("amp");
            if amp.exists() {
                std::fs::remove_dir_all(&amp).map_err(|source| AutoQuantError::Io { path: amp, source })?;
            }
            return Ok(cache);
        }
        for (k, v) in doc["scores"].as_object().ok_or_else(|| bad("no scores"))? {
            cache.scores.insert(k.clone(), v.as_f64().ok_or_else(|| bad("a score is not a number"))?);
        }
        Ok(cache)
    }

    fn score(&self, stage: AutoQuantStage) -> Option<f64> {
        self.scores.get(stage.name()).copied()
    }

    fn record(&mut self, stage: AutoQuantStage, score: f64) -> Result<(), AutoQuantError> {
        self.scores.insert(stage.name().into(), score);
        let Some(dir) = &self.dir else { return Ok(()) };
        std::fs::create_dir_all(dir).map_err(|source| AutoQuantError::Io { path: dir.clone(), source })?;
        let doc = json!({"fingerprint": self.fingerprint, "scores": self.scores});
        qgraph::write_atomically(&dir.join("scores.json"), qcalib::to_pretty_json(&doc).as_bytes())?;
        Ok(())
    }

    /// AdaRound's model and encodings, when cached.
    fn adarounded(&self) -> Option<(Model, HashMap<String, LoadedEncoding>)> {
        let dir = self.dir.as_ref()?;
        self.score(AutoQuantStage::Adarounded)?;
        let model = qgraph::load_path(dir.join("adaround_model.onnx")).ok()?;
        let doc: Value =
            serde_json::from_slice(&std::fs::read(dir.join("adaround_encodings.json")).ok()?).ok()?;
        Some((model, encodings_from_json(&doc)?))
    }

    fn keep_adarounded(
        &self,
        model: &Model,
        encodings: &HashMap<String, LoadedEncoding>,
    ) -> Result<(), AutoQuantError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        std::fs::create_dir_all(dir).map_err(|source| AutoQuantError::Io { path: dir.clone(), source })?;
        qgraph::save_path(model, dir.join("adaround_model.onnx"))?;
        let text = qcalib::to_pretty_json(&encodings_to_json(encodings));
        qgraph::write_atomically(&dir.join("adaround_encodings.json"), text.as_bytes())?;
        Ok(())
    }
}

/// The stages scored so far and the best of them.
struct Scored {
    target: f64,
    stages: Vec<StageScore>,
    best: Option<(f64, AutoQuantStage, QuantSim)>,
    /// The best stage whose weights are still float (batch norms folded, or equalized).
    best_float: Option<(f64, Model)>,
}

impl Scored {
    /// Records a stage with its simulation; whether it meets the target.
    fn add(&mut self, score: StageScore, sim: QuantSim) -> bool {
        let value = score.score;
        if score.stage == AutoQuantStage::WeightsInFloat {
            self.stages.push(score);
            return value >= self.target;
        }
        let float = matches!(score.stage, AutoQuantStage::Baseline | AutoQuantStage::Equalized);
        if float && self.best_float.as_ref().is_none_or(|(b, _)| value > *b) {
            self.best_float = Some((value, sim.model().clone()));
        }
        if self.best.as_ref().is_none_or(|(b, _, _)| value > *b) {
            self.best = Some((value, score.stage, sim));
        }
        self.stages.push(score);
        value >= self.target
    }

    /// The model of the best stage with float weights.
    fn best_float_model(&self) -> Option<Model> {
        self.best_float.as_ref().map(|(_, m)| m.clone())
    }
}

/// Frozen encodings as JSON: `{name: {bits, symmetric, encodings: [[scale, offset, steps]…]}}`.
fn encodings_to_json(encodings: &HashMap<String, LoadedEncoding>) -> Value {
    let entries: serde_json::Map<String, Value> = encodings
        .iter()
        .filter_map(|(name, l)| {
            let Precision::Int(bits) = l.precision else { return None };
            let list: Vec<Value> = l.encodings.iter().map(|e| json!([e.delta, e.offset, e.steps])).collect();
            Some((name.clone(), json!({"bits": bits, "symmetric": l.symmetric, "encodings": list})))
        })
        .collect();
    Value::Object(entries)
}

fn encodings_from_json(doc: &Value) -> Option<HashMap<String, LoadedEncoding>> {
    doc.as_object()?
        .iter()
        .map(|(name, v)| {
            let bits = u32::try_from(v["bits"].as_u64()?).ok().filter(|b| (2..=16).contains(b))?;
            let encodings = v["encodings"]
                .as_array()?
                .iter()
                .map(|e| {
                    let (d, o, s) = (e[0].as_f64()?, e[1].as_f64()?, e[2].as_f64()?);
                    (d.is_finite() && d > 0.0 && o.is_finite() && s.is_finite())
                        .then(|| Encoding::from_scale_offset(d, o, bits, s))
                })
                .collect::<Option<Vec<_>>>()?;
            let symmetric = v["symmetric"].as_bool()?;
            Some((
                name.clone(),
                LoadedEncoding {
                    precision: Precision::Int(bits),
                    symmetric,
                    encodings,
                    channel_major_blocks: false,
                },
            ))
        })
        .collect()
}

/// A calibrated simulation of `model` with `frozen` weight encodings.
fn calibrated(
    model: Model,
    config: &QuantsimConfig,
    options: SimOptions,
    frozen: &HashMap<String, LoadedEncoding>,
    calibration: &[Feeds],
) -> Result<QuantSim, AutoQuantError> {
    let mut sim = QuantSim::new(model, config.clone(), options)?;
    qcalib::freeze_encodings(&mut sim, frozen);
    sim.calibrate(calibration.iter().cloned(), &mut |_| {})?;
    Ok(sim)
}

/// Runs AutoQuant (see the module doc) on `model` with `fp32` its FP32 score; `score` rates a
/// calibrated simulation (higher is better); `progress(stage, done, total)` reports AdaRound's
/// iterations.
#[allow(clippy::too_many_arguments)]
pub fn auto_quant(
    model: &Model,
    config: &QuantsimConfig,
    options: SimOptions,
    calibration: &[Feeds],
    fp32: f64,
    score: &mut dyn FnMut(&QuantSim) -> Result<f64, String>,
    settings: &AutoQuantOptions,
    progress: &mut dyn FnMut(AutoQuantStage, u64, u64),
) -> Result<AutoQuantResult, AutoQuantError> {
    if !settings.allowed_drop.is_finite() || settings.allowed_drop < 0.0 {
        return Err(AutoQuantError::Settings(format!(
            "allowed drop {} is not a non-negative number",
            settings.allowed_drop
        )));
    }
    let target = fp32 - settings.allowed_drop;
    let mut cache = Cache::open(settings.cache.as_deref(), &settings.fingerprint)?;
    let mut scored = Scored { target, stages: Vec::new(), best: None, best_float: None };
    let none = HashMap::new();
    let mut evaluate = |stage: AutoQuantStage,
                        sim: QuantSim,
                        started: Instant,
                        scored: &mut Scored,
                        cache: &mut Cache|
     -> Result<bool, AutoQuantError> {
        let (value, cached) = match cache.score(stage) {
            Some(v) => (v, true),
            None => {
                let v =
                    score(&sim).map_err(|detail| AutoQuantError::Score { stage: stage.name(), detail })?;
                cache.record(stage, v)?;
                (v, false)
            }
        };
        let seconds = if cached { 0.0 } else { started.elapsed().as_secs_f64() };
        Ok(scored.add(StageScore { stage, score: value, seconds, cached }, sim))
    };

    // 1. Batch norms folded.
    let started = Instant::now();
    let mut folded = model.clone();
    qgraph::passes::fold_batch_norms(&mut folded)?;
    let sim = calibrated(folded.clone(), config, options, &none, calibration)?;
    let mut met = evaluate(AutoQuantStage::Baseline, sim, started, &mut scored, &mut cache)?;
    // AIMET's W32 check: when float weights miss the target too, no weight technique can help.
    let mut early_exit = false;
    if !met {
        let started = Instant::now();
        let mut sim = QuantSim::new(folded.clone(), config.clone(), options)?;
        let placement = sim.placement_mut();
        for q in placement.quantizer_ids() {
            if placement.quantizer(q).is_param {
                placement.quantizer_mut(q).enabled = false;
            }
        }
        sim.calibrate(calibration.iter().cloned(), &mut |_| {})?;
        early_exit = !evaluate(AutoQuantStage::WeightsInFloat, sim, started, &mut scored, &mut cache)?;
    }
    // 2. Cross-layer equalization.
    if !met && !early_exit {
        let started = Instant::now();
        let mut equalized = folded;
        qptq::equalize(&mut equalized, qptq::EqualizeOptions::default())?;
        let sim = calibrated(equalized, config, options, &none, calibration)?;
        met = evaluate(AutoQuantStage::Equalized, sim, started, &mut scored, &mut cache)?;
    }
    // 3. AdaRound on the better of the two.
    if !met && !early_exit {
        let started = Instant::now();
        let start = scored.best_float_model().unwrap_or_else(|| model.clone());
        let (rounded, frozen) = match cache.adarounded() {
            Some(hit) => hit,
            None => {
                let r =
                    qptq::adaround(&start, config, options, calibration, &settings.adaround, &mut |d, t| {
                        progress(AutoQuantStage::Adarounded, d, t)
                    })?;
                cache.keep_adarounded(&r.model, &r.encodings)?;
                (r.model, r.encodings)
            }
        };
        let sim = calibrated(rounded, config, options, &frozen, calibration)?;
        met = evaluate(AutoQuantStage::Adarounded, sim, started, &mut scored, &mut cache)?;
    }
    // 4. AMP from the better float model: AdaRound's weights sit on the grid of its precision,
    //    which a wider candidate could not undo.
    let mut amp_result = None;
    if let (false, Some(stage)) = (met, &settings.amp) {
        let started = Instant::now();
        let start = scored.best_float_model().unwrap_or_else(|| model.clone());
        let highest = stage.options.candidates.iter().copied().max_by(|a, b| a.cost().total_cmp(&b.cost()));
        let highest =
            highest.ok_or_else(|| AutoQuantError::Settings("the AMP stage has no candidates".into()))?;
        let precision = qcalib::DefaultPrecision { param: highest.param, activation: highest.activation };
        let mut sim = QuantSim::new(start, config.clone(), SimOptions { precision, ..options })?;
        let amp_options = crate::AmpOptions {
            allowed_accuracy_drop: Some(settings.allowed_drop),
            results_dir: cache.dir.as_ref().map(|d| d.join("amp")),
            ..stage.options.clone()
        };
        let description = format!("AutoQuant's score | {}", cache.fingerprint);
        let r = crate::choose_mixed_precision(
            &mut sim,
            &crate::AmpData { calibration, phase1: &stage.phase1 },
            crate::Phase2 { description, eval: &mut *score },
            &amp_options,
            &mut |_| {},
        )?;
        let (value, seconds) = (r.final_score, started.elapsed().as_secs_f64());
        // AMP caches its own evaluations: the stage counts as cached when it evaluated nothing.
        let cached = r.work.phase1_evaluations + r.work.phase2_evaluations == 0;
        met = scored
            .add(StageScore { stage: AutoQuantStage::MixedPrecision, score: value, seconds, cached }, sim);
        amp_result = Some(r);
    }
    let Scored { stages, best, .. } = scored;
    let Some((_, chosen, sim)) = best else {
        return Err(AutoQuantError::Settings("no stage was scored".into()));
    };
    // When a stage meets the target it is the last one run; else the best is kept.
    Ok(AutoQuantResult { fp32, target, stages, chosen, met, early_exit, sim, amp: amp_result })
}

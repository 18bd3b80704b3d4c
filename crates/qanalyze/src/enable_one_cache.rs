//! Resumable, shardable enable-one: every layer's score is written as soon as it is known to
//! `<dir>/.cache/enable_one-<key>.json` (temp file + rename), so a killed run resumes where it
//! stopped; a shard (`i` of `n`: the layers whose index is `i` modulo `n`) writes
//! `enable_one-<key>.shard-<i>-of-<n>.json` instead, so shards running at once — on one machine
//! or on a cluster sharing the folder — never write the same file. A run without a shard takes in
//! every shard file of its key and scores only what is missing; each score is the same number
//! whoever computes it, so the merge is deterministic.
//!
//! The key is a checksum of the settings the scores depend on (model, layers, the calibrated
//! simulation with its encodings, the scored data, the metric), so runs with other settings use
//! other files and never a stale score.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qcalib::QuantSim;
use serde_json::{Value, json};

use crate::sensitivity::{AnalyzeError, FloatReference, LayerScore, Scorer, enable_one_of, layers};

/// Format tag of the files; bump when the layout changes.
const FORMAT: &str = "qmix-enable-one 1";

/// The enable-one scores known for one simulation, data and metric, and where they are kept.
#[derive(Debug)]
pub struct EnableOneCache {
    path: PathBuf,
    settings: Value,
    shard: Option<(usize, usize)>,
    scores: BTreeMap<String, f64>,
}

fn corrupt(path: &Path, detail: impl Into<String>) -> AnalyzeError {
    AnalyzeError::Cache { path: path.to_path_buf(), detail: detail.into() }
}

/// A score as JSON: a number, or the string `inf`, `-inf` or `NaN` (JSON has no such numbers).
fn score_json(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { json!(x.to_string()) }
}

fn score_from_json(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse::<f64>().ok()).filter(|x| !x.is_finite()))
}

impl EnableOneCache {
    /// Opens the cache in `dir/.cache` of the calibrated `sim` scored with `metric` against
    /// `reference`, as shard `i` of `n` or (no `shard`) as the main cache, which also takes in
    /// every shard file of the same settings.
    pub fn open(
        dir: &Path,
        sim: &QuantSim,
        reference: &FloatReference,
        metric: &impl Scorer,
        shard: Option<(usize, usize)>,
    ) -> Result<EnableOneCache, AnalyzeError> {
        if let Some((i, n)) = shard
            && (n == 0 || i >= n)
        {
            return Err(AnalyzeError::Data(format!("shard {i}/{n}: need 0 ≤ i < n")));
        }
        let g = &sim.model().graph;
        let layer_names: Vec<&str> = layers(sim)?.iter().map(|(n, _)| g.node(*n).name.as_str()).collect();
        let settings = json!({
            "model": g.name,
            "layers": layer_names,
            "simulation": sim.state_checksum()?,
            "data": qcalib::feeds_checksum(reference.batches()),
            "metric": metric.metric_name(),
        });
        let key = qcalib::tensors_checksum(std::iter::empty(), &settings.to_string());
        let cache_dir = dir.join(".cache");
        std::fs::create_dir_all(&cache_dir)
            .map_err(|e| corrupt(&cache_dir, format!("cannot create the cache folder ({e})")))?;
        let stem = format!("enable_one-{key}");
        let name = match shard {
            Some((i, n)) => format!("{stem}.shard-{i}-of-{n}.json"),
            None => format!("{stem}.json"),
        };
        let path = cache_dir.join(name);
        let mut cache = EnableOneCache { path: path.clone(), settings, shard, scores: BTreeMap::new() };
        let mut files = vec![path.clone()];
        if shard.is_none() {
            let mut shards: Vec<PathBuf> = std::fs::read_dir(&cache_dir)
                .map_err(|e| corrupt(&cache_dir, format!("cannot list the cache folder ({e})")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{stem}.shard-")) && n.ends_with(".json"))
                })
                .collect();
            shards.sort();
            files.extend(shards);
        }
        for f in files.iter().filter(|f| f.exists()) {
            cache.merge_file(f)?;
        }
        Ok(cache)
    }

    /// The shard this cache computes, if it is one.
    pub fn shard(&self) -> Option<(usize, usize)> {
        self.shard
    }

    /// The file this cache writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Layers whose score is known.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// Whether no score is known.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    fn merge_file(&mut self, path: &Path) -> Result<(), AnalyzeError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| corrupt(path, format!("cannot read it ({e})")))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| corrupt(path, format!("not valid JSON ({e}); delete it to score again")))?;
        if v["format"] != FORMAT || v["settings"] != self.settings {
            return Err(corrupt(
                path,
                format!("not a {FORMAT} file of these settings; delete it to score again"),
            ));
        }
        let scores = v["scores"]
            .as_object()
            .ok_or_else(|| corrupt(path, "no \"scores\" object; delete it to score again"))?;
        for (layer, s) in scores {
            let s = score_from_json(s)
                .ok_or_else(|| corrupt(path, format!("the score of {layer} is not a number")))?;
            self.scores.insert(layer.clone(), s);
        }
        Ok(())
    }

    fn save(&self) -> Result<(), AnalyzeError> {
        let scores: serde_json::Map<String, Value> =
            self.scores.iter().map(|(l, &s)| (l.clone(), score_json(s))).collect();
        let v = json!({"format": FORMAT, "settings": self.settings, "scores": scores});
        let text = serde_json::to_string_pretty(&v).map_err(|e| corrupt(&self.path, e.to_string()))?;
        qgraph::write_atomically(&self.path, text.as_bytes()).map_err(|e| corrupt(&self.path, e.to_string()))
    }
}

/// [`crate::enable_one`] through `cache`: scores only the layers of the cache's shard (all layers
/// for the main cache) that it does not know yet, saving each as it comes, and returns the scores
/// of those layers in layer order. `progress(done, total)` counts the layers scored in this run.
pub fn enable_one_cached(
    sim: &mut QuantSim,
    reference: &FloatReference,
    metric: impl Scorer,
    cache: &mut EnableOneCache,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerScore>, AnalyzeError> {
    let g = &sim.model().graph;
    let names: Vec<String> = layers(sim)?.iter().map(|(n, _)| g.node(*n).name.clone()).collect();
    let mine: Vec<usize> = (0..names.len()).filter(|k| cache.shard.is_none_or(|(i, n)| k % n == i)).collect();
    let todo: Vec<usize> = mine.iter().copied().filter(|&k| !cache.scores.contains_key(&names[k])).collect();
    if todo.is_empty() && cache.shard.is_none() {
        // The main file takes in what the shards found.
        cache.save()?;
    } else if !todo.is_empty() {
        enable_one_of(
            sim,
            reference,
            &metric,
            &todo,
            &mut |_, s| {
                cache.scores.insert(s.layer, s.score);
                cache.save()
            },
            progress,
        )?;
    }
    Ok(mine
        .iter()
        .map(|&k| LayerScore {
            layer: names[k].clone(),
            score: cache.scores[&names[k]],
            higher_is_better: metric.higher_is_better(),
        })
        .collect())
}

//! The AMP results cache (`<results_dir>/.cache/amp_cache.json`): every evaluation AMP makes — the
//! FP32 score, each baseline candidate, each phase-1 (group, candidate) score, each phase-2 point —
//! is written as soon as it is known (temp file + rename), so a killed run resumes without
//! evaluating anything twice. The cache records the settings it was made with; a run with other
//! settings refuses it unless told to start clean.
//!
//! A phase-1 shard (`--shard i/n`) writes `amp_cache.shard-i-of-n.json` instead; the main cache
//! merges every shard file of the same settings when it opens, so shards computed anywhere (copy
//! the files into `.cache/`) combine deterministically: each entry is the same number whoever
//! computes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::AmpError;

/// Cache format tag; bump when the layout changes.
const FORMAT: &str = "qmix-amp-cache 1";

/// The cached evaluations of one AMP problem.
#[derive(Debug, Default)]
pub(crate) struct AmpCache {
    path: Option<PathBuf>,
    settings: Value,
    pub fp32: Option<f64>,
    /// Score per baseline candidate label.
    pub baseline: BTreeMap<String, f64>,
    /// Score per (group index, candidate label).
    pub phase1: BTreeMap<(usize, String), f64>,
    /// (relative bit-ops, score) per accuracy-list point.
    pub phase2: BTreeMap<usize, (f64, f64)>,
    /// Phase-2 score per quantizer state (see `amp::state_key`), whichever search asked for it.
    pub plans: BTreeMap<String, f64>,
}

fn corrupt(path: &Path, detail: impl Into<String>) -> AmpError {
    AmpError::Cache { path: path.to_path_buf(), detail: detail.into() }
}

impl AmpCache {
    /// Opens the cache of `results_dir` (none: an in-memory cache), deleting it first with
    /// `clean_start`; the main cache (no `shard`) also takes in every shard file.
    pub fn open(
        results_dir: Option<&Path>,
        settings: Value,
        clean_start: bool,
        shard: Option<(usize, usize)>,
    ) -> Result<AmpCache, AmpError> {
        let Some(dir) = results_dir else { return Ok(AmpCache { settings, ..AmpCache::default() }) };
        let cache_dir = dir.join(".cache");
        std::fs::create_dir_all(&cache_dir)
            .map_err(|source| AmpError::Io { path: cache_dir.clone(), source })?;
        let name = match shard {
            Some((i, n)) => format!("amp_cache.shard-{i}-of-{n}.json"),
            None => "amp_cache.json".into(),
        };
        let path = cache_dir.join(name);
        let mut cache = AmpCache { path: Some(path.clone()), settings, ..AmpCache::default() };
        if clean_start {
            return Ok(cache);
        }
        if path.exists() {
            cache.merge_file(&path)?;
        }
        if shard.is_none() {
            let mut shards: Vec<PathBuf> = std::fs::read_dir(&cache_dir)
                .map_err(|source| AmpError::Io { path: cache_dir.clone(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("amp_cache.shard-") && n.ends_with(".json"))
                })
                .collect();
            shards.sort();
            for p in shards {
                cache.merge_file(&p)?;
            }
        }
        Ok(cache)
    }

    /// Adds the entries of a cache file, which must have been made with the same settings.
    fn merge_file(&mut self, path: &Path) -> Result<(), AmpError> {
        let settings = self.settings.clone();
        let cache = self;
        let text =
            std::fs::read_to_string(path).map_err(|source| AmpError::Io { path: path.into(), source })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| corrupt(path, format!("not valid JSON ({e}); delete it or start clean")))?;
        if v["format"] != FORMAT {
            return Err(corrupt(path, format!("not a {FORMAT} file; delete it or start clean")));
        }
        if v["settings"] != settings {
            return Err(corrupt(
                path,
                format!(
                    "made with other settings ({}), this run has {}; start clean to discard it",
                    v["settings"], settings
                ),
            ));
        }
        let num = |x: &Value, what: &str| {
            x.as_f64().ok_or_else(|| corrupt(path, format!("{what} is not a number")))
        };
        if let Some(f) = v.get("fp32").filter(|x| !x.is_null()) {
            cache.fp32 = Some(num(f, "fp32")?);
        }
        for e in v["baseline"].as_array().into_iter().flatten() {
            let label =
                e["candidate"].as_str().ok_or_else(|| corrupt(path, "baseline entry without candidate"))?;
            cache.baseline.insert(label.to_string(), num(&e["score"], "baseline score")?);
        }
        for e in v["phase1"].as_array().into_iter().flatten() {
            let group =
                e["group"].as_u64().ok_or_else(|| corrupt(path, "phase-1 entry without group"))? as usize;
            let label =
                e["candidate"].as_str().ok_or_else(|| corrupt(path, "phase-1 entry without candidate"))?;
            cache.phase1.insert((group, label.to_string()), num(&e["score"], "phase-1 score")?);
        }
        for e in v["phase2"].as_array().into_iter().flatten() {
            let point =
                e["point"].as_u64().ok_or_else(|| corrupt(path, "phase-2 entry without point"))? as usize;
            cache
                .phase2
                .insert(point, (num(&e["relative_bitops"], "bit-ops")?, num(&e["score"], "phase-2 score")?));
        }
        for e in v["plans"].as_array().into_iter().flatten() {
            let state = e["state"].as_str().ok_or_else(|| corrupt(path, "plan entry without state"))?;
            cache.plans.insert(state.to_string(), num(&e["score"], "plan score")?);
        }
        Ok(())
    }

    /// Writes the cache (temp file + rename).
    pub fn save(&self) -> Result<(), AmpError> {
        let Some(path) = &self.path else { return Ok(()) };
        let baseline: Vec<Value> =
            self.baseline.iter().map(|(c, s)| json!({"candidate": c, "score": s})).collect();
        let phase1: Vec<Value> =
            self.phase1.iter().map(|((g, c), s)| json!({"group": g, "candidate": c, "score": s})).collect();
        let phase2: Vec<Value> = self
            .phase2
            .iter()
            .map(|(i, (b, s))| json!({"point": i, "relative_bitops": b, "score": s}))
            .collect();
        let plans: Vec<Value> = self.plans.iter().map(|(k, s)| json!({"state": k, "score": s})).collect();
        let v = json!({
            "format": FORMAT,
            "settings": self.settings,
            "fp32": self.fp32,
            "baseline": baseline,
            "phase1": phase1,
            "phase2": phase2,
            "plans": plans,
        });
        let text = serde_json::to_string_pretty(&v).expect("JSON values serialise");
        qgraph::write_atomically(path, text.as_bytes())
            .map_err(|e| AmpError::Write { path: path.clone(), detail: e.to_string() })
    }
}

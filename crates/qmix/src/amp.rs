//! Greedy auto mixed precision (spec §7), AIMET's algorithm with deterministic group order, a
//! resumable cache and an optional full Pareto front:
//!
//! 1. FP32 score, then every baseline candidate applied to all groups, calibrated and scored
//!    (phase-2 metric); the best is the starting point, the cheapest in bit-ops the floor.
//! 2. Phase 1: for each other candidate, calibrate with the groups that support it set to it
//!    (parameter encodings from a calibration with quantized weights, activation encodings from
//!    one with float weights — AIMET's "optimized" variant), then score each group alone with only
//!    its quantizers on. Only the group's downstream is recomputed, from cached FP32 values. The
//!    (group, candidate) list is sorted least sensitive first.
//! 3. Phase 2: point `i` applies list entries `0..=i` on top of the starting point, recalibrates
//!    and scores with the phase-2 metric. A search finds the last point within the allowed drop
//!    from FP32; optionally every point is evaluated (the full front). Points whose effective
//!    quantizer state equals an evaluated one reuse its score.
//!
//! Phase-2 points and the final plan get the config's exception rules applied again before their
//! recalibration, as AIMET does.

use std::path::PathBuf;
use std::time::Instant;

use qanalyze::{FloatReference, Metric};
use qcalib::{Feeds, Precision, QuantSim, QuantizerId};
use serde_json::json;

use crate::AmpError;
use crate::amp_cache::AmpCache;
use crate::bitops::{BitOps, CostTable, MacOps};
use crate::budget::{Plan, area_between, predicted_front};
use crate::candidate::WeightBlocks;
use crate::candidate::{Candidate, supported_candidates};
use crate::convert_ops::{GroupGraph, Phase3Options, Phase3Result, plan_phase3};
use crate::groups::{QuantizerGroup, find_quantizer_groups};
use crate::search::{SearchAlgo, search};
use crate::target::{PlanChange, Target, legalize};

/// Settings of an AMP run.
#[derive(Debug, Clone)]
pub struct AmpOptions {
    /// Candidates in the user's order.
    pub candidates: Vec<Candidate>,
    /// Allowed drop of the phase-2 score below FP32; `None`: no target (the last point).
    pub allowed_accuracy_drop: Option<f64>,
    /// Phase-2 search.
    pub search: SearchAlgo,
    /// Evaluate every point of the accuracy list, not only those the search visits.
    pub full_front: bool,
    /// Also search the budget-optimal plans (an exact knapsack on the phase-1 scores) and take
    /// the cheapest plan of either search that meets the target.
    pub budget_search: bool,
    /// Phase-1 metric, scored against the FP32 outputs of the phase-1 batches.
    pub phase1_metric: Metric,
    /// Give every group every candidate, ignoring the config's `supported_kernels`.
    pub use_all_amp_candidates: bool,
    /// Which ops count in bit-ops.
    pub mac_ops: MacOps,
    /// Measured costs of the counted ops in place of bit-ops (`None`: `MAC × bits`).
    pub cost_table: Option<CostTable>,
    /// Where results and the resumable cache go (`None`: nothing written, nothing cached).
    pub results_dir: Option<PathBuf>,
    /// Discard an existing cache.
    pub clean_start: bool,
    /// Compute only shard `i` of `n` of phase 1 (every `n`-th (candidate, group) entry from the
    /// `i`-th) into its own cache file beside the main one, then stop. A later run without a
    /// shard merges every shard's results it finds for the same settings.
    pub shard: Option<(usize, usize)>,
    /// Threads of the FP32 reference runs.
    pub threads: usize,
    /// Memory for the FP32 values phase 1 resumes from, in bytes
    /// ([`qanalyze::DEFAULT_CACHE_BUDGET`] by default; phase-1 runs go in full beyond it).
    pub fp32_cache_bytes: usize,
    /// Run phase 3 (convert-op reduction) on the chosen plan: one plan per alpha, each
    /// recalibrated and scored; the simulation stays at the phase-2 choice.
    pub phase3: Option<Phase3Options>,
    /// The device the plans are for: every plan AMP scores (the baselines, phase-2 points, the
    /// budget search's and phase 3's plans, the final one) is made legal for it with
    /// [`crate::legalize`] before it is calibrated and scored, so each score is of a plan the
    /// target runs. The final plan is priced as repaired; the points of the search are priced
    /// as the search chose them.
    pub target: Option<Target>,
}

impl AmpOptions {
    /// AIMET's defaults over `candidates`: binary search, no target (the last point), AIMET's AMP
    /// SQNR in phase 1, the config's supported kernels, every weighted op in bit-ops, nothing
    /// written, every core.
    pub fn new(candidates: Vec<Candidate>) -> AmpOptions {
        AmpOptions {
            candidates,
            allowed_accuracy_drop: None,
            search: SearchAlgo::Binary,
            full_front: false,
            budget_search: false,
            phase1_metric: Metric::AmpSqnr,
            use_all_amp_candidates: false,
            mac_ops: MacOps::All,
            cost_table: None,
            results_dir: None,
            clean_start: false,
            shard: None,
            threads: 0,
            fp32_cache_bytes: qanalyze::DEFAULT_CACHE_BUDGET,
            phase3: None,
            target: None,
        }
    }
}

/// The data AMP runs on.
pub struct AmpData<'a> {
    /// Calibration batches (every recalibration uses all of them).
    pub calibration: &'a [Feeds],
    /// Batches phase 1 scores groups on.
    pub phase1: &'a [Feeds],
}

/// The phase-2 metric: a score of the simulation as it is, higher is better (e.g. top-1).
pub struct Phase2<'a> {
    /// What it measures on which data — part of the cache's identity.
    pub description: String,
    /// Scores the simulation.
    pub eval: &'a mut dyn FnMut(&QuantSim) -> Result<f64, String>,
}

/// Progress of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum AmpEvent {
    /// A stage starts with about `total` steps.
    Stage {
        /// Stage name.
        name: &'static str,
        /// Expected steps.
        total: usize,
    },
    /// Steps done in the current stage.
    Step(usize),
}

/// One phase-1 result.
#[derive(Debug, Clone, PartialEq)]
pub struct AccuracyEntry {
    /// Group index.
    pub group: usize,
    /// The candidate.
    pub candidate: Candidate,
    /// Phase-1 score with only this group quantized, at this candidate.
    pub score: f64,
    /// Bit-ops saved by this group alone at this candidate (AIMET's tie-break).
    pub bitops_reduction: f64,
}

/// One evaluated phase-2 point.
#[derive(Debug, Clone, PartialEq)]
pub struct ParetoPoint {
    /// Entries `0..=index` of the accuracy list applied.
    pub index: usize,
    /// Bit-ops relative to the starting point.
    pub relative_bitops: f64,
    /// Phase-2 score.
    pub score: f64,
}

/// The budget-optimal search: predicted plans and the ones evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSearch {
    /// The predicted front, most expensive plan first.
    pub plans: Vec<Plan>,
    /// Evaluated plans: (index in `plans`, phase-2 score).
    pub evaluated: Vec<(usize, f64)>,
    /// The plan the search chose, if one meets the target.
    pub chosen: Option<usize>,
    /// Area between the evaluated budget front and the evaluated greedy front (score × relative
    /// bit-ops over the range both cover; positive: the budget front is better).
    pub area_vs_greedy: f64,
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmpOutcome {
    /// Even the best candidate misses the target: everything stays at it.
    BaselineMissesTarget,
    /// The cheapest candidate meets the target: everything goes to it.
    LowestMeetsTarget,
    /// Phase 2 found a point (or kept the starting point when none meets the target).
    Searched,
    /// A phase-1 shard was computed; no phase 2.
    ShardDone,
}

/// Work done by this run (cached results are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmpWork {
    /// Phase-2 metric evaluations (FP32, baselines, points).
    pub phase2_evaluations: usize,
    /// Phase-1 evaluations.
    pub phase1_evaluations: usize,
    /// Calibrations over the calibration data.
    pub calibrations: usize,
    /// Points whose score was taken from an evaluated point with the same quantizer state.
    pub reused_points: usize,
}

/// The result of [`choose_mixed_precision`]; the simulation is left at `assignment`, calibrated.
#[derive(Debug, Clone)]
pub struct AmpResult {
    /// The quantizer groups.
    pub groups: Vec<QuantizerGroup>,
    /// Candidates each group may take.
    pub supported: Vec<Vec<Candidate>>,
    /// Phase-2 score with no quantizer on.
    pub fp32_score: f64,
    /// Phase-2 score of each baseline candidate applied everywhere.
    pub baseline_scores: Vec<(Candidate, f64)>,
    /// The starting point (best baseline).
    pub baseline: Candidate,
    /// The cheapest baseline.
    pub lowest: Candidate,
    /// Phase-1 list, least sensitive first.
    pub accuracy_list: Vec<AccuracyEntry>,
    /// Evaluated phase-2 points, in list order.
    pub points: Vec<ParetoPoint>,
    /// The applied prefix (`0..=i`), if any.
    pub chosen_point: Option<usize>,
    /// Final candidate per group.
    pub assignment: Vec<Candidate>,
    /// Phase-2 score of the final state.
    pub final_score: f64,
    /// Bit-ops of the final state relative to the starting point.
    pub final_relative_bitops: f64,
    /// How the run ended.
    pub outcome: AmpOutcome,
    /// Work done by this run.
    pub work: AmpWork,
    /// Seconds per stage.
    pub timings: Vec<(&'static str, f64)>,
    /// Bit-ops model.
    pub bitops: BitOps,
    /// Name of the phase-1 metric.
    pub phase1_metric: String,
    /// The budget-optimal search, when asked for.
    pub budget: Option<BudgetSearch>,
    /// Which search the final plan comes from: `greedy`, `budget` or `baseline`.
    pub chosen_by: &'static str,
    /// Phase 3, when asked for and the search ran.
    pub phase3: Option<Phase3Result>,
    /// What [`AmpOptions::target`] changed in the final plan (empty without a target).
    pub target_changes: Vec<PlanChange>,
}

fn set_group(sim: &mut QuantSim, group: &QuantizerGroup, c: Candidate, blocks: &WeightBlocks) {
    let p = sim.placement_mut();
    for &q in &group.activations {
        p.quantizer_mut(q).set_precision(c.activation);
    }
    blocks.set(p, &group.params, c);
}

/// The assignment the simulation holds: per group, the widest precision among its activation
/// and among its parameter quantizers (`searched` where a group has none) — after the target's
/// repairs, the plan as the device runs it, for pricing.
fn assignment_in(sim: &QuantSim, groups: &[QuantizerGroup], searched: &[Candidate]) -> Vec<Candidate> {
    let p = sim.placement();
    let widest = |qs: &[QuantizerId], fallback: Precision| {
        qs.iter()
            .map(|&q| p.quantizer(q).precision)
            .fold(fallback, |m, x| if x.bits() > m.bits() { x } else { m })
    };
    groups
        .iter()
        .zip(searched)
        .map(|(g, c)| Candidate {
            activation: widest(&g.activations, c.activation),
            param: widest(&g.params, c.param),
            block: c.block,
        })
        .collect()
}

fn set_enabled(sim: &mut QuantSim, qs: impl IntoIterator<Item = QuantizerId>, on: bool) {
    let p = sim.placement_mut();
    for q in qs {
        p.quantizer_mut(q).enabled = on;
    }
}

/// Bit-ops steps of the budget knapsack (costs are rounded up to 1/4096 of the most expensive plan).
const BUDGET_RESOLUTION: usize = 4096;

/// What the quantizers actually are under an assignment, as a cache key: per group its activation
/// side only if it has activations, its parameter side only if it has parameters.
fn state_key(groups: &[QuantizerGroup], assignment: &[Candidate]) -> String {
    let side = |p: Option<Precision>| p.map_or_else(String::new, |p| p.to_string());
    groups
        .iter()
        .zip(assignment)
        .map(|(g, c)| {
            let a = (!g.activations.is_empty()).then_some(c.activation);
            let w = (!g.params.is_empty()).then_some(c.param);
            let block = c.block.filter(|_| w.is_some()).map_or_else(String::new, |b| format!(" b{b}"));
            format!("{}/{}{block}", side(a), side(w))
        })
        .collect::<Vec<_>>()
        .join(";")
}

struct Run<'a, 'p, 'g> {
    sim: &'a mut QuantSim,
    data: &'a AmpData<'a>,
    phase2: Phase2<'p>,
    groups: Vec<QuantizerGroup>,
    cache: AmpCache,
    work: AmpWork,
    progress: &'g mut dyn FnMut(AmpEvent),
    target: Option<&'a Target>,
    /// What the target changed in the plan applied last.
    target_changes: Vec<PlanChange>,
    /// Weight layouts for candidates in blocks.
    blocks: WeightBlocks,
}

impl Run<'_, '_, '_> {
    /// Sets every group to its candidate.
    fn apply(&mut self, assignment: &[Candidate]) {
        for (g, &c) in self.groups.iter().zip(assignment) {
            set_group(&mut *self.sim, g, c, &self.blocks);
        }
    }

    /// Sets a phase-2 point and applies the exception rules again, as AIMET's
    /// `_optimize_mp_profile_and_evaluate_model` does before recalibrating; then the target's
    /// repairs.
    fn apply_point(&mut self, assignment: &[Candidate]) -> Result<(), AmpError> {
        self.apply(assignment);
        self.sim.apply_exception_rules()?;
        self.make_legal()
    }

    /// What the applied `assignment` costs: itself, or after the target's repairs, the plan the
    /// simulation holds.
    fn priced(&self, assignment: &[Candidate]) -> Vec<Candidate> {
        if self.target_changes.is_empty() {
            assignment.to_vec()
        } else {
            assignment_in(self.sim, &self.groups, assignment)
        }
    }

    /// Makes the simulation's plan legal for the target, if any.
    fn make_legal(&mut self) -> Result<(), AmpError> {
        if let Some(target) = self.target {
            self.target_changes = legalize(self.sim, target)?;
        }
        Ok(())
    }

    fn calibrate(&mut self) -> Result<(), AmpError> {
        self.sim.calibrate(self.data.calibration.iter().cloned(), &mut |_| {})?;
        self.work.calibrations += 1;
        Ok(())
    }

    fn evaluate(&mut self) -> Result<f64, AmpError> {
        self.work.phase2_evaluations += 1;
        let score = (self.phase2.eval)(self.sim).map_err(AmpError::Eval)?;
        if score.is_nan() {
            return Err(AmpError::Eval("the phase-2 metric returned NaN".into()));
        }
        Ok(score)
    }

    /// Sets the final assignment and calibrates it.
    fn finish(&mut self, assignment: Vec<Candidate>) -> Result<Vec<Candidate>, AmpError> {
        self.apply_point(&assignment)?;
        self.calibrate()?;
        Ok(assignment)
    }

    /// The phase-2 score of an assignment: from the cache when the same quantizer state was scored
    /// before, else applied, recalibrated, scored and cached.
    fn score_plan(&mut self, assignment: &[Candidate]) -> Result<f64, AmpError> {
        if let Some(s) = self.cached_score(assignment) {
            return Ok(s);
        }
        self.apply_point(assignment)?;
        self.calibrate()?;
        self.evaluate_and_cache(assignment)
    }

    /// Sets an assignment and recalibrates it (so its encodings can be read); its phase-2 score
    /// comes from the cache when the same quantizer state was scored before.
    fn calibrated_score(&mut self, assignment: &[Candidate]) -> Result<f64, AmpError> {
        self.apply_point(assignment)?;
        self.calibrate()?;
        match self.cached_score(assignment) {
            Some(s) => Ok(s),
            None => self.evaluate_and_cache(assignment),
        }
    }

    /// The cached score of an assignment's quantizer state, counted as a reused point.
    fn cached_score(&mut self, assignment: &[Candidate]) -> Option<f64> {
        let s = self.cache.plans.get(&state_key(&self.groups, assignment)).copied();
        self.work.reused_points += usize::from(s.is_some());
        s
    }

    /// Scores the simulation as it is and caches the score under the assignment's state.
    fn evaluate_and_cache(&mut self, assignment: &[Candidate]) -> Result<f64, AmpError> {
        let s = self.evaluate()?;
        self.cache.plans.insert(state_key(&self.groups, assignment), s);
        self.cache.save()?;
        Ok(s)
    }

    fn group_quantizers(&self) -> Vec<QuantizerId> {
        self.groups.iter().flat_map(QuantizerGroup::quantizers).collect()
    }
}

/// Chooses a per-group precision for `sim` (spec §7) and leaves it there, calibrated. `sim` must
/// hold the quantizers to mix enabled (normally built at the highest candidate).
pub fn choose_mixed_precision(
    sim: &mut QuantSim,
    data: &AmpData<'_>,
    phase2: Phase2<'_>,
    options: &AmpOptions,
    progress: &mut dyn FnMut(AmpEvent),
) -> Result<AmpResult, AmpError> {
    let mut distinct: Vec<Candidate> = Vec::new();
    for c in &options.candidates {
        if !distinct.contains(c) {
            distinct.push(*c);
        }
    }
    if distinct.len() < 2 {
        let given: Vec<String> = options.candidates.iter().map(ToString::to_string).collect();
        return Err(AmpError::Settings(format!(
            "AMP chooses between candidates and needs at least two distinct ones (given: {})",
            if given.is_empty() { "none".to_string() } else { given.join(", ") }
        )));
    }
    for c in &options.candidates {
        for p in [c.activation, c.param] {
            qcalib::Placement::check_precision(&format!("candidate {c}"), p)?;
        }
    }
    if data.calibration.is_empty() || data.phase1.is_empty() {
        return Err(AmpError::Settings("AMP needs calibration and phase-1 batches".into()));
    }
    if let Some(d) = options.allowed_accuracy_drop
        && !(d.is_finite() && d >= 0.0)
    {
        return Err(AmpError::Settings(format!(
            "allowed accuracy drop must be a finite number ≥ 0, got {d}"
        )));
    }
    let mut timings: Vec<(&'static str, f64)> = Vec::new();
    let started = Instant::now();
    let groups = find_quantizer_groups(&sim.model().graph, sim.placement())?;
    if groups.is_empty() {
        return Err(AmpError::Settings("the simulation has no enabled quantizer to mix".into()));
    }
    let blocks = WeightBlocks::of(sim);
    let mut supported = Vec::with_capacity(groups.len());
    for g in &groups {
        let ops: Vec<&str> = g.op_types.iter().map(String::as_str).collect();
        let unsupported = || AmpError::Unsupported { group: g.label(), ops: g.op_types.join(", ") };
        let mut s =
            supported_candidates(sim.config(), &ops, &options.candidates, options.use_all_amp_candidates)
                .ok_or_else(unsupported)?;
        // Weights in blocks only where every weight of the group splits into them.
        s.retain(|c| c.block.is_none_or(|b| blocks.supports(&g.params, b)));
        if s.is_empty() {
            return Err(unsupported());
        }
        supported.push(s);
    }
    let mut baseline_options: Vec<Candidate> = Vec::new();
    for c in &options.candidates {
        if supported.iter().any(|s| s.contains(c)) {
            baseline_options.push(*c);
        }
    }
    let labels: Vec<String> = options.candidates.iter().map(ToString::to_string).collect();
    let mut settings = json!({
        "model": sim.model().graph.name,
        "nodes": sim.model().graph.node_count(),
        "groups": groups.iter().map(QuantizerGroup::label).collect::<Vec<_>>(),
        "candidates": labels,
        "supported": supported.iter().map(|s| s.iter().map(ToString::to_string).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "scheme": format!("{:?}", sim.options().scheme),
        "calibration": qcalib::feeds_checksum(data.calibration),
        "phase1_data": qcalib::feeds_checksum(data.phase1),
        "phase1_metric": options.phase1_metric.name(),
        "phase2": phase2.description,
        "simulation": sim.settings_checksum()?,
    });
    // Simulated converts change every mixed score (a key only when on: older caches stay valid).
    if sim.options().converts {
        settings["converts"] = json!(true);
    }
    if let Some(table) = &options.cost_table {
        settings["cost_table"] = json!(table.checksum());
    }
    if let Some(target) = &options.target {
        // The rules, not the name: the same file edited is another target.
        settings["target"] = json!(format!("{:?} {:?}", target.kernels, target.op_kernels));
    }
    if let Some((i, n)) = options.shard
        && (n == 0 || i >= n)
    {
        return Err(AmpError::Settings(format!("shard {i}/{n}: need 0 ≤ i < n")));
    }
    let cache = AmpCache::open(options.results_dir.as_deref(), settings, options.clean_start, options.shard)?;
    timings.push(("setup", started.elapsed().as_secs_f64()));
    let mut run = Run {
        sim,
        data,
        phase2,
        groups,
        cache,
        work: AmpWork::default(),
        progress,
        target: options.target.as_ref(),
        target_changes: Vec::new(),
        blocks,
    };
    let n_groups = run.groups.len();

    // FP32 and baselines.
    let started = Instant::now();
    (run.progress)(AmpEvent::Stage { name: "baselines", total: baseline_options.len() + 1 });
    let fp32_score = match run.cache.fp32 {
        Some(s) => s,
        None => {
            let all = run.group_quantizers();
            set_enabled(run.sim, all.iter().copied(), false);
            run.sim.refresh()?;
            let s = run.evaluate();
            set_enabled(run.sim, all, true);
            let s = s?;
            run.cache.fp32 = Some(s);
            run.cache.save()?;
            s
        }
    };
    (run.progress)(AmpEvent::Step(1));
    let assignment_for = |c: Candidate| -> Vec<Candidate> {
        supported.iter().map(|s| if s.contains(&c) { c } else { s[0] }).collect()
    };
    let mut baseline_scores = Vec::new();
    for (k, &c) in baseline_options.iter().enumerate() {
        let score = match run.cache.baseline.get(&c.to_string()) {
            Some(&s) => s,
            None => {
                run.apply(&assignment_for(c));
                run.make_legal()?;
                run.calibrate()?;
                let s = run.evaluate()?;
                run.cache.baseline.insert(c.to_string(), s);
                run.cache.save()?;
                s
            }
        };
        baseline_scores.push((c, score));
        (run.progress)(AmpEvent::Step(k + 2));
    }
    let (baseline, best_score) = baseline_scores
        .iter()
        .copied()
        .fold(None, |best: Option<(Candidate, f64)>, (c, s)| match best {
            Some((_, b)) if b >= s => best,
            _ => Some((c, s)),
        })
        .expect("at least one baseline option");
    let starting = assignment_for(baseline);
    let bitops = BitOps::new(run.sim, &run.groups, baseline, options.mac_ops);
    let bitops = match &options.cost_table {
        Some(table) => bitops.with_table(run.sim, table, &options.candidates)?,
        None => bitops,
    };
    let start_bitops = bitops.total(&starting);
    let relative = |a: &[Candidate]| if start_bitops > 0.0 { bitops.total(a) / start_bitops } else { 1.0 };
    let (lowest, lowest_score) = baseline_scores
        .iter()
        .copied()
        .fold(None, |low: Option<(Candidate, f64, f64)>, (c, s)| {
            let b = bitops.total(&assignment_for(c));
            match low {
                Some((_, lb, ls)) if lb < b || (lb == b && ls >= s) => low,
                _ => Some((c, b, s)),
            }
        })
        .map(|(c, _, s)| (c, s))
        .expect("at least one baseline option");
    timings.push(("baselines", started.elapsed().as_secs_f64()));

    let mut result = AmpResult {
        groups: Vec::new(),
        supported: supported.clone(),
        fp32_score,
        baseline_scores: baseline_scores.clone(),
        baseline,
        lowest,
        accuracy_list: Vec::new(),
        points: Vec::new(),
        chosen_point: None,
        assignment: Vec::new(),
        final_score: best_score,
        final_relative_bitops: 1.0,
        outcome: AmpOutcome::Searched,
        work: AmpWork::default(),
        timings: Vec::new(),
        bitops: bitops.clone(),
        phase1_metric: options.phase1_metric.name(),
        budget: None,
        chosen_by: "baseline",
        phase3: None,
        target_changes: Vec::new(),
    };
    if let Some(drop) = options.allowed_accuracy_drop {
        if fp32_score - best_score > drop {
            result.assignment = run.finish(starting.clone())?;
            result.outcome = AmpOutcome::BaselineMissesTarget;
        } else if fp32_score - lowest_score < drop {
            let a = run.finish(assignment_for(lowest))?;
            result.final_relative_bitops = relative(&run.priced(&a));
            result.final_score = lowest_score;
            result.assignment = a;
            result.outcome = AmpOutcome::LowestMeetsTarget;
        }
        if result.outcome != AmpOutcome::Searched {
            result.target_changes = std::mem::take(&mut run.target_changes);
            result.groups = run.groups;
            result.work = run.work;
            result.timings = timings;
            return Ok(result);
        }
    }

    // Phase 1.
    let started = Instant::now();
    let mut phase1_candidates: Vec<Candidate> = Vec::new();
    for s in &supported {
        for &c in s {
            if c != baseline && !phase1_candidates.contains(&c) {
                phase1_candidates.push(c);
            }
        }
    }
    let entries: usize = supported.iter().map(|s| s.iter().filter(|&&c| c != baseline).count()).sum();
    (run.progress)(AmpEvent::Stage { name: "phase 1", total: entries });
    let max_candidate =
        options.candidates.iter().copied().fold(baseline, |m, c| if c.cost() > m.cost() { c } else { m });
    let mut accuracy_list = Vec::with_capacity(entries);
    let mut reference: Option<FloatReference> = None;
    let all_quantizers = run.group_quantizers();
    let mut entry_index = 0usize;
    for &c in &phase1_candidates {
        let members: Vec<usize> = (0..n_groups).filter(|&g| supported[g].contains(&c)).collect();
        let mine: Vec<usize> = members
            .iter()
            .map(|&g| {
                entry_index += 1;
                (g, entry_index - 1)
            })
            .filter(|&(_, k)| options.shard.is_none_or(|(i, n)| k % n == i))
            .map(|(g, _)| g)
            .collect();
        let todo: Vec<usize> =
            mine.into_iter().filter(|&g| !run.cache.phase1.contains_key(&(g, c.to_string()))).collect();
        if !todo.is_empty() {
            if reference.is_none() {
                reference = Some(FloatReference::with_budget(
                    run.sim,
                    data.phase1,
                    options.threads,
                    options.fp32_cache_bytes,
                )?);
            }
            let mut a = starting.clone();
            members.iter().for_each(|&g| a[g] = c);
            run.apply(&a);
            run.calibrate()?;
            let params: Vec<QuantizerId> =
                members.iter().flat_map(|&g| run.groups[g].params.clone()).collect();
            set_enabled(run.sim, params.iter().copied(), false);
            let calibrated = run.calibrate();
            set_enabled(run.sim, params.iter().copied(), true);
            calibrated?;
            set_enabled(run.sim, all_quantizers.iter().copied(), false);
            for &g in &todo {
                let qs: Vec<QuantizerId> = run.groups[g].quantizers().collect();
                set_enabled(run.sim, qs.iter().copied(), true);
                let scored = run.sim.refresh().map_err(AmpError::from).and_then(|()| {
                    Ok(reference.as_ref().expect("built above").score_only(
                        run.sim,
                        &qs,
                        options.phase1_metric,
                    )?)
                });
                set_enabled(run.sim, qs, false);
                let score = scored?;
                run.work.phase1_evaluations += 1;
                run.cache.phase1.insert((g, c.to_string()), score);
                run.cache.save()?;
                (run.progress)(AmpEvent::Step(run.cache.phase1.len().min(entries)));
            }
            set_enabled(run.sim, all_quantizers.iter().copied(), true);
        }
        if options.shard.is_some() {
            continue;
        }
        for g in members {
            let score = run.cache.phase1[&(g, c.to_string())];
            accuracy_list.push(AccuracyEntry {
                group: g,
                candidate: c,
                score,
                bitops_reduction: bitops.reduction(g, c, max_candidate),
            });
        }
    }
    if options.shard.is_some() {
        timings.push(("phase 1 shard", started.elapsed().as_secs_f64()));
        result.outcome = AmpOutcome::ShardDone;
        result.assignment = run.finish(starting.clone())?;
        result.groups = run.groups;
        result.work = run.work;
        result.timings = timings;
        return Ok(result);
    }
    // Least sensitive first; ties: more bits, larger saving, earlier group.
    accuracy_list.sort_by(|x, y| {
        y.score
            .total_cmp(&x.score)
            .then(y.candidate.total_bits().cmp(&x.candidate.total_bits()))
            .then(y.bitops_reduction.total_cmp(&x.bitops_reduction))
            .then(x.group.cmp(&y.group))
    });
    timings.push(("phase 1", started.elapsed().as_secs_f64()));

    // Phase 2.
    let started = Instant::now();
    let n = accuracy_list.len();
    if n == 0 {
        return Err(AmpError::Settings(
            "no quantizer group supports a candidate other than its starting one: there is no plan to search"
                .into(),
        ));
    }
    let target = options.allowed_accuracy_drop.map_or(f64::NEG_INFINITY, |d| fp32_score - d);
    let point_assignment = |i: usize| -> Vec<Candidate> {
        let mut a = starting.clone();
        accuracy_list[..=i].iter().for_each(|e| a[e.group] = e.candidate);
        a
    };
    let expected = if options.full_front { n } else { (usize::BITS - n.leading_zeros()) as usize + 2 };
    (run.progress)(AmpEvent::Stage { name: "phase 2", total: expected });
    let mut done = 0usize;
    let mut point = |run: &mut Run, i: usize| -> Result<f64, AmpError> {
        if let Some(&(_, s)) = run.cache.phase2.get(&i) {
            return Ok(s);
        }
        let a = point_assignment(i);
        let score = run.score_plan(&a)?;
        run.cache.phase2.insert(i, (relative(&a), score));
        run.cache.save()?;
        done += 1;
        (run.progress)(AmpEvent::Step(done.min(expected)));
        Ok(score)
    };
    let chosen = search(options.search, n, target, &mut |i| point(&mut run, i))?;
    if options.full_front {
        for i in 0..n {
            point(&mut run, i)?;
        }
    }
    let nothing_meets_target = chosen == 0 && point(&mut run, 0)? < target;
    let (mut assignment, chosen_point, mut final_score) = if nothing_meets_target {
        (starting.clone(), None, best_score)
    } else {
        result.chosen_by = "greedy";
        (point_assignment(chosen), Some(chosen), run.cache.phase2[&chosen].1)
    };
    result.points = run
        .cache
        .phase2
        .iter()
        .filter(|(i, _)| **i < n)
        .map(|(&index, &(relative_bitops, score))| ParetoPoint { index, relative_bitops, score })
        .collect();
    timings.push(("phase 2", started.elapsed().as_secs_f64()));
    let started = Instant::now();
    if options.budget_search {
        let mut per_group: Vec<Vec<(Candidate, f64)>> = vec![Vec::new(); n_groups];
        accuracy_list.iter().for_each(|e| per_group[e.group].push((e.candidate, e.score)));
        let mut plans = predicted_front(&per_group, &starting, &bitops, BUDGET_RESOLUTION);
        plans.reverse();
        (run.progress)(AmpEvent::Stage { name: "budget search", total: expected });
        let mut evaluated: Vec<(usize, f64)> = Vec::new();
        let picked = search(options.search, plans.len(), target, &mut |i| {
            let s = run.score_plan(&plans[i].assignment)?;
            if !evaluated.iter().any(|e| e.0 == i) {
                evaluated.push((i, s));
            }
            (run.progress)(AmpEvent::Step(evaluated.len().min(expected)));
            Ok::<f64, AmpError>(s)
        })?;
        evaluated.sort_by_key(|e| e.0);
        let meets = evaluated.iter().find(|e| e.0 == picked).is_some_and(|e| e.1 >= target);
        let budget_points: Vec<(f64, f64)> =
            evaluated.iter().map(|&(i, s)| (plans[i].relative_bitops, s)).collect();
        let greedy_points: Vec<(f64, f64)> =
            result.points.iter().map(|p| (p.relative_bitops, p.score)).collect();
        if meets {
            let (b_rel, b_score) = (
                plans[picked].relative_bitops,
                evaluated.iter().find(|e| e.0 == picked).map_or(f64::NAN, |e| e.1),
            );
            let greedy_rel = relative(&assignment);
            if b_rel < greedy_rel
                || (b_rel == greedy_rel && b_score > final_score)
                || result.chosen_by == "baseline"
            {
                assignment = plans[picked].assignment.clone();
                final_score = b_score;
                result.chosen_by = "budget";
            }
        }
        result.budget = Some(BudgetSearch {
            area_vs_greedy: area_between(&budget_points, &greedy_points),
            plans,
            evaluated,
            chosen: meets.then_some(picked),
        });
    }
    if options.budget_search {
        timings.push(("budget search", started.elapsed().as_secs_f64()));
    }
    if let Some(phase3) = &options.phase3 {
        let started = Instant::now();
        let graph = GroupGraph::new(&run.sim.model().graph, run.sim.placement(), &run.groups);
        let mut planned =
            plan_phase3(graph, &run.groups, &supported, &assignment, &bitops, start_bitops, phase3)?;
        let todo = planned.plans.iter().filter(|p| p.assignment.is_some()).count();
        (run.progress)(AmpEvent::Stage { name: "phase 3", total: todo });
        for (k, plan) in planned.plans.iter_mut().enumerate() {
            let Some(a) = &plan.assignment else { continue };
            plan.score = Some(run.calibrated_score(a)?);
            plan.encodings = Some(qcalib::encodings_json(run.sim, qcalib::EncodingVersion::V1_0_0));
            (run.progress)(AmpEvent::Step((k + 1).min(todo)));
        }
        result.phase3 = Some(planned);
        timings.push(("phase 3", started.elapsed().as_secs_f64()));
    }
    let started = Instant::now();
    let assignment = run.finish(assignment)?;
    timings.push(("final calibration", started.elapsed().as_secs_f64()));
    result.final_relative_bitops = relative(&run.priced(&assignment));
    result.target_changes = std::mem::take(&mut run.target_changes);
    result.assignment = assignment;
    result.chosen_point = chosen_point;
    result.final_score = final_score;
    result.accuracy_list = accuracy_list;
    result.groups = run.groups;
    result.work = run.work;
    result.timings = timings;
    Ok(result)
}

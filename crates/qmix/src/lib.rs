//! `qmix`: mixed-precision choice — which layers run at higher precision.
//!
//! - Lite-MP (spec §6): flip the most sensitive layers to int16/fp16.
//! - Greedy AMP (spec §7): quantizer groups, candidates checked against `supported_kernels`,
//!   phase-1 sensitivity per (group, candidate), phase-2 search over the cumulative list with a
//!   bit-ops model, a resumable cache, and the full Pareto front on request.
//! - Quark-style walk: from the wide precision, move layers to the narrow one, least sensitive
//!   first, while the score stays at the target.
//! - Budget-optimal search: an exact knapsack over the groups on the phase-1 scores gives the best
//!   predicted plan for every bit-ops budget; phase 2 verifies them by evaluation.
//! - Phase 3 (spec §7.9): raise activation precisions to cut precision converts, solved exactly
//!   over the quantizer-group graph for every convert budget.
//! - Target legality: the precision pairs a runtime executes; plans repaired to them.
//! - AutoQuant: batch-norm folding, then CLE, then AdaRound, until one is within the allowed drop.
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod amp;
mod amp_cache;
mod amp_report;
mod autoquant;
mod bitops;
mod budget;
mod candidate;
mod convert_ops;
mod groups;
mod lite_mp;
mod quark;
mod search;
mod target;

use std::path::PathBuf;

pub use amp::{
    AccuracyEntry, AmpData, AmpEvent, AmpOptions, AmpOutcome, AmpResult, AmpWork, BudgetSearch, ParetoPoint,
    Phase2, choose_mixed_precision,
};
pub use amp_report::{amp_info, write_amp_report};
pub use autoquant::{
    AutoQuantAmp, AutoQuantError, AutoQuantOptions, AutoQuantResult, AutoQuantStage, StageScore, auto_quant,
};
pub use bitops::{BitOps, CostTable, CostedOp, MacOps};
pub use budget::{Plan, area_between, predicted_front};
pub use candidate::{Candidate, effective_bits, supported_candidates};
pub use convert_ops::{
    CutWeight, FrontPoint, FrontTooWide, GroupEdge, GroupGraph, Phase3Options, Phase3Plan, Phase3Result,
    Phase3Threshold, exact_front, plan_phase3, predicted_convert_cycles,
};
pub use groups::{QuantizerGroup, find_quantizer_groups};
pub use lite_mp::{FlipError, FlipUntil, Flipped, flip_count, flip_layers_to_higher_precision, flip_until};
pub use quark::{NarrowResult, narrow_until};
pub use search::{SearchAlgo, pareto_indices, search};
pub use target::{PlanChange, Target, legalize};

/// Errors of mixed-precision search.
#[derive(Debug, thiserror::Error)]
pub enum AmpError {
    /// The simulation failed.
    #[error(transparent)]
    Sim(#[from] qcalib::CalibError),
    /// Scoring failed.
    #[error(transparent)]
    Analyze(#[from] qanalyze::AnalyzeError),
    /// The graph is malformed.
    #[error(transparent)]
    Graph(#[from] qgraph::GraphError),
    /// A group whose ops support none of the candidates.
    #[error(
        "no candidate is supported by every op of quantizer group '{group}' (ops: {ops}); check supported_kernels in the config or allow all candidates"
    )]
    Unsupported {
        /// The group's quantizers.
        group: String,
        /// Its op types.
        ops: String,
    },
    /// A target description that cannot be used.
    #[error("target {target}: {detail}")]
    Target {
        /// Preset name or file.
        target: String,
        /// What is wrong.
        detail: String,
    },
    /// An op of the plan has no legal precision pair on the target.
    #[error(
        "op '{op}' ({op_type}) runs at {pair}, which target {target} does not support, and no supported pair can replace it"
    )]
    Illegal {
        /// The node.
        op: String,
        /// Its op type.
        op_type: String,
        /// Its (weight, activation) pair, e.g. `W16A8`.
        pair: String,
        /// The target.
        target: String,
    },
    /// Bad settings.
    #[error("AMP: {0}")]
    Settings(String),
    /// The phase-2 metric failed.
    #[error("phase-2 evaluation: {0}")]
    Eval(String),
    /// The results cache cannot be used.
    #[error("AMP cache {path}: {detail}")]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A result file (report, plot, front) could not be written (a full disk, a read-only
    /// folder): the cache, if any, is intact.
    #[error("cannot write {path}: {detail}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

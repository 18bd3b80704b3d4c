//! `qmix`: mixed-precision choice — Lite-MP, AIMET-style greedy AMP with a Pareto front and
//! bit-ops model, and better searches.
//!
//! Status: placeholder; arrives with the `qmix` issue.
#![forbid(unsafe_code)]

//! `qanalyze`: per-layer quantization sensitivity (enable-one / disable-one) and the analysis
//! report (JSON, HTML, terminal table).
//!
//! Status: placeholder; arrives with the `qanalyze` issue.
#![forbid(unsafe_code)]

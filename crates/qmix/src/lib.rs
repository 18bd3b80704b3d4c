//! `qmix`: mixed-precision choice — Lite-MP today; AIMET-style greedy AMP with a Pareto front and
//! bit-ops model, and better searches, arrive with the rest of the `qmix` issue.
#![forbid(unsafe_code)]

mod lite_mp;

pub use lite_mp::{FlipError, Flipped, flip_layers_to_higher_precision};

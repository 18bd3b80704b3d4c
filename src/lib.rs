//! `quantkit`: the facade over the toolkit's crates, so an application can depend on one crate.
//! Each member crate is re-exported under its own name; depend on a member directly to pull in less.
#![forbid(unsafe_code)]

pub mod fuzzing;

pub use qanalyze;
pub use qcalib;
pub use qexec;
pub use qgrad;
pub use qgraph;
pub use qkernels;
pub use qmix;
pub use qptq;
pub use qtrain;

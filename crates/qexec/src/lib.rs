//! `qexec`: a native CPU interpreter for `qgraph` graphs, with a hook on every produced tensor
//! (quantize it, observe it) and resumption from cached intermediate tensors.
//!
//! Status: placeholder; the interpreter arrives with the `qexec` issue.
#![forbid(unsafe_code)]

//! Empty: the build dependencies in `Cargo.toml` are there to unify proc-macro features.
fn main() {}

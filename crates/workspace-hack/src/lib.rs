//! Nothing to use: this crate exists for its `Cargo.toml`, which gives the workspace's release
//! builds one feature set for their shared dependencies (see the comment there).

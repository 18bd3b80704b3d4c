//! What the command-line tests share: running `qmix` and checking that it failed as a user error.

use std::process::Command;

/// Runs `qmix ARGS` and checks it failed as a user error (exit code 1, no panic or backtrace)
/// whose message names every one of `needles`.
pub fn fails_naming(args: &[&str], needles: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_qmix")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "qmix {args:?}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("stack backtrace"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "qmix {args:?}: message does not name '{n}': {stderr}");
    }
}

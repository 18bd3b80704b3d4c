//! What the command-line tests share: running `qmix`, checking that it failed as a user error, and
//! scratch directories that remove themselves. Each test binary uses part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::Path;
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

/// A scratch directory under the system's temporary directory, removed with everything in it
/// when dropped, so test runs leave nothing behind.
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<OsStr> for Scratch {
    fn as_ref(&self) -> &OsStr {
        self.0.path().as_os_str()
    }
}

/// A new scratch directory named `qmix-NAME-…`.
pub fn scratch(name: &str) -> Scratch {
    Scratch(tempfile::Builder::new().prefix(&format!("qmix-{name}-")).tempdir().unwrap())
}

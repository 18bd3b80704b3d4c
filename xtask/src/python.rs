//! The Python side of the oracles: makes sure `onnx` and `onnxruntime` are importable (installing
//! them with pip when not) and runs the project's helper scripts in `xtask/python/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Pinned versions of the oracle packages.
const PACKAGES: &[&str] = &["onnx==1.17.0", "onnxruntime==1.31.1", "numpy", "ml_dtypes"];

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Installs the oracle packages unless they import already.
pub fn ensure_oracles() -> Result<()> {
    let ok = Command::new(python()).args(["-c", "import onnx, onnxruntime, numpy, ml_dtypes"]).output();
    if ok.is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("installing {} with pip", PACKAGES.join(" "));
    let status = Command::new(python())
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip could not install {}", PACKAGES.join(" "));
    }
    Ok(())
}

/// The folder of the helper scripts.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs `script` with `args`, streaming its output; errors if it fails.
pub fn run_script(script: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(python())
        .arg(scripts_dir().join(script))
        .args(args)
        .status()
        .with_context(|| format!("running {script}"))?;
    if !status.success() {
        bail!("{script} failed ({status})");
    }
    Ok(())
}

/// Runs `script` with `args` and returns its standard output.
pub fn script_output(script: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(python())
        .arg(scripts_dir().join(script))
        .args(args)
        .output()
        .with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A helper script kept running to answer requests: one line written to its standard input, one
/// line read back from its standard output.
pub struct Server {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Server {
    /// Starts `script` with `args` and waits for its first line (its "ready").
    pub fn start(script: &str, args: &[&str]) -> Result<Server> {
        let mut child = Command::new(python())
            .arg(scripts_dir().join(script))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {script}"))?;
        let stdin = child.stdin.take().context("server stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("server stdout")?);
        let mut server = Server { child, stdin, stdout };
        server.read_line().with_context(|| format!("{script} did not start"))?;
        Ok(server)
    }

    /// Sends `request` and returns the reply line.
    pub fn ask(&mut self, request: &str) -> Result<String> {
        use std::io::Write;
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        self.read_line()
    }

    fn read_line(&mut self) -> Result<String> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the helper script exited ({:?})", self.child.try_wait()?);
        }
        Ok(line)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The Python module `quantkit` on a zoo model: a wheel built with maturin into a venv under
//! `target/xtask/`, W8A8 QuantSim on mobilenetv2_keras from Python, its logits compared with the
//! same simulation run from Rust (the same engine: they must be equal) and its top-1 printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use ndarray::{Array2, Array4};
use ndarray_npy::read_npy;
use qcalib::{QuantSim, QuantsimConfig, SimOptions};
use qgraph::Tensor;

use crate::zoo_data::{self, CLASSIFIERS};

/// Runs `program args…`, failing with its output when it fails.
fn run(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}{}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A venv with numpy and the current `quantkit` wheel installed; its Python.
fn module_python() -> Result<PathBuf> {
    let root = crate::zoo::workspace_root();
    let venv = root.join("target/xtask/pyvenv");
    let python = venv.join("bin/python");
    let maturin = venv.join("bin/maturin");
    if !maturin.is_file() {
        let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(Path::new(&system), &["-m", "venv", &venv.display().to_string()])?;
        run(
            &python,
            &["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "maturin", "numpy"],
        )?;
    }
    let wheels = venv.join("wheels");
    let _ = std::fs::remove_dir_all(&wheels);
    let manifest = root.join("crates/quantkit-py/Cargo.toml");
    run(
        &maturin,
        &[
            "build",
            "--release",
            "--quiet",
            "-m",
            &manifest.display().to_string(),
            "-o",
            &wheels.display().to_string(),
        ],
    )?;
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("maturin wrote no wheel")?;
    run(
        &python,
        &["-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", &wheel.display().to_string()],
    )?;
    Ok(python)
}

pub fn check(zoo: &Path) -> Result<()> {
    let c = CLASSIFIERS.iter().find(|c| c.name == "mobilenetv2_keras").context("classifier")?;
    let dir = crate::zoo::out_dir()?.join("python");
    std::fs::create_dir_all(&dir)?;
    zoo_data::write_job_files(zoo, c, &dir)?;
    let started = Instant::now();
    let python = module_python()?;
    let build_s = started.elapsed().as_secs_f64();
    let model = zoo.join("models/mobilenetv2_keras.onnx");
    let out = dir.join("python_logits.npy");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/quantkit_zoo.py");
    let [calib, eval] = ["calib.npy", "eval.npy"].map(|f| dir.join(f).display().to_string());
    let times = run(
        &python,
        &[
            &script.display().to_string(),
            &model.display().to_string(),
            &calib,
            &eval,
            &out.display().to_string(),
        ],
    )?;
    let theirs: Array2<f32> = read_npy(&out)?;

    let calib: Array4<f32> = read_npy(dir.join("calib.npy"))?;
    let eval: Array4<f32> = read_npy(dir.join("eval.npy"))?;
    let labels: ndarray::Array1<i64> = read_npy(dir.join("labels.npy"))?;
    let options = SimOptions { threads: 0, ..SimOptions::default() };
    let mut sim = QuantSim::new(qgraph::load_path(&model)?, QuantsimConfig::load("default")?, options)?;
    let rows = |a: &Array4<f32>, start: usize, n: usize| {
        let end = (start + n).min(a.shape()[0]);
        Tensor::F32(a.slice(ndarray::s![start..end, .., .., ..]).to_owned().into_dyn().into_shared())
    };
    let batches: Vec<qcalib::Feeds> =
        (0..calib.shape()[0]).step_by(32).map(|i| vec![("input".to_string(), rows(&calib, i, 32))]).collect();
    sim.calibrate(batches, &mut |_| {})?;
    let mut ours = Vec::new();
    for i in (0..eval.shape()[0]).step_by(50) {
        let out = sim.run(&[("input", rows(&eval, i, 50))])?.swap_remove(0);
        ours.extend(out.as_f32().context("f32 logits")?.iter().copied());
    }
    ensure!(ours.len() == theirs.len(), "Python gave {} logits, Rust {}", theirs.len(), ours.len());
    let diff = ours.iter().zip(theirs.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let preds = zoo_data::argmax_rows(&Tensor::F32(theirs.into_dyn().into_shared()), c.label_offset)?;
    let top1 = preds.iter().zip(labels.iter()).filter(|(p, l)| *p == *l).count() as f64 / labels.len() as f64;
    let mut t = times.split_whitespace();
    println!(
        "Python module: wheel built and installed in {build_s:.0} s; mobilenetv2_keras W8A8 from Python: top-1 {top1:.4}, \
         calibrated in {} s, 400 images in {} s; max |Python − Rust| logit {diff:.1e}",
        t.next().unwrap_or("?"),
        t.next().unwrap_or("?")
    );
    ensure!(diff == 0.0, "the Python module's logits differ from the Rust simulation's by {diff}");
    Ok(())
}

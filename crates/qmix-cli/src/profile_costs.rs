//! `qmix profile-costs`: measures what each weighted op costs at each precision pair, for
//! `qmix amp --cost`. For every op the bit-ops model counts and every pair the candidates give it,
//! a one-op QDQ model is written (the op's input shape with batch 1; activations through
//! `QuantizeLinear → DequantizeLinear` at the pair's activation type, or a pair of `Cast`s for
//! fp16; the weight stored as integers read through `DequantizeLinear`), and onnxruntime — the
//! Python package on this machine, with the execution provider named — times each one. The median
//! of the timed runs, in microseconds, goes into the table.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::anyhow;
use qcalib::{DefaultPrecision, Precision, QuantSim, SimOptions};
use qgraph::{DType, Graph, Model, NodeSpec, Shape, Tensor, ValueId};
use qmix::{BitOps, Candidate, MacOps};
use serde_json::{Map, Value, json};

use crate::Failure;
use crate::dataset::{bar, user};

/// Arguments of `qmix profile-costs`.
#[derive(clap::Args)]
pub struct ProfileCostsArgs {
    /// The FP32 ONNX model.
    model: PathBuf,
    /// Candidates the table must price, comma-separated (as `amp --candidates`).
    #[arg(long, default_value = "w16a16,w8a16,w16a8,w8a8")]
    candidates: String,
    /// Quantsim config (decides the quantizer groups, so which pairs each op can take).
    #[arg(long, default_value = "default")]
    config: String,
    /// Count only Conv and Gemm, as `amp --aimet-macs`.
    #[arg(long)]
    aimet_macs: bool,
    /// Python interpreter with onnxruntime.
    #[arg(long, default_value = "python3")]
    python: String,
    /// onnxruntime execution provider, e.g. CPUExecutionProvider or QNNExecutionProvider.
    #[arg(long, default_value = "CPUExecutionProvider")]
    provider: String,
    /// Timed runs per op and pair (after 3 warm-up runs); the median is kept.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    runs: u32,
    /// Where the table goes.
    #[arg(long, default_value = "costs.json")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Times every model listed on stdin (one path per line) and prints `path<TAB>microseconds`.
const TIMER: &str = r#"
import sys, time
import numpy as np
import onnxruntime as ort
provider, runs = sys.argv[1], int(sys.argv[2])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.log_severity_level = 3
for line in sys.stdin:
    path = line.strip()
    s = ort.InferenceSession(path, opts, providers=[provider])
    i = s.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
    for _ in range(3):
        s.run(None, {i.name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {i.name: x})
        times.append(time.perf_counter() - t)
    print(path + "\t" + repr(float(np.median(times)) * 1e6), flush=True)
"#;

fn scalar_zero_point(bits: u32, signed: bool, value: i64) -> Result<Tensor, Failure> {
    let dtype = match (bits, signed) {
        (8, false) => DType::U8,
        (8, true) => DType::I8,
        (16, false) => DType::U16,
        (16, true) => DType::I16,
        _ => return Err(user(anyhow!("profile-costs times int8, int16 and fp16 pairs, not int{bits}"))),
    };
    Tensor::from_i64s(dtype, &[], &[value]).ok_or_else(|| user(anyhow!("zero point {value} out of range")))
}

fn op(
    g: &mut Graph,
    op_type: &str,
    name: &str,
    inputs: Vec<Option<ValueId>>,
    attrs: Vec<(String, qgraph::Attribute)>,
) -> ValueId {
    let id = g.add_node(NodeSpec {
        name: name.into(),
        op_type: op_type.into(),
        domain: String::new(),
        attrs,
        inputs,
        outputs: vec![name.into()],
    });
    g.node(id).outputs()[0].expect("add_node creates every output")
}

/// `x` at activation precision `p`: QDQ on a grid spanning [−8, 8], or a round trip through fp16.
fn activation(g: &mut Graph, x: ValueId, p: Precision, tag: &str) -> Result<ValueId, Failure> {
    match p {
        Precision::Int(bits) => {
            let steps = 2f64.powi(bits as i32) - 1.0;
            let scale = g.add_initializer(&format!("{tag}_scale"), Tensor::scalar((16.0 / steps) as f32));
            let zp_value = (steps / 2.0).round() as i64;
            let zp =
                g.add_initializer(&format!("{tag}_zero_point"), scalar_zero_point(bits, false, zp_value)?);
            let q =
                op(g, "QuantizeLinear", &format!("{tag}_q"), vec![Some(x), Some(scale), Some(zp)], vec![]);
            Ok(op(g, "DequantizeLinear", &format!("{tag}_dq"), vec![Some(q), Some(scale), Some(zp)], vec![]))
        }
        Precision::Float16 | Precision::BFloat16 => {
            let to = if p == Precision::Float16 { 10 } else { 16 };
            let down = op(
                g,
                "Cast",
                &format!("{tag}_down"),
                vec![Some(x)],
                vec![("to".into(), qgraph::Attribute::Int(to))],
            );
            Ok(op(
                g,
                "Cast",
                &format!("{tag}_up"),
                vec![Some(down)],
                vec![("to".into(), qgraph::Attribute::Int(1))],
            ))
        }
    }
}

/// The weight at precision `p`: symmetric integers read through `DequantizeLinear`, or fp16.
fn weight(g: &mut Graph, w: &Tensor, p: Precision) -> Result<ValueId, Failure> {
    let values: Vec<f32> = w.to_f64_vec().iter().map(|&v| v as f32).collect();
    match p {
        Precision::Int(bits) => {
            let qmax = 2f64.powi(bits as i32 - 1) - 1.0;
            let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            let scale = f64::from(absmax) / qmax;
            let ints: Vec<i64> = values
                .iter()
                .map(|&v| (f64::from(v) / scale).round().clamp(-qmax - 1.0, qmax) as i64)
                .collect();
            let dtype = if bits == 8 { DType::I8 } else { DType::I16 };
            let data =
                Tensor::from_i64s(dtype, w.shape(), &ints).ok_or_else(|| user(anyhow!("weight integers")))?;
            let wq = g.add_initializer("weight_quantized", data);
            let s = g.add_initializer("weight_scale", Tensor::scalar(scale as f32));
            let zp = g.add_initializer("weight_zero_point", scalar_zero_point(bits, true, 0)?);
            Ok(op(g, "DequantizeLinear", "weight_dq", vec![Some(wq), Some(s), Some(zp)], vec![]))
        }
        Precision::Float16 | Precision::BFloat16 => {
            let data = Tensor::from_vec(w.shape(), values).ok_or_else(|| user(anyhow!("weight values")))?;
            let wf = g.add_initializer("weight", data);
            activation(g, wf, p, "weight")
        }
    }
}

pub fn run(a: ProfileCostsArgs) -> Result<(), Failure> {
    let candidates: Vec<Candidate> = a
        .candidates
        .split(',')
        .map(|c| {
            Candidate::parse(c.trim())
                .ok_or_else(|| user(anyhow!("'{c}' is not a precision pair like w8a16")))
        })
        .collect::<Result<_, _>>()?;
    let highest =
        candidates.iter().copied().fold(candidates[0], |m, c| if c.cost() > m.cost() { c } else { m });
    let config = crate::dataset::quantsim_config(&a.config, &[])?;
    let model = qgraph::load_path(&a.model)?;
    let precision = DefaultPrecision { param: highest.param, activation: highest.activation };
    let sim =
        QuantSim::new(model, config, SimOptions { precision, ..SimOptions::default() }).map_err(user)?;
    let g = &sim.model().graph;
    let groups = qmix::find_quantizer_groups(g, sim.placement()).map_err(user)?;
    let which = if a.aimet_macs { MacOps::AimetCompatible } else { MacOps::All };
    let bitops = BitOps::new(&sim, &groups, highest, which);
    let dir = ScratchDir(tempdir_for(&a.out)?);
    // (op name, pair, micro-model path)
    let mut jobs: Vec<(String, Candidate, PathBuf)> = Vec::new();
    for (i, costed) in bitops.ops().iter().enumerate() {
        let node = g.node(costed.node);
        let inputs = node.inputs();
        // The activation is the one computed input; the weight the largest constant one.
        let computed: Vec<usize> =
            (0..inputs.len()).filter(|&k| inputs[k].is_some_and(|v| !g.is_static(v))).collect();
        let [x_slot] = computed[..] else {
            return Err(user(anyhow!("op '{}': profile-costs times ops with one computed input", node.name)));
        };
        let w_slot = (0..inputs.len())
            .filter(|&k| inputs[k].is_some_and(|v| g.is_static(v)))
            .max_by_key(|&k| inputs[k].and_then(|v| g.static_value(v)).map_or(0, Tensor::len))
            .ok_or_else(|| user(anyhow!("op '{}': its weight is not a constant", node.name)))?;
        let dims: Vec<usize> = inputs[x_slot]
            .and_then(|v| g.value(v).shape.as_ref())
            .map(|s| s.0.iter().map(|d| d.known().unwrap_or(1)).collect())
            .ok_or_else(|| user(anyhow!("op '{}': the shape of its input is unknown", node.name)))?;
        for pair in bitops.pairs(i, &candidates) {
            let mut m = Graph::new("profile_costs");
            let mut micro_inputs = Vec::with_capacity(inputs.len());
            for (k, v) in inputs.iter().enumerate() {
                let Some(v) = *v else {
                    micro_inputs.push(None);
                    continue;
                };
                let value = if k == x_slot {
                    let x = m.add_input("x", DType::F32, Shape::known(&dims));
                    activation(&mut m, x, pair.activation, "x")?
                } else if k == w_slot {
                    weight(&mut m, g.static_value(v).expect("a constant slot"), pair.param)?
                } else {
                    m.add_initializer(
                        &format!("const{k}"),
                        g.static_value(v).expect("a constant slot").clone(),
                    )
                };
                micro_inputs.push(Some(value));
            }
            let y = op(&mut m, &node.op_type, "op", micro_inputs, node.attrs.clone());
            let ya = activation(&mut m, y, pair.activation, "y")?;
            m.value_mut(ya).dtype = Some(DType::F32);
            m.add_output(ya);
            let path = dir.0.join(format!("op{i}_{pair}.onnx"));
            qgraph::save_path(&Model::new(m, 21), &path)?;
            jobs.push((node.name.clone(), pair, path));
        }
    }
    say!(
        "{}: {} weighted ops, {} one-op models to time in onnxruntime ({}, {} runs each)",
        a.model.display(),
        bitops.ops().len(),
        jobs.len(),
        a.provider,
        a.runs
    );
    let timings = time_models(&a, &jobs)?;
    let mut ops = Map::new();
    for (name, pair, path) in &jobs {
        let us = timings
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, t)| *t)
            .ok_or_else(|| user(anyhow!("onnxruntime gave no time for {}", path.display())))?;
        let row = ops.entry(name.clone()).or_insert_with(|| json!({}));
        row[pair.to_string()] = json!(us);
    }
    let total = |c: Candidate| -> f64 {
        (0..bitops.ops().len())
            .filter_map(|i| {
                let pair = bitops.pairs(i, &[c])[0];
                ops.get(&g.node(bitops.ops()[i].node).name).and_then(|r| r[pair.to_string()].as_f64())
            })
            .sum()
    };
    for &c in &candidates {
        say!("  every op at {c}: {:.1} µs", total(c));
    }
    let doc = json!({"unit": "us", "runtime": format!("onnxruntime, {}", a.provider), "runs": a.runs, "ops": Value::Object(ops)});
    qgraph::write_atomically(&a.out, qcalib::to_pretty_json(&doc).as_bytes())?;
    say!("wrote {}", a.out.display());
    Ok(())
}

/// The folder of the one-op models, removed however the command ends.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh folder for the one-op models beside `out`.
fn tempdir_for(out: &std::path::Path) -> Result<PathBuf, Failure> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let dir = parent.join(format!(".profile_costs_{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| user(anyhow!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Runs the timer on every job's model; returns (model path, µs).
fn time_models(
    a: &ProfileCostsArgs,
    jobs: &[(String, Candidate, PathBuf)],
) -> Result<Vec<(PathBuf, f64)>, Failure> {
    let mut child = Command::new(&a.python)
        .args(["-c", TIMER, &a.provider, &a.runs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| user(anyhow!("cannot run {}: {e} (profile-costs times the ops with Python's onnxruntime; amp --cost reads a table made any other way)", a.python)))?;
    let mut stdin = child.stdin.take().ok_or_else(|| user(anyhow!("no stdin for {}", a.python)))?;
    for (_, _, path) in jobs {
        writeln!(stdin, "{}", path.display()).map_err(|e| user(anyhow!("writing to {}: {e}", a.python)))?;
    }
    drop(stdin);
    let stdout = child.stdout.take().ok_or_else(|| user(anyhow!("no stdout from {}", a.python)))?;
    let pb = bar(jobs.len(), "timing", "models", a.quiet);
    let mut out = Vec::with_capacity(jobs.len());
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| user(anyhow!("reading {}: {e}", a.python)))?;
        if let Some((path, us)) = line.split_once('\t')
            && let Ok(us) = us.parse::<f64>()
        {
            out.push((PathBuf::from(path), us));
            pb.set_position(out.len() as u64);
        }
    }
    pb.finish_and_clear();
    let status = child.wait_with_output().map_err(|e| user(anyhow!("{}: {e}", a.python)))?;
    if !status.status.success() {
        let err = String::from_utf8_lossy(&status.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(user(anyhow!("timing in onnxruntime failed: {last}")));
    }
    Ok(out)
}

//! `cargo xtask fuzz [CASES]`: a deterministic mutation fuzzer over the loader, shape inference,
//! session planning, a run and the encodings reader. Seeds are the repository's models and, when
//! present, the ONNX backend node-test models that `cargo xtask conformance` extracts. Each case
//! mutates one seed — attribute values pushed to extremes (0, −1, 2³¹, 2⁴⁰, i64::MAX), input and
//! initializer shapes changed or emptied, dtypes swapped, inputs dropped, bytes flipped or cut —
//! and runs it in this process under `catch_unwind`, with a tensor limit of 64 MiB so a hostile
//! size must be refused, not attempted. Any panic fails the command and names the case, which
//! replays with the same number; a case still running after 20 s is reported as a hang and the
//! process exits at once. Errors are the expected outcome of most cases; panics, hangs and
//! aborts never are.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qgraph::{Attribute, DType, Dim, Model, Shape, Tensor};

use crate::zoo::workspace_root;

/// Cases run when no count is given (what CI runs).
const DEFAULT_CASES: usize = 100_000;

/// Largest tensor a fuzzed session may create.
const TENSOR_LIMIT: usize = 64 << 20;

/// A case running longer than this is a hang.
const HANG: Duration = Duration::from_secs(20);

/// SplitMix64: a small, seedable generator, so case `i` replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }
}

/// Integer values a mutated attribute or dimension takes.
const EXTREMES: [i64; 10] = [0, -1, 1, 2, 3, -7, 1 << 31, 1 << 40, i64::MAX, i64::MIN];

pub fn run(cases: Option<&str>) -> Result<()> {
    let cases: usize = match cases {
        Some(c) => c.parse().with_context(|| format!("'{c}' is not a case count"))?,
        None => DEFAULT_CASES,
    };
    let seeds = seeds()?;
    if seeds.is_empty() {
        bail!("no seed models found");
    }
    qexec::set_default_max_tensor_bytes(TENSOR_LIMIT);
    let started = Instant::now();
    let current = Arc::new(Mutex::new(String::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let watchdog = {
        let (current, done) = (Arc::clone(&current), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut last = (usize::MAX, Instant::now());
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let now = done.load(Ordering::Relaxed);
                if now == usize::MAX {
                    return;
                }
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > HANG {
                    eprintln!(
                        "fuzz: case {} hangs: {}",
                        now,
                        current.lock().map(|c| c.clone()).unwrap_or_default()
                    );
                    std::process::exit(1);
                }
            }
        })
    };
    // Panics are counted, not printed as they happen (the message is kept with the case).
    let previous_hook = std::panic::take_hook();
    let panic_message = Arc::new(Mutex::new(String::new()));
    {
        let panic_message = Arc::clone(&panic_message);
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut m) = panic_message.lock() {
                *m = info.to_string();
            }
        }));
    }
    let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut panics = Vec::new();
    for case in 0..cases {
        let mut rng = Rng(case as u64 ^ 0x5EED);
        let seed = &seeds[rng.below(seeds.len())];
        let mut what = String::from("mutating");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (bytes, described) = mutate(seed, &mut rng);
            what = described;
            if let Ok(mut c) = current.lock() {
                *c = format!("{} ({what})", seed.name);
            }
            quantkit::fuzzing::exercise(&bytes, rng.next())
        }));
        match outcome {
            Ok(stage) => *outcomes.entry(stage).or_default() += 1,
            Err(_) => {
                let message = panic_message.lock().map(|m| m.clone()).unwrap_or_default();
                panics.push(format!("case {case}: {} ({what}): {message}", seed.name));
            }
        }
        done.store(case + 1, Ordering::Relaxed);
    }
    done.store(usize::MAX, Ordering::Relaxed);
    let _ = watchdog.join();
    std::panic::set_hook(previous_hook);
    let stages: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "fuzz: {cases} cases from {} seeds in {:.1} s; ended at: {}; {} panics",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        stages.join(", "),
        panics.len()
    );
    if !panics.is_empty() {
        bail!(
            "{} panics:\n  {}",
            panics.len(),
            panics.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
    Ok(())
}

/// One seed: a name and the model's bytes.
struct Seed {
    name: String,
    bytes: Vec<u8>,
}

fn seeds() -> Result<Vec<Seed>> {
    let root = workspace_root();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("models"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    let node_tests = root.join("target/xtask/onnx-1.17.0-node-tests");
    if let Ok(entries) = std::fs::read_dir(&node_tests) {
        files.extend(
            entries.filter_map(|e| e.ok()).map(|e| e.path().join("model.onnx")).filter(|p| p.is_file()),
        );
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            Ok(Seed { name, bytes: std::fs::read(&p)? })
        })
        .collect()
}

/// A mutant of `seed` and what was done to it.
fn mutate(seed: &Seed, rng: &mut Rng) -> (Vec<u8>, String) {
    if rng.below(4) == 0 {
        return mutate_bytes(&seed.bytes, rng);
    }
    let Ok(mut model) = qgraph::load_bytes(&seed.bytes, None) else {
        return mutate_bytes(&seed.bytes, rng);
    };
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(3) {
        what.push(mutate_model(&mut model, rng));
    }
    match qgraph::save_bytes(&model) {
        Ok(bytes) => (bytes, what.join("; ")),
        Err(_) => mutate_bytes(&seed.bytes, rng),
    }
}

fn mutate_bytes(bytes: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return (b, "empty".into());
    }
    match rng.below(3) {
        0 => {
            let cut = rng.below(b.len());
            b.truncate(cut);
            (b, format!("cut at byte {cut}"))
        }
        1 => {
            let flips = 1 + rng.below(8);
            for _ in 0..flips {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
            (b, format!("{flips} bit flips"))
        }
        _ => {
            let at = rng.below(b.len());
            let v = *rng.pick(&[0u8, 0x7f, 0x80, 0xff]).unwrap_or(&0);
            b[at] = v;
            (b, format!("byte {at} = {v:#x}"))
        }
    }
}

/// One structural change to `model`, described.
fn mutate_model(model: &mut Model, rng: &mut Rng) -> String {
    let g = &mut model.graph;
    let nodes: Vec<qgraph::NodeId> = g.nodes().map(|(id, _)| id).collect();
    match rng.below(5) {
        0 | 1 => {
            let Some(&id) = rng.pick(&nodes) else { return "no node".into() };
            let node = g.node_mut(id);
            let v = EXTREMES[rng.below(EXTREMES.len())];
            if node.attrs.is_empty() {
                node.attrs.push(("axis".into(), Attribute::Int(v)));
                return format!("node '{}': axis added", node.name);
            }
            let i = rng.below(node.attrs.len());
            let new = match &node.attrs[i].1 {
                Attribute::Int(_) => Attribute::Int(v),
                Attribute::Ints(old) => {
                    let mut vals = old.clone();
                    if vals.is_empty() || rng.below(4) == 0 {
                        vals.push(v);
                    } else {
                        let k = rng.below(vals.len());
                        vals[k] = v;
                    }
                    Attribute::Ints(vals)
                }
                Attribute::Float(_) => Attribute::Float(
                    *rng.pick(&[0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e30]).unwrap_or(&0.0),
                ),
                Attribute::String(_) => Attribute::String(b"UNKNOWN".to_vec()),
                _ => Attribute::Ints(vec![v]),
            };
            node.attrs[i].1 = new;
            format!("node '{}': attribute {} mutated", node.name, node.attrs[i].0)
        }
        2 => {
            let inputs = g.inputs().to_vec();
            let Some(&v) = rng.pick(&inputs) else { return "no input".into() };
            let value = g.value_mut(v);
            let rank = value.shape.as_ref().map_or(2, Shape::rank);
            let dims: Vec<Dim> = (0..rank + rng.below(2))
                .map(|_| match rng.below(4) {
                    0 => Dim::Symbol(String::new()),
                    1 => Dim::Known(0),
                    _ => Dim::Known(1 + rng.below(6)),
                })
                .collect();
            value.shape = Some(Shape(dims));
            if rng.below(4) == 0 {
                value.dtype =
                    rng.pick(&[DType::F32, DType::I64, DType::U8, DType::F16, DType::Bool]).copied();
            }
            format!("input '{}' reshaped to {:?}", value.name, value.shape)
        }
        3 => {
            let statics: Vec<qgraph::ValueId> =
                g.value_ids().filter(|&v| g.static_value(v).is_some()).collect();
            let Some(&v) = rng.pick(&statics) else { return "no initializer".into() };
            let replacement = match rng.below(4) {
                0 => Tensor::from_vec(&[0], Vec::<f32>::new()),
                1 => Tensor::from_vec(&[1], vec![EXTREMES[rng.below(EXTREMES.len())]]),
                2 => Tensor::from_vec(&[2, 3], vec![f32::NAN, 1.0, -1.0, 0.0, 1e30, -1e30]),
                _ => Tensor::from_vec(&[3], vec![0i64, -1, 1 << 40]),
            };
            let value = g.value_mut(v);
            value.data = replacement;
            value.shape = value.data.as_ref().map(|t| Shape::known(t.shape()));
            value.dtype = value.data.as_ref().map(Tensor::dtype);
            format!("initializer '{}' replaced", value.name)
        }
        _ => {
            let with_inputs: Vec<qgraph::NodeId> =
                nodes.iter().copied().filter(|&id| !g.node(id).inputs().is_empty()).collect();
            let Some(&id) = rng.pick(&with_inputs) else { return "no node with inputs".into() };
            let slot = rng.below(g.node(id).inputs().len());
            g.set_input(id, slot, None);
            format!("node '{}': input {slot} dropped", g.node(id).name)
        }
    }
}

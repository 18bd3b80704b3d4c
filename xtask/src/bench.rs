//! `cargo xtask bench …`: measurements against a reference on the same machine in the same run,
//! printed as ratios. `bench load`: qgraph's loader against Python's `onnx.load`.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::{python, zoo};

pub fn run(what: Option<&str>) -> Result<()> {
    match what {
        Some("load") | None => load(),
        Some(other) => bail!("unknown benchmark '{other}' (available: load)"),
    }
}

fn median_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn load() -> Result<()> {
    let zoo = zoo::zoo_dir()?;
    python::ensure_oracles()?;
    println!("{:<28} {:>10} {:>14} {:>8}", "model (median of 15)", "qgraph ms", "onnx.load ms", "ratio");
    for name in ["all_minilm_l6_v2", "efficientnet_lite0", "mobilenetv2_keras", "mobilenetv1_025_128"] {
        let path = zoo.join(format!("models/{name}.onnx"));
        let ours = median_ms(|| drop(qgraph::load_path(&path).unwrap()), 15);
        let theirs: f64 = python::script_output("time_onnx_load.py", &[&path.display().to_string(), "15"])?
            .trim()
            .parse()?;
        println!("{name:<28} {ours:>10.1} {theirs:>14.1} {:>8.2}", ours / theirs);
    }
    Ok(())
}

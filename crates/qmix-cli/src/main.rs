//! `qmix`: the toolkit's command line. Each subcommand is one job of the toolkit; this file only
//! parses arguments, runs the job and maps errors to exit codes (0 ok, 1 user error, 2 internal).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qgraph::{DimBindings, GraphError};

#[derive(Parser)]
#[command(name = "qmix", version, about = "Simulate quantization of ONNX models and choose mixed precision")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's inputs/outputs, op histogram, parameter count and MACs.
    ///
    /// Example: qmix inspect model.onnx --dim seq=128
    Inspect {
        /// The ONNX model.
        model: PathBuf,
        /// Size of every symbolic dim not named with --dim (batch size).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Size of a named symbolic dim, e.g. --dim seq=128 (repeatable).
        #[arg(long = "dim", value_parser = parse_dim)]
        dims: Vec<(String, usize)>,
    },
    /// Lite-MP: per-layer sensitivity, flip the worst layers to higher precision, report scores.
    ///
    /// Example: qmix litemp model.onnx --percent 10 --override int16
    Litemp {
        /// The ONNX model.
        model: PathBuf,
    },
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
        Command::Inspect { model, batch, dims } => {
            let mut m = qgraph::load_path(&model)?;
            let bindings = dims.into_iter().fold(DimBindings::all(batch), |b, (n, v)| b.with(&n, v));
            let report = m.infer_shapes(&bindings)?;
            print!("{}", m.summary());
            for id in report.unknown_ops {
                let n = m.graph.node(id);
                println!("note: no shape rule for op {} (node '{}')", n.op_type, n.name);
            }
            Ok(())
        }
        Command::Litemp { model } => {
            println!(
                "litemp {}: not implemented yet (arrives with the qanalyze and qmix crates)",
                model.display()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::User(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Internal(e)) => {
            eprintln!("internal error: {e:#}");
            ExitCode::from(2)
        }
    }
}

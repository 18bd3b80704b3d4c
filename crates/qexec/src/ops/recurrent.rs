//! The recurrent layers `RNN`, `GRU` and `LSTM` as the ONNX spec defines them: forward, reverse
//! or bidirectional, both layouts, per-batch `sequence_lens` (steps past a sequence's end give
//! zeros and leave its state alone), initial states, LSTM peepholes and coupled input/forget
//! gates, GRU's `linear_before_reset`, `clip`, and every activation the spec lists. Each step is
//! a matrix-vector product per batch row, in f32 with f32 accumulation.

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input, opt_input};
use crate::error::{KernelResult, Result};

/// Which recurrent layer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cell {
    Rnn,
    Gru { linear_before_reset: bool },
    Lstm { input_forget: bool },
}

impl Cell {
    /// Gates per hidden unit (rows of W per direction, in units of `hidden`).
    fn gates(self) -> usize {
        match self {
            Cell::Rnn => 1,
            Cell::Gru { .. } => 3,
            Cell::Lstm { .. } => 4,
        }
    }

    fn default_activations(self) -> &'static [&'static str] {
        match self {
            Cell::Rnn => &["Tanh"],
            Cell::Gru { .. } => &["Sigmoid", "Tanh"],
            Cell::Lstm { .. } => &["Sigmoid", "Tanh", "Tanh"],
        }
    }
}

/// An activation of the spec's list, with its `alpha`/`beta`.
#[derive(Debug, Clone, Copy)]
enum Act {
    Relu,
    Tanh,
    Sigmoid,
    Affine(f32, f32),
    LeakyRelu(f32),
    ThresholdedRelu(f32),
    ScaledTanh(f32, f32),
    HardSigmoid(f32, f32),
    Elu(f32),
    Softsign,
    Softplus,
}

impl Act {
    fn parse(name: &str, alpha: Option<f32>, beta: Option<f32>) -> Option<Act> {
        Some(match name.to_ascii_lowercase().as_str() {
            "relu" => Act::Relu,
            "tanh" => Act::Tanh,
            "sigmoid" => Act::Sigmoid,
            "affine" => Act::Affine(alpha.unwrap_or(1.0), beta.unwrap_or(0.0)),
            "leakyrelu" => Act::LeakyRelu(alpha.unwrap_or(0.01)),
            "thresholdedrelu" => Act::ThresholdedRelu(alpha.unwrap_or(1.0)),
            "scaledtanh" => Act::ScaledTanh(alpha.unwrap_or(1.0), beta.unwrap_or(1.0)),
            "hardsigmoid" => Act::HardSigmoid(alpha.unwrap_or(0.2), beta.unwrap_or(0.5)),
            "elu" => Act::Elu(alpha.unwrap_or(1.0)),
            "softsign" => Act::Softsign,
            "softplus" => Act::Softplus,
            _ => return None,
        })
    }

    fn apply(self, x: f32) -> f32 {
        match self {
            Act::Relu => x.max(0.0),
            Act::Tanh => x.tanh(),
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::Affine(a, b) => a * x + b,
            Act::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Act::ThresholdedRelu(a) => {
                if x > a {
                    x
                } else {
                    0.0
                }
            }
            Act::ScaledTanh(a, b) => a * (b * x).tanh(),
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::Elu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * (x.exp() - 1.0)
                }
            }
            Act::Softsign => x / (1.0 + x.abs()),
            Act::Softplus => (1.0 + x.exp()).ln(),
        }
    }
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let op = node.op_type.as_str();
    if !matches!(op, "RNN" | "GRU" | "LSTM") {
        return None;
    }
    Some((|| {
        let cell = match op {
            "RNN" => Cell::Rnn,
            "GRU" => Cell::Gru { linear_before_reset: node.int_attr("linear_before_reset", 0)? != 0 },
            _ => Cell::Lstm { input_forget: node.int_attr("input_forget", 0)? != 0 },
        };
        let directions = match node.string_attr("direction")?.unwrap_or("forward") {
            "forward" => vec![false],
            "reverse" => vec![true],
            "bidirectional" => vec![false, true],
            other => return Err(super::invalid(node, format!("unknown direction '{other}'"))),
        };
        let hidden = node.int_attr("hidden_size", 0)?;
        let hidden = usize::try_from(hidden)
            .ok()
            .filter(|&h| h > 0 && h <= 1 << 24)
            .ok_or_else(|| super::invalid(node, format!("hidden_size {hidden} is not a size")))?;
        let names: Vec<String> = match node.attr("activations") {
            Some(qgraph::Attribute::Strings(v)) => {
                v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()
            }
            Some(_) => return Err(super::invalid(node, "activations must be a list of strings")),
            None => cell.default_activations().iter().map(|s| s.to_string()).collect(),
        };
        let floats = |name: &str| -> Result<Vec<f32>> {
            match node.attr(name) {
                Some(qgraph::Attribute::Floats(v)) => Ok(v.clone()),
                Some(_) => Err(super::invalid(node, format!("{name} must be a list of floats"))),
                None => Ok(Vec::new()),
            }
        };
        let (alphas, betas) = (floats("activation_alpha")?, floats("activation_beta")?);
        let per_dir = cell.default_activations().len();
        if names.len() != per_dir * directions.len() && names.len() != per_dir {
            return Err(super::invalid(
                node,
                format!("{} activations for {} direction(s) of {op}", names.len(), directions.len()),
            ));
        }
        let acts = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Act::parse(n, alphas.get(i).copied(), betas.get(i).copied())
                    .ok_or_else(|| super::invalid(node, format!("unknown activation '{n}'")))
            })
            .collect::<Result<Vec<Act>>>()?;
        let clip = match node.attr("clip") {
            Some(_) => Some(node.float_attr("clip", 0.0)?),
            None => None,
        };
        Ok(Box::new(Recurrent {
            cell,
            hidden,
            directions,
            batch_first: node.int_attr("layout", 0)? != 0,
            acts,
            clip,
            outputs: node.outputs().len(),
        }) as Box<dyn Kernel>)
    })())
}

struct Recurrent {
    cell: Cell,
    hidden: usize,
    /// One entry per direction: whether it runs backwards.
    directions: Vec<bool>,
    batch_first: bool,
    acts: Vec<Act>,
    clip: Option<f32>,
    outputs: usize,
}

/// `y[r] = Σ_c m[r·cols + c]·v[c]` for `rows` rows, added to `y`.
fn add_mat_vec(y: &mut [f32], m: &[f32], v: &[f32]) {
    let cols = v.len();
    for (r, out) in y.iter_mut().enumerate() {
        let row = &m[r * cols..(r + 1) * cols];
        *out += row.iter().zip(v).map(|(a, b)| a * b).sum::<f32>();
    }
}

impl Kernel for Recurrent {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tx, tw, tr) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
        let xs = tx.shape().to_vec();
        if xs.len() != 3 {
            return Err(format!("X must have rank 3, got shape {xs:?}"));
        }
        let (seq, batch, isz) = if self.batch_first { (xs[1], xs[0], xs[2]) } else { (xs[0], xs[1], xs[2]) };
        let (h, g, dirs) = (self.hidden, self.cell.gates(), self.directions.len());
        let want = |t: &Tensor, shape: &[usize], what: &str| -> KernelResult<()> {
            if t.shape() == shape {
                Ok(())
            } else {
                Err(format!("{what} has shape {:?}, expected {shape:?}", t.shape()))
            }
        };
        want(tw, &[dirs, g * h, isz], "W")?;
        want(tr, &[dirs, g * h, h], "R")?;
        let (x, w, r) = (f32_data(tx)?, f32_data(tw)?, f32_data(tr)?);
        let b = match opt_input(inputs, 3) {
            Some(t) => {
                want(t, &[dirs, 2 * g * h], "B")?;
                f32_data(t)?.into_owned()
            }
            None => vec![0.0; dirs * 2 * g * h],
        };
        let lens: Vec<usize> = match opt_input(inputs, 4) {
            Some(t) => {
                let v = super::ints_of(t)?;
                if v.len() != batch || v.iter().any(|&l| l < 0 || l as usize > seq) {
                    return Err(format!("sequence_lens {v:?} do not fit batch {batch} of {seq} steps"));
                }
                v.into_iter().map(|l| l as usize).collect()
            }
            None => vec![seq; batch],
        };
        let state = |slot: usize, what: &str| -> KernelResult<Vec<f32>> {
            match opt_input(inputs, slot) {
                Some(t) => {
                    let shape = if self.batch_first { [batch, dirs, h] } else { [dirs, batch, h] };
                    want(t, &shape, what)?;
                    let v = f32_data(t)?.into_owned();
                    // Stored as [dirs, batch, h] internally.
                    Ok(if self.batch_first { transpose01(&v, batch, dirs, h) } else { v })
                }
                None => Ok(vec![0.0; dirs * batch * h]),
            }
        };
        let mut h_state = state(5, "initial_h")?;
        let mut c_state =
            if matches!(self.cell, Cell::Lstm { .. }) { state(6, "initial_c")? } else { Vec::new() };
        let peep = match (self.cell, opt_input(inputs, 7)) {
            (Cell::Lstm { .. }, Some(t)) => {
                want(t, &[dirs, 3 * h], "P")?;
                f32_data(t)?.into_owned()
            }
            _ => vec![0.0; dirs * 3 * h],
        };
        let y_len = ctx.checked_len(&[seq, dirs, batch, h], 4)?;
        let mut y = vec![0f32; y_len];
        let per_dir = self.cell.default_activations().len();
        let x_at = |t: usize, bi: usize| -> &[f32] {
            let off = if self.batch_first { (bi * seq + t) * isz } else { (t * batch + bi) * isz };
            &x[off..off + isz]
        };
        let clip = |v: f32| match self.clip {
            Some(c) => v.clamp(-c, c),
            None => v,
        };
        ctx.checked_len(&[2, g, h], 4)?;
        let mut gates = vec![0f32; g * h];
        let mut rec = vec![0f32; g * h];
        // The previous hidden state, and GRU's `r ⊙ H`.
        let (mut hprev, mut reset) = (vec![0f32; h], vec![0f32; h]);
        for (d, &backward) in self.directions.iter().enumerate() {
            let acts = if self.acts.len() == per_dir {
                &self.acts[..]
            } else {
                &self.acts[d * per_dir..(d + 1) * per_dir]
            };
            let (wd, rd) =
                (&w[d * g * h * isz..(d + 1) * g * h * isz], &r[d * g * h * h..(d + 1) * g * h * h]);
            let (wb, rb) =
                (&b[d * 2 * g * h..d * 2 * g * h + g * h], &b[d * 2 * g * h + g * h..(d + 1) * 2 * g * h]);
            let pd = &peep[d * 3 * h..(d + 1) * 3 * h];
            for (bi, &len) in lens.iter().enumerate() {
                let hs = d * batch * h + bi * h;
                for step in 0..len {
                    let t = if backward { len - 1 - step } else { step };
                    gates.copy_from_slice(wb);
                    add_mat_vec(&mut gates, wd, x_at(t, bi));
                    rec.copy_from_slice(rb);
                    hprev.copy_from_slice(&h_state[hs..hs + h]);
                    add_mat_vec(&mut rec, rd, &hprev);
                    let hnew = &mut h_state[hs..hs + h];
                    match self.cell {
                        Cell::Rnn => {
                            for k in 0..h {
                                hnew[k] = acts[0].apply(clip(gates[k] + rec[k]));
                            }
                        }
                        Cell::Gru { linear_before_reset } => {
                            // Gate order z, r, h; z and r overwrite their pre-activations.
                            for k in 0..2 * h {
                                gates[k] = acts[0].apply(clip(gates[k] + rec[k]));
                            }
                            let (z, r) = (&gates[..h], &gates[h..2 * h]);
                            if !linear_before_reset {
                                // (r ⊙ H)·Rhᵀ + Rbh replaces H·Rhᵀ + Rbh.
                                for k in 0..h {
                                    reset[k] = r[k] * hprev[k];
                                }
                                rec[2 * h..].copy_from_slice(&rb[2 * h..3 * h]);
                                add_mat_vec(&mut rec[2 * h..], &rd[2 * h * h..3 * h * h], &reset);
                            }
                            for k in 0..h {
                                let scale = if linear_before_reset { r[k] } else { 1.0 };
                                let hh = acts[1].apply(clip(gates[2 * h + k] + scale * rec[2 * h + k]));
                                hnew[k] = (1.0 - z[k]) * hh + z[k] * hprev[k];
                            }
                        }
                        Cell::Lstm { input_forget } => {
                            // Gate order i, o, f, c; peepholes i, o, f.
                            let cs = &mut c_state[hs..hs + h];
                            for k in 0..h {
                                let cprev = cs[k];
                                let i = acts[0].apply(clip(gates[k] + rec[k] + pd[k] * cprev));
                                let f = if input_forget {
                                    1.0 - i
                                } else {
                                    acts[0].apply(clip(
                                        gates[2 * h + k] + rec[2 * h + k] + pd[2 * h + k] * cprev,
                                    ))
                                };
                                let c = acts[1].apply(clip(gates[3 * h + k] + rec[3 * h + k]));
                                let cnew = f * cprev + i * c;
                                let o = acts[0].apply(clip(gates[h + k] + rec[h + k] + pd[h + k] * cnew));
                                cs[k] = cnew;
                                hnew[k] = o * acts[2].apply(cnew);
                            }
                        }
                    }
                    let yo = ((t * dirs + d) * batch + bi) * h;
                    y[yo..yo + h].copy_from_slice(&h_state[hs..hs + h]);
                }
            }
        }
        let (y, y_shape) = if self.batch_first {
            // [seq, dirs, batch, h] → [batch, seq, dirs, h].
            let mut out = vec![0f32; y.len()];
            for t in 0..seq {
                for d in 0..dirs {
                    for bi in 0..batch {
                        let src = ((t * dirs + d) * batch + bi) * h;
                        let dst = ((bi * seq + t) * dirs + d) * h;
                        out[dst..dst + h].copy_from_slice(&y[src..src + h]);
                    }
                }
            }
            (out, vec![batch, seq, dirs, h])
        } else {
            (y, vec![seq, dirs, batch, h])
        };
        let state_out = |v: Vec<f32>| -> KernelResult<Tensor> {
            if self.batch_first {
                super::tensor_from(&[batch, dirs, h], transpose01(&v, dirs, batch, h))
            } else {
                super::tensor_from(&[dirs, batch, h], v)
            }
        };
        let mut outs = vec![super::tensor_from(&y_shape, y)?, state_out(h_state)?];
        if matches!(self.cell, Cell::Lstm { .. }) {
            outs.push(state_out(c_state)?);
        }
        outs.truncate(self.outputs.max(1));
        Ok(outs)
    }
}

/// `[a, b, c]` → `[b, a, c]`.
fn transpose01(v: &[f32], a: usize, b: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for i in 0..a {
        for j in 0..b {
            out[(j * a + i) * c..(j * a + i + 1) * c]
                .copy_from_slice(&v[(i * b + j) * c..(i * b + j + 1) * c]);
        }
    }
    out
}

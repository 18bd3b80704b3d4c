//! Control flow: `If`, `Loop` and `Scan`. Each subgraph is compiled as a session of its own when
//! the node is, its outer-scope reads becoming inputs fed from the values the session hands the
//! node after its explicit inputs (in [`qgraph::subgraph_outer_names`] order). `If` runs the
//! branch its condition picks; `Loop` runs its body while the trip count and condition allow,
//! carrying values and stacking scan outputs; `Scan` runs its body once per slice of its scan
//! inputs. Bodies run on the calling thread.

use ndarray::Axis;
use qgraph::{Attribute, Node, Tensor};

use super::{Activation, ExecCtx, Kernel, input, ints_of, norm_axis, opt_input, typed, with_dtype, wrap};
use crate::error::{KernelResult, Result};
use crate::session::{Session, SessionOptions};

/// One compiled branch and where its outer reads come from among the node's implicit inputs.
struct Branch {
    session: Session,
    /// The subgraph's own (formal) input names, in order.
    formal: Vec<String>,
    /// How many outputs the subgraph has.
    outputs: usize,
    /// Per outer name the branch reads: its input name and its index among the node's implicit
    /// inputs.
    feeds: Vec<(String, usize)>,
}

impl Branch {
    /// Runs the subgraph on its formal inputs `formal` (in order) and its outer reads, taken
    /// from the node's inputs after the first `explicit`.
    fn run(
        &self,
        formal: Vec<Tensor>,
        inputs: &[Option<Tensor>],
        explicit: usize,
    ) -> KernelResult<Vec<Tensor>> {
        let mut feeds: Vec<(&str, Tensor)> = Vec::with_capacity(formal.len() + self.feeds.len());
        if self.formal.len() != formal.len() {
            return Err(format!(
                "the body takes {} inputs, the node gives {}",
                self.formal.len(),
                formal.len()
            ));
        }
        feeds.extend(self.formal.iter().map(String::as_str).zip(formal));
        for (name, at) in &self.feeds {
            let t = inputs
                .get(explicit + at)
                .and_then(Option::as_ref)
                .ok_or_else(|| format!("outer value '{name}' is missing"))?;
            feeds.push((name.as_str(), t.clone()));
        }
        self.session.run(&feeds).map_err(|e| e.to_string())
    }
}

struct If {
    then_branch: Branch,
    else_branch: Branch,
}

/// `Loop`: the body and how many loop-carried values it has.
struct Loop {
    body: Branch,
    /// The node's explicit inputs (trip count, condition and the carried values).
    explicit: usize,
}

/// `Scan`: the body, how many of the explicit inputs are scan inputs, and the axes and
/// directions of the scan inputs and outputs. Opset 8's form (`batched`) has a batch axis 0 on
/// every input and output and an optional first input of per-batch sequence lengths; each batch
/// entry is scanned on its own and shorter outputs are zero-padded.
struct Scan {
    body: Branch,
    explicit: usize,
    batched: bool,
    scan_inputs: usize,
    input_axes: Vec<i64>,
    input_reverse: Vec<bool>,
    output_axes: Vec<i64>,
    output_reverse: Vec<bool>,
}

/// The most iterations a `Loop` runs before it is stopped (a body that never clears its
/// condition would otherwise hang the run).
const MAX_LOOP_ITERATIONS: i64 = 1 << 20;

/// Appends one iteration's scan outputs to `acc`, refusing to let any stacked output grow past
/// the session's tensor limit (checked as it grows, so a long loop cannot exhaust memory).
fn push_scans(
    acc: &mut [Vec<Tensor>],
    parts: impl IntoIterator<Item = Tensor>,
    ctx: &ExecCtx<'_>,
) -> KernelResult<()> {
    for (stack, t) in acc.iter_mut().zip(parts) {
        let bytes = (stack.len() + 1).saturating_mul(t.len().saturating_mul(t.dtype().size_of()));
        if bytes > ctx.max_bytes {
            return Err(format!(
                "a scan output would hold {bytes} bytes after {} iterations, beyond the limit of {}",
                stack.len() + 1,
                ctx.max_bytes
            ));
        }
        stack.push(t);
    }
    Ok(())
}

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    if !matches!(node.op_type.as_str(), "If" | "Loop" | "Scan") {
        return None;
    }
    Some((|| {
        let outer = qgraph::subgraph_outer_names(node);
        let branch = |name: &str| -> Result<Branch> {
            let Some(Attribute::Graph(proto)) = node.attr(name) else {
                return Err(super::invalid(node, format!("{name} is missing or not a graph")));
            };
            let (model, reads) = qgraph::subgraph_model(proto, opset)?;
            let feeds = reads
                .into_iter()
                .map(|r| {
                    let at = outer.iter().position(|o| *o == r).ok_or_else(|| {
                        super::invalid(node, format!("{name} reads '{r}', which the node does not see"))
                    })?;
                    Ok((r, at))
                })
                .collect::<Result<Vec<_>>>()?;
            let g = &model.graph;
            let own = g.inputs().len().saturating_sub(feeds.len());
            let formal = g.inputs()[..own].iter().map(|&v| g.value(v).name.clone()).collect();
            let outputs = g.outputs().len();
            Ok(Branch { session: Session::new(model, SessionOptions::threads(1))?, formal, outputs, feeds })
        };
        let explicit = node.inputs().len();
        Ok(match node.op_type.as_str() {
            "If" => Box::new(If { then_branch: branch("then_branch")?, else_branch: branch("else_branch")? })
                as Box<dyn Kernel>,
            "Loop" => Box::new(Loop { body: branch("body")?, explicit }),
            _ => {
                let batched = opset < 9;
                let lead = usize::from(batched);
                let scan_inputs = usize::try_from(node.int_attr("num_scan_inputs", 0)?)
                    .ok()
                    .filter(|&m| m >= 1 && m + lead <= explicit)
                    .ok_or_else(|| super::invalid(node, "num_scan_inputs does not fit the inputs"))?;
                let body = branch("body")?;
                let outputs = node.outputs().len();
                let states = explicit - lead - scan_inputs;
                let list = |name: &str, n: usize| -> Result<Vec<i64>> {
                    let v = node.ints_attr(name)?.map(<[i64]>::to_vec).unwrap_or_else(|| vec![0; n]);
                    if v.len() == n {
                        Ok(v)
                    } else {
                        Err(super::invalid(node, format!("{name} {v:?} needs {n} values")))
                    }
                };
                let scan_outputs = outputs.saturating_sub(states);
                let directions = if batched { "directions" } else { "scan_input_directions" };
                Box::new(Scan {
                    body,
                    explicit,
                    batched,
                    scan_inputs,
                    input_axes: list("scan_input_axes", scan_inputs)?,
                    input_reverse: list(directions, scan_inputs)?.iter().map(|&d| d != 0).collect(),
                    output_axes: list("scan_output_axes", scan_outputs)?,
                    output_reverse: list("scan_output_directions", scan_outputs)?
                        .iter()
                        .map(|&d| d != 0)
                        .collect(),
                })
            }
        })
    })())
}

/// Slice `i` of `t` along `axis` (the axis removed).
fn slice_at(t: &Tensor, axis: usize, i: usize) -> KernelResult<Tensor> {
    Ok(with_dtype!(t.dtype(), T => wrap(typed::<T>(t)?.index_axis(Axis(axis), i).to_owned())))
}

/// `parts` (same dtype and shape) stacked along a new `axis`.
fn stack(parts: &[Tensor], axis: usize) -> KernelResult<Tensor> {
    let first = parts.first().ok_or("nothing to stack")?;
    Ok(with_dtype!(first.dtype(), T => {
        let views = parts.iter().map(|p| typed::<T>(p).map(|a| a.view())).collect::<KernelResult<Vec<_>>>()?;
        wrap(ndarray::stack(Axis(axis), &views).map_err(|e| format!("scan outputs differ in shape: {e}"))?)
    }))
}

impl Kernel for If {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let cond = input(inputs, 0)?;
        if cond.len() != 1 {
            return Err(format!("the condition has {} elements, not one", cond.len()));
        }
        let taken = cond.to_f64_vec().first().is_some_and(|&c| c != 0.0);
        let branch = if taken { &self.then_branch } else { &self.else_branch };
        branch
            .run(Vec::new(), inputs, 1)
            .map_err(|e| format!("{} branch: {e}", if taken { "then" } else { "else" }))
    }
}

impl Kernel for Loop {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let trips = opt_input(inputs, 0).map(ints_of).transpose()?.and_then(|v| v.first().copied());
        let mut cond = opt_input(inputs, 1).map(|c| c.to_f64_vec().first().is_some_and(|&v| v != 0.0));
        let mut carried: Vec<Tensor> = (2..self.explicit)
            .map(|i| {
                opt_input(inputs, i).cloned().ok_or_else(|| format!("loop-carried input {i} is missing"))
            })
            .collect::<KernelResult<_>>()?;
        let mut scans: Vec<Vec<Tensor>> = Vec::new();
        let mut trip = 0i64;
        while trips.is_none_or(|m| trip < m) && cond != Some(false) {
            if trip >= MAX_LOOP_ITERATIONS {
                return Err(format!("the loop ran {MAX_LOOP_ITERATIONS} iterations without ending"));
            }
            let mut formal = vec![Tensor::from_vec(&[], vec![trip]).ok_or("internal: trip count")?];
            formal.push(Tensor::from_vec(&[], vec![cond.unwrap_or(true)]).ok_or("internal: condition")?);
            formal.extend(carried.iter().cloned());
            let outs =
                self.body.run(formal, inputs, self.explicit).map_err(|e| format!("iteration {trip}: {e}"))?;
            let n = carried.len();
            if outs.len() < 1 + n {
                return Err(format!("the body gives {} outputs for {n} carried values", outs.len()));
            }
            let mut outs = outs.into_iter();
            let c = outs.next().ok_or("internal")?;
            if cond.is_some() {
                cond = Some(c.to_f64_vec().first().is_some_and(|&v| v != 0.0));
            }
            carried = outs.by_ref().take(n).collect();
            let rest: Vec<Tensor> = outs.collect();
            if scans.is_empty() {
                scans = vec![Vec::new(); rest.len()];
            }
            push_scans(&mut scans, rest, ctx)?;
            trip += 1;
        }
        let mut result = carried;
        for parts in &scans {
            result.push(stack(parts, 0)?);
        }
        // Scan outputs of a loop that never ran: empty along the iteration axis.
        let wanted = self.body.outputs.saturating_sub(1);
        while result.len() < wanted {
            result.push(Tensor::from_vec(&[0], Vec::<f32>::new()).ok_or("internal")?);
        }
        Ok(result)
    }
}

impl Scan {
    /// Runs the body over `length` steps of `scanned` (each with its scan axis), from `state`;
    /// returns the final state and the stacked scan outputs.
    fn scan(
        &self,
        mut state: Vec<Tensor>,
        scanned: &[(Tensor, usize)],
        length: usize,
        inputs: &[Option<Tensor>],
        ctx: &ExecCtx<'_>,
    ) -> KernelResult<Vec<Tensor>> {
        let states = state.len();
        let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); self.output_axes.len()];
        for step in 0..length {
            let mut formal = state.clone();
            for (j, (t, axis)) in scanned.iter().enumerate() {
                let i = if self.input_reverse[j] { length - 1 - step } else { step };
                formal.push(slice_at(t, *axis, i)?);
            }
            let got =
                self.body.run(formal, inputs, self.explicit).map_err(|e| format!("step {step}: {e}"))?;
            if got.len() != states + outs.len() {
                return Err(format!(
                    "the body gives {} outputs, the node expects {}",
                    got.len(),
                    states + outs.len()
                ));
            }
            let mut got = got.into_iter();
            state = got.by_ref().take(states).collect();
            push_scans(&mut outs, got, ctx)?;
        }
        let mut result = state;
        for (k, mut parts) in outs.into_iter().enumerate() {
            if self.output_reverse[k] {
                parts.reverse();
            }
            let rank = parts.first().map_or(0, |p| p.shape().len()) + 1;
            result.push(if parts.is_empty() {
                Tensor::from_vec(&[0], Vec::<f32>::new()).ok_or("internal")?
            } else {
                stack(&parts, norm_axis(self.output_axes[k], rank)?)?
            });
        }
        Ok(result)
    }

    /// Opset 8: each batch entry scanned on its own (up to its sequence length), the results
    /// stacked on a new batch axis, scan outputs zero-padded to the longest sequence.
    fn scan_batched(&self, inputs: &[Option<Tensor>], ctx: &ExecCtx<'_>) -> KernelResult<Vec<Tensor>> {
        let states = self.explicit - 1 - self.scan_inputs;
        let firsts: Vec<&Tensor> =
            (1..self.explicit).map(|i| input(inputs, i)).collect::<KernelResult<_>>()?;
        let batch =
            firsts.first().and_then(|t| t.shape().first()).copied().ok_or("inputs need a batch axis")?;
        if firsts.iter().any(|t| t.shape().first() != Some(&batch)) {
            return Err(format!("every input needs the batch axis of {batch}"));
        }
        let full = firsts[states].shape().get(1).copied().ok_or("scan inputs need a sequence axis")?;
        if firsts[states..].iter().any(|t| t.shape().get(1) != Some(&full)) {
            return Err("scan inputs have different sequence lengths".into());
        }
        let lens = opt_input(inputs, 0).map(ints_of).transpose()?;
        let mut per_batch: Vec<Vec<Tensor>> = Vec::with_capacity(batch);
        for b in 0..batch {
            let length = match &lens {
                Some(l) => {
                    let v = *l.get(b).ok_or_else(|| format!("no sequence length for batch entry {b}"))?;
                    usize::try_from(v).ok().filter(|&v| v <= full).ok_or_else(|| {
                        format!("sequence length {v} of batch entry {b} is not in 0..={full}")
                    })?
                }
                None => full,
            };
            let state: Vec<Tensor> =
                firsts[..states].iter().map(|t| slice_at(t, 0, b)).collect::<KernelResult<_>>()?;
            let scanned: Vec<(Tensor, usize)> = firsts[states..]
                .iter()
                .map(|t| slice_at(t, 0, b).map(|s| (s, 0)))
                .collect::<KernelResult<_>>()?;
            let mut out = self.scan(state, &scanned, length, inputs, ctx)?;
            for t in out.iter_mut().skip(states) {
                if length < full && !t.shape().is_empty() {
                    let mut pad_shape = t.shape().to_vec();
                    pad_shape[0] = full - length;
                    let zeros = super::movement::cast(
                        &Tensor::from_vec(&pad_shape, vec![0f32; pad_shape.iter().product()])
                            .ok_or("internal")?,
                        t.dtype(),
                    )?;
                    *t = Tensor::concat_rows(&[t.clone(), zeros]).ok_or("scan outputs differ in shape")?;
                }
            }
            per_batch.push(out);
        }
        let count = per_batch.first().map_or(0, Vec::len);
        (0..count).map(|k| stack(&per_batch.iter().map(|o| o[k].clone()).collect::<Vec<_>>(), 0)).collect()
    }
}

impl Kernel for Scan {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        if self.batched {
            return self.scan_batched(inputs, ctx);
        }
        let states = self.explicit - self.scan_inputs;
        let state: Vec<Tensor> =
            (0..states).map(|i| input(inputs, i).cloned()).collect::<KernelResult<_>>()?;
        let mut scanned: Vec<(Tensor, usize)> = Vec::with_capacity(self.scan_inputs);
        let mut length = None;
        for (j, &axis) in self.input_axes.iter().enumerate() {
            let t = input(inputs, states + j)?;
            let axis = norm_axis(axis, t.shape().len())?;
            let len = t.shape()[axis];
            if length.is_some_and(|l| l != len) {
                return Err(format!(
                    "scan inputs have different lengths ({} and {len})",
                    length.unwrap_or(0)
                ));
            }
            length = Some(len);
            scanned.push((t.clone(), axis));
        }
        self.scan(state, &scanned, length.unwrap_or(0), inputs, ctx)
    }
}

//! The classification losses `NegativeLogLikelihoodLoss` (on log-probabilities) and
//! `SoftmaxCrossEntropyLoss` (on scores, through a log-softmax over axis 1, whose result is the
//! optional second output): input `[N, C, d…]`, class indices `[N, d…]`, optional class weights
//! `[C]`, an `ignore_index` whose positions weigh nothing, and `none`/`sum`/`mean` reduction —
//! `mean` divides by the total weight when weights or an ignored index are given, as the ONNX
//! reference does. Sums run in f64.

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input, ints_of, opt_input, tensor_from};
use crate::error::{ExecError, KernelResult, Result};

#[derive(Clone, Copy, PartialEq)]
enum Reduction {
    None,
    Sum,
    Mean,
}

struct Loss {
    softmax: bool,
    /// Whether the node asks for the log-probabilities too (`SoftmaxCrossEntropyLoss` only).
    log_prob_output: bool,
    reduction: Reduction,
    ignore_index: Option<i64>,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let softmax = match node.op_type.as_str() {
        "NegativeLogLikelihoodLoss" => false,
        "SoftmaxCrossEntropyLoss" => true,
        _ => return None,
    };
    Some((|| {
        let reduction = match node.string_attr("reduction")?.unwrap_or("mean") {
            "none" => Reduction::None,
            "sum" => Reduction::Sum,
            "mean" => Reduction::Mean,
            other => return Err(super::invalid(node, format!("unknown reduction '{other}'"))),
        };
        let ignore_index = match node.attr("ignore_index") {
            Some(_) => Some(node.int_attr("ignore_index", 0).map_err(ExecError::from)?),
            None => None,
        };
        let log_prob_output = softmax && node.outputs().len() > 1;
        Ok(Box::new(Loss { softmax, log_prob_output, reduction, ignore_index }) as Box<dyn Kernel>)
    })())
}

/// `x` (`[N, C, D]` flattened) turned into log-probabilities over C.
fn log_softmax(x: &[f32], n: usize, c: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let mut lane = vec![0.0f32; c];
    for i in 0..n {
        for k in 0..d {
            let at = |j: usize| (i * c + j) * d + k;
            lane.iter_mut().enumerate().for_each(|(j, v)| *v = x[at(j)]);
            super::norm::log_softmax_lane(&mut lane);
            lane.iter().enumerate().for_each(|(j, &v)| out[at(j)] = v);
        }
    }
    out
}

impl Kernel for Loss {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let target = input(inputs, 1)?;
        let (n, c, rest) = match x.shape() {
            [n, c, rest @ ..] => (*n, *c, rest),
            s => return Err(format!("input must be [N, C, d…], got {s:?}")),
        };
        if target.shape().first() != Some(&n) || target.shape()[1..] != *rest {
            return Err(format!(
                "target {:?} does not match input {:?} without its class axis",
                target.shape(),
                x.shape()
            ));
        }
        let d: usize = rest.iter().product();
        let scores = f32_data(x)?;
        let log_probs = if self.softmax { log_softmax(&scores, n, c, d) } else { scores.to_vec() };
        let weights = opt_input(inputs, 2).map(f32_data).transpose()?;
        if let Some(w) = &weights
            && w.len() != c
        {
            return Err(format!("weight has {} elements for {c} classes", w.len()));
        }
        let classes = ints_of(target)?;
        let mut losses = vec![0.0f32; classes.len()];
        let (mut total, mut total_weight) = (0.0f64, 0.0f64);
        for (at, &t) in classes.iter().enumerate() {
            if Some(t) == self.ignore_index {
                continue;
            }
            let class = usize::try_from(t)
                .ok()
                .filter(|&t| t < c)
                .ok_or_else(|| format!("target class {t} is outside 0..{c} and is not the ignore_index"))?;
            let weight = weights.as_ref().map_or(1.0, |w| w[class]);
            let (i, k) = (at / d.max(1), at % d.max(1));
            let loss = -log_probs[(i * c + class) * d + k] * weight;
            losses[at] = loss;
            total += f64::from(loss);
            total_weight += f64::from(weight);
        }
        let loss = match self.reduction {
            Reduction::None => tensor_from(target.shape(), losses)?,
            Reduction::Sum => Tensor::scalar(total as f32),
            Reduction::Mean if weights.is_some() || self.ignore_index.is_some() => {
                Tensor::scalar((total / total_weight) as f32)
            }
            Reduction::Mean => Tensor::scalar((total / classes.len() as f64) as f32),
        };
        let mut outputs = vec![loss];
        if self.log_prob_output {
            outputs.push(tensor_from(x.shape(), log_probs)?);
        }
        Ok(outputs)
    }
}

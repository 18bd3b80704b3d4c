//! Activation functions that follow a weighted layer, on channel-major `[C, m]` data: forward and
//! vector-Jacobian rules. AdaRound compares a layer's output after the activation that follows it;
//! quantization-aware training runs through them.

use qgraph::{Graph, Node};

use crate::error::{GradError, Result};

/// An activation applied elementwise (Softmax: across channels).
#[derive(Debug, Clone, PartialEq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, lo), hi)`.
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `x` or `alpha·x` below zero.
    LeakyRelu {
        /// Slope below zero.
        alpha: f32,
    },
    /// `x` or `slope[c]·x` below zero (one slope, or one per channel).
    PRelu {
        /// Slopes.
        slope: Vec<f32>,
    },
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `tanh x`.
    Tanh,
    /// `clip(alpha·x + beta, 0, 1)`.
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Intercept.
        beta: f32,
    },
    /// `x · clip(x/6 + 1/2, 0, 1)`.
    HardSwish,
    /// Softmax across channels.
    Softmax,
}

fn static_scalar(g: &Graph, node: &Node, slot: usize) -> Option<Option<f32>> {
    match node.input(slot) {
        None => Some(None),
        Some(v) => g.static_value(v)?.as_f32()?.iter().next().map(|&x| Some(x)),
    }
}

impl Activation {
    /// The activation `node` computes, when it is one with static parameters; Softmax only over
    /// the channel axis `channel_axis` of an output of rank `rank`.
    pub fn from_node(g: &Graph, node: &Node, channel_axis: usize, rank: usize) -> Result<Option<Activation>> {
        Ok(Some(match node.op_type.as_str() {
            "Relu" => Activation::Relu,
            "Clip" => {
                let (lo, hi) =
                    if node.input(1).is_some() || node.input(2).is_some() || node.attr("min").is_none() {
                        match (static_scalar(g, node, 1), static_scalar(g, node, 2)) {
                            (Some(lo), Some(hi)) => (lo, hi),
                            _ => return Ok(None),
                        }
                    } else {
                        (Some(node.float_attr("min", f32::MIN)?), Some(node.float_attr("max", f32::MAX)?))
                    };
                Activation::Clip { min: lo.unwrap_or(f32::NEG_INFINITY), max: hi.unwrap_or(f32::INFINITY) }
            }
            "LeakyRelu" => Activation::LeakyRelu { alpha: node.float_attr("alpha", 0.01)? },
            "PRelu" => {
                let Some(slope) = node.input(1).and_then(|v| g.static_value(v)).and_then(|t| t.as_f32())
                else {
                    return Ok(None);
                };
                Activation::PRelu { slope: slope.iter().copied().collect() }
            }
            "Sigmoid" => Activation::Sigmoid,
            "Tanh" => Activation::Tanh,
            "HardSigmoid" => Activation::HardSigmoid {
                alpha: node.float_attr("alpha", 0.2)?,
                beta: node.float_attr("beta", 0.5)?,
            },
            "HardSwish" => Activation::HardSwish,
            "Softmax" => {
                let axis = node.int_attr("axis", -1)?;
                let axis = if axis < 0 { axis + rank as i64 } else { axis };
                if axis != channel_axis as i64 {
                    return Ok(None);
                }
                Activation::Softmax
            }
            _ => return Ok(None),
        }))
    }

    fn slope(&self, c: usize) -> f32 {
        match self {
            Activation::PRelu { slope } if slope.len() == 1 => slope[0],
            Activation::PRelu { slope } => slope.get(c).copied().unwrap_or(0.0),
            Activation::LeakyRelu { alpha } => *alpha,
            _ => 0.0,
        }
    }

    /// `(lo, hi)` when the activation is a clip (Relu: `(0, ∞)`), which the loss kernels fuse.
    pub(crate) fn clip_bounds(&self) -> Option<(f32, f32)> {
        match self {
            Activation::Relu => Some((0.0, f32::INFINITY)),
            Activation::Clip { min, max } => Some((*min, *max)),
            _ => None,
        }
    }

    /// Checks a per-channel parameter against `channels`.
    pub fn check(&self, op: &str, channels: usize) -> Result<()> {
        match self {
            Activation::PRelu { slope } if slope.len() != 1 && slope.len() != channels => {
                Err(GradError::Unsupported {
                    op: op.into(),
                    detail: format!("PRelu with {} slopes after {channels} channels", slope.len()),
                })
            }
            _ => Ok(()),
        }
    }

    /// `out = act(pre)` over `[channels, m]`.
    pub fn forward(&self, pre: &[f32], out: &mut [f32], m: usize) {
        let m = m.max(1);
        match self {
            Activation::Softmax => {
                let c = pre.len() / m;
                for j in 0..m {
                    let mx = (0..c).map(|i| pre[i * m + j]).fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for i in 0..c {
                        let e = (pre[i * m + j] - mx).exp();
                        out[i * m + j] = e;
                        sum += e;
                    }
                    for i in 0..c {
                        out[i * m + j] /= sum;
                    }
                }
            }
            _ => {
                for (c, (o, p)) in out.chunks_exact_mut(m).zip(pre.chunks_exact(m)).enumerate() {
                    let a = self.slope(c);
                    match self {
                        Activation::Relu => o.iter_mut().zip(p).for_each(|(o, &x)| *o = x.max(0.0)),
                        Activation::Clip { min, max } => {
                            o.iter_mut().zip(p).for_each(|(o, &x)| *o = x.max(*min).min(*max))
                        }
                        Activation::LeakyRelu { .. } | Activation::PRelu { .. } => {
                            o.iter_mut().zip(p).for_each(|(o, &x)| *o = if x < 0.0 { a * x } else { x })
                        }
                        Activation::Sigmoid => {
                            o.iter_mut().zip(p).for_each(|(o, &x)| *o = 1.0 / (1.0 + (-x).exp()))
                        }
                        Activation::Tanh => o.iter_mut().zip(p).for_each(|(o, &x)| *o = x.tanh()),
                        Activation::HardSigmoid { alpha, beta } => {
                            o.iter_mut().zip(p).for_each(|(o, &x)| *o = (alpha * x + beta).clamp(0.0, 1.0))
                        }
                        Activation::HardSwish => {
                            o.iter_mut().zip(p).for_each(|(o, &x)| *o = x * (x / 6.0 + 0.5).clamp(0.0, 1.0))
                        }
                        Activation::Softmax => unreachable!("handled above"),
                    }
                }
            }
        }
    }

    /// Turns `grad` (of the loss by `out`) into the gradient by `pre`, in place; `out` is the
    /// forward's result.
    pub fn backward(&self, pre: &[f32], out: &[f32], grad: &mut [f32], m: usize) {
        let m = m.max(1);
        if let Activation::Softmax = self {
            let c = pre.len() / m;
            for j in 0..m {
                let dot: f32 = (0..c).map(|i| grad[i * m + j] * out[i * m + j]).sum();
                for i in 0..c {
                    grad[i * m + j] = out[i * m + j] * (grad[i * m + j] - dot);
                }
            }
            return;
        }
        for (c, ((g, p), o)) in
            grad.chunks_exact_mut(m).zip(pre.chunks_exact(m)).zip(out.chunks_exact(m)).enumerate()
        {
            let a = self.slope(c);
            let each = |f: &dyn Fn(f32, f32) -> f32, g: &mut [f32]| {
                g.iter_mut().zip(p.iter().zip(o)).for_each(|(g, (&x, &y))| *g *= f(x, y))
            };
            match self {
                Activation::Relu => {
                    g.iter_mut().zip(p).for_each(|(g, &x)| *g = if x > 0.0 { *g } else { 0.0 })
                }
                Activation::Clip { min, max } => {
                    g.iter_mut().zip(p).for_each(|(g, &x)| *g = if x > *min && x < *max { *g } else { 0.0 })
                }
                Activation::LeakyRelu { .. } | Activation::PRelu { .. } => {
                    g.iter_mut().zip(p).for_each(|(g, &x)| *g = if x < 0.0 { a * *g } else { *g })
                }
                Activation::Sigmoid => each(&|_, y| y * (1.0 - y), g),
                Activation::Tanh => each(&|_, y| 1.0 - y * y, g),
                Activation::HardSigmoid { alpha, beta } => each(
                    &|x, _| {
                        if (0.0..1.0).contains(&(alpha * x + beta)) && alpha * x + beta > 0.0 {
                            *alpha
                        } else {
                            0.0
                        }
                    },
                    g,
                ),
                Activation::HardSwish => each(&|x, _| hard_swish_derivative(x), g),
                Activation::Softmax => unreachable!("handled above"),
            }
        }
    }
}

/// The derivative of `x · clip(x/6 + 1/2, 0, 1)`.
pub(crate) fn hard_swish_derivative(x: f32) -> f32 {
    if x <= -3.0 {
        0.0
    } else if x >= 3.0 {
        1.0
    } else {
        x / 3.0 + 0.5
    }
}

//! Elementwise ops: unary maths (trigonometric and hyperbolic included), activations,
//! `IsNaN`/`IsInf`, numpy-broadcast binary arithmetic, comparisons and logic, `Where`, `Clip`,
//! `PRelu` and the variadic `Sum`/`Mean`/`Min`/`Max`.

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn, Zip};
use qgraph::{DType, Element, Node, Tensor};

use super::arith::{Arith, Bits, integer, numeric};
use super::broadcast::{F32Op, Plan};
use super::{
    Activation, ExecCtx, Kernel, for_each_chunk_mut, input, into_f32_unique, opt_input, take_input, typed,
    with_dtype, wrap,
};
use crate::error::{ExecError, KernelResult, Result};
use qkernels::fastmath;

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    let unary = |op: Unary| -> Option<Result<Box<dyn Kernel>>> { Some(Ok(Box::new(op))) };
    let f = |name: &str, default: f32| node.float_attr(name, default).map_err(ExecError::from);
    let built: Result<Box<dyn Kernel>> = match node.op_type.as_str() {
        "Relu" => return unary(Unary::Relu),
        "Sigmoid" => return unary(Unary::Sigmoid),
        "HardSwish" => return unary(Unary::HardSwish),
        "Tanh" => return unary(Unary::Tanh),
        "Exp" => return unary(Unary::Exp),
        "Log" => return unary(Unary::Log),
        "Sqrt" => return unary(Unary::Sqrt),
        "Reciprocal" => return unary(Unary::Reciprocal),
        "Neg" => return unary(Unary::Neg),
        "Abs" => return unary(Unary::Abs),
        "Sign" => return unary(Unary::Sign),
        "Erf" => return unary(Unary::Erf),
        "Floor" => return unary(Unary::Floor),
        "Ceil" => return unary(Unary::Ceil),
        "Round" => return unary(Unary::Round),
        "Sin" => return unary(Unary::Sin),
        "Cos" => return unary(Unary::Cos),
        "Softplus" => return unary(Unary::Softplus),
        "Softsign" => return unary(Unary::Softsign),
        "Not" => return unary(Unary::Not),
        "Tan" => return unary(Unary::Tan),
        "Asin" => return unary(Unary::Asin),
        "Acos" => return unary(Unary::Acos),
        "Atan" => return unary(Unary::Atan),
        "Sinh" => return unary(Unary::Sinh),
        "Cosh" => return unary(Unary::Cosh),
        "Asinh" => return unary(Unary::Asinh),
        "Acosh" => return unary(Unary::Acosh),
        "Atanh" => return unary(Unary::Atanh),
        "Mish" => return unary(Unary::Mish),
        "IsNaN" => return unary(Unary::IsNaN),
        "IsInf" => (|| {
            let neg = node.int_attr("detect_negative", 1)? != 0;
            let pos = node.int_attr("detect_positive", 1)? != 0;
            Ok(Box::new(Unary::IsInf(neg, pos)) as Box<dyn Kernel>)
        })(),
        "Shrink" => (|| Ok(Box::new(Unary::Shrink(f("lambd", 0.5)?, f("bias", 0.0)?)) as Box<dyn Kernel>))(),
        "LeakyRelu" => f("alpha", 0.01).map(|a| Box::new(Unary::LeakyRelu(a)) as Box<dyn Kernel>),
        "Elu" => f("alpha", 1.0).map(|a| Box::new(Unary::Elu(a)) as Box<dyn Kernel>),
        "Celu" => f("alpha", 1.0).map(|a| Box::new(Unary::Celu(a)) as Box<dyn Kernel>),
        "ThresholdedRelu" => f("alpha", 1.0).map(|a| Box::new(Unary::ThresholdedRelu(a)) as Box<dyn Kernel>),
        "HardSigmoid" => {
            (|| Ok(Box::new(Unary::HardSigmoid(f("alpha", 0.2)?, f("beta", 0.5)?)) as Box<dyn Kernel>))()
        }
        "Selu" => {
            (|| Ok(Box::new(Unary::Selu(f("alpha", 1.673_263_2)?, f("gamma", 1.050_701)?)) as Box<dyn Kernel>))(
            )
        }
        "Gelu" => node.string_attr("approximate").map_err(ExecError::from).map(|a| {
            Box::new(if a == Some("tanh") { Unary::GeluTanh } else { Unary::Gelu }) as Box<dyn Kernel>
        }),
        "Add" => Ok(Box::new(Binary::Add)),
        "Sub" => Ok(Box::new(Binary::Sub)),
        "Mul" => Ok(Box::new(Binary::Mul)),
        "Div" => Ok(Box::new(Binary::Div)),
        "Pow" => Ok(Box::new(Binary::Pow)),
        "Mod" => node
            .int_attr("fmod", 0)
            .map_err(ExecError::from)
            .map(|fm| Box::new(Binary::Mod(fm != 0)) as Box<dyn Kernel>),
        "Equal" => Ok(Box::new(Binary::Equal)),
        "Less" => Ok(Box::new(Binary::Less)),
        "LessOrEqual" => Ok(Box::new(Binary::LessOrEqual)),
        "Greater" => Ok(Box::new(Binary::Greater)),
        "GreaterOrEqual" => Ok(Box::new(Binary::GreaterOrEqual)),
        "BitwiseAnd" => Ok(Box::new(Binary::Bitwise(BitOp::And))),
        "BitwiseOr" => Ok(Box::new(Binary::Bitwise(BitOp::Or))),
        "BitwiseXor" => Ok(Box::new(Binary::Bitwise(BitOp::Xor))),
        "BitwiseNot" => return unary(Unary::BitNot),
        "BitShift" => match node.string_attr("direction").map_err(ExecError::from) {
            Ok(Some("LEFT")) => Ok(Box::new(Binary::Bitwise(BitOp::ShiftLeft))),
            Ok(Some("RIGHT")) => Ok(Box::new(Binary::Bitwise(BitOp::ShiftRight))),
            Ok(other) => Err(super::invalid(node, format!("direction {other:?} is not LEFT or RIGHT"))),
            Err(e) => Err(e),
        },
        "And" => Ok(Box::new(Binary::And)),
        "Or" => Ok(Box::new(Binary::Or)),
        "Xor" => Ok(Box::new(Binary::Xor)),
        "PRelu" if opset < 7 => Ok(Box::new(ChannelSlopePRelu)),
        "PRelu" => Ok(Box::new(Binary::PRelu)),
        "Sum" => Ok(Box::new(Variadic::Sum)),
        "Mean" => Ok(Box::new(Variadic::Mean)),
        "Min" => Ok(Box::new(Variadic::Min)),
        "Max" => Ok(Box::new(Variadic::Max)),
        "Where" => Ok(Box::new(WhereOp)),
        "Clip" if opset < 11 => (|| {
            Ok(Box::new(ClipOp { attrs: Some((f("min", f32::MIN)?, f("max", f32::MAX)?)) })
                as Box<dyn Kernel>)
        })(),
        "Clip" => Ok(Box::new(ClipOp { attrs: None })),
        _ => return None,
    };
    Some(built)
}

/// Unary f32 maths (`Neg`, `Abs` and `Sign` also on integers, `Not` on bool).
#[derive(Debug, Clone, Copy)]
enum Unary {
    BitNot,
    Relu,
    Sigmoid,
    HardSwish,
    Tanh,
    Exp,
    Log,
    Sqrt,
    Reciprocal,
    Neg,
    Abs,
    Sign,
    Erf,
    Floor,
    Ceil,
    Round,
    Sin,
    Cos,
    Softplus,
    Softsign,
    Not,
    Tan,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Asinh,
    Acosh,
    Atanh,
    Mish,
    IsNaN,
    IsInf(bool, bool),
    Shrink(f32, f32),
    Gelu,
    GeluTanh,
    LeakyRelu(f32),
    Elu(f32),
    Celu(f32),
    ThresholdedRelu(f32),
    HardSigmoid(f32, f32),
    Selu(f32, f32),
}

/// Applies `f` (then the context's epilogue, if any) to an f32 tensor, in place when the buffer
/// is not shared, in chunks shared evenly among the threads.
fn map_f32(t: Tensor, ctx: &ExecCtx<'_>, f: impl Fn(&mut [f32]) + Sync + Send) -> KernelResult<Tensor> {
    let mut a = into_f32_unique(t)?;
    let s = a.as_slice_mut().ok_or("internal: non-contiguous tensor")?;
    let epilogue = ctx.epilogue;
    let grain = super::even_chunk(ctx, s.len(), 1);
    for_each_chunk_mut(ctx, s, grain, |_, c| {
        f(c);
        if let Some(e) = epilogue {
            e(c);
        }
    });
    Ok(Tensor::F32(a))
}

#[inline(always)]
fn map_slice(s: &mut [f32], f: impl Fn(f32) -> f32) {
    s.iter_mut().for_each(|v| *v = f(*v));
}

qkernels::multiversion! {
    /// A unary op over a slice; the hot ops get their own loop so each vectorises.
    fn unary_slice(op: Unary, s: &mut [f32]) {
        match op {
            Unary::Relu => map_slice(s, |v| if v < 0.0 { 0.0 } else { v }),
            Unary::Sigmoid => map_slice(s, |v| 1.0 / (1.0 + fastmath::exp(-v))),
            Unary::Exp => map_slice(s, fastmath::exp),
            Unary::Erf => map_slice(s, fastmath::erf),
            Unary::Gelu => map_slice(s, |v| 0.5 * v * (1.0 + fastmath::erf(v * std::f32::consts::FRAC_1_SQRT_2))),
            Unary::Sqrt => map_slice(s, f32::sqrt),
            Unary::Neg => map_slice(s, |v| -v),
            Unary::Reciprocal => map_slice(s, |v| 1.0 / v),
            Unary::HardSwish => map_slice(s, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
            Unary::HardSigmoid(a, b) => map_slice(s, |v| (a * v + b).clamp(0.0, 1.0)),
            Unary::LeakyRelu(a) => map_slice(s, |v| if v < 0.0 { a * v } else { v }),
            other => map_slice(s, |v| other.apply(v)),
        }
    }
}

fn map_int<T: Element>(a: &ArcArray<T, IxDyn>, f: impl Fn(T) -> T) -> Tensor {
    T::wrap(a.map(|&v| f(v)).into_shared())
}

impl Kernel for Unary {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = take_input(inputs, 0)?;
        let out = match (*self, &x) {
            (Unary::Not, Tensor::Bool(a)) => map_int(a, |v| !v),
            (Unary::BitNot, x) => {
                fn go<T: Bits>(x: &Tensor) -> KernelResult<Tensor> {
                    Ok(map_int(typed::<T>(x)?, T::not))
                }
                integer!(x.dtype(), go(x))?
            }
            (Unary::Neg, Tensor::I64(a)) => map_int(a, i64::wrapping_neg),
            (Unary::Neg, Tensor::I32(a)) => map_int(a, i32::wrapping_neg),
            (Unary::Neg, Tensor::I8(a)) => map_int(a, i8::wrapping_neg),
            (Unary::Abs, Tensor::I64(a)) => map_int(a, i64::wrapping_abs),
            (Unary::Abs, Tensor::I32(a)) => map_int(a, i32::wrapping_abs),
            (Unary::Abs, Tensor::I8(a)) => map_int(a, i8::wrapping_abs),
            (Unary::Sign, Tensor::I64(a)) => map_int(a, i64::signum),
            (Unary::Sign, Tensor::I32(a)) => map_int(a, i32::signum),
            (Unary::Not, _) => return Err(format!("Not needs a bool tensor, got {}", x.dtype())),
            (Unary::IsNaN, Tensor::F32(a)) => Tensor::Bool(a.map(|v| v.is_nan()).into_shared()),
            (Unary::IsInf(neg, pos), Tensor::F32(a)) => Tensor::Bool(
                a.map(|&v| v.is_infinite() && ((v < 0.0 && neg) || (v > 0.0 && pos))).into_shared(),
            ),
            (op, _) => map_f32(x, ctx, move |s| unary_slice(op, s))?,
        };
        Ok(vec![out])
    }

    fn applies_epilogue(&self) -> bool {
        true
    }
}

impl Unary {
    fn apply(self, v: f32) -> f32 {
        match self {
            Unary::Relu => {
                if v < 0.0 {
                    0.0
                } else {
                    v
                }
            }
            Unary::Sigmoid => 1.0 / (1.0 + fastmath::exp(-v)),
            Unary::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
            Unary::Tanh => v.tanh(),
            Unary::Exp => fastmath::exp(v),
            Unary::Log => v.ln(),
            Unary::Sqrt => v.sqrt(),
            Unary::Reciprocal => 1.0 / v,
            Unary::Neg => -v,
            Unary::Abs => v.abs(),
            Unary::Sign => {
                if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    v
                }
            }
            Unary::Erf => fastmath::erf(v),
            Unary::Floor => v.floor(),
            Unary::Ceil => v.ceil(),
            Unary::Round => v.round_ties_even(),
            Unary::Sin => v.sin(),
            Unary::Cos => v.cos(),
            Unary::Softplus => {
                if v > 20.0 {
                    v
                } else {
                    v.exp().ln_1p()
                }
            }
            Unary::Softsign => v / (1.0 + v.abs()),
            Unary::Not | Unary::BitNot | Unary::IsNaN | Unary::IsInf(..) => v,
            Unary::Tan => v.tan(),
            Unary::Asin => v.asin(),
            Unary::Acos => v.acos(),
            Unary::Atan => v.atan(),
            Unary::Sinh => v.sinh(),
            Unary::Cosh => v.cosh(),
            Unary::Asinh => v.asinh(),
            Unary::Acosh => v.acosh(),
            Unary::Atanh => v.atanh(),
            Unary::Mish => v * (if v > 20.0 { v } else { v.exp().ln_1p() }).tanh(),
            Unary::Shrink(l, b) => {
                if v < -l {
                    v + b
                } else if v > l {
                    v - b
                } else {
                    0.0
                }
            }
            Unary::Gelu => 0.5 * v * (1.0 + fastmath::erf(v * std::f32::consts::FRAC_1_SQRT_2)),
            Unary::GeluTanh => {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044_715 * v * v * v)).tanh())
            }
            Unary::LeakyRelu(a) => {
                if v < 0.0 {
                    a * v
                } else {
                    v
                }
            }
            Unary::Elu(a) => {
                if v < 0.0 {
                    a * (v.exp() - 1.0)
                } else {
                    v
                }
            }
            Unary::Celu(a) => v.max(0.0) + (a * ((v / a).exp() - 1.0)).min(0.0),
            Unary::ThresholdedRelu(a) => {
                if v > a {
                    v
                } else {
                    0.0
                }
            }
            Unary::HardSigmoid(a, b) => (a * v + b).clamp(0.0, 1.0),
            Unary::Selu(a, g) => {
                if v > 0.0 {
                    g * v
                } else {
                    g * (a * v.exp() - a)
                }
            }
        }
    }
}

/// The numpy-broadcast shape of two shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> KernelResult<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= rank { s[i + s.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

/// `a` viewed with the broadcast `shape`.
pub(crate) fn broadcast_to<'a, T>(
    a: &'a ArcArray<T, IxDyn>,
    shape: &[usize],
) -> KernelResult<ArrayViewD<'a, T>> {
    a.broadcast(IxDyn(shape)).ok_or_else(|| format!("shape {:?} does not broadcast to {shape:?}", a.shape()))
}

/// `f` applied pairwise over the broadcast of `a` and `b`.
pub(crate) fn zip_broadcast<A: Copy, B: Copy, O>(
    a: &ArcArray<A, IxDyn>,
    b: &ArcArray<B, IxDyn>,
    f: impl Fn(A, B) -> O,
) -> KernelResult<ArrayD<O>> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let (av, bv) = (broadcast_to(a, &shape)?, broadcast_to(b, &shape)?);
    Ok(Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y)))
}

/// The bitwise binary ops on integers.
#[derive(Debug, Clone, Copy)]
enum BitOp {
    And,
    Or,
    Xor,
    ShiftLeft,
    ShiftRight,
}

impl BitOp {
    fn apply<T: Bits>(self, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
        let (a, b) = (typed::<T>(a)?, typed::<T>(b)?);
        Ok(wrap(zip_broadcast(a, b, |x, y| match self {
            BitOp::And => x.and(y),
            BitOp::Or => x.or(y),
            BitOp::Xor => x.xor(y),
            BitOp::ShiftLeft => x.shl(y),
            BitOp::ShiftRight => x.shr(y),
        })?))
    }
}

/// Binary ops with numpy broadcasting.
#[derive(Debug, Clone, Copy)]
enum Binary {
    Bitwise(BitOp),
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Mod(bool),
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
    PRelu,
}

impl Binary {
    /// The f32 engine's version of this op, if it has one.
    fn f32_op(self) -> Option<F32Op> {
        Some(match self {
            Binary::Add => F32Op::Add,
            Binary::Sub => F32Op::Sub,
            Binary::Mul => F32Op::Mul,
            Binary::Div => F32Op::Div,
            Binary::Pow => F32Op::Pow,
            Binary::PRelu => F32Op::PRelu,
            _ => return None,
        })
    }

    fn arith<T: Arith>(self, a: T, b: T) -> T {
        match self {
            Binary::Add => a.add(b),
            Binary::Sub => a.sub(b),
            Binary::Mul => a.mul(b),
            Binary::Div => a.div(b),
            Binary::Mod(fmod) => a.rem(b, fmod),
            Binary::PRelu => {
                if a < T::default() {
                    a.mul(b)
                } else {
                    a
                }
            }
            _ => T::from_f64(a.to_f64().powf(b.to_f64())),
        }
    }

    fn compare<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Binary::Equal => a == b,
            Binary::Less => a < b,
            Binary::LessOrEqual => a <= b,
            Binary::Greater => a > b,
            _ => a >= b,
        }
    }

    fn arith_typed<T: Arith>(self, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
        let (a, b) = (typed::<T>(a)?, typed::<T>(b)?);
        Ok(wrap(zip_broadcast(a, b, |x, y| self.arith(x, y))?))
    }

    fn compare_typed<T: Element + PartialOrd>(self, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
        let (a, b) = (typed::<T>(a)?, typed::<T>(b)?);
        Ok(wrap(zip_broadcast(a, b, |x, y| self.compare(x, y))?))
    }
}

qkernels::multiversion! {
    /// `x^e` for a scalar exponent, with the common exponents as plain arithmetic.
    fn pow_scalar(s: &mut [f32], e: f32) {
        match e {
            1.0 => {}
            2.0 => map_slice(s, |v| v * v),
            3.0 => map_slice(s, |v| v * v * v),
            0.5 => map_slice(s, f32::sqrt),
            -1.0 => map_slice(s, |v| 1.0 / v),
            _ => map_slice(s, |v| v.powf(e)),
        }
    }
}

/// `PRelu` before opset 7, whose slope of shape `[C]` applies per channel (axis 1) rather than
/// broadcasting against the last axis, as opset-6 exporters (and onnxruntime) treat it.
struct ChannelSlopePRelu;

impl Kernel for ChannelSlopePRelu {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        fused: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let rank = input(inputs, 0)?.shape().len();
        if let Some(slot) = inputs.get_mut(1)
            && let Some(slope) = slot.take()
        {
            let per_channel = rank > 2 && slope.shape().len() == 1 && slope.len() > 1;
            *slot = Some(if per_channel {
                let mut shape = vec![slope.len()];
                shape.resize(rank - 1, 1);
                super::movement::reshape(slope, &shape)?
            } else {
                slope
            });
        }
        Binary::PRelu.run(inputs, ctx, fused)
    }
}

impl Kernel for Binary {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let op = *self;
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        let out = match op {
            Binary::Bitwise(bit) => {
                super::same_dtype(a.dtype(), b.dtype())?;
                fn go<T: Bits>(bit: BitOp, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
                    bit.apply::<T>(a, b)
                }
                integer!(a.dtype(), go(bit, a, b))?
            }
            Binary::And | Binary::Or | Binary::Xor => {
                let (a, b) = (typed::<bool>(a)?, typed::<bool>(b)?);
                wrap(zip_broadcast(a, b, |x, y| match op {
                    Binary::And => x && y,
                    Binary::Or => x || y,
                    _ => x ^ y,
                })?)
            }
            Binary::Equal | Binary::Less | Binary::LessOrEqual | Binary::Greater | Binary::GreaterOrEqual => {
                super::same_dtype(a.dtype(), b.dtype())?;
                match a.dtype() {
                    DType::Bool => op.compare_typed::<bool>(a, b)?,
                    d => {
                        let f = |a: &Tensor, b: &Tensor| -> KernelResult<Tensor> {
                            fn go<T: Arith>(op: Binary, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
                                op.compare_typed::<T>(a, b)
                            }
                            numeric!(d, go(op, a, b))
                        };
                        f(a, b)?
                    }
                }
            }
            Binary::Pow if a.dtype() != b.dtype() => {
                let exp = Tensor::from_vec(b.shape(), b.to_f64_vec()).ok_or("bad exponent")?;
                fn go<T: Arith>(a: &Tensor, e: &Tensor) -> KernelResult<Tensor> {
                    let (a, e) = (typed::<T>(a)?, typed::<f64>(e)?);
                    Ok(wrap(zip_broadcast(a, e, |x, y| T::from_f64(x.to_f64().powf(y)))?))
                }
                numeric!(a.dtype(), go(a, &exp))?
            }
            Binary::Pow if a.dtype() == DType::F32 && b.dtype() == DType::F32 && b.len() == 1 => {
                let e = typed::<f32>(b)?.iter().next().copied().unwrap_or(1.0);
                let x = take_input(inputs, 0)?;
                map_f32(x, ctx, move |s| pow_scalar(s, e))?
            }
            _ if a.dtype() == DType::F32 && b.dtype() == DType::F32 && op.f32_op().is_some() => {
                let fop = op.f32_op().ok_or("internal")?;
                let plan = Plan::new(a.shape(), b.shape())?;
                let b = b.clone();
                let bs = super::f32_data(&b)?;
                // In bands of whole rows, in parallel, each quantized (the epilogue) while in cache.
                let row = plan.row_len().max(1);
                let band = row * (BAND_ELEMENTS / row).max(1);
                let epilogue = ctx.epilogue;
                let run = |a: &[f32], out: &mut [f32], a_is_out: bool| {
                    for_each_chunk_mut(ctx, out, band, |start, c| {
                        for (k, part) in c.chunks_mut(band).enumerate() {
                            plan.run_rows(fop, a, &bs, part, (start + k * band) / row, a_is_out);
                            if let Some(e) = epilogue {
                                e(part);
                            }
                        }
                    })
                };
                if plan.shape == a.shape() {
                    let mut a = into_f32_unique(take_input(inputs, 0)?)?;
                    run(&[], a.as_slice_mut().ok_or("internal")?, true);
                    return Ok(vec![Tensor::F32(a)]);
                }
                let mut out = ctx.pool.take(plan.len());
                run(&super::f32_data(a)?, &mut out, false);
                return Ok(vec![out.into_tensor(&plan.shape)?]);
            }
            _ => {
                super::same_dtype(a.dtype(), b.dtype())?;
                fn go<T: Arith>(op: Binary, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
                    op.arith_typed::<T>(a, b)
                }
                numeric!(a.dtype(), go(op, a, b))?
            }
        };
        // The paths above that do not fuse the epilogue apply it to the whole f32 result.
        match (ctx.epilogue, out) {
            (Some(e), out @ Tensor::F32(_)) => {
                Ok(vec![map_f32(out, &ExecCtx { epilogue: None, ..*ctx }, e)?])
            }
            (_, out) => Ok(vec![out]),
        }
    }

    fn applies_epilogue(&self) -> bool {
        true
    }
}

/// Elements per band of a broadcasting f32 binary op: a band is computed, then quantized by the
/// hook's epilogue, while it is in cache.
const BAND_ELEMENTS: usize = 1 << 14;

/// Variadic broadcasting reductions over inputs.
#[derive(Debug, Clone, Copy)]
enum Variadic {
    Sum,
    Mean,
    Min,
    Max,
}

impl Kernel for Variadic {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let present: Vec<&Tensor> = inputs.iter().flatten().collect();
        let first = *present.first().ok_or("needs at least one input")?;
        fn go<T: Arith>(op: Variadic, ts: &[&Tensor]) -> KernelResult<Tensor> {
            let mut acc = typed::<T>(ts[0])?.clone();
            for t in &ts[1..] {
                let b = typed::<T>(t)?;
                acc = zip_broadcast(&acc, b, |x, y| match op {
                    Variadic::Sum | Variadic::Mean => x.add(y),
                    Variadic::Min => {
                        if y < x || y.is_nan() {
                            y
                        } else {
                            x
                        }
                    }
                    Variadic::Max => {
                        if y > x || y.is_nan() {
                            y
                        } else {
                            x
                        }
                    }
                })?
                .into_shared();
            }
            if let Variadic::Mean = op {
                let n = T::from_f64(ts.len() as f64);
                acc = acc.map(|&v| v.div(n)).into_shared();
            }
            Ok(wrap(acc.into_owned()))
        }
        Ok(vec![numeric!(first.dtype(), go(*self, &present))?])
    }
}

/// `Where(cond, x, y)` with three-way broadcasting, any element type.
struct WhereOp;

impl Kernel for WhereOp {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let c = typed::<bool>(input(inputs, 0)?)?;
        let (x, y) = (input(inputs, 1)?, input(inputs, 2)?);
        super::same_dtype(x.dtype(), y.dtype())?;
        let shape = broadcast_shape(&broadcast_shape(c.shape(), x.shape())?, y.shape())?;
        let cv = broadcast_to(c, &shape)?;
        let out = with_dtype!(x.dtype(), T => {
            let (xv, yv) = (broadcast_to(typed::<T>(x)?, &shape)?, broadcast_to(typed::<T>(y)?, &shape)?);
            wrap(Zip::from(&cv).and(&xv).and(&yv).map_collect(|&c, &a, &b| if c { a } else { b }))
        });
        Ok(vec![out])
    }
}

/// `Clip`: bounds from attributes (opset < 11) or from optional inputs.
struct ClipOp {
    attrs: Option<(f32, f32)>,
}

impl Kernel for ClipOp {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let bound = |slot: usize| -> KernelResult<Option<f64>> {
            match opt_input(inputs, slot) {
                None => Ok(None),
                Some(t) if t.len() == 1 => Ok(t.to_f64_vec().first().copied()),
                Some(t) => Err(format!("Clip bound {slot} must be a scalar, got shape {:?}", t.shape())),
            }
        };
        let (lo, hi) = match self.attrs {
            Some((lo, hi)) => (Some(f64::from(lo)), Some(f64::from(hi))),
            None => (bound(1)?, bound(2)?),
        };
        let x = take_input(inputs, 0)?;
        let out = if x.dtype() == DType::F32 {
            let lo = lo.map_or(f32::NEG_INFINITY, |v| v as f32);
            let hi = hi.map_or(f32::INFINITY, |v| v as f32);
            map_f32(x, ctx, move |s| super::clamp_slice(s, lo, hi))?
        } else {
            fn go<T: Arith>(x: &Tensor, lo: Option<f64>, hi: Option<f64>) -> KernelResult<Tensor> {
                let (lo, hi) = (lo.map(T::from_f64), hi.map(T::from_f64));
                Ok(map_int(typed::<T>(x)?, |v| {
                    let v = match lo {
                        Some(l) if v < l => l,
                        _ => v,
                    };
                    match hi {
                        Some(h) if v > h => h,
                        _ => v,
                    }
                }))
            }
            numeric!(x.dtype(), go(&x, lo, hi))?
        };
        Ok(vec![out])
    }

    fn applies_epilogue(&self) -> bool {
        true
    }
}

/// The activation of a `Relu` or `Clip` node whose bounds are static, for fusing into its
/// producer; `None` for anything else.
pub(crate) fn fusable_activation(
    node: &Node,
    opset: i64,
    bound: impl Fn(usize) -> Option<f32>,
) -> Option<Activation> {
    match node.op_type.as_str() {
        "Relu" => Some(Activation::Relu),
        "Clip" if opset < 11 => Some(Activation::Clip(
            node.float_attr("min", f32::MIN).ok()?,
            node.float_attr("max", f32::MAX).ok()?,
        )),
        "Clip" => {
            let get = |slot: usize, default: f32| match node.inputs().get(slot).copied().flatten() {
                None => Some(default),
                Some(_) => bound(slot),
            };
            Some(Activation::Clip(get(1, f32::NEG_INFINITY)?, get(2, f32::INFINITY)?))
        }
        _ => None,
    }
}

//! The op registry: one compiled `Kernel` per node, built from the node's attributes before any
//! tensor flows (so an unsupported op or a bad attribute is reported at planning time), plus the
//! small tensor helpers every kernel family shares.

mod arith;
mod broadcast;
mod control;
mod conv;
mod conv_nd;
mod deform_conv;
mod depthwise;
mod detection;
mod einsum;
mod elementwise;
mod image;
mod indexing;
mod integer;
mod loss;
pub(crate) mod matmul;
mod ml;
mod movement;
mod norm;
mod pool;
mod quant;
mod recurrent;
mod reduce;
mod resize;
mod sampling;
mod signal;
mod tfidf;
mod tree_ensemble;
mod widen;

pub(crate) use elementwise::fusable_activation;

use ndarray::{ArcArray, ArrayD, IxDyn};
use qgraph::{DType, Element, Node, Tensor};

use crate::buffers::BufferPool;
use crate::error::{ExecError, KernelResult, Result};

/// What a kernel may use while running: the thread budget and buffer pool of the session, and the
/// epilogue to apply to its (first) output, for kernels that support one.
#[derive(Clone, Copy)]
pub(crate) struct ExecCtx<'a> {
    /// Worker threads available (1 = run everything on the calling thread).
    pub threads: usize,
    /// Recycled output buffers.
    pub pool: &'a BufferPool,
    /// Applied to every finished part of the output (only given to kernels whose
    /// [`Kernel::applies_epilogue`] is true).
    pub epilogue: Option<crate::hook::Epilogue<'a>>,
    /// The largest tensor a kernel may create, in bytes (`SessionOptions::max_tensor_bytes`).
    pub max_bytes: usize,
}

impl ExecCtx<'_> {
    /// The same context restricted to the calling thread.
    pub fn single_threaded(&self) -> Self {
        ExecCtx { threads: 1, ..*self }
    }

    /// The element count of an output of `shape` (`elem` bytes each), or an error when it does
    /// not fit the session's memory limit: kernels whose output size comes from data (repeats,
    /// pads, target shapes) call it before they allocate.
    pub fn checked_len(&self, shape: &[usize], elem: usize) -> KernelResult<usize> {
        crate::memory::check(shape, elem, self.max_bytes)
    }

    /// [`ExecCtx::checked_len`] for dims given as signed integers; negative ones are refused.
    pub fn checked_shape(&self, dims: &[i64], elem: usize) -> KernelResult<Vec<usize>> {
        crate::memory::check_signed(dims, elem, self.max_bytes)
    }

    /// The `gemm` parallelism for one large product.
    pub fn gemm_parallelism(&self) -> gemm::Parallelism {
        if self.threads > 1 { gemm::Parallelism::Rayon(self.threads) } else { gemm::Parallelism::None }
    }
}

/// An elementwise activation a producing kernel (Conv, ConvTranspose, Gemm) can apply to its
/// output before writing it, instead of a separate pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, lo), hi)`.
    Clip(f32, f32),
}

impl Activation {
    /// The activation as clamp bounds; no activation is (−∞, ∞).
    pub fn bounds(act: Option<Activation>) -> (f32, f32) {
        match act {
            Some(Activation::Relu) => (0.0, f32::INFINITY),
            Some(Activation::Clip(lo, hi)) => (lo, hi),
            None => (f32::NEG_INFINITY, f32::INFINITY),
        }
    }

    /// Applies the activation to every element.
    pub fn apply(self, out: &mut [f32]) {
        let (lo, hi) = Activation::bounds(Some(self));
        clamp_slice(out, lo, hi);
    }
}

qkernels::multiversion! {
    /// `v` limited to `[lo, hi]` for every element; NaN stays NaN.
    pub(crate) fn clamp_slice(out: &mut [f32], lo: f32, hi: f32) {
        out.iter_mut().for_each(|v| *v = clamp_keep_nan(*v, lo, hi));
    }
}

/// `v` limited to `[lo, hi]` (`lo` where `v < lo`, else `hi` where `v > hi`); NaN stays NaN
/// (unlike `f32::clamp` with `max`/`min`, and with no range assertion). Written as two selects
/// on `v`, which vectorise even inside register blocks, where nested branches stay scalar.
#[inline(always)]
pub(crate) fn clamp_keep_nan(v: f32, lo: f32, hi: f32) -> f32 {
    let below_hi = if v > hi { hi } else { v };
    if v < lo { lo } else { below_hi }
}

/// A compiled op. `inputs` holds the node's inputs (`None` for omitted optional ones); a kernel
/// may take an input out and reuse its buffer, which is free of copies when the session handed
/// over the last reference.
pub(crate) trait Kernel: Send + Sync {
    /// Computes the node's outputs.
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        fused: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>>;

    /// Whether the kernel applies a fused activation (see [`Activation`]).
    fn fuses_activation(&self) -> bool {
        false
    }

    /// Whether the kernel applies `ExecCtx::epilogue` to its whole first output when that output
    /// is f32.
    fn applies_epilogue(&self) -> bool {
        false
    }
}

/// Builds the kernel of `node` for the given default-domain opset.
pub(crate) fn compile(node: &Node, opset: i64) -> Result<Box<dyn Kernel>> {
    let unsupported = || ExecError::UnsupportedOp {
        op: node.op_type.clone(),
        node: node.name.clone(),
        domain: if node.is_onnx_domain() { String::new() } else { format!("{}::", node.domain) },
        opset,
    };
    if !node.is_onnx_domain() {
        return match ml::compile(node).or_else(|| tree_ensemble::compile(node)) {
            Some(kernel) => kernel.map(|k| Box::new(widen::ThroughF32(k)) as Box<dyn Kernel>),
            None => Err(unsupported()),
        };
    }
    let built = elementwise::compile(node, opset)
        .or_else(|| movement::compile(node, opset))
        .or_else(|| conv::compile(node))
        .or_else(|| pool::compile(node))
        .or_else(|| matmul::compile(node))
        .or_else(|| norm::compile(node, opset))
        .or_else(|| reduce::compile(node, opset))
        .or_else(|| resize::compile(node, opset))
        .or_else(|| quant::compile(node))
        .or_else(|| indexing::compile(node))
        .or_else(|| integer::compile(node))
        .or_else(|| sampling::compile(node))
        .or_else(|| detection::compile(node))
        .or_else(|| einsum::compile(node))
        .or_else(|| deform_conv::compile(node))
        .or_else(|| tfidf::compile(node))
        .or_else(|| image::compile(node))
        .or_else(|| loss::compile(node))
        .or_else(|| signal::compile(node, opset))
        .or_else(|| recurrent::compile(node))
        .or_else(|| control::compile(node, opset));
    match built {
        Some(kernel) => {
            kernel.map(|k| Box::new(widen::ThroughF32(k)) as Box<dyn Kernel>).map_err(|e| match e {
                ExecError::Graph(qgraph::GraphError::Unsupported { detail }) => invalid(node, detail),
                other => other,
            })
        }
        None => Err(unsupported()),
    }
}

/// The largest magnitude a size attribute (kernel, strides, dilations, pads, output padding or
/// shape) may have: 2³¹ − 1, so a window's geometry in i64 cannot overflow.
const SIZE_ATTRIBUTE_BOUND: u64 = i32::MAX as u64;

/// Refuses a window op whose size attributes among `names` exceed [`SIZE_ATTRIBUTE_BOUND`].
pub(crate) fn check_size_attributes(node: &Node, names: &[&str]) -> Result<()> {
    for &name in names {
        if let Some(v) =
            node.ints_attr(name)?.filter(|v| v.iter().any(|x| x.unsigned_abs() > SIZE_ATTRIBUTE_BOUND))
        {
            return Err(invalid(node, format!("{name} {v:?} beyond ±{SIZE_ATTRIBUTE_BOUND}")));
        }
    }
    Ok(())
}

/// The most elementary steps (multiply-adds, taps) one node of the ops without a fast path
/// (`Einsum`, `DFT`/`STFT`, `RoiAlign`, `GridSample`) may take: about a minute of work, so a
/// hostile shape gets an error instead of a hang.
const MAX_NAIVE_STEPS: u128 = 1 << 36;

/// Refuses `steps` elementary steps beyond [`MAX_NAIVE_STEPS`].
pub(crate) fn bounded_steps(steps: u128, what: &str) -> KernelResult<()> {
    if steps > MAX_NAIVE_STEPS {
        return Err(format!("{what} needs {steps} steps, beyond the limit of {MAX_NAIVE_STEPS}"));
    }
    Ok(())
}

/// An `ExecError::Invalid` for `node`.
pub(crate) fn invalid(node: &Node, detail: impl Into<String>) -> ExecError {
    ExecError::Invalid { node: node.name.clone(), op: node.op_type.clone(), detail: detail.into() }
}

/// Runs `$body` with `$T` bound to the element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            qgraph::DType::F32 => {
                type $T = f32;
                $body
            }
            qgraph::DType::F64 => {
                type $T = f64;
                $body
            }
            qgraph::DType::F16 => {
                type $T = half::f16;
                $body
            }
            qgraph::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            qgraph::DType::I8 => {
                type $T = i8;
                $body
            }
            qgraph::DType::U8 => {
                type $T = u8;
                $body
            }
            qgraph::DType::I16 => {
                type $T = i16;
                $body
            }
            qgraph::DType::U16 => {
                type $T = u16;
                $body
            }
            qgraph::DType::I32 => {
                type $T = i32;
                $body
            }
            qgraph::DType::U32 => {
                type $T = u32;
                $body
            }
            qgraph::DType::I64 => {
                type $T = i64;
                $body
            }
            qgraph::DType::U64 => {
                type $T = u64;
                $body
            }
            qgraph::DType::Bool => {
                type $T = bool;
                $body
            }
            qgraph::DType::I4 => {
                type $T = qgraph::Int4;
                $body
            }
            qgraph::DType::U4 => {
                type $T = qgraph::UInt4;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

/// Input `slot`, which the op requires.
pub(crate) fn input(inputs: &[Option<Tensor>], slot: usize) -> KernelResult<&Tensor> {
    inputs.get(slot).and_then(Option::as_ref).ok_or_else(|| format!("input {slot} is missing"))
}

/// Input `slot` if present.
pub(crate) fn opt_input(inputs: &[Option<Tensor>], slot: usize) -> Option<&Tensor> {
    inputs.get(slot).and_then(Option::as_ref)
}

/// Takes input `slot` out of the list (so its buffer can be reused).
pub(crate) fn take_input(inputs: &mut [Option<Tensor>], slot: usize) -> KernelResult<Tensor> {
    inputs.get_mut(slot).and_then(Option::take).ok_or_else(|| format!("input {slot} is missing"))
}

/// The array of `t` as element type `T`, or an error naming both dtypes.
pub(crate) fn typed<T: Element>(t: &Tensor) -> KernelResult<&ArcArray<T, IxDyn>> {
    T::unwrap(t).ok_or_else(|| format!("expected a {} tensor, got {}", T::DTYPE, t.dtype()))
}

/// The f32 elements of `t` in row-major order (copied only if `t` is not in standard layout).
pub(crate) fn f32_data(t: &Tensor) -> KernelResult<std::borrow::Cow<'_, [f32]>> {
    let a = typed::<f32>(t)?;
    Ok(match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().copied().collect()),
    })
}

/// An owned, uniquely held, standard-layout f32 array made from `t` (no copy when `t` was the
/// last reference to a standard-layout buffer).
pub(crate) fn into_f32_unique(t: Tensor) -> KernelResult<ArcArray<f32, IxDyn>> {
    match t {
        Tensor::F32(a) if a.is_standard_layout() => Ok(a),
        Tensor::F32(a) => Ok(a.as_standard_layout().into_owned().into_shared()),
        other => Err(format!("expected a float tensor, got {}", other.dtype())),
    }
}

/// Integer elements of an index/shape tensor.
pub(crate) fn ints_of(t: &Tensor) -> KernelResult<Vec<i64>> {
    t.to_i64_vec().ok_or_else(|| format!("expected an integer tensor, got {}", t.dtype()))
}

/// Row-major strides of `shape`.
pub(crate) fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The elements of `a` in row-major order (copied only if `a` is not in standard layout).
pub(crate) fn contiguous<T: Element>(a: &ArcArray<T, IxDyn>) -> std::borrow::Cow<'_, [T]> {
    match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().copied().collect()),
    }
}

/// A tensor from a shape and row-major data.
pub(crate) fn tensor_from<T: Element>(shape: &[usize], data: Vec<T>) -> KernelResult<Tensor> {
    let len = data.len();
    Tensor::from_vec(shape, data).ok_or_else(|| format!("internal: {len} elements for shape {shape:?}"))
}

/// A standard-layout array wrapped as a tensor.
pub(crate) fn wrap<T: Element>(a: ArrayD<T>) -> Tensor {
    let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
    T::wrap(a.into_shared())
}

/// `axis` (possibly negative) normalised for a tensor of `rank`.
pub(crate) fn norm_axis(axis: i64, rank: usize) -> KernelResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

/// A chunk length for [`for_each_chunk_mut`] over `len` elements, in whole units of `unit`
/// elements (rows): the work shared evenly among the threads, at most 64 Ki elements a chunk (it
/// stays in cache) and at least 4 Ki where a unit allows (a task is worth its dispatch). A
/// transformer's batch-1 GELU input is 72 Ki elements: fixed 64 Ki chunks left one thread idle.
pub(crate) fn even_chunk(ctx: &ExecCtx<'_>, len: usize, unit: usize) -> usize {
    let unit = unit.max(1);
    let most = ((1 << 16) / unit).max(1);
    let least = ((1 << 12) / unit).clamp(1, most);
    (len / unit).div_ceil(ctx.threads.max(1)).clamp(least, most) * unit
}

/// Splits `0..len` into chunks of about `grain` and runs `f` on each, in parallel when the
/// context has more than one thread.
pub(crate) fn for_each_chunk_mut<T: Send>(
    ctx: &ExecCtx<'_>,
    data: &mut [T],
    grain: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    use rayon::prelude::*;
    let grain = grain.max(1);
    if ctx.threads > 1 && data.len() > grain {
        data.par_chunks_mut(grain).enumerate().for_each(|(i, c)| f(i * grain, c));
    } else {
        f(0, data);
    }
}

/// Checks that `t` has the given rank.
pub(crate) fn expect_rank(t: &Tensor, rank: usize, what: &str) -> KernelResult<()> {
    if t.shape().len() != rank {
        return Err(format!("{what} must have rank {rank}, got shape {:?}", t.shape()));
    }
    Ok(())
}

/// Whether two dtypes agree, as an error otherwise.
pub(crate) fn same_dtype(a: DType, b: DType) -> KernelResult<()> {
    if a == b { Ok(()) } else { Err(format!("operands have different dtypes {a} and {b}")) }
}

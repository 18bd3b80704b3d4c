//! Other float types through f32 kernels: when a kernel refuses a float16, bfloat16 or float64
//! input, the node runs again with those inputs converted to f32 (exactly, for the 16-bit types)
//! and its f32 outputs converted back to the input's type — so a float16 model runs with float16
//! tensors at every op boundary, as onnxruntime's CPU kernels compute most float16 ops. A float64
//! tensor keeps f32 precision inside such an op.

use half::{bf16, f16};
use qgraph::{DType, Tensor};

use super::{Activation, ExecCtx, Kernel};
use crate::error::KernelResult;

/// A kernel that falls back to f32 for the other float types.
pub(super) struct ThroughF32(pub Box<dyn Kernel>);

fn is_other_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F64)
}

fn to_f32(t: &Tensor) -> Option<Tensor> {
    let a = match t {
        Tensor::F16(a) => a.mapv(f16::to_f32),
        Tensor::BF16(a) => a.mapv(bf16::to_f32),
        Tensor::F64(a) => a.mapv(|v| v as f32),
        _ => return None,
    };
    Some(Tensor::F32(a.into_shared()))
}

fn from_f32(t: Tensor, to: DType) -> Tensor {
    match (t, to) {
        (Tensor::F32(a), DType::F16) => Tensor::F16(a.mapv(f16::from_f32).into_shared()),
        (Tensor::F32(a), DType::BF16) => Tensor::BF16(a.mapv(bf16::from_f32).into_shared()),
        (Tensor::F32(a), DType::F64) => Tensor::F64(a.mapv(f64::from).into_shared()),
        (t, _) => t,
    }
}

impl Kernel for ThroughF32 {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        fused: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let Some(target) = inputs.iter().flatten().map(Tensor::dtype).find(|&d| is_other_float(d)) else {
            return self.0.run(inputs, ctx, fused);
        };
        // The kernel may handle the type itself: try it on shared copies first.
        let mut copies = inputs.to_vec();
        let first = match self.0.run(&mut copies, ctx, fused) {
            Ok(outs) => return Ok(outs),
            Err(e) => e,
        };
        let mut widened: Vec<Option<Tensor>> =
            inputs.iter().map(|t| t.as_ref().map(|t| to_f32(t).unwrap_or_else(|| t.clone()))).collect();
        let plain = ExecCtx { epilogue: None, ..*ctx };
        match self.0.run(&mut widened, &plain, fused) {
            Ok(outs) => Ok(outs.into_iter().map(|t| from_f32(t, target)).collect()),
            Err(_) => Err(first),
        }
    }

    fn fuses_activation(&self) -> bool {
        self.0.fuses_activation()
    }

    fn applies_epilogue(&self) -> bool {
        self.0.applies_epilogue()
    }
}

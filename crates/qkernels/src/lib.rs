//! `qkernels`: fake-quant kernels for int4..int16 and fp16/bf16, statistics (min/max, histograms)
//! and error metrics (MSE, SQNR, PSNR), each with a scalar reference and SIMD bodies behind runtime
//! dispatch. A leaf crate: it depends on no other crate of the workspace.
//!
//! Status: placeholder; the kernels arrive with the `qkernels` issue.
#![forbid(unsafe_code)]

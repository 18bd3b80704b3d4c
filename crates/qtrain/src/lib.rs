//! `qtrain`: quantization-aware training of ONNX models on a `qcalib` simulation, with `qgrad`'s
//! whole-graph gradients — AIMET's regular QAT (weights learn, weight encodings follow them) and
//! QAT with range learning (every quantizer's scale and offset learn too), with labels
//! (cross-entropy) or without (distillation from the FP32 model), checkpointed every epoch and
//! resumable.
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod augment;
mod checkpoint;
mod error;
mod loss;
mod qat;

pub use augment::{Augmentation, ImageLayout};
pub use error::{Result, TrainError};
pub use loss::Objective;
pub use qat::{
    EpochRecord, Evaluate, Progress, QatMode, QatOptions, QatReport, Schedule, TrainingData,
    kept_bytes_per_sample, train,
};

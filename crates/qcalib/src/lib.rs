//! `qcalib`: quantization simulation as AIMET defines it — quantizer placement from an
//! AIMET-compatible quantsim config, calibration schemes, encodings, the QuantSim itself, and
//! export (AIMET encodings JSON).
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod checksum;
mod config;
mod converts;
mod encodings;
mod error;
mod lpbq;
mod overrides;
mod patterns;
mod placement;
mod qdq;
mod quark;
mod schemes;
mod sim;
mod stats_file;
mod subgraph_read_guard;

pub use checksum::{feeds_checksum, tensors_checksum};
pub use config::{
    Defaults, Kernel, KernelPrecision, OpRule, ParamRule, QuantsimConfig, RangeConstraint,
    parse_supported_kernels,
};
pub use converts::{FloatGrid, PrecisionConvert, precision_converts};
pub use encodings::{
    EncodingVersion, LoadOptions, LoadedEncoding, encodings_json, freeze_encodings, load_encodings,
    parse_encodings, read_encodings, to_pretty_json, write_encodings,
};
pub use error::{CalibError, Result};
pub use overrides::{AppliedPlan, apply_tensor_quant_overrides, tensor_quant_overrides};
pub use patterns::CHANNEL_CLIP_MARK;
pub use placement::{
    BlockLayout, DefaultPrecision, GRID_PRESERVING_OPS, Granularity, LearnedEncodings, Placement, Precision,
    QuantizedTensor, Quantizer, QuantizerId, TensorRole,
};
pub use qdq::{QdqOptions, to_qdq_model, write_qdq_model};
pub use qkernels::Rounding;
pub use quark::{apply_plan, apply_quark_config, quark_config};
pub use schemes::{ChannelStats, ENTROPY_BINS, Scheme, encoding_from_fixed_range};
pub use sim::{Feeds, QuantSim, QuantizerStats, SimOptions, TrainingRun, encoding_index, split_by_encoding};
pub use stats_file::{
    ChannelEntry, FineHistogramEntry, HistogramEntry, QuantizerEntry, StatsFile, load_stats, save_stats,
};

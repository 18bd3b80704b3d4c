//! `qcalib`: quantizer placement from an AIMET-compatible quantsim config, calibration schemes,
//! encodings, the QuantSim itself, and export (AIMET encodings JSON, QDQ ONNX).
//!
//! Status: placeholder; arrives with the `qcalib` issue.
#![forbid(unsafe_code)]

//! libFuzzer target: arbitrary bytes as an ONNX model through the loader, shape inference,
//! planning and a run (`quantkit::fuzzing::exercise`); the first eight bytes also pick the hostile
//! encodings values. Any panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let variant = data.iter().take(8).fold(0u64, |v, &b| (v << 8) | u64::from(b));
    let _ = quantkit::fuzzing::exercise(data, variant);
});

//! Element types the IR understands, with their ONNX `TensorProto.DataType` codes.

use std::fmt;

/// Element type of a tensor or value. Codes follow `onnx.TensorProto.DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float.
    F64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// Boolean, one byte per element.
    Bool,
    /// Signed 4-bit integer (−8..=7): one byte per element in memory, two per byte in ONNX files.
    I4,
    /// Unsigned 4-bit integer (0..=15): one byte per element in memory, two per byte in ONNX files.
    U4,
}

impl DType {
    /// The dtype of an ONNX `TensorProto.DataType` code, or `None` for codes the IR does not hold
    /// (strings, complex numbers, 8-bit float types).
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            16 => DType::BF16,
            21 => DType::U4,
            22 => DType::I4,
            _ => return None,
        })
    }

    /// The ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
            DType::U4 => 21,
            DType::I4 => 22,
        }
    }

    /// Bytes per element in memory, and in ONNX raw (little-endian) storage except for the
    /// 4-bit types, which files pack two to a byte (see [`DType::raw_len`]).
    pub fn size_of(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool | DType::I4 | DType::U4 => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// Bytes that `count` elements take in ONNX raw storage; `None` on overflow.
    pub fn raw_len(self, count: usize) -> Option<usize> {
        match self {
            DType::I4 | DType::U4 => Some(count.div_ceil(2)),
            other => count.checked_mul(other.size_of()),
        }
    }

    /// Whether the dtype is a floating-point type (the ones quantizers attach to).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    /// Whether the dtype is an integer type (bool excluded).
    pub fn is_integer(self) -> bool {
        !self.is_float() && self != DType::Bool
    }

    /// The ONNX spelling, as in `tensor(float)`.
    pub fn onnx_name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::Bool => "bool",
            DType::I4 => "int4",
            DType::U4 => "uint4",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.onnx_name())
    }
}

/// The name of an ONNX dtype code the IR cannot hold, for error messages.
pub fn onnx_code_name(code: i32) -> String {
    match code {
        0 => "UNDEFINED".into(),
        8 => "STRING".into(),
        14 => "COMPLEX64".into(),
        15 => "COMPLEX128".into(),
        17 => "FLOAT8E4M3FN".into(),
        18 => "FLOAT8E4M3FNUZ".into(),
        19 => "FLOAT8E5M2".into(),
        20 => "FLOAT8E5M2FNUZ".into(),
        other => DType::from_onnx(other).map_or_else(|| format!("code {other}"), |d| d.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_codes_round_trip() {
        for code in 0..32 {
            if let Some(d) = DType::from_onnx(code) {
                assert_eq!(d.onnx_code(), code);
            }
        }
        assert_eq!(DType::from_onnx(8), None);
        assert_eq!(onnx_code_name(8), "STRING");
        assert_eq!(DType::from_onnx(22), Some(DType::I4));
        assert_eq!(DType::I4.raw_len(5), Some(3));
    }
}

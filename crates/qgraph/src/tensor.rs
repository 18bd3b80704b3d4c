//! `Tensor`: a dtype-tagged, reference-counted `ndarray` array. Weights, constants and folded
//! shape values are held as `Tensor`s; cloning one shares the buffer instead of copying it.

use half::{bf16, f16};
use ndarray::{ArcArray, ArrayD, Axis, IxDyn, Slice};

use crate::dtype::DType;

/// A shared n-dimensional array with a dtype tag. Clones are cheap (`ArcArray`).
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// f32 data.
    F32(ArcArray<f32, IxDyn>),
    /// f64 data.
    F64(ArcArray<f64, IxDyn>),
    /// f16 data.
    F16(ArcArray<f16, IxDyn>),
    /// bf16 data.
    BF16(ArcArray<bf16, IxDyn>),
    /// i8 data.
    I8(ArcArray<i8, IxDyn>),
    /// u8 data.
    U8(ArcArray<u8, IxDyn>),
    /// i16 data.
    I16(ArcArray<i16, IxDyn>),
    /// u16 data.
    U16(ArcArray<u16, IxDyn>),
    /// i32 data.
    I32(ArcArray<i32, IxDyn>),
    /// u32 data.
    U32(ArcArray<u32, IxDyn>),
    /// i64 data.
    I64(ArcArray<i64, IxDyn>),
    /// u64 data.
    U64(ArcArray<u64, IxDyn>),
    /// bool data.
    Bool(ArcArray<bool, IxDyn>),
    /// Signed 4-bit data, one element per byte.
    I4(ArcArray<Int4, IxDyn>),
    /// Unsigned 4-bit data, one element per byte.
    U4(ArcArray<UInt4, IxDyn>),
}

/// A signed 4-bit integer (−8..=7) held in one byte. ONNX files pack two per byte, the first
/// element in the low four bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Int4(i8);

impl Int4 {
    /// The low four bits of `v` as a two's-complement value (what an `as` cast keeps).
    pub fn wrapping(v: i64) -> Int4 {
        Int4(((v as u8) << 4) as i8 >> 4)
    }

    /// `v` clamped to −8..=7.
    pub fn saturating(v: i64) -> Int4 {
        Int4(v.clamp(-8, 7) as i8)
    }

    /// The value.
    pub fn get(self) -> i8 {
        self.0
    }
}

/// An unsigned 4-bit integer (0..=15) held in one byte. ONNX files pack two per byte, the first
/// element in the low four bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UInt4(u8);

impl UInt4 {
    /// The low four bits of `v` (what an `as` cast keeps).
    pub fn wrapping(v: i64) -> UInt4 {
        UInt4(v as u8 & 0x0f)
    }

    /// `v` clamped to 0..=15.
    pub fn saturating(v: i64) -> UInt4 {
        UInt4(v.clamp(0, 15) as u8)
    }

    /// The value.
    pub fn get(self) -> u8 {
        self.0
    }
}

/// Applies `$body` to the array inside any variant, binding it as `$a`.
macro_rules! with_array {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::I16($a) => $body,
            Tensor::U16($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::U32($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::U64($a) => $body,
            Tensor::Bool($a) => $body,
            Tensor::I4($a) => $body,
            Tensor::U4($a) => $body,
        }
    };
}

/// Element types a `Tensor` can hold, with their little-endian byte codec.
pub trait Element: Copy + Default + Send + Sync + 'static {
    /// The dtype tag of this element type.
    const DTYPE: DType;
    /// Decodes one element from `DTYPE.size_of()` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends the little-endian encoding of `self`.
    fn push_le(self, out: &mut Vec<u8>);
    /// Wraps an array of this element type into a `Tensor`.
    fn wrap(a: ArcArray<Self, IxDyn>) -> Tensor;
    /// The array inside `t` if it holds this element type.
    fn unwrap(t: &Tensor) -> Option<&ArcArray<Self, IxDyn>>;
}

/// `Element` for `$ty` held in `Tensor::$variant`, decoding one element from its bytes with
/// `$from` and appending its bytes with `$push`.
macro_rules! element {
    ($ty:ty, $variant:ident, |$bytes:ident| $from:expr, |$v:ident, $out:ident| $push:expr) => {
        impl Element for $ty {
            const DTYPE: DType = DType::$variant;
            fn from_le($bytes: &[u8]) -> Self {
                $from
            }
            fn push_le(self, $out: &mut Vec<u8>) {
                let $v = self;
                $push
            }
            fn wrap(a: ArcArray<Self, IxDyn>) -> Tensor {
                Tensor::$variant(a)
            }
            fn unwrap(t: &Tensor) -> Option<&ArcArray<Self, IxDyn>> {
                match t {
                    Tensor::$variant(a) => Some(a),
                    _ => None,
                }
            }
        }
    };
}

macro_rules! numeric_element {
    ($ty:ty, $variant:ident, $n:expr) => {
        element!(
            $ty,
            $variant,
            |bytes| <$ty>::from_le_bytes(bytes[..$n].try_into().expect("one element's bytes")),
            |v, out| { out.extend_from_slice(&v.to_le_bytes()) }
        );
    };
}
numeric_element!(f32, F32, 4);
numeric_element!(f64, F64, 8);
numeric_element!(f16, F16, 2);
numeric_element!(bf16, BF16, 2);
numeric_element!(i8, I8, 1);
numeric_element!(u8, U8, 1);
numeric_element!(i16, I16, 2);
numeric_element!(u16, U16, 2);
numeric_element!(i32, I32, 4);
numeric_element!(u32, U32, 4);
numeric_element!(i64, I64, 8);
numeric_element!(u64, U64, 8);
element!(bool, Bool, |bytes| bytes[0] != 0, |v, out| out.push(u8::from(v)));
// 4-bit elements, one per byte (the unpacked form): `Tensor::from_le_bytes` and
// `Tensor::to_le_bytes` pack and unpack ONNX's two-per-byte layout.
element!(Int4, I4, |bytes| Int4::wrapping(i64::from(bytes[0] as i8)), |v, out| out.push(v.0 as u8));
element!(UInt4, U4, |bytes| UInt4::wrapping(i64::from(bytes[0])), |v, out| out.push(v.0));

impl Tensor {
    /// Builds a tensor from a shape and a flat row-major vector. `None` if the lengths disagree.
    pub fn from_vec<T: Element>(shape: &[usize], data: Vec<T>) -> Option<Tensor> {
        ArrayD::from_shape_vec(IxDyn(shape), data).ok().map(|a| T::wrap(a.into_shared()))
    }

    /// A scalar (rank-0) tensor.
    pub fn scalar<T: Element>(v: T) -> Tensor {
        T::wrap(ArrayD::from_elem(IxDyn(&[]), v).into_shared())
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::I8(_) => DType::I8,
            Tensor::U8(_) => DType::U8,
            Tensor::I16(_) => DType::I16,
            Tensor::U16(_) => DType::U16,
            Tensor::I32(_) => DType::I32,
            Tensor::U32(_) => DType::U32,
            Tensor::I64(_) => DType::I64,
            Tensor::U64(_) => DType::U64,
            Tensor::Bool(_) => DType::Bool,
            Tensor::I4(_) => DType::I4,
            Tensor::U4(_) => DType::U4,
        }
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        with_array!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_array!(self, a => a.len())
    }

    /// Whether the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `start..start + len` of the first axis, as a new tensor; `None` for a scalar or a
    /// range past the end.
    pub fn rows(&self, start: usize, len: usize) -> Option<Tensor> {
        self.slice_axis(0, start, len)
    }

    /// Indices `start..start + len` of `axis`, as a new tensor; `None` for an axis the tensor
    /// does not have or a range past its end.
    pub fn slice_axis(&self, axis: usize, start: usize, len: usize) -> Option<Tensor> {
        fn cut<T: Element>(a: &ArcArray<T, IxDyn>, axis: usize, start: usize, len: usize) -> Tensor {
            T::wrap(a.slice_axis(Axis(axis), Slice::from(start..start + len)).to_owned().into_shared())
        }
        let n = *self.shape().get(axis)?;
        if start.checked_add(len)? > n {
            return None;
        }
        Some(with_array!(self, a => cut(a, axis, start, len)))
    }

    /// The tensors stacked along their first axis; `None` unless they share a dtype and their
    /// trailing dimensions, and have at least one axis.
    pub fn concat_rows(parts: &[Tensor]) -> Option<Tensor> {
        fn cat<T: Element>(_first: &ArcArray<T, IxDyn>, parts: &[Tensor]) -> Option<Tensor> {
            let views: Vec<_> =
                parts.iter().map(|t| T::unwrap(t).map(|a| a.view())).collect::<Option<_>>()?;
            ndarray::concatenate(Axis(0), &views).ok().map(|a| T::wrap(a.into_shared()))
        }
        let first = parts.first().filter(|t| !t.shape().is_empty())?;
        with_array!(first, a => cat(a, parts))
    }

    /// The array if the tensor holds `T`.
    pub fn view<T: Element>(&self) -> Option<&ArcArray<T, IxDyn>> {
        T::unwrap(self)
    }

    /// The f32 array, if this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&ArcArray<f32, IxDyn>> {
        self.view::<f32>()
    }

    /// Integer (or bool) elements widened to i64 in row-major order; `None` for float tensors.
    /// Used for shape, axes and index tensors.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            Tensor::I8(a) => a.iter().map(|&v| i64::from(v)).collect(),
            Tensor::U8(a) => a.iter().map(|&v| i64::from(v)).collect(),
            Tensor::I16(a) => a.iter().map(|&v| i64::from(v)).collect(),
            Tensor::U16(a) => a.iter().map(|&v| i64::from(v)).collect(),
            Tensor::I32(a) => a.iter().map(|&v| i64::from(v)).collect(),
            Tensor::U32(a) => a.iter().map(|&v| i64::from(v)).collect(),
            Tensor::I64(a) => a.iter().copied().collect(),
            Tensor::U64(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::Bool(a) => a.iter().map(|&v| i64::from(v)).collect(),
            Tensor::I4(a) => a.iter().map(|&v| i64::from(v.get())).collect(),
            Tensor::U4(a) => a.iter().map(|&v| i64::from(v.get())).collect(),
            _ => return None,
        })
    }

    /// Elements converted to f64 in row-major order (any dtype).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Tensor::F32(a) => a.iter().map(|&v| f64::from(v)).collect(),
            Tensor::F64(a) => a.iter().copied().collect(),
            Tensor::F16(a) => a.iter().map(|&v| f64::from(v)).collect(),
            Tensor::BF16(a) => a.iter().map(|&v| f64::from(v)).collect(),
            other => other.to_i64_vec().unwrap_or_default().into_iter().map(|v| v as f64).collect(),
        }
    }

    /// Builds a tensor of `dtype` from i64 values (integer and bool dtypes cast with `as`, 4-bit
    /// ones keeping the low four bits likewise; floats converted). Used by shape-value folding.
    pub fn from_i64s(dtype: DType, shape: &[usize], v: &[i64]) -> Option<Tensor> {
        match dtype {
            DType::I64 => Tensor::from_vec(shape, v.to_vec()),
            DType::I32 => Tensor::from_vec(shape, v.iter().map(|&x| x as i32).collect()),
            DType::I16 => Tensor::from_vec(shape, v.iter().map(|&x| x as i16).collect()),
            DType::U16 => Tensor::from_vec(shape, v.iter().map(|&x| x as u16).collect()),
            DType::I8 => Tensor::from_vec(shape, v.iter().map(|&x| x as i8).collect()),
            DType::U8 => Tensor::from_vec(shape, v.iter().map(|&x| x as u8).collect()),
            DType::U32 => Tensor::from_vec(shape, v.iter().map(|&x| x as u32).collect()),
            DType::U64 => Tensor::from_vec(shape, v.iter().map(|&x| x as u64).collect()),
            DType::Bool => Tensor::from_vec(shape, v.iter().map(|&x| x != 0).collect()),
            DType::I4 => Tensor::from_vec(shape, v.iter().map(|&x| Int4::wrapping(x)).collect()),
            DType::U4 => Tensor::from_vec(shape, v.iter().map(|&x| UInt4::wrapping(x)).collect()),
            DType::F32 => Tensor::from_vec(shape, v.iter().map(|&x| x as f32).collect()),
            DType::F64 => Tensor::from_vec(shape, v.iter().map(|&x| x as f64).collect()),
            DType::F16 => Tensor::from_vec(shape, v.iter().map(|&x| f16::from_f64(x as f64)).collect()),
            DType::BF16 => Tensor::from_vec(shape, v.iter().map(|&x| bf16::from_f64(x as f64)).collect()),
        }
    }

    /// Decodes little-endian raw bytes (ONNX `raw_data` layout: 4-bit elements two per byte, the
    /// first in the low bits). `None` if the byte count does not match the shape.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Option<Tensor> {
        fn decode<T: Element>(shape: &[usize], bytes: &[u8]) -> Option<Tensor> {
            let n = T::DTYPE.size_of();
            let data: Vec<T> = bytes.chunks_exact(n).map(T::from_le).collect();
            Tensor::from_vec(shape, data)
        }
        let count = crate::shape::checked_numel(shape)?;
        if bytes.len() != dtype.raw_len(count)? {
            return None;
        }
        let nibbles = || bytes.iter().flat_map(|&b| [b & 0x0f, b >> 4]).take(count);
        match dtype {
            DType::F32 => decode::<f32>(shape, bytes),
            DType::F64 => decode::<f64>(shape, bytes),
            DType::F16 => decode::<f16>(shape, bytes),
            DType::BF16 => decode::<bf16>(shape, bytes),
            DType::I8 => decode::<i8>(shape, bytes),
            DType::U8 => decode::<u8>(shape, bytes),
            DType::I16 => decode::<i16>(shape, bytes),
            DType::U16 => decode::<u16>(shape, bytes),
            DType::I32 => decode::<i32>(shape, bytes),
            DType::U32 => decode::<u32>(shape, bytes),
            DType::I64 => decode::<i64>(shape, bytes),
            DType::U64 => decode::<u64>(shape, bytes),
            DType::Bool => decode::<bool>(shape, bytes),
            DType::I4 => Tensor::from_vec(shape, nibbles().map(|n| Int4::wrapping(i64::from(n))).collect()),
            DType::U4 => Tensor::from_vec(shape, nibbles().map(|n| UInt4::wrapping(i64::from(n))).collect()),
        }
    }

    /// Encodes the elements in row-major order as little-endian bytes (ONNX `raw_data` layout:
    /// 4-bit elements two per byte, the first in the low bits).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.dtype().size_of());
        with_array!(self, a => for &v in a.iter() { v.push_le(&mut out) });
        if matches!(self.dtype(), DType::I4 | DType::U4) {
            out = out.chunks(2).map(|p| (p[0] & 0x0f) | (p.get(1).copied().unwrap_or(0) << 4)).collect();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_bytes_round_trip_every_dtype() {
        let dtypes = [
            DType::F32,
            DType::F64,
            DType::F16,
            DType::BF16,
            DType::I8,
            DType::U8,
            DType::I16,
            DType::U16,
            DType::I32,
            DType::U32,
            DType::I64,
            DType::U64,
            DType::Bool,
            DType::I4,
            DType::U4,
        ];
        for d in dtypes {
            let t = Tensor::from_i64s(d, &[2, 3], &[0, 1, 0, 1, 1, 0]).unwrap();
            let bytes = t.to_le_bytes();
            assert_eq!(bytes.len(), d.raw_len(6).unwrap());
            assert_eq!(Tensor::from_le_bytes(d, &[2, 3], &bytes).unwrap(), t, "{d}");
            assert!(Tensor::from_le_bytes(d, &[2, 2], &bytes).is_none());
        }
    }

    #[test]
    fn four_bit_elements_pack_two_per_byte_low_bits_first() {
        let t = Tensor::from_i64s(DType::I4, &[3], &[-8, 7, -1]).unwrap();
        assert_eq!(t.to_le_bytes(), vec![0x78, 0x0f]);
        assert_eq!(Tensor::from_le_bytes(DType::I4, &[3], &[0x78, 0x0f]).unwrap(), t);
        assert_eq!(t.to_i64_vec().unwrap(), vec![-8, 7, -1]);
        let u = Tensor::from_i64s(DType::U4, &[2], &[15, 16]).unwrap();
        assert_eq!(u.to_i64_vec().unwrap(), vec![15, 0]);
        assert!(Tensor::from_le_bytes(DType::U4, &[3], &[0x78]).is_none());
        assert_eq!(Int4::saturating(100).get(), 7);
        assert_eq!(UInt4::saturating(-3).get(), 0);
    }

    #[test]
    fn rows_cut_and_concat_rows_rejoin() {
        let t = Tensor::from_i64s(DType::I64, &[3, 2], &[1, 2, 3, 4, 5, 6]).unwrap();
        let parts: Vec<Tensor> = (0..3).map(|i| t.rows(i, 1).unwrap()).collect();
        assert_eq!(parts[1], Tensor::from_i64s(DType::I64, &[1, 2], &[3, 4]).unwrap());
        assert_eq!(Tensor::concat_rows(&parts).unwrap(), t);
        assert!(t.rows(2, 2).is_none());
        assert!(Tensor::scalar(1.0f32).rows(0, 1).is_none());
        let other = Tensor::from_vec(&[1, 2], vec![1.0f32, 2.0]).unwrap();
        assert!(Tensor::concat_rows(&[parts[0].clone(), other]).is_none());
        assert!(Tensor::concat_rows(&[]).is_none());
    }

    #[test]
    fn clones_share_the_buffer() {
        let t = Tensor::from_vec(&[3], vec![1.0f32, 2.0, 3.0]).unwrap();
        let u = t.clone();
        assert_eq!(t.as_f32().unwrap().as_ptr(), u.as_f32().unwrap().as_ptr());
    }
}

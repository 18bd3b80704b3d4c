//! Arithmetic shared by the kernels that work on every numeric element type: the `Arith` trait
//! (integers wrap, integer division by zero gives 0) and the `numeric!` dispatch over dtypes.

use qgraph::Element;

/// Arithmetic that every numeric element type provides (integers wrap; integer division by zero
/// gives 0 rather than a panic).
pub(crate) trait Arith: Element + PartialOrd {
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn rem(self, o: Self, fmod: bool) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn div(self, o: Self) -> Self { self.checked_div(o).unwrap_or(0) }
            fn rem(self, o: Self, fmod: bool) -> Self {
                let r = self.checked_rem(o).unwrap_or(0);
                // Python-style modulo takes the sign of the divisor.
                #[allow(unused_comparisons)]
                if !fmod && r != 0 && ((r < 0) != (o < 0)) { r.wrapping_add(o) } else { r }
            }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
            fn is_nan(self) -> bool { false }
        }
    )*};
}
int_arith!(i8, u8, i16, u16, i32, u32, i64, u64);

macro_rules! float_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, o: Self) -> Self { self + o }
            fn sub(self, o: Self) -> Self { self - o }
            fn mul(self, o: Self) -> Self { self * o }
            fn div(self, o: Self) -> Self { self / o }
            fn rem(self, o: Self, fmod: bool) -> Self {
                let r = self % o;
                if !fmod && r != 0.0 && ((r < 0.0) != (o < 0.0)) { r + o } else { r }
            }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
            fn is_nan(self) -> bool { <$t>::is_nan(self) }
        }
    )*};
}
float_arith!(f32, f64);

/// Runs `$f::<T>` for the numeric dtype `$d` (the types `Arith` covers).
macro_rules! numeric {
    ($d:expr, $f:ident ($($arg:expr),*)) => {
        match $d {
            qgraph::DType::F32 => $f::<f32>($($arg),*),
            qgraph::DType::F64 => $f::<f64>($($arg),*),
            qgraph::DType::I8 => $f::<i8>($($arg),*),
            qgraph::DType::U8 => $f::<u8>($($arg),*),
            qgraph::DType::I16 => $f::<i16>($($arg),*),
            qgraph::DType::U16 => $f::<u16>($($arg),*),
            qgraph::DType::I32 => $f::<i32>($($arg),*),
            qgraph::DType::U32 => $f::<u32>($($arg),*),
            qgraph::DType::I64 => $f::<i64>($($arg),*),
            qgraph::DType::U64 => $f::<u64>($($arg),*),
            other => Err(format!("dtype {other} is not supported by this op")),
        }
    };
}
pub(crate) use numeric;

/// Bitwise operations of the integer element types (`BitwiseAnd/Or/Xor/Not`, `BitShift`; a
/// shift by the bit width or more gives 0, as a shift of every bit out does).
pub(crate) trait Bits: Element {
    fn and(self, o: Self) -> Self;
    fn or(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    fn not(self) -> Self;
    fn shl(self, by: Self) -> Self;
    fn shr(self, by: Self) -> Self;
}

macro_rules! int_bits {
    ($($t:ty),*) => {$(
        impl Bits for $t {
            fn and(self, o: Self) -> Self { self & o }
            fn or(self, o: Self) -> Self { self | o }
            fn xor(self, o: Self) -> Self { self ^ o }
            fn not(self) -> Self { !self }
            fn shl(self, by: Self) -> Self {
                u32::try_from(by).ok().and_then(|b| self.checked_shl(b)).unwrap_or(0)
            }
            fn shr(self, by: Self) -> Self {
                u32::try_from(by).ok().and_then(|b| self.checked_shr(b)).unwrap_or(0)
            }
        }
    )*};
}
int_bits!(i8, u8, i16, u16, i32, u32, i64, u64);

/// Runs `$f::<T>` for the integer dtype `$d` (the types `Bits` covers).
macro_rules! integer {
    ($d:expr, $f:ident ($($arg:expr),*)) => {
        match $d {
            qgraph::DType::I8 => $f::<i8>($($arg),*),
            qgraph::DType::U8 => $f::<u8>($($arg),*),
            qgraph::DType::I16 => $f::<i16>($($arg),*),
            qgraph::DType::U16 => $f::<u16>($($arg),*),
            qgraph::DType::I32 => $f::<i32>($($arg),*),
            qgraph::DType::U32 => $f::<u32>($($arg),*),
            qgraph::DType::I64 => $f::<i64>($($arg),*),
            qgraph::DType::U64 => $f::<u64>($($arg),*),
            other => Err(format!("dtype {other} is not an integer type")),
        }
    };
}
pub(crate) use integer;

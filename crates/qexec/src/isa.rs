//! Runtime instruction-set dispatch for the interpreter's hot loops. A loop is written once as a
//! plain Rust body; `multiversion!` compiles it three times — for AVX-512, for AVX2+FMA, and for
//! the baseline target — and calls the best one the CPU supports (detected once per process).
//! The compiler vectorises each copy for its instruction set; no `-C target-cpu` is needed.

use std::sync::OnceLock;

/// Instruction-set levels the interpreter compiles hot loops for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Baseline target features only.
    Baseline,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// AVX-512F on top of AVX2+FMA.
    Avx512,
}

/// The best level this CPU supports.
pub(crate) fn detected() -> Isa {
    static LEVEL: OnceLock<Isa> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

/// Defines `fn $name(args) -> ret` whose body is compiled once per [`Isa`] level and dispatched
/// at run time. The body must be safe code; it is inlined into each feature-enabled copy.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            match $crate::isa::detected() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detected()` returned Avx512 only after checking avx512f, avx2 and fma
                // at run time, so the CPU executes the instructions this copy was compiled with.
                $crate::isa::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detected()` returned Avx2 only after checking avx2 and fma at run time.
                $crate::isa::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

//! Runtime instruction-set dispatch for hot loops (the kernels here and the interpreter's). A
//! loop is written once as a plain Rust body; [`multiversion!`](crate::multiversion) compiles it
//! three times — for AVX-512, for AVX2+FMA, and for the baseline target — and calls the best one
//! the CPU supports (detected once per process). The compiler vectorises each copy for its
//! instruction set; no `-C target-cpu` is needed. On aarch64 the baseline copy is already a NEON
//! one (NEON is part of every aarch64 target), so it needs no copy of its own. Tests can force a
//! lower level with [`force`] to check every copy against the scalar reference.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// Instruction-set levels hot loops are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Baseline target features only.
    Baseline,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// AVX-512F on top of AVX2+FMA.
    Avx512,
}

/// A forced level (0 = none, else `Isa as u8 + 1`).
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Caps the level every dispatched loop uses at `level` (never above what the CPU supports);
/// `None` lifts the cap. Process-wide: meant for tests and benchmarks that compare levels.
pub fn force(level: Option<Isa>) {
    FORCED.store(level.map_or(0, |l| l as u8 + 1), Ordering::Relaxed);
}

/// The levels this CPU can run, lowest first.
pub fn available() -> Vec<Isa> {
    [Isa::Baseline, Isa::Avx2, Isa::Avx512].into_iter().filter(|&l| l <= supported()).collect()
}

/// The level dispatched loops use now: the CPU's best, capped by [`force`].
#[inline]
pub fn detected() -> Isa {
    let best = supported();
    match FORCED.load(Ordering::Relaxed) {
        0 => best,
        1 => Isa::Baseline,
        2 => Isa::Avx2.min(best),
        _ => best,
    }
}

/// The best level this CPU supports.
#[inline]
fn supported() -> Isa {
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
/// at run time. The body must be safe code; it is inlined into each feature-enabled copy, so
/// everything it calls in the hot loop should be `#[inline(always)]` or generic.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(unsafe_code)]
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

            match $crate::dispatch::detected() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detected()` returns Avx512 only after checking avx512f, avx2 and fma
                // at run time, so the CPU executes the instructions this copy was compiled with.
                $crate::dispatch::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detected()` returns Avx2 only after checking avx2 and fma at run time.
                $crate::dispatch::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

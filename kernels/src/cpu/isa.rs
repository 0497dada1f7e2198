//! Which vector instructions our own CPU kernels use: the widest this CPU has, found at run time,
//! so one binary runs everywhere and uses AVX-512 where it exists.

use std::sync::OnceLock;

/// A level of x86 vector instructions, in increasing width. Every level below the detected one
/// runs too, which is how tests cover each path on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// No assumption beyond the target's baseline (SSE2 on x86-64); also every non-x86 CPU.
    Portable,
    /// AVX2 with FMA: 8 lanes.
    Avx2,
    /// AVX-512 (F, VL, BW, DQ, as every AVX-512 server CPU has them) with AVX2 and FMA: 16 lanes.
    Avx512,
    /// AVX-512 and the AMX tile unit with bf16 (`amx.rs`), which multiplies bf16 weights; the
    /// f32 kernels run their AVX-512 copies.
    Amx,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512f",
            Isa::Amx => "avx512f+amx-bf16",
        }
    }

    /// The widest level this CPU supports (asking Linux for the tile state the first time).
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(Isa::detect)
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            // Every feature the AVX-512 copies are compiled with (`multiversion!`).
            if avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
                return if super::amx::granted() { Isa::Amx } else { Isa::Avx512 };
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every level this CPU runs, widest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|&i| i <= Isa::detected()).collect()
    }
}

/// The level the kernels run with: [`Isa::detected`], or lower when `TANDEM_CPU_ISA` names a
/// lower one (`avx512`, `avx2`, `portable`), to compare paths end to end on one machine.
pub fn kernel_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("TANDEM_CPU_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            Ok("avx512") => Isa::Avx512,
            _ => Isa::Amx,
        };
        Isa::detected().min(cap)
    })
}

/// Defines a function whose body is compiled once per [`Isa`] (for AVX-512, for AVX2 + FMA, and
/// for the baseline), the copy chosen at each call by [`kernel_isa`]. The body is plain Rust that
/// the compiler vectorises to the width each copy allows; as floating-point operations are never
/// reordered or fused behind the source's back, every copy gives the same bits. A module of the
/// same name holds `on(isa, ...)`, which runs a given copy (for tests).
///
/// Only the body itself is compiled per level: a closure handed to rayon is a function of its
/// own, so the functions defined here are the per-row work inside the parallel loops.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $name::run($crate::cpu::kernel_isa(), $($arg),*)
        }

        $vis mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            /// Runs the copy of `isa`; panics when the CPU lacks it.
            #[allow(dead_code, clippy::too_many_arguments)]
            pub fn on(isa: $crate::cpu::Isa, $($arg: $ty),*) $(-> $ret)? {
                assert!(isa <= $crate::cpu::Isa::detected(), "{isa:?} is beyond this CPU");
                run(isa, $($arg),*)
            }

            /// `isa` is at most [`crate::cpu::Isa::detected`] ([`crate::cpu::kernel_isa`] is).
            #[inline]
            #[allow(clippy::too_many_arguments)]
            pub(super) fn run(isa: $crate::cpu::Isa, $($arg: $ty),*) $(-> $ret)? {
                match isa {
                    // SAFETY: the caller's promise: the CPU has every feature of the copy.
                    #[cfg(target_arch = "x86_64")]
                    $crate::cpu::Isa::Avx512 | $crate::cpu::Isa::Amx => unsafe { avx512($($arg),*) },
                    #[cfg(target_arch = "x86_64")]
                    $crate::cpu::Isa::Avx2 => unsafe { avx2($($arg),*) },
                    _ => body($($arg),*),
                }
            }
        }
    };
}
pub(crate) use multiversion;

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
    /// AVX-512 F: 16 lanes.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512f",
        }
    }

    /// The widest level this CPU supports.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every level this CPU runs, widest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|&i| i <= Isa::detected()).collect()
    }
}

/// The level the kernels run with: [`Isa::detected`], or lower when `TANDEM_CPU_ISA` names a
/// lower one (`avx2`, `portable`), to compare paths end to end on one machine.
pub fn kernel_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("TANDEM_CPU_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        Isa::detected().min(cap)
    })
}

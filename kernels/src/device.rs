//! Where a tensor lives.

use std::fmt;

/// A compute device. `Cuda(ordinal)` exists in every build so call sites need no `cfg`; a build
/// without the `cuda` feature answers any use of it with [`crate::Error::CudaUnavailable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// True when this build was compiled with the CUDA backend (whether or not a GPU exists).
    pub fn cuda_compiled() -> bool {
        cfg!(feature = "cuda")
    }

    /// Checks that the device can be used: always for the CPU; for CUDA, that the libraries
    /// load and the ordinal exists. Returns a clear error otherwise.
    pub fn ensure_available(self) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => crate::cuda::CudaContext::get(ordinal).map(|_| ()),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

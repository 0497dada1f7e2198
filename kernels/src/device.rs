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

impl Device {
    /// Bytes free for new allocations now: on the CPU the kernel's estimate of available
    /// memory (`MemAvailable`), within what the process's cgroup (a container's limit) has left;
    /// on a GPU the driver's free device memory.
    pub fn free_memory(self) -> crate::Result<u64> {
        match self {
            Device::Cpu => {
                let unknown = |msg: String| crate::Error::InvalidArgument { op: "free_memory", msg };
                let meminfo =
                    std::fs::read_to_string("/proc/meminfo").map_err(|e| unknown(format!("/proc/meminfo: {e}")))?;
                let kib = (meminfo.lines())
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .ok_or_else(|| unknown("/proc/meminfo has no MemAvailable".into()))?;
                Ok((kib * 1024).min(cgroup_memory_left().unwrap_or(u64::MAX)))
            }
            Device::Cuda(ordinal) => crate::cuda::free_memory(ordinal),
        }
    }

    /// Waits until all work queued on the device has finished (for timing); a no-op on the CPU,
    /// whose ops are synchronous.
    pub fn synchronize(self) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => crate::cuda::synchronize(ordinal),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = crate::Error;

    /// `cpu`, `cuda` (ordinal 0) or `cuda:N`.
    fn from_str(s: &str) -> crate::Result<Self> {
        let bad = || crate::Error::InvalidArgument { op: "device", msg: format!("{s:?} is not cpu, cuda or cuda:N") };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda).ok_or_else(bad),
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

/// What this process's cgroup (v2) may still allocate: its `memory.max` less its
/// `memory.current`; none without a limit (or outside a cgroup v2 hierarchy).
fn cgroup_memory_left() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok()?.trim().parse::<u64>().ok();
    Some(read("memory.max")?.saturating_sub(read("memory.current")?))
}

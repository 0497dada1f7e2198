//! Launch shapes shared by the kernels.

use cudarc::driver::LaunchConfig;

use crate::{Error, Result};

/// Threads per block of the 1-d and row kernels (`BLOCK` in `common.cuh`; the row kernels'
/// shared-memory reductions assume exactly this many).
pub(crate) const BLOCK: u32 = 256;

/// A grid for `n` elements with grid-stride loops (capped: extra elements loop).
pub(crate) fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).min(1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
pub(crate) fn rows(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig { grid_dim: (dim(op, rows)?, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
}

/// A size as a grid dimension or a kernel's `int` argument.
pub(crate) fn dim(op: &'static str, n: usize) -> Result<u32> {
    match u32::try_from(n) {
        Ok(v) if v <= i32::MAX as u32 => Ok(v),
        _ => Err(Error::InvalidArgument { op, msg: format!("size {n} is too large for one CUDA launch") }),
    }
}

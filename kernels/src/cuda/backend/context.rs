//! One [`CudaContext`] per device: the cudarc context, the one stream every op runs on, a cuBLAS
//! handle, and the NVRTC-compiled kernel modules (each compiled once per device, on first use).
//!
//! cudarc opens the CUDA libraries lazily and panics when one is missing, so before the first
//! cudarc call the libraries are looked for here (with the names cudarc tries) and a missing
//! one becomes [`Error::CudaUnavailable`]; the initialisation also runs under `catch_unwind`.

use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::result::CublasError;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits};

use super::compile::{Module, compile_cubin};
use crate::{Error, Result};

/// A CUDA device as the kernels use it. Obtained with [`CudaContext::get`]; one per ordinal for
/// the life of the process.
pub struct CudaContext {
    ordinal: usize,
    stream: Arc<CudaStream>,
    /// cuBLAS handles are not meant for concurrent calls; ops on several threads take turns.
    blas: Mutex<CudaBlas>,
    /// Real architecture the kernels are compiled for (`sm_90` on an H100/H200).
    arch: String,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl fmt::Debug for CudaContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaContext").field("ordinal", &self.ordinal).field("arch", &self.arch).finish()
    }
}

static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
static LIBRARIES: OnceLock<Result<()>> = OnceLock::new();

impl CudaContext {
    /// The context of device `ordinal`, created on first use. Fails with
    /// [`Error::CudaUnavailable`] when a CUDA library is missing or the device does not exist.
    pub fn get(ordinal: usize) -> Result<Arc<CudaContext>> {
        LIBRARIES.get_or_init(check_libraries).clone()?;
        let mut contexts = lock(CONTEXTS.get_or_init(Default::default));
        if let Some(ctx) = contexts.get(&ordinal) {
            return Ok(ctx.clone());
        }
        let ctx = match catch_unwind(AssertUnwindSafe(|| CudaContext::init(ordinal))) {
            Ok(ctx) => Arc::new(ctx?),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                return Err(Error::CudaUnavailable(format!("initialising cuda:{ordinal} panicked: {msg}")));
            }
        };
        contexts.insert(ordinal, ctx.clone());
        Ok(ctx)
    }

    fn init(ordinal: usize) -> Result<CudaContext> {
        let unavailable = |what: &str, e: DriverError| Error::CudaUnavailable(format!("cuda:{ordinal}: {what}: {e}"));
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| unavailable("counting devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::CudaUnavailable(format!("cuda:{ordinal} does not exist ({count} CUDA devices)")));
        }
        let cu = cudarc::driver::CudaContext::new(ordinal).map_err(|e| unavailable("creating the context", e))?;
        // SAFETY: every op of this crate runs on the one stream below, so the cross-stream
        // events cudarc would record for each allocation are never needed.
        unsafe { cu.disable_event_tracking() };
        let (major, minor) = cu.compute_capability().map_err(|e| unavailable("reading the compute capability", e))?;
        let stream = cu.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| Error::CudaUnavailable(format!("cuda:{ordinal}: creating the cuBLAS handle: {e}")))?;
        Ok(CudaContext {
            ordinal,
            stream,
            blas: Mutex::new(blas),
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::default(),
            functions: Mutex::default(),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn blas(&self) -> MutexGuard<'_, CudaBlas> {
        lock(&self.blas)
    }

    /// The kernel `name` of `module`, compiling and loading the module on first use.
    pub(crate) fn function(&self, module: Module, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(name) {
            return Ok(f.clone());
        }
        let loaded = {
            let mut modules = lock(&self.modules);
            match modules.get(&module) {
                Some(m) => m.clone(),
                None => {
                    let cubin = compile_cubin(module, &self.arch)?;
                    let m = self.stream.context().load_module(cubin).map_err(drv(module.name()))?;
                    modules.insert(module, m.clone());
                    m
                }
            }
        };
        let f = loaded.load_function(name).map_err(|e| Error::Cuda {
            op: module.name(),
            msg: format!("kernel {name} not found in {}.cu: {e}", module.name()),
        })?;
        lock(&self.functions).insert(name, f.clone());
        Ok(f)
    }

    /// A zeroed device buffer of `len` elements. Zero-length buffers get one element, because
    /// the driver refuses zero-byte allocations; callers track the logical length.
    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, op: &'static str, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(drv(op))
    }

    /// Copies host data (index lists, small tables) into a new device buffer.
    pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, op: &'static str, data: &[T]) -> Result<CudaSlice<T>> {
        let mut buf = self.zeros::<T>(op, data.len())?;
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut buf).map_err(drv(op))?;
        }
        Ok(buf)
    }
}

/// Waits for all work queued on device `ordinal` (for timing), surfacing any error of it.
pub fn synchronize(ordinal: usize) -> Result<()> {
    CudaContext::get(ordinal)?.stream.synchronize().map_err(drv("synchronize"))
}

/// Free memory on device `ordinal`, bytes.
pub fn free_memory(ordinal: usize) -> Result<u64> {
    let (free, _total) = CudaContext::get(ordinal)?.stream.context().mem_get_info().map_err(drv("mem_get_info"))?;
    Ok(free as u64)
}

/// A lock that survives a panic on another thread: the guarded maps stay consistent because
/// every insert is a single call.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Maps a driver error to [`Error::Cuda`] naming `op`.
pub(crate) fn drv(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda { op, msg: format!("driver: {e}") }
}

/// Maps a cuBLAS error to [`Error::Cuda`] naming `op`.
pub(crate) fn blas_err(op: &'static str, e: CublasError) -> Error {
    Error::Cuda { op, msg: format!("cublas: {e}") }
}

/// A CUDA library cudarc opens: the names it is looked up by, what it is, how to install it.
type Library = (&'static [&'static str], &'static str, &'static str);

const DRIVER: Library = (&["cuda", "nvcuda"], "the CUDA driver (libcuda)", "install the NVIDIA driver");
const NVRTC: Library = (
    &["nvrtc"],
    "NVRTC (libnvrtc)",
    "install the CUDA toolkit runtime libraries (apt `cuda-nvrtc-13-0`, or pip `nvidia-cuda-nvrtc`)",
);
const CUBLAS: Library = (
    &["cublas"],
    "cuBLAS (libcublas, which also needs libcublasLt)",
    "install cuBLAS (apt `libcublas-13-0`, or pip `nvidia-cublas`)",
);

/// The libraries cudarc will open, checked with the file names cudarc tries, so a missing one is
/// an [`Error::CudaUnavailable`] instead of a panic inside cudarc.
fn check_libraries() -> Result<()> {
    [DRIVER, NVRTC, CUBLAS].into_iter().try_for_each(check_library)
}

/// NVRTC alone, for compiling kernels on a machine with no GPU.
pub(crate) fn check_nvrtc() -> Result<()> {
    check_library(NVRTC)
}

fn check_library((names, what, fix): Library) -> Result<()> {
    let candidates: Vec<String> = names.iter().flat_map(|n| cudarc::get_lib_name_candidates(n)).collect();
    // The most telling failure: one where the file exists but does not load (a dependency such
    // as libcublasLt missing) beats "no such file" for every other candidate name.
    let mut why = String::from("no candidate names");
    for name in &candidates {
        // SAFETY: loading a CUDA library runs its initialisers, which is what cudarc does with
        // the same names a moment later; the handle is closed again right away.
        match unsafe { libloading::Library::new(name.as_str()) } {
            Ok(_lib) => return Ok(()),
            Err(e) => {
                // libloading's message is "dlopen failed"; the reason is its source.
                let e = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                if why == "no candidate names" || !e.contains("No such file") {
                    why = e;
                }
            }
        }
    }
    Err(Error::CudaUnavailable(format!(
        "{what} could not be loaded (tried {candidates:?}: {why}); {fix} and make sure its directory \
         is on LD_LIBRARY_PATH"
    )))
}

//! Run-time compilation of the `.cu` kernels with NVRTC.
//!
//! Kernels are compiled to a CUBIN for the device's real architecture rather than to PTX: a
//! PTX made by an NVRTC newer than the driver (a pip-installed CUDA 13.x library next to a 13.0
//! driver) is refused by the driver's JIT, while a CUBIN of the same major version loads.

use std::ffi::{CString, c_char};

use cudarc::nvrtc::{Ptx, result, sys};

use crate::{Error, Result};

/// Shared helpers (bf16/f16 conversions, reductions) prepended to every module.
const COMMON: &str = include_str!("../kernels/common.cuh");

/// One `.cu` file of `kernels/src/cuda/kernels/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Module {
    Cast,
    Elementwise,
    Rowwise,
    Attention,
}

impl Module {
    const ALL: [Module; 4] = [Module::Cast, Module::Elementwise, Module::Rowwise, Module::Attention];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Module::Cast => "cast",
            Module::Elementwise => "elementwise",
            Module::Rowwise => "rowwise",
            Module::Attention => "attention",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Module::Cast => include_str!("../kernels/cast.cu"),
            Module::Elementwise => include_str!("../kernels/elementwise.cu"),
            Module::Rowwise => include_str!("../kernels/rowwise.cu"),
            Module::Attention => include_str!("../kernels/attention.cu"),
        }
    }
}

/// Destroys the NVRTC program however compilation ends.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by `create_program` and is destroyed once, here.
        // A failure to free it leaves nothing to recover, so the result is dropped.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles every `.cu` module for `arch` (`sm_80`) with no GPU and no driver, only libnvrtc, and
/// fails on an error or on any warning NVRTC prints: CI's check that the kernels build.
pub fn compile_all_kernels(arch: &str) -> Result<()> {
    super::context::check_nvrtc()?;
    for module in Module::ALL {
        let (_, log) = compile(module, arch)?;
        if !log.trim().is_empty() {
            return Err(Error::Cuda {
                op: module.name(),
                msg: format!("NVRTC warnings in {}.cu for {arch}:\n{log}", module.name()),
            });
        }
    }
    Ok(())
}

/// Compiles `module` for `arch` (`sm_90`) into a CUBIN the driver loads directly.
pub(crate) fn compile_cubin(module: Module, arch: &str) -> Result<Ptx> {
    compile(module, arch).map(|(cubin, _)| cubin)
}

/// The CUBIN of `module` for `arch` and NVRTC's log (its warnings; empty on a clean build).
fn compile(module: Module, arch: &str) -> Result<(Ptx, String)> {
    let op = module.name();
    let err = |what: &str, msg: String| Error::Cuda { op, msg: format!("NVRTC {what} of {op}.cu: {msg}") };
    let src = CString::new(format!("{COMMON}\n{}", module.source()))
        .map_err(|_| err("setup", "source contains a NUL byte".into()))?;
    let name = CString::new(format!("{op}.cu")).map_err(|_| err("setup", "bad name".into()))?;
    let prog = Program(
        result::create_program(&src, Some(name.as_c_str())).map_err(|e| err("program creation", format!("{e:?}")))?,
    );
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    // SAFETY: `prog` is a live program created above.
    let compiled = unsafe { result::compile_program(prog.0, &options) };
    // SAFETY: as above; the log is NUL-terminated by NVRTC.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(|log| {
            let bytes: Vec<u8> = log.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(err("compilation", format!("{e:?} (options {options:?}):\n{log}")));
    }
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; `size` receives the CUBIN's length.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| err("CUBIN size", format!("{e:?}")))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the size NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(|e| err("CUBIN copy", format!("{e:?}")))?;
    if size == 0 {
        return Err(err("compilation", "empty CUBIN".into()));
    }
    Ok((Ptx::from_binary(cubin), log))
}

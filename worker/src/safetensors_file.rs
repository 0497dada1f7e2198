//! Reading and writing `.safetensors` files as Tandem tensors, with errors that name the file
//! and the tensor.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata, View};
use tandem_kernels::{CpuStorage, DType, Tensor};

use crate::error::{Error, Result};

/// One safetensors file: its header, read and checked once, and the file itself, from which each
/// tensor's bytes are read when asked for (so loading a model never holds the whole file).
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// Where the data section starts (after the 8-byte length and the JSON header).
    data_start: u64,
    meta: Metadata,
}

/// Headers larger than this are refused (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::io(path))?;
        let broken = |msg: String| Error::Format(format!("{}: not a valid safetensors file: {msg}", path.display()));
        let file_len = file.metadata().map_err(Error::io(path))?.len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).map_err(|_| broken("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || 8 + n > file_len {
            return Err(broken(format!("header length {n} does not fit in {file_len} bytes")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8).map_err(Error::io(path))?;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| broken(format!("header: {e}")))?;
        // Every tensor's bytes must lie inside the file and match its dtype and shape, so a
        // truncated or inconsistent file is refused here rather than at first use.
        let data_len = file_len - 8 - n;
        for (name, info) in meta.tensors() {
            let (start, end) = info.data_offsets;
            let elems = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let want = elems.and_then(|e| e.checked_mul(info.dtype.bitsize())).map(|bits| bits / 8);
            if end < start || end as u64 > data_len || want != Some(end - start) {
                return Err(broken(format!(
                    "tensor {name}: bytes {start}..{end} do not hold {:?} {:?} within {data_len} data bytes",
                    info.dtype, info.shape
                )));
            }
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), file, data_start: 8 + n, meta })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the tensors in the file.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.meta.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.meta.info(name).map(|i| i.shape.as_slice())
    }

    /// The stored dtype of tensor `name`, if present and one Tandem reads.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        match self.meta.info(name)?.dtype {
            Dtype::F32 => Some(DType::F32),
            Dtype::BF16 => Some(DType::BF16),
            Dtype::F16 => Some(DType::F16),
            _ => None,
        }
    }

    /// Tensor `name` on the CPU in its stored dtype (f32, bf16 or f16).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::Format(format!("{}: tensor {name} is missing", self.path.display())))?;
        let (start, end) = info.data_offsets;
        let (at, len) = (self.data_start + start as u64, end - start);
        let storage = match info.dtype {
            Dtype::F32 => CpuStorage::F32(self.values(at, len, |c: &[u8; 4]| f32::from_le_bytes(*c))?),
            Dtype::BF16 => CpuStorage::BF16(self.values(at, len, |c: &[u8; 2]| bf16::from_le_bytes(*c))?),
            Dtype::F16 => CpuStorage::F16(self.values(at, len, |c: &[u8; 2]| f16::from_le_bytes(*c))?),
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: tensor {name} has dtype {other:?} (supported: F32, BF16, F16)",
                    self.path.display()
                )));
            }
        };
        Tensor::from_cpu(storage, info.shape.clone()).map_err(Error::from)
    }

    /// The `len` bytes at `at` as values of `N` bytes each, read a chunk at a time so that a
    /// large tensor's bytes are never held beside its values (the peak memory of a load).
    fn values<T, const N: usize>(&self, at: u64, len: usize, value: impl Fn(&[u8; N]) -> T) -> Result<Vec<T>> {
        const CHUNK: usize = 1 << 22;
        let mut out = Vec::with_capacity(len / N);
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.file.read_exact_at(&mut buf[..n], at + done as u64).map_err(Error::io(&self.path))?;
            out.extend(buf[..n].as_chunks::<N>().0.iter().map(&value));
            done += n;
        }
        Ok(out)
    }
}

/// Writes `tensors` (name, tensor) to a safetensors file at `path`, in each tensor's dtype,
/// atomically: a temporary file beside it, synced, then renamed over `path`.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views: Vec<(String, HostView)> =
        tensors.iter().map(|(name, t)| Ok((name.clone(), HostView::new(t)?))).collect::<Result<_>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| Error::Format(format!("{}: writing safetensors: {e}", path.display())))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

/// A tensor's bytes on the host, in the little-endian layout safetensors stores.
struct HostView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostView {
    fn new(t: &Tensor) -> Result<Self> {
        let (dtype, bytes) = match t.to_cpu_storage()? {
            CpuStorage::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            CpuStorage::BF16(v) => (Dtype::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            CpuStorage::F16(v) => (Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        Ok(HostView { dtype, shape: t.shape().to_vec(), bytes })
    }
}

impl View for HostView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A set of safetensors files read as one (a sharded checkpoint), looked up by tensor name.
pub struct TensorSource {
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, usize>,
}

impl TensorSource {
    pub fn new(files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut by_name = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                if let Some(prev) = by_name.insert(name.clone(), i) {
                    return Err(Error::Format(format!(
                        "tensor {name} appears in both {} and {}",
                        files[prev].path().display(),
                        f.path().display()
                    )));
                }
            }
        }
        Ok(TensorSource { files, by_name })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.by_name.get(name).and_then(|&i| self.files[i].shape(name))
    }

    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.by_name.get(name).and_then(|&i| self.files[i].dtype(name))
    }

    /// Tensor `name`, which must have `shape`; errors name the tensor and the file.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(&i) = self.by_name.get(name) else {
            let where_ = self.files.iter().map(|f| f.path().display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(Error::Format(format!("tensor {name} is missing from {where_}")));
        };
        let file = &self.files[i];
        let t = file.tensor(name)?;
        if t.shape() != shape {
            return Err(Error::Format(format!(
                "{}: tensor {name} has shape {:?}, expected {shape:?}",
                file.path().display(),
                t.shape()
            )));
        }
        Ok(t)
    }
}

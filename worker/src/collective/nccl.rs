//! The NCCL backend of [`Collective`] (feature `cuda`): [`NcclCollective`], one rank of an NCCL
//! communicator on one GPU, and [`NcclId`], the unique id that names the group.
//!
//! # How a call runs
//! The trait's buffers live on the host, so each call copies its input to the device, runs the
//! NCCL collective on this communicator's own CUDA stream, waits for it and copies the result
//! back: simple and correct first; device-resident tensors can skip the copies later. Every call
//! is serialised by a mutex (one order of calls per group, as the trait requires).
//!
//! - `all_reduce_sum`, `reduce_scatter_sum`, `broadcast`: one NCCL collective each (in place).
//! - `all_gather` (lengths may differ per rank): an all-gather of the lengths (one `u64` per
//!   rank), then an all-gather of the inputs zero-padded to the longest, unpadded on the host.
//! - `all_to_all` (sizes differ per pair): an all-gather of every rank's send sizes (`world`
//!   `u64`s per rank), then grouped `ncclSend`/`ncclRecv` (`ncclGroupStart`..`ncclGroupEnd`) of
//!   exactly those sizes, packed in one buffer each way. Not padding: in expert dispatch one hot
//!   expert can receive many times what the others do, and padding every pair to the largest
//!   would send up to `world` times the bytes.
//! - `broadcast_bytes`: a broadcast of the length (`u64`), then of the bytes.
//! - `barrier`: an all-reduce of one `f32`.
//!
//! Zero-length buffers skip the data collective (every rank knows the lengths, so all skip
//! alike). NCCL sums in its own order (ring, tree or NVLS, chosen per size), so sums over more
//! than two ranks may differ in the last bits from the host backends' ring; every rank still
//! receives the same bits. With one or two ranks the sums are exact and equal the host ones.
//!
//! # bytes_sent
//! NCCL does not report traffic, so [`Collective::bytes_sent`] counts the nominal volume of the
//! ring algorithms for what this rank sends, size exchanges included: all-reduce
//! `2(N-1)/N` of the buffer, reduce-scatter `(N-1)/N` of the input, all-gather `(N-1)` times
//! the padded block (plus `(N-1)` 8-byte lengths), broadcast the whole buffer on every rank but
//! the last of the ring from the root (plus the 8-byte length for `broadcast_bytes`), all-to-all
//! the exact bytes to the other ranks (plus `(N-1)·N` 8-byte sizes), barrier an all-reduce of 4
//! bytes. NCCL may choose another algorithm (a tree, NVLink SHARP), so this is a model of the
//! traffic, not a measurement; a group of one counts 0.
//!
//! # Failure and timeouts
//! The communicator is created non-blocking (`ncclConfig_t::blocking = 0`), so no NCCL call
//! blocks: set-up, the enqueueing of a collective (which may connect to peers on first use) and
//! the collective's kernel are all watched by polling `ncclCommGetAsyncError` and a CUDA event
//! on the stream. Set-up that has not finished within [`CollectiveOptions::setup_timeout`]
//! (a rank never came, or the ranks were given different ids) fails with
//! [`CollectiveError::Setup`]; each NCCL step of a call (a call makes one or two) that has
//! not finished within [`CollectiveOptions::timeout`] fails with [`CollectiveError::Timeout`].
//! Either way, and on any NCCL or CUDA error (reported as [`CollectiveError::Broken`] with
//! NCCL's message), the communicator is aborted at once (`ncclCommAbort`, which also stops this
//! rank's kernels of the call) and every later call answers [`CollectiveError::Broken`].
//!
//! What is not covered, unlike the host backends: the bound is on a whole NCCL step, not on
//! silence, so one step larger than the timeout would be cut short (set the timeout for the
//! largest buffer); NCCL does not say which peer stalled, so a timeout's `peer` is the other rank
//! in a group of two and, in larger groups, a guess (the next rank on the ring), not a verdict;
//! ranks that call different collectives or lengths are not detected (there is no call tag on
//! the wire) and hang into the timeout or mix data; a dropped or crashed peer is noticed at once
//! only where NCCL's transport sees the connection close (sockets, InfiniBand), and through the
//! timeout over NVLink or PCIe peer-to-peer within a machine. Dropping an [`NcclCollective`]
//! aborts its communicator without telling the peers.
//!
//! # Libraries
//! cudarc opens libcuda and libnccl at run time and panics when one is missing, so both are
//! looked for first, with the names cudarc tries, and a missing one (or a libnccl without the
//! functions used here, older than 2.14) is a [`CollectiveError::Setup`] naming it and the fix;
//! the set-up also runs under `catch_unwind`. cudarc looks for `libnccl.so`, which the NCCL
//! packages of pip (`nvidia-nccl-cu13`) and of apt without `libnccl-dev` do not have (only
//! `libnccl.so.2`): a link named `libnccl.so` to it, in a directory on `LD_LIBRARY_PATH`, is
//! needed there (scripts/gpu-check.sh makes one).

use std::cell::Cell;
use std::ffi::{CStr, c_char, c_void};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError, ValidAsZeroBits,
};
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;

use super::{Collective, CollectiveError, CollectiveOptions, Op};

// ---- the group's id ----

/// The 128-byte NCCL unique id that names one group. Made once by whoever forms the group
/// ([`NcclId::new`]) and handed to every rank, which passes it to [`NcclCollective::new`]; it
/// travels as bytes or as 256 lowercase hex digits ([`NcclId::to_hex`], `Display`, `FromStr`,
/// and serde as a hex string).
///
/// The process that makes it runs NCCL's bootstrap root (a listening socket whose address is in
/// the id) until the group has formed, so make it on one of the ranks (rank 0's worker), or keep
/// its maker alive and reachable by every rank during the set-up. An id forms one group only.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NcclId([u8; NcclId::LEN]);

impl NcclId {
    /// Bytes in an id (`NCCL_UNIQUE_ID_BYTES`).
    pub const LEN: usize = 128;

    /// A fresh id (`ncclGetUniqueId`). Needs libnccl; a missing one, or an NCCL failure (no
    /// usable network interface, say), is a [`CollectiveError::Setup`] (reported for rank 0, the
    /// usual maker).
    pub fn new() -> Result<NcclId, CollectiveError> {
        let setup = |detail: String| CollectiveError::Setup { rank: 0, detail };
        nccl_library().map_err(|missing| setup(missing.to_string()))?;
        let raw = guarded("ncclGetUniqueId", 0, || {
            (nccl::get_uniqueid())
                .map_err(|e| setup(describe("ncclGetUniqueId", e.0 as u32, std::ptr::null_mut()).to_string()))
        })?;
        Ok(NcclId(raw.internal.map(|c| c as u8)))
    }

    /// The id with these bytes (as received from the maker).
    pub fn from_bytes(bytes: [u8; NcclId::LEN]) -> NcclId {
        NcclId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; NcclId::LEN] {
        &self.0
    }

    /// 256 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id written by [`NcclId::to_hex`] (either case).
    pub fn from_hex(hex: &str) -> Result<NcclId, ParseNcclIdError> {
        if hex.len() != 2 * NcclId::LEN {
            return Err(ParseNcclIdError(format!("{} hex digits, not {}", hex.len(), 2 * NcclId::LEN)));
        }
        let mut bytes = [0u8; NcclId::LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(|| ParseNcclIdError("not ASCII".into()))?;
            *byte = u8::from_str_radix(pair, 16)
                .map_err(|_| ParseNcclIdError(format!("{pair:?} at {} is not a hex byte", 2 * i)))?;
        }
        Ok(NcclId(bytes))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId { internal: self.0.map(|b| b as c_char) }
    }
}

impl TryFrom<&[u8]> for NcclId {
    type Error = ParseNcclIdError;

    fn try_from(bytes: &[u8]) -> Result<NcclId, ParseNcclIdError> {
        let bytes: [u8; NcclId::LEN] =
            bytes.try_into().map_err(|_| ParseNcclIdError(format!("{} bytes, not {}", bytes.len(), NcclId::LEN)))?;
        Ok(NcclId(bytes))
    }
}

impl FromStr for NcclId {
    type Err = ParseNcclIdError;

    fn from_str(s: &str) -> Result<NcclId, ParseNcclIdError> {
        NcclId::from_hex(s)
    }
}

impl fmt::Display for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclId({})", self.to_hex())
    }
}

impl serde::Serialize for NcclId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for NcclId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<NcclId, D::Error> {
        let hex = <String as serde::Deserialize>::deserialize(deserializer)?;
        NcclId::from_hex(&hex).map_err(serde::de::Error::custom)
    }
}

/// A string or byte slice that is not an [`NcclId`].
#[derive(Debug, thiserror::Error)]
#[error("not an NCCL unique id: {0}")]
pub struct ParseNcclIdError(String);

// ---- the communicator ----

/// One rank of an NCCL group on one GPU, implementing [`Collective`] over host buffers (see the
/// module docs for how each call runs, what `bytes_sent` counts and what the timeouts cover).
pub struct NcclCollective {
    rank: usize,
    world: usize,
    ordinal: usize,
    version: String,
    timeout: Duration,
    state: Mutex<State>,
    bytes_sent: AtomicU64,
    // After `state`: the communicator is aborted (in `drop`) before its stream goes.
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

struct State {
    /// `None` once aborted (and then `broken` says why).
    comm: Option<Comm>,
    broken: Option<String>,
}

/// A live NCCL communicator handle.
struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as its calls do not overlap;
// every call goes through the mutex around `State`.
unsafe impl Send for Comm {}

impl NcclCollective {
    /// Rank `rank` of a group of `world`, on CUDA device `device_ordinal`, joining the group
    /// named by `id` (the same id on every rank; each rank on its own GPU). Returns once every
    /// rank has joined, or fails with [`CollectiveError::Setup`] after
    /// `options.setup_timeout`, or at once when libcuda, libnccl or the device is missing.
    pub fn new(
        rank: usize,
        world: usize,
        id: NcclId,
        device_ordinal: usize,
        options: &CollectiveOptions,
    ) -> Result<NcclCollective, CollectiveError> {
        let options = options.clamped();
        let setup = |detail: String| CollectiveError::Setup { rank, detail };
        if rank >= world || i32::try_from(world).is_err() {
            return Err(setup(format!("rank {rank} is not a rank of a group of {world}")));
        }
        let missing: Vec<String> =
            [driver_library(), nccl_library()].into_iter().filter_map(Result::err).map(|e| e.to_string()).collect();
        if !missing.is_empty() {
            return Err(setup(missing.join("; ")));
        }
        guarded("NCCL set-up", rank, || NcclCollective::init(rank, world, id, device_ordinal, &options))
    }

    fn init(
        rank: usize,
        world: usize,
        id: NcclId,
        ordinal: usize,
        options: &CollectiveOptions,
    ) -> Result<NcclCollective, CollectiveError> {
        let setup = |detail: String| CollectiveError::Setup { rank, detail };
        let cuda = |what: &'static str| move |e: DriverError| setup(format!("cuda:{ordinal}: {what}: {e}"));
        let count = CudaContext::device_count().map_err(cuda("counting devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(setup(format!("cuda:{ordinal} does not exist ({count} CUDA devices)")));
        }
        let version = nccl::get_nccl_version()
            .map_or_else(|_| "unknown".to_string(), |v| format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100));
        let ctx = CudaContext::new(ordinal).map_err(cuda("creating the context"))?;
        // SAFETY: everything this communicator does on the device runs on the one stream below,
        // so the cross-stream events cudarc would record for each buffer are never needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda("creating a stream"))?;
        ctx.bind_to_thread().map_err(cuda("binding the context"))?;
        let comm = init_comm(rank, world, id, options.setup_timeout, |detail| {
            setup(format!("cuda:{ordinal}, NCCL {version}: {detail}"))
        })?;
        Ok(NcclCollective {
            rank,
            world,
            ordinal,
            version,
            timeout: options.timeout,
            state: Mutex::new(State { comm: Some(comm), broken: None }),
            bytes_sent: AtomicU64::new(0),
            stream,
            ctx,
        })
    }

    /// The CUDA device this rank runs on.
    pub fn device_ordinal(&self) -> usize {
        self.ordinal
    }

    /// The version of the libnccl in use (`major.minor.patch`).
    pub fn nccl_version(&self) -> &str {
        &self.version
    }

    /// Runs one call: refuses if an earlier one failed; on failure aborts the communicator (if
    /// the call did not already) and keeps why, for every later call.
    fn run<T>(&self, op: Op, body: impl FnOnce(&Step<'_>) -> Result<T, Failure>) -> Result<T, CollectiveError> {
        let (rank, name) = (self.rank, op.name());
        let mut state = self.state.lock().map_err(|_| CollectiveError::Broken {
            rank,
            op: name,
            cause: "a thread panicked inside a collective".into(),
            culprit: None,
        })?;
        // NCCL does not say which peer failed (module docs): its failures blame no one.
        let broken = |cause: String| CollectiveError::Broken { rank, op: name, cause, culprit: None };
        if let Some(cause) = &state.broken {
            return Err(broken(cause.clone()));
        }
        let Some(comm) = state.comm.as_ref() else {
            return Err(broken("the communicator was aborted".into()));
        };
        let step = Step {
            comm: comm.0,
            world: self.world,
            stream: &self.stream,
            timeout: self.timeout,
            aborted: Cell::new(false),
        };
        let result = match self.ctx.bind_to_thread() {
            Err(e) => Err(Failure::Failed(format!("CUDA: binding the context: {e}"))),
            Ok(()) => catch_unwind(AssertUnwindSafe(|| body(&step)))
                .unwrap_or_else(|panic| Err(Failure::Failed(format!("panicked: {}", panic_text(&*panic))))),
        };
        let failure = match result {
            Ok(value) => return Ok(value),
            Err(failure) => failure,
        };
        // The call's device buffers are gone by now (freed in stream order).
        let comm = state.comm.take();
        if !step.aborted.get()
            && let Some(comm) = comm
        {
            abort(comm);
        }
        let err = match failure {
            Failure::Timeout(waiting_for) => {
                // NCCL does not say which peer stalled (module docs).
                let peer = if self.world == 2 { 1 - self.rank } else { (self.rank + 1) % self.world };
                state.broken = Some(format!("{name} timed out after {:?} waiting for {waiting_for}", self.timeout));
                CollectiveError::Timeout { rank, op: name, peer, timeout: self.timeout }
            }
            Failure::Failed(cause) => {
                let cause = format!("{cause}; the communicator was aborted");
                state.broken = Some(format!("{name}: {cause}"));
                broken(cause)
            }
        };
        Err(err)
    }

    fn invalid(&self, op: Op, detail: String) -> CollectiveError {
        CollectiveError::InvalidArgument { rank: self.rank, op: op.name(), detail }
    }

    fn check_root(&self, op: Op, root: usize) -> Result<(), CollectiveError> {
        if root < self.world {
            return Ok(());
        }
        Err(self.invalid(op, format!("root {root} is not a rank of a world of {}", self.world)))
    }

    fn count(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Nominal bytes this rank sends in a ring broadcast of `bytes` from `root`: all but the
    /// last rank of the ring forward the buffer once.
    fn broadcast_volume(&self, bytes: usize, root: usize) -> usize {
        if self.rank == (root + self.world - 1) % self.world { 0 } else { bytes }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(comm) = state.comm.take() {
            let _ = self.ctx.bind_to_thread();
            abort(comm);
        }
    }
}

impl fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.ordinal)
            .field("nccl", &self.version)
            .finish()
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let len = buf.len();
        self.run(Op::AllReduce, |s| {
            if len == 0 {
                return Ok(());
            }
            let mut dev = s.upload(buf, len)?;
            let p = s.ptr_mut(&mut dev);
            s.collective("ncclAllReduce", || unsafe {
                // SAFETY: `p` holds `len` floats, on this communicator's device; in place is allowed.
                nccl::all_reduce(p, p, len, F32, sys::ncclRedOp_t::ncclSum, s.comm, s.nccl_stream())
            })?;
            s.download(&dev, buf)
        })?;
        self.count(2 * (self.world - 1) * len * 4 / self.world);
        Ok(())
    }

    fn all_gather(&self, input: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let n = self.world;
        let (out, max) = self.run(Op::AllGather, |s| {
            let lens = s.all_gather_u64(&[input.len() as u64])?;
            let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
            let max = lens.iter().copied().max().unwrap_or(0);
            let mut out = Vec::with_capacity(lens.iter().sum());
            if max > 0 {
                let send = s.upload(input, max)?;
                let mut recv = s.zeros::<f32>(n * max)?;
                let (src, dst) = (s.ptr(&send), s.ptr_mut(&mut recv));
                s.collective("ncclAllGather", || unsafe {
                    // SAFETY: `src` holds `max` floats and `dst` `n * max`, on this device.
                    nccl::all_gather(src, dst, max, F32, s.comm, s.nccl_stream())
                })?;
                let mut host = vec![0.0f32; n * max];
                s.download(&recv, &mut host)?;
                for (r, &len) in lens.iter().enumerate() {
                    out.extend_from_slice(&host[r * max..r * max + len]);
                }
            }
            Ok((out, max))
        })?;
        self.count((n - 1) * (8 + max * 4));
        Ok(out)
    }

    fn reduce_scatter_sum(&self, input: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let op = Op::ReduceScatter;
        let n = self.world;
        if !input.len().is_multiple_of(n) {
            let detail = format!("length {} is not divisible by the world size {n}", input.len());
            return Err(self.invalid(op, detail));
        }
        let chunk = input.len() / n;
        let out = self.run(op, |s| {
            let mut out = vec![0.0f32; chunk];
            if chunk == 0 {
                return Ok(out);
            }
            let send = s.upload(input, input.len())?;
            let mut recv = s.zeros::<f32>(chunk)?;
            let (src, dst) = (s.ptr(&send), s.ptr_mut(&mut recv));
            s.collective("ncclReduceScatter", || unsafe {
                // SAFETY: `src` holds `n * chunk` floats and `dst` `chunk`, on this device.
                nccl::reduce_scatter(src, dst, chunk, F32, sys::ncclRedOp_t::ncclSum, s.comm, s.nccl_stream())
            })?;
            s.download(&recv, &mut out)?;
            Ok(out)
        })?;
        self.count((n - 1) * chunk * 4);
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let op = Op::Broadcast;
        self.check_root(op, root)?;
        let len = buf.len();
        let is_root = self.rank == root;
        self.run(op, |s| {
            if len == 0 {
                return Ok(());
            }
            let mut dev = if is_root { s.upload(buf, len)? } else { s.zeros(len)? };
            let p = s.ptr_mut(&mut dev);
            s.collective("ncclBroadcast", || unsafe {
                // SAFETY: `p` holds `len` floats on this device; in place is allowed.
                nccl::broadcast(p, p, len, F32, root as i32, s.comm, s.nccl_stream())
            })?;
            if !is_root {
                s.download(&dev, buf)?;
            }
            Ok(())
        })?;
        self.count(self.broadcast_volume(len * 4, root));
        Ok(())
    }

    fn all_to_all(&self, mut chunks: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CollectiveError> {
        let op = Op::AllToAll;
        let (n, me) = (self.world, self.rank);
        if chunks.len() != n {
            return Err(self.invalid(op, format!("{} chunks for a world of {n}", chunks.len())));
        }
        let send_lens: Vec<usize> = chunks.iter().map(Vec::len).collect();
        let sent: usize = (0..n).filter(|&j| j != me).map(|j| send_lens[j]).sum();
        let received = self.run(op, |s| {
            let sizes: Vec<u64> = send_lens.iter().map(|&l| l as u64).collect();
            // matrix[r * n + j]: what rank r sends to rank j.
            let matrix = s.all_gather_u64(&sizes)?;
            let recv_lens: Vec<usize> = (0..n).map(|j| if j == me { 0 } else { matrix[j * n + me] as usize }).collect();
            let packed: Vec<f32> = (0..n).filter(|&j| j != me).flat_map(|j| chunks[j].iter().copied()).collect();
            let recv_total: usize = recv_lens.iter().sum();
            let mut received: Vec<Vec<f32>> = (0..n).map(|_| Vec::new()).collect();
            received[me] = std::mem::take(&mut chunks[me]);
            if packed.is_empty() && recv_total == 0 {
                return Ok(received);
            }
            let send = s.upload(&packed, packed.len())?;
            let mut recv = s.zeros::<f32>(recv_total)?;
            let (src, dst) = (s.ptr(&send) as usize, s.ptr_mut(&mut recv) as usize);
            // Offsets of each peer's part in the packed buffers (rank order, this rank skipped).
            let (mut send_at, mut recv_at) = (vec![0usize; n], vec![0usize; n]);
            let (mut so, mut ro) = (0, 0);
            for j in (0..n).filter(|&j| j != me) {
                (send_at[j], recv_at[j]) = (so, ro);
                so += send_lens[j];
                ro += recv_lens[j];
            }
            s.grouped("all_to_all ncclSend/ncclRecv", || {
                for k in 1..n {
                    let peer = (me + k) % n;
                    if send_lens[peer] > 0 {
                        let p = (src + send_at[peer] * 4) as *const c_void;
                        // SAFETY: `p` is inside `send`, with `send_lens[peer]` floats after it.
                        unsafe { nccl::send(p, send_lens[peer], F32, peer as i32, s.comm, s.nccl_stream()) }?;
                    }
                    if recv_lens[peer] > 0 {
                        let p = (dst + recv_at[peer] * 4) as *mut c_void;
                        // SAFETY: `p` is inside `recv`, with room for `recv_lens[peer]` floats.
                        unsafe { nccl::recv(p, recv_lens[peer], F32, peer as i32, s.comm, s.nccl_stream()) }?;
                    }
                }
                Ok(())
            })?;
            let mut host = vec![0.0f32; recv_total];
            s.download(&recv, &mut host)?;
            for j in (0..n).filter(|&j| j != me) {
                received[j] = host[recv_at[j]..recv_at[j] + recv_lens[j]].to_vec();
            }
            Ok(received)
        })?;
        self.count((n - 1) * n * 8 + sent * 4);
        Ok(received)
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.run(Op::Barrier, |s| {
            let mut dev = s.upload(&[0.0f32], 1)?;
            let p = s.ptr_mut(&mut dev);
            s.collective("ncclAllReduce", || unsafe {
                // SAFETY: `p` holds one float on this device.
                nccl::all_reduce(p, p, 1, F32, sys::ncclRedOp_t::ncclSum, s.comm, s.nccl_stream())
            })
        })?;
        self.count(2 * (self.world - 1) * 4 / self.world);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        let op = Op::BroadcastBytes;
        self.check_root(op, root)?;
        let is_root = self.rank == root;
        let len = self.run(op, |s| {
            let mut dev = s.upload(&[buf.len() as u64], 1)?;
            let p = s.ptr_mut(&mut dev);
            s.collective("ncclBroadcast", || unsafe {
                // SAFETY: `p` holds one u64 on this device; in place is allowed.
                nccl::broadcast(p, p, 1, U64, root as i32, s.comm, s.nccl_stream())
            })?;
            let mut len = [0u64];
            s.download(&dev, &mut len)?;
            let len = usize::try_from(len[0]).map_err(|_| Failure::Failed(format!("length {} too large", len[0])))?;
            if len == 0 {
                buf.clear();
                return Ok(0);
            }
            let mut dev = if is_root { s.upload(buf.as_slice(), len)? } else { s.zeros::<u8>(len)? };
            let p = s.ptr_mut(&mut dev);
            s.collective("ncclBroadcast", || unsafe {
                // SAFETY: `p` holds `len` bytes on this device; in place is allowed.
                nccl::broadcast(p, p, len, U8, root as i32, s.comm, s.nccl_stream())
            })?;
            if !is_root {
                buf.clear();
                buf.resize(len, 0);
                s.download(&dev, buf.as_mut_slice())?;
            }
            Ok(len)
        })?;
        self.count(self.broadcast_volume(8 + len, root));
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }
}

// ---- one call's steps ----

const F32: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
const U64: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint64;
const U8: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint8;

/// Why a call failed, before it becomes a [`CollectiveError`].
enum Failure {
    /// A step did not finish within the timeout; says what it waited for.
    Timeout(String),
    /// NCCL or CUDA reported an error (the message says which and what).
    Failed(String),
}

/// What the steps of one call share: the communicator, the stream and the per-step bound.
struct Step<'a> {
    comm: sys::ncclComm_t,
    world: usize,
    stream: &'a Arc<CudaStream>,
    timeout: Duration,
    /// Set when a step aborted the communicator (so `run` does not abort it again).
    aborted: Cell<bool>,
}

impl Step<'_> {
    fn nccl_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// A device buffer of `len` elements (at least one: the driver refuses empty allocations),
    /// starting with `data` and zero after it.
    fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, data: &[T], len: usize) -> Result<CudaSlice<T>, Failure> {
        let mut buf = self.zeros::<T>(len.max(data.len()))?;
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut buf).map_err(cuda_failure("copying to the device"))?;
        }
        Ok(buf)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>, Failure> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(cuda_failure("allocating device memory"))
    }

    /// Copies the first `out.len()` elements of `buf` to the host. Only after the step that
    /// wrote `buf` finished: a copy to pageable memory waits for the stream, unwatched.
    fn download<T: DeviceRepr>(&self, buf: &CudaSlice<T>, out: &mut [T]) -> Result<(), Failure> {
        if out.is_empty() {
            return Ok(());
        }
        let view = buf.slice(0..out.len());
        self.stream.memcpy_dtoh(&view, out).map_err(cuda_failure("copying to the host"))?;
        self.stream.synchronize().map_err(cuda_failure("copying to the host"))
    }

    fn ptr<T>(&self, buf: &CudaSlice<T>) -> *const c_void {
        let (p, _record) = buf.device_ptr(self.stream);
        p as *const c_void
    }

    fn ptr_mut<T>(&self, buf: &mut CudaSlice<T>) -> *mut c_void {
        let (p, _record) = buf.device_ptr_mut(self.stream);
        p as *mut c_void
    }

    /// One NCCL collective: enqueued by `call`, then waited for.
    fn collective(
        &self,
        name: &'static str,
        call: impl FnOnce() -> Result<NcclStatus, NcclError>,
    ) -> Result<(), Failure> {
        let status = call().map_err(|e| self.fail(describe(name, e.0 as u32, self.comm)))?;
        if status == NcclStatus::InProgress {
            self.wait_enqueued(name)?;
        }
        self.wait_done(name)
    }

    /// Point-to-point calls made by `calls` inside `ncclGroupStart`..`ncclGroupEnd`, then waited
    /// for. The group is closed even when a call inside fails.
    fn grouped(&self, name: &'static str, calls: impl FnOnce() -> Result<(), NcclError>) -> Result<(), Failure> {
        nccl::group_start().map_err(|e| self.fail(describe("ncclGroupStart", e.0 as u32, self.comm)))?;
        let inside = calls();
        let end = nccl::group_end();
        inside.map_err(|e| self.fail(describe(name, e.0 as u32, self.comm)))?;
        let status = end.map_err(|e| self.fail(describe("ncclGroupEnd", e.0 as u32, self.comm)))?;
        if status == NcclStatus::InProgress {
            self.wait_enqueued(name)?;
        }
        self.wait_done(name)
    }

    /// A non-blocking communicator may still be enqueueing (connecting to peers on first use):
    /// polls until it is done.
    fn wait_enqueued(&self, name: &'static str) -> Result<(), Failure> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::default();
        loop {
            match async_state(self.comm) {
                Ok(false) => return Ok(()),
                Ok(true) => {}
                Err(fault) => return Err(self.fail(format!("{name}: {fault}"))),
            }
            if Instant::now() >= deadline {
                return Err(self.time_out(format!("{name} to be enqueued (connecting to the peers)")));
            }
            backoff.wait();
        }
    }

    /// Waits for the work queued on the stream (the collective's kernels), watching NCCL's
    /// error state.
    fn wait_done(&self, name: &'static str) -> Result<(), Failure> {
        let event = self.stream.record_event(None).map_err(|e| self.fail(format!("CUDA: recording an event: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::default();
        loop {
            let done = event.try_is_complete().map_err(|e| self.fail(format!("CUDA: {name}: {e}")))?;
            match async_state(self.comm) {
                Err(fault) => return Err(self.fail(format!("{name}: {fault}"))),
                Ok(_) if done => return Ok(()),
                Ok(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(self.time_out(format!("{name} to complete")));
            }
            backoff.wait();
        }
    }

    /// Aborts the communicator at once (so this call's kernels stop before its buffers are
    /// freed) and returns the failure.
    fn fail(&self, cause: impl fmt::Display) -> Failure {
        self.abort_now();
        Failure::Failed(cause.to_string())
    }

    fn time_out(&self, waiting_for: String) -> Failure {
        self.abort_now();
        Failure::Timeout(waiting_for)
    }

    fn abort_now(&self) {
        if !self.aborted.replace(true) {
            abort(Comm(self.comm));
        }
    }

    /// Every rank's `values` (the same count on each), in rank order.
    fn all_gather_u64(&self, values: &[u64]) -> Result<Vec<u64>, Failure> {
        let n = self.world;
        let send = self.upload(values, values.len())?;
        let mut recv = self.zeros::<u64>(n * values.len())?;
        let (src, dst) = (self.ptr(&send), self.ptr_mut(&mut recv));
        let count = values.len();
        self.collective("ncclAllGather", || unsafe {
            // SAFETY: `src` holds `count` u64s and `dst` `n * count`, on this device.
            nccl::all_gather(src, dst, count, U64, self.comm, self.nccl_stream())
        })?;
        let mut out = vec![0u64; n * count];
        self.download(&recv, &mut out)?;
        Ok(out)
    }
}

fn cuda_failure(what: &'static str) -> impl Fn(DriverError) -> Failure {
    move |e| Failure::Failed(format!("CUDA: {what}: {e}"))
}

/// Polling with a short spin, then sleeps growing to 1 ms: a small collective returns within
/// microseconds, and a long wait costs little CPU.
struct Backoff {
    spins: u32,
    sleep: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { spins: 0, sleep: Duration::from_micros(20) }
    }
}

impl Backoff {
    fn wait(&mut self) {
        if self.spins < 64 {
            self.spins += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(Duration::from_millis(1));
        }
    }
}

// ---- NCCL helpers ----

const NCCL_SUCCESS: u32 = 0;
const NCCL_IN_PROGRESS: u32 = 7;

/// Whether the communicator is still busy (`Ok(true)`: set-up or an enqueue in progress), or
/// the error it is in.
fn async_state(comm: sys::ncclComm_t) -> Result<bool, NcclFault> {
    let mut code: u32 = NCCL_SUCCESS;
    // SAFETY: `comm` is live; NCCL writes one `ncclResult_t` (a C enum, 4 bytes) into `code`,
    // read as an integer so that a code this binding does not know is not undefined behaviour.
    let ret = unsafe { sys::ncclCommGetAsyncError(comm, (&raw mut code).cast::<sys::ncclResult_t>()) };
    if let Err(e) = ret.result() {
        return Err(describe("ncclCommGetAsyncError", e.0 as u32, comm));
    }
    match code {
        NCCL_SUCCESS => Ok(false),
        NCCL_IN_PROGRESS => Ok(true),
        code => Err(describe("asynchronous error", code, comm)),
    }
}

/// An NCCL call that failed: NCCL's result code, and the communicator's last error message
/// (empty when it has none).
#[derive(Debug)]
struct NcclFault {
    call: &'static str,
    code: u32,
    last: String,
}

impl fmt::Display for NcclFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.code {
            1 => "unhandled CUDA error",
            2 => "system error (a socket or system call failed; in a collective, often a peer that died)",
            3 => "internal error",
            4 => "invalid argument",
            5 => "invalid usage",
            6 => "remote error (a peer failed or left the group)",
            8 => "timeout",
            _ => "error",
        };
        write!(f, "NCCL {}: {kind} (code {})", self.call, self.code)?;
        if !self.last.is_empty() {
            write!(f, ": {}", self.last)?;
        }
        Ok(())
    }
}

impl std::error::Error for NcclFault {}

/// NCCL's error `code` from `call`, with the communicator's last error message.
fn describe(call: &'static str, code: u32, comm: sys::ncclComm_t) -> NcclFault {
    // SAFETY: returns null or a NUL-terminated string that NCCL keeps; `comm` is live or null
    // (NCCL then reports this thread's last error).
    let last = unsafe { sys::ncclGetLastError(comm) };
    let last = if last.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated (above); copied at once.
        unsafe { CStr::from_ptr(last) }.to_string_lossy().trim().to_string()
    };
    NcclFault { call, code, last }
}

/// Aborts a communicator (local: frees its resources and stops its kernels, never waits for
/// peers). Errors and panics are ignored: there is nothing left to do with it.
fn abort(comm: Comm) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `comm` is live and never used again (it is consumed here).
        let _ = unsafe { nccl::comm_abort(comm.0) };
    }));
}

/// `ncclConfig_t` as `NCCL_CONFIG_INITIALIZER` makes it (every option undefined, NCCL's
/// defaults) but non-blocking. `size` and `version` tell NCCL which fields this layout (that of
/// NCCL 2.30, cudarc's) has: an older libnccl reads the prefix it knows, a newer one takes its
/// defaults for the fields after it.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN; // NCCL_CONFIG_UNDEF_INT
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 2 * 10000 + 30 * 100, // NCCL_VERSION(2, 30, 0)
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Joins the group (`ncclCommInitRankConfig`, non-blocking) and polls until every rank has, or
/// `setup_timeout` has passed; a failure is the set-up error `setup` makes of its detail. The
/// calling thread has the device's context bound.
fn init_comm(
    rank: usize,
    world: usize,
    id: NcclId,
    setup_timeout: Duration,
    setup: impl Fn(String) -> CollectiveError,
) -> Result<Comm, CollectiveError> {
    let mut config = nonblocking_config();
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` and `config` outlive the call and the set-up polled below; `world` fits an
    // i32 (checked by the caller) and `rank < world`.
    let started = unsafe { nccl::comm_init_rank_config(&mut comm, world as i32, id.raw(), rank as i32, &mut config) };
    if let Err(e) = started {
        let fault = describe("ncclCommInitRankConfig", e.0 as u32, comm);
        if !comm.is_null() {
            abort(Comm(comm));
        }
        return Err(setup(fault.to_string()));
    }
    if comm.is_null() {
        return Err(setup("ncclCommInitRankConfig returned no communicator".into()));
    }
    let comm = Comm(comm);
    let deadline = Instant::now() + setup_timeout;
    let mut backoff = Backoff::default();
    loop {
        match async_state(comm.0) {
            Ok(false) => return Ok(comm),
            Ok(true) => {}
            Err(fault) => {
                abort(comm);
                return Err(setup(format!("joining the group of {world}: {fault}")));
            }
        }
        if Instant::now() >= deadline {
            abort(comm);
            return Err(setup(format!(
                "the group of {world} did not form within {setup_timeout:?}: a rank never came, the ranks \
                 were given different ids or world sizes, or the id's maker is unreachable"
            )));
        }
        backoff.wait();
    }
}

// ---- libraries ----

/// The NCCL functions this module calls (cudarc panics on a missing one): all in NCCL >= 2.14.
const NCCL_SYMBOLS: [&str; 14] = [
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRankConfig",
    "ncclCommGetAsyncError",
    "ncclCommAbort",
    "ncclGetLastError",
    "ncclAllReduce",
    "ncclAllGather",
    "ncclReduceScatter",
    "ncclBroadcast",
    "ncclSend",
    "ncclRecv",
    "ncclGroupStart",
    "ncclGroupEnd",
];

/// A CUDA or NCCL library that cannot be used: not found, failing to load, or without the
/// functions this module calls; the message says which and how to fix it.
#[derive(Clone, Debug)]
struct MissingLibrary(String);

impl fmt::Display for MissingLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MissingLibrary {}

fn nccl_library() -> Result<(), MissingLibrary> {
    static NCCL: OnceLock<Result<(), MissingLibrary>> = OnceLock::new();
    NCCL.get_or_init(|| {
        probe(
            &["nccl"],
            "NCCL (libnccl)",
            &NCCL_SYMBOLS,
            "install NCCL (pip `nvidia-nccl-cu13`, or apt `libnccl2` with `libnccl-dev`)",
        )
    })
    .clone()
}

fn driver_library() -> Result<(), MissingLibrary> {
    static DRIVER: OnceLock<Result<(), MissingLibrary>> = OnceLock::new();
    DRIVER
        .get_or_init(|| probe(&["cuda", "nvcuda"], "the CUDA driver (libcuda)", &[], "install the NVIDIA driver"))
        .clone()
}

/// Looks for a library with the file names cudarc tries, in its order, and checks that the one
/// cudarc will open has `symbols`.
fn probe(names: &[&str], what: &str, symbols: &[&str], fix: &str) -> Result<(), MissingLibrary> {
    let mut candidates: Vec<String> = Vec::new();
    for name in names.iter().flat_map(|n| cudarc::get_lib_name_candidates(n)) {
        if !candidates.contains(&name) {
            candidates.push(name);
        }
    }
    // The most telling failure: a file that exists but does not load (a dependency missing)
    // beats "no such file" for every other name.
    let mut why = String::from("no candidate names");
    for name in &candidates {
        // SAFETY: loading the library runs its initialisers, as cudarc's own loading of the same
        // name does a moment later; the handle is closed again at the end of this block.
        match unsafe { libloading::Library::new(name.as_str()) } {
            Ok(lib) => {
                let missing: Vec<&str> = symbols
                    .iter()
                    .copied()
                    // SAFETY: only looks the symbol up; it is never called through this handle.
                    .filter(|s| unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_err())
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                return Err(MissingLibrary(format!(
                    "{what} at {name} lacks {missing:?} (NCCL 2.14 or newer is needed); {fix} and make sure \
                     its directory comes first on LD_LIBRARY_PATH"
                )));
            }
            Err(e) => {
                // libloading's message is "dlopen failed"; the reason is its source.
                let e = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                if why == "no candidate names" || !e.contains("No such file") {
                    why = e;
                }
            }
        }
    }
    let mut hint = String::new();
    if names.contains(&"nccl") {
        // SAFETY: as above.
        if unsafe { libloading::Library::new("libnccl.so.2") }.is_ok() {
            hint = " (libnccl.so.2 is installed, but cudarc opens only the names above: put a link named \
                    libnccl.so to it in a directory on LD_LIBRARY_PATH)"
                .into();
        }
    }
    Err(MissingLibrary(format!(
        "{what} could not be loaded (tried {candidates:?}: {why}){hint}; {fix} and make sure its directory \
         is on LD_LIBRARY_PATH"
    )))
}

/// Runs the set-up step `f` of rank `rank`, turning a panic (cudarc panics on a library or
/// symbol it cannot load) into a set-up error.
fn guarded<T>(what: &str, rank: usize, f: impl FnOnce() -> Result<T, CollectiveError>) -> Result<T, CollectiveError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(CollectiveError::Setup { rank, detail: format!("{what} panicked: {}", panic_text(&*panic)) })
    })
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
        .to_string()
}

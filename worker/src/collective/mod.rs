//! Collectives for tensor and expert parallelism (issue 8): one trait, [`Collective`], and its
//! host-memory implementation, [`HostCollective`], over two kinds of links: in-process channels
//! ([`LocalGroup`], for unit tests) and TCP ([`TcpGroup`], for CPU workers, tests on loopback and
//! machines without NCCL). With the `cuda` feature, `NcclCollective` implements the same trait
//! over NCCL on GPUs (one rank per GPU, joined by an `NcclId`); its contract differs in what
//! NCCL cannot tell (see `nccl.rs`: no mismatch detection, a timeout bounds each NCCL step, not
//! silence, and does not know the peer at fault).
//!
//! Map:
//! - `mod.rs`: the trait, its error, the options and [`HostCollective`].
//! - `group.rs`: the algorithms (ring reduce-scatter and all-gather, point-to-point for the rest)
//!   and the bookkeeping that turns a silent or departed peer into an error, over any link.
//! - `local.rs`: links as channels between threads.
//! - `tcp.rs`: links as TCP connections (full mesh), the set-up handshake and the wire format.
//! - `nccl.rs` (feature `cuda`): the NCCL backend, libnccl and libcuda opened at run time (a
//!   missing one is a set-up error, not a panic).
//!
//! # Contract
//! Every rank of a group calls the same collectives in the same order with matching arguments
//! (same lengths, same root). Each call carries its kind and sequence number on the wire, so a
//! rank that calls something else fails with [`CollectiveError::Mismatch`] instead of silently
//! mixing data. Calls on one communicator are serialised (it is `Sync`, but a group has one
//! order of calls); use one communicator per concurrent stream of collectives.
//!
//! # Ring all-reduce and its numerics
//! `all_reduce_sum` is a reduce-scatter followed by an all-gather around the ring
//! `0 -> 1 -> ... -> N-1 -> 0`, so each rank sends `2(N-1)/N` of the buffer, the bandwidth
//! optimum. The buffer is cut into N chunks (the first `len % N` one element longer). Chunk `c`
//! is summed as it travels: it starts at rank `c+1` and every rank on the way adds its own copy,
//! so its sum is `((x[c+1] + x[c+2]) + ...) + x[c]` (ranks mod N), then the finished chunk goes
//! round the ring again as plain copies. Float addition is not associative, so this order is
//! part of the result (it differs from a serial sum in the last bits); but every rank receives
//! the same bits of every finished chunk, so all ranks end with bit-identical buffers, and
//! `reduce_scatter_sum` gives exactly the chunks `all_reduce_sum` would.
//!
//! # Failure
//! A call waits at most [`CollectiveOptions::timeout`] for each message (the bound is on
//! silence, so a long call that keeps making progress is never cut short) and then fails with
//! [`CollectiveError::Timeout`] naming the peer it waited for. Departures are noticed sooner,
//! with [`CollectiveError::PeerGone`] naming the rank: a dropped communicator says goodbye with
//! the number of collectives it finished, and every rank still inside a later one fails at once
//! (every collective needs every rank); a connection that breaks without a goodbye (a crash) is
//! seen by every rank, since the TCP links are a full mesh, and fails the rank that waits on it
//! and every later call. A communicator that failed mid-call is out of step with its peers: it
//! refuses further calls ([`CollectiveError::Broken`]) and tells the others why, so they fail
//! at once too, and one failure brings the whole group down quickly and cleanly for the
//! coordinator to re-place.

mod group;
mod local;
#[cfg(feature = "cuda")]
mod nccl;
mod tcp;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use local::LocalGroup;
#[cfg(feature = "cuda")]
pub use nccl::{NcclCollective, NcclId, ParseNcclIdError};
pub use tcp::TcpGroup;

use group::Group;

/// The collectives a tensor- or expert-parallel group runs, over `f32` buffers on the host.
/// Every call returns an error rather than hanging when a peer is gone (see the module docs).
pub trait Collective: Send + Sync {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Element-wise sum over all ranks, in place; every rank ends with bit-identical contents.
    /// Any length (not only multiples of the world size), the same on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// Every rank's `input`, concatenated in rank order. Lengths may differ between ranks (a
    /// vocabulary that does not split evenly).
    fn all_gather(&self, input: &[f32]) -> Result<Vec<f32>, CollectiveError>;

    /// The element-wise sum over all ranks, of which this rank gets chunk `rank()` of
    /// `world_size()` equal chunks; the length must be divisible by the world size.
    fn reduce_scatter_sum(&self, input: &[f32]) -> Result<Vec<f32>, CollectiveError>;

    /// Rank `root`'s `buf` copied into every rank's `buf` (same length on every rank).
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;

    /// `chunks[i]` goes to rank `i`; the result's entry `j` is what rank `j` sent here. Sizes may
    /// differ per pair (expert dispatch). `chunks.len()` must be the world size.
    fn all_to_all(&self, chunks: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CollectiveError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CollectiveError>;

    /// Rank `root`'s bytes replace every other rank's `buf` (whose length need not match): rank
    /// 0 sends each iteration's batch plan this way.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;

    /// Payload bytes this rank has sent since the communicator was created (framing and
    /// handshakes not counted); the difference around a call is that call's volume.
    fn bytes_sent(&self) -> u64;
}

/// A failed collective. Every message starts with the rank that reports it and the call, and
/// names the peer at fault where there is one.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Nothing came from `peer` (or a send to it stalled) for `timeout`.
    #[error("rank {rank}: {op}: no progress from rank {peer} within {timeout:?} (is it alive?)")]
    Timeout { rank: usize, op: &'static str, peer: usize, timeout: Duration },

    /// `peer` left the group, crashed, or failed and gave up; `detail` says which. When it
    /// gave up because of another rank, `culprit` is that rank (as `peer` told it).
    #[error("rank {rank}: {op}: rank {peer} is gone: {detail}")]
    PeerGone { rank: usize, op: &'static str, peer: usize, detail: String, culprit: Option<usize> },

    /// `peer` called a different collective or passed a different length: the ranks' programs
    /// disagree.
    #[error("rank {rank}: {op}: rank {peer} disagrees: {detail}")]
    Mismatch { rank: usize, op: &'static str, peer: usize, detail: String },

    /// The arguments are wrong on this rank alone (a root out of range, a length not divisible
    /// by the world size); nothing was sent and the communicator stays usable.
    #[error("rank {rank}: {op}: {detail}")]
    InvalidArgument { rank: usize, op: &'static str, detail: String },

    /// An earlier call failed part way, so this communicator is out of step with its peers;
    /// `culprit` is the rank that failure blamed, if it blamed one.
    #[error("rank {rank}: {op}: communicator unusable after an earlier failure ({cause})")]
    Broken { rank: usize, op: &'static str, cause: String, culprit: Option<usize> },

    /// The group could not be formed (a rank never came, a handshake disagreed, an address
    /// could not be bound) by the set-up deadline.
    #[error("rank {rank}: set-up: {detail}")]
    Setup { rank: usize, detail: String },
}

impl CollectiveError {
    /// The rank at fault, where this error names one: the peer that went silent or
    /// disagreed, or for a peer that gave up, the rank it blamed (down a chain of ranks that
    /// gave up one after another, the one that really failed). It may be this very rank, when
    /// the others found it silent.
    pub fn culprit(&self) -> Option<usize> {
        match self {
            CollectiveError::Timeout { peer, .. } | CollectiveError::Mismatch { peer, .. } => Some(*peer),
            CollectiveError::PeerGone { peer, culprit, .. } => culprit.or(Some(*peer)),
            CollectiveError::Broken { culprit, .. } => *culprit,
            CollectiveError::InvalidArgument { .. } | CollectiveError::Setup { .. } => None,
        }
    }
}

/// How long a communicator waits before it declares a peer gone.
#[derive(Clone, Debug)]
pub struct CollectiveOptions {
    /// The longest a call waits for any one message (or for a send to drain) before it fails.
    pub timeout: Duration,
    /// The deadline for forming the whole group (every connection and handshake).
    pub setup_timeout: Duration,
}

impl Default for CollectiveOptions {
    fn default() -> Self {
        // Generous: a peer may be busy with a long kernel between collectives; a dead peer is
        // normally noticed at once through its closed connection, not through this timeout.
        CollectiveOptions { timeout: Duration::from_secs(60), setup_timeout: Duration::from_secs(120) }
    }
}

impl CollectiveOptions {
    /// Both timeouts within [1 ms, 1 year]: zero is refused by sockets, and a deadline must be
    /// representable as an `Instant`.
    fn clamped(&self) -> CollectiveOptions {
        let clamp = |d: Duration| d.clamp(Duration::from_millis(1), Duration::from_secs(365 * 24 * 3600));
        CollectiveOptions { timeout: clamp(self.timeout), setup_timeout: clamp(self.setup_timeout) }
    }
}

/// The collectives of [`Collective`] run in host memory over point-to-point links (channels or
/// TCP). Built by [`LocalGroup`] or [`TcpGroup`]; dropping it tells the peers this rank left.
pub struct HostCollective {
    rank: usize,
    world: usize,
    group: Mutex<Group>,
    // Outside the mutex, so it can be read while another thread is inside a call.
    bytes_sent: Arc<AtomicU64>,
}

impl HostCollective {
    fn new(group: Group, bytes_sent: Arc<AtomicU64>) -> HostCollective {
        HostCollective { rank: group.rank(), world: group.world(), group: Mutex::new(group), bytes_sent }
    }

    fn with_group<T>(
        &self,
        op: Op,
        call: impl FnOnce(&mut Group) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        // A panic inside a call leaves the group half way through it, as a failure would.
        let mut group = self.group.lock().map_err(|_| CollectiveError::Broken {
            rank: self.rank,
            op: op.name(),
            cause: "a thread panicked inside a collective".into(),
            culprit: None,
        })?;
        call(&mut group)
    }

    /// Closes every connection without a goodbye, as a crashed process would.
    #[cfg(test)]
    pub(crate) fn sever(self) {
        if let Ok(mut group) = self.group.lock() {
            group.sever();
        }
    }
}

impl Collective for HostCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.with_group(Op::AllReduce, |g| g.all_reduce_sum(buf))
    }

    fn all_gather(&self, input: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        self.with_group(Op::AllGather, |g| g.all_gather(input))
    }

    fn reduce_scatter_sum(&self, input: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        self.with_group(Op::ReduceScatter, |g| g.reduce_scatter_sum(input))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.with_group(Op::Broadcast, |g| g.broadcast(buf, root))
    }

    fn all_to_all(&self, chunks: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CollectiveError> {
        self.with_group(Op::AllToAll, |g| g.all_to_all(chunks))
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.with_group(Op::Barrier, |g| g.barrier())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.with_group(Op::BroadcastBytes, |g| g.broadcast_bytes(buf, root))
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }
}

/// The collectives, as named in errors and tagged on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
    AllToAll,
    Barrier,
    BroadcastBytes,
}

impl Op {
    const ALL: [Op; 7] =
        [Op::AllReduce, Op::AllGather, Op::ReduceScatter, Op::Broadcast, Op::AllToAll, Op::Barrier, Op::BroadcastBytes];

    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter_sum",
            Op::Broadcast => "broadcast",
            Op::AllToAll => "all_to_all",
            Op::Barrier => "barrier",
            Op::BroadcastBytes => "broadcast_bytes",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    /// The name of a wire code, for a mismatch message.
    fn name_of(code: u8) -> &'static str {
        Op::ALL.iter().find(|op| op.code() == code).map_or("an unknown collective", |op| op.name())
    }
}

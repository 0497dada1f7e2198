//! The collective algorithms over point-to-point links, and the bookkeeping that turns a silent,
//! departed or disagreeing peer into an error. Both links (channels, TCP) share this code, so
//! they send the same messages in the same order and give bit-identical results.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{CollectiveError, Op};

/// How long a send that found a peer's end closed waits for that peer's last word (see
/// `Group::closed_by`).
const LAST_WORD_WAIT: Duration = Duration::from_millis(200);

/// One message on a link.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Frame {
    /// Part of collective number `seq` (counted from 0 on each rank) of kind `op`.
    Data { op: u8, seq: u64, payload: Vec<u8> },
    /// The sender dropped its communicator after finishing `completed` collectives.
    Goodbye { completed: u64 },
    /// The sender's collective failed; it will send nothing more. `culprit`: the rank its
    /// failure blamed, if any.
    Abort { reason: String, culprit: Option<usize> },
}

/// What a link delivers: a frame from `from`, or the news that its connection broke.
pub(crate) struct Event {
    pub from: usize,
    pub what: Incoming,
}

pub(crate) enum Incoming {
    Frame(Frame),
    Lost(String),
}

/// Why a send failed.
pub(crate) enum LinkError {
    TimedOut,
    Closed(String),
}

/// Point-to-point transport between the ranks of a group. Sends must not wait for the receiver
/// to call `next_event` (both links buffer without bound on the receiving side), so a ring step
/// can send before it receives without deadlock. Frames from one sender arrive in order.
pub(crate) trait Link: Send {
    fn send(&mut self, to: usize, frame: &Frame) -> Result<(), LinkError>;
    /// The next event from any peer, or `None` if none came within `wait`.
    fn next_event(&mut self, wait: Duration) -> Option<Event>;
    /// Best effort: tells every peer this rank leaves (or gave up), then stops sending.
    fn close(&mut self, last: &Frame);
    /// Closes every connection without a word, as a crashed process would.
    #[cfg(test)]
    fn sever(&mut self) {}
}

/// How a peer left the group.
enum Departure {
    /// It dropped its communicator after finishing `completed` collectives.
    Left { completed: u64 },
    /// Its collective failed and it gave up, blaming `culprit` if anyone.
    GaveUp { reason: String, culprit: Option<usize> },
    /// Its connection broke without a word: a crash, or an exit without dropping it.
    Lost { detail: String },
}

impl Departure {
    fn detail(&self) -> String {
        match self {
            Departure::Left { completed } => format!("it left the group after {completed} collective(s)"),
            Departure::GaveUp { reason, .. } => format!("it gave up: {reason}"),
            Departure::Lost { detail } => format!("connection lost ({detail})"),
        }
    }

    /// The rank the peer blamed when it gave up.
    fn culprit(&self) -> Option<usize> {
        match self {
            Departure::GaveUp { culprit, .. } => *culprit,
            _ => None,
        }
    }

    /// Whether collective number `seq` can no longer complete. Every collective needs every
    /// rank, so a peer that left before finishing it, or gave up, dooms it whether or not this
    /// rank waits on it. A lost connection is ambiguous in the call in progress (the peer may
    /// have sent all its part before it died): the rank that waits on it directly fails and
    /// gives up, which reaches the others at once; a later call knows it can never complete.
    fn dooms(&self, seq: u64, entering: bool) -> bool {
        match self {
            Departure::Left { completed } => *completed <= seq,
            Departure::GaveUp { .. } => true,
            Departure::Lost { .. } => entering,
        }
    }
}

/// One rank's end of a group: the link, the collective counter and what the peers sent ahead.
pub(crate) struct Group {
    rank: usize,
    world: usize,
    timeout: Duration,
    link: Box<dyn Link>,
    /// Collectives finished on this rank; also the number of the one in progress.
    seq: u64,
    /// Data frames that arrived before this rank asked for them, per sender, in order.
    pending: Vec<VecDeque<Frame>>,
    gone: Vec<Option<Departure>>,
    /// Why an earlier call failed; such a communicator is out of step and refuses calls.
    broken: Option<(String, Option<usize>)>,
    bytes_sent: Arc<AtomicU64>,
}

impl Group {
    pub(crate) fn new(rank: usize, world: usize, timeout: Duration, link: Box<dyn Link>) -> (Group, Arc<AtomicU64>) {
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let group = Group {
            rank,
            world,
            timeout,
            link,
            seq: 0,
            pending: (0..world).map(|_| VecDeque::new()).collect(),
            gone: (0..world).map(|_| None).collect(),
            broken: None,
            bytes_sent: Arc::clone(&bytes_sent),
        };
        (group, bytes_sent)
    }

    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    pub(crate) fn world(&self) -> usize {
        self.world
    }

    #[cfg(test)]
    pub(crate) fn sever(&mut self) {
        self.broken = Some(("severed".into(), None));
        self.link.sever();
    }

    // ---- the collectives ----

    pub(crate) fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let op = Op::AllReduce;
        let bounds = chunk_bounds(buf.len(), self.world);
        self.run(op, |g| {
            g.ring_reduce_scatter(op, buf, &bounds)?;
            g.ring_all_gather_chunks(op, buf, &bounds)
        })
    }

    pub(crate) fn all_gather(&mut self, input: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let op = Op::AllGather;
        self.run(op, |g| g.ring_all_gather_blocks(op, input))
    }

    pub(crate) fn reduce_scatter_sum(&mut self, input: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let op = Op::ReduceScatter;
        if !input.len().is_multiple_of(self.world) {
            let detail = format!("length {} is not divisible by the world size {}", input.len(), self.world);
            return Err(self.invalid(op, detail));
        }
        let bounds = chunk_bounds(input.len(), self.world);
        let mut buf = input.to_vec();
        self.run(op, |g| g.ring_reduce_scatter(op, &mut buf, &bounds))?;
        Ok(buf[bounds[self.rank].clone()].to_vec())
    }

    pub(crate) fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let op = Op::Broadcast;
        self.check_root(op, root)?;
        self.run(op, |g| {
            if g.rank == root {
                g.send_to_all_from(op, root, &f32_to_bytes(buf))
            } else {
                let bytes = g.recv(op, root)?;
                g.copy_f32(op, root, &bytes, buf)
            }
        })
    }

    pub(crate) fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        let op = Op::BroadcastBytes;
        self.check_root(op, root)?;
        self.run(op, |g| {
            if g.rank == root {
                g.send_to_all_from(op, root, buf)
            } else {
                *buf = g.recv(op, root)?;
                Ok(())
            }
        })
    }

    pub(crate) fn all_to_all(&mut self, mut chunks: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CollectiveError> {
        let op = Op::AllToAll;
        if chunks.len() != self.world {
            let detail = format!("{} chunks for a world of {}", chunks.len(), self.world);
            return Err(self.invalid(op, detail));
        }
        self.run(op, |g| {
            // Everyone sends first (links buffer), then receives; starting at the next rank
            // spreads the load instead of every rank sending to rank 0 first.
            for k in 1..g.world {
                let to = (g.rank + k) % g.world;
                g.send(op, to, f32_to_bytes(&chunks[to]))?;
            }
            let mut received: Vec<Vec<f32>> = (0..g.world).map(|_| Vec::new()).collect();
            received[g.rank] = std::mem::take(&mut chunks[g.rank]);
            for k in 1..g.world {
                let from = (g.rank + g.world - k) % g.world;
                let bytes = g.recv(op, from)?;
                received[from] = g.decode_f32(op, from, &bytes)?;
            }
            Ok(received)
        })
    }

    pub(crate) fn barrier(&mut self) -> Result<(), CollectiveError> {
        let op = Op::Barrier;
        self.run(op, |g| {
            for k in 1..g.world {
                g.send(op, (g.rank + k) % g.world, Vec::new())?;
            }
            for k in 1..g.world {
                g.recv(op, (g.rank + g.world - k) % g.world)?;
            }
            Ok(())
        })
    }

    // ---- ring steps ----

    /// After this, chunk `rank` of `buf` holds the sum over all ranks, accumulated in ring
    /// order from rank `rank+1` (module docs). At step `s` a rank passes on chunk
    /// `rank-s-1` and adds its own values to chunk `rank-s-2` coming from the previous rank.
    fn ring_reduce_scatter(&mut self, op: Op, buf: &mut [f32], bounds: &[Range<usize>]) -> Result<(), CollectiveError> {
        let (n, prev, next) = (self.world, self.prev(), self.next());
        for step in 0..n.saturating_sub(1) {
            let send_chunk = (self.rank + 2 * n - step - 1) % n;
            let recv_chunk = (self.rank + 2 * n - step - 2) % n;
            self.send(op, next, f32_to_bytes(&buf[bounds[send_chunk].clone()]))?;
            let bytes = self.recv(op, prev)?;
            self.add_f32(op, prev, &bytes, &mut buf[bounds[recv_chunk].clone()])?;
        }
        Ok(())
    }

    /// Starting with chunk `rank` final on each rank, copies every chunk to every rank: at step
    /// `s` a rank passes on chunk `rank-s` and receives chunk `rank-s-1`.
    fn ring_all_gather_chunks(
        &mut self,
        op: Op,
        buf: &mut [f32],
        bounds: &[Range<usize>],
    ) -> Result<(), CollectiveError> {
        let (n, prev, next) = (self.world, self.prev(), self.next());
        for step in 0..n.saturating_sub(1) {
            let send_chunk = (self.rank + n - step) % n;
            let recv_chunk = (self.rank + 2 * n - step - 1) % n;
            self.send(op, next, f32_to_bytes(&buf[bounds[send_chunk].clone()]))?;
            let bytes = self.recv(op, prev)?;
            self.copy_f32(op, prev, &bytes, &mut buf[bounds[recv_chunk].clone()])?;
        }
        Ok(())
    }

    /// The ring all-gather of blocks whose lengths may differ per rank.
    fn ring_all_gather_blocks(&mut self, op: Op, input: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let (n, prev, next) = (self.world, self.prev(), self.next());
        let mut blocks: Vec<Vec<f32>> = (0..n).map(|_| Vec::new()).collect();
        blocks[self.rank] = input.to_vec();
        for step in 0..n.saturating_sub(1) {
            let send_block = (self.rank + n - step) % n;
            let recv_block = (self.rank + 2 * n - step - 1) % n;
            self.send(op, next, f32_to_bytes(&blocks[send_block]))?;
            let bytes = self.recv(op, prev)?;
            blocks[recv_block] = self.decode_f32(op, prev, &bytes)?;
        }
        Ok(blocks.concat())
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    // ---- one call: its number, its failure ----

    /// Runs one collective: refuses if the communicator is broken or a peer already left
    /// before this call, and on failure marks it broken and tells the peers, who would
    /// otherwise wait out their timeout on a rank that has given up.
    fn run<T>(
        &mut self,
        op: Op,
        body: impl FnOnce(&mut Group) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        if let Some((cause, culprit)) = &self.broken {
            let (cause, culprit) = (cause.clone(), *culprit);
            return Err(CollectiveError::Broken { rank: self.rank, op: op.name(), cause, culprit });
        }
        self.absorb_ready();
        let result = self.check_departures(op, true).and_then(|()| body(self));
        match &result {
            Ok(_) => self.seq += 1,
            Err(err) => {
                let (reason, culprit) = (err.to_string(), err.culprit());
                self.link.close(&Frame::Abort { reason: reason.clone(), culprit });
                self.broken = Some((reason, culprit));
            }
        }
        result
    }

    fn check_root(&self, op: Op, root: usize) -> Result<(), CollectiveError> {
        if root < self.world {
            return Ok(());
        }
        Err(self.invalid(op, format!("root {root} is not a rank of a world of {}", self.world)))
    }

    fn invalid(&self, op: Op, detail: String) -> CollectiveError {
        CollectiveError::InvalidArgument { rank: self.rank, op: op.name(), detail }
    }

    fn mismatch(&self, op: Op, peer: usize, detail: String) -> CollectiveError {
        CollectiveError::Mismatch { rank: self.rank, op: op.name(), peer, detail }
    }

    // ---- point to point ----

    fn send(&mut self, op: Op, to: usize, payload: Vec<u8>) -> Result<(), CollectiveError> {
        let len = payload.len() as u64;
        let frame = Frame::Data { op: op.code(), seq: self.seq, payload };
        self.send_frame(op, to, &frame, len)
    }

    /// The same payload from `root` to every other rank, nearest first along the ring.
    fn send_to_all_from(&mut self, op: Op, root: usize, payload: &[u8]) -> Result<(), CollectiveError> {
        let frame = Frame::Data { op: op.code(), seq: self.seq, payload: payload.to_vec() };
        for k in 1..self.world {
            self.send_frame(op, (root + k) % self.world, &frame, payload.len() as u64)?;
        }
        Ok(())
    }

    fn send_frame(&mut self, op: Op, to: usize, frame: &Frame, len: u64) -> Result<(), CollectiveError> {
        match self.link.send(to, frame) {
            Ok(()) => {
                self.bytes_sent.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Err(LinkError::TimedOut) => {
                Err(CollectiveError::Timeout { rank: self.rank, op: op.name(), peer: to, timeout: self.timeout })
            }
            Err(LinkError::Closed(detail)) => Err(self.closed_by(op, to, detail)),
        }
    }

    /// The error for a send that found `to`'s end closed. A peer that gave up said why before it
    /// closed (its goodbye or abort is already on the way), and that reason names the rank at
    /// fault; without it the error would blame a rank that merely failed first. Waits briefly
    /// for that last word, as a reader thread may not have delivered it yet.
    fn closed_by(&mut self, op: Op, to: usize, detail: String) -> CollectiveError {
        let deadline = Instant::now() + LAST_WORD_WAIT.min(self.timeout);
        while self.gone[to].is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.next_event(left) {
                Some(event) => self.absorb(event),
                None => break,
            }
        }
        self.absorb_ready();
        match self.check_departures(op, false) {
            Err(err) => err,
            Ok(()) => CollectiveError::PeerGone { rank: self.rank, op: op.name(), peer: to, detail, culprit: None },
        }
    }

    /// The payload of the next message from `from`, which must belong to this very call.
    /// Waits at most `timeout`, and fails as soon as a departure dooms the call.
    fn recv(&mut self, op: Op, from: usize) -> Result<Vec<u8>, CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(frame) = self.pending[from].pop_front() {
                return self.payload_of(op, from, frame);
            }
            if let Some(gone) = &self.gone[from] {
                let (detail, culprit) = (gone.detail(), gone.culprit());
                return Err(CollectiveError::PeerGone { rank: self.rank, op: op.name(), peer: from, detail, culprit });
            }
            // The deadline before other ranks' news: once it has passed, the silent peer this
            // rank waited on is the one to blame, not a rank that gave up on someone later.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CollectiveError::Timeout {
                    rank: self.rank,
                    op: op.name(),
                    peer: from,
                    timeout: self.timeout,
                });
            }
            self.check_departures(op, false)?;
            if let Some(event) = self.link.next_event(left) {
                self.absorb(event);
            }
        }
    }

    fn payload_of(&self, op: Op, from: usize, frame: Frame) -> Result<Vec<u8>, CollectiveError> {
        match frame {
            Frame::Data { op: code, seq, payload } if code == op.code() && seq == self.seq => Ok(payload),
            Frame::Data { op: code, seq, .. } => {
                let (theirs, ours) = (Op::name_of(code), op.name());
                let detail = format!("it sent {theirs} #{seq} while this rank runs {ours} #{}", self.seq);
                Err(self.mismatch(op, from, detail))
            }
            // Only data frames are queued (see `absorb`).
            _ => Err(self.mismatch(op, from, "unexpected control frame".into())),
        }
    }

    /// Takes in whatever the link already holds, without waiting, so that a departure that
    /// happened between calls is known before the next one starts.
    fn absorb_ready(&mut self) {
        while let Some(event) = self.link.next_event(Duration::ZERO) {
            self.absorb(event);
        }
    }

    fn absorb(&mut self, event: Event) {
        let from = event.from;
        let departure = match event.what {
            Incoming::Frame(frame @ Frame::Data { .. }) => {
                self.pending[from].push_back(frame);
                return;
            }
            Incoming::Frame(Frame::Goodbye { completed }) => Departure::Left { completed },
            Incoming::Frame(Frame::Abort { reason, culprit }) => Departure::GaveUp { reason, culprit },
            Incoming::Lost(detail) => Departure::Lost { detail },
        };
        // The first word counts: a goodbye is followed by the connection closing.
        if self.gone[from].is_none() {
            self.gone[from] = Some(departure);
        }
    }

    /// Fails if a peer's departure dooms the collective in progress (see `Departure::dooms`).
    fn check_departures(&self, op: Op, entering: bool) -> Result<(), CollectiveError> {
        let doomed = self
            .gone
            .iter()
            .enumerate()
            .find_map(|(peer, gone)| gone.as_ref().filter(|d| d.dooms(self.seq, entering)).map(|d| (peer, d)));
        match doomed {
            None => Ok(()),
            Some((peer, d)) => Err(CollectiveError::PeerGone {
                rank: self.rank,
                op: op.name(),
                peer,
                detail: d.detail(),
                culprit: d.culprit(),
            }),
        }
    }

    // ---- payload codecs (little-endian f32, bit-exact) ----

    fn decode_f32(&self, op: Op, from: usize, bytes: &[u8]) -> Result<Vec<f32>, CollectiveError> {
        if !bytes.len().is_multiple_of(4) {
            return Err(self.mismatch(op, from, format!("it sent {} bytes, not a whole number of f32", bytes.len())));
        }
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn check_len(&self, op: Op, from: usize, bytes: &[u8], want: usize) -> Result<(), CollectiveError> {
        if bytes.len() == want * 4 {
            return Ok(());
        }
        let detail = format!(
            "it sent {} bytes where this rank expects {want} f32 (do all ranks pass the same length?)",
            bytes.len()
        );
        Err(self.mismatch(op, from, detail))
    }

    fn copy_f32(&self, op: Op, from: usize, bytes: &[u8], dst: &mut [f32]) -> Result<(), CollectiveError> {
        self.check_len(op, from, bytes, dst.len())?;
        for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Adds the running sum so far (from the previous ranks) to this rank's values: the order
    /// the module docs give (`+` on two floats is commutative, only the grouping matters).
    fn add_f32(&self, op: Op, from: usize, bytes: &[u8], acc: &mut [f32]) -> Result<(), CollectiveError> {
        self.check_len(op, from, bytes, acc.len())?;
        for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
            *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // A broken communicator already told its peers why it stopped.
        if self.broken.is_none() {
            self.link.close(&Frame::Goodbye { completed: self.seq });
        }
    }
}

/// `len` split into `world` contiguous chunks, the first `len % world` one element longer.
pub(crate) fn chunk_bounds(len: usize, world: usize) -> Vec<Range<usize>> {
    let (base, rem) = (len / world, len % world);
    (0..world)
        .map(|c| {
            let start = c * base + c.min(rem);
            start..start + base + usize::from(c < rem)
        })
        .collect()
}

pub(crate) fn f32_to_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for len in 0..20 {
            for world in 1..6 {
                let bounds = chunk_bounds(len, world);
                assert_eq!(bounds.len(), world);
                assert_eq!(bounds[0].start, 0);
                assert_eq!(bounds[world - 1].end, len);
                for pair in bounds.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                    assert!(pair[0].len() >= pair[1].len() && pair[0].len() - pair[1].len() <= 1);
                }
            }
        }
    }
}

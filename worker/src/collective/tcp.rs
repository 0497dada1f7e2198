//! The CPU backend over TCP: every pair of ranks shares one connection (a full mesh, so every
//! rank sees any rank's connection break), each read by its own thread into one inbox.
//!
//! Set-up: rank `i` listens on `addrs[i]`, connects to every lower rank and accepts every
//! higher one. Lower ranks finish connecting before they accept, so the waits form no cycle.
//! A handshake (magic, world size, both ranks) catches mismatched address lists and duplicate
//! ranks; the whole set-up, retries of refused connections included, has one deadline.
//!
//! Under the cluster's TLS (every deployment but `--insecure`), each connection starts with a
//! TLS 1.3 handshake in which both ends show a worker certificate of the cluster's CA, and every
//! message after it, the ranks' handshake included, is a record sealed with the keys it agreed
//! (`tandem_proto::sealed`). The dialling rank is the TLS server there, because the TLS server
//! must speak first and the dialler's hello is the first message. A connection that fails the
//! TLS handshake is a stray, like one that says nothing sensible.
//!
//! Wire format after the handshake, per frame: kind (u8: data, goodbye, abort), collective code
//! (u8), sequence number (u64 LE; the goodbye's count of finished collectives), payload length
//! (u64 LE), payload (data: f32 little-endian or raw bytes; abort: the reason in UTF-8).

use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use tandem_proto::Security;
use tandem_proto::sealed::{self, Opener, Sealer};
use tandem_proto::tls::{ClusterTls, Role};

use super::group::{Event, Frame, Group, Incoming, Link, LinkError};
use super::{CollectiveError, CollectiveOptions, HostCollective};

const MAGIC: [u8; 8] = *b"TNDMCOL1";
/// Magic, world size, sender's rank, addressee's rank.
const HELLO_LEN: usize = 8 + 4 + 4 + 4;
/// Magic, world size, replier's rank, accepted (1) or refused (0).
const REPLY_LEN: usize = 8 + 4 + 4 + 1;

const KIND_DATA: u8 = 0;
const KIND_GOODBYE: u8 = 1;
const KIND_ABORT: u8 = 2;
const HEADER_LEN: usize = 1 + 1 + 8 + 8;
/// Frames above this are taken for a corrupt stream.
const MAX_PAYLOAD: u64 = 1 << 36;
/// The longest sealed record: a frame with the longest payload.
const MAX_RECORD: usize = HEADER_LEN + MAX_PAYLOAD as usize;
/// Payloads up to this size go out in one write with their header (one segment, not two).
const COALESCE_BELOW: usize = 64 * 1024;

/// A refused connection is retried (the peer may not listen yet) after this pause.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// The longest a goodbye or an abort may take to leave, per peer.
const LAST_WORD_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds a rank's communicator of a TCP group.
pub struct TcpGroup;

impl TcpGroup {
    /// Joins the group whose rank `i` listens on `addrs[i]` (`host:port`), as rank `rank`,
    /// listening on `addrs[rank]`, with the connections under `security`. Returns once
    /// connected to every other rank, or fails by `options.setup_timeout` naming the rank that
    /// did not come.
    pub fn join(
        rank: usize,
        addrs: &[String],
        options: &CollectiveOptions,
        security: &Security,
    ) -> Result<HostCollective, CollectiveError> {
        let err = |detail: String| CollectiveError::Setup { rank, detail };
        let addr = addrs.get(rank).ok_or_else(|| err(format!("no address for rank {rank} among {}", addrs.len())))?;
        let listener = TcpListener::bind(addr.as_str()).map_err(|e| err(format!("cannot listen on {addr}: {e}")))?;
        Self::join_with_listener(listener, rank, addrs, options, security)
    }

    /// As [`TcpGroup::join`], on a listener the caller bound already (port 0 in tests, or a
    /// wildcard address while `addrs[rank]` is the address the others dial).
    pub fn join_with_listener(
        listener: TcpListener,
        rank: usize,
        addrs: &[String],
        options: &CollectiveOptions,
        security: &Security,
    ) -> Result<HostCollective, CollectiveError> {
        let options = options.clamped();
        let tls = match security {
            Security::Mutual(tls) => Some(tls.as_ref()),
            Security::Insecure => None,
        };
        let setup = Setup::new(rank, addrs, &options, tls)?;
        let mut streams: Vec<Option<Conn>> = (0..addrs.len()).map(|_| None).collect();
        for (peer, slot) in streams.iter_mut().enumerate().take(rank) {
            *slot = Some(setup.connect(peer)?);
        }
        setup.accept_all(&listener, &mut streams)?;
        let link = TcpLink::start(rank, streams, options.timeout).map_err(|e| setup.err(e.to_string()))?;
        let (group, bytes_sent) = Group::new(rank, addrs.len(), options.timeout, Box::new(link));
        Ok(HostCollective::new(group, bytes_sent))
    }
}

/// One connection of the mesh, with its keys when it runs under the cluster's TLS.
struct Conn {
    stream: TcpStream,
    keys: Option<(Sealer, Opener)>,
}

impl Conn {
    /// Starts a connection: as it is, or through a TLS handshake in which this end is the
    /// server when `serve` (and then speaks first) or the client.
    fn start(mut stream: TcpStream, tls: Option<&ClusterTls>, serve: bool) -> io::Result<Conn> {
        let keys = match tls {
            None => None,
            Some(tls) if serve => Some(sealed::server(&mut stream, tls, Role::Worker)?),
            Some(tls) => Some(sealed::client(&mut stream, tls, Role::Worker)?),
        };
        Ok(Conn { stream, keys })
    }

    /// Sends one set-up message.
    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        match &mut self.keys {
            Some((sealer, _)) => sealer.write(&mut self.stream, &mut message.to_vec()),
            None => self.stream.write_all(message),
        }
    }

    /// Receives one set-up message of `N` bytes.
    fn receive<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        match &mut self.keys {
            Some((_, opener)) => (opener.read(&mut self.stream, N)?.try_into())
                .map_err(|_| io::Error::new(ErrorKind::InvalidData, "a set-up message of the wrong length")),
            None => {
                let mut message = [0u8; N];
                self.stream.read_exact(&mut message)?;
                Ok(message)
            }
        }
    }
}

/// One rank's view of the set-up in progress.
struct Setup<'a> {
    rank: usize,
    world: usize,
    addrs: &'a [String],
    deadline: Instant,
    setup_timeout: Duration,
    tls: Option<&'a ClusterTls>,
}

impl<'a> Setup<'a> {
    fn new(
        rank: usize,
        addrs: &'a [String],
        options: &CollectiveOptions,
        tls: Option<&'a ClusterTls>,
    ) -> Result<Setup<'a>, CollectiveError> {
        let world = addrs.len();
        if rank >= world || u32::try_from(world).is_err() {
            return Err(CollectiveError::Setup {
                rank,
                detail: format!("rank {rank} in a world of {world} addresses"),
            });
        }
        let deadline = Instant::now() + options.setup_timeout;
        Ok(Setup { rank, world, addrs, deadline, setup_timeout: options.setup_timeout, tls })
    }

    fn err(&self, detail: String) -> CollectiveError {
        CollectiveError::Setup { rank: self.rank, detail }
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// A socket timeout until the deadline (never zero, which sockets refuse).
    fn left_for_socket(&self) -> Duration {
        self.left().max(Duration::from_millis(1))
    }

    // ---- the connecting side (to lower ranks) ----

    fn connect(&self, peer: usize) -> Result<Conn, CollectiveError> {
        let addr = &self.addrs[peer];
        let stream = self.dial(peer)?;
        let io_err = |e: io::Error| self.err(format!("handshake with rank {peer} at {addr}: {e}"));
        stream.set_read_timeout(Some(self.left_for_socket())).map_err(io_err)?;
        stream.set_write_timeout(Some(self.left_for_socket())).map_err(io_err)?;
        let mut conn = Conn::start(stream, self.tls, true).map_err(|e| self.reply_error(peer, &e))?;
        conn.send(&encode_hello(self.world, self.rank, peer)).map_err(io_err)?;
        let reply = conn.receive::<REPLY_LEN>().map_err(|e| self.reply_error(peer, &e))?;
        self.check_reply(peer, &reply)?;
        Ok(conn)
    }

    /// Connects to `addrs[peer]`, retrying while it refuses (not listening yet) until the
    /// deadline.
    fn dial(&self, peer: usize) -> Result<TcpStream, CollectiveError> {
        let addr = &self.addrs[peer];
        let mut last = String::from("no attempt");
        loop {
            let left = self.left();
            if left.is_zero() {
                let within = self.setup_timeout;
                return Err(self.err(format!("could not reach rank {peer} at {addr} within {within:?}: {last}")));
            }
            match try_connect(addr, left.min(Duration::from_secs(1))) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e.to_string(),
            }
            thread::sleep(left.min(RETRY_PAUSE));
        }
    }

    fn reply_error(&self, peer: usize, e: &io::Error) -> CollectiveError {
        let addr = &self.addrs[peer];
        let within = self.setup_timeout;
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                self.err(format!("rank {peer} at {addr} did not answer the handshake within {within:?}"))
            }
            ErrorKind::UnexpectedEof => {
                self.err(format!("rank {peer} at {addr} closed the connection in the handshake"))
            }
            _ => self.err(format!("handshake with rank {peer} at {addr}: {e}")),
        }
    }

    fn check_reply(&self, peer: usize, reply: &[u8; REPLY_LEN]) -> Result<(), CollectiveError> {
        let addr = &self.addrs[peer];
        let Some((world, their_rank, accepted)) = decode_reply(reply) else {
            return Err(self.err(format!("{addr} (rank {peer}) is not a Tandem collective endpoint")));
        };
        if accepted && world == self.world && their_rank == peer {
            return Ok(());
        }
        let detail = format!(
            "rank {peer} at {addr} refused the handshake: it is rank {their_rank} of {world}, this rank is {} of {}",
            self.rank, self.world
        );
        Err(self.err(detail))
    }

    // ---- the accepting side (from higher ranks) ----

    fn accept_all(&self, listener: &TcpListener, streams: &mut [Option<Conn>]) -> Result<(), CollectiveError> {
        // Polled, so that the deadline holds while nobody connects.
        listener.set_nonblocking(true).map_err(|e| self.err(format!("listener: {e}")))?;
        loop {
            let missing: Vec<usize> = (self.rank + 1..self.world).filter(|&p| streams[p].is_none()).collect();
            if missing.is_empty() {
                return Ok(());
            }
            match listener.accept() {
                Ok((stream, _)) => self.admit(stream, streams)?,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let left = self.left();
                    if left.is_zero() {
                        return Err(self.err(self.absent(&missing)));
                    }
                    thread::sleep(left.min(ACCEPT_POLL));
                }
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                Err(e) => return Err(self.err(format!("accepting connections: {e}"))),
            }
        }
    }

    fn absent(&self, missing: &[usize]) -> String {
        let names: Vec<String> = missing.iter().map(|p| format!("rank {p} ({})", self.addrs[*p])).collect();
        format!("{} did not join within {:?}", names.join(", "), self.setup_timeout)
    }

    /// Reads a connecting peer's hello and answers it. A connection that says nothing
    /// sensible (or fails the TLS handshake) is a stray (a port scan, a health check, a
    /// process without the cluster's certificate) and is dropped; a Tandem peer whose view of
    /// the group differs fails the set-up, since the group cannot form.
    fn admit(&self, stream: TcpStream, streams: &mut [Option<Conn>]) -> Result<(), CollectiveError> {
        let left = Some(self.left_for_socket());
        let started = (stream.set_nonblocking(false))
            .and_then(|()| stream.set_read_timeout(left))
            .and_then(|()| stream.set_write_timeout(left))
            .and_then(|()| Conn::start(stream, self.tls, false));
        let Ok(mut conn) = started else { return Ok(()) };
        let Some((world, from, to)) = conn.receive::<HELLO_LEN>().ok().and_then(|hello| decode_hello(&hello)) else {
            return Ok(());
        };
        let refusal = self.judge(world, from, to, streams);
        let sent = conn.send(&encode_reply(self.world, self.rank, refusal.is_none()));
        if let Some(refusal) = refusal {
            return Err(self.err(refusal));
        }
        sent.map_err(|e| self.err(format!("rank {from} dropped the connection in the handshake: {e}")))?;
        streams[from] = Some(conn);
        Ok(())
    }

    fn judge(&self, world: usize, from: usize, to: usize, streams: &[Option<Conn>]) -> Option<String> {
        let same_lists = "are the address lists the same on every rank?";
        if world != self.world {
            return Some(format!(
                "rank {from} joined with a world of {world}, this group has {} ({same_lists})",
                self.world
            ));
        }
        if to != self.rank {
            return Some(format!(
                "rank {from} connected here to reach rank {to}, this is rank {} ({same_lists})",
                self.rank
            ));
        }
        if from <= self.rank || from >= self.world {
            return Some(format!("rank {from} connected here, but only higher ranks connect to rank {}", self.rank));
        }
        if streams[from].is_some() {
            return Some(format!("rank {from} connected twice (two processes with the same rank?)"));
        }
        None
    }
}

fn try_connect(addr: &str, wait: Duration) -> io::Result<TcpStream> {
    let resolved = addr.to_socket_addrs().map_err(|e| io::Error::new(e.kind(), format!("cannot resolve: {e}")))?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for candidate in resolved {
        match TcpStream::connect_timeout(&candidate, wait) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn encode_hello(world: usize, from: usize, to: usize) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for v in [world, from, to] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out
}

fn decode_hello(b: &[u8; HELLO_LEN]) -> Option<(usize, usize, usize)> {
    (b[..8] == MAGIC).then(|| (u32_at(b, 8), u32_at(b, 12), u32_at(b, 16)))
}

fn encode_reply(world: usize, rank: usize, accepted: bool) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(world as u32).to_le_bytes());
    out.extend_from_slice(&(rank as u32).to_le_bytes());
    out.push(u8::from(accepted));
    out
}

fn decode_reply(b: &[u8; REPLY_LEN]) -> Option<(usize, usize, bool)> {
    (b[..8] == MAGIC).then(|| (u32_at(b, 8), u32_at(b, 12), b[16] == 1))
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// The sending half of a connection.
struct Outgoing {
    stream: TcpStream,
    sealer: Option<Sealer>,
}

impl Outgoing {
    fn send(&mut self, frame: &Frame) -> io::Result<()> {
        let Some(sealer) = &mut self.sealer else { return write_frame(&mut self.stream, frame) };
        let mut record = Vec::new();
        write_frame(&mut record, frame)?;
        sealer.write(&mut self.stream, &mut record)
    }
}

/// The connections of one rank once the group is formed.
struct TcpLink {
    /// Indexed by peer rank; `None` at this rank's own index.
    writers: Vec<Option<Outgoing>>,
    inbox: Receiver<Event>,
    // Keeps the inbox connected after every reader has ended, so a wait sleeps, not spins.
    _own: Sender<Event>,
}

impl TcpLink {
    fn start(rank: usize, conns: Vec<Option<Conn>>, timeout: Duration) -> io::Result<TcpLink> {
        let (own, inbox) = mpsc::channel();
        let mut writers = Vec::with_capacity(conns.len());
        for (peer, conn) in conns.into_iter().enumerate() {
            let Some(Conn { stream, keys }) = conn else {
                writers.push(None);
                continue;
            };
            let (sealer, opener) = keys.unzip();
            // Reads block in their thread (the waiting side has the timeout); a write that
            // stalls means a peer that stopped reading, and must not block the caller forever.
            stream.set_read_timeout(None)?;
            stream.set_write_timeout(Some(timeout))?;
            stream.set_nodelay(true)?;
            let reader = stream.try_clone()?;
            let events = own.clone();
            thread::Builder::new()
                .name(format!("coll{rank}<-{peer}"))
                .spawn(move || read_frames(peer, reader, opener, events))
                .map_err(|e| io::Error::new(e.kind(), format!("cannot start a reader thread: {e}")))?;
            writers.push(Some(Outgoing { stream, sealer }));
        }
        Ok(TcpLink { writers, inbox, _own: own })
    }
}

impl Link for TcpLink {
    fn send(&mut self, to: usize, frame: &Frame) -> Result<(), LinkError> {
        let Some(out) = self.writers.get_mut(to).and_then(Option::as_mut) else {
            return Err(LinkError::Closed("no connection".into()));
        };
        let Err(e) = out.send(frame) else { return Ok(()) };
        // A failed write may have left half a frame on the wire: nothing more may follow it,
        // so this connection is done (the peer sees it close).
        let _ = out.stream.shutdown(Shutdown::Both);
        self.writers[to] = None;
        Err(match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => LinkError::TimedOut,
            _ => LinkError::Closed(describe(&e)),
        })
    }

    fn next_event(&mut self, wait: Duration) -> Option<Event> {
        // Disconnected cannot happen (the link holds a sender to its own inbox).
        self.inbox.recv_timeout(wait).ok()
    }

    fn close(&mut self, last: &Frame) {
        for out in self.writers.iter_mut().flatten() {
            // Best effort, and brief: a peer that is gone or stuck cannot be told, and must not
            // hold up this rank's failure or exit. Only the sending half closes, so a reader
            // thread still drains what the peer sends until the peer closes too.
            let _ = out.stream.set_write_timeout(Some(LAST_WORD_TIMEOUT));
            let _ = out.send(last);
            let _ = out.stream.shutdown(Shutdown::Write);
        }
    }

    #[cfg(test)]
    fn sever(&mut self) {
        for out in self.writers.iter_mut().flatten() {
            let _ = out.stream.shutdown(Shutdown::Both);
        }
    }
}

/// A reader thread: forwards `from`'s frames to the inbox until a goodbye, an abort, a broken
/// connection, or the communicator is gone.
fn read_frames(from: usize, stream: TcpStream, mut opener: Option<Opener>, events: Sender<Event>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let frame = match &mut opener {
            None => read_frame(&mut reader),
            Some(opener) => opener.read(&mut reader, MAX_RECORD).and_then(|record| read_frame(&mut &record[..])),
        };
        let what = match frame {
            Ok(frame) => Incoming::Frame(frame),
            Err(e) => Incoming::Lost(describe(&e)),
        };
        let last = !matches!(what, Incoming::Frame(Frame::Data { .. }));
        if events.send(Event { from, what }).is_err() || last {
            return;
        }
    }
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof => "connection closed".into(),
        _ => e.to_string(),
    }
}

fn write_frame(out: &mut impl Write, frame: &Frame) -> io::Result<()> {
    let (kind, op, seq, payload): (u8, u8, u64, &[u8]) = match frame {
        Frame::Data { op, seq, payload } => (KIND_DATA, *op, *seq, payload),
        Frame::Goodbye { completed } => (KIND_GOODBYE, 0, *completed, &[]),
        // The culprit rides in the sequence field: rank + 1, or 0 for none.
        Frame::Abort { reason, culprit } => (KIND_ABORT, 0, culprit.map_or(0, |r| r as u64 + 1), reason.as_bytes()),
    };
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind;
    header[1] = op;
    header[2..10].copy_from_slice(&seq.to_le_bytes());
    header[10..18].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    if payload.len() < COALESCE_BELOW {
        out.write_all(&[&header[..], payload].concat())
    } else {
        out.write_all(&header)?;
        out.write_all(payload)
    }
}

fn read_frame(input: &mut impl Read) -> io::Result<Frame> {
    let mut header = [0u8; HEADER_LEN];
    input.read_exact(&mut header)?;
    let (kind, op, seq, len) = (header[0], header[1], u64_at(&header, 2), u64_at(&header, 10));
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(ErrorKind::InvalidData, format!("a frame of {len} bytes (corrupt stream?)")));
    }
    // Grown as the bytes arrive rather than allocated from the header, so that a corrupt
    // length cannot allocate more than what actually came.
    let mut payload = Vec::with_capacity(len.min(1 << 26) as usize);
    input.take(len).read_to_end(&mut payload)?;
    if payload.len() as u64 != len {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    match kind {
        KIND_DATA => Ok(Frame::Data { op, seq, payload }),
        KIND_GOODBYE => Ok(Frame::Goodbye { completed: seq }),
        KIND_ABORT => Ok(Frame::Abort {
            reason: String::from_utf8_lossy(&payload).into_owned(),
            culprit: seq.checked_sub(1).map(|r| r as usize),
        }),
        _ => Err(io::Error::new(ErrorKind::InvalidData, format!("unknown frame kind {kind} (corrupt stream?)"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::collective::Collective;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Data { op: 3, seq: 77, payload: vec![1, 2, 3] },
            Frame::Data { op: 0, seq: 0, payload: vec![7; COALESCE_BELOW + 5] },
            Frame::Goodbye { completed: 12 },
            Frame::Abort { reason: "rank 2: broke".into(), culprit: Some(3) },
            Frame::Abort { reason: "rank 2: broke".into(), culprit: None },
        ];
        let mut wire = Vec::new();
        for frame in &frames {
            write_frame(&mut wire, frame).unwrap();
        }
        let mut input = &wire[..];
        for frame in &frames {
            assert_eq!(&read_frame(&mut input).unwrap(), frame);
        }
        assert!(input.is_empty());
        // A frame cut short (the sender died mid-write) is a lost connection, not a frame.
        let mut cut = &wire[..HEADER_LEN + 2];
        assert_eq!(read_frame(&mut cut).unwrap_err().kind(), ErrorKind::UnexpectedEof);
    }

    #[test]
    fn handshake_messages_round_trip() {
        let hello: [u8; HELLO_LEN] = encode_hello(4, 3, 1).try_into().unwrap();
        assert_eq!(decode_hello(&hello), Some((4, 3, 1)));
        let reply: [u8; REPLY_LEN] = encode_reply(4, 1, true).try_into().unwrap();
        assert_eq!(decode_reply(&reply), Some((4, 1, true)));
        let mut stray = hello;
        stray[0] = b'G';
        assert_eq!(decode_hello(&stray), None);
    }

    /// A rank whose connections break without a goodbye (a crashed process) makes every
    /// other rank fail promptly, naming it, whether or not it was waiting on that rank.
    #[test]
    fn a_crashed_rank_fails_everyone_promptly() {
        let world = 4;
        let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let options = CollectiveOptions { timeout: Duration::from_secs(5), setup_timeout: Duration::from_secs(20) };
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (addrs, options) = (addrs.clone(), options.clone());
                thread::spawn(move || {
                    let comm =
                        TcpGroup::join_with_listener(listener, rank, &addrs, &options, &Security::Insecure).unwrap();
                    let start = Instant::now();
                    // Rank 2 crashes as soon as it leaves the barrier; another rank may still be
                    // inside it then (a barrier does not release every rank at the same moment),
                    // so the failure is the barrier's or the all-reduce's.
                    let barrier = comm.barrier();
                    if rank == 2 {
                        barrier.unwrap();
                        comm.sever();
                        return None;
                    }
                    let mut buf = vec![1.0f32; 1000];
                    let err = barrier.and_then(|()| comm.all_reduce_sum(&mut buf)).unwrap_err();
                    Some((err, start.elapsed()))
                })
            })
            .collect();
        for (rank, handle) in handles.into_iter().enumerate() {
            let Some((err, elapsed)) = handle.join().unwrap() else { continue };
            // Well inside the 5 s timeout: the broken connection is news, not silence.
            assert!(elapsed < Duration::from_secs(4), "rank {rank} took {elapsed:?}: {err}");
            assert!(err.to_string().contains("rank 2"), "rank {rank}: {err}");
            // Whether it heard of rank 2 itself or from a rank that gave up on it, the rank at
            // fault travels as a number.
            assert_eq!(err.culprit(), Some(2), "rank {rank}: {err}");
        }
    }
}

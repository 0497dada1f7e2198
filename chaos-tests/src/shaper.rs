//! Delay, jitter, loss and reordering in user space, on any kernel with NFQUEUE (`tc netem` is
//! missing from many VM kernels): nftables hands every packet a node sends on its link to a
//! queue read by a thread of the runner inside the node's namespace, which holds each packet
//! for its own delay (uniform in `delay ± jitter`, from a seeded generator) and then lets it go,
//! or drops it. Packets whose delays cross leave out of order: that is the reordering.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_worker::rng::Xoshiro256;

/// The queue every node's rule sends its packets to (one queue per namespace).
pub const QUEUE: u16 = 0;

/// What happens to each packet.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub delay: Duration,
    pub jitter: Duration,
    pub loss_percent: u64,
}

/// One namespace's shaping thread; [`Shaper::stop`] lets every held packet go and ends it.
pub struct Shaper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<std::io::Result<()>>,
}

impl Shaper {
    /// Starts shaping what namespace `ns` queues to [`QUEUE`]; returns once the queue is bound
    /// (a packet queued before then would pass unshaped: the rule says `bypass`).
    pub fn start(ns: &str, shape: Shape, seed: u64) -> std::io::Result<Shaper> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, bound) = mpsc::channel();
        let path = format!("/run/netns/{ns}");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || shape_queue(&path, shape, seed, &flag, &ready));
        match bound.recv() {
            Ok(Ok(())) => Ok(Shaper { stop, thread }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(thread.join().err().map_or_else(
                || std::io::Error::other("the shaper ended before it bound its queue"),
                |_| std::io::Error::other("the shaper panicked"),
            )),
        }
    }

    /// Call once the rule is gone: every held packet goes out now.
    pub fn stop(self) -> std::io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| std::io::Error::other("the shaper panicked"))?
    }
}

/// A packet held until `due`; `seq` keeps packets with the same due time in arrival order.
struct Held {
    due: Instant,
    seq: u64,
    msg: nfq::Message,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// The thread: enters the namespace at `path` (a thread's own network namespace changes alone),
/// binds the queue, then receives, holds and releases packets until `stop`.
fn shape_queue(
    path: &str,
    shape: Shape,
    seed: u64,
    stop: &AtomicBool,
    ready: &mpsc::Sender<std::io::Result<()>>,
) -> std::io::Result<()> {
    let bind = || -> std::io::Result<nfq::Queue> {
        let ns = File::open(path)?;
        // SAFETY: setns(2) on a descriptor we own; it changes this thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut queue = nfq::Queue::open()?;
        queue.bind(QUEUE)?;
        // Only the verdict matters: no payload is copied to us.
        queue.set_copy_range(QUEUE, 0)?;
        queue.set_queue_max_len(QUEUE, 1 << 16)?;
        queue.set_nonblocking(true);
        Ok(queue)
    };
    let mut queue = match bind() {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            q
        }
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::new(e.kind(), format!("{path}: {e}"))));
            return Ok(());
        }
    };
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let spread = shape.jitter.as_micros() as u64 * 2;
    let mut held = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    if rng.below(100) < shape.loss_percent {
                        msg.set_verdict(nfq::Verdict::Drop);
                        queue.verdict(msg)?;
                        continue;
                    }
                    let wait =
                        (shape.delay + Duration::from_micros(rng.below(spread + 1))).saturating_sub(shape.jitter);
                    seq += 1;
                    held.push(Reverse(Held { due: Instant::now() + wait, seq, msg }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse(h)| stopping || h.due <= now) {
            let Some(Reverse(mut h)) = held.pop() else { break };
            h.msg.set_verdict(nfq::Verdict::Accept);
            queue.verdict(h.msg)?;
        }
        if stopping {
            return Ok(());
        }
        let next = held.peek().map_or(Duration::from_millis(1), |Reverse(h)| h.due.saturating_duration_since(now));
        std::thread::sleep(next.min(Duration::from_millis(1)));
    }
}

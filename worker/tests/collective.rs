//! The collectives on the host backends (in-process channels, TCP on loopback in plain text and
//! under the cluster's TLS) for world sizes 1 to 4, against plain serial computations; and their
//! failures: a rank that leaves, hangs, never comes or holds no certificate of the cluster makes
//! the others fail, naming it, instead of hanging.

// A failed call is a failed test; helpers outside `#[test]` fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tandem_proto::Security;
use tandem_proto::tls::{CertificateAuthority, ClusterTls, Role};
use tandem_worker::collective::{Collective, CollectiveError, CollectiveOptions, HostCollective, LocalGroup, TcpGroup};
use tandem_worker::rng::splitmix64;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Local,
    Tcp,
    /// TCP under the cluster's TLS, as every deployment but `--insecure` runs it.
    SealedTcp,
}

const BACKENDS: [Backend; 3] = [Backend::Local, Backend::Tcp, Backend::SealedTcp];

/// A worker certificate named `name` of `ca`.
fn worker_tls(ca: &CertificateAuthority, name: &str) -> Security {
    let issued = ca.issue(Role::Worker, name).unwrap();
    Security::Mutual(Arc::new(ClusterTls::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)))
}

/// The cluster's CA, one for the whole test binary.
fn cluster_ca() -> &'static CertificateAuthority {
    static CA: std::sync::OnceLock<CertificateAuthority> = std::sync::OnceLock::new();
    CA.get_or_init(|| CertificateAuthority::create().unwrap())
}

/// What rank `rank` of `backend` joins with.
fn security(backend: Backend, rank: usize) -> Security {
    match backend {
        Backend::SealedTcp => worker_tls(cluster_ca(), &format!("w{rank}")),
        _ => Security::Insecure,
    }
}
const WORLDS: [usize; 4] = [1, 2, 3, 4];

/// Generous: these tests run next to long builds on 2 cores; the failure tests set their own.
fn options() -> CollectiveOptions {
    CollectiveOptions { timeout: Duration::from_secs(30), setup_timeout: Duration::from_secs(30) }
}

fn short(timeout_s: u64) -> CollectiveOptions {
    CollectiveOptions { timeout: Duration::from_secs(timeout_s), setup_timeout: Duration::from_secs(30) }
}

fn loopback_listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    (listeners, addrs)
}

/// The communicators of a group, element `i` being rank `i`.
fn form(backend: Backend, world: usize, options: &CollectiveOptions) -> Vec<HostCollective> {
    match backend {
        Backend::Local => LocalGroup::with_options(world, options),
        Backend::Tcp | Backend::SealedTcp => {
            // Joining blocks until every rank is connected, so every rank joins on its own thread.
            let (listeners, addrs) = loopback_listeners(world);
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (addrs, options, security) = (addrs.clone(), options.clone(), security(backend, rank));
                    thread::spawn(move || {
                        TcpGroup::join_with_listener(listener, rank, &addrs, &options, &security).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        }
    }
}

/// Runs `f` on every rank at once, through the trait object; results in rank order.
fn on_each<T: Send>(comms: &[HostCollective], f: impl Fn(&dyn Collective) -> T + Sync) -> Vec<T> {
    thread::scope(|s| {
        let handles: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Pseudo-random values of varied sign and magnitude, different per rank.
fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let bits = splitmix64(((rank as u64) << 32) ^ i as u64);
            let unit = (bits >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (unit - 0.5) * 10f32.powi((bits % 5) as i32 - 2)
        })
        .collect()
}

/// Sums of every rank's `data` in f64, and the sums of their magnitudes (the tolerance scale).
fn serial_sum(world: usize, len: usize) -> (Vec<f64>, Vec<f64>) {
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len)).collect();
    let sum = (0..len).map(|i| inputs.iter().map(|x| x[i] as f64).sum()).collect();
    let scale = (0..len).map(|i| inputs.iter().map(|x| (x[i] as f64).abs()).sum()).collect();
    (sum, scale)
}

/// The documented ring order: chunk `c`'s elements are summed starting at rank `c+1`.
fn ring_order_sum(world: usize, len: usize) -> Vec<f32> {
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len)).collect();
    let (base, rem) = (len / world, len % world);
    let chunk_of = |i: usize| (0..world).find(|&c| i < (c + 1) * base + (c + 1).min(rem)).unwrap();
    (0..len)
        .map(|i| {
            let c = chunk_of(i);
            (2..=world).fold(inputs[(c + 1) % world][i], |acc, k| acc + inputs[(c + k) % world][i])
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], scale: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-5 * s.max(1e-30), "{what}[{i}]: {g} vs {w}");
    }
}

fn assert_bit_identical(results: &[Vec<f32>], what: &str) {
    for (rank, r) in results.iter().enumerate() {
        let same = r.len() == results[0].len() && r.iter().zip(&results[0]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: rank {rank} differs from rank 0");
    }
}

#[test]
fn all_reduce_sums_any_length_identically_on_every_rank() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            // Lengths below, at and not divisible by the world size.
            for len in [0, 1, 2, 5, 7, 12, 1001] {
                let what = format!("{backend:?} world {world} len {len}");
                let results = on_each(&comms, |c| {
                    let mut buf = data(c.rank(), len);
                    c.all_reduce_sum(&mut buf).unwrap();
                    buf
                });
                let (want, scale) = serial_sum(world, len);
                assert_close(&results[0], &want, &scale, &what);
                assert_bit_identical(&results, &what);
                let ring = ring_order_sum(world, len);
                assert!(results[0].iter().zip(&ring).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: ring order");
            }
        }
    }
}

#[test]
fn a_large_all_reduce_over_tcp() {
    // Chunks far above the socket buffers: every rank sends before it receives, which only
    // works because the links drain their sockets on their own threads.
    let (world, len) = (4, 1 << 20);
    for backend in [Backend::Tcp, Backend::SealedTcp] {
        let comms = form(backend, world, &options());
        let results = on_each(&comms, |c| {
            let mut buf = data(c.rank(), len);
            c.all_reduce_sum(&mut buf).unwrap();
            buf
        });
        let (want, scale) = serial_sum(world, len);
        assert_close(&results[0], &want, &scale, "large");
        assert_bit_identical(&results, "large");
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            for len in [0, 1, 6] {
                // Lengths differ per rank (an uneven vocabulary split).
                let results = on_each(&comms, |c| c.all_gather(&data(c.rank(), len + c.rank())).unwrap());
                let want: Vec<f32> = (0..world).flat_map(|r| data(r, len + r)).collect();
                for got in &results {
                    assert_eq!(got, &want, "{backend:?} world {world} len {len}");
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_chunk_of_the_sum() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            for per_rank in [0, 1, 3, 50] {
                let len = per_rank * world;
                let results = on_each(&comms, |c| c.reduce_scatter_sum(&data(c.rank(), len)).unwrap());
                let (want, scale) = serial_sum(world, len);
                let ring = ring_order_sum(world, len);
                for (rank, got) in results.iter().enumerate() {
                    let chunk = rank * per_rank..(rank + 1) * per_rank;
                    let what = format!("{backend:?} world {world} len {len} rank {rank}");
                    assert_close(got, &want[chunk.clone()], &scale[chunk.clone()], &what);
                    // The same bits all_reduce_sum gives for that chunk.
                    assert!(got.iter().zip(&ring[chunk]).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}");
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_refuses_an_indivisible_length_and_stays_usable() {
    for backend in BACKENDS {
        for world in [2, 3, 4] {
            let comms = form(backend, world, &options());
            let errors = on_each(&comms, |c| {
                let err = c.reduce_scatter_sum(&data(c.rank(), world + 1)).unwrap_err();
                c.barrier().unwrap();
                err
            });
            for err in errors {
                assert!(matches!(err, CollectiveError::InvalidArgument { .. }), "{err}");
                assert!(err.to_string().contains("not divisible"), "{err}");
            }
        }
    }
}

#[test]
fn broadcast_copies_the_roots_buffer() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            for root in 0..world {
                let results = on_each(&comms, |c| {
                    let mut buf = data(c.rank(), 9);
                    c.broadcast(&mut buf, root).unwrap();
                    buf
                });
                for got in &results {
                    assert_eq!(got, &data(root, 9), "{backend:?} world {world} root {root}");
                }
            }
        }
    }
}

#[test]
fn broadcast_bytes_replaces_every_buffer() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            for root in 0..world {
                let plan = |rank: usize| format!("batch plan from rank {rank}").into_bytes();
                let results = on_each(&comms, |c| {
                    // Non-root buffers start with other contents and lengths.
                    let mut buf = if c.rank() == root { plan(root) } else { vec![7; c.rank() * 3] };
                    c.broadcast_bytes(&mut buf, root).unwrap();
                    buf
                });
                for got in &results {
                    assert_eq!(got, &plan(root), "{backend:?} world {world} root {root}");
                }
            }
        }
    }
}

#[test]
fn broadcast_refuses_a_root_outside_the_group() {
    let comms = LocalGroup::with_options(2, &options());
    let errors = on_each(&comms, |c| c.broadcast(&mut [1.0], 2).unwrap_err());
    assert!(errors.iter().all(|e| matches!(e, CollectiveError::InvalidArgument { .. })));
}

/// The chunk rank `from` sends to rank `to`: its length differs per pair, its values say who.
fn dispatch(from: usize, to: usize) -> Vec<f32> {
    (0..(from + 2 * to) % 5).map(|k| (from * 100 + to * 10 + k) as f32).collect()
}

#[test]
fn all_to_all_delivers_chunk_i_to_rank_i() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            let results =
                on_each(&comms, |c| c.all_to_all((0..world).map(|to| dispatch(c.rank(), to)).collect()).unwrap());
            for (rank, got) in results.iter().enumerate() {
                let want: Vec<Vec<f32>> = (0..world).map(|from| dispatch(from, rank)).collect();
                assert_eq!(got, &want, "{backend:?} world {world} rank {rank}");
            }
        }
    }
}

#[test]
fn barrier_releases_no_rank_before_all_arrive() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            let arrived: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            on_each(&comms, |c| {
                for (round, count) in arrived.iter().enumerate() {
                    // Late arrivals, so that an early release would be seen.
                    thread::sleep(Duration::from_millis((c.rank() * 20) as u64));
                    count.fetch_add(1, Ordering::SeqCst);
                    c.barrier().unwrap();
                    assert_eq!(count.load(Ordering::SeqCst), world, "{backend:?} world {world} round {round}");
                }
            });
        }
    }
}

#[test]
fn bytes_sent_match_the_ring_volumes() {
    for backend in BACKENDS {
        for world in WORLDS {
            let comms = form(backend, world, &options());
            let len = 12 * 5; // divisible by 1 to 4
            let volumes = on_each(&comms, |c| {
                let before = c.bytes_sent();
                c.all_reduce_sum(&mut data(c.rank(), len)).unwrap();
                let all_reduce = c.bytes_sent() - before;
                let before = c.bytes_sent();
                c.all_gather(&data(c.rank(), len)).unwrap();
                let all_gather = c.bytes_sent() - before;
                let before = c.bytes_sent();
                c.broadcast(&mut data(c.rank(), len), 0).unwrap();
                (all_reduce, all_gather, c.bytes_sent() - before)
            });
            let floats = 4 * len as u64;
            let n = world as u64;
            for (rank, (all_reduce, all_gather, broadcast)) in volumes.into_iter().enumerate() {
                let what = format!("{backend:?} world {world} rank {rank}");
                assert_eq!(all_reduce, 2 * (n - 1) * floats / n, "{what}: all-reduce sends 2(N-1)/N");
                assert_eq!(all_gather, (n - 1) * floats, "{what}: all-gather passes N-1 blocks on");
                assert_eq!(broadcast, if rank == 0 { (n - 1) * floats } else { 0 }, "{what}: broadcast");
            }
        }
    }
}

#[test]
fn ranks_calling_different_collectives_fail_with_a_mismatch() {
    for backend in BACKENDS {
        let comms = form(backend, 2, &short(5));
        let errors = on_each(&comms, |c| match c.rank() {
            0 => c.barrier().unwrap_err(),
            _ => c.all_gather(&[1.0]).unwrap_err(),
        });
        for (rank, err) in errors.iter().enumerate() {
            let what = format!("{backend:?} rank {rank}: {err}");
            assert!(matches!(err, CollectiveError::Mismatch { .. } | CollectiveError::PeerGone { .. }), "{what}");
        }
        assert!(errors.iter().any(|e| matches!(e, CollectiveError::Mismatch { .. })), "{errors:?}");
        // Out of step now: further calls are refused rather than mixing data.
        let again = on_each(&comms, |c| c.barrier().unwrap_err());
        assert!(again.iter().all(|e| matches!(e, CollectiveError::Broken { .. })), "{again:?}");
    }
}

#[test]
fn ranks_passing_different_lengths_fail_with_a_mismatch() {
    for backend in BACKENDS {
        let comms = form(backend, 2, &short(5));
        let errors = on_each(&comms, |c| c.all_reduce_sum(&mut vec![1.0; 4 + 2 * c.rank()]).unwrap_err());
        assert!(errors.iter().any(|e| e.to_string().contains("same length")), "{errors:?}");
    }
}

/// Rank `leaver` finishes `done` all-reduces and drops its communicator (its thread ends); the
/// others' next all-reduce fails promptly with an error naming it.
fn drop_out(backend: Backend, world: usize, leaver: usize, done: usize) {
    let timeout = 2;
    let comms = form(backend, world, &short(timeout));
    let results = thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let rounds = if c.rank() == leaver { done } else { done + 1 };
                    let start = Instant::now();
                    let mut last = Ok(());
                    for _ in 0..rounds {
                        last = c.all_reduce_sum(&mut data(c.rank(), 10));
                        if last.is_err() {
                            break;
                        }
                    }
                    (c.rank(), last, start.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    for (rank, result, elapsed) in results {
        let what = format!("{backend:?} world {world}, rank {leaver} left after {done}: rank {rank}");
        if rank == leaver {
            assert!(result.is_ok(), "{what}: {result:?}");
            continue;
        }
        let err = result.unwrap_err();
        assert!(err.to_string().contains(&format!("rank {leaver}")), "{what}: {err}");
        assert!(!matches!(err, CollectiveError::Timeout { .. }), "{what}: noticed only by timeout: {err}");
        assert!(elapsed < Duration::from_secs(timeout), "{what}: took {elapsed:?}");
    }
}

#[test]
fn a_rank_that_leaves_makes_the_others_fail_naming_it() {
    for backend in BACKENDS {
        for (world, leaver, done) in [(2, 1, 0), (3, 1, 0), (3, 2, 2), (4, 0, 1), (4, 3, 3)] {
            drop_out(backend, world, leaver, done);
        }
    }
}

#[test]
fn a_rank_that_hangs_makes_the_others_time_out_instead_of_waiting() {
    for backend in BACKENDS {
        let (world, sleeper, timeout) = (3, 1, Duration::from_secs(1));
        let comms = form(backend, world, &short(1));
        let results = on_each(&comms, |c| {
            if c.rank() == sleeper {
                thread::sleep(timeout * 3);
            }
            let start = Instant::now();
            (c.all_reduce_sum(&mut data(c.rank(), 10)).unwrap_err(), start.elapsed())
        });
        for (rank, (err, elapsed)) in results.iter().enumerate() {
            let what = format!("{backend:?} rank {rank}: {err}");
            if rank == sleeper {
                // Its peers gave up while it slept, and told it so.
                assert!(err.to_string().contains("gave up"), "{what}");
                continue;
            }
            assert!(*elapsed < timeout * 2, "{what}: took {elapsed:?}");
        }
        // The rank after it in the ring waits on it directly and names it, unless the rank it
        // sends to (waiting on it in turn) timed out a moment sooner and told it so first: both
        // deadlines fall within a few milliseconds, so a loaded machine may order them either way.
        let next = &results[(sleeper + 1) % world].0;
        let told = next.culprit() == Some((sleeper + 2) % world) && next.to_string().contains("gave up");
        assert!(next.culprit() == Some(sleeper) || told, "{next}");
    }
}

#[test]
fn set_up_fails_by_the_deadline_when_a_rank_never_comes() {
    // Rank 1's port is bound (connections queue) but nobody answers; the others must not wait
    // past the set-up deadline.
    let (world, absent) = (3, 1);
    let (mut listeners, addrs) = loopback_listeners(world);
    let _bound_but_silent = listeners.remove(absent);
    let options = CollectiveOptions { timeout: Duration::from_secs(2), setup_timeout: Duration::from_secs(2) };
    let start = Instant::now();
    let handles: Vec<_> = (0..world)
        .filter(|&rank| rank != absent)
        .zip(listeners)
        .map(|(rank, listener)| {
            let (addrs, options) = (addrs.clone(), options.clone());
            thread::spawn(move || {
                TcpGroup::join_with_listener(listener, rank, &addrs, &options, &Security::Insecure).err()
            })
        })
        .collect();
    for handle in handles {
        let err = handle.join().unwrap().expect("set-up must fail");
        assert!(matches!(err, CollectiveError::Setup { .. }), "{err}");
        assert!(err.to_string().contains(&format!("rank {absent}")), "{err}");
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(6), "{elapsed:?}");
}

#[test]
fn set_up_fails_by_the_deadline_when_nobody_listens() {
    let (listeners, addrs) = loopback_listeners(2);
    let mut listeners = listeners.into_iter();
    drop(listeners.next()); // rank 0 is not there: connections are refused
    let options = CollectiveOptions { timeout: Duration::from_secs(2), setup_timeout: Duration::from_secs(2) };
    let start = Instant::now();
    let err = TcpGroup::join_with_listener(listeners.next().unwrap(), 1, &addrs, &options, &Security::Insecure);
    let err = err.err().unwrap();
    assert!(err.to_string().contains("could not reach rank 0"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(6), "{:?}", start.elapsed());
}

#[test]
fn set_up_refuses_ranks_that_disagree_on_the_group() {
    let (listeners, addrs) = loopback_listeners(2);
    let mut listeners = listeners.into_iter();
    let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
    let options = CollectiveOptions { timeout: Duration::from_secs(2), setup_timeout: Duration::from_secs(10) };
    // Rank 1 believes in a third rank.
    let mut longer = addrs.clone();
    longer.push("127.0.0.1:9".into());
    let start = Instant::now();
    let rank0 = {
        let (addrs, options) = (addrs.clone(), options.clone());
        thread::spawn(move || TcpGroup::join_with_listener(l0, 0, &addrs, &options, &Security::Insecure).err())
    };
    let err1 = TcpGroup::join_with_listener(l1, 1, &longer, &options, &Security::Insecure).err().unwrap();
    let err0 = rank0.join().unwrap().unwrap();
    assert!(err0.to_string().contains("world of 3"), "{err0}");
    assert!(err1.to_string().contains("refused"), "{err1}");
    // Refused at once, not at the deadline.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[test]
fn a_rank_without_the_clusters_certificate_cannot_join() {
    // Rank 1 holds a worker certificate of another CA, then no TLS at all: rank 0 takes either
    // connection for a stray and waits out its deadline; rank 1 fails at the TLS handshake.
    let options = CollectiveOptions { timeout: Duration::from_secs(2), setup_timeout: Duration::from_secs(2) };
    let outsider = worker_tls(&CertificateAuthority::create().unwrap(), "w1");
    for rank1 in [outsider, Security::Insecure] {
        let (listeners, addrs) = loopback_listeners(2);
        let mut listeners = listeners.into_iter();
        let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
        let rank0 = {
            let (addrs, options, tls) = (addrs.clone(), options.clone(), worker_tls(cluster_ca(), "w0"));
            thread::spawn(move || TcpGroup::join_with_listener(l0, 0, &addrs, &options, &tls).err())
        };
        let err1 = TcpGroup::join_with_listener(l1, 1, &addrs, &options, &rank1).err().unwrap();
        let err0 = rank0.join().unwrap().unwrap();
        assert!(err0.to_string().contains("rank 1") && err0.to_string().contains("did not join"), "{err0}");
        assert!(err1.to_string().contains("rank 0"), "{err1}");
    }
}

#[test]
fn join_binds_its_own_address_and_a_world_of_one_needs_no_peers() {
    let comm = TcpGroup::join(0, &["127.0.0.1:0".to_string()], &options(), &Security::Insecure).unwrap();
    let mut buf = vec![1.5, -2.0];
    comm.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![1.5, -2.0]);
    assert_eq!(comm.all_gather(&buf).unwrap(), buf);
    assert_eq!(comm.all_to_all(vec![vec![3.0]]).unwrap(), vec![vec![3.0]]);
    comm.barrier().unwrap();
    assert_eq!(comm.bytes_sent(), 0);
}

#![allow(clippy::unwrap_used)]
#![cfg(feature = "cuda")]
//! The NCCL backend (`NcclCollective`, feature `cuda`).
//!
//! Everywhere (CI: no GPU, no libnccl): the id's encodings, argument checks, that set-up on a
//! machine without NCCL or a GPU is a clear `Setup` error, never a panic, and that a worker group
//! over NCCL hands rank 0's id (or why it has none) to its ranks
//! (`cargo test -p tandem-worker --features cuda --test nccl`).
//!
//! On a GPU machine only, `#[ignore]`d so that a machine without one runs none of them rather
//! than passing them vacuously; scripts/gpu-check.sh runs them with `--ignored`, where each one
//! fails if NCCL or the GPUs it needs are missing:
//! - `gpu_group_of_one_*`: a group of one on GPU 0 gives, for every collective, bit for bit what
//!   `LocalGroup`'s group of one gives (and the same argument errors and byte counts);
//! - `gpu_set_up_times_out_*`: rank 0 of a group of two whose rank 1 never comes fails the
//!   set-up with a timeout (the non-blocking set-up and the abort; one GPU suffices);
//! - `gpu_two_ranks_*` (two GPUs; gpu-check.sh runs them only where `nvidia-smi` lists two or
//!   more): two ranks in two threads against `LocalGroup`'s two ranks, and a rank that stops
//!   calling makes its peer's call time out and the communicator refuse later calls.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use tandem_worker::collective::{Collective, CollectiveError, CollectiveOptions, LocalGroup, NcclCollective, NcclId};
use tandem_worker::engine::EngineConfig;
use tandem_worker::init_model::Preset;
use tandem_worker::model::MoeSplit;
use tandem_worker::node::group::{self, DataPlane, GroupSpec, Member};

fn options(timeout: Duration, setup_timeout: Duration) -> CollectiveOptions {
    CollectiveOptions { timeout, setup_timeout }
}

// ---- everywhere ----

#[test]
fn id_round_trips_through_bytes_hex_and_json() {
    let bytes: [u8; NcclId::LEN] = std::array::from_fn(|i| (i * 37 + 11) as u8);
    let id = NcclId::from_bytes(bytes);
    assert_eq!(id.as_bytes(), &bytes);
    let hex = id.to_hex();
    assert_eq!(hex.len(), 2 * NcclId::LEN);
    assert_eq!(hex, id.to_string());
    assert_eq!(NcclId::from_hex(&hex).unwrap(), id);
    assert_eq!(hex.to_uppercase().parse::<NcclId>().unwrap(), id);
    assert_eq!(NcclId::try_from(&bytes[..]).unwrap(), id);
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, format!("\"{hex}\""));
    assert_eq!(serde_json::from_str::<NcclId>(&json).unwrap(), id);

    assert!(NcclId::from_hex(&hex[2..]).is_err());
    assert!(NcclId::from_hex(&format!("zz{}", &hex[2..])).is_err());
    assert!(NcclId::from_hex(&format!("é{}", &hex[3..])).is_err());
    assert!(NcclId::try_from(&bytes[1..]).is_err());
    assert!(serde_json::from_str::<NcclId>("\"00\"").is_err());
}

#[test]
fn a_rank_outside_the_group_is_refused_before_anything_is_loaded() {
    let id = NcclId::from_bytes([0; NcclId::LEN]);
    for (rank, world) in [(0, 0), (2, 2), (5, 3)] {
        let err = NcclCollective::new(rank, world, id, 0, &CollectiveOptions::default()).unwrap_err();
        assert!(matches!(err, CollectiveError::Setup { .. }), "{err}");
        assert!(err.to_string().contains("is not a rank of a group of"), "{err}");
    }
}

/// The contract on any machine: set-up either works or fails with a `Setup` error that names
/// what is missing and how to fix it; it never panics. On CI (no libnccl, no driver) this is
/// the error path; the test prints which path it took.
#[test]
fn set_up_without_nccl_or_a_gpu_is_a_clear_error() {
    let made = NcclId::new();
    match &made {
        Err(CollectiveError::Setup { rank: 0, detail }) => {
            // A missing library names itself and the fix; NCCL's own failures name the call.
            let missing = detail.contains("NCCL (libnccl)") && detail.contains("LD_LIBRARY_PATH");
            assert!(missing || detail.starts_with("NCCL ncclGetUniqueId: "), "unclear: {detail}");
            eprintln!("NcclId::new: {detail}");
        }
        Err(other) => panic!("NcclId::new: expected a set-up error, got {other:?}"),
        Ok(_) => eprintln!("NcclId::new: libnccl is here, an id was made"),
    }
    let id = made.as_ref().map_or(NcclId::from_bytes([0; NcclId::LEN]), |id| *id);
    let opts = options(Duration::from_secs(10), Duration::from_secs(10));
    match NcclCollective::new(0, 1, id, 0, &opts) {
        Err(CollectiveError::Setup { rank: 0, detail }) => {
            // Either library missing names itself and the fix; a missing device names it.
            let clear = (detail.contains("could not be loaded") && detail.contains("LD_LIBRARY_PATH"))
                || detail.contains("cuda:0");
            assert!(clear, "unclear set-up error: {detail}");
            eprintln!("NcclCollective::new: {detail}");
        }
        Err(other) => panic!("NcclCollective::new: expected a set-up error, got {other:?}"),
        Ok(comm) => {
            // NCCL and a GPU are here: the group of one works.
            let mut buf = [1.5f32, -2.0];
            comm.all_reduce_sum(&mut buf).unwrap();
            assert_eq!(buf, [1.5, -2.0]);
            eprintln!("NcclCollective::new: a group of one formed ({comm:?})");
        }
    }
}

// ---- on a GPU machine ----

/// What one rank's run of every collective returned, compared bit for bit across backends.
#[derive(Debug, PartialEq)]
struct Outcome {
    floats: Vec<(String, Vec<u32>)>,
    bytes: Vec<(String, Vec<u8>)>,
    errors: Vec<(String, String)>,
    bytes_sent: Vec<(String, u64)>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Deterministic values of every sign and a wide range of magnitudes, different per rank.
fn data(rank: usize, salt: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i.wrapping_mul(2_654_435_761) ^ (rank * 7919 + salt * 104_729)) % 20_011;
            let x = (h as f32 - 10_005.0) / 997.0;
            if i % 13 == 5 { x * 1e-6 } else { x }
        })
        .collect()
}

/// Every collective of the trait, with lengths that differ per rank where the trait allows, and
/// the argument errors (after which the communicator must still work).
fn exercise(c: &dyn Collective) -> Outcome {
    let (rank, world) = (c.rank(), c.world_size());
    let mut out = Outcome { floats: Vec::new(), bytes: Vec::new(), errors: Vec::new(), bytes_sent: Vec::new() };
    let mut sent = c.bytes_sent();
    let mut note = |out: &mut Outcome, what: String, c: &dyn Collective| {
        let now = c.bytes_sent();
        out.bytes_sent.push((what, now - sent));
        sent = now;
    };
    for (salt, len) in [0, 1, 7, 1024, 100_003].into_iter().enumerate() {
        let mut buf = data(rank, salt, len);
        c.all_reduce_sum(&mut buf).unwrap();
        out.floats.push((format!("all_reduce_sum {len}"), bits(&buf)));
        note(&mut out, format!("all_reduce_sum {len}"), c);
    }
    for (salt, len) in [3 + 2 * rank, 0, rank, 4096 + rank].into_iter().enumerate() {
        let got = c.all_gather(&data(rank, 10 + salt, len)).unwrap();
        out.floats.push((format!("all_gather {len}"), bits(&got)));
        note(&mut out, format!("all_gather {len}"), c);
    }
    for (salt, len) in [0, world * 5, world * 3000].into_iter().enumerate() {
        let got = c.reduce_scatter_sum(&data(rank, 20 + salt, len)).unwrap();
        out.floats.push((format!("reduce_scatter_sum {len}"), bits(&got)));
        note(&mut out, format!("reduce_scatter_sum {len}"), c);
    }
    for (root, len) in [(0, 9), (world - 1, 5000), (0, 0)] {
        let mut buf = data(rank, 30 + root, len);
        c.broadcast(&mut buf, root).unwrap();
        out.floats.push((format!("broadcast {len} from {root}"), bits(&buf)));
        note(&mut out, format!("broadcast {len} from {root}"), c);
    }
    let chunks: Vec<Vec<f32>> = (0..world).map(|j| data(rank, 40 + j, (rank + j) % 3 + j * 2)).collect();
    let got = c.all_to_all(chunks).unwrap();
    for (j, chunk) in got.iter().enumerate() {
        out.floats.push((format!("all_to_all from {j}"), bits(chunk)));
    }
    note(&mut out, "all_to_all".into(), c);
    c.barrier().unwrap();
    note(&mut out, "barrier".into(), c);
    for (root, text) in [(0, format!("plan from rank {rank}: {}", "x".repeat(rank * 3))), (world - 1, String::new())] {
        let mut buf = text.into_bytes();
        c.broadcast_bytes(&mut buf, root).unwrap();
        out.bytes.push((format!("broadcast_bytes from {root}"), buf));
        note(&mut out, format!("broadcast_bytes from {root}"), c);
    }
    let mut buf = vec![0.0f32; 3];
    let err = c.broadcast(&mut buf, world).unwrap_err();
    out.errors.push(("broadcast root".into(), format!("{err:?}").split_whitespace().next().unwrap().into()));
    let err = c.broadcast_bytes(&mut Vec::new(), world + 1).unwrap_err();
    out.errors.push(("broadcast_bytes root".into(), format!("{err:?}").split_whitespace().next().unwrap().into()));
    let err = c.all_to_all(vec![Vec::new(); world + 1]).unwrap_err();
    out.errors.push(("all_to_all chunks".into(), format!("{err:?}").split_whitespace().next().unwrap().into()));
    if world > 1 {
        let err = c.reduce_scatter_sum(&[0.0; 7]).unwrap_err();
        out.errors.push(("reduce_scatter length".into(), format!("{err:?}").split_whitespace().next().unwrap().into()));
    }
    // Still usable after refused arguments.
    let mut buf = data(rank, 50, 33);
    c.all_reduce_sum(&mut buf).unwrap();
    out.floats.push(("all_reduce_sum after errors".into(), bits(&buf)));
    note(&mut out, "all_reduce_sum after errors".into(), c);
    out
}

fn nccl_group_of_one() -> NcclCollective {
    let id = NcclId::new().unwrap();
    let opts = options(Duration::from_secs(60), Duration::from_secs(60));
    let comm = NcclCollective::new(0, 1, id, 0, &opts).unwrap();
    eprintln!("formed {comm:?}");
    comm
}

#[test]
#[ignore = "needs a GPU and libnccl: scripts/gpu-check.sh runs it"]
fn gpu_group_of_one_matches_local_group() {
    let nccl = nccl_group_of_one();
    let local = LocalGroup::new(1).pop().unwrap();
    let started = Instant::now();
    let got = exercise(&nccl);
    eprintln!("NCCL group of one: every collective in {:?}", started.elapsed());
    let want = exercise(&local);
    assert_eq!(got.floats.len(), want.floats.len());
    for ((what, a), (_, b)) in got.floats.iter().zip(&want.floats) {
        assert!(a == b, "{what}: NCCL and LocalGroup differ");
    }
    assert_eq!(got, want);
    assert!(got.errors.iter().all(|(_, kind)| kind == "InvalidArgument"), "{:?}", got.errors);
    assert_eq!(nccl.bytes_sent(), 0, "a group of one sends nothing");
}

#[test]
#[ignore = "needs a GPU and libnccl: scripts/gpu-check.sh runs it"]
fn gpu_set_up_times_out_when_a_rank_never_comes() {
    let id = NcclId::new().unwrap();
    let opts = options(Duration::from_secs(5), Duration::from_secs(3));
    let started = Instant::now();
    let err = NcclCollective::new(0, 2, id, 0, &opts).unwrap_err();
    let took = started.elapsed();
    eprintln!("after {took:?}: {err}");
    assert!(matches!(err, CollectiveError::Setup { rank: 0, .. }), "{err}");
    assert!(err.to_string().contains("did not form within"), "{err}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(30), "{took:?}");
    // The aborted attempt left NCCL usable: a group of one still forms.
    let comm = nccl_group_of_one();
    comm.barrier().unwrap();
}

/// Runs `f(rank)` for ranks 0 and 1 in two threads, each with its NCCL rank on GPU `rank`.
fn two_ranks<T: Send + 'static>(
    opts: CollectiveOptions,
    f: impl Fn(NcclCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let id = NcclId::new().unwrap();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (f, opts) = (f.clone(), opts.clone());
            thread::spawn(move || f(NcclCollective::new(rank, 2, id, rank, &opts).unwrap()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
#[ignore = "needs two GPUs and libnccl: scripts/gpu-check.sh runs it where there are two"]
fn gpu_two_ranks_match_local_group() {
    let opts = options(Duration::from_secs(60), Duration::from_secs(60));
    let got = two_ranks(opts, |comm| {
        eprintln!("formed {comm:?}");
        exercise(&comm)
    });
    let want: Vec<Outcome> = thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(2).into_iter().map(|c| s.spawn(move || exercise(&c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
        // Sums of two ranks are exact in either order, so NCCL's equal the ring's bit for bit.
        for ((what, a), (_, b)) in g.floats.iter().zip(&w.floats) {
            assert!(a == b, "rank {rank}: {what}: NCCL and LocalGroup differ");
        }
        assert_eq!(g.floats, w.floats, "rank {rank}");
        assert_eq!(g.bytes, w.bytes, "rank {rank}");
        assert_eq!(g.errors, w.errors, "rank {rank}");
        eprintln!(
            "rank {rank}: nominal bytes sent (NCCL, host): {:?}",
            g.bytes_sent.iter().zip(&w.bytes_sent).collect::<Vec<_>>()
        );
    }
}

#[test]
#[ignore = "needs two GPUs and libnccl: scripts/gpu-check.sh runs it where there are two"]
fn gpu_two_ranks_time_out_when_a_peer_stops_calling() {
    let opts = options(Duration::from_secs(2), Duration::from_secs(60));
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    let results = two_ranks(opts, move |comm| {
        comm.barrier().unwrap();
        if comm.rank() == 1 {
            // Stays in the group without calling until rank 0 has given up, then leaves.
            rx.lock().unwrap().recv_timeout(Duration::from_secs(60)).ok();
            return None;
        }
        let started = Instant::now();
        let err = comm.all_reduce_sum(&mut [1.0; 1000]).unwrap_err();
        let took = started.elapsed();
        let again = comm.barrier().unwrap_err();
        tx.send(()).unwrap();
        Some((err, took, again))
    });
    let (err, took, again) = results.into_iter().flatten().next().unwrap();
    eprintln!("after {took:?}: {err}; then: {again}");
    assert!(matches!(err, CollectiveError::Timeout { rank: 0, peer: 1, .. }), "{err}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(20), "{took:?}");
    assert!(matches!(again, CollectiveError::Broken { .. }), "{again}");
}

// ---- a worker group over NCCL ----

/// A worker group whose model collectives go over NCCL (`DataPlane::Nccl`): rank 0 makes the
/// NCCL id and hands it to the other ranks over the group's TCP connections. Without NCCL (CI)
/// every rank of a group of two fails to form it at once, with rank 0's reason; with NCCL and a
/// GPU, a group of one forms and rank 0 leads it.
#[test]
fn a_worker_group_hands_out_rank_0s_nccl_id_or_why_it_has_none() {
    let whole = common::model(Preset::Tiny);
    let nccl_here = NcclId::new().is_ok();
    let world = if nccl_here { 1 } else { 2 };
    let peers: Vec<String> = (0..world).map(|_| common::ports::free_addr()).collect();
    let start = Instant::now();
    let results: Vec<Result<Member, String>> = thread::scope(|s| {
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let spec = GroupSpec {
                    group: "tp".into(),
                    epoch: 1,
                    rank,
                    peers: peers.clone(),
                    options: options(Duration::from_secs(10), Duration::from_secs(10)),
                    security: tandem_proto::Security::Insecure,
                    engine: EngineConfig::default(),
                    moe: MoeSplit::Intermediate,
                    data: DataPlane::Nccl { device: 0 },
                };
                let shard = whole.cut(rank, world, MoeSplit::Intermediate).unwrap();
                s.spawn(move || {
                    let (ended, _) = tokio::sync::mpsc::unbounded_channel();
                    let (train_events, _) = tokio::sync::mpsc::unbounded_channel();
                    group::join(&spec, shard, None, train_events, ended).map_err(|e| e.to_string())
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    if nccl_here {
        assert!(matches!(results[0], Ok(Member::Leader(_))), "a group of one over NCCL did not form");
        return;
    }
    for (rank, result) in results.iter().enumerate() {
        let err = result.as_ref().err().unwrap_or_else(|| panic!("rank {rank} formed a group without NCCL"));
        assert!(err.contains(&format!("rank {rank}: rank 0 could not make the NCCL id")), "{err}");
        assert!(err.contains("NCCL"), "the reason is not rank 0's: {err}");
    }
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

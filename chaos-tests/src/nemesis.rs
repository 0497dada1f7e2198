//! The nemeses: each scenario injects one fault into a running cluster, chosen by the run's
//! seed where there is a choice (which follower, which worker), and hands back what heals it.

use std::time::Duration;

use anyhow::{Result, bail};
use tandem_worker::rng::Xoshiro256;

use crate::cluster::{Cluster, Kind, LEASE, SPARE, fill_disk, free_disk};
use crate::net::Host;
use crate::shaper::Shape;

/// What undoes a fault.
pub type Heal = Box<dyn FnOnce(&mut Cluster) -> Result<()>>;

/// One kind of fault.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// How long the fault lasts before it is healed.
    pub hold: Duration,
    /// The workload's clients hang up on every stream after this many bytes.
    pub hang_up_after: Option<usize>,
    /// How many clients, as a multiple of the usual.
    pub load: usize,
    inject: fn(&mut Cluster, &mut Xoshiro256) -> Result<Heal>,
}

impl Scenario {
    pub fn inject(&self, cluster: &mut Cluster, rng: &mut Xoshiro256) -> Result<Heal> {
        (self.inject)(cluster, rng)
    }
}

const HOLD: Duration = Duration::from_secs(5);

const fn scenario(
    name: &'static str,
    about: &'static str,
    inject: fn(&mut Cluster, &mut Xoshiro256) -> Result<Heal>,
) -> Scenario {
    Scenario { name, about, hold: HOLD, hang_up_after: None, load: 1, inject }
}

/// Every scenario, in the scorecard's order.
pub fn all() -> Vec<Scenario> {
    vec![
        scenario("leader-kill", "kill -9 of the leader coordinator; restarted after the hold", |c, _| {
            let leader = leader(c)?;
            kill(c, &leader)
        }),
        scenario("follower-kill", "kill -9 of a follower coordinator; restarted after the hold", |c, rng| {
            let follower = follower(c, rng)?;
            kill(c, &follower)
        }),
        scenario(
            "leader-pause",
            "SIGSTOP of the leader past the election timeout, then SIGCONT (a zombie leader)",
            |c, _| {
                let leader = leader(c)?;
                pause(c, &leader)
            },
        ),
        scenario(
            "worker-kill",
            "kill -9 of a worker mid-fine-tune and mid-stream; restarted after the hold",
            |c, rng| {
                let worker = training_worker(c, rng);
                kill(c, &worker)
            },
        ),
        Scenario {
            hold: LEASE * 2,
            ..scenario(
                "worker-pause",
                "SIGSTOP of a worker mid-fine-tune past its lease, then SIGCONT (a zombie worker)",
                |c, rng| {
                    let worker = training_worker(c, rng);
                    pause(c, &worker)
                },
            )
        },
        scenario(
            "rank-loss",
            "kill -9 of one rank of the worker group (rank 0 or 1, by the seed), while streams run; \
             restarted after the hold",
            |c, rng| {
                let ranks = c.group_ranks()?;
                if ranks.is_empty() {
                    bail!("the worker group has no ranks");
                }
                let rank = pick(&ranks, rng);
                kill(c, &rank)
            },
        ),
        scenario("leader-isolated", "the leader's link down: a minority partition of the leader", |c, _| {
            let host = c.node(&leader(c)?).host.clone();
            c.strike();
            c.net.isolate(&host)?;
            Ok(heal_net())
        }),
        scenario("follower-isolated", "a follower's link down: the leader keeps its majority", |c, rng| {
            let follower = follower(c, rng)?;
            let host = c.node(&follower).host.clone();
            c.strike();
            c.net.isolate(&host)?;
            Ok(heal_net())
        }),
        scenario(
            "leader-one-way",
            "everything the leader sends to the other coordinators is dropped; it hears them",
            |c, _| {
                let leader = c.wait_leader(Duration::from_secs(20))?;
                let from = c.node(&format!("c{leader}")).host.clone();
                let others: Vec<Host> = (c.nodes.iter())
                    .filter(|n| matches!(n.kind, Kind::Coordinator(id) if id != leader))
                    .map(|n| n.host.clone())
                    .collect();
                c.strike();
                c.net.drop_to(&from, &others.iter().collect::<Vec<_>>())?;
                Ok(heal_net())
            },
        ),
        scenario(
            "disk-full",
            "the leader's disk fills up; freed after the hold (and the process restarted if it exited)",
            |c, _| {
                let name = leader(c)?;
                let disk = c.dir.join(&name);
                c.strike();
                fill_disk(&disk)?;
                Ok(Box::new(move |c| {
                    free_disk(&disk)?;
                    c.restart_if_exited(&name).map(drop)
                }))
            },
        ),
        Scenario {
            hold: Duration::ZERO,
            ..scenario(
                "crash-points",
                "a process crashes at failpoints before and after the fsyncs and renames of the Raft log, \
                 state, snapshots and checkpoints (a quarter of them each seed), restarted at once",
                |c, rng| {
                    c.strike();
                    let block = (c.seed.saturating_sub(1) % 4) as usize;
                    for point in durable_points().into_iter().skip(block).step_by(4) {
                        let targets = if point.starts_with("checkpoint") {
                            c.workers()
                        } else if rng.below(2) == 0 {
                            vec![leader(c)?]
                        } else {
                            vec![follower(c, rng)?]
                        };
                        let crashed = c.crash_at(&targets, &point, Duration::from_secs(20))?;
                        eprintln!("chaos: crash-points: {} crashed at {point}", crashed.join(", "));
                    }
                    Ok(no_heal())
                },
            )
        },
        scenario(
            "disk-eio",
            "every write of the leader's Raft log and of a training worker's checkpoints fails (EIO); \
             healed after the hold (and a process restarted if it exited)",
            |c, rng| {
                let (leader, worker) = (leader(c)?, training_worker(c, rng));
                let fail = |files: &[&str]| -> String {
                    (files.iter())
                        .flat_map(|f| STEPS.iter().map(move |op| format!("{f}-{op}-before=return(eio)\n")))
                        .collect()
                };
                c.strike();
                c.set_failpoints(&leader, &fail(&RAFT_FILES))?;
                c.set_failpoints(&worker, &fail(&["checkpoint"]))?;
                Ok(Box::new(|c| {
                    let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
                    for name in &names {
                        c.set_failpoints(name, "")?;
                        c.restart_if_exited(name)?;
                    }
                    Ok(())
                }))
            },
        ),
        scenario("leader-transfer", "leadership handed to each follower in turn, under load", |c, _| {
            let leader = c.wait_leader(Duration::from_secs(20))?;
            c.strike();
            for to in c.coordinators().into_iter().filter(|&id| id != leader) {
                c.transfer_leader(to)?;
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(no_heal())
        }),
        scenario(
            "membership",
            "a fourth coordinator joins, takes the lead, and the old leader is removed and stopped",
            |c, _| {
                let leader = c.wait_leader(Duration::from_secs(20))?;
                c.strike();
                c.start_node(&format!("c{SPARE}"))?;
                c.change_members(&[SPARE], &[])?;
                c.transfer_leader(SPARE)?;
                c.change_members(&[], &[leader])?;
                c.node(&format!("c{leader}")).terminate();
                Ok(no_heal())
            },
        ),
        scenario("loss", "20% of every node's packets dropped at random", |c, _| {
            c.strike();
            for host in hosts(c) {
                c.net.loss(&host, 20)?;
            }
            Ok(heal_net())
        }),
        scenario(
            "delay",
            "every node's packets delayed 50 ms +- 20 ms, 5% dropped, reordered where delays cross (NFQUEUE)",
            |c, rng| {
                let shape =
                    Shape { delay: Duration::from_millis(50), jitter: Duration::from_millis(20), loss_percent: 5 };
                c.strike();
                for host in hosts(c) {
                    c.net.shape(&host, shape, rng.next_u64())?;
                }
                Ok(heal_net())
            },
        ),
        Scenario {
            hold: Duration::ZERO,
            ..scenario("rolling-restart", "every process stopped (SIGTERM) and started again, one at a time", |c, _| {
                c.strike();
                for name in c.nodes.iter().filter(|n| n.running()).map(|n| n.name.clone()).collect::<Vec<_>>() {
                    c.node(&name).terminate();
                    c.start_node(&name)?;
                    match c.node(&name).kind {
                        Kind::Coordinator(_) => drop(c.wait_leader(Duration::from_secs(30))?),
                        Kind::Worker | Kind::GroupWorker => {
                            c.wait_serving(c.workers().len(), Duration::from_secs(60))?
                        }
                    }
                }
                Ok(no_heal())
            })
        },
        Scenario {
            hang_up_after: Some(200),
            ..scenario("stream-hangups", "clients hang up on every stream after its first bytes", |_, _| Ok(no_heal()))
        },
        Scenario { load: 4, ..scenario("overload", "4x the clients", |_, _| Ok(no_heal())) },
    ]
}

/// The files written durably (`tandem_proto::durable`): the coordinators' Raft log, state and
/// snapshot, and the workers' checkpoints; and the steps of each write.
const RAFT_FILES: [&str; 3] = ["raft-log", "raft-state", "raft-snapshot"];
const STEPS: [&str; 3] = ["fsync", "rename", "dirsync"];

/// Every failpoint of those writes: before and after each step of each file's.
fn durable_points() -> Vec<String> {
    // Checkpoints first: the jobs that write them end some seconds into the run.
    (["checkpoint"].iter().chain(&RAFT_FILES))
        .flat_map(|f| STEPS.iter().flat_map(move |op| ["before", "after"].map(|when| format!("{f}-{op}-{when}"))))
        .collect()
}

/// The leader's node name.
fn leader(c: &Cluster) -> Result<String> {
    Ok(format!("c{}", c.wait_leader(Duration::from_secs(20))?))
}

fn pick(names: &[String], rng: &mut Xoshiro256) -> String {
    names[rng.below(names.len() as u64) as usize].clone()
}

/// A worker running a fine-tuning job, by the seed (any worker if none is).
fn training_worker(c: &Cluster, rng: &mut Xoshiro256) -> String {
    let training = c.training_workers();
    pick(if training.is_empty() { c.workers() } else { training }.as_slice(), rng)
}

/// A coordinator other than the leader, by the seed.
fn follower(c: &Cluster, rng: &mut Xoshiro256) -> Result<String> {
    let leader = c.wait_leader(Duration::from_secs(20))?;
    let followers: Vec<String> =
        c.coordinators().into_iter().filter(|&id| id != leader).map(|id| format!("c{id}")).collect();
    if followers.is_empty() {
        bail!("no follower");
    }
    Ok(pick(&followers, rng))
}

fn hosts(c: &Cluster) -> Vec<Host> {
    c.nodes.iter().map(|n| n.host.clone()).collect()
}

fn kill(c: &mut Cluster, name: &str) -> Result<Heal> {
    c.strike();
    c.node(name).kill();
    let name = name.to_string();
    Ok(Box::new(move |c| c.start_node(&name)))
}

fn pause(c: &mut Cluster, name: &str) -> Result<Heal> {
    c.strike();
    c.node(name).pause();
    let name = name.to_string();
    Ok(Box::new(move |c| {
        c.node(&name).resume();
        Ok(())
    }))
}

/// For a fault that is over once injected (or lies in the workload).
fn no_heal() -> Heal {
    Box::new(|_| Ok(()))
}

fn heal_net() -> Heal {
    Box::new(|c| Ok(c.net.heal()?))
}

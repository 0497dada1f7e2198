//! Tandem under faults (issue 20): a real cluster of `tandem` processes in network namespaces,
//! driven by a recorded workload while a nemesis injects one fault, then checked. The map:
//!
//! - `net.rs`: the namespaces, the bridge, and the faults of the network (links down, drops
//!   with nftables, random loss, shaping).
//! - `shaper.rs`: delay, jitter, loss and reordering in user space through NFQUEUE (what
//!   `tc netem` does, on kernels without it).
//! - `cluster.rs`: 3 coordinators (gateways on, each on a tmpfs disk of its own, a spare fourth
//!   for membership changes) and workers as processes under mutual TLS; kill, pause, resume,
//!   restart, fill a disk, change members, transfer the lead; each process's memory and
//!   descriptors.
//! - `client.rs`: the workload's HTTP client: bounded, every failure a value.
//! - `history.rs`: operations with their invocation and completion times and what each
//!   outcome proves (done, not done, maybe).
//! - `workload.rs`: OpenAI-style clients of a few tenants (completions, streams, adapter
//!   uploads, deletes and reads over shared names, short fine-tuning jobs made, cancelled and
//!   read).
//! - `nemesis.rs`: the scenarios, one fault each, and how each heals.
//! - `run.rs`: one scenario with one seed on a fresh cluster, with the write and inference
//!   probes, and every checker.
//! - `checkers.rs`: linearizability of the adapter and job registries, fine-tuning jobs
//!   (resumed at their last checkpoint, registered once), retryable inference errors, recovery times, panics.
//! - `linearizability.rs`: Wing and Gong's search with Lowe's memoisation (the algorithm of
//!   Knossos and Porcupine), per key.
//! - `models.rs`: the objects' sequential models (the adapter and job registries), each tested against
//!   the coordinators' state machine.
//! - `etcd.rs`: the same run's yardstick: a 3-member etcd's leader-kill outage.
//! - `records.rs`: every run's report kept as a line of JSON, so a long scorecard can be
//!   finished over several invocations (`--resume`).
//!
//! `main.rs` is the scorecard: `cargo run -p tandem-chaos --release -- --scenarios all --seeds 20`.

pub mod checkers;
pub mod client;
pub mod cluster;
pub mod etcd;
pub mod history;
pub mod linearizability;
pub mod models;
pub mod nemesis;
pub mod net;
pub mod records;
pub mod run;
pub mod shaper;
pub mod workload;

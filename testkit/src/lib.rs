//! Cluster harnesses for Tandem's tests, so that each test says what it checks and not how a
//! cluster is put together. Two kinds: coordinators (bare replicas, or whole servers with
//! workers) in one process over an in-memory Raft network that the test can break (fast and
//! exact, for consensus and the control plane), and real `tandem` processes on loopback ports
//! (slower, for what only whole processes show: kills, restarts from disk, flags, the gateway).
//! A dev-dependency only; nothing here ships.
//!
//! Map:
//! - `mem_net.rs`: [`MemNet`], Raft messages between replicas of one process, with faults in
//!   the style of raft-rs's test harness: `drop` (a fraction, or the next few), `cut`,
//!   `isolate`, `heal`.
//! - `replicas.rs`: [`Replicas`], N coordinator replicas over a [`MemNet`], each with its log
//!   on disk: start, stop, restart, join, wait for a leader.
//! - `process.rs`: the binary under test ([`Tandem`], whose path the test passes in), processes
//!   killed on drop ([`Procs`]), scratch folders removed on drop ([`Scratch`]), [`wait_for`],
//!   and [`propose`] (a proposal retried until a coordinator answers).
//! - `ports.rs`: free loopback ports and addresses ([`free_port`], [`free_addr`]) from below the
//!   kernel's ephemeral range; self-contained, the worker's own tests include it by path.
//! - `in_process.rs`: [`InProcessCluster`], N coordinators (the real server, its cluster API
//!   on loopback) whose Raft messages go over a [`MemNet`], and M workers (the real worker
//!   node over a tiny model), all in the test's process.
//! - `coordinators.rs`: [`Coordinators`], coordinator processes whose links run through TCP
//!   proxies of the test, so it can `cut`, `isolate` and `heal` them as on a [`MemNet`].
//! - `mini_cluster.rs`: [`MiniCluster`], a tiny model, one coordinator (with the gateway or
//!   not) and whole-model or group workers, as processes.
//! - `http.rs`: a blocking HTTP/1.1 client for the gateway (JSON, multipart uploads, event
//!   pages).
//! - `etcd.rs`: [`Etcd`], a real one-member etcd server for the etcd store's tests.
//! - `certs.rs`: [`TestCerts`], a test cluster's own CA and its processes' certificates.

// A harness that cannot set up is a failed test: it unwraps, and panics with what went wrong.
#![allow(clippy::unwrap_used)]

mod certs;
mod coordinators;
mod etcd;
pub mod http;
mod in_process;
mod mem_net;
mod mini_cluster;
mod ports;
mod process;
mod replicas;

pub use certs::TestCerts;
pub use coordinators::{CoordinatorOptions, Coordinators};
pub use etcd::{Etcd, EtcdClientFiles};
pub use in_process::InProcessCluster;
pub use mem_net::MemNet;
pub use mini_cluster::{MiniCluster, MiniClusterBuilder};
pub use ports::{free_addr, free_port};
pub use process::{Procs, Scratch, Tandem, propose, secret_file, wait_for};
pub use replicas::{FAST, Replicas, WAIT};

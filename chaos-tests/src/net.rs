//! The chaos cluster's network: one Linux network namespace per node, each joined to one bridge
//! by a veth link, with an address of its own on 10.98.0.0/24 (the runner itself, in the root
//! namespace, holds 10.98.0.254 on the bridge). Faults are the kernel's: a node's link taken
//! down (a partition of that node from everything), nftables rules in a node's namespace that
//! silently drop what it sends to some peers (one-way or two-way partitions between sets) or a
//! random share of it (loss), or that queue all it sends to the runner's [`Shaper`] (delay,
//! jitter, loss and reordering). Nothing leaves the bridge. Needs root (CAP_NET_ADMIN),
//! iproute2, nftables and iptables.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::shaper::{QUEUE, Shape, Shaper};

/// The bridge every node's link joins.
const BRIDGE: &str = "tch0";
/// Every namespace and veth of a chaos run starts with this, so a run cleans up what a killed
/// earlier run left.
const PREFIX: &str = "tch-";
/// nftables' table of the faults, in each node's namespace.
const TABLE: &str = "chaos";

/// What went wrong setting up or changing the network: the command and what it said.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {message}")]
pub struct NetError {
    command: String,
    message: String,
}

/// Runs `program args...`, failing with its stderr.
fn run(program: &str, args: &[&str]) -> Result<(), NetError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetError { command: command.clone(), message: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError { command, message: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// `run` inside namespace `ns`.
fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<(), NetError> {
    run("ip", &[&["netns", "exec", ns, program][..], args].concat())
}

/// A node's place on the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The namespace (`tch-<name>`).
    pub ns: String,
    /// Its veth's end in the root namespace, on the bridge (the same name).
    veth: String,
    pub ip: Ipv4Addr,
}

/// The bridge and the namespaces on it; dropping it removes them all.
pub struct Net {
    hosts: Vec<Host>,
    /// The hosts being shaped, each with its shaper.
    shapers: Vec<(Host, Shaper)>,
}

impl Net {
    /// The bridge, up, with the runner's address; whatever an earlier run left is removed first.
    pub fn new() -> Result<Net, NetError> {
        cleanup();
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run("ip", &["addr", "add", "10.98.0.254/24", "dev", BRIDGE])?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        Ok(Net { hosts: Vec::new(), shapers: Vec::new() })
    }

    /// A namespace `tch-<name>` at 10.98.0.`octet`, its loopback and its link up, and an empty
    /// nftables table of faults.
    pub fn add_host(&mut self, name: &str, octet: u8) -> Result<Host, NetError> {
        let ns = format!("{PREFIX}{name}");
        assert!(ns.len() <= 15, "interface names are at most 15 bytes: {ns}");
        let ip = Ipv4Addr::new(10, 98, 0, octet);
        run("ip", &["netns", "add", &ns])?;
        run("ip", &["link", "add", &ns, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        run("ip", &["link", "set", &ns, "master", BRIDGE, "up"])?;
        run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run_in(&ns, "nft", &["add", "table", "inet", TABLE])?;
        run_in(&ns, "nft", &["add", "chain", "inet", TABLE, "out", "{ type filter hook output priority 0; }"])?;
        let host = Host { veth: ns.clone(), ns, ip };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Takes `host`'s link down: nothing reaches it or leaves it (the runner's clients included).
    pub fn isolate(&self, host: &Host) -> Result<(), NetError> {
        run("ip", &["link", "set", &host.veth, "down"])
    }

    /// Drops, silently, every packet `from` sends to each of `to` (a one-way partition; call it
    /// both ways for a two-way one).
    pub fn drop_to(&self, from: &Host, to: &[&Host]) -> Result<(), NetError> {
        for t in to {
            run_in(&from.ns, "nft", &["add", "rule", "inet", TABLE, "out", "ip", "daddr", &t.ip.to_string(), "drop"])?;
        }
        Ok(())
    }

    /// Drops `percent` of the packets `host` sends, at random.
    pub fn loss(&self, host: &Host, percent: u32) -> Result<(), NetError> {
        let rule =
            ["add", "rule", "inet", TABLE, "out", "numgen", "random", "mod", "100", "<", &percent.to_string(), "drop"];
        run_in(&host.ns, "nft", &rule)
    }

    /// Shapes everything `host` sends on its link (`shape`, drawn from `seed`).
    pub fn shape(&mut self, host: &Host, shape: Shape, seed: u64) -> Result<(), NetError> {
        let shaper = Shaper::start(&host.ns, shape, seed)
            .map_err(|e| NetError { command: format!("shaping {}", host.ns), message: e.to_string() })?;
        self.shapers.push((host.clone(), shaper));
        // iptables' NFQUEUE target, which kernels without nftables' own `queue` have too.
        // `bypass`: were the shaper gone, packets would pass rather than vanish.
        let queue = QUEUE.to_string();
        let rule = ["-A", "OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", &queue, "--queue-bypass"];
        run_in(&host.ns, "iptables", &rule)
    }

    /// Every link up, every rule removed, and every shaper's held packets let go.
    pub fn heal(&mut self) -> Result<(), NetError> {
        for h in &self.hosts {
            run("ip", &["link", "set", &h.veth, "up"])?;
            run_in(&h.ns, "nft", &["flush", "chain", "inet", TABLE, "out"])?;
        }
        for (host, shaper) in self.shapers.drain(..) {
            run_in(&host.ns, "iptables", &["-F", "OUTPUT"])?;
            shaper.stop().map_err(|e| NetError { command: "stopping a shaper".into(), message: e.to_string() })?;
        }
        Ok(())
    }
}

/// Removes the bridge and every chaos namespace and veth.
fn cleanup() {
    let listed = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for ns in String::from_utf8_lossy(&listed).split_whitespace().filter(|w| w.starts_with(PREFIX)) {
        // Deleting the namespace deletes its veth pair.
        let _ = run("ip", &["netns", "del", ns]);
    }
    // A veth whose namespace is gone (a run killed while it made them).
    let links = Command::new("ip").args(["-o", "link", "show"]).output().map(|o| o.stdout).unwrap_or_default();
    for link in String::from_utf8_lossy(&links).lines().filter_map(|l| l.split(": ").nth(1)) {
        let name = link.split('@').next().unwrap_or(link);
        if name.starts_with(PREFIX) {
            let _ = run("ip", &["link", "del", name]);
        }
    }
    let _ = run("ip", &["link", "del", BRIDGE]);
}

impl Drop for Net {
    fn drop(&mut self) {
        cleanup();
    }
}

//! The chaos cluster's network: one Linux network namespace per node, each joined to one bridge
//! by a veth link, with an address of its own on 10.98.0.0/24 (the runner itself, in the root
//! namespace, holds 10.98.0.254 on the bridge). Faults are the kernel's: a node's link taken
//! down (a partition of that node from everything), nftables rules in a node's namespace that
//! silently drop what it sends to some peers (one-way or two-way partitions between sets) or a
//! random share of it (loss), and `tc netem` delay, loss and reordering where the kernel has
//! netem. Nothing leaves the bridge. Needs root (CAP_NET_ADMIN), iproute2 and nftables.

use std::net::Ipv4Addr;
use std::process::Command;

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
}

impl Net {
    /// The bridge, up, with the runner's address; whatever an earlier run left is removed first.
    pub fn new() -> Result<Net, NetError> {
        cleanup();
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run("ip", &["addr", "add", "10.98.0.254/24", "dev", BRIDGE])?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        Ok(Net { hosts: Vec::new() })
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

    /// `tc netem` on `host`'s link (`spec`: "delay 100ms 50ms reorder 25%", ...); an error
    /// where the kernel has no netem.
    pub fn netem(&self, host: &Host, spec: &str) -> Result<(), NetError> {
        let args: Vec<&str> =
            ["qdisc", "add", "dev", "eth0", "root", "netem"].into_iter().chain(spec.split_whitespace()).collect();
        run_in(&host.ns, "tc", &args)
    }

    /// Every link up, every drop rule and netem qdisc removed.
    pub fn heal(&self) -> Result<(), NetError> {
        for h in &self.hosts {
            run("ip", &["link", "set", &h.veth, "up"])?;
            run_in(&h.ns, "nft", &["flush", "chain", "inet", TABLE, "out"])?;
            // Absent unless netem was added: nothing to remove is not a failure.
            let _ = run_in(&h.ns, "tc", &["qdisc", "del", "dev", "eth0", "root"]);
        }
        Ok(())
    }
}

/// Whether this kernel has `tc netem` (many minimal VM kernels do not).
pub fn has_netem() -> bool {
    let ns = format!("{PREFIX}probe");
    let ok = run("ip", &["netns", "add", &ns]).is_ok()
        && run_in(&ns, "tc", &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]).is_ok();
    let _ = run("ip", &["netns", "del", &ns]);
    ok
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

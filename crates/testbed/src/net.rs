//! Network namespaces as hosts of their own (needs root: `ip netns`): several on one
//! bridge (the local cluster's `--netns` layout), or two joined by one veth pair whose
//! link can be rate-limited (`tc tbf`; these kernels have no netem) and cut. And the
//! guests' own segment ([`GuestNet`]): a bridge of one name on every host, all joined
//! into one L2 segment that the root namespace reaches.

use crate::error::{Result, TestbedError};
use std::process::Command;

/// Runs `program ARGS`; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let command = format!("{program} {}", args.join(" "));
    let out =
        Command::new(program).args(args).output().map_err(|e| TestbedError::Command { command: command.clone(), stderr: e.to_string() })?;
    if !out.status.success() {
        return Err(TestbedError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(())
}

/// Refuses a subnet (`A.B.C`, a /24) that this machine already routes through a device
/// other than `ours`: a second bridge on it would take some of the first one's traffic.
fn subnet_free(subnet: &str, ours: &str) -> Result<()> {
    let prefix = format!("{subnet}.0/24");
    let out = Command::new("ip")
        .args(["-o", "-4", "route", "show", "exact", &prefix])
        .output()
        .map_err(|e| TestbedError::Command { command: format!("ip route show exact {prefix}"), stderr: e.to_string() })?;
    let routes = String::from_utf8_lossy(&out.stdout);
    let device = routes.split_whitespace().skip_while(|w| *w != "dev").nth(1).filter(|d| *d != ours);
    match device {
        Some(device) => Err(TestbedError::SubnetTaken { subnet: subnet.to_string(), device: device.to_string() }),
        None => Ok(()),
    }
}

/// Moves the calling thread (only it) into network namespace `ns` (`/run/netns/NS`, as
/// `ip netns add` makes it): sockets it opens from then on live in that namespace, so a
/// test can talk to an agent listening inside it. Use a thread of its own; needs root.
pub fn enter_netns(ns: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| TestbedError::io(format!("opening network namespace {path}"), e))?;
    // SAFETY: `file` is an open descriptor of a network namespace for the whole call;
    // setns only changes the calling thread's namespace and touches no Rust memory.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(TestbedError::io(format!("entering network namespace {ns}"), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Deletes namespace `ns` if it exists (ignoring "not found").
fn del_netns(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Namespaces `PREFIX1..PREFIXn`, each with `eth0` at `SUBNET.N/24`, all joined by
/// one bridge on this machine at `SUBNET.254`. Namespaces and bridge are removed on drop.
#[derive(Debug)]
pub struct BridgeNet {
    bridge: String,
    subnet: String,
    namespaces: Vec<String>,
}

impl BridgeNet {
    /// The local cluster's layout: bridge `wabr0`, namespaces `wa-h1`.., subnet 10.252.0.
    pub fn local_cluster(hosts: usize) -> Result<BridgeNet> {
        BridgeNet::new("wabr0", "wa-h", "10.252.0", hosts)
    }

    /// Creates the bridge and `hosts` namespaces (stale ones of the same names are
    /// removed first).
    pub fn new(bridge: &str, prefix: &str, subnet: &str, hosts: usize) -> Result<BridgeNet> {
        let _ = Command::new("ip").args(["link", "del", bridge]).output();
        subnet_free(subnet, bridge)?;
        let mut net = BridgeNet { bridge: bridge.to_string(), subnet: subnet.to_string(), namespaces: vec![] };
        run("ip", &["link", "add", bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{subnet}.254/24"), "dev", bridge])?;
        run("ip", &["link", "set", bridge, "up"])?;
        for n in 1..=hosts {
            let ns = format!("{prefix}{n}");
            del_netns(&ns);
            // A namespace that outlived its name (a process still in it) keeps the host
            // end of its veth: remove that too.
            let _ = Command::new("ip").args(["link", "del", &ns]).output();
            run("ip", &["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            // The host end of the veth is named like the namespace.
            run("ip", &["link", "add", &ns, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run("ip", &["link", "set", &ns, "master", bridge, "up"])?;
            run("ip", &["-n", &ns, "addr", "add", &format!("{subnet}.{n}/24"), "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Host `n`'s namespace (1-based).
    pub fn namespace(&self, n: usize) -> Option<&str> {
        self.namespaces.get(n.checked_sub(1)?).map(String::as_str)
    }

    /// Host `n`'s address (1-based).
    pub fn addr(&self, n: usize) -> String {
        format!("{}.{n}", self.subnet)
    }

    /// Cuts host `n` (1-based) off the bridge: the bridge's end of its veth goes down,
    /// so it reaches neither this machine nor the other hosts. Inside the namespace
    /// `eth0` stays up without a carrier and keeps its address: a client entering the
    /// namespace still reaches a server listening there.
    pub fn cut(&self, n: usize) -> Result<()> {
        run("ip", &["link", "set", self.host_end(n)?, "down"])
    }

    /// Restores host `n`'s link cut by [`BridgeNet::cut`] (it rejoins the bridge).
    pub fn restore(&self, n: usize) -> Result<()> {
        let end = self.host_end(n)?;
        run("ip", &["link", "set", end, "master", &self.bridge, "up"])
    }

    /// The bridge's end of host `n`'s veth (named like its namespace).
    fn host_end(&self, n: usize) -> Result<&str> {
        self.namespace(n).ok_or(TestbedError::NoSuchHost { host: n, what: "network" })
    }

    /// Shapes the links between hosts: for each `(a, b, rate)` (1-based hosts, bytes/s),
    /// what host `a` sends to host `b` and what `b` sends to `a` are each limited to
    /// `rate`. Each host's `eth0` gets an `htb` root (traffic to hosts not named stays
    /// unshaped), one class per link with a short `bfifo` queue, and a `u32` filter on
    /// the peer's address: several links of one host, each at its own rate. Replaces
    /// any shaping set before.
    pub fn shape(&self, links: &[(usize, usize, u64)]) -> Result<()> {
        let mut classes: std::collections::BTreeMap<usize, Vec<(usize, u64)>> = std::collections::BTreeMap::new();
        for &(a, b, rate) in links {
            classes.entry(a).or_default().push((b, rate));
            classes.entry(b).or_default().push((a, rate));
        }
        for (host, peers) in classes {
            let ns = self.namespace(host).ok_or(TestbedError::NoSuchHost { host, what: "network" })?;
            let _ = Command::new("tc").args(["-n", ns, "qdisc", "del", "dev", "eth0", "root"]).output();
            run("tc", &["-n", ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb"])?;
            for (peer, rate) in peers {
                let class = format!("1:{}", 10 + peer);
                let bits = format!("{}bit", rate.saturating_mul(8));
                run(
                    "tc",
                    &["-n", ns, "class", "add", "dev", "eth0", "parent", "1:", "classid", &class, "htb", "rate", &bits, "ceil", &bits],
                )?;
                // A short queue (about 100 ms at the rate): the default one holds a
                // thousand offloaded 64 KiB packets, seconds behind which the agents'
                // own requests on the link would wait (no fq_codel or sfq here).
                let limit = (rate / 10).max(64 << 10).to_string();
                let leaf = format!("{}:", 10 + peer);
                run("tc", &["-n", ns, "qdisc", "add", "dev", "eth0", "parent", &class, "handle", &leaf, "bfifo", "limit", &limit])?;
                let dst = format!("{}/32", self.addr(peer));
                run(
                    "tc",
                    &[
                        "-n", ns, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
                        "dst", &dst, "flowid", &class,
                    ],
                )?;
            }
        }
        Ok(())
    }
}

impl Drop for BridgeNet {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..) {
            del_netns(&ns);
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

/// Two hosts of their own: namespaces `a` and `b` joined by a veth pair, addresses
/// 10.251.N.1 and 10.251.N.2. Removed on drop.
#[derive(Debug)]
pub struct NetPair {
    /// Namespace A.
    pub a: String,
    /// Namespace B.
    pub b: String,
    /// A's address.
    pub addr_a: String,
    /// B's address.
    pub addr_b: String,
    /// A's end of the veth pair.
    pub veth_a: String,
}

impl NetPair {
    /// Creates the pair; `n` makes names and addresses unique among concurrent pairs.
    pub fn new(n: u8) -> Result<NetPair> {
        let id = std::process::id() % 10000;
        let (va, vb) = (format!("wa{id}v{n}a"), format!("wa{id}v{n}b"));
        let pair = NetPair {
            a: format!("wa{id}-{n}a"),
            b: format!("wa{id}-{n}b"),
            addr_a: format!("10.251.{n}.1"),
            addr_b: format!("10.251.{n}.2"),
            veth_a: va.clone(),
        };
        for ns in [&pair.a, &pair.b] {
            del_netns(ns);
            run("ip", &["netns", "add", ns])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        run("ip", &["link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns", &pair.b])?;
        run("ip", &["-n", &pair.a, "addr", "add", &format!("{}/24", pair.addr_a), "dev", &va])?;
        run("ip", &["-n", &pair.b, "addr", "add", &format!("{}/24", pair.addr_b), "dev", &vb])?;
        run("ip", &["-n", &pair.a, "link", "set", &va, "up"])?;
        run("ip", &["-n", &pair.b, "link", "set", &vb, "up"])?;
        Ok(pair)
    }

    /// Rate-limits A's egress (the migration stream's direction) with a token bucket.
    pub fn limit_a(&self, rate: &str) -> Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.a,
                "tc",
                "qdisc",
                "add",
                "dev",
                &self.veth_a,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "100ms",
            ],
        )
    }

    /// Cuts the link (A's end down).
    pub fn cut(&self) -> Result<()> {
        run("ip", &["-n", &self.a, "link", "set", &self.veth_a, "down"])
    }

    /// Restores a cut link (A's end up again; addresses and limits are kept).
    pub fn restore(&self) -> Result<()> {
        run("ip", &["-n", &self.a, "link", "set", &self.veth_a, "up"])
    }
}

/// The guests' L2 segment: a bridge named `bridge` in the root namespace with address
/// `SUBNET.254/24` (so the root namespace reaches the guests: tests, `up` and the
/// controller probe them from there), and a bridge of the same name in each host
/// namespace (host N's at `SUBNET.(240+N)`, so a CLI run there reaches them too), joined
/// to the root one by a veth pair (root end `<bridge>p<N>`, host end `uplink`). A VM's NIC names the bridge; whichever host it runs on, its tap joins the
/// same segment, so its MAC and address stay valid across hosts. Agents in the root
/// namespace (the loopback cluster) use the root bridge itself. Removed on drop.
#[derive(Debug)]
pub struct GuestNet {
    bridge: String,
    subnet: String,
    namespaces: Vec<String>,
}

impl GuestNet {
    /// The segment for the hosts in `namespaces` (none: root-namespace agents only);
    /// `bridge` is at most 12 characters, `subnet` the first three octets (`10.77.0`);
    /// at most 13 hosts.
    /// Stale links of the same names are removed first.
    pub fn new(bridge: &str, subnet: &str, namespaces: &[&str]) -> Result<GuestNet> {
        if bridge.is_empty() || bridge.len() > 12 {
            return Err(TestbedError::Command { command: format!("guest bridge {bridge:?}"), stderr: "needs 1-12 characters".into() });
        }
        let _ = Command::new("ip").args(["link", "del", bridge]).output();
        subnet_free(subnet, bridge)?;
        let mut net = GuestNet { bridge: bridge.to_string(), subnet: subnet.to_string(), namespaces: vec![] };
        run("ip", &["link", "add", bridge, "type", "bridge"])?;
        // Learn a MAC's new port from the first frame seen there, and forward at once.
        run("ip", &["link", "set", bridge, "type", "bridge", "forward_delay", "0"])?;
        run("ip", &["addr", "add", &format!("{subnet}.254/24"), "dev", bridge])?;
        run("ip", &["link", "set", bridge, "up"])?;
        for (i, ns) in namespaces.iter().enumerate() {
            let root_end = format!("{bridge}p{}", i + 1);
            let _ = Command::new("ip").args(["link", "del", &root_end]).output();
            let _ = Command::new("ip").args(["-n", ns, "link", "del", bridge]).output();
            net.namespaces.push((*ns).to_string());
            run("ip", &["-n", ns, "link", "add", bridge, "type", "bridge"])?;
            run("ip", &["-n", ns, "link", "set", bridge, "type", "bridge", "forward_delay", "0"])?;
            run("ip", &["-n", ns, "addr", "add", &format!("{subnet}.{}/24", 241 + i), "dev", bridge])?;
            run("ip", &["-n", ns, "link", "set", bridge, "up"])?;
            run("ip", &["link", "add", &root_end, "type", "veth", "peer", "name", "uplink", "netns", ns])?;
            run("ip", &["link", "set", &root_end, "master", bridge, "up"])?;
            run("ip", &["-n", ns, "link", "set", "uplink", "master", bridge, "up"])?;
        }
        Ok(net)
    }

    /// The bridge's name (the same on every host).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The subnet's first three octets (`10.77.0`).
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// Guest `n`'s address with its prefix (`SUBNET.N/24`; 1-240).
    pub fn guest_address(&self, n: u8) -> String {
        format!("{}.{n}/24", self.subnet)
    }
}

impl Drop for GuestNet {
    fn drop(&mut self) {
        for (i, ns) in self.namespaces.drain(..).enumerate() {
            let _ = Command::new("ip").args(["link", "del", &format!("{}p{}", self.bridge, i + 1)]).output();
            let _ = Command::new("ip").args(["-n", &ns, "link", "del", &self.bridge]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        del_netns(&self.a);
        del_netns(&self.b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leftover bridge on the subnet (seen in CI: a killed run's bridge broke the next
    /// run's failover test) is named, and nothing is created.
    #[test]
    fn a_subnet_another_device_routes_is_refused_naming_the_device() {
        let id = std::process::id() % 10000;
        let (leftover, ours) = (format!("wtl{id}"), format!("wtn{id}"));
        let subnet = format!("10.246.{}", id % 250);
        let _ = Command::new("ip").args(["link", "del", &leftover]).output();
        run("ip", &["link", "add", &leftover, "type", "bridge"]).expect("a bridge (needs root)");
        run("ip", &["addr", "add", &format!("{subnet}.9/24"), "dev", &leftover]).expect("its address");
        run("ip", &["link", "set", &leftover, "up"]).expect("up");

        let r = GuestNet::new(&ours, &subnet, &[]);

        let _ = Command::new("ip").args(["link", "del", &leftover]).output();
        match r {
            Err(TestbedError::SubnetTaken { device, .. }) => assert_eq!(device, leftover),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a second bridge was made on {subnet}.0/24"),
        }
        let exists = Command::new("ip").args(["link", "show", &ours]).output().is_ok_and(|o| o.status.success());
        assert!(!exists, "the refused bridge {ours} was created");
    }
}

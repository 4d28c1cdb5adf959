//! Two sites joined only through a NAT router, as two clouds are ("between clouds",
//! issue 11): host A in site A's subnet, host B in site B's, and a router namespace
//! between them running nftables. Each host is reachable from the other site only at
//! one published port of the router, DNAT'd to the host's agent port; connections the
//! router forwards are masqueraded (the far host sees the router's address); anything
//! else is dropped by the router's forward chain. Needs root and `nft`. Host A's egress
//! can be rate-limited (`tc tbf`) and the router can stop forwarding (a cut between the
//! clouds: connections stall, as over a broken route) and start again.
//!
//! ```text
//!  site A 10.248.N.0/24                 router                 site B 10.249.N.0/24
//!  host A .1 ──veth── .254 [ra]  nft: dnat, masquerade  [rb] .254 ──veth── .1 host B
//!   A reaches B only at 10.248.N.254:PUBLISHED   (-> 10.249.N.1:AGENT_PORT)
//!   B reaches A only at 10.249.N.254:PUBLISHED   (-> 10.248.N.1:AGENT_PORT)
//! ```

use crate::error::{Result, TestbedError};
use crate::net::run;
use std::process::{Command, Stdio};

/// The port each host's agent listens on in its own site.
pub const AGENT_PORT: u16 = 7701;
/// The router's published port for each host (one per host, on the far side's address).
pub const PUBLISHED_PORT: u16 = 7702;

/// Two sites and their NAT router (namespaces and links removed on drop).
#[derive(Debug)]
pub struct TwoSites {
    /// Host A's namespace (site A).
    pub a: String,
    /// Host B's namespace (site B).
    pub b: String,
    /// The router's namespace.
    pub router: String,
    /// Host A's own address in site A.
    pub addr_a: String,
    /// Host B's own address in site B.
    pub addr_b: String,
    /// Where site A reaches host B (`IP:PORT`): the router's site-A address and B's
    /// published port.
    pub b_from_a: String,
    /// Where site B reaches host A (`IP:PORT`).
    pub a_from_b: String,
    /// Host A's interface toward the router (in namespace `a`).
    pub link_a: String,
}

/// The table a cut adds to the router: a forward chain before the sites' own that
/// drops everything.
const CUT_TABLE: &str = "walkabout_cut";

fn del_netns(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Runs `nft -f -` in namespace `ns` with `rules` on its standard input.
fn nft(ns: &str, rules: &str) -> Result<()> {
    use std::io::Write;
    let command = format!("ip netns exec {ns} nft -f -");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| TestbedError::Command { command: command.clone(), stderr: format!("{e} (is nftables installed?)") })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).map_err(|e| TestbedError::io(format!("writing the rules to {command}"), e))?;
    }
    let out = child.wait_with_output().map_err(|e| TestbedError::io(format!("waiting for {command}"), e))?;
    if !out.status.success() {
        return Err(TestbedError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(())
}

/// The router's ruleset: one DNAT per host (its published port on the far side's
/// address to its agent port), masquerade of what it forwards, and a forward chain
/// that drops everything but those and their replies.
fn ruleset(ra: &str, rb: &str, router_a: &str, router_b: &str, addr_a: &str, addr_b: &str) -> String {
    format!(
        "table ip walkabout_sites {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{ra}\" ip daddr {router_a} tcp dport {PUBLISHED_PORT} dnat to {addr_b}:{AGENT_PORT}
    iifname \"{rb}\" ip daddr {router_b} tcp dport {PUBLISHED_PORT} dnat to {addr_a}:{AGENT_PORT}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname {{ \"{ra}\", \"{rb}\" }} masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct status dnat accept
  }}
}}
"
    )
}

/// The cut: a forward chain hooked before the sites' own (priority -10) dropping every
/// packet, so neither new nor established connections cross.
fn cut_ruleset() -> String {
    format!(
        "table ip {CUT_TABLE} {{
  chain forward {{
    type filter hook forward priority -10; policy drop;
  }}
}}
"
    )
}

impl TwoSites {
    /// Creates both sites and the router; `n` (1-250) makes names and subnets unique
    /// among concurrent topologies. Stale namespaces of the same names are removed first.
    pub fn new(n: u8) -> Result<TwoSites> {
        let id = std::process::id() % 10000;
        let (net_a, net_b) = (format!("10.248.{n}"), format!("10.249.{n}"));
        let sites = TwoSites {
            a: format!("wa{id}-s{n}a"),
            b: format!("wa{id}-s{n}b"),
            router: format!("wa{id}-s{n}r"),
            addr_a: format!("{net_a}.1"),
            addr_b: format!("{net_b}.1"),
            b_from_a: format!("{net_a}.254:{PUBLISHED_PORT}"),
            a_from_b: format!("{net_b}.254:{PUBLISHED_PORT}"),
            link_a: format!("wa{id}s{n}ha"),
        };
        for ns in [&sites.a, &sites.b, &sites.router] {
            del_netns(ns);
            run("ip", &["netns", "add", ns])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        // Interface names unique on the machine (they are created in the namespaces
        // directly, but a failed run must not collide with a concurrent one).
        let (ha, ra) = (sites.link_a.clone(), format!("wa{id}s{n}ra"));
        let (hb, rb) = (format!("wa{id}s{n}hb"), format!("wa{id}s{n}rb"));
        for (host, host_if, router_if, net) in [(&sites.a, &ha, &ra, &net_a), (&sites.b, &hb, &rb, &net_b)] {
            run("ip", &["link", "add", host_if, "netns", host, "type", "veth", "peer", "name", router_if, "netns", &sites.router])?;
            run("ip", &["-n", host, "addr", "add", &format!("{net}.1/24"), "dev", host_if])?;
            run("ip", &["-n", &sites.router, "addr", "add", &format!("{net}.254/24"), "dev", router_if])?;
            run("ip", &["-n", host, "link", "set", host_if, "up"])?;
            run("ip", &["-n", &sites.router, "link", "set", router_if, "up"])?;
            // Everything off-site goes to the router (which drops what it does not publish).
            run("ip", &["-n", host, "route", "add", "default", "via", &format!("{net}.254")])?;
        }
        run("ip", &["netns", "exec", &sites.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        nft(&sites.router, &ruleset(&ra, &rb, &format!("{net_a}.254"), &format!("{net_b}.254"), &sites.addr_a, &sites.addr_b))?;
        Ok(sites)
    }

    /// Where host A's agent listens in its site (`IP:PORT`).
    pub fn listen_a(&self) -> String {
        format!("{}:{AGENT_PORT}", self.addr_a)
    }

    /// Where host B's agent listens in its site (`IP:PORT`).
    pub fn listen_b(&self) -> String {
        format!("{}:{AGENT_PORT}", self.addr_b)
    }

    /// The router's address in site A (the one host A reaches B by).
    pub fn router_a(&self) -> &str {
        self.b_from_a.rsplit_once(':').map_or("", |(ip, _)| ip)
    }

    /// The router's address in site B (the one host B reaches A by).
    pub fn router_b(&self) -> &str {
        self.a_from_b.rsplit_once(':').map_or("", |(ip, _)| ip)
    }

    /// Rate-limits host A's egress (the migration stream's direction from site A) with a
    /// token bucket, replacing any earlier limit; `rate` as `tc` spells it (`200mbit`).
    pub fn limit_a(&self, rate: &str) -> Result<()> {
        let _ = Command::new("tc").args(["-n", &self.a, "qdisc", "del", "dev", &self.link_a, "root"]).output();
        run("tc", &["-n", &self.a, "qdisc", "add", "dev", &self.link_a, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"])
    }

    /// Lifts host A's rate limit.
    pub fn unlimit_a(&self) -> Result<()> {
        run("tc", &["-n", &self.a, "qdisc", "del", "dev", &self.link_a, "root"])
    }

    /// Cuts the sites apart: the router forwards nothing, established connections
    /// included (they stall, as over a route that broke), until [`TwoSites::restore`].
    pub fn cut(&self) -> Result<()> {
        nft(&self.router, &cut_ruleset())
    }

    /// Ends a cut: the router forwards what it published again, and the connections
    /// it had forwarded go on where they stalled.
    pub fn restore(&self) -> Result<()> {
        run("ip", &["netns", "exec", &self.router, "nft", "delete", "table", "ip", CUT_TABLE])
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        // Deleting a namespace deletes its ends of the veths, and so the pairs.
        for ns in [&self.a, &self.b, &self.router] {
            del_netns(ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_publishes_one_port_per_host_and_forwards_nothing_else() {
        let r = ruleset("ra", "rb", "10.248.1.254", "10.249.1.254", "10.248.1.1", "10.249.1.1");
        assert!(r.contains("iifname \"ra\" ip daddr 10.248.1.254 tcp dport 7702 dnat to 10.249.1.1:7701"), "{r}");
        assert!(r.contains("iifname \"rb\" ip daddr 10.249.1.254 tcp dport 7702 dnat to 10.248.1.1:7701"), "{r}");
        assert!(r.contains("policy drop;") && r.contains("ct status dnat accept"), "{r}");
    }

    #[test]
    fn a_cut_drops_every_forwarded_packet_before_the_sites_chain() {
        let r = cut_ruleset();
        assert!(r.contains("table ip walkabout_cut") && r.contains("hook forward priority -10; policy drop;"), "{r}");
    }
}

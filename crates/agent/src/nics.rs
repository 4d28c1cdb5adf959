//! The NICs of this host's VMs: virtio-net on a tap device attached to a host bridge.
//!
//! - At create, each NIC's bridge must exist on this host, its MAC is pinned (given, or
//!   chosen here: `52:54:00:xx:xx:xx`, locally administered, unique among this agent's
//!   VMs) and its address, if any, must be an IPv4 address with a prefix. The pinned MAC
//!   is part of the spec and travels with every migration, so the guest's address, its
//!   ARP entries elsewhere and its connections stay valid on every host.
//! - Before QEMU starts, the agent creates one tap per NIC (`ip tuntap`) and attaches it
//!   to the bridge; QEMU opens it by name (`script=no`). The tap goes when the VM stops,
//!   is deleted or migrates away. A migration's destination makes its own taps on its
//!   own bridge of the same name (the incoming request carries the spec).
//! - Tap names are deterministic: `wk` + 8 hex digits of a hash of this agent's data
//!   directory and the VM's name + `n` + the NIC's index (at most 15 characters, the
//!   kernel's limit). The agent's part keeps two agents on one network stack (the
//!   loopback cluster) from colliding while both hold the VM during a migration.
//! - After the switchover the destination announces the guest ([`Announce`]): QEMU
//!   sends gratuitous RARPs from each NIC (at the start of the incoming guest, with the
//!   migration's `announce-*` parameters set here, and again on `announce-self` at
//!   commit), so every bridge of the segment learns the MAC's new port at once.
//! - The guest sets its own address: the agent passes `walkabout.ip=<address>` on the
//!   kernel command line (the guest kernel has no `ip=` autoconfiguration).

use crate::spec::VmSpec;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use walkabout_api::NicSpec;
use walkabout_guest::net::{Ipv4Cidr, IP_PARAM};
use walkabout_qemu::{QemuNic, Qmp};

/// How the destination announces a migrated guest (QEMU's `announce-self` and the
/// migration's `announce-*` parameters): `rounds` gratuitous RARPs per NIC, the first
/// `initial_ms` after the start, each later one `step_ms` further apart, at most `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// Announcements per NIC.
    pub rounds: u64,
    /// Delay before the first, ms.
    pub initial_ms: u64,
    /// Longest delay between two, ms.
    pub max_ms: u64,
    /// Increase of the delay after each, ms.
    pub step_ms: u64,
}

impl Default for Announce {
    /// QEMU's own defaults.
    fn default() -> Self {
        Announce { rounds: 5, initial_ms: 50, max_ms: 550, step_ms: 100 }
    }
}

impl FromStr for Announce {
    type Err = String;

    /// `rounds=5,initial=50,max=550,step=100` (ms; any subset, the rest default).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut a = Announce::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("announce: {part:?} is not key=value"))?;
            let v: u64 = value.trim_end_matches("ms").parse().map_err(|_| format!("announce: {key}={value:?} is not a number"))?;
            match key {
                "rounds" => a.rounds = v,
                "initial" => a.initial_ms = v,
                "max" => a.max_ms = v,
                "step" => a.step_ms = v,
                _ => return Err(format!("announce: unknown key {key:?} (rounds, initial, max, step)")),
            }
        }
        if a.rounds == 0 || a.rounds > 1000 || a.initial_ms == 0 || a.max_ms < a.initial_ms || a.step_ms == 0 {
            return Err(format!("announce: {s:?}: rounds 1-1000, initial > 0, max >= initial, step > 0"));
        }
        Ok(a)
    }
}

impl Announce {
    /// The QMP arguments (`announce-self`'s and `migrate-set-parameters`'s spelling).
    fn args(&self, announce_self: bool) -> serde_json::Value {
        let prefix = if announce_self { "" } else { "announce-" };
        serde_json::json!({
            format!("{prefix}initial"): self.initial_ms,
            format!("{prefix}max"): self.max_ms,
            format!("{prefix}rounds"): self.rounds,
            format!("{prefix}step"): self.step_ms,
        })
    }
}

/// Whether `bridge` is a bridge on this host's network stack.
fn bridge_exists(bridge: &str) -> bool {
    !bridge.is_empty() && !bridge.contains('/') && Path::new("/sys/class/net").join(bridge).join("bridge").is_dir()
}

/// Whether `mac` is `52:54:00:xx:xx:xx` (lower- or upper-case hex).
fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && parts[..3].iter().map(|p| p.to_ascii_lowercase()).eq(["52", "54", "00"])
}

/// Checks a spec's NICs against this host: the bridge exists, a given MAC is of the
/// form `52:54:00:xx:xx:xx` and not used twice in the spec, a given address is an IPv4
/// address with a prefix. The reason names the NIC and the cause.
pub(crate) fn validate(nics: &[NicSpec]) -> Result<(), String> {
    let mut macs = BTreeSet::new();
    for (i, n) in nics.iter().enumerate() {
        if !bridge_exists(&n.bridge) {
            return Err(format!(
                "NIC {i}: bridge {:?} does not exist on this host (create it first: ip link add {} type bridge)",
                n.bridge, n.bridge
            ));
        }
        if let Some(mac) = &n.mac {
            if !valid_mac(mac) {
                return Err(format!("NIC {i}: MAC {mac:?} is not of the form 52:54:00:xx:xx:xx"));
            }
            if !macs.insert(mac.to_ascii_lowercase()) {
                return Err(format!("NIC {i}: MAC {mac} is given twice"));
            }
        }
        if let Some(address) = &n.address {
            address.parse::<Ipv4Cidr>().map_err(|e| format!("NIC {i}: {e}"))?;
        }
    }
    if nics.iter().filter(|n| n.address.is_some()).count() > 1 {
        return Err("only the first NIC may have an address (the guest configures one interface)".into());
    }
    Ok(())
}

/// Checks a VM's NICs against this agent's `others`: a given MAC another VM here uses,
/// or tap names that would clash with another VM's (a 32-bit hash of the names), are
/// refused.
pub(crate) fn check_against(spec: &VmSpec, salt: &str, others: &[VmSpec]) -> Result<(), String> {
    for mac in spec.nics.iter().filter_map(|n| n.mac.as_deref()) {
        if let Some(o) = others.iter().find(|o| o.nics.iter().any(|n| n.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(mac)))) {
            return Err(format!("MAC {mac} is already used by VM {} on this host", o.name));
        }
    }
    let mine = tap_prefix(salt, &spec.name);
    if let Some(o) = others.iter().find(|o| !o.nics.is_empty() && tap_prefix(salt, &o.name) == mine) {
        return Err(format!("its tap names ({mine}N) would clash with those of VM {} on this host; choose another name", o.name));
    }
    Ok(())
}

/// FNV-1a, 64 bits: a stable hash for names (the same in every build and process).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0u8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Pins a MAC on every NIC of `spec` that has none: derived from `salt` (this agent),
/// the VM's name and the NIC's index, and not in `taken` (the MACs of this agent's other
/// VMs). A given MAC already taken is refused.
pub(crate) fn pin_macs(spec: &mut VmSpec, salt: &str, taken: &BTreeSet<String>) -> Result<(), String> {
    let mut taken: BTreeSet<String> = taken.iter().map(|m| m.to_ascii_lowercase()).collect();
    for n in spec.nics.iter().filter_map(|n| n.mac.as_ref()) {
        if !taken.insert(n.to_ascii_lowercase()) {
            return Err(format!("MAC {n} is already used by another VM on this host"));
        }
    }
    for (i, nic) in spec.nics.iter_mut().enumerate() {
        if nic.mac.is_some() {
            continue;
        }
        let index = i.to_string();
        let mac = (0u32..1024)
            .map(|attempt| {
                let h = fnv(&[salt.as_bytes(), spec.name.as_bytes(), index.as_bytes(), &attempt.to_le_bytes()]);
                let [a, b, c, ..] = h.to_le_bytes();
                format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
            })
            .find(|m| !taken.contains(m))
            .ok_or_else(|| "no free MAC address found".to_string())?;
        taken.insert(mac.clone());
        nic.mac = Some(mac);
    }
    Ok(())
}

/// The prefix of the tap names of VM `vm` on the agent `salt`.
fn tap_prefix(salt: &str, vm: &str) -> String {
    let h = fnv(&[salt.as_bytes(), vm.as_bytes()]);
    format!("wk{:08x}n", h & 0xffff_ffff)
}

/// The tap of NIC `index` of VM `vm` on the agent `salt` (at most 15 characters for up
/// to 10000 NICs).
pub(crate) fn tap_name(salt: &str, vm: &str, index: usize) -> String {
    format!("{}{index}", tap_prefix(salt, vm))
}

/// The NICs as QEMU opens them (taps named by [`tap_name`]); NICs without a pinned MAC
/// (a stored spec from before pinning) are left out rather than given a random one.
pub(crate) fn qemu_nics(salt: &str, spec: &VmSpec) -> Vec<QemuNic> {
    spec.nics
        .iter()
        .enumerate()
        .filter_map(|(i, n)| Some(QemuNic { id: NicSpec::netdev_id(i), ifname: tap_name(salt, &spec.name, i), mac: n.mac.clone()? }))
        .collect()
}

/// The kernel command line parameter giving the guest its address, if its first NIC
/// has one.
pub(crate) fn cmdline_param(spec: &VmSpec) -> Option<String> {
    let address = spec.nics.iter().find_map(|n| n.address.as_deref())?;
    Some(format!("{IP_PARAM}={address}"))
}

/// Runs `ip ARGS`; an error carries what it said.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Creates the taps of `spec`'s NICs and attaches each to its bridge, up. A tap left
/// over by an earlier run of the same VM is replaced. On failure nothing is left.
pub(crate) fn create_taps(salt: &str, spec: &VmSpec) -> Result<(), String> {
    for (i, nic) in spec.nics.iter().enumerate() {
        let tap = tap_name(salt, &spec.name, i);
        let made = (|| {
            let _ = ip(&["link", "del", &tap]);
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["link", "set", &tap, "master", &nic.bridge, "up"])
        })();
        if let Err(e) = made {
            delete_taps(salt, &spec.name);
            return Err(format!("cannot create tap {tap} on bridge {} for NIC {i}: {e}", nic.bridge));
        }
        tracing::debug!(vm = %spec.name, tap, bridge = %nic.bridge, "tap created");
    }
    Ok(())
}

/// Deletes every tap of VM `vm` on this agent (those whose name has its prefix).
pub(crate) fn delete_taps(salt: &str, vm: &str) {
    let prefix = tap_prefix(salt, vm);
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return };
    for name in dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)) {
        match ip(&["link", "del", &name]) {
            Ok(()) => tracing::debug!(vm, tap = %name, "tap deleted"),
            Err(e) => tracing::warn!(vm, tap = %name, error = %e, "cannot delete tap"),
        }
    }
}

/// Sets the migration's `announce-*` parameters on an incoming QEMU, so the guest is
/// announced the moment it starts here.
pub(crate) async fn arm_announce(qmp: &Qmp, announce: &Announce) -> Result<(), walkabout_qemu::QmpError> {
    qmp.execute_raw("migrate-set-parameters", Some(announce.args(false))).await.map(drop)
}

/// Announces the guest's NICs from this host now (`announce-self`).
pub(crate) async fn announce(qmp: &Qmp, announce: &Announce) -> Result<(), walkabout_qemu::QmpError> {
    qmp.execute_raw("announce-self", Some(announce.args(true))).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nics: Vec<NicSpec>) -> VmSpec {
        VmSpec { nics, ..VmSpec::new("vm1", 256) }
    }

    #[test]
    fn a_missing_bridge_is_named() {
        let e = validate(&[NicSpec::on("no-such-br0")]).expect_err("refused");
        assert!(e.contains("bridge \"no-such-br0\" does not exist on this host"), "{e}");
    }

    #[test]
    fn macs_are_checked() {
        assert!(valid_mac("52:54:00:ab:CD:01"));
        assert!(!valid_mac("02:00:00:00:00:01"));
        assert!(!valid_mac("52:54:00:ab:cd"));
        assert!(!valid_mac("52:54:00:ab:cd:0g"));
    }

    #[test]
    fn pinned_macs_are_stable_and_avoid_taken_ones() {
        let mut a = spec(vec![NicSpec::on("br"), NicSpec::on("br")]);
        let mut b = a.clone();
        pin_macs(&mut a, "agent1", &BTreeSet::new()).expect("pinned");
        let first = a.nics[0].mac.clone().expect("mac");
        pin_macs(&mut b, "agent1", &BTreeSet::from([first.clone()])).expect("pinned");
        assert!(valid_mac(&first), "{first}");
        assert_ne!(a.nics[0].mac, a.nics[1].mac);
        assert_ne!(b.nics[0].mac.as_deref(), Some(first.as_str()));
    }

    #[test]
    fn a_given_mac_already_taken_is_refused() {
        let mut s = spec(vec![NicSpec { mac: Some("52:54:00:00:00:01".into()), ..NicSpec::on("br") }]);
        let e = pin_macs(&mut s, "a", &BTreeSet::from(["52:54:00:00:00:01".to_string()])).expect_err("refused");
        assert!(e.contains("already used"), "{e}");
    }

    #[test]
    fn a_mac_another_vm_here_uses_is_refused() {
        let mac = Some("52:54:00:00:00:07".to_string());
        let mine = spec(vec![NicSpec { mac: mac.clone(), ..NicSpec::on("br") }]);
        let other = VmSpec { nics: vec![NicSpec { mac, ..NicSpec::on("br") }], ..VmSpec::new("vm2", 256) };
        let e = check_against(&mine, "a", &[other]).expect_err("refused");
        assert!(e.contains("already used by VM vm2"), "{e}");
    }

    #[test]
    fn tap_names_fit_the_kernel_limit_and_differ_by_agent() {
        let a = tap_name("/var/lib/a", "a-very-long-vm-name-indeed-longer-than-fifteen", 12);
        let b = tap_name("/var/lib/b", "a-very-long-vm-name-indeed-longer-than-fifteen", 12);
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with(&tap_prefix("/var/lib/a", "a-very-long-vm-name-indeed-longer-than-fifteen")));
    }

    #[test]
    fn the_address_reaches_the_kernel_command_line() {
        let s = spec(vec![NicSpec { address: Some("10.77.0.12/24".into()), ..NicSpec::on("br") }]);
        assert_eq!(cmdline_param(&s).as_deref(), Some("walkabout.ip=10.77.0.12/24"));
    }

    #[test]
    fn announce_parses_a_subset_and_refuses_nonsense() {
        let a: Announce = "rounds=8,initial=20ms".parse().expect("parses");
        assert_eq!(a, Announce { rounds: 8, initial_ms: 20, ..Announce::default() });
        assert!("rounds=0".parse::<Announce>().is_err());
        assert!("speed=1".parse::<Announce>().is_err());
    }

    #[test]
    fn announce_arguments_are_spelled_for_each_command() {
        let a = Announce::default();
        assert_eq!(a.args(true)["rounds"], 5);
        assert_eq!(a.args(false)["announce-initial"], 50);
    }
}

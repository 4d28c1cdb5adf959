//! Rolling maintenance as an operator runs it: several hosts out at once, within limits.
//!
//! vSphere Lifecycle Manager remediates hosts in parallel up to a count the operator
//! sets and never below what HA admission control reserves; OpenStack's rolling
//! upgrades take hosts down in batches that leave enough capacity for the instances
//! they move. [`admit`] is that rule, pure and tested on its own: which hosts may go
//! into maintenance next, given the hosts already out.
//!
//! - At most [`RollingLimits::max_hosts`] hosts out at once, and at most
//!   [`RollingLimits::max_per_rack`] of one rack (a rack's power or top-of-rack switch
//!   is a failure domain: an operator does not empty half of one).
//! - Capacity: every VM of the cluster (those of the hosts out included: they must go
//!   somewhere) fits in the memory of the hosts left in service, with
//!   [`RollingLimits::reserve`] of it still free (room for a host failure during the
//!   maintenance, as HA's admission control keeps).
//! - A host that a running drain is moving VMs into is not taken next: its drain would
//!   turn those steps away and make their plans re-plan.
//!
//! Each admitted host is drained by the controller's own drain plan (`Cluster::drain`);
//! the simulator only fakes the agents.

use serde::Serialize;

/// How far a rolling maintenance may go at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RollingLimits {
    /// Hosts in maintenance at once.
    pub max_hosts: usize,
    /// Hosts of one rack in maintenance at once.
    pub max_per_rack: usize,
    /// Fraction of the in-service hosts' memory that must stay free once the VMs of
    /// the hosts out are placed on them (0.0 to 1.0).
    pub reserve: f64,
}

impl Default for RollingLimits {
    /// Sixteen hosts at once, one per rack, a fifth of the memory kept free.
    fn default() -> RollingLimits {
        RollingLimits { max_hosts: 16, max_per_rack: 1, reserve: 0.2 }
    }
}

/// A host as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLoad {
    /// Its name.
    pub name: String,
    /// Its rack.
    pub rack: usize,
    /// Memory for VMs, MiB.
    pub capacity_mib: u64,
    /// Memory its VMs take, MiB.
    pub used_mib: u64,
    /// Whether it is up (a host that is down holds no capacity and takes no VMs).
    pub up: bool,
    /// Whether it is in maintenance (draining, or drained and not yet back).
    pub out: bool,
    /// Whether a running drain moves VMs into it.
    pub receiving: bool,
}

/// The hosts of `waiting` (in order) that may go into maintenance now, given `hosts`
/// and `limits`: as many as the limits allow, the first that fit first.
pub fn admit(hosts: &[HostLoad], waiting: &[String], limits: &RollingLimits) -> Vec<String> {
    let mut out: Vec<&HostLoad> = hosts.iter().filter(|h| h.out).collect();
    let mut per_rack: std::collections::BTreeMap<usize, usize> = Default::default();
    for h in &out {
        *per_rack.entry(h.rack).or_default() += 1;
    }
    let used: u64 = hosts.iter().filter(|h| h.up).map(|h| h.used_mib).sum();
    let mut in_service: u64 = hosts.iter().filter(|h| h.up && !h.out).map(|h| h.capacity_mib).sum();
    let keep = 1.0 - limits.reserve.clamp(0.0, 1.0);
    let mut admitted = vec![];
    for name in waiting {
        if out.len() >= limits.max_hosts {
            break;
        }
        let Some(h) = hosts.iter().find(|h| &h.name == name) else { continue };
        if h.out || !h.up || h.receiving || per_rack.get(&h.rack).copied().unwrap_or(0) >= limits.max_per_rack {
            continue;
        }
        let left = in_service.saturating_sub(h.capacity_mib);
        #[allow(clippy::cast_precision_loss)]
        let fits = used as f64 <= left as f64 * keep;
        if !fits {
            continue;
        }
        in_service = left;
        *per_rack.entry(h.rack).or_default() += 1;
        out.push(h);
        admitted.push(name.clone());
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(i: usize, rack: usize, used: u64) -> HostLoad {
        HostLoad { name: format!("h{i}"), rack, capacity_mib: 1000, used_mib: used, up: true, out: false, receiving: false }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{i}")).collect()
    }

    /// In-service memory needed for every VM with the reserve kept, after `out` hosts go.
    fn reserve_holds(hosts: &[HostLoad], out: &[String], limits: &RollingLimits) -> bool {
        let used: u64 = hosts.iter().filter(|h| h.up).map(|h| h.used_mib).sum();
        let left: u64 = hosts.iter().filter(|h| h.up && !h.out && !out.contains(&h.name)).map(|h| h.capacity_mib).sum();
        #[allow(clippy::cast_precision_loss)]
        let ok = used as f64 <= left as f64 * (1.0 - limits.reserve);
        ok
    }

    #[test]
    fn no_more_hosts_go_out_than_the_limit_allows() {
        let hosts: Vec<HostLoad> = (0..40).map(|i| host(i, i, 100)).collect();
        let limits = RollingLimits { max_hosts: 5, max_per_rack: 1, reserve: 0.2 };

        let first = admit(&hosts, &names(40), &limits);

        assert_eq!(first, names(5));
    }

    #[test]
    fn hosts_already_out_count_against_the_limit() {
        let mut hosts: Vec<HostLoad> = (0..40).map(|i| host(i, i, 100)).collect();
        for h in hosts.iter_mut().take(3) {
            h.out = true;
        }
        let limits = RollingLimits { max_hosts: 5, max_per_rack: 1, reserve: 0.2 };

        let next = admit(&hosts, &names(40), &limits);

        assert_eq!(next, vec!["h3".to_string(), "h4".to_string()]);
    }

    #[test]
    fn one_rack_gives_no_more_than_its_share() {
        // Racks of four: h0-h3 in rack 0, h4-h7 in rack 1.
        let hosts: Vec<HostLoad> = (0..8).map(|i| host(i, i / 4, 100)).collect();
        let limits = RollingLimits { max_hosts: 8, max_per_rack: 2, reserve: 0.0 };

        let out = admit(&hosts, &names(8), &limits);

        assert_eq!(out, vec!["h0", "h1", "h4", "h5"]);
    }

    #[test]
    fn capacity_is_never_overcommitted_for_the_vms_of_the_hosts_out() {
        // Ten hosts of 1000 MiB, 500 used each: 5000 MiB of VMs. With 20% kept free, the
        // hosts in service must offer 6250 MiB: seven of them, so three may go.
        let hosts: Vec<HostLoad> = (0..10).map(|i| host(i, i, 500)).collect();
        let limits = RollingLimits { max_hosts: 10, max_per_rack: 1, reserve: 0.2 };

        let out = admit(&hosts, &names(10), &limits);

        assert_eq!(out.len(), 3, "{out:?}");
        assert!(reserve_holds(&hosts, &out, &limits));
    }

    #[test]
    fn a_host_a_drain_moves_vms_into_waits_and_the_next_goes_first() {
        let mut hosts: Vec<HostLoad> = (0..4).map(|i| host(i, i, 100)).collect();
        hosts[0].receiving = true;
        let limits = RollingLimits { max_hosts: 1, max_per_rack: 1, reserve: 0.2 };

        let out = admit(&hosts, &names(4), &limits);

        assert_eq!(out, vec!["h1".to_string()]);
    }

    #[test]
    fn a_host_that_is_down_neither_goes_out_nor_counts_as_room() {
        let mut hosts: Vec<HostLoad> = (0..4).map(|i| host(i, i, 400)).collect();
        hosts[1].up = false;
        // 1200 MiB of VMs on the three hosts up; with none kept free, two hosts hold them.
        let limits = RollingLimits { max_hosts: 4, max_per_rack: 1, reserve: 0.0 };

        let out = admit(&hosts, &names(4), &limits);

        assert_eq!(out, vec!["h0".to_string()]);
    }

    #[test]
    fn random_clusters_never_exceed_a_limit() {
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        for _ in 0..500 {
            let n = 1 + usize::try_from(next(60)).unwrap_or(1);
            let rack_size = 1 + usize::try_from(next(8)).unwrap_or(1);
            let mut hosts: Vec<HostLoad> = (0..n).map(|i| host(i, i / rack_size, next(900))).collect();
            for h in &mut hosts {
                h.out = next(10) == 0;
                h.up = next(20) != 0;
                h.receiving = next(10) == 0;
            }
            #[allow(clippy::cast_precision_loss)]
            let limits = RollingLimits {
                max_hosts: 1 + usize::try_from(next(10)).unwrap_or(0),
                max_per_rack: 1 + usize::try_from(next(3)).unwrap_or(0),
                reserve: next(50) as f64 / 100.0,
            };

            let new = admit(&hosts, &names(n), &limits);

            let already: Vec<&HostLoad> = hosts.iter().filter(|h| h.out).collect();
            assert!(new.is_empty() || already.len() + new.len() <= limits.max_hosts);
            let mut racks: std::collections::BTreeMap<usize, usize> = Default::default();
            for h in hosts.iter().filter(|h| h.out || new.contains(&h.name)) {
                *racks.entry(h.rack).or_default() += 1;
            }
            for h in hosts.iter().filter(|h| new.contains(&h.name)) {
                assert!(racks[&h.rack] <= limits.max_per_rack.max(1), "{:?}", racks);
                assert!(h.up && !h.out && !h.receiving, "{h:?}");
            }
            assert!(new.is_empty() || reserve_holds(&hosts, &new, &limits), "{hosts:?} {new:?} {limits:?}");
        }
    }
}

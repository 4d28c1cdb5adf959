//! The etcd store against a real etcd on loopback (Debian's `etcd-server`).

use super::*;
use walkabout_store::{no_upgrades, Log, Table};
use walkabout_testbed::{Etcd as EtcdProcess, TempDir};

const RECS: Table = Table::new("recs", 1, no_upgrades);
const EVENTS: Log = Log::new("events", 1, no_upgrades);

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Rec {
    name: String,
    mib: u64,
}

fn rec(name: &str, mib: u64) -> Rec {
    Rec { name: name.into(), mib }
}

/// A fresh etcd (kept alive by the returned guards) and a connection to it.
fn etcd(tag: &str) -> (Etcd, EtcdProcess, TempDir) {
    let dir = TempDir::new(tag).expect("temp dir");
    let process = EtcdProcess::start(dir.path(), Duration::from_secs(30)).expect("etcd starts (is etcd-server installed?)");
    let config = EtcdConfig::parse(&process.store_url()).expect("store url");
    (Etcd::connect(config).expect("connect"), process, dir)
}

#[test]
fn store_urls_parse_with_hosts_and_an_optional_prefix() {
    let c = EtcdConfig::parse("etcd://127.0.0.1:2379,127.0.0.2:2379/lab").expect("parse");
    assert_eq!(c.endpoints, ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]);
    assert_eq!(c.prefix, "/lab/");
    assert_eq!(EtcdConfig::parse("etcd://h:1").expect("parse").prefix, DEFAULT_PREFIX);
    assert!(EtcdConfig::parse("etcd://nohostport").is_err());
    assert!(EtcdConfig::parse("redb:///x").is_err());
}

#[test]
fn records_counters_and_logs_behave_as_in_redb() {
    let (etcd, _p, _d) = etcd("etcd-records");
    let s = etcd.store(None);
    s.put(&RECS, "b", &rec("b", 2)).expect("put");
    s.put(&RECS, "a", &rec("a", 1)).expect("put");
    s.put(&RECS, "a", &rec("a", 3)).expect("replace");
    assert_eq!(s.get::<Rec>(&RECS, "a").expect("get"), Some(rec("a", 3)));
    assert_eq!(s.list::<Rec>(&RECS).expect("list"), vec![rec("a", 3), rec("b", 2)]);
    s.delete(&RECS, "a").expect("delete");
    assert_eq!(s.get::<Rec>(&RECS, "a").expect("get"), None);
    assert_eq!((s.next("plan").expect("next"), s.next("plan").expect("next")), (1, 2));
    assert_eq!(s.raise("epoch", 7).expect("raise"), 7);
    assert_eq!(s.raise("epoch", 5).expect("raise"), 7);
    assert_eq!(s.counter("epoch").expect("counter"), 7);
    for seq in 1..=12 {
        s.put_event(&EVENTS, seq, &rec("e", seq), 5).expect("append");
    }
    assert_eq!(s.last_event_seq(&EVENTS).expect("last"), 12);
    let kept: Vec<u64> = s.events_after::<Rec>(&EVENTS, 0).expect("after").into_iter().map(|r| r.mib).collect();
    assert_eq!(kept, vec![8, 9, 10, 11, 12]);
    let newer: Vec<u64> = s.events_after::<Rec>(&EVENTS, 10).expect("after").into_iter().map(|r| r.mib).collect();
    assert_eq!(newer, vec![11, 12]);
}

#[test]
fn a_table_larger_than_a_page_lists_whole_in_key_order() {
    let (etcd, _p, _d) = etcd("etcd-pages");
    let s = etcd.store(None);
    let n = u64::try_from(PAGE).expect("page") + 7;
    for i in 0..n {
        s.put(&RECS, &format!("vm{i:04}"), &rec("x", i)).expect("put");
    }
    let all: Vec<u64> = s.list::<Rec>(&RECS).expect("list").into_iter().map(|r| r.mib).collect();
    assert_eq!(all, (0..n).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write_and_the_next_leader_has_a_higher_epoch() {
    let (etcd, _p, _d) = etcd("etcd-fence");
    let first = etcd.campaign("http://first", Duration::from_secs(3)).await.expect("first campaign");
    let first_store = etcd.store(Some(&first));
    first_store.put(&RECS, "a", &rec("a", 1)).expect("the leader writes");
    assert_eq!(etcd.leader().await.expect("leader"), Some(Leader { url: "http://first".into(), epoch: first.epoch }));

    etcd.resign(&first).await;
    let second = etcd.campaign("http://second", Duration::from_secs(3)).await.expect("second campaign");
    let refused = first_store.put(&RECS, "a", &rec("a", 2)).expect_err("a deposed leader must not write");

    assert!(second.epoch > first.epoch, "{} > {}", second.epoch, first.epoch);
    assert!(matches!(refused, StoreError::Fenced { epoch, .. } if epoch == first.epoch), "{refused}");
    assert!(refused.to_string().contains("no longer the leader"), "{refused}");
    etcd.store(Some(&second)).put(&RECS, "a", &rec("a", 3)).expect("the new leader writes");
    assert_eq!(etcd.store(None).get::<Rec>(&RECS, "a").expect("get"), Some(rec("a", 3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_renewing_loses_its_lease_and_another_takes_over() {
    let (etcd, _p, _d) = etcd("etcd-expire");
    let first = etcd.campaign("http://first", Duration::from_secs(2)).await.expect("first campaign");
    // Another process, whose lease nobody renews once it leads: simulate by revoking it
    // from outside, as etcd does when the lease's TTL passes unrenewed.
    let lease = first.lease;
    etcd.call(move |mut c| async move { c.lease_revoke(lease).await }).await.expect("revoke");

    tokio::time::timeout(Duration::from_secs(5), first.lost()).await.expect("the term ends within seconds");
    let second = tokio::time::timeout(Duration::from_secs(5), etcd.campaign("http://second", Duration::from_secs(2)))
        .await
        .expect("a new leader within seconds")
        .expect("campaign");
    assert!(first.is_lost());
    assert!(second.epoch > first.epoch);
}

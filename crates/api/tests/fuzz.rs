//! Property tests of every request body of the agent's and the controller's APIs and of
//! the strings the CLI parses into wire types (issue 11, "inputs fuzzed"): generated
//! valid values survive the wire (serde round trip) unchanged; arbitrary JSON either is
//! refused with an error or decodes to a value that itself round-trips; the `FromStr`
//! spellings agree with `Display` and serde, and refuse everything else.

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::fmt::Debug;
use std::path::PathBuf;
use walkabout_api::checkpoint::{
    Checkpoint, CheckpointFile, CheckpointMethod, CheckpointRequest, CommitCheckpoint, Encoding, FileKind, FileUpload, ProtectVm,
    Protection, RestoreRequest,
};
use walkabout_api::migration::{BackingImage, IncomingDisk, StorageMarker};
use walkabout_api::{
    AddHost, BalanceConfig, BalanceLevel, CommitRequest, Compression, CreateVm, DiskBus, DiskFormat, DiskSpec, Goal, GroupRule,
    GuestStatus, IncomingRequest, JoinRequest, JoinTokenRequest, MigrationRequest, Mode, MoveVm, NicSpec, RecoverRequest, StorageMode,
    Tuning, VmGroup, VmSpec, WalkOptions,
};

// ---- generators of valid values ----

fn text() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-z0-9._-]{1,12}", 1 => any::<String>()]
}

fn opt<T: Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}

fn disk_format() -> impl Strategy<Value = DiskFormat> {
    prop_oneof![Just(DiskFormat::Qcow2), Just(DiskFormat::Raw)]
}

fn disk_bus() -> impl Strategy<Value = DiskBus> {
    prop_oneof![Just(DiskBus::VirtioBlk), Just(DiskBus::VirtioScsi)]
}

fn storage_mode() -> impl Strategy<Value = StorageMode> {
    prop_oneof![Just(StorageMode::Auto), Just(StorageMode::Shared), Just(StorageMode::Copy)]
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Auto), Just(Mode::Precopy), Just(Mode::Postcopy)]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Zstd), Just(Compression::Xbzrle)]
}

fn method() -> impl Strategy<Value = CheckpointMethod> {
    prop_oneof![Just(CheckpointMethod::Live), Just(CheckpointMethod::Background), Just(CheckpointMethod::Paused)]
}

fn path() -> impl Strategy<Value = PathBuf> {
    text().prop_map(PathBuf::from)
}

prop_compose! {
    fn disk_spec()(path in opt(path()), format in opt(disk_format()), size_bytes in opt(any::<u64>()), bus in disk_bus()) -> DiskSpec {
        DiskSpec { path, format, size_bytes, bus }
    }
}

prop_compose! {
    fn nic_spec()(bridge in text(), mac in opt(text()), address in opt(text())) -> NicSpec {
        NicSpec { bridge, mac, address }
    }
}

prop_compose! {
    fn vm_spec()(name in text(), memory_mib in any::<u64>(), vcpus in any::<u32>(), cpu_model in opt(text()), kernel in opt(path()),
                 initrd in opt(path()), cmdline in opt(text()), workload in text(), machine in opt(text()),
                 disks in proptest::collection::vec(disk_spec(), 0..3), nics in proptest::collection::vec(nic_spec(), 0..3),
                 free_will in any::<bool>()) -> VmSpec {
        VmSpec { name, memory_mib, vcpus, cpu_model, kernel, initrd, cmdline, workload, machine, disks, nics, free_will }
    }
}

prop_compose! {
    fn tuning()(multifd_channels in opt(any::<u8>()), compression in opt(compression()), postcopy_preempt in opt(any::<bool>()),
                recovery_budget_ms in opt(any::<u64>()), peer_timeout_ms in opt(any::<u64>()), relay in any::<bool>()) -> Tuning {
        Tuning { multifd_channels, compression, postcopy_preempt, recovery_budget_ms, peer_timeout_ms, relay }
    }
}

prop_compose! {
    fn migration_request()(vm in text(), destination in text(), mode in mode(), max_downtime_ms in opt(any::<u64>()),
                           max_bandwidth_bps in opt(any::<u64>()), budget_per_gib_ms in opt(any::<u64>()), storage in storage_mode(),
                           tuning in tuning()) -> MigrationRequest {
        MigrationRequest { vm, destination, mode, max_downtime_ms, max_bandwidth_bps, budget_per_gib_ms, storage, tuning }
    }
}

prop_compose! {
    fn guest_status()(ready in any::<bool>(), cpus in opt(any::<u32>()), heartbeats in any::<u64>(), last_seq in opt(any::<u64>()),
                      seq_breaks in any::<u64>(), corrupt_pages in any::<u64>(), corrupt_blocks in any::<u64>(), kernel_trouble in any::<bool>(),
                      alerts in proptest::collection::vec(text(), 0..3), partial_line in text()) -> GuestStatus {
        GuestStatus { ready, cpus, heartbeats, last_seq, seq_breaks, corrupt_pages, corrupt_blocks, kernel_trouble, alerts, partial_line }
    }
}

prop_compose! {
    fn incoming_disk()(node_name in text(), path in path(), format in disk_format(), virtual_size in any::<u64>(),
                       backing in opt((text(), disk_format()).prop_map(|(sha256, format)| BackingImage { sha256, format }))) -> IncomingDisk {
        IncomingDisk { node_name, path, format, virtual_size, backing }
    }
}

prop_compose! {
    fn incoming_request()(spec in vm_spec(), postcopy_ready in any::<bool>(), cpu_features in proptest::collection::vec(text(), 0..4),
                          listen_host in text(), postcopy_preempt in any::<bool>(), multifd_channels in any::<u8>(), compression in compression(),
                          storage in storage_mode(), disks in proptest::collection::vec(incoming_disk(), 0..3),
                          marker in opt((text(), text()).prop_map(|(file_name, token)| StorageMarker { file_name, token })),
                          lease_ms in opt(any::<u64>()), relay in any::<bool>()) -> IncomingRequest {
        IncomingRequest { spec, postcopy_ready, cpu_features, listen_host, postcopy_preempt, multifd_channels, compression, storage, disks, marker, lease_ms, relay }
    }
}

fn group_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,63}"
}

fn vm_group() -> impl Strategy<Value = VmGroup> {
    (group_name(), prop_oneof![Just(GroupRule::Affinity), Just(GroupRule::AntiAffinity)]).prop_map(|(name, rule)| VmGroup { name, rule })
}

prop_compose! {
    fn create_vm()(spec in vm_spec(), host in opt(text()), groups in proptest::collection::vec(vm_group(), 0..3)) -> CreateVm {
        CreateVm { spec, host, groups }
    }
}

fn goal() -> impl Strategy<Value = Goal> {
    prop_oneof![
        text().prop_map(|host| Goal::Drain { host }),
        Just(Goal::Rebalance),
        Just(Goal::Consolidate),
        (text(), text()).prop_map(|(vm, host)| Goal::Place { vm, host }),
    ]
}

prop_compose! {
    fn walk_options()(duration_ms in any::<u64>(), parallel in any::<u32>(), pause_ms in any::<u64>(), gentle in any::<bool>()) -> WalkOptions {
        WalkOptions { duration_ms, parallel, pause_ms, gentle }
    }
}

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![any::<f64>().prop_filter("finite", |f| f.is_finite()), 0.0..1.0]
}

prop_compose! {
    fn balance_config()(level in prop_oneof![Just(BalanceLevel::Manual), Just(BalanceLevel::Recommend), Just(BalanceLevel::Automatic)],
                        threshold in finite(), hysteresis in finite(), min_gain in finite(), cost_per_gib in finite(),
                        cooldown_s in any::<u64>(), max_moves in any::<usize>(), interval_s in any::<u64>()) -> BalanceConfig {
        BalanceConfig { level, threshold, hysteresis, min_gain, cost_per_gib, cooldown_s, max_moves, interval_s }
    }
}

prop_compose! {
    fn checkpoint_file()(name in text(), kind in prop_oneof![Just(FileKind::Memory), Just(FileKind::Layer), Just(FileKind::Base)],
                         disk in opt(text()), backing in opt(text()), bytes in any::<u64>(), data_bytes in any::<u64>(), sha256 in text()) -> CheckpointFile {
        CheckpointFile { name, kind, disk, backing, bytes, data_bytes, sha256 }
    }
}

prop_compose! {
    fn checkpoint()(ids in (any::<u32>(), text(), text(), any::<u64>(), opt(text()), any::<u64>(), text()), spec in vm_spec(), method in method(),
                    pause_ms in any::<u64>(), total_ms in any::<u64>(), guest in guest_status(),
                    files in proptest::collection::vec(checkpoint_file(), 0..3),
                    rest in (opt(any::<u64>()), any::<bool>(), opt(text()))) -> Checkpoint {
        let (version, id, vm, n, parent, taken_ms, host) = ids;
        let (shipped_bytes, verified, problem) = rest;
        Checkpoint { version, id, vm, n, parent, taken_ms, host, spec, method, pause_ms, total_ms, guest, files, shipped_bytes, verified, problem }
    }
}

// ---- properties ----

/// `v` survives the wire unchanged, both as text and as a JSON value.
fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) -> Result<(), TestCaseError> {
    let text = serde_json::to_string(v).map_err(|e| TestCaseError::fail(format!("serialize {v:?}: {e}")))?;
    let back: T = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("decode {text}: {e}")))?;
    prop_assert_eq!(&back, v, "through {}", text);
    Ok(())
}

/// Arbitrary JSON as a `T`: an error, or a value that is stable on the wire (what the
/// server would then store and report reads back the same).
fn decodes_or_refuses<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &Value) -> Result<(), TestCaseError> {
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => {
            prop_assert!(v.is_object() || v.is_array(), "a {} decoded from {}", std::any::type_name::<T>(), v);
            round_trips(&t)
        }
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
    }
}

/// Arbitrary JSON, with the field names of the request types as likely keys, so that
/// near-valid bodies (right names, wrong types or ranges) are common.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        prop_oneof![
            Just("auto"),
            Just("copy"),
            Just("qcow2"),
            Just("drain"),
            Just("place"),
            Just("live"),
            Just("affinity"),
            Just("extents")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 8, |inner| {
        let key = prop_oneof![
            "[a-z_]{0,10}",
            prop_oneof![
                Just("name"),
                Just("memory_mib"),
                Just("vcpus"),
                Just("disks"),
                Just("nics"),
                Just("vm"),
                Just("destination"),
                Just("mode"),
                Just("storage"),
                Just("spec"),
                Just("goal"),
                Just("host"),
                Just("duration_ms"),
                Just("url"),
                Just("level"),
                Just("threshold"),
                Just("multifd_channels"),
                Just("groups"),
                Just("listen_host"),
                Just("postcopy_ready"),
                Just("cpu_features"),
                Just("checkpoint"),
                Just("keep"),
                Just("sha256"),
                Just("encoding"),
                Just("method"),
                Just("bridge"),
                Just("path"),
                Just("size_bytes"),
                Just("bus"),
                Just("format"),
                Just("rule"),
            ]
            .prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn vm_specs_round_trip(v in vm_spec()) { round_trips(&v)?; }

    #[test]
    fn migration_requests_round_trip(v in migration_request()) { round_trips(&v)?; }

    #[test]
    fn incoming_requests_round_trip(v in incoming_request()) { round_trips(&v)?; }

    #[test]
    fn create_vm_requests_round_trip(v in create_vm()) { round_trips(&v)?; }

    #[test]
    fn goals_round_trip(v in goal()) { round_trips(&v)?; }

    #[test]
    fn walk_options_round_trip(v in walk_options()) { round_trips(&v)?; }

    #[test]
    fn small_bodies_round_trip(url in text(), name in opt(text()), to in text(), listen_host in text(), guest in opt(guest_status()),
                               host in text(), ttl_s in opt(any::<u64>()), csr_pem in text()) {
        round_trips(&AddHost { url, name })?;
        round_trips(&MoveVm { to })?;
        round_trips(&RecoverRequest { listen_host })?;
        round_trips(&CommitRequest { guest })?;
        round_trips(&JoinTokenRequest { host: host.clone(), ttl_s })?;
        round_trips(&JoinRequest { host, csr_pem })?;
    }

    /// f64 settings come back within a relative 1e-15: serde_json (without its
    /// `float_roundtrip` feature) may read the last digits of a printed f64 back to a
    /// neighbouring float (a few units in the last place at large exponents, found at
    /// 1.12e260); everything else exactly.
    #[test]
    fn balance_configs_round_trip(v in balance_config()) {
        let text = serde_json::to_string(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: BalanceConfig = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("decode {text}: {e}")))?;
        let close = |a: f64, b: f64| a == b || (a - b).abs() <= 1e-15 * a.abs().max(b.abs());
        for (a, b) in [(v.threshold, back.threshold), (v.hysteresis, back.hysteresis), (v.min_gain, back.min_gain), (v.cost_per_gib, back.cost_per_gib)] {
            prop_assert!(close(a, b), "{} came back as {} through {}", a, b, text);
        }
        let exact = BalanceConfig { threshold: v.threshold, hysteresis: v.hysteresis, min_gain: v.min_gain, cost_per_gib: v.cost_per_gib, ..back };
        prop_assert_eq!(exact, v);
    }

    #[test]
    fn checkpoint_bodies_round_trip(c in checkpoint(), keep in any::<u32>(), method in opt(method()), ship_to in opt(text()), name in opt(text()),
                                    sha256 in text(), extents in any::<bool>(), base in opt(text()), replica in opt(text()),
                                    every_ms in opt(any::<u64>()), keep_opt in opt(any::<u32>()),
                                    p in (text(), text(), any::<u64>(), any::<u32>(), any::<u64>(), opt(any::<u64>()))) {
        round_trips(&c)?;
        round_trips(&CommitCheckpoint { checkpoint: c, keep })?;
        round_trips(&CheckpointRequest { method, ship_to })?;
        round_trips(&RestoreRequest { name })?;
        round_trips(&FileUpload { sha256, encoding: if extents { Encoding::Extents } else { Encoding::Whole }, base })?;
        round_trips(&ProtectVm { replica, every_ms, keep: keep_opt })?;
        round_trips(&Protection { replica: p.0, replica_url: p.1, every_ms: p.2, keep: p.3, fence_ms: p.4, clock_from_ms: p.5 })?;
    }

    /// The defaults a body may leave out are what the types document.
    #[test]
    fn a_minimal_vm_spec_gets_its_documented_defaults(name in any::<String>(), memory_mib in any::<u64>()) {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({"name": name, "memory_mib": memory_mib}))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(spec, VmSpec::new(name, memory_mib));
    }

    #[test]
    fn any_json_is_refused_or_stable_as_every_body(v in json_value()) {
        decodes_or_refuses::<VmSpec>(&v)?;
        decodes_or_refuses::<MigrationRequest>(&v)?;
        decodes_or_refuses::<IncomingRequest>(&v)?;
        decodes_or_refuses::<CreateVm>(&v)?;
        decodes_or_refuses::<Goal>(&v)?;
        decodes_or_refuses::<WalkOptions>(&v)?;
        decodes_or_refuses::<AddHost>(&v)?;
        decodes_or_refuses::<MoveVm>(&v)?;
        decodes_or_refuses::<RecoverRequest>(&v)?;
        decodes_or_refuses::<CommitRequest>(&v)?;
        decodes_or_refuses::<JoinTokenRequest>(&v)?;
        decodes_or_refuses::<JoinRequest>(&v)?;
        decodes_or_refuses::<Checkpoint>(&v)?;
        decodes_or_refuses::<CommitCheckpoint>(&v)?;
        decodes_or_refuses::<CheckpointRequest>(&v)?;
        decodes_or_refuses::<RestoreRequest>(&v)?;
        decodes_or_refuses::<FileUpload>(&v)?;
        decodes_or_refuses::<ProtectVm>(&v)?;
        decodes_or_refuses::<GuestStatus>(&v)?;
        if let Ok(b) = serde_json::from_value::<BalanceConfig>(v.clone()) {
            prop_assert!(v.is_object() || v.is_array(), "a balance config decoded from {}", v);
            prop_assert!(b.threshold.is_finite() && b.hysteresis.is_finite());
        }
    }

    /// Bytes that are not JSON are refused as every body, with the position in the error.
    #[test]
    fn bytes_that_are_not_json_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64), cut in any::<prop::sample::Index>(), v in vm_spec()) {
        prop_assume!(serde_json::from_slice::<Value>(&bytes).is_err());
        let e = serde_json::from_slice::<VmSpec>(&bytes).expect_err("not JSON");
        prop_assert!(e.to_string().contains("line") || e.to_string().contains("EOF"), "{}", e);
        prop_assert!(serde_json::from_slice::<MigrationRequest>(&bytes).is_err());
        prop_assert!(serde_json::from_slice::<Goal>(&bytes).is_err());
        prop_assert!(serde_json::from_slice::<CreateVm>(&bytes).is_err());
        // A valid body cut short is refused too.
        let text = serde_json::to_vec(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let cut = cut.index(text.len());
        prop_assert!(serde_json::from_slice::<VmSpec>(&text[..cut]).is_err());
    }

    /// The CLI's and the wire's spellings of each enum are one table: `Display` is the
    /// serde name, `FromStr` reads it back, and any other string is refused with a
    /// message quoting it.
    #[test]
    fn enum_spellings_agree_and_refuse_the_rest(s in any::<String>(), m in mode(), c in compression(), st in storage_mode(), cm in method(),
                                                f in disk_format(), b in disk_bus()) {
        fn agrees<T>(v: T) -> Result<(), TestCaseError>
        where T: std::fmt::Display + std::str::FromStr + Serialize + PartialEq + Debug, T::Err: Debug {
            prop_assert_eq!(serde_json::to_value(&v).ok(), Some(Value::String(v.to_string())));
            prop_assert_eq!(v.to_string().parse::<T>().ok(), Some(v));
            Ok(())
        }
        agrees(m)?; agrees(c)?; agrees(st)?; agrees(cm)?; agrees(f)?; agrees(b)?;
        fn refuses<T>(s: &str, known: &[&str]) -> Result<(), TestCaseError>
        where T: std::str::FromStr<Err = String> + Debug {
            match s.parse::<T>() {
                Ok(v) => prop_assert!(known.contains(&s), "{:?} parsed as {:?}", s, v),
                Err(e) => {
                    prop_assert!(!known.contains(&s), "{:?} refused: {}", s, e);
                    prop_assert!(e.contains(s) || e.contains(&format!("{s:?}")), "{} does not quote {:?}", e, s);
                }
            }
            Ok(())
        }
        refuses::<Mode>(&s, &["auto", "precopy", "postcopy"])?;
        refuses::<Compression>(&s, &["none", "zstd", "xbzrle"])?;
        refuses::<StorageMode>(&s, &["auto", "shared", "copy"])?;
        refuses::<CheckpointMethod>(&s, &["live", "background", "paused"])?;
        refuses::<DiskFormat>(&s, &["qcow2", "raw"])?;
        refuses::<DiskBus>(&s, &["virtio-blk", "virtio", "virtio-scsi", "scsi"])?;
    }

    /// `--group NAME[:affinity|anti]`: a generated group reads back; any string gives a
    /// group with a valid name or an error.
    #[test]
    fn vm_groups_parse_from_their_spelling(g in vm_group(), s in any::<String>(), t in "[A-Za-z0-9._:-]{0,70}") {
        let spelled = match g.rule { GroupRule::Affinity => format!("{}:affinity", g.name), GroupRule::AntiAffinity => format!("{}:anti", g.name) };
        prop_assert_eq!(spelled.parse::<VmGroup>(), Ok(g.clone()));
        prop_assert_eq!(format!("{}:{}", g.name, g.rule).parse::<VmGroup>(), Ok(g.clone()));
        for s in [s, t] {
            if let Ok(parsed) = s.parse::<VmGroup>() {
                prop_assert!(!parsed.name.is_empty() && parsed.name.len() <= 63 && !parsed.name.contains(':'), "{:?} -> {:?}", s, parsed);
                prop_assert!(s.starts_with(&parsed.name));
            }
        }
    }
}

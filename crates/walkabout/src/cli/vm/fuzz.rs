//! Property tests of `--disk`, `--nic` and `--memory`-style sizes (issue 11, "inputs
//! fuzzed"): generated spellings give exactly the spec they spell; any string gives a
//! spec or an error quoting it, never a panic.

use super::*;
use proptest::prelude::*;
use walkabout_api::{DiskBus, DiskFormat};

fn format() -> impl Strategy<Value = DiskFormat> {
    prop_oneof![Just(DiskFormat::Qcow2), Just(DiskFormat::Raw)]
}

fn bus() -> impl Strategy<Value = (DiskBus, &'static str)> {
    prop_oneof![
        Just((DiskBus::VirtioBlk, "virtio-blk")),
        Just((DiskBus::VirtioBlk, "virtio")),
        Just((DiskBus::VirtioScsi, "virtio-scsi")),
        Just((DiskBus::VirtioScsi, "scsi")),
    ]
}

/// An absolute path or a catalog image, without commas.
fn image() -> impl Strategy<Value = String> {
    prop_oneof!["/[^,\n]{0,30}", "image:[a-z0-9.-]{1,20}"]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn a_disk_on_an_image_reads_back(path in image(), format in proptest::option::of(format()), bus in proptest::option::of(bus()), swap in any::<bool>()) {
        let mut options = vec![];
        if let Some(f) = format {
            options.push(format!("format={f}"));
        }
        if let Some((_, spelled)) = bus {
            options.push(format!("bus={spelled}"));
        }
        if swap {
            options.reverse();
        }
        let text = std::iter::once(path.clone()).chain(options).collect::<Vec<_>>().join(",");
        let want = DiskSpec { path: Some(PathBuf::from(&path)), format, size_bytes: None, bus: bus.map(|b| b.0).unwrap_or_default() };
        prop_assert_eq!(parse_disk(&text), Ok(want), "{}", text);
    }

    #[test]
    fn a_new_disk_reads_back_in_bytes(n in 0u64..1 << 20, unit in prop_oneof![Just(("", 1u64)), Just(("M", 1)), Just(("G", 1024)), Just(("gib", 1024)), Just(("T", 1 << 20))],
                                      bus in proptest::option::of(bus())) {
        let mut text = format!("size={n}{}", unit.0);
        if let Some((_, spelled)) = bus {
            text.push_str(&format!(",bus={spelled}"));
        }
        let want = (n * unit.1).checked_mul(1 << 20);
        match want {
            Some(bytes) => prop_assert_eq!(parse_disk(&text), Ok(DiskSpec { path: None, format: None, size_bytes: Some(bytes), bus: bus.map(|b| b.0).unwrap_or_default() })),
            None => prop_assert!(parse_disk(&text).is_err_and(|e| e.contains("too large")), "{}", text),
        }
    }

    /// Any string: a disk that has a path or a size (not both, and a new disk is never
    /// raw), or an error quoting the string.
    #[test]
    fn any_disk_string_is_a_disk_or_an_error_quoting_it(text in "[a-z=,:/.0-9 -]{0,30}|\\PC{0,30}|size=[0-9]{15,25}[a-zA-Z]{0,3}") {
        match parse_disk(&text) {
            Ok(d) => {
                prop_assert!(d.path.is_some() != d.size_bytes.is_some(), "{:?} from {:?}", d, text);
                prop_assert!(d.path.as_ref().is_none_or(|p| p.is_absolute() || p.to_string_lossy().starts_with("image:")), "{:?}", d);
                prop_assert!(!(d.size_bytes.is_some() && d.format == Some(DiskFormat::Raw)));
            }
            Err(e) => prop_assert!(e.contains(&format!("'{text}'")) || e.contains("cannot make the path absolute"), "{} for {:?}", e, text),
        }
    }

    #[test]
    fn a_nic_reads_back(bridge in "[a-z0-9-]{1,15}", mac in proptest::option::of("52:54:00(:[0-9a-f]{2}){3}"), address in proptest::option::of("10\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}/[0-9]{1,2}"),
                        order in any::<prop::sample::Index>()) {
        let mut parts = vec![format!("bridge={bridge}")];
        if let Some(m) = &mac {
            parts.push(format!("mac={m}"));
        }
        if let Some(a) = &address {
            parts.push(format!("address={a}"));
        }
        let at = order.index(parts.len());
        parts.rotate_left(at);
        let want = walkabout_api::NicSpec { bridge, mac, address };
        prop_assert_eq!(parse_nic(&parts.join(",")), Ok(want));
    }

    /// Any string: a NIC with a bridge, or an error.
    #[test]
    fn any_nic_string_is_a_nic_with_a_bridge_or_an_error(text in "[a-z=,:/.0-9 -]{0,40}|\\PC{0,30}") {
        if let Ok(n) = parse_nic(&text) {
            prop_assert!(!n.bridge.is_empty());
            let spelled = format!("bridge={}", n.bridge);
            prop_assert!(text.contains(&spelled), "{:?} from {:?}", n, text);
        }
    }

    /// Sizes and durations: a number with a known unit is that many units, one too
    /// large is refused as such, anything else is refused quoting it.
    #[test]
    fn sizes_parse_to_mib_or_are_refused(n in any::<u64>(), unit in prop_oneof![Just(("M", 1u64)), Just(("mib", 1)), Just(("G", 1024)), Just(("tb", 1 << 20))],
                                         junk in "\\PC{0,12}") {
        let text = format!("{n}{}", unit.0);
        match n.checked_mul(unit.1) {
            Some(mib) => prop_assert_eq!(parse_mib(&text), Ok(mib)),
            None => prop_assert!(parse_mib(&text).is_err_and(|e| e.contains("too large")), "{}", text),
        }
        if let Err(e) = parse_mib(&junk) {
            prop_assert!(e.contains(&format!("'{}'", junk)) || e.contains(&format!("'{}'", junk.trim())), "{}", e);
        }
    }
}

/// The minimal input the property found: an absolute path with a '=' in it
/// (`/=`, `/srv/a=b.qcow2`) was read as an option `key=value` and refused.
#[test]
fn a_path_with_an_equals_sign_is_a_path() {
    let d = parse_disk("/srv/a=b.qcow2,format=qcow2").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.path, d.format), (Some(PathBuf::from("/srv/a=b.qcow2")), Some(DiskFormat::Qcow2)));
}

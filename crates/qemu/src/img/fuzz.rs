//! Property tests of reading `qemu-img`'s output (issue 11, "inputs fuzzed"): any JSON
//! on its stdout and any text on its stderr give an image chain or a typed error naming
//! the image, never a panic; a generated chain reads back exactly. `qemu-img` is a
//! stand-in script that prints what each case wrote beside its image.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::sync::OnceLock;

/// The stand-in `qemu-img`: prints `<image>.out`, exits with `<image>.rc` (default 0).
fn fake_tool() -> &'static Path {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("wa-img-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let tool = dir.join("qemu-img");
        let script = "#!/bin/sh\nfor a; do last=\"$a\"; done\ncat \"$last.out\"\nexit \"$(cat \"$last.rc\" 2>/dev/null || echo 0)\"\n";
        std::fs::write(&tool, script).unwrap_or_else(|e| panic!("write {}: {e}", tool.display()));
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap_or_else(|e| panic!("chmod: {e}"));
        tool
    })
}

/// A fresh image file whose stand-in `qemu-img` prints `stdout` and exits with `rc`.
fn image(tag: &str, stdout: &[u8], rc: u8) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = fake_tool().parent().unwrap_or(Path::new("/tmp")).to_path_buf();
    let img = dir.join(format!("{tag}-{n}.img"));
    let write = |p: PathBuf, b: &[u8]| std::fs::write(&p, b).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    write(img.clone(), b"");
    write(img.with_extension("img.out"), stdout);
    write(img.with_extension("img.rc"), rc.to_string().as_bytes());
    img
}

fn cleanup(img: &Path) {
    for p in [img.to_path_buf(), img.with_extension("img.out"), img.with_extension("img.rc")] {
        let _ = std::fs::remove_file(p);
    }
}

/// Runs `f` on a runtime, again while the stand-in is still busy being written by a
/// concurrent fork (`ETXTBSY`, a race of the test harness, not of the code).
fn run<T>(f: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, ImageError>>>>) -> Result<T, ImageError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut r = rt.block_on(f());
    for _ in 0..20 {
        match &r {
            Err(ImageError::Tool { detail, .. }) if detail.contains("Text file busy") => {
                std::thread::sleep(Duration::from_millis(10));
                r = rt.block_on(f());
            }
            _ => break,
        }
    }
    r
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::from),
        prop_oneof![Just("qcow2"), Just("raw"), Just("vmdk")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        let key = prop_oneof![
            "[a-z-]{0,8}",
            prop_oneof![
                Just("filename"),
                Just("format"),
                Just("virtual-size"),
                Just("actual-size"),
                Just("full-backing-filename"),
                Just("corruptions"),
                Just("check-errors")
            ]
            .prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One generated layer and the `qemu-img info` JSON of it.
fn layer() -> impl Strategy<Value = (ImageInfo, Value)> {
    (
        "/[a-z0-9/._-]{1,30}",
        prop_oneof![Just(DiskFormat::Qcow2), Just(DiskFormat::Raw)],
        any::<u64>(),
        any::<u64>(),
        proptest::option::of("/[a-z0-9/._-]{1,30}"),
    )
        .prop_map(|(path, format, virtual_size, actual_size, backing)| {
            let mut raw = json!({"filename": path, "format": format.as_str(), "virtual-size": virtual_size, "actual-size": actual_size,
                                 "dirty-flag": false, "cluster-size": 65536});
            if let Some(b) = &backing {
                raw["full-backing-filename"] = json!(b);
                raw["backing-filename"] = json!(b);
            }
            let info = ImageInfo { path: path.into(), format, virtual_size, actual_size, backing: backing.map(PathBuf::from) };
            (info, raw)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn a_generated_chain_reads_back_exactly(layers in proptest::collection::vec(layer(), 1..5)) {
        let (want, raw): (Vec<ImageInfo>, Vec<Value>) = layers.into_iter().unzip();
        let img = image("chain", Value::Array(raw).to_string().as_bytes(), 0);
        let got = run(|| { let img = img.clone(); Box::pin(async move { QemuImg::new(fake_tool().display().to_string()).chain(&img, None).await }) });
        cleanup(&img);
        prop_assert_eq!(got.map_err(|e| e.to_string()), Ok(want));
    }

    /// Any JSON (or bytes) on stdout of a successful `qemu-img info`: a chain whose
    /// layers are exactly the well-formed entries, or a typed error.
    #[test]
    fn any_info_output_is_a_chain_or_a_typed_error(v in json_value(), bytes in proptest::collection::vec(any::<u8>(), 0..40), as_bytes in proptest::bool::weighted(0.2)) {
        let out = if as_bytes { bytes } else { v.to_string().into_bytes() };
        let img = image("info", &out, 0);
        let got = run(|| { let img = img.clone(); Box::pin(async move { QemuImg::new(fake_tool().display().to_string()).chain(&img, None).await }) });
        cleanup(&img);
        match got {
            Ok(chain) => {
                let entries = serde_json::from_slice::<Vec<Value>>(&out).unwrap_or_default();
                prop_assert_eq!(chain.len(), entries.len());
                for (layer, entry) in chain.iter().zip(&entries) {
                    let path = layer.path.to_string_lossy().into_owned();
                    prop_assert_eq!(Some(path.as_str()), entry["filename"].as_str());
                    prop_assert_eq!(Some(layer.virtual_size), entry["virtual-size"].as_u64());
                }
            }
            Err(ImageError::Tool { detail, .. }) => prop_assert!(detail.starts_with("unexpected output"), "{}", detail),
            Err(ImageError::Unreadable { detail, .. }) => prop_assert!(detail.contains("is not supported"), "{}", detail),
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    /// `qemu-img check`: a clean image only when its JSON says 0 corruptions and 0
    /// errors; corruption is reported with its counts; anything else is typed.
    #[test]
    fn any_check_output_is_clean_corrupt_or_a_typed_error(v in json_value(), rc in 0u8..4) {
        let out = v.to_string();
        let img = image("check", out.as_bytes(), rc);
        let got = run(|| { let img = img.clone(); Box::pin(async move { QemuImg::new(fake_tool().display().to_string()).check(&img, DiskFormat::Qcow2).await }) });
        cleanup(&img);
        let counts = v.is_object().then(|| {
            (v.get("corruptions").map_or(Some(0), Value::as_u64), v.get("check-errors").map_or(Some(0), Value::as_u64))
        });
        match (got, counts) {
            (Ok(()), Some((Some(0), Some(0)))) => {}
            (Err(ImageError::Corrupt { corruptions, errors, .. }), Some((Some(c), Some(e)))) => prop_assert_eq!((corruptions, errors), (c, e)),
            (Err(ImageError::Unreadable { path, .. } | ImageError::Missing { path } | ImageError::BackingMissing { path, .. } | ImageError::InUse { path }), _) => prop_assert_eq!(path, img),
            (got, counts) => prop_assert!(false, "{:?} for counts {:?}", got.map_err(|e| e.to_string()), counts),
        }
    }

    /// Any error text of `qemu-img` gives an error naming the image; the lock message
    /// always reads as "in use".
    #[test]
    fn any_error_text_names_the_image(text in "\\PC{0,120}|[ -~\n]{0,200}", locked in any::<bool>()) {
        let p = Path::new("/srv/vm.qcow2");
        let text = if locked { format!("{text}Failed to get \"write\" lock{text}") } else { text };
        let e = classify(p, &text);
        prop_assert!(e.to_string().contains("/srv/vm.qcow2"), "{}", e);
        if locked {
            prop_assert!(matches!(e, ImageError::InUse { .. }), "{}", e);
        }
    }
}

/// The minimal output the property found: `qemu-img check` printing `[]` (no report)
/// read as a clean image (serde reads a struct of defaults from an empty array).
#[test]
fn a_check_that_prints_no_report_is_not_clean() {
    let img = image("check-empty", b"[]", 0);
    let got = run(|| {
        let img = img.clone();
        Box::pin(async move { QemuImg::new(fake_tool().display().to_string()).check(&img, DiskFormat::Qcow2).await })
    });
    cleanup(&img);
    assert!(matches!(got, Err(ImageError::Unreadable { .. })), "{got:?}");
}

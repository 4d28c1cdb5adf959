//! Compiles the guest program (crates/guest) into a static x86_64 Linux binary in
//! OUT_DIR, for src/lib.rs to embed with `include_bytes!`.
//!
//! Why a bare `rustc` rather than cargo: a nested cargo would contend for the build
//! directory lock the outer cargo holds, and needs its own target dir; the guest crate
//! is std only, so two rustc invocations (the library as an rlib, then the binary
//! against it) are all it takes. `+crt-static` links glibc statically; the result is
//! checked to need no dynamic loader, since the initramfs has none.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/elf.rs"]
#[allow(dead_code)]
mod elf;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn env_path(name: &str) -> PathBuf {
    match env::var_os(name) {
        Some(value) => PathBuf::from(value),
        None => panic!("cargo did not set {name} for the build script"),
    }
}

fn rustc(rustc: &OsString, args: &[&std::ffi::OsStr]) {
    let status = Command::new(rustc).args(args).status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            panic!(
                "compiling the guest program failed: `{} {}` exited with {s} (its errors are above; \
             the guest needs the Rust standard library for {GUEST_TARGET} and a static glibc, \
             libc6-dev on Debian)",
                rustc.to_string_lossy(),
                args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
            )
        }
        Err(e) => panic!("cannot run {}: {e}", rustc.to_string_lossy()),
    }
}

fn rerun_if_changed(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => panic!("cannot list the guest sources in {}: {e}", dir.display()),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rerun_if_changed(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn main() {
    let manifest_dir = env_path("CARGO_MANIFEST_DIR");
    let out_dir = env_path("OUT_DIR").join("guest");
    let guest_src = manifest_dir.join("../guest/src");
    rerun_if_changed(&guest_src);
    println!("cargo:rerun-if-env-changed=RUSTC");
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        panic!("cannot create {}: {e}", out_dir.display());
    }
    let rustc_path = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    let common: [&str; 12] = [
        "--edition",
        "2021",
        "--target",
        GUEST_TARGET,
        "-C",
        "opt-level=2",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "debuginfo=0",
        "--crate-name",
        "walkabout_guest",
    ];
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let lib_src = guest_src.join("lib.rs");
    let mut lib_args: Vec<&std::ffi::OsStr> = common.iter().map(|s| os(s)).collect();
    lib_args.extend([os("--crate-type"), os("rlib"), os("--out-dir"), out_dir.as_os_str()]);
    lib_args.push(lib_src.as_os_str());
    rustc(&rustc_path, &lib_args);

    let rlib = out_dir.join("libwalkabout_guest.rlib");
    let mut extern_arg = OsString::from("walkabout_guest=");
    extern_arg.push(&rlib);
    let mut link_dir = OsString::from("dependency=");
    link_dir.push(&out_dir);
    let binary = out_dir.join("walkabout-guest");
    let main_src = guest_src.join("main.rs");
    let mut bin_args: Vec<&std::ffi::OsStr> = common.iter().map(|s| os(s)).collect();
    bin_args.extend([
        os("--crate-type"),
        os("bin"),
        os("-C"),
        os("strip=symbols"),
        os("--extern"),
        extern_arg.as_os_str(),
        os("-L"),
        link_dir.as_os_str(),
        os("-o"),
        binary.as_os_str(),
    ]);
    bin_args.push(main_src.as_os_str());
    rustc(&rustc_path, &bin_args);

    let bytes = match std::fs::read(&binary) {
        Ok(bytes) => bytes,
        Err(e) => panic!("cannot read the guest program {}: {e}", binary.display()),
    };
    match elf::is_static_elf64(&bytes) {
        Some(true) => {}
        Some(false) => panic!(
            "the guest program {} is dynamically linked (has PT_INTERP) despite +crt-static; \
             the initramfs has no dynamic loader",
            binary.display()
        ),
        None => panic!("the guest program {} is not a 64-bit ELF file", binary.display()),
    }
    println!("cargo:rustc-env=WALKABOUT_GUEST_BINARY={}", binary.display());
}

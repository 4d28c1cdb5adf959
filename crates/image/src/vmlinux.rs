//! The uncompressed kernel (`vmlinux`) inside a bzImage, booted through its PVH entry.
//!
//! Why: under TCG a bzImage spends about 4 s decompressing itself (Debian's is xz) in
//! emulated code before the kernel's first message, out of about 7.5 s to READY. QEMU's
//! `-kernel` also boots an ELF `vmlinux` that carries a Xen PVH entry note (Debian's do,
//! `CONFIG_PVH=y`), with no decompression and no real-mode setup; the guest reaches READY
//! in about half the time. The bzImage's setup header says where its compressed payload
//! is, and the host's own `xz`/`zstd`/`gzip` unpacks it once, into the cache.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::{elf, io_error, ImageError};

/// Largest notes segment worth reading.
const MAX_NOTES: u64 = 1 << 20;

/// Whether `path` is an x86-64 ELF kernel that QEMU can boot through its PVH entry.
pub(crate) fn is_pvh_vmlinux(path: &Path) -> Result<bool, ImageError> {
    let mut file = File::open(path).map_err(io_error("read kernel", path))?;
    let mut head = Vec::new();
    (&mut file).take(4096).read_to_end(&mut head).map_err(io_error("read kernel", path))?;
    let Some(segments) = elf::note_segments(&head) else {
        return Ok(false);
    };
    for (offset, size) in segments {
        let mut notes = Vec::new();
        file.seek(SeekFrom::Start(offset)).map_err(io_error("read kernel", path))?;
        (&mut file).take(size.min(MAX_NOTES)).read_to_end(&mut notes).map_err(io_error("read kernel", path))?;
        if elf::has_pvh_entry_note(&notes) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The compressed payload of a bzImage, from its setup header (boot protocol >= 2.08:
/// `setup_sects` at 0x1F1, `payload_offset` and `payload_length` at 0x248 and 0x24C,
/// relative to the protected-mode code after the setup sectors).
pub(crate) fn bzimage_payload(bzimage: &[u8]) -> Option<&[u8]> {
    let u32_at = |at: usize| Some(u32::from_le_bytes(bzimage.get(at..at + 4)?.try_into().ok()?));
    let setup_sects = match *bzimage.get(0x1F1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + usize::try_from(u32_at(0x248)?).ok()?;
    let len = usize::try_from(u32_at(0x24C)?).ok()?;
    bzimage.get(start..start.checked_add(len)?)
}

/// The host command that decompresses `payload` to stdout, by its magic number.
fn decompressor(payload: &[u8]) -> Option<(&'static str, &'static [&'static str])> {
    if payload.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        // The kernel appends the uncompressed size after the stream.
        Some(("xz", &["-dc", "--single-stream"]))
    } else if payload.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Some(("zstd", &["-dcq"]))
    } else if payload.starts_with(&[0x1F, 0x8B]) {
        Some(("gzip", &["-dc"]))
    } else {
        None
    }
}

/// Unpacks the `vmlinux` of `bzimage` into `out`, using `scratch` for the payload.
/// Fails (and the caller boots the bzImage instead) if the compression is not one the
/// host can undo, or the result has no PVH entry.
pub(crate) fn extract(bzimage: &Path, out: &Path, scratch: &Path) -> Result<(), String> {
    let bytes = std::fs::read(bzimage).map_err(|e| format!("cannot read {}: {e}", bzimage.display()))?;
    let payload = bzimage_payload(&bytes).ok_or("its setup header has no payload location")?;
    let (program, args) = decompressor(payload).ok_or("its payload is not xz, zstd or gzip")?;
    let payload_path = scratch.join("payload");
    std::fs::write(&payload_path, payload).map_err(|e| format!("cannot write {}: {e}", payload_path.display()))?;
    let output = File::create(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let result = Command::new(program)
        .args(args)
        .arg(&payload_path)
        .stdout(Stdio::from(output))
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr);
        return Err(format!("`{program} {}` failed ({}): {}", args.join(" "), result.status, stderr.trim()));
    }
    match is_pvh_vmlinux(out) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the unpacked kernel has no PVH entry note".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for n in [name.len() as u32, desc.len() as u32, kind] {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        bytes.extend_from_slice(name);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes.extend_from_slice(desc);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    #[test]
    fn pvh_entry_note_is_found_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 18, &[0, 0, 0, 1]));
        assert!(elf::has_pvh_entry_note(&notes));
    }

    #[test]
    fn other_xen_notes_are_not_a_pvh_entry() {
        let notes = note(b"Xen\0", 6, b"linux\0");
        assert!(!elf::has_pvh_entry_note(&notes));
    }

    #[test]
    fn truncated_notes_are_not_a_pvh_entry() {
        let notes = note(b"Xen\0", 18, &[0, 0, 0, 1]);
        assert!(!elf::has_pvh_entry_note(&notes[..10]));
    }

    #[test]
    fn payload_is_located_from_the_setup_header() {
        let mut bzimage = vec![0u8; 4096];
        bzimage[0x1F1] = 1; // one setup sector: protected-mode code at 1024
        bzimage[0x248..0x24C].copy_from_slice(&16u32.to_le_bytes());
        bzimage[0x24C..0x250].copy_from_slice(&4u32.to_le_bytes());
        bzimage[1040..1044].copy_from_slice(b"\xFD7zX");
        assert_eq!(bzimage_payload(&bzimage), Some(&b"\xFD7zX"[..]));
    }

    #[test]
    fn payload_past_the_end_is_none() {
        let mut bzimage = vec![0u8; 1024];
        bzimage[0x24C..0x250].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(bzimage_payload(&bzimage), None);
    }

    #[test]
    fn xz_payload_is_unpacked_with_xz() {
        assert_eq!(decompressor(b"\xFD7zXZ\0rest").map(|(p, _)| p), Some("xz"));
    }
}

//! A writer of "newc" cpio archives (magic `070701`), the format the Linux kernel
//! unpacks as an initramfs (see the kernel's `Documentation/driver-api/early-userspace/
//! buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header (the magic, then 13 fields of 8 hex digits),
//! the NUL-terminated name padded to a multiple of 4 bytes, and the data padded to a
//! multiple of 4 bytes. The archive ends with an entry named `TRAILER!!!`. Because the
//! kernel creates the entries itself, the archive can hold device nodes (such as
//! `/dev/console`) without the builder being allowed to `mknod`.

/// File type bits of `st_mode`.
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// An archive being written into memory.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

/// Fields of an entry's header that vary between entry kinds.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    size: usize,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Archive { bytes: Vec::new(), next_inode: 1 }
    }

    /// Adds a directory (`name` without a leading `/`, e.g. `dev`), mode 0755.
    pub fn dir(&mut self, name: &str) {
        self.entry(Header { name, mode: S_IFDIR | 0o755, nlink: 2, rdev: (0, 0), size: 0 }, &[]);
    }

    /// Adds a regular file with permission bits `perm` (e.g. `0o755`).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        let header = Header { name, mode: S_IFREG | (perm & 0o7777), nlink: 1, rdev: (0, 0), size: data.len() };
        self.entry(header, data);
    }

    /// Adds a symbolic link `name` pointing to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        let header = Header { name, mode: S_IFLNK | 0o777, nlink: 1, rdev: (0, 0), size: target.len() };
        self.entry(header, target.as_bytes());
    }

    /// Adds a character device node `name` (major, minor), mode 0600.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        let header = Header { name, mode: S_IFCHR | 0o600, nlink: 1, rdev: (major, minor), size: 0 };
        self.entry(header, &[]);
    }

    /// Ends the archive with its trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let header = Header { name: TRAILER, mode: 0, nlink: 1, rdev: (0, 0), size: 0 };
        self.next_inode = 0;
        self.entry(header, &[]);
        self.bytes
    }

    fn entry(&mut self, h: Header<'_>, data: &[u8]) {
        let inode = self.next_inode;
        self.next_inode += 1;
        // Sizes above 4 GiB cannot be represented; nothing in a guest image comes close.
        let size = u32::try_from(h.size).unwrap_or(u32::MAX);
        let name_size = u32::try_from(h.name.len() + 1).unwrap_or(u32::MAX);
        let fields = [inode, h.mode, 0, 0, h.nlink, 0, size, 0, 0, h.rdev.0, h.rdev.1, name_size, 0];
        self.bytes.extend_from_slice(MAGIC.as_bytes());
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(h.name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let padded = self.bytes.len().next_multiple_of(4);
        self.bytes.resize(padded, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdev major, rdev minor, data) of each entry, read back.
    fn entries(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let hex = |i: usize| {
                let s = std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex field")
            };
            assert_eq!(&bytes[at..at + 6], b"070701");
            let (mode, size, major, minor, namesize) = (hex(1), hex(6), hex(9), hex(10), hex(11));
            let name_at = at + 110;
            let name = String::from_utf8(bytes[name_at..name_at + namesize as usize - 1].to_vec()).expect("utf-8 name");
            let data_at = (name_at + namesize as usize).next_multiple_of(4);
            let data = bytes[data_at..data_at + size as usize].to_vec();
            at = (data_at + size as usize).next_multiple_of(4);
            out.push((name, mode, major, minor, data));
        }
        out
    }

    #[test]
    fn archive_reads_back_entry_by_entry() {
        let mut archive = Archive::new();
        archive.dir("dev");
        archive.char_device("dev/console", 5, 1);
        archive.file("init", 0o755, b"#!/bin/sh\n");
        archive.symlink("bin/sh", "busybox");
        let read = entries(&archive.finish());
        assert_eq!(
            read,
            vec![
                ("dev".into(), 0o040_755, 0, 0, vec![]),
                ("dev/console".into(), 0o020_600, 5, 1, vec![]),
                ("init".into(), 0o100_755, 0, 0, b"#!/bin/sh\n".to_vec()),
                ("bin/sh".into(), 0o120_777, 0, 0, b"busybox".to_vec()),
                ("TRAILER!!!".into(), 0, 0, 0, vec![]),
            ]
        );
    }

    #[test]
    fn archive_length_is_a_multiple_of_four() {
        let mut archive = Archive::new();
        archive.file("a", 0o644, b"12345");
        assert_eq!(archive.finish().len() % 4, 0);
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let bytes = Archive::new().finish();
        assert_eq!(entries(&bytes).len(), 1);
    }
}

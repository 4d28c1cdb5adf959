//! The disk workload (`disk:<MiB>:<MiB/s>`): self-verifying blocks written to a raw block
//! device with `O_DIRECT` (past the guest's page cache, so what is read back is what the
//! virtual disk holds), re-read and verified, continuously.
//!
//! Every 4 KiB block of the first `<MiB>` of the device is 512 little-endian 64-bit words:
//!
//! | word   | content                                                    |
//! |--------|------------------------------------------------------------|
//! | 0      | [`MAGIC`] (`WKDISK01`)                                      |
//! | 1      | the block's index on the device                            |
//! | 2      | its generation (times written by this workload; from 1)    |
//! | 3      | a checksum of every other word                             |
//! | 4..512 | a body derived from (index, generation)                    |
//!
//! A block checks on its own (magic, checksum) and against what the program expects of
//! it (index, and the generation it last wrote there): a flipped byte, a block written
//! to the wrong place, a lost write (a stale generation) and a zeroed block are caught.
//!
//! At start the whole area is read once: blocks left by an earlier run of the workload
//! on the same disk (a VM stopped and started again, or moved) are verified and adopted
//! (their generation continues), never-written blocks (all zeros) are fine, anything
//! else is corrupt. Then one thread writes blocks in order at the requested rate and,
//! between writes, re-reads the written blocks in a sweep at the same rate.
//!
//! The device is `walkabout.disk=/dev/X` on the kernel command line, else the first
//! virtio disk (`vd*`, then `sd*`) that is not the `root=` device. Its contents are
//! overwritten: give the workload a scratch disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::workload::Load;

/// Size of a block, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Words of a block.
const BLOCK_WORDS: usize = BLOCK_SIZE / 8;
/// Word 0 of every block: "WKDISK01" in little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"WKDISK01");
/// Blocks moved per read or write call (256 KiB).
pub const CHUNK_BLOCKS: usize = 64;
/// The kernel command line parameter naming the workload's device.
pub const DISK_PARAM: &str = "walkabout.disk";

/// `O_DIRECT` on x86_64 Linux.
const O_DIRECT: i32 = 0o40000;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const SUM_SEED: u64 = 0x5741_4C4B_4449_534B; // "WALKDISK"

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn word(block: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&block[i * 8..i * 8 + 8]);
    u64::from_le_bytes(w)
}

fn set_word(block: &mut [u8], i: usize, v: u64) {
    block[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

/// The checksum of a block: every word but word 3, in order (Fletcher-style, mixed).
fn checksum(block: &[u8]) -> u64 {
    let (mut a, mut b) = (SUM_SEED, 0u64);
    for i in (0..BLOCK_WORDS).filter(|&i| i != 3) {
        a = a.wrapping_add(word(block, i));
        b = b.wrapping_add(a);
    }
    mix(a ^ mix(b))
}

/// Fills `block` (exactly [`BLOCK_SIZE`] bytes) with block `index` at `generation`.
pub fn fill(block: &mut [u8], index: u64, generation: u64) {
    let seed = mix(index.wrapping_mul(GOLDEN) ^ mix(generation ^ SUM_SEED));
    set_word(block, 0, MAGIC);
    set_word(block, 1, index);
    set_word(block, 2, generation);
    for i in 4..BLOCK_WORDS {
        set_word(block, i, seed ^ (i as u64).wrapping_mul(GOLDEN));
    }
    let sum = checksum(block);
    set_word(block, 3, sum);
}

/// What a block read from the device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// All zeros: never written.
    Blank,
    /// A whole, intact block of this workload: its index and generation.
    Block {
        /// The index it says it is.
        index: u64,
        /// Its generation.
        generation: u64,
    },
    /// Anything else: not a block of ours, or one whose checksum fails.
    Garbage {
        /// The magic word was right (a damaged block of ours, not foreign data).
        magic_ok: bool,
    },
}

/// Reads what `block` holds.
pub fn inspect(block: &[u8]) -> Found {
    if block.iter().all(|&b| b == 0) {
        return Found::Blank;
    }
    let magic_ok = word(block, 0) == MAGIC;
    if !magic_ok || checksum(block) != word(block, 3) {
        return Found::Garbage { magic_ok };
    }
    Found::Block { index: word(block, 1), generation: word(block, 2) }
}

/// Checks block `index` against the generation last written there (0: never written
/// by this run nor adopted, so blank is fine). `Err` says what is wrong.
pub fn verify(block: &[u8], index: u64, expected_gen: u64) -> Result<(), String> {
    match (inspect(block), expected_gen) {
        (Found::Blank, 0) => Ok(()),
        (Found::Block { index: i, generation: g }, e) if i == index && g == e => Ok(()),
        (Found::Blank, e) => Err(format!("zeroed (expected generation {e})")),
        (Found::Block { index: i, generation: g }, e) => {
            Err(format!("holds block {i} generation {g} (expected block {index} generation {e})"))
        }
        (Found::Garbage { magic_ok: true }, e) => Err(format!("checksum mismatch (expected generation {e})")),
        (Found::Garbage { magic_ok: false }, e) => Err(format!("not a block of this workload (expected generation {e})")),
    }
}

/// A buffer of `blocks` blocks aligned to 4 KiB (what `O_DIRECT` needs), without unsafe:
/// a larger vector and the aligned window inside it.
pub struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    /// A zeroed buffer of `blocks` blocks.
    pub fn new(blocks: usize) -> Aligned {
        let len = blocks * BLOCK_SIZE;
        let bytes = vec![0u8; len + BLOCK_SIZE];
        let start = bytes.as_ptr().align_offset(BLOCK_SIZE).min(BLOCK_SIZE);
        Aligned { bytes, start, len }
    }

    /// The first `blocks` blocks of the buffer.
    pub fn blocks(&mut self, blocks: usize) -> &mut [u8] {
        let end = self.start + (blocks * BLOCK_SIZE).min(self.len);
        &mut self.bytes[self.start..end]
    }
}

/// Counters the heartbeat reads.
#[derive(Debug, Default)]
pub struct DiskStats {
    corrupt: AtomicU64,
}

impl DiskStats {
    /// Corrupt blocks found since boot.
    pub fn corrupt_blocks(&self) -> u64 {
        self.corrupt.load(Relaxed)
    }
}

/// The device the workload writes: `walkabout.disk=` on `cmdline`, else the first
/// virtio disk among `devices` (names in /sys/block) that is not the `root=` device.
pub fn choose_device(cmdline: &str, devices: &[String]) -> Option<PathBuf> {
    let param = |name: &str| {
        cmdline.split_ascii_whitespace().filter_map(|w| w.strip_prefix(name)?.strip_prefix('=')).next_back().map(str::to_owned)
    };
    if let Some(dev) = param(DISK_PARAM) {
        return Some(PathBuf::from(dev));
    }
    let root = param("root").unwrap_or_default();
    let root = root.strip_prefix("/dev/").unwrap_or(&root);
    let mut candidates: Vec<&String> =
        devices.iter().filter(|d| (d.starts_with("vd") || d.starts_with("sd")) && d.as_str() != root).collect();
    // vd* before sd*, each in name order (vda, vdb, ..., sda, ...).
    candidates.sort_by_key(|d| (!d.starts_with("vd"), d.len(), d.as_str()));
    candidates.first().map(|d| PathBuf::from(format!("/dev/{d}")))
}

/// The disk workload on one open device.
pub struct DiskWorkload {
    file: File,
    /// Where it runs (for messages).
    pub device: PathBuf,
    blocks: u64,
    load: Load,
    /// Generation last written (or adopted) per block; [`SKIP`] for a block already
    /// reported corrupt and not rewritten since.
    expected: Vec<u64>,
    /// Shared with the heartbeat.
    pub stats: std::sync::Arc<DiskStats>,
}

/// Marks a block already reported corrupt, so it is counted once until rewritten.
const SKIP: u64 = u64::MAX;

impl DiskWorkload {
    /// Opens `device` (`O_DIRECT`, falling back to buffered I/O where the file system
    /// refuses it, as tmpfs does for a file on the host) and checks it holds `load.mib`.
    pub fn open(device: &Path, load: Load) -> Result<DiskWorkload, String> {
        let open = |flags: i32| OpenOptions::new().read(true).write(true).custom_flags(flags).open(device);
        let file = match open(O_DIRECT) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(22) => open(0).map_err(|e| format!("cannot open {}: {e}", device.display()))?,
            Err(e) => return Err(format!("cannot open {}: {e}", device.display())),
        };
        let size = device_size(&file, device).map_err(|e| format!("cannot size {}: {e}", device.display()))?;
        let want = u64::from(load.mib) << 20;
        if size < want {
            return Err(format!("disk workload needs {} MiB but {} holds only {} MiB", load.mib, device.display(), size >> 20));
        }
        let blocks = want / BLOCK_SIZE as u64;
        let len = usize::try_from(blocks).map_err(|_| "disk area too large".to_owned())?;
        Ok(DiskWorkload { file, device: device.to_owned(), blocks, load, expected: vec![0; len], stats: Default::default() })
    }

    /// Blocks in the area.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn idx(i: u64) -> usize {
        usize::try_from(i).unwrap_or(usize::MAX)
    }

    /// Reports one corrupt block (once until it is rewritten).
    fn corrupt(&mut self, index: u64, why: &str, say: &dyn Fn(String)) {
        self.stats.corrupt.fetch_add(1, Relaxed);
        self.expected[Self::idx(index)] = SKIP;
        say(format!("CORRUPT block={index} dev={} {why}", self.device.display()));
    }

    /// Reads `count` blocks from `first` into `buf` and checks each; with `adopt`, an
    /// intact block of ours is taken as it is (the start-up read of an earlier run).
    fn check_range(&mut self, buf: &mut Aligned, first: u64, count: usize, adopt: bool, say: &dyn Fn(String)) -> io::Result<u64> {
        let bytes = buf.blocks(count);
        self.file.read_exact_at(bytes, first * BLOCK_SIZE as u64)?;
        let mut adopted = 0;
        let mut bad: Vec<(u64, String)> = Vec::new();
        for (k, block) in bytes.chunks_exact(BLOCK_SIZE).enumerate() {
            let index = first + k as u64;
            let expected = self.expected[Self::idx(index)];
            if adopt {
                match inspect(block) {
                    Found::Blank => {}
                    Found::Block { index: i, generation } if i == index => {
                        self.expected[Self::idx(index)] = generation;
                        adopted += 1;
                    }
                    _ => bad.push((index, verify(block, index, 0).err().unwrap_or_default())),
                }
            } else if expected != SKIP {
                if let Err(why) = verify(block, index, expected) {
                    bad.push((index, why));
                }
            }
        }
        for (index, why) in bad {
            self.corrupt(index, &why, say);
        }
        Ok(adopted)
    }

    /// Reads the whole area once, adopting intact blocks of an earlier run; returns how
    /// many it adopted.
    pub fn adopt(&mut self, say: &dyn Fn(String)) -> io::Result<u64> {
        let mut buf = Aligned::new(CHUNK_BLOCKS);
        let mut adopted = 0;
        let mut at = 0;
        while at < self.blocks {
            let n = usize::try_from((self.blocks - at).min(CHUNK_BLOCKS as u64)).unwrap_or(CHUNK_BLOCKS);
            adopted += self.check_range(&mut buf, at, n, true, say)?;
            at += n as u64;
        }
        Ok(adopted)
    }

    /// Writes `count` blocks from `first` with their next generation.
    fn write_range(&mut self, buf: &mut Aligned, first: u64, count: usize) -> io::Result<()> {
        let bytes = buf.blocks(count);
        for (k, block) in bytes.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            let i = Self::idx(first + k as u64);
            let next = match self.expected[i] {
                SKIP => 1,
                g => g + 1,
            };
            fill(block, first + k as u64, next);
            self.expected[i] = next;
        }
        self.file.write_all_at(bytes, first * BLOCK_SIZE as u64)
    }

    /// Runs forever: writes at the workload's rate and sweeps the written blocks at the
    /// same rate, reporting corrupt blocks through `say`; `now_ns` is a monotonic clock.
    pub fn run(mut self, say: &dyn Fn(String), now_ns: &dyn Fn() -> u64) -> io::Error {
        use crate::pacing::{Pacer, Step};
        let start = now_ns();
        let (mut writes, mut reads) = (Pacer::new(self.load.rate_mib_s, start), Pacer::new(self.load.rate_mib_s, start));
        let (mut wbuf, mut rbuf) = (Aligned::new(CHUNK_BLOCKS), Aligned::new(CHUNK_BLOCKS));
        let (mut wat, mut rat, mut last_sync) = (0u64, 0u64, start);
        loop {
            let now = now_ns();
            let mut idle = None;
            match writes.next(now) {
                Step::Write(n) => {
                    let n = n.min(CHUNK_BLOCKS as u64).min(self.blocks - wat);
                    if let Err(e) = self.write_range(&mut wbuf, wat, usize::try_from(n).unwrap_or(1)) {
                        return e;
                    }
                    writes.wrote(n);
                    wat = (wat + n) % self.blocks;
                }
                Step::Sleep(d) => idle = Some(d),
            }
            match reads.next(now) {
                Step::Write(n) => {
                    let n = n.min(CHUNK_BLOCKS as u64).min(self.blocks - rat);
                    if let Err(e) = self.check_range(&mut rbuf, rat, usize::try_from(n).unwrap_or(1), false, say) {
                        return e;
                    }
                    reads.wrote(n);
                    rat = (rat + n) % self.blocks;
                    idle = None;
                }
                Step::Sleep(d) => idle = idle.map(|i: std::time::Duration| i.min(d)),
            }
            // Each second, ask the virtual disk to make the writes durable.
            if now.saturating_sub(last_sync) >= 1_000_000_000 {
                if let Err(e) = self.file.sync_data() {
                    return e;
                }
                last_sync = now;
            }
            if let Some(d) = idle {
                std::thread::sleep(d);
            }
        }
    }
}

/// Size of a block device or file, in bytes (`lseek` to the end works for both).
fn device_size(file: &File, device: &Path) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let name = device.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if let Ok(sectors) = std::fs::read_to_string(format!("/sys/block/{name}/size")) {
        if let Ok(s) = sectors.trim().parse::<u64>() {
            return Ok(s * 512);
        }
    }
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(index: u64, generation: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        fill(&mut b, index, generation);
        b
    }

    #[test]
    fn a_written_block_verifies_as_itself() {
        let b = block(7, 3);
        assert_eq!(inspect(&b), Found::Block { index: 7, generation: 3 });
        assert_eq!(verify(&b, 7, 3), Ok(()));
    }

    #[test]
    fn a_flipped_byte_anywhere_is_detected() {
        for at in [0, 8, 16, 24, 100, BLOCK_SIZE - 1] {
            let mut b = block(7, 3);
            b[at] ^= 0x01;
            assert!(verify(&b, 7, 3).is_err(), "flip at {at} not detected");
        }
    }

    #[test]
    fn a_stale_misplaced_or_zeroed_block_is_detected() {
        assert!(verify(&block(7, 2), 7, 3).expect_err("must be refused").contains("generation 2"));
        assert!(verify(&block(8, 3), 7, 3).expect_err("must be refused").contains("holds block 8"));
        assert!(verify(&vec![0u8; BLOCK_SIZE], 7, 3).expect_err("must be refused").contains("zeroed"));
        assert_eq!(verify(&vec![0u8; BLOCK_SIZE], 7, 0), Ok(()));
    }

    #[test]
    fn aligned_buffers_are_aligned_for_o_direct() {
        let mut a = Aligned::new(2);
        let s = a.blocks(2);
        assert_eq!((s.as_ptr() as usize % BLOCK_SIZE, s.len()), (0, 2 * BLOCK_SIZE));
    }

    #[test]
    fn the_device_is_the_param_else_the_first_virtio_disk_not_the_root() {
        let devs: Vec<String> = ["sda", "vdb", "vda", "loop0"].iter().map(|s| s.to_string()).collect();
        assert_eq!(choose_device("quiet walkabout.disk=/dev/sda", &devs), Some(PathBuf::from("/dev/sda")));
        assert_eq!(choose_device("root=/dev/vda quiet", &devs), Some(PathBuf::from("/dev/vdb")));
        assert_eq!(choose_device("quiet", &devs), Some(PathBuf::from("/dev/vda")));
        assert_eq!(choose_device("quiet", &["loop0".to_string()]), None);
    }
}

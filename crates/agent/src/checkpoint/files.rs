//! Checkpoint files on disk: their SHA-256, and the two encodings a file travels in
//! to a replica (see [`Encoding`](walkabout_api::Encoding)): the data extents of a sparse
//! file (holes skipped, found with `SEEK_DATA`/`SEEK_HOLE`), and a delta against an
//! older file the replica holds (fixed chunks compared, only the changed ones sent).
//!
//! Both are frames of `[offset u64 LE][length u32 LE][bytes]`, ending with a frame of
//! length 0 whose offset is the file's size.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Chunk size of memory deltas: a chunk that differs from the base's is sent whole.
pub const DELTA_CHUNK: usize = 64 * 1024;

/// Largest frame a sender makes (and a receiver accepts).
const MAX_FRAME: usize = 4 << 20;

/// Runs heavy synchronous file work (hashing, encoding, sparse copies) without stalling
/// the agent's other requests: on a multi-threaded runtime the worker first hands its
/// other tasks to the rest of the pool (tokio's `block_in_place`); elsewhere (a
/// single-threaded test runtime, no runtime) it simply runs. Without it a checkpoint of a
/// big guest kept the agent from answering its controller, which then fenced it.
pub fn heavy<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The SHA-256 of a whole file, hex, and its length.
pub fn sha256(path: &Path) -> std::io::Result<(String, u64)> {
    heavy(|| {
        let mut f = File::open(path)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            len += n as u64;
        }
        Ok((hex(ctx.finish().as_ref()), len))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The data extents of a file: `(offset, length)` of every range that is not a hole.
pub fn data_extents(f: &File) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let size = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = vec![];
    let mut pos: i64 = 0;
    let end = i64::try_from(size).unwrap_or(i64::MAX);
    while pos < end {
        // SAFETY: lseek on a descriptor this function borrows from a live File.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push((u64::try_from(data).unwrap_or(0), u64::try_from(hole - data).unwrap_or(0)));
        pos = hole;
    }
    Ok(out)
}

/// Bytes of a file that hold data (its allocated extents).
pub fn data_bytes(path: &Path) -> std::io::Result<u64> {
    Ok(data_extents(&File::open(path)?)?.iter().map(|e| e.1).sum())
}

fn frame(out: &mut Vec<u8>, offset: u64, data: &[u8]) {
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(data);
}

/// A sparse file as extents: only its data travels.
pub fn encode_extents(path: &Path) -> std::io::Result<Vec<u8>> {
    heavy(|| {
        let f = File::open(path)?;
        let size = f.metadata()?.len();
        let mut out = vec![];
        let mut buf = vec![0u8; MAX_FRAME];
        for (mut off, mut len) in data_extents(&f)? {
            while len > 0 {
                let n = usize::try_from(len).unwrap_or(MAX_FRAME).min(MAX_FRAME);
                f.read_exact_at(&mut buf[..n], off)?;
                // Data extents of a file system may still hold zeros (preallocated): skip
                // whole zero pages, the receiver's file is sparse there.
                push_nonzero(&mut out, off, &buf[..n]);
                off += n as u64;
                len -= n as u64;
            }
        }
        frame(&mut out, size, &[]);
        Ok(out)
    })
}

/// A page of zeros, to compare pages against.
static ZERO_PAGE: [u8; 4096] = [0; 4096];

/// Frames of `data` at `off`, leaving out 4 KiB pages that are all zeros.
fn push_nonzero(out: &mut Vec<u8>, off: u64, data: &[u8]) {
    const PAGE: usize = 4096;
    let mut start: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let end = (i + PAGE).min(data.len());
        // A slice comparison (memcmp), fast even unoptimized.
        let zero = data[i..end] == ZERO_PAGE[..end - i];
        match (zero, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                frame(out, off + s as u64, &data[s..i]);
                start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = start {
        frame(out, off + s as u64, &data[s..]);
    }
}

/// The SHA-256 of each [`DELTA_CHUNK`] of a file (a chunk past the end hashes as empty).
pub fn chunk_hashes(path: &Path) -> std::io::Result<Vec<[u8; 32]>> {
    heavy(|| {
        let mut f = File::open(path)?;
        let mut out = vec![];
        let mut buf = vec![0u8; DELTA_CHUNK];
        loop {
            let n = read_full(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            let d = ring::digest::digest(&ring::digest::SHA256, &buf[..n]);
            let mut h = [0u8; 32];
            h.copy_from_slice(d.as_ref());
            out.push(h);
            if n < DELTA_CHUNK {
                break;
            }
        }
        Ok(out)
    })
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// `path` as a delta against a file whose chunk hashes are `base`: every chunk that
/// differs is sent whole (zeros too: the receiver starts from a copy of the base).
pub fn encode_delta(path: &Path, base: &[[u8; 32]]) -> std::io::Result<Vec<u8>> {
    heavy(|| {
        let mut f = File::open(path)?;
        let size = f.metadata()?.len();
        let mut out = vec![];
        let mut buf = vec![0u8; DELTA_CHUNK];
        let mut idx = 0usize;
        loop {
            let n = read_full(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            let d = ring::digest::digest(&ring::digest::SHA256, &buf[..n]);
            if base.get(idx).map(|h| h.as_slice()) != Some(d.as_ref()) {
                frame(&mut out, (idx * DELTA_CHUNK) as u64, &buf[..n]);
            }
            idx += 1;
            if n < DELTA_CHUNK {
                break;
            }
        }
        frame(&mut out, size, &[]);
        Ok(out)
    })
}

/// Writes frames read from `body` into `f` (already holding the base for a delta, or
/// empty), then sets its length to the size the last frame gives.
pub fn apply_frames(f: &File, body: &mut impl Read) -> std::io::Result<u64> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut head = [0u8; 12];
    let mut buf = vec![];
    loop {
        body.read_exact(&mut head).map_err(|_| bad("the frames end before their final frame"))?;
        let mut o = [0u8; 8];
        o.copy_from_slice(&head[..8]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&head[8..]);
        let (off, len) = (u64::from_le_bytes(o), u32::from_le_bytes(l) as usize);
        if len == 0 {
            f.set_len(off)?;
            return Ok(off);
        }
        if len > MAX_FRAME {
            return Err(bad("a frame is larger than 4 MiB"));
        }
        buf.resize(len, 0);
        body.read_exact(&mut buf).map_err(|_| bad("a frame is shorter than its header says"))?;
        f.write_all_at(&buf, off)?;
    }
}

/// Copies `from` to `to`, keeping holes (a delta's starting point).
pub fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    heavy(|| {
        let src = File::open(from)?;
        let mut dst = File::create(to)?;
        let size = src.metadata()?.len();
        let mut buf = vec![0u8; MAX_FRAME];
        for (mut off, mut len) in data_extents(&src)? {
            while len > 0 {
                let n = usize::try_from(len).unwrap_or(MAX_FRAME).min(MAX_FRAME);
                src.read_exact_at(&mut buf[..n], off)?;
                dst.seek(SeekFrom::Start(off))?;
                dst.write_all(&buf[..n])?;
                off += n as u64;
                len -= n as u64;
            }
        }
        dst.set_len(size)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("wa-ckfiles-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn extents_and_deltas_rebuild_the_file_exactly() {
        let (a, b, out) = (tmp("a"), tmp("b"), tmp("out"));
        // A sparse file: data at 0 and at 1 MiB, a hole between, 4 MiB long.
        let f = File::create(&a).expect("create");
        f.write_all_at(&[7u8; 5000], 0).expect("write");
        f.write_all_at(&[9u8; 70000], 1 << 20).expect("write");
        f.set_len(4 << 20).expect("len");
        let ext = encode_extents(&a).expect("encode");
        assert!(ext.len() < 90_000, "holes are not sent: {} bytes", ext.len());
        let o = File::create(&out).expect("out");
        assert_eq!(apply_frames(&o, &mut ext.as_slice()).expect("apply"), 4 << 20);
        assert_eq!(sha256(&out).expect("sha"), sha256(&a).expect("sha"));

        // b = a with one byte changed and a shorter length: the delta is one chunk.
        std::fs::copy(&a, &b).expect("copy");
        let g = std::fs::OpenOptions::new().write(true).open(&b).expect("open");
        g.write_all_at(&[1u8], (1 << 20) + 10).expect("write");
        g.set_len(3 << 20).expect("len");
        let delta = encode_delta(&b, &chunk_hashes(&a).expect("hashes")).expect("delta");
        assert!(delta.len() < DELTA_CHUNK + 64, "one chunk: {} bytes", delta.len());
        copy_sparse(&a, &out).expect("copy");
        let o = std::fs::OpenOptions::new().write(true).open(&out).expect("open");
        apply_frames(&o, &mut delta.as_slice()).expect("apply");
        assert_eq!(sha256(&out).expect("sha"), sha256(&b).expect("sha"));
        for p in [a, b, out] {
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn a_truncated_body_is_refused() {
        let a = tmp("t");
        let o = File::create(&a).expect("create");
        let mut body = vec![];
        frame(&mut body, 0, &[1, 2, 3]);
        assert!(apply_frames(&o, &mut body.as_slice()).is_err());
        std::fs::remove_file(a).ok();
    }
}

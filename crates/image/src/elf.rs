//! Just enough of the ELF format to tell whether an executable is statically linked.
//! Shared with build.rs (included there with `#[path]`), so it depends on nothing else.

/// Program header type of the dynamic loader request.
const PT_INTERP: u32 = 3;

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `bytes` is a little-endian 64-bit ELF executable that needs no dynamic
/// loader (no `PT_INTERP` program header): `None` if it is not such an ELF file at all.
pub fn is_static_elf64(bytes: &[u8]) -> Option<bool> {
    if bytes.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(read_u64(bytes, 0x20)?).ok()?;
    let phentsize = usize::from(read_u16(bytes, 0x36)?);
    let phnum = usize::from(read_u16(bytes, 0x38)?);
    let mut has_interp = false;
    for i in 0..phnum {
        let p_type = read_u32(bytes, phoff.checked_add(i.checked_mul(phentsize)?)?)?;
        has_interp |= p_type == PT_INTERP;
    }
    Some(!has_interp)
}

/// Program header type of a notes segment.
const PT_NOTE: u32 = 4;
/// ELF machine number of x86-64.
const EM_X86_64: u16 = 62;
/// Xen ELF note type giving the 32-bit PVH entry point, which QEMU's `-kernel` uses to
/// boot an uncompressed `vmlinux` directly.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Where to find the notes segments of a 64-bit ELF file from its first bytes: `(offset,
/// size)` of each `PT_NOTE` segment, or `None` if `head` is not the start of a
/// little-endian x86-64 ELF file (or its program headers are not within `head`).
pub fn note_segments(head: &[u8]) -> Option<Vec<(u64, u64)>> {
    if head.get(..6)? != b"\x7fELF\x02\x01" || read_u16(head, 0x12)? != EM_X86_64 {
        return None;
    }
    let phoff = usize::try_from(read_u64(head, 0x20)?).ok()?;
    let phentsize = usize::from(read_u16(head, 0x36)?);
    let phnum = usize::from(read_u16(head, 0x38)?);
    let mut notes = Vec::new();
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if read_u32(head, at)? == PT_NOTE {
            notes.push((read_u64(head, at + 0x08)?, read_u64(head, at + 0x20)?));
        }
    }
    Some(notes)
}

/// Whether a notes segment holds Xen's PVH entry point note.
pub fn has_pvh_entry_note(notes: &[u8]) -> bool {
    let mut at = 0usize;
    while let (Some(namesz), Some(descsz), Some(kind)) = (read_u32(notes, at), read_u32(notes, at + 4), read_u32(notes, at + 8)) {
        let (Ok(namesz), Ok(descsz)) = (usize::try_from(namesz), usize::try_from(descsz)) else {
            return false;
        };
        let name_at = at + 12;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes.get(name_at..name_at + namesz) == Some(b"Xen\0") {
            return true;
        }
        at = name_at + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
    }
    false
}

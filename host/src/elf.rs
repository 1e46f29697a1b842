//! A sanity check of a shared library's ELF structure before any process maps it: the dynamic
//! loader answers a truncated file with SIGBUS rather than an error, so the host looks first.

use std::path::Path;

/// What is wrong with the file, in words for the operator.
pub type Malformed = String;

const PT_LOAD: u32 = 1;
const ET_DYN: u16 = 3;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Checks that `path` is a little-endian 64-bit ELF shared object whose headers and loadable
/// segments all lie inside the file.
pub fn check_shared_object(path: &Path) -> Result<(), Malformed> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    check_bytes(&bytes)
}

/// [`check_shared_object`] of bytes already read.
pub fn check_bytes(b: &[u8]) -> Result<(), Malformed> {
    let size = b.len() as u64;
    if b.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file (no ELF magic number)".into());
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not a little-endian 64-bit ELF file".into());
    }
    let truncated = || format!("truncated: the file has only {size} bytes");
    if u16_at(b, 0x10).ok_or_else(truncated)? != ET_DYN {
        return Err("an ELF file, but not a shared library".into());
    }
    // Saturating: a hostile header's offsets overflowed (a panic in debug builds, a wrapped sum
    // passing the check in release).
    let table_end = |off: u64, entsize: u16, count: u16| {
        off.saturating_add(u64::from(entsize) * u64::from(count))
    };
    let phoff = u64_at(b, 0x20).ok_or_else(truncated)?;
    let (phentsize, phnum) = (
        u16_at(b, 0x36).ok_or_else(truncated)?,
        u16_at(b, 0x38).ok_or_else(truncated)?,
    );
    let shoff = u64_at(b, 0x28).ok_or_else(truncated)?;
    let (shentsize, shnum) = (
        u16_at(b, 0x3a).ok_or_else(truncated)?,
        u16_at(b, 0x3c).ok_or_else(truncated)?,
    );
    for (what, end) in [
        ("program header table", table_end(phoff, phentsize, phnum)),
        ("section header table", table_end(shoff, shentsize, shnum)),
    ] {
        if end > size {
            return Err(format!(
                "truncated: its {what} ends at byte {end}, but the file has {size} bytes"
            ));
        }
    }
    for i in 0..u64::from(phnum) {
        let ph = (phoff + i * u64::from(phentsize)) as usize;
        if u32_at(b, ph).ok_or_else(truncated)? != PT_LOAD {
            continue;
        }
        let end = (u64_at(b, ph + 0x08).ok_or_else(truncated)?)
            .saturating_add(u64_at(b, ph + 0x20).ok_or_else(truncated)?);
        if end > size {
            return Err(format!(
                "truncated: segment {i} ends at byte {end}, but the file has {size} bytes"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_test_binary() -> Vec<u8> {
        // A PIE executable is ET_DYN too: a real, well-formed ELF file to cut up.
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn a_real_elf_object_passes() {
        let bytes = this_test_binary();
        if u16_at(&bytes, 0x10) == Some(ET_DYN) {
            check_bytes(&bytes).unwrap();
        }
    }

    #[test]
    fn truncation_is_named_with_sizes() {
        let bytes = this_test_binary();
        let e = check_bytes(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(
            e.starts_with("truncated") || e.contains("not a shared library"),
            "{e}"
        );
    }

    /// Offsets near u64::MAX are refused as past the end, not summed into an overflow.
    #[test]
    fn offsets_that_overflow_are_refused() {
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x10..0x12].copy_from_slice(&ET_DYN.to_le_bytes());
        header[0x20..0x28].copy_from_slice(&(u64::MAX - 15).to_le_bytes());
        header[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        header[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        let e = check_bytes(&header).unwrap_err();
        assert!(e.contains("program header table"), "{e}");
    }

    #[test]
    fn other_files_are_not_elf() {
        let e = check_bytes(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(e.contains("not an ELF file"), "{e}");
    }
}

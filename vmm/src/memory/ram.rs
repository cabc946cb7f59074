//! Creating guest RAM: anonymous, `MAP_NORESERVE` mappings (vm-memory's
//! default), kept at 4 KiB host pages unless huge pages are asked for, so
//! residency counts what the guest touched; and mapping a file's pages over
//! part of it, copy-on-write ([`map_file`], how the kernel's segments are
//! shared between VMs), or fresh memory back ([`map_anonymous`]).

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Why guest RAM could not be mapped.
#[derive(Debug, thiserror::Error)]
#[error("cannot map {mib} MiB of guest RAM")]
pub struct RamError {
    mib: u64,
    #[source]
    source: vm_memory::mmap::FromRangesError,
}

/// Maps guest RAM for `ranges`; with `huge_pages` the host may back it with
/// transparent huge pages, otherwise it is kept at 4 KiB pages.
pub fn create_ram(ranges: &[(GuestAddress, u64)], huge_pages: bool) -> Result<GuestMemoryMmap, RamError> {
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let ranges: Vec<(GuestAddress, usize)> = ranges.iter().map(|(a, l)| (*a, *l as usize)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| RamError { mib: total >> 20, source })?;
    let advice = if huge_pages { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
    for region in mem.iter() {
        // SAFETY: the range is exactly one mapping owned by `mem`; madvise only
        // changes how the kernel backs it and cannot invalidate it. Failure
        // (e.g. a kernel without THP) leaves the default, which is harmless.
        unsafe {
            libc::madvise(region.as_ptr().cast(), region.len() as usize, advice);
        }
    }
    Ok(mem)
}

/// Total bytes of guest RAM.
pub fn ram_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// One past the highest guest-physical address of RAM.
pub fn ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0)
}

/// Why a file could not be mapped over guest RAM, or fresh memory put back.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{len:#x} bytes at {gpa:#x} are not whole host pages inside one region of guest RAM")]
    Range { gpa: u64, len: u64 },
    #[error("cannot map {len:#x} bytes over guest RAM at {gpa:#x}")]
    Mmap {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Host page size that guest RAM is mapped in (huge pages are never overlaid).
const HOST_PAGE: u64 = 4096;

/// The host address of `[gpa, gpa + len)`, if it is whole host pages inside
/// one region of `mem`.
fn host_range(mem: &GuestMemoryMmap, gpa: GuestAddress, len: u64) -> Result<*mut u8, OverlayError> {
    let bad = || OverlayError::Range { gpa: gpa.0, len };
    if len == 0 || !gpa.0.is_multiple_of(HOST_PAGE) || !len.is_multiple_of(HOST_PAGE) {
        return Err(bad());
    }
    let region = mem.find_region(gpa).ok_or_else(bad)?;
    let offset = gpa.0 - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad());
    }
    // The offset is inside the region (checked above), so this stays inside
    // its mapping; `wrapping_add` needs no unsafe and cannot wrap here.
    let host = region.as_ptr().wrapping_add(offset as usize);
    if !(host as u64).is_multiple_of(HOST_PAGE) {
        return Err(bad());
    }
    Ok(host)
}

/// Maps `len` bytes of `file` from `offset` over guest RAM at `gpa`,
/// private and copy-on-write (`MAP_PRIVATE | MAP_FIXED`): the guest reads
/// the file's page-cache pages, shared with every other process that maps
/// them, and a page it writes becomes its own anonymous copy. The file is
/// never written. `[gpa, gpa + len)` must be whole host pages of one region,
/// and `offset` page-aligned.
///
/// Call it before the range is registered with KVM or any vCPU runs. The
/// pages read what the file holds when they are first touched, so the file
/// must not change meanwhile (the loader checks the bytes after mapping,
/// and maps only the running binary, which cannot be written); a file
/// truncated under the
/// mapping makes later accesses fault (`SIGBUS` in the VMM, `EFAULT` from
/// `KVM_RUN`).
pub fn map_file(
    mem: &GuestMemoryMmap,
    gpa: GuestAddress,
    len: u64,
    file: &std::fs::File,
    offset: u64,
) -> Result<(), OverlayError> {
    use std::os::fd::AsRawFd;
    let host = host_range(mem, gpa, len)?;
    let (Ok(file_offset), true) = (libc::off_t::try_from(offset), offset.is_multiple_of(HOST_PAGE)) else {
        return Err(OverlayError::Range { gpa: gpa.0, len });
    };
    // SAFETY: `[host, host + len)` is whole pages inside one mapping that
    // `mem` owns (`host_range`): an anonymous, private, read-write mapping
    // of vm-memory's. MAP_FIXED replaces those pages in one step with a
    // private read-write mapping of the same length, so every address
    // vm-memory hands out stays mapped, readable and writable, and the
    // region's drop still unmaps the whole range, this mapping included.
    // Only the contents change, and nothing holds a Rust reference into
    // guest memory (it is read and written through vm-memory's volatile
    // accessors only). The file is opened read-only and mapped MAP_PRIVATE,
    // so no write through the mapping (by the VMM or the guest) reaches the
    // file or the page cache: a written page is copied first.
    let at = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            file_offset,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(OverlayError::Mmap { gpa: gpa.0, len, source: std::io::Error::last_os_error() });
    }
    debug_assert_eq!(at, host.cast());
    Ok(())
}

/// Puts fresh anonymous memory (reading as zero, kept at 4 KiB pages) back
/// over `[gpa, gpa + len)`, as [`create_ram`] made it: undoes [`map_file`].
pub fn map_anonymous(mem: &GuestMemoryMmap, gpa: GuestAddress, len: u64) -> Result<(), OverlayError> {
    let host = host_range(mem, gpa, len)?;
    // SAFETY: as in `map_file`: whole pages inside one mapping `mem` owns,
    // replaced in one step by a private read-write mapping of the same
    // length (anonymous, as vm-memory made it), so the region stays valid
    // and its drop unmaps it. Only the contents change (to zero).
    let at = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(OverlayError::Mmap { gpa: gpa.0, len, source: std::io::Error::last_os_error() });
    }
    // SAFETY: the range is the mapping just made; madvise only changes how
    // the kernel backs it (as `create_ram` does) and failure is harmless.
    unsafe {
        libc::madvise(host.cast(), len as usize, libc::MADV_NOHUGEPAGE);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_mapped_region_by_region() {
        let mem = create_ram(&[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)], false).unwrap();
        assert_eq!(ram_bytes(&mem), 3 << 20);
        assert_eq!(ram_end(&mem), 6 << 20);
    }

    #[test]
    fn a_file_mapped_over_ram_reads_as_the_file_until_written_and_can_be_undone() {
        use vm_memory::Bytes;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 3 * 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mem = create_ram(&[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)], false).unwrap();
        let at = GuestAddress(0x2000);
        map_file(&mem, at, 0x2000, &file, 0x1000).unwrap();
        assert_eq!(mem.read_obj::<u8>(at).unwrap(), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 0, "only the range is mapped");
        mem.write_obj(9u8, at).unwrap();
        assert_eq!(mem.read_obj::<u8>(at).unwrap(), 9);
        assert_eq!(std::fs::read(&path).unwrap(), [7u8; 3 * 4096], "private: the file is not written");
        map_anonymous(&mem, at, 0x2000).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        // Partial pages, a range across a region's end or outside RAM.
        for (gpa, len, offset) in [
            (0x2001, 0x1000, 0),
            (0x2000, 0x800, 0),
            ((1 << 20) - 0x1000, 0x2000, 0),
            (2 << 20, 0x1000, 0),
            (0x2000, 0x1000, 0x10),
        ] {
            let e = map_file(&mem, GuestAddress(gpa), len, &file, offset).unwrap_err();
            assert!(matches!(e, OverlayError::Range { .. }), "{gpa:#x}+{len:#x}: {e}");
        }
    }
}

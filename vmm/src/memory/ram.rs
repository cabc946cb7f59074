//! Creating guest RAM: anonymous, `MAP_NORESERVE` mappings (vm-memory's
//! default), kept at 4 KiB host pages unless huge pages are asked for, so
//! residency counts what the guest touched.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_mapped_region_by_region() {
        let mem = create_ram(&[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)], false).unwrap();
        assert_eq!(ram_bytes(&mem), 3 << 20);
        assert_eq!(ram_end(&mem), 6 << 20);
    }
}

//! The guest's memmap layout rules, in one place: the guest kernel places
//! its memmap with these functions (`guest-kernel/src/mm/memmap.rs`), and
//! the VMM computes with the same ones what an `ondemand` guest onlines
//! while it boots ([`ondemand_boot_ranges`]), so that it can register that
//! memory before the vCPU first runs and say so in the boot data
//! ([`crate::BootOnline`]).
//!
//! Physical memory is cut into sections (`section_bytes`) and sections into
//! chunks (`chunk_bytes`). A section that holds RAM gets memmap for its
//! *span*, from the section start to the end of its last RAM chunk
//! ([`section_span`]), 64 bytes per page in whole pages ([`memmap_bytes`]).
//! The memmap is either one array of every section's memmap in section
//! order, at the first fit after the highest reserved range below 4 GiB
//! ([`memmap_array_start`]), or (`on_memory`) each section's at the first
//! fit inside the section ([`first_fit`]).
//!
//! Every function takes RAM and reserved ranges as the guest normalizes
//! them: page-aligned `[start, start + len)` ranges, sorted by start,
//! disjoint (RAM rounded inward, reserved memory outward). Nothing here
//! panics on any input; a layout that does not fit gives `None`.

use crate::{GpaRange, PAGE_SIZE, STRUCT_PAGE_SIZE};

const FOUR_GIB: u64 = 4 << 30;

/// Most sections the guest's memmap has (its fixed-size tables); a layout
/// with more fails the guest's initialization.
pub const MAX_SECTIONS: usize = 4096;

/// How the memmap is cut and placed (the guest's `memmap_chunk=`, its
/// section size and `memmap_on_memory=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapGeometry {
    /// Memory covered by one chunk (a power of two, a page at least).
    pub chunk_bytes: u64,
    /// Memory covered by one section (a power-of-two multiple of the chunk).
    pub section_bytes: u64,
    /// Each section's memmap inside the section, not one array.
    pub on_memory: bool,
}

impl MemmapGeometry {
    /// Whether the sizes are ones the guest accepts: powers of two, chunk
    /// from a page up to the section.
    pub const fn is_valid(&self) -> bool {
        self.chunk_bytes.is_power_of_two()
            && self.section_bytes.is_power_of_two()
            && self.chunk_bytes >= PAGE_SIZE
            && self.chunk_bytes <= self.section_bytes
    }
}

fn end(r: &GpaRange) -> u64 {
    r.start.saturating_add(r.len)
}

/// Bytes of memmap for `span` bytes of memory: one struct page per page,
/// rounded up to whole pages.
pub const fn memmap_bytes(span: u64) -> u64 {
    (span / PAGE_SIZE * STRUCT_PAGE_SIZE).next_multiple_of(PAGE_SIZE)
}

/// The span of section `sec`: bytes from its start to the end of its last
/// RAM chunk; 0 if it holds no RAM.
pub fn section_span(ram: &[GpaRange], g: &MemmapGeometry, sec: u64) -> u64 {
    let Some(lo) = sec.checked_mul(g.section_bytes) else { return 0 };
    let hi = lo.saturating_add(g.section_bytes);
    ram.iter()
        .filter(|r| r.len > 0 && r.start < hi && end(r) > lo)
        .map(|r| (end(r).min(hi) - lo).next_multiple_of(g.chunk_bytes))
        .max()
        .unwrap_or(0)
}

/// Sections up to the end of RAM.
pub fn section_count(ram: &[GpaRange], g: &MemmapGeometry) -> u64 {
    ram.iter().map(end).max().unwrap_or(0).div_ceil(g.section_bytes)
}

/// The lowest `len` bytes of RAM in `[lo, hi)` that overlap no reserved
/// range and not `extra` (which may be empty).
fn fit(ram: &[GpaRange], reserved: &[GpaRange], extra: GpaRange, lo: u64, hi: u64, len: u64) -> Option<u64> {
    let mut cand = lo;
    'search: loop {
        let r = ram.iter().find(|r| end(r) > cand)?;
        cand = cand.max(r.start);
        let e = cand.checked_add(len)?;
        if e > hi {
            return None;
        }
        if e > end(r) {
            cand = end(r);
            continue;
        }
        for res in reserved.iter().chain(core::iter::once(&extra)) {
            if res.len > 0 && res.start < e && end(res) > cand {
                cand = end(res);
                continue 'search;
            }
        }
        return Some(cand);
    }
}

/// The lowest `len` bytes of RAM in `[lo, hi)` that overlap no reserved range.
pub fn first_fit(ram: &[GpaRange], reserved: &[GpaRange], lo: u64, hi: u64, len: u64) -> Option<u64> {
    fit(ram, reserved, GpaRange::default(), lo, hi, len)
}

/// Where the single memmap array of `len` bytes goes: the first fit in RAM
/// after the end of the highest reserved range below 4 GiB (after the
/// kernel image), below 4 GiB.
pub fn memmap_array_start(ram: &[GpaRange], reserved: &[GpaRange], len: u64) -> Option<u64> {
    let ram_end = ram.iter().map(end).max()?;
    let lo = reserved.iter().filter(|r| r.len > 0 && r.start < FOUR_GIB).map(end).max().unwrap_or(0);
    first_fit(ram, reserved, lo, FOUR_GIB.min(ram_end), len)
}

/// What an `ondemand` guest writes while it boots: the first chunk with a
/// page the allocator manages (RAM outside the reserved ranges and the
/// memmap), and that chunk's struct pages. `None` if the memmap does not
/// fit, RAM needs more than [`MAX_SECTIONS`] sections, or no page is free
/// (the guest then fails to boot anyway).
pub fn ondemand_boot_ranges(ram: &[GpaRange], reserved: &[GpaRange], g: &MemmapGeometry) -> Option<[GpaRange; 2]> {
    if !g.is_valid() {
        return None;
    }
    let sections = section_count(ram, g);
    if sections > MAX_SECTIONS as u64 {
        return None;
    }
    let array = if g.on_memory {
        GpaRange::default()
    } else {
        let len = (0..sections).map(|s| memmap_bytes(section_span(ram, g, s))).sum::<u64>();
        GpaRange { start: memmap_array_start(ram, reserved, len)?, len }
    };
    // The first section with a free page; with `on_memory`, every
    // section's memmap must fit too, or the guest does not boot.
    let mut first = None;
    let mut next_in_array = array.start;
    for sec in 0..sections {
        let span = section_span(ram, g, sec);
        if span == 0 {
            continue;
        }
        let (lo, len) = (sec * g.section_bytes, memmap_bytes(span));
        let memmap = if g.on_memory {
            GpaRange { start: first_fit(ram, reserved, lo, lo.saturating_add(g.section_bytes), len)?, len }
        } else {
            next_in_array += len;
            GpaRange { start: next_in_array - len, len }
        };
        if first.is_none() {
            let taken = if g.on_memory { memmap } else { array };
            first = fit(ram, reserved, taken, lo, lo.saturating_add(span), PAGE_SIZE).map(|page| (page, memmap, lo));
        }
        if first.is_some() && !g.on_memory {
            break;
        }
    }
    let (page, memmap, sec_start) = first?;
    let chunk = page - page % g.chunk_bytes;
    let pages = memmap.start + (chunk - sec_start) / PAGE_SIZE * STRUCT_PAGE_SIZE;
    Some([
        GpaRange { start: chunk, len: g.chunk_bytes },
        GpaRange { start: pages, len: g.chunk_bytes / PAGE_SIZE * STRUCT_PAGE_SIZE },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_CHUNK_SIZE, SECTION_SIZE};

    const MIB: u64 = 1 << 20;

    fn r(start: u64, len: u64) -> GpaRange {
        GpaRange { start, len }
    }

    /// RAM as the guest sees it from this VMM's e820 map for `mib`, page-rounded.
    fn pc_ram(mib: u64) -> [GpaRange; 3] {
        let low = r(0, 0x9f000);
        if mib <= 3072 {
            [low, r(MIB, mib * MIB - MIB), r(0, 0)]
        } else {
            [low, r(MIB, 3071 * MIB), r(4096 * MIB, (mib - 3072) * MIB)]
        }
    }

    fn reserved(kernel_end: u64) -> [GpaRange; 1] {
        // Low memory and the kernel, merged as the guest merges them.
        [r(0, kernel_end.next_multiple_of(PAGE_SIZE))]
    }

    const DEFAULT: MemmapGeometry = MemmapGeometry { chunk_bytes: DEFAULT_CHUNK_SIZE, section_bytes: SECTION_SIZE, on_memory: false };

    #[test]
    fn a_2_gib_guest_first_uses_the_chunk_after_its_memmap() {
        // 2 GiB: 16 sections of 2 MiB of memmap, after a kernel ending at
        // 5 MiB: the memmap ends at 37 MiB, in the chunk at 36 MiB, whose
        // struct pages are 18 chunks (576 KiB) into the array.
        let ram = pc_ram(2048);
        let got = ondemand_boot_ranges(&ram, &reserved(5 * MIB), &DEFAULT).unwrap();
        assert_eq!(got, [r(36 * MIB, 2 * MIB), r(5 * MIB + 576 * 1024, 32 * 1024)]);
        // A chunk-aligned end: the chunk that starts there.
        let got = ondemand_boot_ranges(&ram, &reserved(4 * MIB), &DEFAULT).unwrap();
        assert_eq!(got[0], r(36 * MIB, 2 * MIB));
        assert_eq!(memmap_array_start(&ram, &reserved(5 * MIB), 32 * MIB), Some(5 * MIB));
    }

    #[test]
    fn sections_past_the_hole_count_and_small_chunks_follow_their_memmap() {
        // 3.5 GiB: 24 sections below 3 GiB and 4 at 4 GiB, 2 MiB each.
        let got = ondemand_boot_ranges(&pc_ram(3584), &reserved(5 * MIB), &DEFAULT).unwrap();
        assert_eq!(got[0].start, 60 * MIB);
        // A small guest: 128 MiB, 2 MiB of memmap; 128 KiB chunks.
        let g = MemmapGeometry { chunk_bytes: 128 << 10, ..DEFAULT };
        let got = ondemand_boot_ranges(&pc_ram(128), &reserved(5 * MIB), &g).unwrap();
        assert_eq!(got, [r(7 * MIB, 128 << 10), r(5 * MIB + 112 * 1024, 2 * 1024)]);
    }

    #[test]
    fn memmap_on_memory_puts_the_first_chunk_after_the_first_sections_memmap() {
        // Section 0's 2 MiB of memmap sits right after the kernel (5 MiB),
        // so the first free page is at 7 MiB, in the chunk at 6 MiB, whose
        // struct pages are 3 chunks (96 KiB) into section 0's memmap.
        let g = MemmapGeometry { on_memory: true, ..DEFAULT };
        let got = ondemand_boot_ranges(&pc_ram(2048), &reserved(5 * MIB), &g).unwrap();
        assert_eq!(got, [r(6 * MIB, 2 * MIB), r(5 * MIB + 96 * 1024, 32 * 1024)]);
    }

    #[test]
    fn spans_end_at_the_last_ram_chunk_and_sections_without_ram_have_none() {
        let ram = [r(0, 16 * MIB), r(96 * MIB, 16 * MIB + 4096)];
        let g = MemmapGeometry { chunk_bytes: MIB, section_bytes: 32 * MIB, on_memory: false };
        assert_eq!(section_count(&ram, &g), 4);
        assert_eq!(section_span(&ram, &g, 0), 16 * MIB);
        assert_eq!(section_span(&ram, &g, 1), 0);
        assert_eq!(section_span(&ram, &g, 3), 17 * MIB);
        assert_eq!(section_span(&ram, &g, u64::MAX), 0);
        assert_eq!(memmap_bytes(17 * MIB), 17 * MIB / 64);
        assert_eq!(memmap_bytes(4096), 4096, "whole pages");
    }

    #[test]
    fn first_fit_skips_reserved_memory_and_ram_gaps() {
        let ram = [r(0, 4 * MIB), r(8 * MIB, 8 * MIB)];
        let res = [r(0, MIB), r(9 * MIB, MIB)];
        assert_eq!(first_fit(&ram, &res, 0, 16 * MIB, 2 * MIB), Some(MIB));
        assert_eq!(first_fit(&ram, &res, 0, 16 * MIB, 4 * MIB), Some(10 * MIB));
        assert_eq!(first_fit(&ram, &res, 0, 13 * MIB, 4 * MIB), None, "past `hi`");
        assert_eq!(first_fit(&ram, &res, 0, u64::MAX, u64::MAX), None, "no overflow");
    }

    #[test]
    fn layouts_that_do_not_fit_or_bad_geometry_give_nothing() {
        assert!(ondemand_boot_ranges(&pc_ram(16), &reserved(16 * MIB - 4096), &DEFAULT).is_none(), "no room after the kernel");
        assert!(ondemand_boot_ranges(&[], &reserved(5 * MIB), &DEFAULT).is_none());
        let odd = MemmapGeometry { chunk_bytes: 3 * MIB, ..DEFAULT };
        assert!(ondemand_boot_ranges(&pc_ram(128), &reserved(5 * MIB), &odd).is_none());
        let big = MemmapGeometry { chunk_bytes: 2 * SECTION_SIZE, ..DEFAULT };
        assert!(ondemand_boot_ranges(&pc_ram(128), &reserved(5 * MIB), &big).is_none());
        // Garbage does not panic.
        let junk = [r(u64::MAX - 4096, 8192), r(0, u64::MAX)];
        let _ = ondemand_boot_ranges(&junk, &junk, &DEFAULT);
    }
}

//! The boot page tables: an identity map of guest-physical memory with
//! 2 MiB pages, one page directory per GiB.

use super::layout::{GIB, MAX_PHYS, PDPT_START, PD_START, PML4_START};

/// Page-table entry flags: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flag: a 2 MiB page.
const PDE_LARGE: u64 = 0x80;

/// Builds identity-mapping page tables covering `[0, top)` with 2 MiB pages
/// (rounded up to whole GiB), returned as (address, 4 KiB table) pairs.
pub fn identity_page_tables(top: u64) -> Vec<(u64, [u64; 512])> {
    let gibs = top.div_ceil(GIB).clamp(1, MAX_PHYS / GIB);
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_START | PTE_PRESENT_RW;
    let mut pdpt = [0u64; 512];
    let mut tables = Vec::with_capacity(2 + gibs as usize);
    for g in 0..gibs {
        let pd_addr = PD_START + g * 4096;
        pdpt[g as usize] = pd_addr | PTE_PRESENT_RW;
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            *e = (g * GIB + ((i as u64) << 21)) | PTE_PRESENT_RW | PDE_LARGE;
        }
        tables.push((pd_addr, pd));
    }
    tables.push((PML4_START, pml4));
    tables.push((PDPT_START, pdpt));
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_every_gib_with_2mib_pages() {
        let tables = identity_page_tables(2 << 30);
        assert_eq!(tables.len(), 4); // 2 PDs, PML4, PDPT
        let pml4 = tables.iter().find(|(a, _)| *a == PML4_START).unwrap().1;
        assert_eq!(pml4[0], PDPT_START | 3);
        assert!(pml4[1..].iter().all(|e| *e == 0));
        let pdpt = tables.iter().find(|(a, _)| *a == PDPT_START).unwrap().1;
        assert_eq!(pdpt[0], PD_START | 3);
        assert_eq!(pdpt[1], (PD_START + 4096) | 3);
        assert_eq!(pdpt[2], 0);
        let pd1 = tables.iter().find(|(a, _)| *a == PD_START + 4096).unwrap().1;
        assert_eq!(pd1[0], GIB | 0x83);
        assert_eq!(pd1[511], (GIB + (511 << 21)) | 0x83);
    }

    #[test]
    fn small_and_huge_tops_are_clamped() {
        assert_eq!(identity_page_tables(1).len(), 3);
        assert_eq!(identity_page_tables(u64::MAX).len(), 2 + (MAX_PHYS / GIB) as usize);
    }
}

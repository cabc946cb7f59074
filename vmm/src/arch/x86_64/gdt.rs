//! The boot GDT and the decoding of its entries into the segments KVM takes.

use kvm_bindings::kvm_segment;

/// The boot GDT: null, code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code, selector 0x08
    0x00cf_9300_0000_ffff, // data, selector 0x10
    0x0080_8b00_0000_ffff, // TSS, selector 0x18
];

/// Decodes a GDT entry into the segment KVM wants.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The two words of a present 64-bit TSS descriptor for `base` and `limit`,
/// marked busy (type 11), as `ltr` leaves it: the state of a descriptor
/// whose TSS is loaded in `TR`.
pub fn tss_descriptor(base: u64, limit: u16) -> [u64; 2] {
    let low = u64::from(limit) | (base & 0xff_ffff) << 16 | 0x8b << 40 | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_like_the_hardware() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present, code.type_, code.s), (8, 1, 0, 1, 0xb, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((data.selector, data.db, data.type_, data.l), (16, 1, 3, 0));
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (24, 0xb, 0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn a_tss_descriptor_splits_its_base_as_the_hardware_reads_it() {
        let [low, high] = tss_descriptor(0x1234_5678_9abc_def0, 0x127);
        let tss = segment_from_gdt(low, 5);
        assert_eq!((tss.base, tss.limit, tss.type_, tss.s, tss.present, tss.g), (0x9abc_def0, 0x127, 0xb, 0, 1, 0));
        assert_eq!(high, 0x1234_5678);
    }
}

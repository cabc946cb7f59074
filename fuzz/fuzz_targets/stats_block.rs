//! Fuzz target: the guest's stats block, read from guest RAM filled with
//! the input and validated. Nothing may panic, and a block that is accepted
//! lists memmap ranges inside guest RAM that do not overlap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::report::guest::{memmap_ranges, range_in_ram};

fuzz_target!(|data: &[u8]| {
    let out = vmm::fuzzing::stats_block(data);
    if let (Some(b), Ok(_)) = (out.block, &out.verdict) {
        let mut ranges: Vec<_> = memmap_ranges(&b).filter(|r| r.len != 0).collect();
        for r in &ranges {
            assert!(range_in_ram(&out.mem, r.start, r.len), "{r:?}");
        }
        ranges.sort_by_key(|r| r.start);
        for w in ranges.windows(2) {
            assert!(w[0].start + w[0].len <= w[1].start, "{w:?}");
        }
    }
});

//! Fuzz target: a guest's stats block and reclaim reports, from guest RAM
//! filled with the input, through the paravirtual device. Nothing may
//! panic; only accepted ranges (inside RAM, aligned, clear of protected
//! memory and of each other) may change, and they read as zeros.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmm::fuzzing::reclaim_report(data) {
        panic!("{e}");
    }
});

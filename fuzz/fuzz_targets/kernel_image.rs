//! Fuzz target: kernel image loading. The input is the image file: the ELF
//! check, the segment list and the load into guest RAM must refuse what
//! they cannot use, never panic or write outside guest RAM.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::fuzzing::kernel_image(data);
});

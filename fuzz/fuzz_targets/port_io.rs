//! Fuzz target: sequences of guest port reads and writes against a VM's
//! devices ([`vmm::fuzzing::port_io`] describes the encoding). Nothing may
//! panic or block.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzzing::port_io(data));

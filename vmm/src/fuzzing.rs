//! Entry points for the fuzz targets (`fuzz/`) and the property tests
//! (`vmm/tests/properties.rs`): each takes raw bytes, the way a hostile
//! guest or image file hands them over, and runs the real code on them. Not
//! an API: hidden from the documentation, kept small.

use crate::devices::Devices;
use crate::loader::{self, Image, LoadError};
use crate::report::guest::{self, GuestReportError};
use crate::timings::Timings;
use guest_abi::{port, StatsBlock, Strategy};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of the stats-block target: two regions with a hole between,
/// so ranges can straddle a region's end.
pub const STATS_RAM: [(u64, usize); 2] = [(0, 1 << 20), (2 << 20, 1 << 20)];

/// What the stats-block target saw: the block read, and the verdict.
pub struct StatsOutcome {
    pub block: Option<StatsBlock>,
    pub verdict: Result<Strategy, GuestReportError>,
    pub mem: GuestMemoryMmap,
}

/// Fills small guest RAM with `data` (from address 0), then reads the stats
/// block at the address in its first 4 bytes (as the guest announces it on
/// `port::STATS`) and validates it for a VM with `data[4]` vCPUs.
pub fn stats_block(data: &[u8]) -> StatsOutcome {
    let mem = GuestMemoryMmap::<()>::from_ranges(&STATS_RAM.map(|(a, l)| (GuestAddress(a), l))).expect("fixed layout");
    let n = data.len().min(STATS_RAM[0].1);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("fits the first region");
    let word = |o: usize| data.get(o..o + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let gpa = GuestAddress(u64::from(word(0)));
    let vcpus = data.get(4).copied().unwrap_or(1);
    match guest::read_snapshot(&mem, gpa) {
        Ok(b) => StatsOutcome { block: Some(b), verdict: guest::validate(&b, &mem, vcpus), mem },
        Err(e) => StatsOutcome { block: None, verdict: Err(e), mem },
    }
}

/// Runs `data` as a sequence of port accesses against a VM's devices (16 MiB
/// of RAM, the paravirtual device, a UART whose output is thrown away).
/// Each access is 6 bytes: a control byte (bit 0: write, bit 1: vCPU 1
/// instead of 0, bits 2..4: size 1, 2 or 4), then a port byte (folded onto
/// the ports the devices own), then up to 4 data bytes. Reads that would
/// block a vCPU until the controller answers (`WAIT`, an AP's `AP_PARK`)
/// are made as `POLL` and by vCPU 0. A control byte of `0xff` instead queues
/// a guest command, as the controller does.
pub fn port_io(data: &[u8]) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("fixed layout");
    let (tx, rx) = crate::events::channel();
    // No controller: events go nowhere (and nothing queues up).
    drop(rx);
    let console = crate::devices::serial::ConsoleOut::writer(Box::new(std::io::sink()));
    let d = Devices::new(mem, Some(console), true, tx, Arc::new(Timings::new()), Arc::default());
    if let Some(pv) = d.paravirt() {
        pv.set_vcpu_count(2);
    }
    let ports: Vec<u16> = (port::PV_BASE..port::PV_END).chain(0x3f8..0x400).chain([0x60, 0x64, 0x80, 0x1234]).collect();
    for op in data.chunks(6) {
        let [ctl, p, rest @ ..] = op else { break };
        let value = rest.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if *ctl == 0xff {
            if let (Some(pv), Some(cmd)) = (d.paravirt(), guest_abi::Command::decode(u32::from(*p))) {
                let _ = pv.submit(cmd, u64::from(value), 0);
            }
            continue;
        }
        let mut port = ports[usize::from(*p) % ports.len()];
        let mut cpu = (ctl >> 1) & 1;
        let size = [1usize, 2, 4, 4][usize::from((ctl >> 2) & 3)];
        if ctl & 1 != 0 {
            let _ = d.port_out(cpu, port, &value.to_le_bytes()[..size]);
        } else {
            if port == port::WAIT {
                port = port::POLL;
            }
            if port == port::AP_PARK {
                cpu = 0;
            }
            let mut buf = [0u8; 4];
            let _ = d.port_in(cpu, port, &mut buf[..size]);
        }
    }
}

/// Guest RAM the kernel-image target loads into.
pub const LOAD_RAM_BYTES: usize = 4 << 20;

/// Checks `data` as a kernel image, lists its segments and loads it into
/// 4 MiB of guest RAM, as the builder does; returns the entry point.
pub fn kernel_image(data: &[u8]) -> Result<GuestAddress, LoadError> {
    loader::check_elf(data).map_err(|why| LoadError::NotElf { name: "fuzz".into(), why })?;
    let image = Image::from_bytes(data.to_vec(), "fuzz");
    let _ = image.segments();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LOAD_RAM_BYTES)]).expect("fixed layout");
    image.load(&mem)
}

//! The port-I/O bus: routes each guest port access to the device that owns
//! the port. Ports nobody owns read as all ones and ignore writes, like an
//! empty ISA bus. Shared by every vCPU thread and by the controller.

use super::i8042::I8042;
use super::outcome::PortOutcome;
use super::paravirt::Paravirt;
use super::serial::{ConsoleOut, SerialPort};
use crate::events::EventSender;
use crate::memory::Registrar;
use crate::metrics::Metrics;
use crate::timings::Timings;
use guest_abi::port;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// All devices of one VM.
pub struct Devices {
    /// COM1, absent with `--serial none`: its ports then read as all ones,
    /// like a PC without the UART, and the guest skips console output.
    serial: Option<SerialPort>,
    i8042: I8042,
    /// The paravirtual device; `None` behaves like a VMM without it.
    pv: Option<Paravirt>,
    mem: GuestMemoryMmap,
    pub timings: Arc<Timings>,
    pub metrics: Arc<Metrics>,
}

impl Devices {
    /// Creates the devices: console output goes to `console` (no UART if
    /// `None`); with `paravirt` the paravirtual ports exist and report to
    /// `events`.
    pub fn new(
        mem: GuestMemoryMmap,
        console: Option<ConsoleOut>,
        paravirt: bool,
        events: EventSender,
        timings: Arc<Timings>,
        metrics: Arc<Metrics>,
    ) -> Devices {
        Devices {
            serial: console.map(|c| SerialPort::new(c, Some(events.clone()), metrics.clone())),
            i8042: I8042::default(),
            pv: paravirt.then(|| Paravirt::new(mem.clone(), events, timings.clone(), metrics.clone())),
            mem,
            timings,
            metrics,
        }
    }

    /// The paravirtual device, if the VM has one.
    pub fn paravirt(&self) -> Option<&Paravirt> {
        self.pv.as_ref()
    }

    /// Bytes of guest RAM registered with KVM (all of it if nothing tracks it).
    pub fn registered_bytes(&self) -> u64 {
        match self.pv.as_ref().and_then(Paravirt::registrar) {
            Some(r) => r.registered_bytes(),
            None => crate::memory::ram::ram_bytes(&self.mem),
        }
    }

    /// What the guest's reclaim reports did (nothing without the device).
    pub fn reclaim_stats(&self) -> crate::memory::reclaim::ReclaimStats {
        self.pv.as_ref().map(Paravirt::reclaim_stats).unwrap_or_default()
    }

    /// KVM memslots deleted because the guest took their memory offline.
    pub fn memslots_unregistered(&self) -> u64 {
        self.pv.as_ref().and_then(Paravirt::registrar).map_or(0, Registrar::slots_deleted)
    }

    /// Where the guest said its stats block is.
    pub fn stats_gpa(&self) -> Option<GuestAddress> {
        self.pv.as_ref().and_then(Paravirt::stats_gpa)
    }

    /// Whether `gpa` is guest RAM.
    pub fn is_ram(&self, gpa: u64) -> bool {
        self.mem.address_in_range(GuestAddress(gpa))
    }

    /// Counts and (rate-limited) logs an access of `len` bytes to `gpa`,
    /// which is not guest RAM: the caller answers it as an empty bus does.
    pub fn unbacked_mmio(&self, gpa: u64, len: usize, write: bool) {
        if let Some(pv) = &self.pv {
            let (what, outcome) = if write { ("write", "dropped") } else { ("read", "all ones") };
            pv.guest_error(format_args!("{len}-byte MMIO {what} at {gpa:#x}, which is not guest RAM ({outcome})"));
        }
    }

    /// Writes buffered console output to the host, waiting at most `wait`
    /// for a slow sink; true when nothing is left buffered.
    pub fn drain_console(&self, wait: std::time::Duration) -> bool {
        self.serial.as_ref().is_none_or(|s| s.drain(wait))
    }

    /// The last drain of console output (at stop), with a deadline of
    /// [`CONSOLE_FINAL_FLUSH`](super::serial::CONSOLE_FINAL_FLUSH).
    pub fn flush_console(&self) {
        self.drain_console(super::serial::CONSOLE_FINAL_FLUSH);
    }

    /// Wakes every vCPU blocked in a port read and makes it stop.
    pub fn request_stop(&self) {
        if let Some(pv) = &self.pv {
            pv.request_stop();
        }
    }

    /// Holds (or releases) guest commands.
    pub fn set_paused(&self, paused: bool) {
        if let Some(pv) = &self.pv {
            pv.set_paused(paused);
        }
    }

    /// A port write from vCPU `cpu`.
    pub fn port_out(&self, cpu: u8, p: u16, data: &[u8]) -> PortOutcome {
        self.timings.mark_once(&self.timings.guest_first_port_write);
        let byte = data.first().copied().unwrap_or(0);
        match (p, &self.serial, &self.pv) {
            (p, Some(serial), _) if SerialPort::owns(p) => {
                if p == port::SERIAL_COM1 {
                    Metrics::inc(&self.metrics.serial_bytes);
                }
                serial.write(p, byte);
                PortOutcome::Continue
            }
            (p, _, _) if I8042::owns(p) => match self.i8042.write(p, byte) {
                true => PortOutcome::Reset,
                false => PortOutcome::Continue,
            },
            (p, _, Some(pv)) if (port::PV_BASE..port::PV_END).contains(&p) => pv.write(cpu, p, le_u32(data)),
            _ => PortOutcome::Continue,
        }
    }

    /// A port read from vCPU `cpu`; fills `data`.
    pub fn port_in(&self, cpu: u8, p: u16, data: &mut [u8]) -> PortOutcome {
        self.timings.mark_once(&self.timings.guest_first_port_write);
        data.fill(0xff);
        match (p, &self.serial, &self.pv) {
            (p, Some(serial), _) if SerialPort::owns(p) => {
                put_byte(data, serial.read(p));
                PortOutcome::Continue
            }
            (p, _, _) if I8042::owns(p) => {
                put_byte(data, self.i8042.read(p));
                PortOutcome::Continue
            }
            (p, _, Some(pv)) if (port::PV_BASE..port::PV_END).contains(&p) => {
                let (value, outcome) = pv.read(cpu, p);
                put_le_u32(data, value);
                outcome
            }
            _ => PortOutcome::Continue,
        }
    }
}

/// The first up-to-4 bytes of a port write, little-endian.
fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Answers a port read with `value` (little-endian, as many bytes as asked).
fn put_le_u32(data: &mut [u8], value: u32) {
    let b = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

/// Answers a byte-wide register read: the byte, zero above it.
fn put_byte(data: &mut [u8], value: u8) {
    data.fill(0);
    if let Some(first) = data.first_mut() {
        *first = value;
    }
}

/// A bus for tests: 16 MiB of RAM, the paravirtual device, and a console
/// that the test can read back.
#[cfg(test)]
pub(crate) fn test_bus() -> (Devices, crate::events::EventReceiver, tests::SharedBuf) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let (tx, rx) = crate::events::channel();
    let buf = tests::SharedBuf::default();
    let d = Devices::new(mem, Some(ConsoleOut::writer(Box::new(buf.clone()))), true, tx, Arc::new(Timings::new()), Arc::default());
    (d, rx, buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    /// A console that test code can read back.
    #[derive(Clone, Default)]
    pub(crate) struct SharedBuf(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn without_a_console_the_uart_is_absent() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tx, _rx) = crate::events::channel();
        let d = Devices::new(mem, None, true, tx, Arc::new(Timings::new()), Arc::default());
        let mut lsr = [0u8];
        d.port_in(0, 0x3fd, &mut lsr);
        assert_eq!(lsr[0], 0xff, "an absent UART floats high");
        assert_eq!(d.port_out(0, 0x3f8, b"x"), PortOutcome::Continue);
    }

    #[test]
    fn without_paravirt_its_ports_read_all_ones() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tx, _rx) = crate::events::channel();
        let d = Devices::new(mem, None, false, tx, Arc::new(Timings::new()), Arc::default());
        let mut v = [0u8; 4];
        d.port_in(0, port::IDENT, &mut v);
        assert_eq!(v, [0xff; 4]);
        assert_eq!(d.port_out(0, port::EXIT, &[1, 0, 0, 0]), PortOutcome::Continue);
        assert_eq!(d.registered_bytes(), 1 << 20, "untracked: all RAM counts as registered");
    }

    #[test]
    fn serial_bytes_reach_the_console() {
        let (d, _rx, buf) = test_bus();
        for b in b"hi\n" {
            assert_eq!(d.port_out(0, 0x3f8, &[*b]), PortOutcome::Continue);
        }
        assert!(d.drain_console(std::time::Duration::ZERO));
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        d.port_in(0, 0x3fd, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter always ready");
    }

    #[test]
    fn i8042_reset_and_exit_port_stop_the_vm() {
        let (d, _rx, _) = test_bus();
        assert_eq!(d.port_out(0, 0x64, &[0x00]), PortOutcome::Continue);
        assert_eq!(d.port_out(0, 0x64, &[0xfe]), PortOutcome::Reset);
        let (d, _rx, _) = test_bus();
        assert_eq!(d.port_out(0, port::EXIT, &7u32.to_le_bytes()), PortOutcome::GuestExit(7));
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let (d, _rx, _) = test_bus();
        let mut v = [0u8; 4];
        d.port_in(0, 0x1234, &mut v);
        assert_eq!(v, [0xff; 4]);
    }

    #[test]
    fn short_and_long_port_data_are_handled() {
        assert_eq!(le_u32(&[1]), 1);
        assert_eq!(le_u32(&[1, 0, 0, 0, 9]), 1);
        let mut d = [0u8; 2];
        put_le_u32(&mut d, 0x0102_0304);
        assert_eq!(d, [4, 3]);
        let mut e: [u8; 0] = [];
        put_byte(&mut e, 7);
    }
}

//! VM-exit decoding: [`handle_exit`] is a free function from a `VcpuExit` to
//! a [`VcpuAction`], so tests feed it fabricated exits (Firecracker's
//! `handle_kvm_exit`). Nothing the guest does panics the VMM: every exit is
//! either handled or turned into a [`StopReason`] that names what happened.
//!
//! An access to guest-physical memory that is not RAM (`KVM_EXIT_MMIO`:
//! past RAM, the 32-bit hole, the top of the address space) finds an empty
//! bus: reads see all ones, writes are dropped. Each is counted
//! (`vm_exits.mmio_read`, `vm_exits.mmio_write`) and logged as a guest
//! protocol error, under the same rate limit. RAM the guest never onlined
//! stops the VM instead (docs/security.md, "MMIO outside RAM").

use super::stop::StopReason;
use crate::devices::{Devices, PortOutcome};
use crate::metrics::Metrics;
use kvm_ioctls::VcpuExit;

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq)]
pub enum VcpuAction {
    /// Re-enter the guest.
    Continue,
    /// Stop this vCPU.
    Stop(StopReason),
    /// The guest reported an exception: read the registers, then stop.
    ReadExceptionAndStop,
    /// The guest halted (`hlt`). This VMM delivers no interrupts, so
    /// nothing can wake the vCPU: it parks, using no host CPU, until the
    /// controller stops the VM (Shutdown, a signal). This is how a guest
    /// without the paravirtual interface idles.
    Halt,
}

/// Decodes one VM exit of vCPU `cpu` and does its device I/O.
pub fn handle_exit(exit: VcpuExit<'_>, cpu: u8, devices: &Devices) -> VcpuAction {
    let m = &devices.metrics;
    let outcome = match exit {
        VcpuExit::IoOut(port, data) => {
            Metrics::inc(&m.exits_io_out);
            devices.port_out(cpu, port, data)
        }
        VcpuExit::IoIn(port, data) => {
            Metrics::inc(&m.exits_io_in);
            devices.port_in(cpu, port, data)
        }
        VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) if devices.is_ram(addr) => {
            // RAM without a memslot: the guest used a block it never onlined.
            Metrics::inc(&m.exits_failed);
            return VcpuAction::Stop(StopReason::UnhandledExit {
                what: format!("guest used RAM at {addr:#x} before onlining its block (port::MEM_ONLINE)"),
                rip: None,
            });
        }
        VcpuExit::MmioRead(addr, data) => {
            // No MMIO devices: reads see all ones, like an empty bus.
            Metrics::inc(&m.exits_mmio_read);
            data.fill(0xff);
            devices.unbacked_mmio(addr, data.len(), false);
            PortOutcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            Metrics::inc(&m.exits_mmio_write);
            devices.unbacked_mmio(addr, data.len(), true);
            PortOutcome::Continue
        }
        VcpuExit::Hlt => {
            Metrics::inc(&m.exits_hlt);
            return VcpuAction::Halt;
        }
        VcpuExit::Shutdown => {
            Metrics::inc(&m.exits_shutdown);
            return VcpuAction::Stop(StopReason::TripleFault { rip: None });
        }
        VcpuExit::InternalError => {
            Metrics::inc(&m.exits_failed);
            return VcpuAction::Stop(StopReason::KvmFailure { what: "KVM_EXIT_INTERNAL_ERROR".into(), rip: None });
        }
        VcpuExit::FailEntry(reason, hw_cpu) => {
            Metrics::inc(&m.exits_failed);
            return VcpuAction::Stop(StopReason::KvmFailure {
                what: format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host CPU {hw_cpu})"),
                rip: None,
            });
        }
        VcpuExit::Intr => {
            Metrics::inc(&m.kvm_run_interrupted);
            return VcpuAction::Continue;
        }
        VcpuExit::SystemEvent(kind, _) => {
            Metrics::inc(&m.exits_system_event);
            return VcpuAction::Stop(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                _ => StopReason::UnhandledExit { what: format!("KVM_EXIT_SYSTEM_EVENT type {kind}"), rip: None },
            });
        }
        other => {
            Metrics::inc(&m.exits_other);
            return VcpuAction::Stop(StopReason::UnhandledExit { what: format!("{other:?}"), rip: None });
        }
    };
    match outcome {
        PortOutcome::Continue => VcpuAction::Continue,
        PortOutcome::GuestExit(code) => VcpuAction::Stop(StopReason::GuestExit(code)),
        PortOutcome::Reset => VcpuAction::Stop(StopReason::Reset),
        PortOutcome::StopRequested => VcpuAction::Stop(StopReason::Requested),
        PortOutcome::GuestException => VcpuAction::ReadExceptionAndStop,
        PortOutcome::RegistrationFailed(error) => VcpuAction::Stop(StopReason::Registration { error, rip: None }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::test_bus;
    use guest_abi::port;
    use std::sync::atomic::Ordering;

    #[test]
    fn port_writes_are_routed_and_counted() {
        let (d, _rx, buf) = test_bus();
        assert_eq!(handle_exit(VcpuExit::IoOut(0x3f8, b"x"), 0, &d), VcpuAction::Continue);
        d.drain_console(std::time::Duration::ZERO);
        assert_eq!(&*buf.0.lock().unwrap(), b"x");
        assert_eq!(d.metrics.exits_io_out.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn guest_exit_and_reset_stop_with_the_right_code() {
        let (d, _rx, _) = test_bus();
        let a = handle_exit(VcpuExit::IoOut(port::EXIT, &3u32.to_le_bytes()), 0, &d);
        assert_eq!(a, VcpuAction::Stop(StopReason::GuestExit(3)));
        let a = handle_exit(VcpuExit::IoOut(0x64, &[0xfe]), 0, &d);
        assert_eq!(a, VcpuAction::Stop(StopReason::Reset));
    }

    #[test]
    fn port_reads_fill_the_exit_buffer() {
        let (d, _rx, _) = test_bus();
        let mut data = [0u8; 4];
        assert_eq!(handle_exit(VcpuExit::IoIn(port::IDENT, &mut data), 0, &d), VcpuAction::Continue);
        assert_eq!(u32::from_le_bytes(data), guest_abi::PV_MAGIC);
    }

    #[test]
    fn fatal_exits_become_named_failures() {
        let (d, _rx, _) = test_bus();
        let a = handle_exit(VcpuExit::Shutdown, 0, &d);
        assert_eq!(a, VcpuAction::Stop(StopReason::TripleFault { rip: None }));
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::InternalError, 0, &d) else { panic!() };
        assert!(r.is_failure());
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::FailEntry(0x21, 1), 0, &d) else { panic!() };
        assert!(r.to_string().contains("0x21"), "{r}");
        assert_eq!(handle_exit(VcpuExit::Hlt, 0, &d), VcpuAction::Halt);
        assert_eq!(d.metrics.exits_hlt.load(std::sync::atomic::Ordering::Relaxed), 1);
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::Unknown, 0, &d) else { panic!() };
        assert!(matches!(r, StopReason::UnhandledExit { .. }));
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn ram_without_a_memslot_stops_the_vm_and_other_mmio_sees_an_empty_bus() {
        let (d, _rx, _) = test_bus();
        let mut data = [0u8; 8];
        assert_eq!(handle_exit(VcpuExit::MmioRead(0xfee0_0000, &mut data), 0, &d), VcpuAction::Continue);
        assert_eq!(data, [0xff; 8]);
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::MmioWrite(0x1000, &[0]), 0, &d) else { panic!() };
        assert!(r.to_string().contains("before onlining"), "{r}");
    }

    #[test]
    fn a_flood_of_mmio_outside_ram_is_counted_and_logged_within_the_rate_limit() {
        let (d, rx, _) = test_bus();
        let mut data = [0u8; 4];
        for i in 0..10_000u64 {
            assert_eq!(handle_exit(VcpuExit::MmioRead(0xc000_0000 + i, &mut data), 0, &d), VcpuAction::Continue);
            assert_eq!(data, [0xff; 4]);
            assert_eq!(handle_exit(VcpuExit::MmioWrite(1 << 45, &[1, 2]), 1, &d), VcpuAction::Continue);
        }
        assert_eq!(d.metrics.exits_mmio_read.load(Ordering::Relaxed), 10_000);
        assert_eq!(d.metrics.exits_mmio_write.load(Ordering::Relaxed), 10_000);
        assert_eq!(d.metrics.guest_protocol_errors.load(Ordering::Relaxed), 20_000);
        let mut rx = rx;
        let logged: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let limit = 2 * crate::devices::paravirt::PROTOCOL_ERRORS_PER_SECOND as usize;
        assert!((1..=limit).contains(&logged.len()), "{} events", logged.len());
        let crate::events::VmEvent::GuestProtocolError { msg, .. } = &logged[0] else { panic!("{logged:?}") };
        assert!(msg.contains("0xc0000000") && msg.contains("not guest RAM"), "{msg}");
    }

    #[test]
    fn an_exception_report_asks_for_registers() {
        let (d, _rx, _) = test_bus();
        let a = handle_exit(VcpuExit::IoOut(port::EXCEPTION, &6u32.to_le_bytes()), 0, &d);
        assert_eq!(a, VcpuAction::ReadExceptionAndStop);
    }
}

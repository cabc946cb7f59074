//! The vCPU run loop and VM-exit decoding.
//!
//! [`handle_exit`] is a free function from a `VcpuExit` to a [`VcpuAction`],
//! so tests feed it fabricated exits; [`run`] is the loop each vCPU thread
//! runs until the guest stops, fails, or the VMM asks it to stop. Nothing the
//! guest does panics the VMM: every exit is either handled or turned into a
//! [`StopReason`] that names what happened and where.

use crate::devices::{Devices, PortOutcome};
use crate::timings::Metrics;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Pause control shared by the VMM thread and the vCPU threads.
///
/// Before every `KVM_RUN` a vCPU marks itself "in the guest", *then* reads
/// the pause flag; pausing sets the flag, *then* reads the marks and kicks
/// every vCPU still in the guest until none is. With both sides sequentially
/// consistent, a vCPU either sees the pause or is seen (and kicked), so no
/// vCPU slips into the guest after a pause returned. A vCPU blocked in a port
/// read is already out of the guest, and commands are held while paused.
/// The mutex is taken only while paused, so the run loop's fast path is two
/// atomic operations.
pub struct RunControl {
    paused_flag: AtomicBool,
    paused: Mutex<bool>,
    cond: Condvar,
    in_guest: Vec<AtomicBool>,
}

impl RunControl {
    /// Control for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> RunControl {
        RunControl {
            paused_flag: AtomicBool::new(false),
            paused: Mutex::new(false),
            cond: Condvar::new(),
            in_guest: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Sets or clears the pause flag (waking paused vCPUs on resume).
    pub fn set_paused(&self, paused: bool) {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        *p = paused;
        self.paused_flag.store(paused, Ordering::SeqCst);
        drop(p);
        self.cond.notify_all();
    }

    /// Whether vCPU `cpu` is running guest code (or about to).
    pub fn in_guest(&self, cpu: usize) -> bool {
        self.in_guest.get(cpu).is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// Blocks while paused (unless `stop` is set), then marks `cpu` in the guest.
    fn enter_guest(&self, cpu: usize, stop: &AtomicBool) {
        let Some(mark) = self.in_guest.get(cpu) else { return };
        loop {
            mark.store(true, Ordering::SeqCst);
            if !self.paused_flag.load(Ordering::SeqCst) || stop.load(Ordering::Acquire) {
                return;
            }
            mark.store(false, Ordering::SeqCst);
            let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
            while *paused && !stop.load(Ordering::Acquire) {
                paused = self.cond.wait(paused).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn leave_guest(&self, cpu: usize) {
        if let Some(f) = self.in_guest.get(cpu) {
            f.store(false, Ordering::SeqCst);
        }
    }

    /// Wakes paused vCPUs so they can see a stop request.
    pub fn wake(&self) {
        let _guard = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// The guest wrote this code to the exit port.
    GuestExit(u32),
    /// The guest reset the machine through the i8042 (a clean shutdown).
    Reset,
    /// The VMM asked the vCPU to stop.
    Requested,
    /// The guest reported a CPU exception from its handler.
    GuestException { vector: u64, error_code: u64, rip: u64, cr2: u64, ring: u8 },
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault { rip: Option<u64> },
    /// KVM could not run the guest (`KVM_EXIT_INTERNAL_ERROR`, `FAIL_ENTRY`).
    KvmFailure { what: String, rip: Option<u64> },
    /// An exit this VMM does not handle.
    UnhandledExit { what: String, rip: Option<u64> },
    /// `KVM_RUN` itself failed.
    RunFailed(String),
}

impl StopReason {
    /// The process exit code this stop maps to: the guest's own code for a
    /// guest exit (1 if it does not fit in 1..=255), 0 for a reset or a
    /// requested stop, 1 for every failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::GuestExit(0) | StopReason::Reset | StopReason::Requested => 0,
            StopReason::GuestExit(c) if *c <= 255 => *c as i32,
            _ => 1,
        }
    }

    /// Whether the guest ended in a failure (as opposed to a shutdown).
    pub fn is_failure(&self) -> bool {
        self.exit_code() != 0
    }

    fn with_rip(self, rip: Option<u64>) -> StopReason {
        match self {
            StopReason::TripleFault { .. } => StopReason::TripleFault { rip },
            StopReason::KvmFailure { what, .. } => StopReason::KvmFailure { what, rip },
            StopReason::UnhandledExit { what, .. } => StopReason::UnhandledExit { what, rip },
            other => other,
        }
    }
}

fn rip_text(rip: &Option<u64>) -> String {
    rip.map_or_else(|| "unknown".to_string(), |r| format!("{r:#x}"))
}

/// x86 exception mnemonics, by vector.
const EXCEPTIONS: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP",
    "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved", "reserved",
    "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
];

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestExit(c) => write!(f, "guest exited with code {c}"),
            StopReason::Reset => write!(f, "guest reset the machine (i8042)"),
            StopReason::Requested => write!(f, "stopped by the VMM"),
            StopReason::GuestException { vector, error_code, rip, cr2, ring } => {
                let name = EXCEPTIONS.get(*vector as usize).copied().unwrap_or("unknown");
                write!(f, "guest exception {name} (vector {vector}) at RIP {rip:#x} in ring {ring}, error code {error_code:#x}")?;
                if *vector == 14 {
                    write!(f, ", CR2 {cr2:#x}")?;
                }
                Ok(())
            }
            StopReason::TripleFault { rip } => {
                write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN), last RIP {}", rip_text(rip))
            }
            StopReason::KvmFailure { what, rip } => write!(f, "KVM failed to run the guest: {what}, guest RIP {}", rip_text(rip)),
            StopReason::UnhandledExit { what, rip } => write!(f, "unhandled VM exit: {what}, guest RIP {}", rip_text(rip)),
            StopReason::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq)]
pub enum VcpuAction {
    /// Re-enter the guest.
    Continue,
    /// Stop this vCPU.
    Stop(StopReason),
    /// The guest reported an exception: read the registers, then stop.
    ReadExceptionAndStop,
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
        VcpuExit::MmioRead(_, data) => {
            // No MMIO devices: reads see all ones, like an empty bus.
            Metrics::inc(&m.exits_mmio_read);
            data.fill(0xff);
            PortOutcome::Continue
        }
        VcpuExit::MmioWrite(..) => {
            Metrics::inc(&m.exits_mmio_write);
            PortOutcome::Continue
        }
        VcpuExit::Hlt => {
            Metrics::inc(&m.exits_hlt);
            return VcpuAction::Stop(StopReason::UnhandledExit {
                what: "HLT (the guest halted with nothing to wake it)".into(),
                rip: None,
            });
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
        PortOutcome::Failed(what) => VcpuAction::Stop(StopReason::KvmFailure { what, rip: None }),
    }
}

/// A signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Installs a no-op handler for [`kick_signal`] (once per process), so the
/// signal interrupts `KVM_RUN` with `EINTR` instead of killing the process.
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        // Registration only fails for an invalid signal number; SIGRTMIN is valid.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop);
    });
}

/// Runs vCPU `cpu` until it stops; returns why.
pub fn run(vcpu: &mut VcpuFd, cpu: u8, devices: &Arc<Devices>, control: &RunControl, stop: &AtomicBool) -> StopReason {
    if cpu == 0 {
        devices.timings.mark_once(&devices.timings.vcpu_first_entry);
    }
    loop {
        control.enter_guest(cpu as usize, stop);
        if stop.load(Ordering::Acquire) {
            control.leave_guest(cpu as usize);
            return StopReason::Requested;
        }
        let result = vcpu.run();
        control.leave_guest(cpu as usize);
        let action = match result {
            Ok(exit) => handle_exit(exit, cpu, devices),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Metrics::inc(&devices.metrics.kvm_run_interrupted);
                vcpu.set_kvm_immediate_exit(0);
                VcpuAction::Continue
            }
            Err(e) => VcpuAction::Stop(StopReason::RunFailed(e.to_string())),
        };
        match action {
            VcpuAction::Continue => {}
            VcpuAction::Stop(reason) if reason.is_failure() => {
                let rip = vcpu.get_regs().ok().map(|r| r.rip);
                return reason.with_rip(rip);
            }
            VcpuAction::Stop(reason) => return reason,
            VcpuAction::ReadExceptionAndStop => {
                return match vcpu.get_regs() {
                    Ok(r) => StopReason::GuestException {
                        vector: r.rdi,
                        error_code: r.rsi,
                        rip: r.r8,
                        cr2: r.r9,
                        ring: (r.r10 & 3) as u8,
                    },
                    Err(e) => StopReason::RunFailed(format!("reading registers after a guest exception: {e}")),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::tests::devices;
    use guest_abi::port;

    #[test]
    fn a_paused_vcpu_stays_out_of_the_guest_until_resumed_or_stopped() {
        let c = Arc::new(RunControl::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        c.enter_guest(0, &stop);
        assert!(c.in_guest(0), "not paused: straight in");
        c.leave_guest(0);
        c.set_paused(true);
        let (tx, rx) = std::sync::mpsc::channel();
        let (c2, s2) = (c.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            c2.enter_guest(0, &s2);
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(100)).is_err(), "entered while paused");
        assert!(!c.in_guest(0), "a waiting vCPU is not marked in the guest");
        c.set_paused(false);
        rx.recv().unwrap();
        t.join().unwrap();
        assert!(c.in_guest(0));
        // A stop request also lets a paused vCPU through (to see the stop).
        c.leave_guest(0);
        c.set_paused(true);
        let (c3, s3) = (c.clone(), stop.clone());
        let t = std::thread::spawn(move || c3.enter_guest(0, &s3));
        stop.store(true, Ordering::Release);
        c.wake();
        t.join().unwrap();
    }

    #[test]
    fn port_writes_are_routed_and_counted() {
        let (d, _rx, buf) = devices();
        assert_eq!(handle_exit(VcpuExit::IoOut(0x3f8, b"x"), 0, &d), VcpuAction::Continue);
        assert_eq!(&*buf.0.lock().unwrap(), b"x");
        assert_eq!(d.metrics.exits_io_out.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn guest_exit_and_reset_stop_with_the_right_code() {
        let (d, _rx, _) = devices();
        let a = handle_exit(VcpuExit::IoOut(port::EXIT, &3u32.to_le_bytes()), 0, &d);
        assert_eq!(a, VcpuAction::Stop(StopReason::GuestExit(3)));
        assert_eq!(StopReason::GuestExit(3).exit_code(), 3);
        assert_eq!(StopReason::GuestExit(0).exit_code(), 0);
        assert_eq!(StopReason::GuestExit(1000).exit_code(), 1);
        let a = handle_exit(VcpuExit::IoOut(0x64, &[0xfe]), 0, &d);
        assert_eq!(a, VcpuAction::Stop(StopReason::Reset));
        assert_eq!(StopReason::Reset.exit_code(), 0);
    }

    #[test]
    fn port_reads_fill_the_exit_buffer() {
        let (d, _rx, _) = devices();
        let mut data = [0u8; 4];
        assert_eq!(handle_exit(VcpuExit::IoIn(port::IDENT, &mut data), 0, &d), VcpuAction::Continue);
        assert_eq!(u32::from_le_bytes(data), guest_abi::PV_MAGIC);
    }

    #[test]
    fn fatal_exits_become_named_failures() {
        let (d, _rx, _) = devices();
        let a = handle_exit(VcpuExit::Shutdown, 0, &d);
        assert_eq!(a, VcpuAction::Stop(StopReason::TripleFault { rip: None }));
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::InternalError, 0, &d) else { panic!() };
        assert!(r.is_failure());
        assert!(r.with_rip(Some(0x1234)).to_string().contains("0x1234"));
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::FailEntry(0x21, 1), 0, &d) else { panic!() };
        assert!(r.to_string().contains("0x21"), "{r}");
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::Hlt, 0, &d) else { panic!() };
        assert!(r.to_string().contains("HLT"));
        let VcpuAction::Stop(r) = handle_exit(VcpuExit::Unknown, 0, &d) else { panic!() };
        assert!(matches!(r, StopReason::UnhandledExit { .. }));
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn mmio_reads_see_an_empty_bus() {
        let (d, _rx, _) = devices();
        let mut data = [0u8; 8];
        assert_eq!(handle_exit(VcpuExit::MmioRead(0xfee0_0000, &mut data), 0, &d), VcpuAction::Continue);
        assert_eq!(data, [0xff; 8]);
    }

    #[test]
    fn an_exception_report_asks_for_registers() {
        let (d, _rx, _) = devices();
        let a = handle_exit(VcpuExit::IoOut(port::EXCEPTION, &6u32.to_le_bytes()), 0, &d);
        assert_eq!(a, VcpuAction::ReadExceptionAndStop);
        let r = StopReason::GuestException { vector: 14, error_code: 2, rip: 0x10_0000, cr2: 0xdead_0000, ring: 3 };
        let text = r.to_string();
        assert!(text.contains("#PF") && text.contains("0xdead0000") && text.contains("ring 3"), "{text}");
    }
}

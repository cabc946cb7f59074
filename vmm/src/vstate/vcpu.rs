//! One vCPU thread's run loop ([`run`]), the pause protocol it shares with
//! the controller ([`RunControl`]), and the signal that kicks a vCPU out of
//! `KVM_RUN`.
//!
//! A kick is [`kick_signal`], whose handler also sets the thread's
//! `kvm_run.immediate_exit` (as Firecracker does): a kick that lands between
//! the loop's check of the stop and pause flags and the `KVM_RUN` ioctl makes
//! that `KVM_RUN` return `EINTR` at once instead of being lost, so a stop or
//! a pause never waits for the guest to exit by itself.

use super::exit::{handle_exit, VcpuAction};
use super::stop::StopReason;
use crate::devices::Devices;
use crate::metrics::Metrics;
use kvm_ioctls::VcpuFd;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

thread_local! {
    /// The `immediate_exit` byte of the `kvm_run` of the vCPU this thread
    /// runs (null when it runs none); set by the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Sets this thread's [`IMMEDIATE_EXIT`] for the life of a run loop.
struct ImmediateExitGuard;

impl ImmediateExitGuard {
    fn set(vcpu: &mut VcpuFd) -> ImmediateExitGuard {
        let ptr = &raw mut vcpu.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(ptr));
        ImmediateExitGuard
    }
}

impl Drop for ImmediateExitGuard {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

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

    /// Marks `cpu` in the guest unless the VM is paused (and not stopping);
    /// returns whether it did. The mark comes before the read of the flag.
    fn try_enter_guest(&self, cpu: usize, stop: &AtomicBool) -> bool {
        let Some(mark) = self.in_guest.get(cpu) else { return true };
        mark.store(true, Ordering::SeqCst);
        if !self.paused_flag.load(Ordering::SeqCst) || stop.load(Ordering::Acquire) {
            return true;
        }
        mark.store(false, Ordering::SeqCst);
        false
    }

    /// Blocks while paused (unless `stop` is set), then marks `cpu` in the guest.
    fn enter_guest(&self, cpu: usize, stop: &AtomicBool) {
        while !self.try_enter_guest(cpu, stop) {
            let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
            while *paused && !stop.load(Ordering::Acquire) {
                paused = self.cond.wait(paused).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// [`Self::enter_guest`] for other modules' tests.
    #[cfg(test)]
    pub(crate) fn enter_guest_for_test(&self, cpu: usize, stop: &AtomicBool) {
        self.enter_guest(cpu, stop);
    }

    fn leave_guest(&self, cpu: usize) {
        if let Some(f) = self.in_guest.get(cpu) {
            f.store(false, Ordering::SeqCst);
        }
    }

    /// Parks a halted vCPU (out of the guest) until `stop` is set: a halted
    /// guest has nothing to wake it, since this VMM delivers no interrupts.
    /// Pausing and resuming leave it parked; [`Self::wake`] after setting
    /// `stop` ends the wait. The flag is read under the lock the waker
    /// takes, so the wake-up cannot be missed.
    fn park_until_stopped(&self, stop: &AtomicBool) {
        let mut guard = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while !stop.load(Ordering::Acquire) {
            guard = self.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wakes paused vCPUs so they can see a stop request.
    pub fn wake(&self) {
        let _guard = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }
}

/// A signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Installs the handler of [`kick_signal`] (once per process): it sets the
/// thread's `immediate_exit`, so the signal interrupts `KVM_RUN` with
/// `EINTR`, or makes the next one return at once, instead of killing the
/// process.
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
            // Async-signal-safe: a read of a const-initialized thread-local
            // with no destructor, and one byte store.
            let ptr = IMMEDIATE_EXIT.try_with(Cell::get).unwrap_or(std::ptr::null_mut());
            if !ptr.is_null() {
                // SAFETY: a non-null pointer is this thread's kvm_run mapping,
                // valid while its run loop (which clears it on exit) runs.
                unsafe { ptr.write_volatile(1) };
            }
        }
        // Registration only fails for an invalid signal number; SIGRTMIN is valid.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick);
    });
}

/// Runs vCPU `cpu` until it stops; returns why.
pub fn run(vcpu: &mut VcpuFd, cpu: u8, devices: &Arc<Devices>, control: &RunControl, stop: &AtomicBool) -> StopReason {
    if cpu == 0 {
        devices.timings.mark_once(&devices.timings.vcpu_first_entry);
    }
    let _immediate_exit = ImmediateExitGuard::set(vcpu);
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
            Err(e) => VcpuAction::Stop(StopReason::RunFailed(e)),
        };
        match action {
            VcpuAction::Continue => {}
            VcpuAction::Stop(reason) if reason.is_failure() => {
                let rip = vcpu.get_regs().ok().map(|r| r.rip);
                return reason.with_rip(rip);
            }
            VcpuAction::Stop(reason) => return reason,
            VcpuAction::Halt => {
                control.park_until_stopped(stop);
                return StopReason::Requested;
            }
            VcpuAction::ReadExceptionAndStop => {
                return match vcpu.get_regs() {
                    Ok(r) => StopReason::GuestException {
                        vector: r.rdi,
                        error_code: r.rsi,
                        rip: r.r8,
                        cr2: r.r9,
                        ring: (r.r10 & 3) as u8,
                    },
                    Err(e) => StopReason::ExceptionRegisters(e),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kick_handler_sets_immediate_exit_only_on_a_vcpu_thread() {
        install_kick_handler();
        let mut byte = 0u8;
        IMMEDIATE_EXIT.with(|c| c.set(&raw mut byte));
        // SAFETY: signals this thread; the handler is installed.
        unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        assert_eq!(byte, 1);
        // SAFETY: as above; with no vCPU the handler does nothing.
        unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
    }

    #[test]
    fn a_paused_vcpu_stays_out_of_the_guest_until_resumed_or_stopped() {
        let c = Arc::new(RunControl::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        c.enter_guest(0, &stop);
        assert!(c.in_guest(0), "not paused: straight in");
        c.leave_guest(0);
        c.set_paused(true);
        assert!(!c.try_enter_guest(0, &stop), "entered while paused");
        assert!(!c.in_guest(0), "a vCPU held by the pause is not marked in the guest");
        // A vCPU blocked by the pause gets in once the VM resumes.
        let (c2, s2) = (c.clone(), stop.clone());
        let t = std::thread::spawn(move || c2.enter_guest(0, &s2));
        c.set_paused(false);
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
    fn a_halted_vcpu_stays_parked_through_pause_and_resume_until_stopped() {
        let c = Arc::new(RunControl::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (c.clone(), stop.clone());
        let t = std::thread::spawn(move || c2.park_until_stopped(&s2));
        c.set_paused(true);
        c.set_paused(false);
        c.wake();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished(), "a wake-up without a stop left the park");
        assert!(!c.in_guest(0), "a parked vCPU is out of the guest, so a pause does not wait for it");
        stop.store(true, Ordering::Release);
        c.wake();
        t.join().unwrap();
    }
}

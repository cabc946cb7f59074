//! The controller's handle on a built VM: it starts the boot vCPU and the
//! application processors the guest asks for, pauses and resumes them, and
//! stops them. Each vCPU runs on its own thread and reports back through
//! [`VmEvent`]s; only the controller's thread calls into a [`Vm`].

use super::boot_thread::BootThread;
use super::stop::StopReason;
use super::vcpu::{self, RunControl};
use crate::arch;
use crate::config::VmConfig;
use crate::devices::Devices;
use crate::events::VmEvent;
use guest_abi::{ApBoot, AP_BOOT_MAGIC};
use kvm_bindings::kvm_sregs;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use crate::events::EventSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;

/// Stack size of vCPU threads: the run loop needs little, and every VM of a
/// density run pays for what its threads touch.
pub const VCPU_STACK: usize = 256 << 10;

/// How long a pause waits for vCPUs to leave the guest before it gives up.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(1);

/// How long a stop waits for vCPU threads to finish. A thread still busy
/// then (it cannot be in the guest: kicks end `KVM_RUN`) is left to the
/// process exit, so stopping a VM never takes longer than this plus the
/// console's last flush.
pub const STOP_DEADLINE: Duration = Duration::from_millis(500);

/// Between two rounds of kicks.
const KICK_INTERVAL: Duration = Duration::from_micros(200);

/// Between two looks at a vCPU thread that reported its stop and is
/// returning: it needs no kick, only a moment to finish.
const RETURN_POLL: Duration = Duration::from_micros(20);

/// Why a pause did not happen; the VM runs on.
#[derive(Debug, thiserror::Error)]
#[error("vCPUs {cpus:?} did not leave the guest within {} ms; the VM keeps running", deadline.as_millis())]
pub struct PauseError {
    pub cpus: Vec<u8>,
    pub deadline: Duration,
}

/// Kicks (`kick(cpu)`) every vCPU of `cpus` that `control` shows in the
/// guest until none is, or `deadline` passes; returns those still in then.
fn wait_out_of_guest(control: &RunControl, cpus: &[u8], deadline: Instant, kick: impl Fn(u8)) -> Result<(), Vec<u8>> {
    loop {
        let running: Vec<u8> = cpus.iter().copied().filter(|c| control.in_guest(*c as usize)).collect();
        if running.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(running);
        }
        running.iter().for_each(|c| kick(*c));
        std::thread::sleep(KICK_INTERVAL);
    }
}

/// Why the guest's application processors could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ApStartError {
    #[error("AP boot record has magic {magic:#x} and ABI version {version}")]
    BadRecord { magic: u32, version: u32 },
    #[error("the stack of CPU {cpu} lies beyond the address space")]
    StackOverflow { cpu: usize },
    #[error("cannot set up CPU {cpu}: {what}")]
    Vcpu {
        cpu: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start the thread of CPU {cpu}")]
    Thread {
        cpu: usize,
        #[source]
        source: std::io::Error,
    },
}

struct VcpuThread {
    cpu: u8,
    handle: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    /// The thread reported that it stopped (it is returning).
    stopped: bool,
}

/// What the builder hands over: a VM ready to start.
pub struct VmParts {
    pub config: VmConfig,
    pub kvm: Kvm,
    pub vm_fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub devices: Arc<Devices>,
    /// One vCPU per slot; the boot vCPU's registers are already set.
    pub vcpus: Vec<VcpuFd>,
    /// The boot vCPU's special registers (application processors start with them).
    pub boot_sregs: kvm_sregs,
    pub tsc_khz: Option<u32>,
    pub events: EventSender,
    /// The boot vCPU's thread, already running ahead of it (see
    /// [`BootThread`]); without one, [`Vm::start`] spawns it.
    pub boot_thread: Option<BootThread>,
}

/// A built VM.
pub struct Vm {
    pub config: VmConfig,
    _kvm: Kvm,
    _vm_fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub devices: Arc<Devices>,
    pending_vcpus: Vec<Option<VcpuFd>>,
    threads: Vec<VcpuThread>,
    event_tx: EventSender,
    boot_sregs: kvm_sregs,
    control: Arc<RunControl>,
    /// Guest TSC frequency, to turn guest cycle counts into time.
    pub tsc_khz: Option<u32>,
    boot_thread: Option<BootThread>,
}

impl Vm {
    /// A paused VM from the builder's parts; nothing runs until [`Vm::start`].
    pub fn new(p: VmParts) -> Vm {
        let n = p.vcpus.len();
        Vm {
            config: p.config,
            _kvm: p.kvm,
            _vm_fd: p.vm_fd,
            mem: p.mem,
            devices: p.devices,
            pending_vcpus: p.vcpus.into_iter().map(Some).collect(),
            threads: Vec::new(),
            event_tx: p.events,
            boot_sregs: p.boot_sregs,
            control: Arc::new(RunControl::new(n)),
            tsc_khz: p.tsc_khz,
            boot_thread: p.boot_thread,
        }
    }

    fn spawn_vcpu(&mut self, cpu: u8) -> Result<(), std::io::Error> {
        let Some(vcpu) = self.pending_vcpus.get_mut(cpu as usize).and_then(Option::take) else {
            return Ok(());
        };
        vcpu::install_kick_handler();
        let devices = self.devices.clone();
        let control = self.control.clone();
        let tx = self.event_tx.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let run = move |filtered: bool| {
            let mut vcpu = vcpu;
            if !filtered {
                crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu);
            }
            let reason = vcpu::run(&mut vcpu, cpu, &devices, &control, &stop2);
            let _ = tx.send(VmEvent::VcpuStopped { cpu, reason });
        };
        let boot_thread = if cpu == 0 { self.boot_thread.take() } else { None };
        let handle = match boot_thread {
            // Its filter is in place already.
            Some(thread) => thread.start(Box::new(move || run(true)))?,
            None => std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .stack_size(VCPU_STACK)
                .spawn(move || run(false))?,
        };
        self.threads.push(VcpuThread { cpu, handle, stop, stopped: false });
        Ok(())
    }

    /// Starts the boot vCPU.
    pub fn start(&mut self) -> Result<(), std::io::Error> {
        self.spawn_vcpu(0)
    }

    /// Starts the application processors the guest asked for; returns how many.
    pub fn start_aps(&mut self, rec: ApBoot) -> Result<usize, ApStartError> {
        if rec.magic != AP_BOOT_MAGIC || rec.abi_version != guest_abi::ABI_VERSION {
            return Err(ApStartError::BadRecord { magic: rec.magic, version: rec.abi_version });
        }
        let wanted = (rec.cpu_count as usize).min(self.pending_vcpus.len());
        let mut started = 0;
        for cpu in 1..wanted {
            let Some(Some(vcpu)) = self.pending_vcpus.get(cpu) else { continue };
            let stack_top = rec
                .stack_size
                .checked_mul(cpu as u64)
                .and_then(|off| rec.stacks_base.checked_add(off))
                .ok_or(ApStartError::StackOverflow { cpu })?;
            let kvm = |what| move |source| ApStartError::Vcpu { cpu, what, source };
            vcpu.set_sregs(&arch::long_mode_sregs(self.boot_sregs, rec.cr3)).map_err(kvm("KVM_SET_SREGS"))?;
            vcpu.set_regs(&arch::ap_regs(rec.entry, stack_top, cpu as u64)).map_err(kvm("KVM_SET_REGS"))?;
            vcpu.set_fpu(&arch::boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
            self.spawn_vcpu(cpu as u8).map_err(|source| ApStartError::Thread { cpu, source })?;
            started += 1;
        }
        Ok(started)
    }

    /// Notes that vCPU `cpu` stopped (its thread is returning).
    pub fn vcpu_stopped(&mut self, cpu: u8) {
        if let Some(t) = self.threads.iter_mut().find(|t| t.cpu == cpu) {
            t.stopped = true;
        }
    }

    /// Pauses the VM: holds commands, and keeps every vCPU out of the guest
    /// (kicking those in `KVM_RUN`). Returns once no vCPU runs guest code;
    /// if one still does after [`PAUSE_DEADLINE`], undoes the pause and
    /// says which.
    pub fn pause(&mut self) -> Result<(), PauseError> {
        self.control.set_paused(true);
        self.devices.set_paused(true);
        let cpus: Vec<u8> = self.threads.iter().filter(|t| !t.stopped).map(|t| t.cpu).collect();
        let result = wait_out_of_guest(&self.control, &cpus, Instant::now() + PAUSE_DEADLINE, |cpu| self.kick(cpu));
        result.map_err(|cpus| {
            self.resume();
            PauseError { cpus, deadline: PAUSE_DEADLINE }
        })
    }

    /// Sends the kick signal to vCPU `cpu`'s thread, if it is alive.
    fn kick(&self, cpu: u8) {
        if let Some(t) = self.threads.iter().find(|t| t.cpu == cpu && !t.handle.is_finished()) {
            // SAFETY: the thread is alive (not finished, not joined), so its
            // pthread_t is valid; the kick signal has a handler.
            unsafe { libc::pthread_kill(t.handle.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    /// Resumes a paused VM.
    pub fn resume(&mut self) {
        self.control.set_paused(false);
        self.devices.set_paused(false);
    }

    /// Stops every vCPU (waking blocked ones, kicking running ones out of
    /// `KVM_RUN`) and joins their threads, waiting at most
    /// [`STOP_DEADLINE`]; then flushes the console (with its own deadline).
    pub fn stop(&mut self) {
        self.devices.request_stop();
        for t in &self.threads {
            t.stop.store(true, Ordering::Release);
        }
        self.control.wake();
        let deadline = Instant::now() + STOP_DEADLINE;
        for t in self.threads.drain(..) {
            while !t.handle.is_finished() && Instant::now() < deadline {
                if t.stopped {
                    // Returning already (it reported its stop): no kick.
                    std::thread::sleep(RETURN_POLL);
                    continue;
                }
                // SAFETY: the thread is alive (not finished, not joined), so
                // its pthread_t is valid; the signal has a handler.
                unsafe { libc::pthread_kill(t.handle.as_pthread_t(), vcpu::kick_signal()) };
                std::thread::sleep(KICK_INTERVAL);
            }
            if t.handle.is_finished() {
                let _ = t.handle.join();
            }
        }
        self.devices.flush_console();
    }

}

/// Whether a stop of vCPU `cpu` for `reason` ends the whole VM: the boot
/// vCPU's stop always does, an application processor's only on a failure.
pub fn ends_vm(cpu: u8, reason: &StopReason) -> bool {
    cpu == 0 || reason.is_failure()
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_that_never_leaves_the_guest_fails_the_wait_instead_of_hanging() {
        let control = RunControl::new(2);
        let stop = AtomicBool::new(false);
        control.enter_guest_for_test(1, &stop);
        let kicks = std::sync::atomic::AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_millis(20);
        let r = wait_out_of_guest(&control, &[0, 1], deadline, |cpu| {
            assert_eq!(cpu, 1);
            kicks.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(r, Err(vec![1]));
        assert!(kicks.load(Ordering::Relaxed) > 0, "it was kicked");
        assert_eq!(wait_out_of_guest(&control, &[0], Instant::now(), |_| {}), Ok(()));
    }
}

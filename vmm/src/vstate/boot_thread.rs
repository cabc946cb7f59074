//! The boot vCPU's thread, started when the build begins rather than after
//! it ([`BootThread`]). Start-up is a chain whose every link waits for the
//! one before; this takes the boot vCPU's own links out of it:
//!
//! - `KVM_GET_SUPPORTED_CPUID`: hundreds of µs on a PVM host, where every
//!   host `cpuid` instruction the kernel runs to answer it traps;
//! - `KVM_CREATE_VCPU` (a few hundred µs: on a VM without an in-kernel
//!   irqchip KVM patches a static key of its own code on every CPU when the
//!   first such vCPU of the host appears), `KVM_SET_CPUID2` and the
//!   long-mode special registers;
//! - installing the vCPU thread's seccomp filter: the kernel checks and
//!   JIT-compiles it, about 0.3 ms.
//!
//! The thread fetches the CPUID while the main thread creates the VM and
//! registers its boot memory, then creates and sets up vCPU 0
//! ([`BootThread::set_up`]) while the main thread loads the kernel and
//! writes the boot data, and hands the vCPU back
//! ([`BootThread::boot_vcpu`]); only the entry registers, which need the
//! loaded kernel, are left to the main thread. (The memslots go first: a
//! memslot change while a vCPU is being created waits for the creation's
//! SRCU read side, milliseconds on a loaded host.)
//! It then installs its filter and waits for its run loop
//! ([`BootThread::start`]). If the VM is never started (a build error, a
//! dropped VM) the thread sees its channels close and returns, so it never
//! outlives what it was started for by more than the ioctl it is in.

use crate::arch::{self, layout};
use crate::seccomp::{self, ThreadKind};
use kvm_bindings::{kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::ffi::CString;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// What the thread runs once started: the vCPU's run loop.
pub type Job = Box<dyn FnOnce() + Send>;

/// vCPU 0 as the thread set it up: CPUID, long-mode special registers and
/// FPU are in place; the general registers (the entry point) are not.
pub struct BootVcpu {
    pub fd: VcpuFd,
    pub sregs: kvm_sregs,
    pub tsc_khz: Option<u32>,
    /// KVM's supported CPUID (unpatched), for the other vCPUs; `None` if
    /// KVM could not give it, and then no vCPU gets `KVM_SET_CPUID2`.
    pub cpuid: Option<CpuId>,
}

/// Why the thread could not set up vCPU 0.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed")]
pub struct BootVcpuError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

type SetUp = Result<BootVcpu, BootVcpuError>;

/// A vCPU thread that runs ahead of its vCPU.
pub struct BootThread {
    vm: Option<mpsc::Sender<Arc<VmFd>>>,
    vcpu: Option<mpsc::Receiver<SetUp>>,
    job: mpsc::Sender<Job>,
    handle: JoinHandle<()>,
}

impl BootThread {
    /// Starts thread `name` with a `stack`-byte stack: it opens `kvm_path`
    /// and fetches the supported CPUID, sets up vCPU 0 once given the VM
    /// ([`BootThread::set_up`]), installs the vCPU seccomp filter (if
    /// [`seccomp::enable`] ran) and waits for [`BootThread::start`].
    pub fn spawn(name: String, stack: usize, kvm_path: CString) -> std::io::Result<BootThread> {
        let (vm_tx, vm_rx) = mpsc::channel::<Arc<VmFd>>();
        let (vcpu_tx, vcpu_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new().name(name).stack_size(stack).spawn(move || {
            // Its own descriptor of /dev/kvm (the main thread keeps using
            // its own), closed again before the filter, which forbids open.
            let cpuid = Kvm::new_with_path(kvm_path).ok().and_then(|kvm| kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok());
            if let Ok(vm) = vm_rx.recv() {
                let _ = vcpu_tx.send(set_up_vcpu(&vm, cpuid));
            }
            // No vCPU comes from here after this: a waiting `boot_vcpu` returns.
            drop(vcpu_tx);
            seccomp::apply(ThreadKind::Vcpu);
            if let Ok(job) = job_rx.recv() {
                job();
            }
        })?;
        Ok(BootThread { vm: Some(vm_tx), vcpu: Some(vcpu_rx), job: job_tx, handle })
    }

    /// Has the thread create vCPU 0 of `vm` and set it up; the main thread
    /// goes on at once. Only the first call counts.
    pub fn set_up(&mut self, vm: Arc<VmFd>) {
        if let Some(tx) = self.vm.take() {
            let _ = tx.send(vm);
        }
    }

    /// Waits for the vCPU [`BootThread::set_up`] asked for; `None` if the
    /// thread ended without one (or it was asked before, or never set up).
    pub fn boot_vcpu(&mut self) -> Option<SetUp> {
        // Never set up: closing the VM's channel lets the thread go on.
        self.vm = None;
        self.vcpu.take().and_then(|rx| rx.recv().ok())
    }

    /// Runs `job` on the thread (its seccomp filter is in place by then);
    /// returns the thread's handle.
    pub fn start(self, job: Job) -> std::io::Result<JoinHandle<()>> {
        self.job.send(job).map_err(|_| std::io::Error::other("the vCPU thread ended before its vCPU started"))?;
        Ok(self.handle)
    }
}

/// Creates vCPU 0 of `vm` with `cpuid` (patched for it) if there is one,
/// in long mode with the boot page tables, and a clean FPU.
fn set_up_vcpu(vm: &VmFd, cpuid: Option<CpuId>) -> SetUp {
    let err = |what| move |source| BootVcpuError { what, source };
    let fd = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
    let mut tsc_khz = None;
    if let Some(c) = &cpuid {
        let mut c: CpuId = c.clone();
        tsc_khz = fd.get_tsc_khz().ok();
        arch::patch_cpuid(&mut c, 0, tsc_khz);
        fd.set_cpuid2(&c).map_err(err("KVM_SET_CPUID2"))?;
    }
    let sregs = arch::long_mode_sregs(fd.get_sregs().map_err(err("KVM_GET_SREGS"))?, layout::PML4_START);
    fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    fd.set_fpu(&arch::boot_fpu()).map_err(err("KVM_SET_FPU"))?;
    Ok(BootVcpu { fd, sregs, tsc_khz, cpuid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_runs_on_the_named_thread_and_an_unstarted_thread_returns() {
        let mut t = BootThread::spawn("vcpu7".into(), 256 << 10, c"/nonexistent/kvm".into()).unwrap();
        assert!(t.boot_vcpu().is_none(), "never given a VM");
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || tx.send(std::thread::current().name().map(String::from)).unwrap());
        t.start(job).unwrap().join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("vcpu7"));

        // Dropped without a VM or a job (a build that failed): the thread ends.
        let BootThread { job, vm, handle, .. } = BootThread::spawn("vcpu0".into(), 256 << 10, c"/dev/kvm".into()).unwrap();
        drop((job, vm));
        handle.join().unwrap();
    }

    #[test]
    fn the_thread_sets_up_vcpu_0_in_long_mode_once() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mut t = BootThread::spawn("vcpu0".into(), 256 << 10, c"/dev/kvm".into()).unwrap();
        t.set_up(vm.clone());
        t.set_up(vm.clone());
        let v = t.boot_vcpu().expect("an answer").expect("a vCPU");
        assert!(t.boot_vcpu().is_none(), "handed over once");
        assert!(v.cpuid.is_some(), "this host's KVM gives its CPUID");
        let sregs = v.fd.get_sregs().unwrap();
        assert_eq!((sregs.cr3, sregs.efer & v.sregs.efer), (layout::PML4_START, v.sregs.efer));
        assert_ne!(sregs.efer & (1 << 10), 0, "long mode active (EFER.LMA)");
        // vCPU 0 exists: KVM refuses it again.
        assert!(vm.create_vcpu(0).is_err());
        drop(t);
    }
}

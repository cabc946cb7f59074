//! The boot vCPU's thread, started when the build begins rather than after
//! it ([`BootThread`]). Start-up is a chain whose every link waits for the
//! one before; this takes two links out of it:
//!
//! - `KVM_GET_SUPPORTED_CPUID`: hundreds of µs on a PVM host, where every
//!   host `cpuid` instruction the kernel runs to answer it traps;
//! - installing the vCPU thread's seccomp filter: the kernel checks and
//!   JIT-compiles it, about 0.3 ms.
//!
//! The thread does both while the main thread creates the VM, maps guest
//! RAM and loads the kernel (which asks KVM for the CPUID itself if the
//! thread has not got it by then), then waits for its run loop
//! ([`BootThread::start`]). If the VM is never started (a build error, a
//! dropped VM) the thread sees its job channel close and returns, so it
//! never outlives what it was started for by more than that one ioctl.

use crate::seccomp::{self, ThreadKind};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use std::ffi::CString;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// What the thread runs once started: the vCPU's run loop.
pub type Job = Box<dyn FnOnce() + Send>;

/// A vCPU thread that runs ahead of its vCPU.
pub struct BootThread {
    cpuid: Option<mpsc::Receiver<Option<CpuId>>>,
    job: mpsc::Sender<Job>,
    handle: JoinHandle<()>,
}

impl BootThread {
    /// Starts thread `name` with a `stack`-byte stack: it opens `kvm_path`,
    /// fetches the supported CPUID, installs the vCPU seccomp filter (if
    /// [`seccomp::enable`] ran) and waits for [`BootThread::start`].
    pub fn spawn(name: String, stack: usize, kvm_path: CString) -> std::io::Result<BootThread> {
        let (cpuid_tx, cpuid_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new().name(name).stack_size(stack).spawn(move || {
            // Its own descriptor of /dev/kvm (the main thread keeps using
            // its own), closed again before the filter, which forbids open.
            let cpuid = Kvm::new_with_path(kvm_path).ok().and_then(|kvm| kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok());
            let _ = cpuid_tx.send(cpuid);
            seccomp::apply(ThreadKind::Vcpu);
            if let Ok(job) = job_rx.recv() {
                job();
            }
        })?;
        Ok(BootThread { cpuid: Some(cpuid_rx), job: job_tx, handle })
    }

    /// The CPUID KVM supports, if the thread has fetched it by now; `None`
    /// if it has not yet (on a loaded host a new thread may wait
    /// milliseconds for a CPU), could not, or was asked before. The caller
    /// then asks KVM itself: the main thread never waits for this one.
    pub fn supported_cpuid(&mut self) -> Option<CpuId> {
        self.cpuid.take().and_then(|rx| rx.try_recv().ok().flatten())
    }

    /// Runs `job` on the thread (its seccomp filter is in place by then);
    /// returns the thread's handle.
    pub fn start(self, job: Job) -> std::io::Result<JoinHandle<()>> {
        self.job.send(job).map_err(|_| std::io::Error::other("the vCPU thread ended before its vCPU started"))?;
        Ok(self.handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_runs_on_the_named_thread_and_an_unstarted_thread_returns() {
        let mut t = BootThread::spawn("vcpu7".into(), 256 << 10, c"/nonexistent/kvm".into()).unwrap();
        assert!(t.supported_cpuid().is_none(), "no KVM there (or not yet)");
        assert!(t.supported_cpuid().is_none(), "asked twice");
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || tx.send(std::thread::current().name().map(String::from)).unwrap());
        t.start(job).unwrap().join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("vcpu7"));

        // Dropped without a job (a build that failed): the thread ends.
        let BootThread { job, handle, .. } = BootThread::spawn("vcpu0".into(), 256 << 10, c"/dev/kvm".into()).unwrap();
        drop(job);
        handle.join().unwrap();
    }
}

//! The boot vCPU's thread, started when the build begins rather than after
//! it ([`BootThread`]). Start-up is a chain whose every link waits for the
//! one before; this takes links out of it:
//!
//! - `KVM_GET_SUPPORTED_CPUID`: hundreds of µs on a PVM host, where every
//!   host `cpuid` instruction the kernel runs to answer it traps;
//! - installing the vCPU thread's seccomp filter: the kernel checks and
//!   JIT-compiles it, about 0.3 ms;
//! - whatever the builder gives it to run ahead of the run loop
//!   ([`BootThread::ahead`]): the boot memslots, whose every
//!   `KVM_SET_USER_MEMORY_REGION` waits for an SRCU grace period (a kworker
//!   round trip, 0.1 to several ms). They are *handed* to it
//!   ([`BootThread::hand`]): work the main thread takes back and runs
//!   itself if the thread has not begun it by the time the main thread
//!   would rather not wait (the thread still fetching the CPUID, or not yet
//!   scheduled on a busy host).
//!
//! The thread does the first two while the main thread creates the VM, maps
//! guest RAM and loads the kernel (which asks KVM for the CPUID itself if the
//! thread has not got it by then), then runs its jobs in the order they
//! were sent, under its filter: the ahead-jobs, then its run loop
//! ([`BootThread::start`]). If the VM is never started (a build error, a
//! dropped VM) the thread sees its job channel close once it has run the
//! ahead-jobs already sent, and returns, so it never outlives what it was
//! started for by more than those jobs and that one ioctl.

use crate::seccomp::{self, ThreadKind};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use std::ffi::CString;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// What the thread runs: a job ahead of the run loop, or the vCPU's run loop.
pub type Job = Box<dyn FnOnce() + Send>;

/// One job for the thread, in the order sent.
enum Message {
    /// Run it and wait for the next one ([`BootThread::ahead`]).
    Ahead(Job),
    /// Run it, then return: the vCPU's run loop ([`BootThread::start`]).
    Run(Job),
}

/// Work for [`BootThread::hand`], which returns a `T`.
type Work<T> = Box<dyn FnOnce() -> T + Send>;

/// A vCPU thread that runs ahead of its vCPU.
pub struct BootThread {
    cpuid: Option<mpsc::Receiver<Option<CpuId>>>,
    jobs: mpsc::Sender<Message>,
    handle: JoinHandle<()>,
}

impl BootThread {
    /// Starts thread `name` with a `stack`-byte stack: it opens `kvm_path`,
    /// fetches the supported CPUID, installs the vCPU seccomp filter (if
    /// [`seccomp::enable`] ran), then runs the jobs of [`BootThread::ahead`]
    /// as they come until [`BootThread::start`].
    pub fn spawn(name: String, stack: usize, kvm_path: CString) -> std::io::Result<BootThread> {
        let (cpuid_tx, cpuid_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel::<Message>();
        let handle = std::thread::Builder::new().name(name).stack_size(stack).spawn(move || {
            // Its own descriptor of /dev/kvm (the main thread keeps using
            // its own), closed again before the filter, which forbids open.
            let cpuid = Kvm::new_with_path(kvm_path).ok().and_then(|kvm| kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok());
            let _ = cpuid_tx.send(cpuid);
            seccomp::apply(ThreadKind::Vcpu);
            while let Ok(message) = job_rx.recv() {
                match message {
                    Message::Ahead(job) => job(),
                    Message::Run(job) => return job(),
                }
            }
        })?;
        Ok(BootThread { cpuid: Some(cpuid_rx), jobs: job_tx, handle })
    }

    /// The CPUID KVM supports, if the thread has fetched it by now; `None`
    /// if it has not yet (on a loaded host a new thread may wait
    /// milliseconds for a CPU), could not, or was asked before. The caller
    /// then asks KVM itself: the main thread never waits for this one.
    pub fn supported_cpuid(&mut self) -> Option<CpuId> {
        self.cpuid.take().and_then(|rx| rx.try_recv().ok().flatten())
    }

    /// Has the thread run `job` ahead of its run loop, after the jobs sent
    /// before it, under its seccomp filter (so `job` may do only what a
    /// vCPU thread may). Returns at once; the caller learns of the job's
    /// end from the job itself (a channel it captured). If the thread is
    /// gone, `job` comes back, for the caller to run itself.
    pub fn ahead(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(Message::Ahead(job)).map_err(|mpsc::SendError(m)| match m {
            Message::Ahead(job) | Message::Run(job) => job,
        })
    }

    /// Hands `work` to the thread as an ahead-job ([`BootThread::ahead`])
    /// that the caller may take back while the thread has not begun it
    /// ([`Handed::run_here_unless_begun`]): whoever begins it first runs
    /// it, once. If the thread is gone, the caller runs it.
    pub fn hand<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Handed<T> {
        let work: Arc<Mutex<Option<Work<T>>>> = Arc::new(Mutex::new(Some(Box::new(work))));
        let (tx, result) = mpsc::channel();
        let slot = work.clone();
        // A job that comes back (the thread is gone) is dropped: the work
        // stays in its slot for the caller.
        let _ = self.ahead(Box::new(move || {
            if let Some(work) = take(&slot) {
                let _ = tx.send(work());
            }
        }));
        Handed { work, result, here: None }
    }

    /// Runs `job` on the thread once the ahead-jobs sent before it have run
    /// (its seccomp filter is in place by then); returns the thread's
    /// handle.
    pub fn start(self, job: Job) -> std::io::Result<JoinHandle<()>> {
        self.jobs
            .send(Message::Run(job))
            .map_err(|_| std::io::Error::other("the vCPU thread ended before its vCPU started"))?;
        Ok(self.handle)
    }
}

/// Work handed to the boot thread ([`BootThread::hand`]), run by the thread
/// ahead of its run loop or by the caller, whichever begins it first.
pub struct Handed<T> {
    work: Arc<Mutex<Option<Work<T>>>>,
    result: mpsc::Receiver<T>,
    here: Option<T>,
}

impl<T> Handed<T> {
    /// Runs the work on this thread now unless the boot thread has begun
    /// it (or it ran here before); returns whether it ran here now.
    pub fn run_here_unless_begun(&mut self) -> bool {
        match take(&self.work) {
            Some(work) => {
                self.here = Some(work());
                true
            }
            None => false,
        }
    }

    /// The work's result: waits for the boot thread if it began the work,
    /// runs it here if nobody has. `None` if the thread began it and ended
    /// without finishing it.
    pub fn wait(mut self) -> Option<T> {
        self.run_here_unless_begun();
        self.here.or_else(|| self.result.recv().ok())
    }
}

/// Takes the work out of its slot: the one who gets it runs it.
fn take<T>(slot: &Mutex<Option<Work<T>>>) -> Option<Work<T>> {
    // A plain slot, consistent at every step: a panic elsewhere leaves it usable.
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
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
        let BootThread { jobs, handle, .. } = BootThread::spawn("vcpu0".into(), 256 << 10, c"/dev/kvm".into()).unwrap();
        drop(jobs);
        handle.join().unwrap();
    }

    #[test]
    fn ahead_jobs_run_in_order_on_the_thread_before_the_run_job() {
        let t = BootThread::spawn("vcpu3".into(), 256 << 10, c"/nonexistent/kvm".into()).unwrap();
        let (tx, rx) = mpsc::channel();
        let job = |what: &'static str| -> Job {
            let tx = tx.clone();
            Box::new(move || tx.send((what, std::thread::current().name().map(String::from))).unwrap())
        };
        for what in ["first", "second", "third"] {
            assert!(t.ahead(job(what)).is_ok());
        }
        t.start(job("run")).unwrap().join().unwrap();
        drop(tx);
        let ran: Vec<_> = rx.iter().collect();
        let on = Some("vcpu3".to_string());
        assert_eq!(ran, [("first", on.clone()), ("second", on.clone()), ("third", on.clone()), ("run", on)]);

        // Sent to a thread that is gone: the job comes back, not run.
        let (jobs, gone) = mpsc::channel();
        drop(gone);
        let t = BootThread { cpuid: None, jobs, handle: std::thread::spawn(|| {}) };
        let (tx, rx) = mpsc::channel();
        let Err(back) = t.ahead(Box::new(move || tx.send(()).unwrap())) else { panic!("the job comes back") };
        assert!(rx.try_recv().is_err(), "not run");
        back();
        assert!(rx.try_recv().is_ok(), "the caller can run it");
        assert!(t.start(Box::new(|| {})).is_err());
    }

    #[test]
    fn handed_work_runs_once_on_whichever_thread_begins_it() {
        let name = || std::thread::current().name().map(String::from);
        // The thread is held up by an ahead-job until the caller lets it
        // go, so the caller takes the work back before the thread begins it.
        let t = BootThread::spawn("vcpu5".into(), 256 << 10, c"/nonexistent/kvm".into()).unwrap();
        let (go, held) = mpsc::channel::<()>();
        assert!(t.ahead(Box::new(move || held.recv().unwrap())).is_ok());
        let mut h = t.hand(name);
        assert!(h.run_here_unless_begun(), "the thread has not begun it");
        assert!(!h.run_here_unless_begun(), "it ran once");
        go.send(()).unwrap();
        assert_eq!(h.wait(), Some(name()), "run here");
        t.start(Box::new(|| {})).unwrap().join().unwrap();

        // The thread begins it first (its run job starts after it): the
        // caller can no longer take it back and waits for its result.
        let t = BootThread::spawn("vcpu6".into(), 256 << 10, c"/nonexistent/kvm".into()).unwrap();
        let mut h = t.hand(name);
        let (ran, ran_rx) = mpsc::channel();
        t.start(Box::new(move || ran.send(()).unwrap())).unwrap().join().unwrap();
        ran_rx.recv().unwrap();
        assert!(!h.run_here_unless_begun(), "begun by the thread");
        assert_eq!(h.wait(), Some(Some("vcpu6".to_string())));

        // Handed to a thread that is gone: the caller runs it.
        let (jobs, gone) = mpsc::channel();
        drop(gone);
        let t = BootThread { cpuid: None, jobs, handle: std::thread::spawn(|| {}) };
        assert_eq!(t.hand(name).wait(), Some(name()));
    }
}

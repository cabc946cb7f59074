//! Seccomp: every thread of a VMM process runs under an allow-list of the
//! system calls it needs, as in Firecracker; the programs are written here
//! (`compact_program`, a third of the length `seccompiler` writes for the
//! same rules, which it also tests against) and installed with
//! `seccompiler` (rust-vmm). A guest or API client that takes over a thread gets no
//! `execve`, no `socket`/`connect`, no `ptrace`, and on the vCPU threads no
//! `open` and no KVM ioctl but the few a vCPU makes.
//!
//! 1. [`enable`] runs once on the main thread, before any VMM thread starts
//!    (`vmm run` and `vmm serve` call it unless `--no-seccomp`). It compiles
//!    every thread kind's filter, sets `no_new_privs`, caps the resource
//!    limits ([`limit_resources`]) and installs the `SIGSYS` handler.
//! 2. Each thread calls [`apply`] with its [`ThreadKind`] first thing: the
//!    vCPU threads before their first `KVM_RUN`, and the main thread before
//!    it enters the controller's event loop (which serves the API and reads
//!    the stop signals on the same thread). Without [`enable`] (tests, the
//!    lab, `--no-seccomp`) [`apply`] does nothing.
//! 3. A forbidden system call is trapped (`SECCOMP_RET_TRAP`): the thread
//!    gets `SIGSYS`, whose handler writes one line to stderr naming the
//!    thread and the call, then the process dies of `SIGSYS` (no core dump:
//!    `RLIMIT_CORE` is 0, so guest memory never lands in a core file).
//!
//! Filters stack: a thread started after the main thread applied its filter
//! runs under the main filter too. The vCPU threads of `vmm serve` and every
//! application processor start that way (the controller spawns them from its
//! loop); so the main list includes theirs
//! ([`ThreadKind::started_by_main`]). A thread that installs no filter of its
//! own (say, a new helper spawned by the controller) runs under the main
//! list. A new thread kind is one [`ThreadKind`] variant with
//! its list (`ThreadKind::own_syscalls`).
//!
//! The lists come from `strace -f` of every workload, every API endpoint,
//! `vmm run --report` and the lab's children (docs/security.md).

use kvm_bindings::{
    kvm_cpuid2, kvm_fpu, kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVMIO,
};
use seccompiler::BpfProgram;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// The kinds of thread a VMM process runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread: a current-thread tokio runtime that runs the
    /// controller's event loop, which builds the VM (`vmm serve` does at
    /// `InstanceStart`), reads the host's view of memory, writes the log and
    /// metrics files and stops the vCPUs; the API server's tasks; and the
    /// stop signals' `signalfd`.
    Main,
    /// A vCPU: `KVM_RUN` and device I/O.
    Vcpu,
}

/// A system call by name and number.
type Syscall = (&'static str, i64);

macro_rules! sys {
    ($($name:ident),* $(,)?) => { &[$((stringify!($name), libc::$name)),*] };
}

/// What every thread needs: memory (malloc, thread stacks), locks and
/// channels (futex), time, writing a line to stderr, signals (the vCPU kick,
/// `SIGSYS` itself, abort), and ending.
const COMMON: &[Syscall] = sys![
    SYS_brk, SYS_mmap, SYS_munmap, SYS_mremap, SYS_mprotect, SYS_madvise,
    SYS_futex, SYS_sched_yield, SYS_sched_getaffinity, SYS_getrandom,
    SYS_clock_gettime, SYS_clock_nanosleep, SYS_nanosleep,
    SYS_write, SYS_writev, SYS_close, SYS_poll, SYS_ppoll,
    SYS_rt_sigreturn, SYS_rt_sigprocmask, SYS_rt_sigaction, SYS_sigaltstack, SYS_restart_syscall,
    SYS_getpid, SYS_gettid, SYS_tgkill,
    SYS_exit, SYS_exit_group,
];

/// The main thread, besides [`COMMON`] and the lists of the threads it starts.
const MAIN: &[Syscall] = sys![
    // Files: the kernel image, /dev/kvm, /proc/self/smaps, the log, metrics
    // and serial files.
    SYS_openat, SYS_read, SYS_pread64, SYS_lseek, SYS_fstat, SYS_newfstatat, SYS_statx,
    SYS_fcntl, SYS_ftruncate, SYS_readlink,
    // The host's view of guest memory.
    SYS_mincore,
    // Removing the API socket at exit.
    SYS_unlink, SYS_unlinkat,
    // Starting vCPU and helper threads.
    SYS_clone, SYS_clone3, SYS_set_robust_list, SYS_rseq,
    // The runtime (epoll, its eventfd waker), created as the loop starts,
    // and waiting with a deadline.
    SYS_epoll_create1, SYS_eventfd2, SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_epoll_ctl,
    SYS_timerfd_create, SYS_timerfd_settime, SYS_timerfd_gettime,
    // The stop signals' signalfd.
    SYS_signalfd4,
    // The API: accepting and serving connections on the socket bound before
    // the filter (no `socket`, `bind` or `connect`).
    SYS_accept4, SYS_recvfrom, SYS_recvmsg, SYS_readv, SYS_sendto, SYS_sendmsg,
    SYS_shutdown, SYS_getsockopt,
];

/// A vCPU thread, besides [`COMMON`] and its KVM ioctls: `mincore`, so a
/// reclaim report counts only what the host had resident in the memory it
/// discards (`vmm/src/memory/reclaim.rs`).
const VCPU: &[Syscall] = sys![SYS_mincore];

/// What the vCPU threads may try and must not do, and what fails
/// quietly with `EACCES` instead of stopping the VMM: glibc's malloc opens
/// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's
/// heap, on whichever thread that is (and copes when it cannot).
const DENIED_QUIETLY: &[Syscall] = sys![SYS_openat];

/// An ioctl request by name and number.
type Ioctl = (&'static str, u32);

const fn io(nr: u32) -> u32 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u32
}
const fn ior<T>(nr: u32) -> u32 {
    ioctl_expr(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>() as u32) as u32
}
const fn iow<T>(nr: u32) -> u32 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>() as u32) as u32
}
const fn iowr<T>(nr: u32) -> u32 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>() as u32) as u32
}

/// The ioctls of a vCPU thread: run, read its registers for a failure
/// report, register a memory block the guest onlines.
const VCPU_IOCTLS: &[Ioctl] = &[
    ("KVM_RUN", io(0x80)),
    ("KVM_GET_REGS", ior::<kvm_regs>(0x81)),
    ("KVM_SET_REGS", iow::<kvm_regs>(0x82)),
    ("KVM_GET_SREGS", ior::<kvm_sregs>(0x83)),
    ("KVM_SET_SREGS", iow::<kvm_sregs>(0x84)),
    ("KVM_SET_USER_MEMORY_REGION", iow::<kvm_userspace_memory_region>(0x46)),
];

/// The ioctls of the main thread besides [`VCPU_IOCTLS`]: creating the VM
/// and its vCPUs, and setting up the application processors.
const MAIN_IOCTLS: &[Ioctl] = &[
    ("KVM_GET_API_VERSION", io(0x00)),
    ("KVM_CREATE_VM", io(0x01)),
    ("KVM_CHECK_EXTENSION", io(0x03)),
    ("KVM_GET_VCPU_MMAP_SIZE", io(0x04)),
    ("KVM_GET_SUPPORTED_CPUID", iowr::<kvm_cpuid2>(0x05)),
    ("KVM_CREATE_VCPU", io(0x41)),
    ("KVM_GET_FPU", ior::<kvm_fpu>(0x8c)),
    ("KVM_SET_FPU", iow::<kvm_fpu>(0x8d)),
    ("KVM_SET_CPUID2", iow::<kvm_cpuid2>(0x90)),
    ("KVM_GET_TSC_KHZ", io(0xa3)),
    ("FIONBIO", libc::FIONBIO as u32),
    ("FIOCLEX", libc::FIOCLEX as u32),
];

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 2] = [ThreadKind::Main, ThreadKind::Vcpu];

    /// The name this documentation and the violation message use.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
        }
    }

    /// Whether threads of this kind can start after the main thread applied
    /// its filter, and so run under it as well as under their own.
    pub fn started_by_main(self) -> bool {
        matches!(self, ThreadKind::Vcpu)
    }

    /// The system calls of this kind besides [`COMMON`] (main: besides the
    /// threads it starts too).
    fn own_syscalls(self) -> &'static [Syscall] {
        match self {
            ThreadKind::Main => MAIN,
            ThreadKind::Vcpu => VCPU,
        }
    }

    fn own_ioctls(self) -> &'static [Ioctl] {
        match self {
            ThreadKind::Main => MAIN_IOCTLS,
            ThreadKind::Vcpu => VCPU_IOCTLS,
        }
    }

    /// The calls that fail with `EACCES` on this kind of thread.
    pub fn denied_quietly(self) -> &'static [(&'static str, i64)] {
        match self {
            ThreadKind::Main => &[],
            ThreadKind::Vcpu => DENIED_QUIETLY,
        }
    }

    /// The kinds whose lists this kind's filter includes: itself, and for
    /// the main thread every kind it starts.
    fn covered(self) -> impl Iterator<Item = ThreadKind> {
        ThreadKind::ALL.into_iter().filter(move |&k| k == self || (self == ThreadKind::Main && k.started_by_main()))
    }

    /// Every system call this kind may make, by name, sorted (`ioctl` is
    /// among them when [`ThreadKind::ioctls`] is not empty; the quiet
    /// denials are not).
    pub fn syscalls(self) -> Vec<&'static str> {
        let quiet: Vec<i64> = self.denied_quietly().iter().map(|&(_, nr)| nr).collect();
        let allowed = self.rules().into_keys().filter(|nr| !quiet.contains(nr));
        let mut names: Vec<_> = allowed.map(|nr| syscall_name(nr).unwrap_or("?")).collect();
        names.sort_unstable();
        names
    }

    /// The ioctl requests this kind may make, by name.
    pub fn ioctls(self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.covered().flat_map(|k| k.own_ioctls()).map(|&(n, _)| n).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The filter's rules: syscall number to what its arguments may be.
    fn rules(self) -> BTreeMap<i64, Args> {
        let mut rules = BTreeMap::new();
        let calls = COMMON.iter().chain(self.covered().flat_map(|k| k.own_syscalls()));
        // A quiet denial is listed here and refused before the allow-list.
        for &(_, nr) in calls.chain(self.denied_quietly()) {
            rules.insert(nr, Args::Any);
        }
        // Read limits only: setting them could raise them again (the VMM may
        // run as root).
        rules.insert(libc::SYS_prlimit64, Args::Qword(2, vec![0]));
        if self == ThreadKind::Main {
            // A thread started from here names itself, then installs its own
            // filter (seccompiler sets no_new_privs again): stacking filters
            // can only take calls away.
            let ops = [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS];
            rules.insert(libc::SYS_prctl, Args::Qword(0, ops.iter().map(|&op| op as u64).collect()));
            rules.insert(libc::SYS_seccomp, Args::Qword(0, vec![libc::SECCOMP_SET_MODE_FILTER.into()]));
        }
        let ioctls: Vec<u32> = self.covered().flat_map(|k| k.own_ioctls()).map(|&(_, req)| req).collect();
        if !ioctls.is_empty() {
            rules.insert(libc::SYS_ioctl, Args::Dword(1, ioctls));
        }
        rules
    }

    /// Compiles this kind's filter to BPF: one program per thread kind, as
    /// short as it can be (`compact_program`). Installing a program costs
    /// the kernel a check and a JIT compilation that grow with its length,
    /// on the way to the guest's first instruction (the vCPU's) or beside
    /// it (the main thread's). seccompiler's programs for the same rules
    /// are 446 instructions for the main thread and 196 for a vCPU, and took
    /// 0.49-0.53 and 0.24 ms (median) to install; these are 109 and 50, and
    /// take 0.23-0.25 and 0.12 ms (host under load 5.6, 15 installs each).
    pub fn compile(self) -> Result<Vec<BpfProgram>, SeccompError> {
        let quiet: Vec<i64> = self.denied_quietly().iter().map(|&(_, nr)| nr).collect();
        let program = compact_program(&self.rules(), &quiet, libc::EACCES as u32).ok_or(SeccompError::TooLong(self.name()))?;
        Ok(vec![program])
    }
}

/// What a rule allows of a system call's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Args {
    /// Any arguments.
    Any,
    /// Argument `.0` (all 64 bits) is one of these.
    Qword(u8, Vec<u64>),
    /// The low 32 bits of argument `.0` are one of these (the kernel reads
    /// an ioctl's request as an `unsigned int`).
    Dword(u8, Vec<u32>),
}

/// BPF instruction classes and fields (`<linux/filter.h>`, `<linux/bpf_common.h>`).
/// `BPF_LD | BPF_W | BPF_ABS`.
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;
/// Offsets of `nr`, `arch` and `args[0]` in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const SECCOMP_DATA_ARGS: u32 = 16;
/// `AUDIT_ARCH_X86_64` (`<linux/audit.h>`).
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// Where a jump of [`compact_program`] goes, resolved once the program's
/// length is known.
#[derive(Clone, Copy)]
enum To {
    /// The next instruction.
    Next,
    /// `n` instructions further on.
    Skip(u8),
    /// The program's closing `RET` of each kind.
    Trap,
    Allow,
    Errno,
}

/// One instruction before its jumps are resolved.
struct Insn {
    code: u16,
    k: u32,
    jt: To,
    jf: To,
}

fn load(offset: u32) -> Insn {
    Insn { code: BPF_LD_W_ABS, k: offset, jt: To::Next, jf: To::Next }
}

fn jeq(k: u32, jt: To, jf: To) -> Insn {
    Insn { code: BPF_JEQ_K, k, jt, jf }
}

/// The offsets of the low and high halves of argument `index` (x86-64 is
/// little-endian).
fn arg_halves(index: u8) -> (u32, u32) {
    let lo = SECCOMP_DATA_ARGS + 8 * u32::from(index);
    (lo, lo + 4)
}

/// The filter program for `rules`, with the calls `quiet` failing with
/// `errno`, everything else trapping (`SECCOMP_RET_TRAP`), and another
/// architecture than x86-64 ending the process, as seccompiler's programs
/// do. `None` if a jump would be longer than BPF's 255 instructions.
///
/// The layout: check the architecture, load `nr`, then one `JEQ` per call
/// that jumps straight to the shared `RET ALLOW` (or `RET ERRNO`) at the end;
/// a call with argument rules jumps into a short block that compares the
/// argument (both halves for a 64-bit one) and ends at `RET ALLOW` or `RET
/// TRAP`. seccompiler instead writes a jump, a rule chain and a return per
/// call, about three times as long.
fn compact_program(rules: &BTreeMap<i64, Args>, quiet: &[i64], errno: u32) -> Option<BpfProgram> {
    let mut p = vec![
        load(SECCOMP_DATA_ARCH),
        jeq(AUDIT_ARCH_X86_64, To::Skip(1), To::Next),
        Insn { code: BPF_RET_K, k: libc::SECCOMP_RET_KILL_PROCESS, jt: To::Next, jf: To::Next },
        load(SECCOMP_DATA_NR),
    ];
    for &nr in quiet {
        p.push(jeq(nr as u32, To::Errno, To::Next));
    }
    for (&nr, args) in rules.iter().filter(|(nr, a)| **a == Args::Any && !quiet.contains(nr)) {
        debug_assert_eq!(*args, Args::Any);
        p.push(jeq(nr as u32, To::Allow, To::Next));
    }
    for (&nr, args) in rules {
        let mut block = Vec::new();
        match args {
            Args::Any => continue,
            Args::Dword(index, values) => {
                block.push(load(arg_halves(*index).0));
                for (i, &v) in values.iter().enumerate() {
                    let last = i + 1 == values.len();
                    block.push(jeq(v, To::Allow, if last { To::Trap } else { To::Next }));
                }
            }
            Args::Qword(index, values) => {
                let (lo, hi) = arg_halves(*index);
                for (i, &v) in values.iter().enumerate() {
                    let miss = if i + 1 == values.len() { To::Trap } else { To::Next };
                    block.push(load(hi));
                    block.push(jeq((v >> 32) as u32, To::Next, if i + 1 == values.len() { To::Trap } else { To::Skip(2) }));
                    block.push(load(lo));
                    block.push(jeq(v as u32, To::Allow, miss));
                }
            }
        }
        p.push(jeq(nr as u32, To::Next, To::Skip(u8::try_from(block.len()).ok()?)));
        p.extend(block);
    }
    let (trap, allow, errno_at) = (p.len(), p.len() + 1, p.len() + 2);
    let mut out = Vec::with_capacity(p.len() + 3);
    for (i, insn) in p.iter().enumerate() {
        let resolve = |to: To| -> Option<u8> {
            let target = match to {
                To::Next => return Some(0),
                To::Skip(n) => return Some(n),
                To::Trap => trap,
                To::Allow => allow,
                To::Errno => errno_at,
            };
            u8::try_from(target - i - 1).ok()
        };
        out.push(bpf(insn.code, insn.k, resolve(insn.jt)?, resolve(insn.jf)?));
    }
    out.push(bpf(BPF_RET_K, libc::SECCOMP_RET_TRAP, 0, 0));
    out.push(bpf(BPF_RET_K, libc::SECCOMP_RET_ALLOW, 0, 0));
    out.push(bpf(BPF_RET_K, libc::SECCOMP_RET_ERRNO | (errno & libc::SECCOMP_RET_DATA), 0, 0));
    Some(out)
}

fn bpf(code: u16, k: u32, jt: u8, jf: u8) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// The name of a system call in any list here, for messages and docs.
fn syscall_name(nr: i64) -> Option<&'static str> {
    let extra: &[Syscall] = sys![SYS_ioctl, SYS_prlimit64, SYS_prctl, SYS_seccomp];
    [COMMON, MAIN, VCPU, extra]
        .into_iter()
        .flatten()
        .find(|&&(_, n)| n == nr)
        .map(|&(name, _)| name.trim_start_matches("SYS_"))
}

/// Why the filters could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot compile the seccomp filter of the {0} thread")]
    Compile(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the seccomp filter of the {0} thread")]
    Apply(&'static str, #[source] seccompiler::Error),
    #[error("the seccomp filter of the {0} thread has a jump longer than BPF allows")]
    TooLong(&'static str),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("cannot lower {0}")]
    Rlimit(&'static str, #[source] std::io::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// Most open files of a VMM process (`RLIMIT_NOFILE`): KVM fds, the API's
/// connections (capped far below this), the log, metrics and serial files.
pub const MAX_OPEN_FILES: u64 = 4096;

/// The compiled filters, once [`enable`] ran.
static FILTERS: OnceLock<BTreeMap<ThreadKind, Vec<BpfProgram>>> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the violation message (a const-initialized
    /// `Cell` with no destructor: plain thread-local storage, safe to read
    /// in a signal handler).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Compiles every filter, sets `no_new_privs`, lowers the resource limits
/// and installs the `SIGSYS` handler. Call it on the main thread before the
/// VMM starts any thread; then each thread's [`apply`] installs its filter.
pub fn enable() -> Result<(), SeccompError> {
    let mut filters = BTreeMap::new();
    for kind in ThreadKind::ALL {
        filters.insert(kind, kind.compile()?);
    }
    limit_resources()?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and changes only this
    // process's credentials rules.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    install_sigsys_handler()?;
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Whether [`enable`] ran in this process.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs the filter of `kind` on the calling thread, if [`enable`] ran.
/// A thread that cannot be confined must not run: this prints why and ends
/// the process (exit code 1).
pub fn apply(kind: ThreadKind) {
    if let Err(e) = try_apply(kind) {
        eprintln!("vmm: error: {}", api::ErrorChain(&e));
        std::process::exit(1);
    }
}

/// [`apply`], returning the error.
pub fn try_apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(programs) = FILTERS.get().and_then(|f| f.get(&kind)) else { return Ok(()) };
    KIND.with(|k| k.set(Some(kind)));
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Apply(kind.name(), e))?;
    }
    Ok(())
}

/// `RLIMIT_CORE` 0 (a core file would hold the guest's memory) and
/// `RLIMIT_NOFILE` at most [`MAX_OPEN_FILES`] (soft and hard, so a taken
/// over VMM cannot raise it again). Limits already lower stay.
pub fn limit_resources() -> Result<(), SeccompError> {
    lower(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    lower(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", MAX_OPEN_FILES)
}

fn lower(resource: libc::__rlimit_resource_t, name: &'static str, max: u64) -> Result<(), SeccompError> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(SeccompError::Rlimit(name, std::io::Error::last_os_error()));
    }
    lim.rlim_max = lim.rlim_max.min(max);
    lim.rlim_cur = lim.rlim_cur.min(lim.rlim_max);
    // SAFETY: `lim` is a valid rlimit; lowering needs no privilege.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(SeccompError::Rlimit(name, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; we set the handler, flags and an
    // empty mask before passing it to sigaction.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    // SA_RESETHAND: the handler runs once, then SIGSYS has its default
    // action (end the process). SA_NODEFER: the handler may raise it.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
    // SAFETY: `act.sa_mask` is a valid sigset_t to clear.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is a fully initialized sigaction for SIGSYS.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The `siginfo_t` fields of a seccomp `SIGSYS` (`_sigsys` in the kernel's
/// union, after the three leading ints and padding).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: usize,
    syscall: i32,
    arch: u32,
}

/// Writes which thread made which forbidden call, then ends the process
/// with `SIGSYS`. Only async-signal-safe calls: `write`, `getpid`, `gettid`,
/// `tgkill` (all in [`COMMON`]).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t, which is larger than
        // SigsysInfo and laid out like it for SIGSYS.
        i64::from(unsafe { (*(info as *const SigsysInfo)).syscall })
    };
    let thread = KIND.with(|k| k.get()).map_or("unfiltered", ThreadKind::name);
    let mut line = Line::default();
    line.push(b"vmm: seccomp: the ");
    line.push(thread.as_bytes());
    line.push(b" thread made a forbidden system call ");
    line.push_number(nr);
    if let Some(name) = syscall_name(nr) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b"; the VMM stops (SIGSYS). --no-seccomp turns the filters off for debugging.\n");
    // SAFETY: write, getpid, gettid and tgkill are async-signal-safe; the
    // buffer is valid for its length. The handler was reset (SA_RESETHAND),
    // so this SIGSYS ends the process.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), libc::SIGSYS);
    }
}

/// A fixed buffer a signal handler can format into without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line { buf: [0; 256], len: 0 }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    #[test]
    fn every_filter_compiles_to_one_program() {
        for kind in ThreadKind::ALL {
            let programs = kind.compile().unwrap();
            assert_eq!(programs.len(), 1, "{kind:?}: one install per thread");
            assert!(!programs[0].is_empty(), "{kind:?}");
        }
    }

    /// Runs a classic BPF program over the `seccomp_data` of a call.
    fn run_bpf(p: &[seccompiler::sock_filter], nr: i64, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let f = &p[pc];
            let taken = |cond: bool| 1 + usize::from(if cond { f.jt } else { f.jf });
            pc += match f.code {
                0x20 => {
                    let o = f.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                    1
                }
                0x05 => 1 + f.k as usize,
                0x15 => taken(acc == f.k),
                0x25 => taken(acc > f.k),
                0x35 => taken(acc >= f.k),
                0x45 => taken(acc & f.k != 0),
                0x06 => return f.k,
                code => panic!("unexpected BPF instruction {code:#x} at {pc}"),
            };
        }
    }

    /// The same rules compiled by seccompiler, as this module did before.
    fn seccompiler_program(kind: ThreadKind) -> BpfProgram {
        use seccompiler::{SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
        let rule = |i, len, v| SeccompRule::new(vec![SeccompCondition::new(i, len, SeccompCmpOp::Eq, v).unwrap()]).unwrap();
        let rules = kind
            .rules()
            .into_iter()
            .map(|(nr, args)| {
                let conds = match args {
                    Args::Any => Vec::new(),
                    Args::Qword(i, vs) => vs.into_iter().map(|v| rule(i, Len::Qword, v)).collect(),
                    Args::Dword(i, vs) => vs.into_iter().map(|v| rule(i, Len::Dword, v.into())).collect(),
                };
                (nr, conds)
            })
            .collect();
        let arch = seccompiler::TargetArch::x86_64;
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).unwrap().try_into().unwrap()
    }

    #[test]
    fn the_compact_program_decides_every_call_as_seccompiler_does_at_a_third_of_its_length() {
        let errno = libc::SECCOMP_RET_ERRNO | libc::EACCES as u32;
        for kind in ThreadKind::ALL {
            let ours = kind.compile().unwrap().remove(0);
            let theirs = seccompiler_program(kind);
            assert!(ours.len() * 3 < theirs.len(), "{kind:?}: {} vs {} instructions", ours.len(), theirs.len());
            let quiet: Vec<i64> = kind.denied_quietly().iter().map(|&(_, nr)| nr).collect();
            // Every argument value a rule names, and near misses of each.
            let mut values = vec![0u64, 1, u64::MAX];
            for args in kind.rules().values() {
                match args {
                    Args::Any => {}
                    Args::Qword(_, vs) => vs.iter().for_each(|&v| values.extend([v, v + 1, v | 1 << 32])),
                    Args::Dword(_, vs) => vs.iter().for_each(|&v| values.extend([v.into(), u64::from(v) + 1, u64::from(v) | 1 << 32])),
                }
            }
            let mut checked = 0;
            for nr in 0..=470 {
                for index in 0..3 {
                    for &v in &values {
                        let mut args = [0u64; 6];
                        args[index] = v;
                        let want = if quiet.contains(&nr) { errno } else { run_bpf(&theirs, nr, AUDIT_ARCH_X86_64, args) };
                        let got = run_bpf(&ours, nr, AUDIT_ARCH_X86_64, args);
                        assert_eq!(got, want, "{kind:?}: call {nr}, argument {index} = {v:#x}");
                        checked += usize::from(got == libc::SECCOMP_RET_ALLOW);
                    }
                }
            }
            assert!(checked > 0);
            // Another architecture's calls end the process, as seccompiler's do.
            let i386 = 3 | 0x4000_0000;
            assert_eq!(run_bpf(&ours, libc::SYS_read, i386, [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
            assert_eq!(run_bpf(&theirs, libc::SYS_read, i386, [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
        }
        let vcpu = ThreadKind::Vcpu.compile().unwrap().remove(0);
        assert_eq!(run_bpf(&vcpu, libc::SYS_openat, AUDIT_ARCH_X86_64, [0; 6]), errno);
        assert_eq!(run_bpf(&vcpu, libc::SYS_socket, AUDIT_ARCH_X86_64, [0; 6]), libc::SECCOMP_RET_TRAP);
    }

    #[test]
    fn a_jump_beyond_bpf_reach_is_refused_not_truncated() {
        let many: BTreeMap<i64, Args> = (0..300).map(|nr| (nr, Args::Any)).collect();
        assert!(compact_program(&many, &[], 13).is_none());
        let few: BTreeMap<i64, Args> = (0..200).map(|nr| (nr, Args::Any)).collect();
        assert_eq!(compact_program(&few, &[], 13).unwrap().len(), 4 + 200 + 3);
    }

    #[test]
    fn the_main_list_covers_the_threads_it_starts() {
        let main = ThreadKind::Main.syscalls();
        for kind in ThreadKind::ALL.into_iter().filter(|k| k.started_by_main()) {
            for call in kind.syscalls() {
                assert!(main.contains(&call), "{call} of {kind:?} is not in the main list");
            }
            for ioctl in kind.ioctls() {
                assert!(ThreadKind::Main.ioctls().contains(&ioctl), "{ioctl} of {kind:?}");
            }
        }
    }

    #[test]
    fn no_thread_may_exec_or_open_sockets() {
        for kind in ThreadKind::ALL {
            let rules = kind.rules();
            for nr in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_socket, libc::SYS_connect, libc::SYS_ptrace] {
                assert!(!rules.contains_key(&nr), "{kind:?} allows {nr}");
            }
        }
        let vcpu = ThreadKind::Vcpu.rules();
        assert!(!vcpu.contains_key(&libc::SYS_clone3));
        assert!(!ThreadKind::Vcpu.syscalls().contains(&"openat"), "openat is a quiet denial there");
        assert_eq!(ThreadKind::Vcpu.denied_quietly()[0].0, "SYS_openat");
        assert!(!ThreadKind::Vcpu.ioctls().contains(&"KVM_CREATE_VM"));
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> as the kernel computes them.
        let find = |name| VCPU_IOCTLS.iter().chain(MAIN_IOCTLS).find(|&&(n, _)| n == name).unwrap().1;
        assert_eq!(find("KVM_RUN"), 0xae80);
        assert_eq!(find("KVM_CREATE_VM"), 0xae01);
        assert_eq!(find("KVM_SET_USER_MEMORY_REGION"), 0x4020_ae46);
        assert_eq!(find("KVM_GET_REGS"), 0x8090_ae81);
        assert_eq!(find("KVM_GET_SUPPORTED_CPUID"), 0xc008_ae05);
    }

    #[test]
    fn a_line_formats_numbers_and_stops_at_its_end() {
        let mut l = Line::default();
        l.push(b"n=");
        l.push_number(-41);
        l.push_number(0);
        l.push_number(i64::MAX);
        assert_eq!(&l.buf[..l.len], format!("n=-410{}", i64::MAX).as_bytes());
        l.push(&[b'x'; 400]);
        assert_eq!(l.len, 256);
    }

    /// Which child case to run (see [`child`]).
    const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

    /// Runs the test binary again, as a child that runs only [`child`] with
    /// `case`; returns its exit status and stderr.
    fn run_child(case: &str) -> (std::process::ExitStatus, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "seccomp::tests::child", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, case)
            .output()
            .unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The child side: enables the filters, then a thread of the kind named
    /// by the case applies its filter, proves allowed calls still work, and
    /// makes a forbidden one. Does nothing in a normal test run.
    #[test]
    fn child() {
        let Ok(case) = std::env::var(CHILD_ENV) else { return };
        enable().unwrap();
        let kind = match case.as_str() {
            "vcpu-socket" => ThreadKind::Vcpu,
            "vcpu-open" => ThreadKind::Vcpu,
            "vcpu-ok" => ThreadKind::Vcpu,
            _ => panic!("unknown case {case}"),
        };
        std::thread::spawn(move || {
            apply(kind);
            eprintln!("filtered thread alive");
            let mut v = vec![0u8; 1 << 20];
            v[4096] = 1;
            std::thread::sleep(std::time::Duration::from_millis(1));
            match case.as_str() {
                // SAFETY: plain integer arguments; the call is expected to trap.
                "vcpu-socket" => unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                },
                "vcpu-open" => {
                    let e = std::fs::File::open("/proc/self/status").unwrap_err();
                    eprintln!("open: {:?}", e.raw_os_error());
                    // SAFETY: plain integer arguments; the call is expected to trap.
                    unsafe { libc::kill(1, 0) };
                }
                _ => {}
            }
            eprintln!("filtered thread done");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_forbidden_call_ends_the_process_with_sigsys_and_names_thread_and_call() {
        let (status, stderr) = run_child("vcpu-socket");
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{stderr}");
        assert!(stderr.contains("filtered thread alive"), "{stderr}");
        assert!(!stderr.contains("filtered thread done"), "{stderr}");
        let want = format!("the vcpu thread made a forbidden system call {}", libc::SYS_socket);
        assert!(stderr.contains(&want), "{stderr}");

        let (status, stderr) = run_child("vcpu-open");
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{stderr}");
        assert!(stderr.contains(&format!("open: Some({})", libc::EACCES)), "opens fail quietly: {stderr}");
        let want = format!("the vcpu thread made a forbidden system call {}", libc::SYS_kill);
        assert!(stderr.contains(&want), "{stderr}");
    }

    #[test]
    fn a_filtered_thread_runs_when_it_stays_inside_its_list() {
        let (status, stderr) = run_child("vcpu-ok");
        assert!(status.success(), "{status:?}\n{stderr}");
        assert!(stderr.contains("filtered thread done"), "{stderr}");
    }
}

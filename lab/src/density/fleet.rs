//! The child VMs of a density run: `vmm run` processes, each with its own API
//! socket in the runner's private directory (or a peer VMM's processes,
//! each with its config file there), and the guarantee that none outlives
//! the runner.
//!
//! How each way of ending is covered:
//! - normal end or error: [`Fleet::shutdown_all`] sends SIGTERM to every
//!   child (the VMM stops its VM and removes its socket), waits, SIGKILLs any
//!   child that does not exit within [`STOP_GRACE`] of the last one that did,
//!   reaps all of them and removes leftover sockets; dropping the [`Fleet`]
//!   does the same and removes the directory (so an early `return` or an
//!   unwinding panic cleans up too);
//! - panic in a release build (`panic = "abort"`, no unwinding): the hook
//!   from [`install_panic_hook`] does the same from the registry of live PIDs
//!   before the process aborts;
//! - the runner killed (even by SIGKILL): every child was started with
//!   `PR_SET_PDEATHSIG = SIGTERM`, so the kernel stops it, and it removes its
//!   own socket. Only the (tiny) directory is left in that case.
//!
//! The parent-death signal fires when the *thread* that forked the child
//! exits, not the process, so children are spawned only from the runner's
//! main thread, which lives for the whole run.
//!
//! Only processes this module started are signalled, by their PID, and only
//! before they are reaped (so a PID cannot have been reused).

use super::cgroup::FleetCgroup;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the children are given to stop after SIGTERM, counted from the
/// last child that exited, before the rest are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Longest path a Unix socket can have (`sun_path` less the NUL).
const MAX_SOCK_PATH: usize = 107;

/// Why the fleet could not start or launch a VM.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The private directory could not be made.
    #[error("cannot create the work directory {0:?}")]
    WorkDir(PathBuf, #[source] io::Error),
    /// The socket path would not fit in a Unix socket address.
    #[error("socket path {0:?} is too long for a Unix socket; set TMPDIR to a shorter directory")]
    SockPath(PathBuf),
    /// The child's log file could not be created.
    #[error("cannot create the VM log {0:?}")]
    Log(PathBuf, #[source] io::Error),
    /// `fork`/`exec` failed (too many processes, out of memory, ...).
    #[error("cannot start {0:?}")]
    Spawn(PathBuf, #[source] io::Error),
    /// A peer VM's files could not be written.
    #[error(transparent)]
    Peer(super::peer::PeerError),
}

/// How to run one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Strategy name, as `--memmap-init` takes it.
    pub strategy: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// `--reclaim` for our VMs (`None`: the strategy's default).
    pub reclaim: Option<api::Reclaim>,
    /// `--reclaim-delay-ms` for our VMs (`None`: the guest's default).
    pub reclaim_delay_ms: Option<u32>,
    pub launcher: Launcher,
}

/// Which VMM runs the VMs.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// This binary: `vmm run --api-sock ... --serial none`.
    Own,
    /// A peer with Firecracker's command line (see `peer`): `PATH --no-api
    /// --config-file FILE --id ID`, booting `kernel`.
    Peer { path: PathBuf, kernel: PathBuf, strategy: guest_abi::Strategy },
}

/// One child VMM process.
#[derive(Debug)]
pub struct VmProcess {
    /// VM number within its strategy (0-based).
    pub index: u64,
    pub pid: u32,
    pub sock: PathBuf,
    /// Where the child's stderr goes (its own messages; the console is
    /// off), and for a peer its stdout too (the guest's console).
    pub log: PathBuf,
    /// Other files of the VM, removed with it (a peer's config file).
    extra: Vec<PathBuf>,
    /// Just before `fork`.
    pub spawned_at: Instant,
    child: Child,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ShutdownStats {
    /// Children that exited after SIGTERM.
    pub stopped: u64,
    /// Children that had to be killed.
    pub killed: u64,
    /// Seconds from the first SIGTERM to the last child reaped.
    pub seconds: f64,
}

/// PIDs of live children and the work directory, for the panic hook.
struct Registry {
    pids: Vec<u32>,
    dir: Option<PathBuf>,
    cgroup: Option<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { pids: Vec::new(), dir: None, cgroup: None });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The runner's children, and its private directory for their sockets.
pub struct Fleet {
    exe: PathBuf,
    dir: PathBuf,
    vms: Vec<VmProcess>,
    /// The children's memory cgroup, or why there is none. Declared last:
    /// it is removed after [`Fleet`]'s `Drop` has reaped the children.
    cgroup: Result<FleetCgroup, String>,
}

impl Fleet {
    /// Creates the private directory (mode 0700, under `$TMPDIR`) for the
    /// children of `exe`.
    pub fn new(exe: PathBuf) -> Result<Fleet, FleetError> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("{}{}-{nanos:x}", super::cgroup::NAME_PREFIX, std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| FleetError::WorkDir(dir.clone(), e))?;
        registry().dir = Some(dir.clone());
        let name = dir.file_name().map_or_else(|| "vmm-density".into(), |n| n.to_string_lossy().into_owned());
        let cgroup = FleetCgroup::create(&name).map_err(|e| e.to_string());
        registry().cgroup = cgroup.as_ref().ok().map(|c| c.dir().to_path_buf());
        Ok(Fleet { exe, dir, vms: Vec::new(), cgroup })
    }

    /// The children's memory cgroup, or why there is none.
    pub fn cgroup(&self) -> Result<&FleetCgroup, &str> {
        self.cgroup.as_ref().map_err(String::as_str)
    }

    /// What the children's memory cgroup holds now (`None` without one, or
    /// if it cannot be read).
    pub fn cgroup_memory(&self) -> Option<super::cgroup::CgroupMemory> {
        self.cgroup.as_ref().ok().and_then(|c| c.read().ok())
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The live children.
    pub fn vms(&self) -> &[VmProcess] {
        &self.vms
    }

    /// Starts VM `index` of `spec` (with a boot-time workload of
    /// `alloc_mib` for a peer; our VMs get theirs through the API). Call
    /// only from the thread that lives for the whole run (see the module
    /// doc on the parent-death signal).
    pub fn spawn(&mut self, spec: &VmSpec, index: u64, alloc_mib: u64) -> Result<&VmProcess, FleetError> {
        let (mut cmd, name, exe) = match &spec.launcher {
            Launcher::Own => (Command::new(&self.exe), spec.strategy.clone(), self.exe.clone()),
            Launcher::Peer { path, .. } => (Command::new(path), format!("peer-{}", spec.strategy), path.clone()),
        };
        let sock = self.dir.join(format!("{name}-{index}.sock"));
        if sock.as_os_str().len() > MAX_SOCK_PATH {
            return Err(FleetError::SockPath(sock));
        }
        let log = self.dir.join(format!("{name}-{index}.log"));
        let log_file = std::fs::File::create(&log).map_err(|e| FleetError::Log(log.clone(), e))?;
        let mut extra = Vec::new();
        match &spec.launcher {
            Launcher::Own => {
                cmd.arg("run")
                    .arg("--api-sock")
                    .arg(&sock)
                    .args(["--mem-mib", &spec.mem_mib.to_string()])
                    .args(["--vcpus", &spec.vcpus.to_string()])
                    .args(["--memmap-init", &spec.strategy])
                    .args(["--serial", "none"]);
                if let Some(r) = spec.reclaim {
                    cmd.args(["--reclaim", r.name()]);
                }
                if let Some(d) = spec.reclaim_delay_ms {
                    cmd.args(["--reclaim-delay-ms", &d.to_string()]);
                }
                cmd.stdout(Stdio::null())
                    .stderr(Stdio::from(log_file));
            }
            Launcher::Peer { kernel, strategy, .. } => {
                let id = format!("{name}-{index}");
                let boot_args = super::peer::boot_args(*strategy, alloc_mib);
                let config = super::peer::config_json(kernel, &boot_args, spec.vcpus, spec.mem_mib);
                let file = super::peer::write_config(&self.dir, &id, &config).map_err(FleetError::Peer)?;
                // The console (stdout) and the peer's own messages, in one log.
                let err = log_file.try_clone().map_err(|e| FleetError::Log(log.clone(), e))?;
                cmd.arg("--no-api").arg("--config-file").arg(&file).args(["--id", &id]);
                cmd.stdout(Stdio::from(log_file)).stderr(Stdio::from(err));
                extra.push(file);
            }
        }
        cmd.stdin(Stdio::null());
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let cgroup_fd = self.cgroup.as_ref().ok().map(FleetCgroup::procs_fd);
        // SAFETY: the closure runs in the forked child before exec and calls
        // only async-signal-safe functions (sigemptyset, pthread_sigmask,
        // prctl, getppid, write) on local data; it allocates nothing (the
        // error is a raw OS error code).
        unsafe {
            cmd.pre_exec(move || {
                // The runner blocks SIGINT/SIGTERM/SIGHUP in every thread and
                // the mask survives exec: unblock, so a SIGTERM that arrives
                // before the child's own main() takes over still ends it.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                // Into the fleet's cgroup before exec, so that everything the
                // VM costs is charged there from its first page.
                match cgroup_fd {
                    Some(fd) => super::cgroup::join_from_child(fd),
                    None => Ok(()),
                }
            });
        }
        let spawned_at = Instant::now();
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                extra.iter().for_each(|f| drop(std::fs::remove_file(f)));
                return Err(FleetError::Spawn(exe, e));
            }
        };
        let pid = child.id();
        registry().pids.push(pid);
        self.vms.push(VmProcess { index, pid, sock, log, extra, spawned_at, child });
        Ok(self.vms.last().expect("just pushed"))
    }

    /// Stops every child: SIGTERM, then SIGKILL for those still running
    /// [`STOP_GRACE`] after the last exit; reaps them all and removes their
    /// sockets and logs.
    pub fn shutdown_all(&mut self) -> ShutdownStats {
        self.shutdown_where(|_| true)
    }

    /// Stops the children for which `which` is true, as [`Fleet::shutdown_all`]
    /// stops them all; the others keep running.
    pub fn shutdown_where(&mut self, which: impl Fn(&VmProcess) -> bool) -> ShutdownStats {
        let start = Instant::now();
        let mut stats = ShutdownStats::default();
        let (mut stopping, keep): (Vec<VmProcess>, Vec<VmProcess>) = self.vms.drain(..).partition(|vm| which(vm));
        self.vms = keep;
        for vm in &stopping {
            // SAFETY: `vm.pid` is our own child, not reaped yet, so the PID
            // still names it; kill only sends a signal.
            unsafe { libc::kill(vm.pid as libc::pid_t, libc::SIGTERM) };
        }
        let mut last_progress = Instant::now();
        while !stopping.is_empty() && last_progress.elapsed() < STOP_GRACE {
            let before = stopping.len();
            stopping.retain_mut(|vm| match vm.child.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    forget(vm);
                    false
                }
                Ok(None) => true,
            });
            if stopping.len() < before {
                stats.stopped += (before - stopping.len()) as u64;
                last_progress = Instant::now();
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for mut vm in stopping {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
            forget(&vm);
            stats.killed += 1;
        }
        stats.seconds = start.elapsed().as_secs_f64();
        stats
    }
}

/// Removes what is left of a reaped child: its registry entry, socket, log.
fn forget(vm: &VmProcess) {
    registry().pids.retain(|&p| p != vm.pid);
    let _ = std::fs::remove_file(&vm.sock);
    let _ = std::fs::remove_file(&vm.log);
    vm.extra.iter().for_each(|f| drop(std::fs::remove_file(f)));
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown_all();
        let _ = std::fs::remove_dir_all(&self.dir);
        let mut reg = registry();
        reg.dir = None;
        reg.cgroup = None;
    }
}

/// Makes a panic stop every live child and remove the work directory before
/// the process aborts (release builds do not unwind, so [`Fleet`]'s `Drop`
/// would not run). Keeps the previous hook's message.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        // Another thread may hold the lock forever if it panicked inside;
        // then the parent-death signal is the fallback.
        let reg = match REGISTRY.try_lock() {
            Ok(r) => r,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        kill_and_reap(&reg.pids);
        if let Some(d) = &reg.dir {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(c) = &reg.cgroup {
            let _ = std::fs::remove_dir(c);
        }
    }));
}

/// SIGTERM, a grace period, SIGKILL, and `waitpid` for each PID (our own
/// unreaped children).
fn kill_and_reap(pids: &[u32]) {
    let signal = |pids: &[u32], sig| {
        for &pid in pids {
            // SAFETY: our own unreaped child (see `Registry`); only a signal.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    };
    let reaped = |pid: u32, flags| {
        let mut status = 0;
        // SAFETY: waits for our own child; writes only the local status.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, flags) };
        r == pid as libc::pid_t || r < 0
    };
    signal(pids, libc::SIGTERM);
    let mut left: Vec<u32> = pids.to_vec();
    let deadline = Instant::now() + STOP_GRACE;
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&p| !reaped(p, libc::WNOHANG));
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&left, libc::SIGKILL);
    for p in left {
        reaped(p, 0);
    }
}

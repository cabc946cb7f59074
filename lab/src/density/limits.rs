//! The host limits a density ramp can hit besides memory, budgeted before
//! every launch so that a ramp ends with a `stop_reason` that names the limit
//! and its remedy, never with `EAGAIN` from `fork`/`clone`:
//!
//! - `kernel.pid_max` and `kernel.threads-max`: every task (thread) takes a
//!   PID, and each VM holds several: the VMM's threads and KVM's
//!   `kvm-nx-lpage-re` worker, which sits in the VMM's own thread group
//!   (`/proc/PID/task`) once a vCPU has run;
//! - `RLIMIT_NPROC` (tasks of this user; not enforced for root);
//! - `RLIMIT_NOFILE` of the runner (its API connections while launching and
//!   measuring);
//! - `--max-tasks`, a budget for the fleet's own tasks (to test the logic on
//!   any host, as `--floor-mib` does for memory).
//!
//! The host's task count is the total of `/proc/loadavg` (cheap to read at
//! every launch); tasks per VM are what a step measured, or a generous
//! estimate before the first step.

use serde::Serialize;

/// PIDs the kernel never hands out again after boot (`RESERVED_PIDS`).
const RESERVED_PIDS: u64 = 300;
/// File descriptors one launch in flight may hold in the runner (its API
/// connection, a log read) with room to spare.
const FDS_PER_LAUNCH: u64 = 4;
/// File descriptors the runner's measuring workers may hold at once.
const MEASURE_FDS: u64 = 16;

/// The task and file limits of this host and runner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HostLimits {
    /// `/proc/sys/kernel/pid_max`.
    pub pid_max: Option<u64>,
    /// `/proc/sys/kernel/threads-max`.
    pub threads_max: Option<u64>,
    /// Soft `RLIMIT_NPROC`; `None` when unlimited or not enforced (root).
    pub nproc: Option<u64>,
    /// Soft `RLIMIT_NOFILE` of the runner.
    pub nofile: Option<u64>,
    /// `--max-tasks`: the most tasks the run's VMs may hold.
    pub max_tasks: Option<u64>,
    /// Tasks on the host when the run started (`/proc/loadavg`).
    pub host_tasks_at_start: Option<u64>,
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn soft_rlimit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the local struct it is given.
    let ok = unsafe { libc::getrlimit(resource, &mut lim) } == 0;
    (ok && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

impl HostLimits {
    /// Reads this host's limits; `max_tasks` is the flag's value.
    pub fn read(max_tasks: Option<u64>) -> HostLimits {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        HostLimits {
            pid_max: read_u64("/proc/sys/kernel/pid_max"),
            threads_max: read_u64("/proc/sys/kernel/threads-max"),
            nproc: if root { None } else { soft_rlimit(libc::RLIMIT_NPROC) },
            nofile: soft_rlimit(libc::RLIMIT_NOFILE),
            max_tasks,
            host_tasks_at_start: host_tasks(),
        }
    }
}

/// Tasks (threads) on the host now: the total in `/proc/loadavg`.
pub fn host_tasks() -> Option<u64> {
    use procfs::Current;
    procfs::LoadAverage::current().ok().map(|l| u64::from(l.max))
}

/// File descriptors this process holds now.
pub fn open_fds() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64)
}

/// Tasks of process `pid` named like KVM's workers (`kvm-*`), from
/// `/proc/PID/task/*/comm`.
pub fn kvm_tasks(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("kvm-")))
        .count() as u64
}

/// Tasks a limit keeps free for the rest of the host: 1/64 of it, at least 256.
fn reserve(limit: u64) -> u64 {
    (limit / 64).max(256)
}

/// What the runner holds when it is about to launch one more VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Tasks on the host now ([`host_tasks`]).
    pub host_tasks: u64,
    /// VMs this ramp launched so far (in flight included).
    pub launched: u64,
    /// Launches not yet ready (their tasks may not all exist yet).
    pub in_flight: u64,
    /// The runner's open file descriptors (at the last step).
    pub open_fds: u64,
    /// Tasks one VM holds (measured, or estimated before the first step).
    pub tasks_per_vm: f64,
}

/// The limit the next launch would cross, as a `stop_reason` with its
/// remedy, or `None` if the launch fits every limit.
pub fn check(limits: &HostLimits, u: &Usage) -> Option<String> {
    let per_vm = u.tasks_per_vm.max(1.0);
    // A launch in flight also holds its waiter thread in the runner.
    let coming = ((u.in_flight + 1) as f64 * (per_vm + 1.0)).ceil() as u64;
    if let Some(max) = limits.max_tasks {
        let fleet = ((u.launched + 1) as f64 * per_vm).ceil() as u64;
        if fleet > max {
            return Some(format!(
                "task budget reached: {} VMs at {per_vm:.1} tasks each would hold {fleet} tasks, more than --max-tasks {max}; \
                 raise --max-tasks",
                u.launched + 1
            ));
        }
    }
    let after = u.host_tasks + coming;
    let tasks = |name: &str, limit: u64, room: u64, remedy: String| {
        (after > room).then(|| {
            format!(
                "{name} reached: {} tasks on the host and {per_vm:.1} per VM would pass {room} (the limit {limit} less {} kept for the host); {remedy}",
                u.host_tasks,
                limit - room
            )
        })
    };
    if let Some(p) = limits.pid_max {
        let room = p.saturating_sub(RESERVED_PIDS + reserve(p));
        if let Some(r) = tasks("kernel.pid_max", p, room, "raise it with `sysctl kernel.pid_max=4194304`".into()) {
            return Some(r);
        }
    }
    if let Some(t) = limits.threads_max {
        let room = t.saturating_sub(reserve(t));
        let remedy = format!("raise it with `sysctl kernel.threads-max={}`", t.saturating_mul(2));
        if let Some(r) = tasks("kernel.threads-max", t, room, remedy) {
            return Some(r);
        }
    }
    if let Some(n) = limits.nproc {
        // The host's tasks bound this user's from above.
        let room = n.saturating_sub(reserve(n));
        let remedy = format!("raise it with `ulimit -u {}` (or `nproc` in /etc/security/limits.conf)", n.saturating_mul(4));
        if let Some(r) = tasks("RLIMIT_NPROC", n, room, remedy) {
            return Some(r);
        }
    }
    if let Some(n) = limits.nofile {
        let need = u.open_fds + (u.in_flight + 1) * FDS_PER_LAUNCH + MEASURE_FDS;
        if need > n {
            return Some(format!(
                "RLIMIT_NOFILE reached: the runner holds {} file descriptors and may need {need}, limit {n}; raise it with `ulimit -n {}`",
                u.open_fds,
                n.saturating_mul(4)
            ));
        }
    }
    None
}

/// The `stop_reason` for a `fork`/`clone` that failed with `EAGAIN`: a task
/// limit the budget did not foresee (other tenants of the host, or a limit
/// it cannot read).
pub fn eagain_reason(what: &str, limits: &HostLimits) -> String {
    format!(
        "cannot start {what}: EAGAIN (a task limit: {} tasks on the host, pid_max {}, threads-max {}); \
         raise it with `sysctl kernel.pid_max=4194304`, or check `ulimit -u`",
        host_tasks().map_or("?".into(), |t| t.to_string()),
        limits.pid_max.map_or("?".into(), |t| t.to_string()),
        limits.threads_max.map_or("?".into(), |t| t.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(host_tasks: u64, launched: u64, in_flight: u64, tasks_per_vm: f64) -> Usage {
        Usage { host_tasks, launched, in_flight, open_fds: 10, tasks_per_vm }
    }

    const LIMITS: HostLimits = HostLimits {
        pid_max: Some(32768),
        threads_max: Some(190_000),
        nproc: None,
        nofile: Some(20000),
        max_tasks: None,
        host_tasks_at_start: Some(400),
    };

    #[test]
    fn pid_max_stops_the_ramp_with_its_remedy() {
        // 32768 - 300 - 512 = 31956 tasks of room.
        assert_eq!(check(&LIMITS, &usage(31000, 10000, 4, 3.0)), None);
        let r = check(&LIMITS, &usage(31940, 10000, 4, 3.0)).unwrap();
        assert!(r.starts_with("kernel.pid_max reached") && r.contains("sysctl kernel.pid_max=4194304"), "{r}");
        // More tasks per VM reach it sooner.
        assert!(check(&LIMITS, &usage(31930, 6000, 4, 5.0)).is_some());
        assert!(check(&LIMITS, &usage(31930, 6000, 4, 3.0)).is_none());
    }

    #[test]
    fn threads_max_nproc_and_nofile_each_name_themselves() {
        let low_threads = HostLimits { threads_max: Some(2000), ..LIMITS };
        let r = check(&low_threads, &usage(1990, 0, 0, 4.0)).unwrap();
        assert!(r.starts_with("kernel.threads-max reached") && r.contains("threads-max=4000"), "{r}");
        let nproc = HostLimits { nproc: Some(1000), ..LIMITS };
        assert!(check(&nproc, &usage(700, 0, 0, 4.0)).is_none());
        let r = check(&nproc, &usage(740, 0, 0, 4.0)).unwrap();
        assert!(r.starts_with("RLIMIT_NPROC reached") && r.contains("ulimit -u"), "{r}");
        let nofile = HostLimits { nofile: Some(40), ..LIMITS };
        let r = check(&nofile, &Usage { open_fds: 20, ..usage(500, 0, 1, 4.0) }).unwrap();
        assert!(r.starts_with("RLIMIT_NOFILE reached") && r.contains("ulimit -n 160"), "{r}");
    }

    #[test]
    fn max_tasks_budgets_the_fleet_alone() {
        let l = HostLimits { max_tasks: Some(12), ..LIMITS };
        assert_eq!(check(&l, &usage(500, 0, 0, 5.0)), None);
        assert_eq!(check(&l, &usage(500, 1, 1, 5.0)), None);
        let r = check(&l, &usage(500, 2, 0, 5.0)).unwrap();
        assert!(r.contains("--max-tasks 12") && r.contains("15 tasks"), "{r}");
    }

    #[test]
    fn the_host_is_read() {
        let l = HostLimits::read(Some(7));
        assert!(l.pid_max.unwrap() >= 301 && l.threads_max.unwrap() > 0, "{l:?}");
        assert_eq!(l.max_tasks, Some(7));
        assert!(host_tasks().unwrap() >= 1);
        assert!(open_fds().unwrap() >= 3);
        assert_eq!(kvm_tasks(std::process::id()), 0, "the test harness has no KVM worker");
        assert!(eagain_reason("x", &l).contains("EAGAIN"));
    }
}

//! What the lab's experiments read about the host and their child processes:
//! `/proc/meminfo` (`MemTotal`, `MemAvailable`), the load average, the
//! machine (cores, CPU model, kernel, whether `/dev/kvm` is PVM), and a
//! process's `/proc/PID/status` (page tables, threads, resident memory) and
//! state, its `smaps_rollup` and CPU time. `/proc` is parsed by the
//! `procfs` crate.

use procfs::process::{ProcState, Process};
use procfs::{Current, ProcError};
use serde::Serialize;

/// Why `/proc/meminfo` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MeminfoError {
    /// The file could not be read or parsed.
    #[error("cannot read /proc/meminfo")]
    Read(#[source] ProcError),
    /// The kernel gives no `MemAvailable` (it has since Linux 3.14).
    #[error("/proc/meminfo has no MemAvailable line; Linux 3.14 or later is needed")]
    NoMemAvailable,
}

/// The two `/proc/meminfo` figures the lab uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Meminfo {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable`: what the kernel estimates can be allocated without
    /// swapping (there is no swap here: without reclaiming page cache).
    pub available: u64,
}

impl TryFrom<&procfs::Meminfo> for Meminfo {
    type Error = MeminfoError;
    fn try_from(m: &procfs::Meminfo) -> Result<Meminfo, MeminfoError> {
        let available = m.mem_available.ok_or(MeminfoError::NoMemAvailable)?;
        Ok(Meminfo { total: m.mem_total, available })
    }
}

/// The host kernel's own memory counters from `/proc/meminfo`, in bytes:
/// where KVM's and the processes' kernel-side cost lands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KernelMemory {
    /// `VmallocUsed` (KVM's memslot reverse maps and per-VM structures).
    pub vmalloc_used: u64,
    /// `Slab` (`kvm_vcpu`, debugfs inodes, `task_struct`, dentries, ...).
    pub slab: u64,
    /// `SUnreclaim`, the part of `Slab` that cannot be reclaimed.
    pub slab_unreclaimable: u64,
    /// `KernelStack` (16 KiB per task here).
    pub kernel_stack: u64,
    /// Whether the kernel stacks are vmalloc'd (`CONFIG_VMAP_STACK`, seen
    /// in `/proc/vmallocinfo`), and so already inside `vmalloc_used`.
    pub stacks_in_vmalloc: bool,
    /// `PageTables` (the processes' page tables).
    pub page_tables: u64,
    /// `SecPageTables` (KVM's shadow or EPT/NPT page tables; Linux 6.0+).
    pub sec_page_tables: u64,
}

impl From<&procfs::Meminfo> for KernelMemory {
    fn from(m: &procfs::Meminfo) -> KernelMemory {
        KernelMemory {
            vmalloc_used: m.vmalloc_used,
            slab: m.slab,
            slab_unreclaimable: m.s_unreclaim.unwrap_or(0),
            kernel_stack: m.kernel_stack.unwrap_or(0),
            stacks_in_vmalloc: false,
            page_tables: m.page_tables.unwrap_or(0),
            sec_page_tables: m.secondary_page_tables.unwrap_or(0),
        }
    }
}

/// Reads the kernel's counters from `/proc/meminfo` now.
pub fn kernel_memory() -> Result<KernelMemory, MeminfoError> {
    let mut k = KernelMemory::from(&procfs::Meminfo::current().map_err(MeminfoError::Read)?);
    k.stacks_in_vmalloc = stacks_in_vmalloc();
    Ok(k)
}

/// Whether task stacks are vmalloc'd here: looked up once in
/// `/proc/vmallocinfo` (root only; `false` if unreadable).
fn stacks_in_vmalloc() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| std::fs::read_to_string("/proc/vmallocinfo").is_ok_and(|t| vmallocinfo_has_stacks(&t)))
}

/// Whether a `/proc/vmallocinfo` text shows a task stack: an area whose
/// caller is the fork path (`alloc_thread_stack_node`, or `kernel_clone` /
/// `copy_process` / `dup_task_struct` where it is inlined).
fn vmallocinfo_has_stacks(text: &str) -> bool {
    const CALLERS: [&str; 4] = ["alloc_thread_stack_node+", "kernel_clone+", "copy_process+", "dup_task_struct+"];
    text.lines().any(|l| l.split_whitespace().nth(2).is_some_and(|c| CALLERS.iter().any(|p| c.starts_with(p))))
}

/// Reads `/proc/meminfo` now.
pub fn meminfo() -> Result<Meminfo, MeminfoError> {
    Meminfo::try_from(&procfs::Meminfo::current().map_err(MeminfoError::Read)?)
}

/// `/proc/loadavg` as the kernel prints it (`0.52 0.58 0.59 2/345 6789`:
/// the 1, 5 and 15 minute averages, runnable/all tasks, the last PID), or
/// `None` if it cannot be read.
pub fn loadavg() -> Option<String> {
    let l = procfs::LoadAverage::current().ok()?;
    Some(format!("{:.2} {:.2} {:.2} {}/{} {}", l.one, l.five, l.fifteen, l.cur, l.max, l.latest_pid))
}

/// The machine an experiment ran on, for its report.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    /// Online CPUs.
    pub cores: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// `MemTotal` in bytes.
    pub mem_total_bytes: u64,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: Option<String>,
    /// Whether KVM is served by the PVM module (`/sys/module/kvm_pvm`),
    /// i.e. shadow paging without hardware virtualization.
    pub pvm: bool,
    /// `/sys/module/kvm/parameters/tdp_mmu` (`N` under PVM).
    pub kvm_tdp_mmu: Option<String>,
    /// Transparent huge pages setting (the bracketed word).
    pub transparent_hugepage: Option<String>,
    /// The runner's soft `RLIMIT_NOFILE`.
    pub nofile_limit: Option<u64>,
}

/// A one-value file (sysfs, or the kernel release, which `procfs` would
/// shorten to its version numbers), trimmed.
fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The word in brackets of a sysfs choice list (`always [madvise] never`).
pub fn bracketed(s: &str) -> Option<&str> {
    let start = s.find('[')? + 1;
    let len = s[start..].find(']')?;
    Some(&s[start..start + len])
}

/// Describes this host.
pub fn host_info(mem: Meminfo) -> HostInfo {
    let cpu_model = procfs::CpuInfo::current().ok().and_then(|c| c.model_name(0).map(str::to_string));
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the local struct it is given.
    let nofile = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur);
    HostInfo {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        mem_total_bytes: mem.total,
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        pvm: vmm::host::is_pvm_host(),
        kvm_tdp_mmu: read_trimmed("/sys/module/kvm/parameters/tdp_mmu"),
        transparent_hugepage: read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled")
            .and_then(|s| bracketed(&s).map(str::to_string)),
        nofile_limit: nofile,
    }
}

/// What `/proc/PID/status` says about a process's kernel-side cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcStatus {
    /// `VmPTE`: the process's page tables, in bytes.
    pub page_table_bytes: u64,
    /// `Threads`.
    pub threads: u64,
    /// `VmRSS`: its resident memory, in bytes.
    pub rss_bytes: u64,
}

impl From<&procfs::process::Status> for ProcStatus {
    fn from(s: &procfs::process::Status) -> ProcStatus {
        let bytes = |kib: Option<u64>| kib.unwrap_or(0) * 1024;
        ProcStatus { page_table_bytes: bytes(s.vmpte), threads: s.threads, rss_bytes: bytes(s.vmrss) }
    }
}

fn status_of(p: Result<Process, ProcError>) -> ProcStatus {
    p.and_then(|p| p.status()).map(|s| ProcStatus::from(&s)).unwrap_or_default()
}

/// Reads `/proc/PID/status` (all zero if the process is gone).
pub fn proc_status(pid: u32) -> ProcStatus {
    match i32::try_from(pid) {
        Ok(pid) => status_of(Process::new(pid)),
        Err(_) => ProcStatus::default(),
    }
}

/// This process's own `/proc/self/status`.
pub fn own_status() -> ProcStatus {
    status_of(Process::myself())
}

/// A process's memory as `/proc/PID/smaps_rollup` sums it over all its
/// mappings, guest RAM included, in bytes: the same host-side figures for
/// any VMM, ours or a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcMemory {
    /// `Rss`.
    pub rss: u64,
    /// `Pss` (shared pages split among the processes that map them).
    pub pss: u64,
    /// `Anonymous` (heap, stacks, guest RAM).
    pub anon: u64,
}

/// Reads `/proc/PID/smaps_rollup` (all zero if the process is gone).
pub fn proc_memory(pid: u32) -> ProcMemory {
    let Ok(pid) = i32::try_from(pid) else { return ProcMemory::default() };
    let Ok(rollup) = Process::new(pid).and_then(|p| p.smaps_rollup()) else { return ProcMemory::default() };
    let Some(map) = rollup.memory_map_rollup.0.first() else { return ProcMemory::default() };
    let get = |k: &str| map.extension.map.get(k).copied().unwrap_or(0);
    ProcMemory { rss: get("Rss"), pss: get("Pss"), anon: get("Anonymous") }
}

/// CPU time process `pid` used so far (user + system), in ms; `None` if it
/// is gone.
pub fn cpu_time_ms(pid: u32) -> Option<f64> {
    let stat = Process::new(i32::try_from(pid).ok()?).and_then(|p| p.stat()).ok()?;
    let ticks = stat.utime + stat.stime;
    Some(ticks as f64 * 1000.0 / procfs::ticks_per_second() as f64)
}

/// Whether process `pid` has exited (gone, or a zombie waiting to be reaped).
pub fn exited(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return true };
    match Process::new(pid).and_then(|p| p.stat()) {
        Ok(stat) => matches!(stat.state(), Ok(ProcState::Zombie | ProcState::Dead)),
        Err(ProcError::NotFound(_) | ProcError::PermissionDenied(_) | ProcError::Io(..)) => true,
        // Read but not understood: say it runs (its end will show otherwise).
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_reads_total_and_available_in_bytes() {
        let m = meminfo().unwrap();
        assert!(m.total >= m.available && m.available > 0, "{m:?}");
        // Whole KiB: procfs converts the kB figures to bytes.
        assert_eq!(m.total % 1024, 0);
    }

    #[test]
    fn the_kernel_counters_are_read_in_bytes() {
        let k = kernel_memory().unwrap();
        assert!(k.slab > 0 && k.kernel_stack > 0 && k.page_tables > 0, "{k:?}");
        if k.stacks_in_vmalloc {
            assert!(k.vmalloc_used >= k.kernel_stack, "vmalloc'd stacks are part of VmallocUsed: {k:?}");
        }
        assert!(k.slab_unreclaimable <= k.slab, "{k:?}");
        assert_eq!(k.kernel_stack % 1024, 0);
    }

    #[test]
    fn vmalloced_stacks_are_recognised_by_their_caller() {
        let with = "0x1-0x2   20480 kernel_clone+0x9c/0x3a0 pages=4 vmalloc N0=4\n0x3-0x4 8192 acpi_os_map_iomem+0x1bc/0x1e0 ioremap\n";
        assert!(vmallocinfo_has_stacks(with));
        assert!(vmallocinfo_has_stacks("0x1-0x2 20480 alloc_thread_stack_node+0x5a/0x160 pages=4 vmalloc\n"));
        assert!(!vmallocinfo_has_stacks("0x3-0x4 8192 acpi_os_map_iomem+0x1bc/0x1e0 ioremap\n0x5-0x6 4096 unpurged vm_area\n"));
        assert!(!vmallocinfo_has_stacks(""));
    }

    #[test]
    fn meminfo_without_available_is_an_error() {
        let mut m = procfs::Meminfo::current().unwrap();
        m.mem_total = 10 << 10;
        m.mem_available = Some(4 << 10);
        assert_eq!(Meminfo::try_from(&m).unwrap(), Meminfo { total: 10 << 10, available: 4 << 10 });
        m.mem_available = None;
        assert!(matches!(Meminfo::try_from(&m), Err(MeminfoError::NoMemAvailable)));
    }

    #[test]
    fn status_gives_page_tables_threads_and_rss() {
        let s = own_status();
        assert!(s.threads >= 1 && s.rss_bytes > 0 && s.page_table_bytes > 0, "{s:?}");
        assert_eq!(s.rss_bytes % 1024, 0);
        // The test harness starts and ends threads meanwhile: the count is
        // only compared loosely.
        assert!(proc_status(std::process::id()).threads >= 1);
        assert_eq!(proc_status(u32::MAX), ProcStatus::default());
    }

    #[test]
    fn the_load_average_reads_like_the_kernel_prints_it() {
        let l = loadavg().unwrap();
        let words: Vec<&str> = l.split(' ').collect();
        assert_eq!(words.len(), 5, "{l}");
        assert!(words[..3].iter().all(|w| w.parse::<f64>().is_ok() && w.split_once('.').unwrap().1.len() == 2), "{l}");
        assert!(words[3].contains('/'), "{l}");
    }

    #[test]
    fn smaps_rollup_and_cpu_time_of_this_process() {
        let m = proc_memory(std::process::id());
        assert!(m.rss > 0 && m.pss > 0 && m.anon > 0 && m.pss <= m.rss && m.anon <= m.rss, "{m:?}");
        assert_eq!(proc_memory(u32::MAX), ProcMemory::default());
        let t0 = cpu_time_ms(std::process::id()).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time_ms(std::process::id()).unwrap() >= t0);
        assert_eq!(cpu_time_ms(u32::MAX), None);
    }

    #[test]
    fn bracketed_choice() {
        assert_eq!(bracketed("always [madvise] never"), Some("madvise"));
        assert_eq!(bracketed("none"), None);
    }

    #[test]
    fn this_process_is_running_and_a_missing_one_has_exited() {
        assert!(!exited(std::process::id()));
        assert!(exited(u32::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Unreaped, it is a zombie: exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !exited(pid) {
            assert!(std::time::Instant::now() < deadline, "pid {pid} never seen exited");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.wait().unwrap();
        assert!(exited(pid));
        assert!(host_info(meminfo().unwrap()).cores >= 1);
    }
}

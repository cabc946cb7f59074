//! What the density runner reads about the host: `/proc/meminfo`
//! (`MemTotal`, `MemAvailable`), the machine (cores, kernel, whether
//! `/dev/kvm` is PVM) and a child's `/proc/PID/status` (page tables, threads).

use serde::Serialize;

/// Why `/proc/meminfo` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MeminfoError {
    /// The file could not be read.
    #[error("cannot read /proc/meminfo")]
    Read(#[source] std::io::Error),
    /// A field the runner needs is missing or not a number of kB.
    #[error("/proc/meminfo has no usable {0} line")]
    Missing(&'static str),
}

/// The two `/proc/meminfo` figures the runner uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Meminfo {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable`: what the kernel estimates can be allocated without
    /// swapping (there is no swap here: without reclaiming page cache).
    pub available: u64,
}

/// Parses `/proc/meminfo` text (values are in kB, i.e. KiB).
pub fn parse_meminfo(text: &str) -> Result<Meminfo, MeminfoError> {
    let field = |name: &'static str| -> Result<u64, MeminfoError> {
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                let mut words = rest.split_whitespace();
                let kib: u64 = words.next()?.parse().ok()?;
                match words.next() {
                    Some("kB") | None => kib.checked_mul(1024),
                    Some(_) => None,
                }
            })
            .ok_or(MeminfoError::Missing(name))
    };
    Ok(Meminfo { total: field("MemTotal")?, available: field("MemAvailable")? })
}

/// Reads `/proc/meminfo` now.
pub fn meminfo() -> Result<Meminfo, MeminfoError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(MeminfoError::Read)?;
    parse_meminfo(&text)
}

/// The machine the experiment ran on, for `report.json`.
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

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The word in brackets of a sysfs choice list ("always [madvise] never").
pub fn bracketed(s: &str) -> Option<&str> {
    let start = s.find('[')? + 1;
    let len = s[start..].find(']')?;
    Some(&s[start..start + len])
}

/// Describes this host.
pub fn host_info(mem: Meminfo) -> HostInfo {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
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

/// What `/proc/PID/status` says about a child's kernel-side cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcStatus {
    /// `VmPTE`: the process's page tables, in bytes.
    pub page_table_bytes: u64,
    /// `Threads`.
    pub threads: u64,
}

/// Parses `/proc/PID/status` text; missing fields read as 0.
pub fn parse_status(text: &str) -> ProcStatus {
    let mut s = ProcStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let num = value.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match key {
            "VmPTE" => s.page_table_bytes = num * 1024,
            "Threads" => s.threads = num,
            _ => {}
        }
    }
    s
}

/// Reads `/proc/PID/status` (all zero if the process is gone).
pub fn proc_status(pid: u32) -> ProcStatus {
    std::fs::read_to_string(format!("/proc/{pid}/status")).map(|t| parse_status(&t)).unwrap_or_default()
}

/// Whether process `pid` has exited (gone, or a zombie waiting to be reaped).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may
        // itself contain spaces or parentheses: take the last ')'.
        Ok(t) => t.rfind(')').and_then(|i| t[i + 1..].split_whitespace().next()).is_some_and(|st| st == "Z" || st == "X"),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24683656 kB\nMemFree:        20000000 kB\nMemAvailable:   24163760 kB\nBuffers:            1234 kB\nHugePages_Total:       0\n";

    #[test]
    fn meminfo_reads_total_and_available_in_bytes() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total, 24683656 * 1024);
        assert_eq!(m.available, 24163760 * 1024);
    }

    #[test]
    fn meminfo_without_available_is_an_error() {
        let e = parse_meminfo("MemTotal: 10 kB\nMemFree: 5 kB\n").unwrap_err();
        assert!(matches!(e, MeminfoError::Missing("MemAvailable")), "{e}");
        // A prefix of another field's name does not count.
        assert!(parse_meminfo("MemTotalX: 10 kB\nMemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: ten kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn status_gives_page_tables_and_threads() {
        let s = parse_status("Name:\tvmm\nVmPTE:\t     132 kB\nThreads:\t4\n");
        assert_eq!(s, ProcStatus { page_table_bytes: 132 * 1024, threads: 4 });
        assert_eq!(parse_status("garbage"), ProcStatus::default());
    }

    #[test]
    fn bracketed_choice() {
        assert_eq!(bracketed("always [madvise] never"), Some("madvise"));
        assert_eq!(bracketed("none"), None);
    }

    #[test]
    fn this_process_is_running_and_pid_0_is_not_a_child() {
        assert!(!exited(std::process::id()));
        assert!(meminfo().unwrap().available > 0);
    }
}

//! What `vmm bench` writes: `bench.json` (every raw sample, the host with
//! its load around the run, the settings and each command line) and the short
//! Markdown table for stdout.

use super::alloc::AllocResults;
use super::boot::BootResults;
use super::memmap::MemmapResults;
use super::reclaim::ReclaimResults;
use crate::host;
use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Serialize)]
pub struct Settings {
    pub boot_runs: usize,
    pub reps: usize,
    pub pairs: u64,
    pub mem_mib: u64,
    pub small_mem_mib: u64,
    pub reclaim_rounds: usize,
    pub churn_cycles: usize,
}

/// The host, as `vmm density` describes it, plus the load around the run
/// (other work on a shared host).
#[derive(Debug, Serialize)]
pub struct HostInfo {
    #[serde(flatten)]
    machine: Option<host::HostInfo>,
    /// `/proc/loadavg` when the bench started.
    loadavg_start: Option<String>,
    /// `/proc/loadavg` when it ended.
    pub loadavg_end: Option<String>,
}

impl HostInfo {
    /// The host now, with the load average at the start.
    pub fn read() -> HostInfo {
        HostInfo { machine: host::meminfo().ok().map(host::host_info), loadavg_start: host::loadavg(), loadavg_end: None }
    }
}

#[derive(Debug, Serialize)]
pub struct BenchResults {
    pub date_utc: String,
    pub host: HostInfo,
    pub vmm: String,
    pub settings: Settings,
    pub boot: Option<BootResults>,
    pub alloc: Option<AllocResults>,
    pub memmap: Option<MemmapResults>,
    pub reclaim: Option<ReclaimResults>,
    pub duration_s: f64,
}

fn f1(x: Option<f64>, scale: f64) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.1}", v / scale))
}

/// Bytes as KiB (below 10 MiB) or MiB, for the reclaim table.
fn size(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b < 10 << 20 => format!("{} KiB", b >> 10),
        Some(b) => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
    }
}

fn r2(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.2}x"))
}

/// A Markdown table: a header, its separator and the rows, then a blank line.
fn markdown(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let line = |cells: &[&str]| format!("| {} |\n", cells.join(" | "));
    let mut s = line(header) + &line(&vec!["---"; header.len()]);
    for r in rows {
        s += &line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    s + "\n"
}

impl BenchResults {
    /// The short table for stdout (Markdown, so it pastes into docs).
    pub fn table(&self) -> String {
        let mut s = format!(
            "vmm bench, {} ({} CPUs, load average at start {})\n\n",
            self.date_utc,
            self.host.machine.as_ref().map_or(0, |m| m.cores),
            self.host.loadavg_start.as_deref().unwrap_or("?")
        );
        if let Some(b) = &self.boot {
            s += &format!("Boot, {} MiB, median of {} runs each (ms)\n\n", self.settings.mem_mib, self.settings.boot_runs);
            s += &markdown(
                &["variant", "vCPUs", "exec→ready", "ratio to eager", "exec→exit", "ratio to eager", "failures"],
                b.variants.iter().map(|v| {
                    vec![
                        v.name.clone(),
                        v.vcpus.to_string(),
                        f1(v.median_ready_us, 1e3),
                        r2(v.ratio_ready_to_eager),
                        f1(v.median_wall_us, 1e3),
                        r2(v.ratio_wall_to_eager),
                        v.failures.to_string(),
                    ]
                }),
            );
        }
        if let Some(a) = &self.alloc {
            s += &format!(
                "Allocator fast path, cycles per order-0 alloc+free pair ({} pairs, median of {})\n\n",
                a.pairs, self.settings.reps
            );
            s += &markdown(
                &["variant", "state", "median", "min", "max"],
                a.variants.iter().map(|v| {
                    vec![
                        v.name.to_string(),
                        v.what.to_string(),
                        f1(v.median_cycles_per_pair, 1.0),
                        f1(v.min_cycles_per_pair, 1.0),
                        f1(v.max_cycles_per_pair, 1.0),
                    ]
                }),
            );
            for r in &a.ratios {
                s += &format!("- {}: {} / {} = {}\n", r.name, r.numerator, r.denominator, r2(r.ratio));
            }
            s += "\n";
        }
        if let Some(m) = &self.memmap {
            s += &format!("Memmap initialization per struct page (median of {})\n\n", self.settings.reps);
            s += &markdown(
                &["strategy", "pages initialized", "cycles/page", "ns/page", "what"],
                m.variants.iter().map(|v| {
                    vec![
                        v.name.to_string(),
                        v.median_pages_initialized.map_or_else(|| "-".into(), |p| format!("{p:.0}")),
                        f1(v.median_cycles_per_page, 1.0),
                        f1(v.median_ns_per_page, 1.0),
                        v.what.to_string(),
                    ]
                }),
            );
        }
        if let Some(r) = &self.reclaim {
            s += &self.reclaim_table(r);
        }
        s
    }

    fn reclaim_table(&self, r: &ReclaimResults) -> String {
        let mut s = format!(
            "Reclaim: {} MiB ondemand guest holds {} MiB, frees it; reclaim_delay {} ms; median of {} rounds\n\n",
            r.mem_mib, r.held_mib, r.delay_ms, self.settings.reclaim_rounds
        );
        let idle = r.variants.first().and_then(|v| v.median_idle);
        let mut rows = vec![vec![
            "idle (full's VM)".to_string(),
            size(idle.map(|f| f.guest_ram_resident_bytes)),
            size(idle.map(|f| f.memmap_resident_bytes)),
            size(idle.map(|f| f.kvm_registered_bytes)),
            size(idle.map(|f| f.kvm_memslot_bytes_estimate)),
            "-".into(),
            "-".into(),
            "-".into(),
        ]];
        for v in &r.variants {
            let f = v.median_settled;
            rows.push(vec![
                format!("freed, {}", v.mode),
                size(f.map(|f| f.guest_ram_resident_bytes)),
                size(f.map(|f| f.memmap_resident_bytes)),
                size(f.map(|f| f.kvm_registered_bytes)),
                size(f.map(|f| f.kvm_memslot_bytes_estimate)),
                v.median_above_idle_bytes.map_or_else(|| "-".into(), |b| format!("{:.0} KiB", b / 1024.0)),
                v.median_settle_ms.map_or_else(|| "never".into(), |ms| format!("{ms:.0} ms")),
                r2(v.median_realloc_ratio),
            ]);
        }
        s += &markdown(
            &["state", "guest RAM resident", "memmap resident", "KVM registered", "KVM metadata (est.)", "above idle", "settled after", "2nd / 1st 1 GiB alloc"],
            rows,
        );
        let c = &r.churn;
        s += &format!(
            "Reclaim churn: {} fast and {} slow alloc/free cycles per VM ({:?} MiB in turn, then 0; slow = {} ms + 300 ms pause after each free), reclaim_delay {} ms\n\n",
            c.cycles, c.cycles, c.targets_mib, c.delay_ms, c.delay_ms
        );
        let mut rows = Vec::new();
        for v in &c.vms {
            for (when, f) in &v.after {
                rows.push(vec![
                    v.mode.to_string(),
                    when.to_string(),
                    f.reclaim_events.to_string(),
                    f.chunks_deinitialized.map_or_else(|| "-".into(), |n| n.to_string()),
                    f.memslots_unregistered.to_string(),
                    size(Some(f.kvm_registered_bytes)),
                ]);
            }
        }
        s += &markdown(&["mode", "after cycles", "reclaim events", "chunks de-initialized", "memslots deleted", "KVM registered"], rows);
        for v in &c.vms {
            s += &format!(
                "- {}: median allocation {} ms fast, {} ms slow\n",
                v.mode,
                f1(v.median_fast_alloc_ms, 1.0),
                f1(v.median_slow_alloc_ms, 1.0)
            );
        }
        s += &format!(
            "- allocation time full / off: {} fast, {} slow; full / data: {} fast, {} slow\n\n",
            r2(c.fast_ratio_full_to_off),
            r2(c.slow_ratio_full_to_off),
            r2(c.fast_ratio_full_to_data),
            r2(c.slow_ratio_full_to_data)
        );
        s
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for `t`.
pub fn utc_string(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = vmm::host_output::civil_from_days(secs / 86_400);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_string(UNIX_EPOCH + std::time::Duration::from_secs(20_513 * 86_400 + 3661)), "2026-03-01 01:01:01 UTC");
        assert_eq!(utc_string(UNIX_EPOCH + Duration::from_secs(86_400 + 3661)), "1970-01-02 01:01:01 UTC");
    }

    #[test]
    fn the_table_names_the_run_and_only_the_sections_run() {
        let r = BenchResults {
            date_utc: "2026-01-01 00:00:00 UTC".into(),
            host: HostInfo { machine: None, loadavg_start: Some("0.50 0.40 0.30 1/100 7".into()), loadavg_end: None },
            vmm: "/x/vmm".into(),
            settings: Settings { boot_runs: 1, reps: 1, pairs: 1, mem_mib: 2048, small_mem_mib: 256, reclaim_rounds: 1, churn_cycles: 1 },
            boot: None,
            alloc: None,
            memmap: None,
            reclaim: None,
            duration_s: 0.0,
        };
        assert_eq!(r.table(), "vmm bench, 2026-01-01 00:00:00 UTC (0 CPUs, load average at start 0.50 0.40 0.30 1/100 7)\n\n");
        assert_eq!((f1(Some(1234.0), 1e3), f1(None, 1.0), r2(Some(0.5)), r2(None)), ("1.2".into(), "-".into(), "0.50x".into(), "-".into()));
        assert_eq!((size(Some(96 << 10)), size(Some(1138 << 20)), size(None)), ("96 KiB".into(), "1138.0 MiB".into(), "-".into()));
        let t = markdown(&["a", "b"], [vec!["1".to_string(), "-".to_string()]]);
        assert_eq!(t, "| a | b |\n| --- | --- |\n| 1 | - |\n\n");
    }
}

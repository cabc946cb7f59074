//! What a density run writes: the `report.json` structure, the `vms.csv`
//! rows (streamed while the run goes, one per VM per step) and the summary
//! table printed on stdout.

use super::fleet::ShutdownStats;
use super::probe::{PhasesDone, Ready, Sample};
use super::footprint::{Breakdown, HostPerVm, KernelPerVm, SteadyState, StepSums, TasksPerVm};
use super::peer::PeerKind;
use super::limits::HostLimits;
use super::workload::{AllocSpec, Phased};
use crate::host::HostInfo;
use crate::stats::Distribution;
use api::units::{bytes, micros, yes_no};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why the results could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The output directory could not be created.
    #[error("cannot create the output directory {0:?}")]
    Dir(PathBuf, #[source] io::Error),
    /// A file could not be written.
    #[error("cannot write {0:?}")]
    Write(PathBuf, #[source] io::Error),
    /// `vms.csv` could not be created or written.
    #[error("cannot write {0:?}")]
    Csv(PathBuf, #[source] csv::Error),
}

/// `report.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    /// The runner's command line.
    pub command: Vec<String>,
    /// Seconds since the epoch when the run started.
    pub started_unix_s: u64,
    pub duration_s: f64,
    /// "completed", "interrupted" or "failed".
    pub outcome: &'static str,
    pub error: Option<String>,
    pub host: HostInfo,
    /// The task and file limits the ramps were budgeted against.
    pub limits: HostLimits,
    pub settings: Settings,
    /// The private directory that held the sockets (removed at the end).
    pub work_dir: PathBuf,
    /// The fleet's memory cgroup (`dir`, `version`), or why the run has
    /// none (`unavailable`).
    pub cgroup: CgroupInfo,
    /// KVM's own floor on this host: the kernel memory a bare 1-vCPU VM is
    /// charged, from probe VMs in a cgroup of their own, or why it was not
    /// measured (see `kvm_floor.rs`).
    pub kvm_floor: super::kvm_floor::KvmFloorInfo,
    /// `MemAvailable` when the runner started, in bytes.
    pub initial_mem_available_bytes: u64,
    /// `MemAvailable` after the last VM was reaped, in bytes.
    pub final_mem_available_bytes: Option<u64>,
    pub strategies: Vec<StrategyRun>,
    /// Strategy and reclaim mode pairs that were asked for but not run
    /// (`full` needs `ondemand`), each with why.
    pub skipped: Vec<String>,
    /// The same fleet under the peer VMM (`--peer`), or why it was skipped.
    pub peer: PeerReport,
}

/// The settings of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub vms: u64,
    pub strategies: Vec<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub alloc_mib: AllocSpec,
    pub seed: u64,
    pub ramp: u64,
    pub parallel: usize,
    pub floor_bytes: u64,
    /// Whether the floor came from `--floor-mib` or the default rule.
    pub floor_from_flag: bool,
    /// `--max-memory-mib`, in bytes.
    pub max_memory_bytes: Option<u64>,
    pub settle_timeout_s: u64,
    pub ready_timeout_s: u64,
    /// `--reclaim`: the modes crossed with the strategies (empty: each
    /// strategy's default).
    pub reclaim: Vec<String>,
    /// `--reclaim-delay-ms` given to every VM (`null`: the guest's default).
    pub reclaim_delay_ms: Option<u32>,
    /// `--workload`: the phases every VM runs after the ramp.
    pub workload: Option<Phased>,
    /// The text of `--workload`, as given.
    pub workload_text: Option<String>,
    /// VMs above their idle size at once, at most.
    pub peak_parallel: usize,
    pub steady_timeout_s: u64,
}

/// One strategy's ramp.
#[derive(Debug, Serialize)]
pub struct StrategyRun {
    /// Which VMM ran it: `vmm` (this one) or the peer's kind.
    pub vmm: String,
    pub strategy: String,
    /// The reclaim mode the VMs ran with (`--reclaim`; `null`: the
    /// strategy's default, which the VMs' reports name).
    pub reclaim: Option<String>,
    pub baseline: Baseline,
    /// Whether a launch was refused because `MemAvailable` was at the floor.
    pub floor_reached: bool,
    /// Why the ramp ended.
    pub stop_reason: String,
    /// VMs asked for (`--vms`).
    pub asked: u64,
    /// VMs started.
    pub launched: u64,
    /// VMs that became ready with their workload.
    pub ready: u64,
    pub steps: Vec<Step>,
    pub vms: Vec<VmRecord>,
    /// Spawn → guest ready as the runner saw it, ms.
    pub time_to_ready_ms: Option<Distribution>,
    /// The VMMs' own `guest_ready` (their `main()` → ready), ms.
    pub vmm_guest_ready_ms: Option<Distribution>,
    /// `PUT /guest/memory` durations, ms.
    pub workload_ms: Option<Distribution>,
    /// Wall time spent launching (measurements excluded), s.
    pub launch_seconds: f64,
    /// `ready / launch_seconds` with `parallel` launches in flight.
    pub launch_throughput_vms_per_s: Option<f64>,
    /// Per-VM footprint at the last step (the most VMs, the least noise),
    /// split by owner; `None` for a peer (no memory report to split by).
    pub footprint: Option<Breakdown>,
    /// Per-VM footprint at the last step as the host sees it, the same for
    /// any VMM.
    pub host_per_vm: Option<HostPerVm>,
    /// Whether the VMs stayed up and idle at the end of the ramp.
    pub idle: Option<IdleCheck>,
    /// The host kernel's counters per VM at the last step.
    pub kernel_per_vm: Option<KernelPerVm>,
    /// Tasks per VM at the last step.
    pub tasks_per_vm: Option<TasksPerVm>,
    /// Whether a task or file limit ([`HostLimits`]) ended the ramp.
    pub limit_reached: bool,
    /// VMs that fit before the floor.
    pub fit: Fit,
    /// The phases of `--workload` over the fleet, if one was given.
    pub phases: Option<PhasesRun>,
    /// The fleet in steady state against the fresh fleet (with `--workload`).
    pub steady_state: Option<SteadyState>,
    /// Host memory over the run, with its phases.
    pub timeline: Timeline,
    pub shutdown: ShutdownStats,
}

impl StrategyRun {
    /// `strategy`, or `strategy/reclaim` when a reclaim mode was set.
    pub fn label(&self) -> String {
        match &self.reclaim {
            Some(r) => format!("{}/{r}", self.strategy),
            None => self.strategy.clone(),
        }
    }
}

/// The phases of a phased workload over one run's fleet.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhasesRun {
    /// VMs that started their phases, and of those, finished them.
    pub started: u64,
    pub done: u64,
    /// Ready VMs that never started them (the floor came first); they were
    /// stopped before the steady-state measurement.
    pub stopped_before: u64,
    /// Whether the floor stopped the phases (`stop_reason` says why).
    pub floor_reached: bool,
    /// Whether `--max-memory-mib` stopped them.
    pub limit_reached: bool,
    pub stop_reason: String,
    /// From the first phase started to the last one ended, s.
    pub seconds: f64,
}

/// `MemAvailable` over one run, sampled every few hundred ms, and when
/// each stage began: what `host_memory_over_time.svg` draws.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    /// `[seconds since the run's start, MemAvailable drop from its
    /// baseline in bytes]`.
    pub samples: Vec<(f64, i64)>,
    /// `[seconds, stage]`: `ramp`, `phases`, `settling`, `steady`, `stop`.
    pub marks: Vec<(f64, &'static str)>,
}

/// The ready VMs at the end of a ramp, watched over a short window: still
/// running, and how much host CPU each used (an idle guest, in a port read
/// or halted, uses almost none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IdleCheck {
    /// VMs watched (ready and running when the window opened).
    pub vms: u64,
    /// Of those, still running when it closed.
    pub alive: u64,
    /// Length of the window, s.
    pub window_s: f64,
    /// CPU (user + system) per VM over the window, mean and largest, as a
    /// percentage of one core.
    pub cpu_percent_mean: f64,
    pub cpu_percent_max: f64,
}

/// The host before a strategy's ramp.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Baseline {
    /// `MemAvailable` the ramp's drops are measured from, bytes.
    pub mem_available_bytes: u64,
    /// Whether `MemAvailable` came back to within the tolerance of the
    /// run's initial value before the timeout (always true for the first).
    pub settled: bool,
    /// How long the runner waited for it, s.
    pub waited_s: f64,
    /// The value waited for (initial `MemAvailable` less the tolerance).
    pub target_bytes: u64,
    /// Tasks on the host (`/proc/loadavg`).
    pub host_tasks: Option<u64>,
    /// The kernel's own counters (`/proc/meminfo`).
    pub kernel: Option<crate::host::KernelMemory>,
    /// What the fleet's memory cgroup held (`None` without one).
    pub cgroup: Option<super::cgroup::CgroupMemory>,
}

/// The fleet's memory cgroup in `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupInfo {
    pub dir: Option<PathBuf>,
    pub version: Option<super::cgroup::Version>,
    /// Why there is none.
    pub unavailable: Option<String>,
}

/// VMs that fit before the floor.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Fit {
    /// Running when the ramp stopped (at the floor, or all asked for).
    pub measured: u64,
    /// `(MemTotal − floor − baseline used) / per-VM footprint`.
    pub extrapolated: Option<u64>,
}

/// One ramp step.
#[derive(Debug, Serialize)]
pub struct Step {
    pub step: u64,
    /// `ramp` (VMs launched in this step, fresh) or `steady` (the fleet
    /// after its phases, once reclaim settled).
    pub phase: &'static str,
    /// `MemAvailable` at the measurement, bytes.
    pub mem_available_bytes: u64,
    pub sums: StepSums,
    pub per_vm: Option<Breakdown>,
    /// The host's view per VM (the same for a peer).
    pub host_per_vm: Option<HostPerVm>,
    /// The host kernel's counters per VM (deltas from the baseline).
    pub kernel_per_vm: Option<KernelPerVm>,
    /// Tasks on the host at the measurement.
    pub host_tasks: Option<u64>,
    pub tasks_per_vm: Option<TasksPerVm>,
    /// The runner's own resident memory (part of the drop), bytes.
    pub runner_rss_bytes: u64,
    /// VMs started in this step.
    pub launched: u64,
    pub launch_seconds: f64,
    pub measure_seconds: f64,
}

/// One VM.
#[derive(Debug, Serialize)]
pub struct VmRecord {
    pub index: u64,
    pub pid: u32,
    pub alloc_mib: u64,
    pub ready: Option<Ready>,
    /// Its run through the phases of `--workload`.
    pub phases: Option<PhasesDone>,
    pub error: Option<String>,
    /// The VM's figures at the last step it was measured in.
    pub last_sample: Option<Sample>,
    /// Its full `GET /memory` answer at that step.
    pub last_memory_report: Option<RawJson>,
}

/// A JSON text kept as text while the run goes (small), written as JSON.
#[derive(Debug)]
pub struct RawJson(pub Box<str>);

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::from_str::<serde_json::Value>(&self.0).map_err(serde::ser::Error::custom)?.serialize(s)
    }
}

/// The columns of `vms.csv`, in order: the fields of [`CsvRow`].
pub const CSV_COLUMNS: [&str; 26] = [
    "strategy",
    "step",
    "step_vms",
    "index",
    "pid",
    "alloc_mib",
    "spawn_to_ready_ms",
    "vmm_guest_ready_ms",
    "workload_ms",
    "valid",
    "guest_ram_resident_bytes",
    "memmap_resident_bytes",
    "memmap_initialized_bytes",
    "workload_bytes",
    "allocated_bytes",
    "vmm_rss_bytes",
    "vmm_pss_bytes",
    "page_table_bytes",
    "threads",
    "kvm_memslot_estimate_bytes",
    "proc_rss_bytes",
    "proc_pss_bytes",
    "proc_anon_bytes",
    "vmm",
    "reclaim",
    "phase",
];

/// One `vms.csv` row: one VM at one step (times in ms with three decimals,
/// empty when the VM never became ready).
#[derive(Debug, Serialize)]
pub struct CsvRow<'a> {
    strategy: &'a str,
    step: u64,
    step_vms: u64,
    index: u64,
    pid: u32,
    alloc_mib: u64,
    #[serde(serialize_with = "ms")]
    spawn_to_ready_ms: Option<f64>,
    #[serde(serialize_with = "ms")]
    vmm_guest_ready_ms: Option<f64>,
    #[serde(serialize_with = "ms")]
    workload_ms: Option<f64>,
    valid: bool,
    guest_ram_resident_bytes: u64,
    memmap_resident_bytes: u64,
    memmap_initialized_bytes: u64,
    workload_bytes: u64,
    allocated_bytes: u64,
    vmm_rss_bytes: u64,
    vmm_pss_bytes: u64,
    page_table_bytes: u64,
    threads: u64,
    kvm_memslot_estimate_bytes: u64,
    proc_rss_bytes: u64,
    proc_pss_bytes: u64,
    proc_anon_bytes: u64,
    vmm: &'a str,
    reclaim: &'a str,
    phase: &'a str,
}

impl<'a> CsvRow<'a> {
    /// VM `vm`'s row at step `step` (of `step_vms` VMs, in `phase`) of
    /// `run` with its sample `s`.
    pub fn new(run: &'a StrategyRun, step: u64, phase: &'a str, step_vms: u64, vm: &VmRecord, s: &Sample) -> CsvRow<'a> {
        let r = vm.ready.as_ref();
        CsvRow {
            strategy: &run.strategy,
            step,
            step_vms,
            index: vm.index,
            pid: vm.pid,
            alloc_mib: vm.alloc_mib,
            spawn_to_ready_ms: r.map(|r| r.spawn_to_ready_ms),
            vmm_guest_ready_ms: r.and_then(|r| r.vmm_guest_ready_ms),
            workload_ms: r.map(|r| r.workload_ms),
            valid: s.valid,
            guest_ram_resident_bytes: s.guest_ram_resident,
            memmap_resident_bytes: s.memmap_resident,
            memmap_initialized_bytes: s.memmap_initialized,
            workload_bytes: s.workload,
            allocated_bytes: s.allocated,
            vmm_rss_bytes: s.vmm_rss,
            vmm_pss_bytes: s.vmm_pss,
            page_table_bytes: s.page_tables,
            threads: s.threads,
            kvm_memslot_estimate_bytes: s.kvm_memslot_estimate,
            proc_rss_bytes: s.proc.rss,
            proc_pss_bytes: s.proc.pss,
            proc_anon_bytes: s.proc.anon,
            vmm: &run.vmm,
            reclaim: run.reclaim.as_deref().unwrap_or(""),
            phase,
        }
    }
}

/// A time in ms with three decimals; `None` is an empty field.
fn ms<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(&format_args!("{v:.3}")),
        None => s.serialize_none(),
    }
}

/// `vms.csv`, written as the run goes (so the rows are not held in memory,
/// where they would count in the measured drop).
pub struct CsvSink {
    path: PathBuf,
    out: Option<csv::Writer<std::fs::File>>,
}

impl CsvSink {
    /// Creates `dir/vms.csv` with its header; `dir` `None` writes nothing.
    pub fn create(dir: Option<&Path>) -> Result<CsvSink, OutputError> {
        let Some(dir) = dir else { return Ok(CsvSink { path: PathBuf::new(), out: None }) };
        let path = dir.join("vms.csv");
        let csv_err = |e| OutputError::Csv(path.clone(), e);
        // The header comes from CSV_COLUMNS, so that a run with no row has one too.
        let mut out = csv::WriterBuilder::new().has_headers(false).from_path(&path).map_err(csv_err)?;
        out.write_record(CSV_COLUMNS).map_err(csv_err)?;
        Ok(CsvSink { path, out: Some(out) })
    }

    /// Appends one row.
    pub fn row(&mut self, row: &CsvRow<'_>) -> Result<(), OutputError> {
        match &mut self.out {
            Some(o) => o.serialize(row).map_err(|e| OutputError::Csv(self.path.clone(), e)),
            None => Ok(()),
        }
    }

    /// Flushes the file.
    pub fn finish(&mut self) -> Result<(), OutputError> {
        match &mut self.out {
            Some(o) => o.flush().map_err(|e| OutputError::Write(self.path.clone(), e)),
            None => Ok(()),
        }
    }
}

/// Writes `report.json` into `dir`.
pub fn write_report(dir: &Path, report: &Report) -> Result<(), OutputError> {
    let path = dir.join("report.json");
    let file = std::fs::File::create(&path).map_err(|e| OutputError::Write(path.clone(), e))?;
    let mut w = io::BufWriter::new(file);
    serde_json::to_writer_pretty(&mut w, report).map_err(|e| OutputError::Write(path.clone(), e.into()))?;
    writeln!(w).and_then(|()| w.flush()).map_err(|e| OutputError::Write(path, e))
}

/// A byte figure that may come out below zero (a footprint part is a
/// difference of host-wide sums, and so carries their noise), in the unit of
/// [`api::units::bytes`]: "1.2 MiB", "-40 KiB".
fn signed_bytes(v: f64) -> String {
    // Sub-byte precision means nothing here.
    let n = v.abs().round() as u64;
    if v < 0.0 && n > 0 {
        format!("-{}", bytes(n))
    } else {
        bytes(n)
    }
}

/// A time given in milliseconds, in the unit of [`api::units::micros`].
fn millis(ms: f64) -> String {
    micros(ms * 1000.0)
}

/// What `vmm density` prints when it is done: first the answer, one line
/// per strategy (VMs that fit, per-VM footprint, time to ready), then the
/// details table (the footprint's parts, ready p50/p99, launch rate). Every
/// figure is in the unit that shows it, as in `vmm ctl --human`.
pub fn summary(report: &Report) -> String {
    let mut t = summary_of(&report.strategies);
    t += &floor_line(&report.kvm_floor);
    t += &steady_view(&report.strategies, &report.skipped);
    t += &host_view(report.strategies.iter().chain(&report.peer.strategies), report.peer.skipped.as_deref());
    t
}

/// KVM's floor, under the summary: the part of "KVM + kernel" that no VMM
/// can cut on this host.
fn floor_line(f: &super::kvm_floor::KvmFloorInfo) -> String {
    match (&f.floor, &f.unavailable) {
        (Some(k), _) => format!(
            "\nKVM's floor on this host: a bare 1-vCPU VM that has run is charged {} of kernel memory ({} to create it with a 2 MiB memslot, {} more at its vCPU's first run; mean of {} probe VMs); creating one takes {} and its first run to a `hlt` {} (medians)\n",
            signed_bytes(k.kernel_bytes as f64),
            signed_bytes(k.created_bytes as f64),
            signed_bytes(k.first_run_bytes as f64),
            k.vms,
            millis(k.create_us / 1000.0),
            millis(k.first_run_us / 1000.0),
        ),
        (None, Some(why)) => format!("\nKVM's floor on this host: not measured ({why})\n"),
        (None, None) => String::new(),
    }
}

/// Every ramp, ours and the peer's, by the measures taken the same way for
/// any VMM: `MemAvailable` drop, the process's PSS and anonymous memory
/// (guest RAM included), the kernel's counters and tasks per VM, time to
/// ready, and the idle check.
fn host_view<'a>(runs: impl Iterator<Item = &'a StrategyRun>, peer_skipped: Option<&str>) -> String {
    let mut t = String::from("\nHOST VIEW PER VM (the same measures for every VMM)\n");
    let row = |c: [&str; 12]| {
        let line = format!(
            "{:<12} {:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>10} {:>12}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]
        );
        line.trim_end().to_string() + "\n"
    };
    t += &row(["vmm", "strategy", "VMs", "per VM", "cgroup", "cg. kernel", "proc PSS", "proc anon", "kernel", "tasks", "ready p50", "idle CPU"]);
    let dash = || "-".to_string();
    for s in runs {
        let h = s.host_per_vm.as_ref();
        let part = |get: fn(&HostPerVm) -> f64| h.map_or_else(dash, |h| signed_bytes(get(h)));
        let idle = s.idle.map_or_else(dash, |i| format!("{:.2}% {}/{}", i.cpu_percent_mean, i.alive, i.vms));
        let cells = [
            s.vmm.clone(),
            s.label(),
            s.fit.measured.to_string(),
            part(|h| h.total),
            h.and_then(|h| h.cgroup).map_or_else(dash, signed_bytes),
            h.and_then(|h| h.cgroup_kernel).map_or_else(dash, signed_bytes),
            part(|h| h.process_pss),
            part(|h| h.process_anon),
            s.kernel_per_vm.map_or_else(dash, |k| signed_bytes(k.total)),
            s.tasks_per_vm.map_or_else(dash, |k| format!("{:.1}", k.vmm_threads)),
            s.time_to_ready_ms.as_ref().map_or_else(dash, |d| millis(d.p50)),
            idle,
        ];
        t += &row(cells.each_ref().map(String::as_str));
    }
    if let Some(why) = peer_skipped {
        let _ = writeln!(t, "peer: {why}");
    }
    t
}

fn summary_of(strategies: &[StrategyRun]) -> String {
    let mut t = String::from("SUMMARY\n");
    let name_width = strategies.iter().map(|s| s.label().len()).max().unwrap_or(0);
    for s in strategies {
        let mut line = format!("{:<name_width$}  {} VMs fit", s.label(), s.fit.measured);
        // The ramp launched them all, and it was the phases that stopped.
        let phases_stopped = s.phases.as_ref().filter(|p| (p.floor_reached || p.limit_reached) && s.fit.measured >= s.asked);
        if let Some(p) = phases_stopped {
            let at = if p.floor_reached { "the floor" } else { "the memory budget" };
            line += &format!(" (all asked for; their phases stopped at {at}: {} of them ran theirs)", p.started);
        } else if s.floor_reached {
            line += " (stopped at the floor)";
        } else if s.limit_reached {
            // The limit's own words: which one, and its remedy.
            line += &format!(" (stopped at a host limit: {})", s.stop_reason);
        } else if s.fit.measured < s.asked && !s.stop_reason.is_empty() {
            line += &format!(" (stopped: {})", s.stop_reason);
        } else {
            line += " (all asked for; the floor was not reached)";
        }
        if let Some(n) = s.fit.extrapolated {
            line += &format!(", about {n} on the whole host");
        }
        if let Some(f) = &s.footprint {
            line += &format!("; {} per VM", signed_bytes(f.total));
        }
        if let Some(d) = &s.time_to_ready_ms {
            line += &format!("; ready in {} (p50)", millis(d.p50));
        }
        let _ = writeln!(t, "{line}");
    }
    t.push('\n');
    let row = |cells: [&str; 13]| {
        let line = format!(
            "{:<14} {:>6} {:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7}",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7], cells[8], cells[9], cells[10], cells[11], cells[12]
        );
        line.trim_end().to_string() + "\n"
    };
    t += &row(["strategy", "fit", "floor", "host fit", "per VM", "KVM+kern", "VMM", "g.kern", "memmap", "workload", "ready p50", "ready p99", "VMs/s"]);
    t += &row(["", "VMs", "hit", "(extrap)", "", "", "", "", "", "", "", "", ""]);
    let dash = || "-".to_string();
    for s in strategies {
        let f = s.footprint.as_ref();
        let part = |get: fn(&Breakdown) -> f64| f.map_or_else(dash, |b| signed_bytes(get(b)));
        let ready = |get: fn(&Distribution) -> f64| s.time_to_ready_ms.as_ref().map_or_else(dash, |d| millis(get(d)));
        let cells = [
            s.label(),
            s.fit.measured.to_string(),
            yes_no(s.floor_reached),
            s.fit.extrapolated.map_or_else(dash, |v| v.to_string()),
            part(|b| b.total),
            part(|b| b.kvm_kernel),
            part(|b| b.vmm),
            part(|b| b.guest_kernel),
            part(|b| b.memmap),
            part(|b| b.workload),
            ready(|d| d.p50),
            ready(|d| d.p99),
            s.launch_throughput_vms_per_s.map_or_else(dash, |v| format!("{v:.1}")),
        ];
        t += &row(cells.each_ref().map(String::as_str));
    }
    t
}

/// The runs with a phased workload: per VM fresh and in steady state, by
/// the host (`MemAvailable`) and by the VMs' own reports, with the ratios;
/// then the pairs that were skipped.
fn steady_view(runs: &[StrategyRun], skipped: &[String]) -> String {
    let mut t = String::new();
    let with: Vec<&StrategyRun> = runs.iter().filter(|s| s.phases.is_some()).collect();
    if !with.is_empty() {
        t += "\nSTEADY STATE PER VM (after the phases, once reclaim settled; fresh = the same fleet just ready, at the idle size)\n";
        let row = |c: [&str; 13]| {
            let line = format!(
                "{:<14} {:>6} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7} {:>9}  {}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12]
            );
            line.trim_end().to_string() + "\n"
        };
        t += &row(["run", "VMs", "fresh", "steady", "ratio", "fresh", "steady", "ratio", "fresh", "steady", "ratio", "settled", "phases"]);
        t += &row(["", "", "(host)", "(host)", "", "(VMs')", "(VMs')", "", "(cgroup)", "(cgroup)", "", "", ""]);
        let dash = || "-".to_string();
        let ratio = |r: Option<f64>| r.map_or_else(dash, |r| format!("{r:.2}"));
        for s in with {
            let st = s.steady_state.as_ref();
            let fig = |get: fn(&SteadyState) -> f64| st.map_or_else(dash, |st| signed_bytes(get(st)));
            let phases = s.phases.as_ref().map_or_else(String::new, |p| {
                let mut v = format!("{}/{} done", p.done, p.started);
                if !p.stop_reason.is_empty() {
                    v += &format!("; {}", p.stop_reason);
                }
                v
            });
            let cells = [
                s.label(),
                st.map_or_else(dash, |st| st.vms.to_string()),
                fig(|st| st.fresh.host_total),
                fig(|st| st.steady.host_total),
                ratio(st.and_then(|st| st.ratio)),
                fig(|st| st.fresh.reported),
                fig(|st| st.steady.reported),
                ratio(st.and_then(|st| st.reported_ratio)),
                st.and_then(|st| st.fresh.cgroup).map_or_else(dash, signed_bytes),
                st.and_then(|st| st.steady.cgroup).map_or_else(dash, signed_bytes),
                ratio(st.and_then(|st| st.cgroup_ratio)),
                st.map_or_else(dash, |st| format!("{} {:.0}s", yes_no(st.settled), st.waited_s)),
                phases,
            ];
            t += &row(cells.each_ref().map(String::as_str));
        }
    }
    for why in skipped {
        let _ = writeln!(t, "skipped: {why}");
    }
    t
}

/// What the report says about the peer.
#[derive(Debug, serde::Serialize)]
pub struct PeerReport {
    /// `firecracker`, or `null` when the peer part was skipped.
    pub kind: Option<PeerKind>,
    /// The peer binary.
    pub path: Option<PathBuf>,
    /// Why the peer part did not run (no `--peer`), if it did not.
    pub skipped: Option<String>,
    /// The peer's ramps, one per strategy, as for our own VMs.
    pub strategies: Vec<StrategyRun>,
}

impl PeerReport {
    /// The report of a run without `--peer`.
    pub fn skipped() -> PeerReport {
        PeerReport {
            kind: None,
            path: None,
            skipped: Some("no --peer given: the peer part of the run was skipped".into()),
            strategies: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VmRecord {
        VmRecord {
            index: 3,
            pid: 42,
            alloc_mib: 16,
            ready: Some(Ready { spawn_to_ready_ms: 12.5, vmm_guest_ready_ms: Some(10.0), workload_ms: 1.25 }),
            phases: None,
            error: None,
            last_sample: None,
            last_memory_report: None,
        }
    }

    fn sample() -> Sample {
        Sample { valid: true, guest_ram_resident: 100, memmap_resident: 10, workload: 50, vmm_pss: 7, ..Sample::default() }
    }

    /// `rows` as CSV text, with the header the writer derives from the fields.
    fn csv_text(rows: &[CsvRow<'_>]) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in rows {
            w.serialize(r).unwrap();
        }
        String::from_utf8(w.into_inner().unwrap()).unwrap()
    }

    #[test]
    fn csv_rows_match_the_header() {
        let unready = VmRecord { ready: None, ..record() };
        let (eager, mut ondemand) = (run("eager", None), run("ondemand", None));
        ondemand.reclaim = Some("full".into());
        let text = csv_text(&[
            CsvRow::new(&eager, 2, "ramp", 10, &record(), &sample()),
            CsvRow::new(&ondemand, 3, "steady", 1, &unready, &sample()),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        assert!(lines[1].starts_with("eager,2,10,3,42,16,12.500,10.000,1.250,true,100,10,0,50,"), "{text}");
        assert!(lines[1].ends_with(",vmm,,ramp"), "{text}");
        assert!(lines[2].starts_with("ondemand,3,1,3,42,16,,,,true,"), "{text}");
        assert!(lines[2].ends_with(",vmm,full,steady"), "{text}");
        assert!(lines.iter().all(|l| l.split(',').count() == CSV_COLUMNS.len()), "{text}");
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        let text = csv_text(&[CsvRow::new(&run("a,\"b\"", None), 0, "ramp", 1, &record(), &sample())]);
        assert!(text.lines().nth(1).unwrap().starts_with("\"a,\"\"b\"\"\",0,1,"), "{text}");
    }

    #[test]
    fn the_sink_writes_the_header_then_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = CsvSink::create(Some(dir.path())).unwrap();
        sink.finish().unwrap();
        let header = CSV_COLUMNS.join(",") + "\n";
        assert_eq!(std::fs::read_to_string(dir.path().join("vms.csv")).unwrap(), header);
        sink.row(&CsvRow::new(&run("eager", None), 0, "ramp", 1, &record(), &sample())).unwrap();
        sink.finish().unwrap();
        let text = std::fs::read_to_string(dir.path().join("vms.csv")).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with(&header) && text.ends_with("\n"), "{text}");
        let mut none = CsvSink::create(None).unwrap();
        none.row(&CsvRow::new(&run("eager", None), 0, "ramp", 1, &record(), &sample())).unwrap();
        none.finish().unwrap();
    }

    fn run(strategy: &str, footprint: Option<Breakdown>) -> StrategyRun {
        StrategyRun {
            vmm: "vmm".into(),
            strategy: strategy.into(),
            reclaim: None,
            baseline: Baseline {
                mem_available_bytes: 20 << 30,
                settled: true,
                waited_s: 0.0,
                target_bytes: 20 << 30,
                host_tasks: None,
                kernel: None,
                cgroup: None,
            },
            floor_reached: true,
            stop_reason: "floor".into(),
            asked: 1000,
            launched: 812,
            ready: 812,
            steps: Vec::new(),
            vms: Vec::new(),
            time_to_ready_ms: Distribution::of([3.5, 4.1, 4.1, 90.0]),
            vmm_guest_ready_ms: None,
            workload_ms: None,
            launch_seconds: 10.0,
            launch_throughput_vms_per_s: Some(81.2),
            footprint,
            host_per_vm: None,
            idle: None,
            kernel_per_vm: None,
            tasks_per_vm: None,
            limit_reached: false,
            fit: Fit { measured: 812, extrapolated: Some(18000) },
            phases: None,
            steady_state: None,
            timeline: Timeline::default(),
            shutdown: ShutdownStats::default(),
        }
    }

    #[test]
    fn the_summary_leads_with_the_answer_in_the_units_of_ctl_human() {
        let f = Breakdown {
            kvm_kernel: 430_000.0,
            vmm: 420.0 * 1024.0,
            guest_kernel: 300.0 * 1024.0,
            memmap: 32.0 * 1024.0,
            workload: 0.0,
            total: 1.25 * 1048576.0,
        };
        let mut eager = run("eager", Some(Breakdown { kvm_kernel: -40.0 * 1024.0, ..f }));
        eager.floor_reached = false;
        eager.asked = 812;
        eager.fit.extrapolated = None;
        eager.time_to_ready_ms = None;
        let out = summary_of(&[run("ondemand", Some(f)), eager, run("deferred", None)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "SUMMARY", "{out}");
        let p50 = Distribution::of([3.5, 4.1, 4.1, 90.0]).unwrap().p50;
        assert_eq!(
            lines[1],
            format!("ondemand  812 VMs fit (stopped at the floor), about 18000 on the whole host; 1.2 MiB per VM; ready in {} (p50)", millis(p50)),
            "{out}"
        );
        assert_eq!(lines[2], "eager     812 VMs fit (all asked for; the floor was not reached); 1.2 MiB per VM", "{out}");
        assert!(lines[3].starts_with("deferred  812 VMs fit (stopped at the floor), about 18000") && !lines[3].contains("per VM"), "{out}");
        assert_eq!(lines[4], "", "{out}");
        assert!(lines[5].starts_with("strategy ") && lines[5].ends_with("VMs/s"), "{out}");
        // A ramp that ended at a host limit says which, with its remedy,
        // not that all were asked for.
        let mut pids = run("ondemand", None);
        (pids.floor_reached, pids.limit_reached) = (false, true);
        pids.stop_reason = "kernel.pid_max reached: ...; raise it with `sysctl kernel.pid_max=4194304`".into();
        let one = summary_of(&[pids]);
        assert!(
            one.lines().nth(1).unwrap().starts_with("ondemand  812 VMs fit (stopped at a host limit: kernel.pid_max reached: ...; raise it with `sysctl kernel.pid_max=4194304`), about"),
            "{one}"
        );
        // A ramp that launched them all, whose phases then stopped at the
        // floor, says so rather than that the ramp stopped there.
        let phased = |asked: u64| {
            let mut r = run("ondemand", None);
            r.asked = asked;
            r.reclaim = Some("off".into());
            r.phases = Some(PhasesRun { started: 46, stopped_before: 766, floor_reached: true, stop_reason: "floor reached".into(), ..PhasesRun::default() });
            r
        };
        let one = summary_of(&[phased(812)]);
        assert!(
            one.lines().nth(1).unwrap().starts_with("ondemand/off  812 VMs fit (all asked for; their phases stopped at the floor: 46 of them ran theirs), about"),
            "{one}"
        );
        // A ramp that itself stopped at the floor still says that.
        assert!(summary_of(&[phased(1000)]).lines().nth(1).unwrap().starts_with("ondemand/off  812 VMs fit (stopped at the floor)"));
        // An idle memmap is 32 KiB, not "0.03" MiB; a part below zero keeps its sign.
        let ondemand: Vec<&str> = lines[7].split_whitespace().collect();
        assert_eq!(ondemand[..6], ["ondemand", "812", "yes", "18000", "1.2", "MiB"], "{out}");
        assert!(lines[7].contains(" 420 KiB ") && lines[7].contains(" 32 KiB ") && lines[7].contains(" 0 B "), "{out}");
        assert!(lines[7].ends_with(" 81.2"), "{out}");
        assert!(lines[8].contains(" -40 KiB ") && lines[8].contains(" no "), "{out}");
        assert!(lines[9].starts_with("deferred ") && lines[9].contains(" - "), "{out}");
        assert!(!out.contains("0.0 MiB"), "{out}");
        assert!(out.lines().all(|l| l == l.trim_end()), "{out}");
    }

    #[test]
    fn the_host_view_puts_the_peer_beside_our_vms_or_says_it_was_skipped() {
        let mut ours = run("ondemand", None);
        ours.host_per_vm = Some(HostPerVm {
            total: 1.25 * 1048576.0,
            process_rss: 3.0 * 1048576.0,
            process_pss: 0.5 * 1048576.0,
            process_anon: 700.0 * 1024.0,
            outside_process: 0.75 * 1048576.0,
            cgroup: Some(1.1 * 1048576.0),
            cgroup_kernel: Some(680.0 * 1024.0),
        });
        ours.idle = Some(IdleCheck { vms: 812, alive: 812, window_s: 1.0, cpu_percent_mean: 0.01, cpu_percent_max: 0.1 });
        let mut peer = run("ondemand", None);
        peer.vmm = "firecracker".into();
        let out = host_view([&ours, &peer].into_iter(), None);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "HOST VIEW PER VM (the same measures for every VMM)", "{out}");
        assert!(lines[3].starts_with("vmm          ondemand          812    1.2 MiB    1.1 MiB    680 KiB"), "{out}");
        assert!(lines[3].contains(" 700 KiB ") && lines[3].ends_with(" 0.01% 812/812"), "{out}");
        assert!(lines[4].starts_with("firecracker  ondemand          812          -          -          -"), "{out}");
        assert_eq!(lines.len(), 5, "{out}");
        let out = host_view([&ours].into_iter(), Some("no --peer given"));
        assert!(out.ends_with("peer: no --peer given\n"), "{out}");
    }

    #[test]
    fn the_steady_state_view_shows_fresh_against_steady_and_the_skipped_pairs() {
        let fresh = StepSums { vms: 4, mem_available_drop: 40 << 20, guest_ram_resident: 36 << 20, cgroup_rise: Some(38 << 20), ..StepSums::default() };
        let steady = StepSums { vms: 2, mem_available_drop: 21 << 20, guest_ram_resident: 19 << 20, cgroup_rise: Some(19 << 20), ..StepSums::default() };
        let mut full = run("ondemand", None);
        full.reclaim = Some("full".into());
        full.phases = Some(PhasesRun { started: 4, done: 2, stopped_before: 0, floor_reached: false, limit_reached: false, stop_reason: String::new(), seconds: 3.0 });
        full.steady_state = SteadyState::compare(&fresh, &steady, true, 2.4);
        let mut off = run("eager", None);
        off.reclaim = Some("off".into());
        off.phases = Some(PhasesRun { started: 1, done: 1, stopped_before: 3, floor_reached: true, limit_reached: false, stop_reason: "floor reached".into(), seconds: 1.0 });
        let skipped = ["eager/full: reclaim full needs ondemand".to_string()];
        let out = steady_view(&[full, off, run("deferred", None)], &skipped);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("STEADY STATE PER VM"), "{out}");
        let cells: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(
            cells,
            ["ondemand/full", "2", "10", "MiB", "10.5", "MiB", "1.05", "9", "MiB", "9.5", "MiB", "1.06", "9.5", "MiB", "9.5", "MiB", "1.00", "yes", "2s", "2/4", "done"],
            "{out}"
        );
        assert!(lines[5].starts_with("eager/off ") && lines[5].ends_with(" -  1/1 done; floor reached"), "{out}");
        assert_eq!(lines[6], "skipped: eager/full: reclaim full needs ondemand", "{out}");
        assert_eq!(lines.len(), 7, "a run without phases has no row: {out}");
        assert!(out.lines().all(|l| l == l.trim_end()), "{out}");
        assert_eq!(steady_view(&[run("eager", None)], &[]), "");
    }

    #[test]
    fn raw_json_is_written_as_json() {
        let r = RawJson("{\"a\": [1, 2]}".into());
        assert_eq!(serde_json::to_string(&r).unwrap(), "{\"a\":[1,2]}");
        assert!(serde_json::to_string(&RawJson("{".into())).is_err());
    }
}

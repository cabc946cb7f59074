//! `vmm density`: how many microVMs fit on this host under each memmap
//! strategy, and where every megabyte of each VM's footprint goes.
//!
//! For each strategy in turn, the runner launches `vmm run` child processes
//! (`fleet`) in ramps of `--ramp`, `--parallel` launches in flight, waits for
//! each guest to be ready and gives it its workload (`workload`) through the
//! API (`probe`), then measures the step: the host's `MemAvailable` drop from
//! the strategy's baseline and every VM's `GET /memory` report (`footprint`
//! turns the sums into a per-VM breakdown). Before each launch it checks
//! `MemAvailable` against the floor, and the host's task and file limits
//! (`limits`: `kernel.pid_max`, `kernel.threads-max`, `RLIMIT_NPROC`,
//! `RLIMIT_NOFILE`, `--max-tasks`) against the tasks per VM measured so far,
//! and ends the ramp at whichever comes first, with a `stop_reason` naming
//! it and its remedy; a `fork` or thread start failing with `EAGAIN` ends
//! the ramp the same way. Between
//! strategies every VM is stopped and the runner waits for the host to come
//! back to its initial `MemAvailable`. Results go to `--out` (`output`:
//! `report.json`, `vms.csv`; `plot`: the SVGs) and a summary to stdout.
//!
//! With `--reclaim off,data,full` each strategy runs once per reclaim mode
//! (a pair the VMM refuses, `full` with a strategy other than `ondemand`, is
//! skipped with a note). With a phased `--workload` (`workload::Phased`)
//! the ramp brings every VM up at the idle size (the fresh fleet); then (`phases`) the
//! VMs run the phases, at most `--peak-parallel` above idle at once and each
//! one only while `MemAvailable` stays above the floor plus a peak for every
//! VM at its peak; the VMs that did not get their turn (the floor came
//! first: `off` and `data` keep what the peaks touched) are stopped; and
//! once the VMs' reclaim counters stop moving (after the reclaim delay, up
//! to `--steady-timeout-s`) the fleet is measured again: the steady state,
//! compared per VM with the fresh fleet (`footprint::SteadyState`). A thread
//! samples `MemAvailable` all along (`timeline`) for the plot over time.
//!
//! Exit codes: 0 when the run completed (reaching the floor is a result, not
//! an error), 1 when a VM or the host failed, 2 for bad flags, 130 when
//! interrupted (SIGINT/SIGTERM/SIGHUP; the VMs are stopped and the partial
//! results written).

mod cgroup;
mod fleet;
mod footprint;
mod kvm_floor;
mod limits;
mod output;
mod peer;
mod phases;
mod plot;
mod probe;
mod timeline;
mod workload;

use crate::args::{reclaim_parser, strategy_parser};
use crate::host;
use crate::stats::Distribution;
use api::ErrorChain;
use fleet::{Fleet, Launcher, VmSpec};
use footprint::{Breakdown, HostPerVm, KernelPerVm, StepSums, TasksPerVm};
use guest_abi::Strategy;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use output::{Baseline, CsvSink, CsvRow, Fit, IdleCheck, PeerReport, Report, Settings, Step, StrategyRun, Timeline, VmRecord};
use peer::PeerSpec;
use workload::{AllocSpec, Phased};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EXAMPLES: &str = "\
Examples:
  vmm density --vms 10 --mem-mib 256 --out /tmp/d          a quick look at both strategies
  vmm density --vms 600 --strategies eager --out d-eager   eager until 600 VMs or the floor
  vmm density --vms 3000 --strategies eager,ondemand --ramp 100 --parallel 4 --out docs/density
  vmm density --vms 200 --alloc-mib 32..256 --seed 7 --out d-work
                                            each VM allocates a seeded random 32..256 MiB
  vmm density --vms 300 --strategies eager,ondemand --reclaim off,data,full \
      --workload 'peak:256M,hold:2s,idle:16M' --out d-phased
                                            every VM comes up at 16 MiB (fresh), then in
                                            turn peaks at 256 MiB for 2 s and goes back to
                                            16 MiB; the fleet is measured again once reclaim
                                            settled (steady state), per strategy and mode
                                            (eager/full is skipped: full needs ondemand)

--workload phases, comma-separated, ending with exactly one idle:
  peak:SIZE   hold SIZE (every page written), SIZE in MiB: 256M, 256MiB, 1G or 256
  hold:TIME   keep it for TIME: 500ms, 2s, 1.5s (at most 600 s)
  idle:SIZE   go down to SIZE and stay: the VM's size fresh and in steady state

Every VM is a `vmm run --api-sock ... --serial none` child of this process. Ctrl-C
stops them all and writes the partial results. Exit codes: 0 done (reaching the
floor included), 1 a VM or the host failed, 2 bad flags, 130 interrupted.";

/// Arguments of `vmm density`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct DensityArgs {
    /// VMs to launch per strategy (fewer if the floor is reached first).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub vms: u64,
    /// Strategies to ramp, one after the other, comma-separated.
    #[arg(long, value_parser = strategy_parser(), value_delimiter = ',', default_value = "eager,ondemand", value_name = "LIST")]
    pub strategies: Vec<Strategy>,
    /// Guest memory per VM, MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub mem_mib: u64,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u8,
    /// Workload per VM once ready: M MiB, or LO..HI drawn per VM with --seed.
    #[arg(long, default_value = "0", value_name = "M|LO..HI")]
    pub alloc_mib: AllocSpec,
    /// Seed of the workload spread (the same VM number gets the same size in
    /// every strategy).
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
    /// VMs launched per step between two measurements.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub ramp: u64,
    /// Launches in flight at once.
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub parallel: usize,
    /// Stop a ramp when MemAvailable would fall below this many MiB
    /// [default: the larger of 2 GiB and 10% of MemTotal].
    #[arg(long, value_name = "MIB")]
    pub floor_mib: Option<u64>,
    /// Stop a ramp before the run's VMs would hold more than N tasks
    /// (threads, KVM's included) [default: only the host's limits].
    #[arg(long, value_name = "N")]
    pub max_tasks: Option<u64>,
    /// Stop a ramp (and the phases of a phased workload) before the run's
    /// VMs would hold more than this many MiB, as their memory cgroup
    /// counts it (their memory and the kernel's on their behalf), or
    /// without one as the MemAvailable drop: a capacity budget that other
    /// tenants of the host do not move [default: only the floor].
    #[arg(long, value_name = "MIB")]
    pub max_memory_mib: Option<u64>,
    /// Write report.json, vms.csv and the SVG plots here (created if needed).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Longest wait for MemAvailable to come back between strategies, s.
    #[arg(long, default_value_t = 120, value_name = "S")]
    pub settle_timeout_s: u64,
    /// Longest wait for one VM to be ready with its workload, s.
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub ready_timeout_s: u64,
    /// After our own ramps, run the same fleet of the same guest under this
    /// peer VMM, one ramp per strategy (e.g. firecracker=/usr/bin/firecracker:
    /// anything with Firecracker's --config-file and --no-api). Without it
    /// the peer part is skipped, and the report says so.
    #[arg(long, value_name = "KIND=PATH")]
    pub peer: Option<PeerSpec>,
    /// Reclaim modes to run each strategy with, comma-separated (off, data,
    /// full; full needs ondemand, other pairs with it are skipped with a
    /// note) [default: each strategy's own, full for ondemand, off for the
    /// others].
    #[arg(long, value_parser = reclaim_parser(), value_delimiter = ',', value_name = "LIST")]
    pub reclaim: Vec<api::Reclaim>,
    /// How long guest memory stays free before the guest reports it, ms,
    /// given to every VM [default: the guest's, 2000].
    #[arg(long, value_name = "MS")]
    pub reclaim_delay_ms: Option<u32>,
    /// A workload that goes up and down, run by every VM after the ramp:
    /// e.g. 'peak:256M,hold:2s,idle:16M' (see below). The run then measures
    /// the fleet fresh and in steady state.
    #[arg(long, value_name = "PHASES")]
    pub workload: Option<Phased>,
    /// VMs running their phases (above their idle size) at once, at most.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub peak_parallel: usize,
    /// Longest wait after the phases for the VMs' reclaim counters to stop
    /// moving, s (the wait is at least the reclaim delay + 1 s).
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub steady_timeout_s: u64,
}

/// Why a run could not start or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DensityError {
    /// A flag is out of range.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Meminfo(#[from] host::MeminfoError),
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    #[error(transparent)]
    Launch(#[from] probe::LaunchError),
    #[error(transparent)]
    Sample(#[from] probe::SampleError),
    #[error(transparent)]
    Output(#[from] output::OutputError),
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    /// The runner's own executable cannot be found.
    #[error("cannot find this program's executable")]
    Exe(#[source] std::io::Error),
    #[error(transparent)]
    Peer(#[from] peer::PeerError),
}

/// The guest's default reclaim delay (`reclaim_delay_ms=`), used to time the
/// wait for the steady state when `--reclaim-delay-ms` is not given.
const DEFAULT_RECLAIM_DELAY: Duration = Duration::from_millis(2000);

/// One VM's measurement: its figures and raw report (none for a peer), or
/// why not.
type Sampled = Result<(probe::Sample, Option<String>), probe::SampleError>;

/// How long the idle check at the end of a ramp watches the VMs.
const IDLE_WINDOW: Duration = Duration::from_secs(1);

/// What the runner's main thread waits for.
enum Msg {
    /// Launch `index` ended (ready with its workload, or not).
    Launched(u64, Result<probe::Ready, probe::LaunchError>),
    /// VM `index` ran its phases (or not).
    Phased(u64, Result<probe::PhasesDone, probe::LaunchError>),
    /// SIGINT/SIGTERM/SIGHUP.
    Signal(i32),
}

/// Runs the experiment; returns the process exit code.
pub fn run(args: DensityArgs) -> u8 {
    if let Err(e) = validate(&args) {
        eprintln!("vmm density: error: {e}");
        return 2;
    }
    fleet::install_panic_hook();
    match Runner::new(args).and_then(Runner::run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm density: error: {}", ErrorChain(&e));
            1
        }
    }
}

fn validate(a: &DensityArgs) -> Result<(), DensityError> {
    let bad = |m: String| Err(DensityError::Usage(m));
    if a.vms == 0 || a.ramp == 0 || a.parallel == 0 {
        return bad("--vms, --ramp and --parallel must be at least 1".into());
    }
    if a.strategies.is_empty() {
        return bad("--strategies needs at least one strategy".into());
    }
    let names: Vec<&str> = a.strategies.iter().map(|s| s.name()).collect();
    if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
        return bad(format!("--strategies names a strategy twice: {}", names.join(",")));
    }
    if a.alloc_mib.max_mib() >= a.mem_mib {
        return bad(format!("--alloc-mib {} must stay below --mem-mib {}", a.alloc_mib, a.mem_mib));
    }
    if a.vcpus == 0 {
        return bad("--vcpus must be at least 1".into());
    }
    if let Some(p) = &a.peer {
        if let Err(e) = peer::check_executable(&p.path) {
            return bad(format!("--peer: {e}"));
        }
        if a.workload.is_some() || !a.reclaim.is_empty() || a.reclaim_delay_ms.is_some() {
            return bad("--peer runs a fixed --alloc-mib workload only: leave out --workload, --reclaim and --reclaim-delay-ms".into());
        }
    }
    let modes: Vec<&str> = a.reclaim.iter().map(|r| r.name()).collect();
    if (1..modes.len()).any(|i| modes[..i].contains(&modes[i])) {
        return bad(format!("--reclaim names a mode twice: {}", modes.join(",")));
    }
    if !a.reclaim.is_empty() && combos(&a.strategies, &a.reclaim).0.is_empty() {
        return bad("--reclaim full needs --strategies ondemand; no strategy and reclaim pair is left to run".into());
    }
    if let Some(d) = a.reclaim_delay_ms.filter(|d| *d > api::MAX_RECLAIM_DELAY_MS) {
        return bad(format!("--reclaim-delay-ms must be at most {} (got {d})", api::MAX_RECLAIM_DELAY_MS));
    }
    if let Some(w) = &a.workload {
        if a.alloc_mib != (AllocSpec::Fixed { mib: 0 }) {
            return bad("--workload and --alloc-mib exclude each other: the workload's idle: size is what every VM holds fresh".into());
        }
        if w.peak_mib() >= a.mem_mib {
            return bad(format!("--workload peaks at {} MiB, which must stay below --mem-mib {}", w.peak_mib(), a.mem_mib));
        }
    }
    if a.peak_parallel == 0 {
        return bad("--peak-parallel must be at least 1".into());
    }
    Ok(())
}

/// The strategy and reclaim mode pairs to run, in order (each strategy with
/// every mode), and a note for each pair skipped because the VMM refuses
/// it. No modes: each strategy once, with its default.
fn combos(strategies: &[Strategy], modes: &[api::Reclaim]) -> (Vec<(Strategy, Option<api::Reclaim>)>, Vec<String>) {
    if modes.is_empty() {
        return (strategies.iter().map(|&s| (s, None)).collect(), Vec::new());
    }
    let (mut run, mut skipped) = (Vec::new(), Vec::new());
    for &s in strategies {
        for &r in modes {
            if r == api::Reclaim::Full && s != Strategy::OnDemand {
                skipped.push(format!(
                    "{}/full: reclaim full needs ondemand ({} initializes the whole memmap by design)",
                    s.name(),
                    s.name()
                ));
            } else {
                run.push((s, Some(r)));
            }
        }
    }
    (run, skipped)
}

/// Memory left before a limit ([`Runner::memory_room`]).
struct Room {
    bytes: i64,
    limit: RoomLimit,
}

/// Which memory limit is nearest.
enum RoomLimit {
    /// The floor under `MemAvailable` (which is `avail` now).
    Floor { avail: u64 },
    /// `--max-memory-mib` (`budget`) over what the fleet holds (`used`,
    /// measured as `by` says).
    Budget { used: u64, budget: u64, by: &'static str },
}

struct Runner {
    args: DensityArgs,
    started: Instant,
    /// When the current strategy's run started (its timeline's zero).
    epoch: Instant,
    report: Report,
    fleet: Fleet,
    csv: CsvSink,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    cancel: Arc<AtomicBool>,
    interrupted: bool,
}

impl Runner {
    fn new(args: DensityArgs) -> Result<Runner, DensityError> {
        let mem = host::meminfo()?;
        let floor_bytes = args.floor_mib.map_or_else(|| footprint::default_floor(mem.total), |m| m << 20);
        let exe = std::env::current_exe().map_err(DensityError::Exe)?;
        if let Some(out) = &args.out {
            std::fs::create_dir_all(out).map_err(|e| output::OutputError::Dir(out.clone(), e))?;
        }
        let csv = CsvSink::create(args.out.as_deref())?;
        // Before the fleet and any thread of the runner exist (the probe forks).
        let kvm_floor = kvm_floor::KvmFloorInfo::measure(&format!("{}{}-kvm-floor", cgroup::NAME_PREFIX, std::process::id()));
        let fleet = Fleet::new(exe)?;
        let settings = Settings {
            vms: args.vms,
            strategies: args.strategies.iter().map(|s| s.name().to_string()).collect(),
            mem_mib: args.mem_mib,
            vcpus: args.vcpus,
            alloc_mib: args.alloc_mib,
            seed: args.seed,
            ramp: args.ramp,
            parallel: args.parallel,
            floor_bytes,
            floor_from_flag: args.floor_mib.is_some(),
            max_memory_bytes: args.max_memory_mib.map(|m| m << 20),
            settle_timeout_s: args.settle_timeout_s,
            ready_timeout_s: args.ready_timeout_s,
            reclaim: args.reclaim.iter().map(|r| r.name().to_string()).collect(),
            reclaim_delay_ms: args.reclaim_delay_ms,
            workload: args.workload.clone(),
            workload_text: args.workload.as_ref().map(ToString::to_string),
            peak_parallel: args.peak_parallel,
            steady_timeout_s: args.steady_timeout_s,
        };
        let report = Report {
            tool: "vmm density",
            version: env!("CARGO_PKG_VERSION"),
            command: std::env::args().collect(),
            started_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            duration_s: 0.0,
            outcome: "completed",
            error: None,
            host: host::host_info(mem),
            limits: limits::HostLimits::read(args.max_tasks),
            settings,
            work_dir: fleet.dir().to_path_buf(),
            cgroup: match fleet.cgroup() {
                Ok(c) => output::CgroupInfo { dir: Some(c.dir().to_path_buf()), version: Some(c.version()), unavailable: None },
                Err(why) => output::CgroupInfo { dir: None, version: None, unavailable: Some(why.to_string()) },
            },
            kvm_floor,
            initial_mem_available_bytes: mem.available,
            final_mem_available_bytes: None,
            strategies: Vec::new(),
            skipped: combos(&args.strategies, &args.reclaim).1,
            peer: match &args.peer {
                None => PeerReport::skipped(),
                Some(p) => PeerReport { kind: Some(p.kind), path: Some(p.path.clone()), skipped: None, strategies: Vec::new() },
            },
        };
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        // Signals arrive as VmEvents (see crate::signals); relay them.
        let (sig_tx, sig_rx) = mpsc::channel();
        vmm::signals::forward_to(sig_tx);
        let (relay, flag) = (tx.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("density-signals".into())
            .stack_size(64 << 10)
            .spawn(move || {
                for ev in sig_rx {
                    if let vmm::events::VmEvent::Signal(sig) = ev {
                        flag.store(true, Ordering::SeqCst);
                        let _ = relay.send(Msg::Signal(sig));
                    }
                }
            })
            .map_err(|e| DensityError::Fleet(fleet::FleetError::Spawn("signal relay".into(), e)))?;
        let now = Instant::now();
        Ok(Runner { args, started: now, epoch: now, report, fleet, csv, tx, rx, cancel, interrupted: false })
    }

    fn run(mut self) -> Result<u8, DensityError> {
        let mut failure: Option<DensityError> = None;
        for why in &self.report.skipped {
            eprintln!("vmm density: skipping {why}");
        }
        let (pairs, _) = combos(&self.args.strategies, &self.args.reclaim);
        for (i, (s, reclaim)) in pairs.into_iter().enumerate() {
            if self.interrupted || self.cancel.load(Ordering::SeqCst) {
                self.interrupted = true;
                break;
            }
            let mut run = self.start_strategy("vmm", s.name(), reclaim, i == 0)?;
            let sampler = timeline::Sampler::start(self.epoch, run.baseline.mem_available_bytes);
            let mut result = self.ramp(&mut run, &Launcher::Own, reclaim);
            if let (Ok(()), Some(w)) = (&result, self.args.workload.clone()) {
                if !self.interrupted {
                    result = self.phases_and_steady_state(&mut run, &w);
                }
            }
            self.mark(&mut run, "stop");
            run.shutdown = self.fleet.shutdown_all();
            run.timeline.samples = sampler.stop();
            finish_strategy(&mut run, &self.report);
            self.report.strategies.push(run);
            if let Err(e) = result {
                failure = Some(e);
                break;
            }
        }
        if failure.is_none() && !self.interrupted {
            if let Some(p) = self.args.peer.clone() {
                if let Err(e) = self.run_peer(&p) {
                    failure = Some(e);
                }
            }
        }
        self.report.final_mem_available_bytes = host::meminfo().ok().map(|m| m.available);
        self.report.duration_s = self.started.elapsed().as_secs_f64();
        if let Some(e) = &failure {
            self.report.outcome = "failed";
            self.report.error = Some(ErrorChain(e).to_string());
        } else if self.interrupted {
            self.report.outcome = "interrupted";
        }
        self.csv.finish()?;
        if let Some(out) = &self.args.out {
            output::write_report(out, &self.report)?;
            plot::all(out, &self.report)?;
        }
        print!("{}", output::summary(&self.report));
        if let Some(out) = &self.args.out {
            println!("results in {}", out.display());
        }
        match failure {
            Some(e) => Err(e),
            None if self.interrupted => Ok(130),
            None => Ok(0),
        }
    }

    /// The peer's ramps: the same strategies, VMs and workloads under the
    /// peer VMM, booting the guest this binary embeds.
    fn run_peer(&mut self, p: &PeerSpec) -> Result<(), DensityError> {
        let kernel = peer::write_guest(self.fleet.dir())?;
        let strategies = self.args.strategies.clone();
        for s in &strategies {
            if self.interrupted || self.cancel.load(Ordering::SeqCst) {
                self.interrupted = true;
                break;
            }
            let mut run = self.start_strategy(p.kind.name(), s.name(), None, false)?;
            let sampler = timeline::Sampler::start(self.epoch, run.baseline.mem_available_bytes);
            let launcher = Launcher::Peer { path: p.path.clone(), kernel: kernel.clone(), strategy: *s };
            let result = self.ramp(&mut run, &launcher, None);
            self.mark(&mut run, "stop");
            run.shutdown = self.fleet.shutdown_all();
            run.timeline.samples = sampler.stop();
            finish_strategy(&mut run, &self.report);
            self.report.peer.strategies.push(run);
            result?;
        }
        let _ = std::fs::remove_file(&kernel);
        Ok(())
    }

    /// Waits for the host to come back to its initial `MemAvailable` (not
    /// for the first strategy) and takes the baseline of strategy `name`
    /// under `vmm`, with reclaim mode `reclaim`; starts the run's clock.
    fn start_strategy(
        &mut self,
        vmm: &str,
        name: &str,
        reclaim: Option<api::Reclaim>,
        first: bool,
    ) -> Result<StrategyRun, DensityError> {
        let initial = self.report.initial_mem_available_bytes;
        // Tolerance: other tenants of a shared host move MemAvailable by a
        // few hundred MiB; 1% of RAM, at least 128 MiB.
        let tolerance = (128u64 << 20).max(self.report.host.mem_total_bytes / 100);
        let target = initial.saturating_sub(tolerance);
        let start = Instant::now();
        let timeout = Duration::from_secs(self.args.settle_timeout_s);
        let mut avail = host::meminfo()?.available;
        let mut settled = first || avail >= target;
        while !settled && start.elapsed() < timeout && !self.cancel.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(250));
            avail = host::meminfo()?.available;
            settled = avail >= target;
        }
        if !settled {
            eprintln!(
                "vmm density: MemAvailable is {} MiB, not back to {} MiB after {:.0} s; ramping {name} from here",
                avail >> 20,
                target >> 20,
                start.elapsed().as_secs_f64()
            );
        }
        self.epoch = Instant::now();
        Ok(StrategyRun {
            vmm: vmm.to_string(),
            strategy: name.to_string(),
            reclaim: reclaim.map(|r| r.name().to_string()),
            baseline: Baseline {
                mem_available_bytes: avail,
                settled,
                waited_s: start.elapsed().as_secs_f64(),
                target_bytes: target,
                host_tasks: limits::host_tasks(),
                kernel: host::kernel_memory().ok(),
                cgroup: self.fleet.cgroup_memory(),
            },
            floor_reached: false,
            stop_reason: String::new(),
            asked: self.args.vms,
            launched: 0,
            ready: 0,
            steps: Vec::new(),
            vms: Vec::new(),
            time_to_ready_ms: None,
            vmm_guest_ready_ms: None,
            workload_ms: None,
            launch_seconds: 0.0,
            launch_throughput_vms_per_s: None,
            footprint: None,
            host_per_vm: None,
            idle: None,
            kernel_per_vm: None,
            tasks_per_vm: None,
            limit_reached: false,
            fit: Fit { measured: 0, extrapolated: None },
            phases: None,
            steady_state: None,
            timeline: Timeline { samples: Vec::new(), marks: vec![(0.0, "ramp")] },
            shutdown: Default::default(),
        })
    }

    /// Notes in `run`'s timeline that stage `what` begins now.
    fn mark(&self, run: &mut StrategyRun, what: &'static str) {
        run.timeline.marks.push((self.epoch.elapsed().as_secs_f64(), what));
    }

    /// The size every VM holds once ready: the workload's idle size, or
    /// its `--alloc-mib` share.
    fn alloc_for(&self, index: u64) -> u64 {
        match &self.args.workload {
            Some(w) => w.idle_mib(),
            None => self.args.alloc_mib.mib_for(self.args.seed, index),
        }
    }

    /// The largest size any VM holds once ready.
    fn alloc_max(&self) -> u64 {
        self.args.workload.as_ref().map_or(self.args.alloc_mib.max_mib(), Phased::idle_mib)
    }

    /// The ready VMs of the fleet that `run` launched: position, index,
    /// PID and socket (the fleet holds this run's VMs only, and a record's
    /// position is its index).
    fn ready_targets(&self, run: &StrategyRun) -> Vec<(usize, u64, u32, PathBuf)> {
        self.fleet
            .vms()
            .iter()
            .filter(|p| run.vms.get(p.index as usize).is_some_and(|v| v.pid == p.pid && v.ready.is_some()))
            .map(|p| (p.index as usize, p.index, p.pid, p.sock.clone()))
            .collect()
    }

    /// Samples every target, on up to 8 threads.
    fn sample_all(&self, targets: &[(usize, u64, u32, PathBuf)], ready_by: probe::ReadyBy) -> Vec<(usize, Sampled)> {
        let workers = self.args.parallel.clamp(1, 8);
        let chunk = targets.len().div_ceil(workers).max(1);
        std::thread::scope(|sc| {
            let handles: Vec<_> = targets
                .chunks(chunk)
                .map(|part| {
                    sc.spawn(move || {
                        part.iter()
                            .map(|(pos, index, pid, sock)| match ready_by {
                                probe::ReadyBy::Api => (*pos, probe::sample(*index, *pid, sock).map(|(s, raw)| (s, Some(raw)))),
                                probe::ReadyBy::Serial => (*pos, Ok((probe::sample_host(*pid), None))),
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        })
    }

    /// The memory left before the first memory limit: the floor under
    /// `MemAvailable`, or `--max-memory-mib` over what the fleet holds
    /// (its cgroup's rise from the strategy's baseline, or without one the
    /// `MemAvailable` drop), whichever is nearer. Negative once past it.
    fn memory_room(&self, run: &StrategyRun) -> Result<Room, DensityError> {
        let avail = host::meminfo()?.available;
        let floor = Room { bytes: avail as i64 - self.report.settings.floor_bytes as i64, limit: RoomLimit::Floor { avail } };
        let Some(budget) = self.report.settings.max_memory_bytes else { return Ok(floor) };
        let cgroup = self.fleet.cgroup_memory().zip(run.baseline.cgroup);
        let (used, by) = match cgroup {
            Some((now, base)) => (now.usage.saturating_sub(base.usage), "by its memory cgroup"),
            None => (run.baseline.mem_available_bytes.saturating_sub(avail), "by the MemAvailable drop"),
        };
        let budget_room = Room { bytes: budget as i64 - used as i64, limit: RoomLimit::Budget { used, budget, by } };
        Ok(if budget_room.bytes < floor.bytes { budget_room } else { floor })
    }

    /// The reclaim delay the VMs run with.
    fn reclaim_delay(&self) -> Duration {
        self.args.reclaim_delay_ms.map_or(DEFAULT_RECLAIM_DELAY, |ms| Duration::from_millis(u64::from(ms)))
    }

    /// One strategy's ramp, step by step, until `--vms`, the floor, a
    /// failure or a signal; then the idle check of its VMs.
    fn ramp(&mut self, run: &mut StrategyRun, launcher: &Launcher, reclaim: Option<api::Reclaim>) -> Result<(), DensityError> {
        let spec = VmSpec {
            strategy: run.strategy.clone(),
            mem_mib: self.args.mem_mib,
            vcpus: self.args.vcpus,
            reclaim,
            reclaim_delay_ms: self.args.reclaim_delay_ms,
            launcher: launcher.clone(),
        };
        let ready_by = match launcher {
            Launcher::Own => probe::ReadyBy::Api,
            Launcher::Peer { .. } => probe::ReadyBy::Serial,
        };
        let bar = progress_bar(self.args.vms, &format!("{} {}", run.vmm, run.label()));
        let floor = self.report.settings.floor_bytes;
        let mut in_flight = 0usize;
        let mut error: Option<DensityError> = None;
        // What one more VM is expected to cost until a step has measured it:
        // generous, so in-flight launches cannot overshoot the floor.
        let mut per_vm_estimate = (64u64 << 20) + (self.alloc_max() << 20);
        // With a phased workload the fresh fleet leaves room for the peaks
        // its phases will run at once (`--peak-parallel`), or the phases of
        // a fleet that filled the host to the floor could never start.
        let phase_room = self.args.workload.as_ref().map_or(0, |w| w.peak_cost_bytes() * self.args.peak_parallel as u64);
        // Tasks one VM holds until a step has measured it: main, api,
        // signals, one per vCPU and KVM's worker.
        let mut tasks_per_vm = f64::from(self.args.vcpus) + 4.0;
        let mut open_fds = limits::open_fds().unwrap_or(0);
        let mut step = 0u64;
        while run.launched < self.args.vms && run.stop_reason.is_empty() {
            let step_start = Instant::now();
            let step_target = (run.launched + self.args.ramp).min(self.args.vms);
            let mut launched_in_step = 0;
            while run.launched < step_target && run.stop_reason.is_empty() {
                // A signal may have come while nothing read the channel.
                if self.cancel.load(Ordering::SeqCst) {
                    self.interrupted = true;
                    run.stop_reason = "interrupted by a signal".into();
                    break;
                }
                if in_flight >= self.args.parallel {
                    self.handle(self.rx.recv(), run, &bar, &mut in_flight, &mut error);
                    continue;
                }
                let room = self.memory_room(run)?;
                if room.bytes < (in_flight as u64 * per_vm_estimate + phase_room) as i64 {
                    match room.limit {
                        RoomLimit::Floor { avail } => {
                            run.floor_reached = true;
                            run.stop_reason = format!(
                                "floor reached: MemAvailable {} MiB with {in_flight} launches in flight, floor {} MiB",
                                avail >> 20,
                                floor >> 20
                            );
                            if phase_room > 0 {
                                run.stop_reason += &format!(" and {} MiB kept for the phases' peaks", phase_room >> 20);
                            }
                        }
                        RoomLimit::Budget { used, budget, by } => {
                            run.limit_reached = true;
                            run.stop_reason = format!(
                                "memory budget reached: the fleet holds {} MiB ({by}) with {in_flight} launches in flight, and --max-memory-mib is {}",
                                used >> 20,
                                budget >> 20
                            );
                        }
                    }
                    break;
                }
                let usage = limits::Usage {
                    host_tasks: limits::host_tasks().unwrap_or(0),
                    launched: run.launched,
                    in_flight: in_flight as u64,
                    open_fds,
                    tasks_per_vm,
                };
                if let Some(reason) = limits::check(&self.report.limits, &usage) {
                    run.limit_reached = true;
                    run.stop_reason = reason;
                    break;
                }
                let index = run.launched;
                let alloc_mib = self.alloc_for(index);
                let vm = match self.fleet.spawn(&spec, index, alloc_mib) {
                    Ok(vm) => vm,
                    Err(fleet::FleetError::Spawn(_, e)) if e.raw_os_error() == Some(libc::EAGAIN) => {
                        run.limit_reached = true;
                        run.stop_reason = limits::eagain_reason("a VM", &self.report.limits);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                let target = (vm.index, vm.pid, vm.sock.clone(), vm.log.clone(), vm.spawned_at);
                run.vms.push(VmRecord {
                    index,
                    pid: vm.pid,
                    alloc_mib,
                    ready: None,
                    phases: None,
                    error: None,
                    last_sample: None,
                    last_memory_report: None,
                });
                run.launched += 1;
                launched_in_step += 1;
                in_flight += 1;
                let (tx, cancel, timeout) = (self.tx.clone(), self.cancel.clone(), Duration::from_secs(self.args.ready_timeout_s));
                let waiter = std::thread::Builder::new().name("density-wait".into()).stack_size(1 << 20).spawn(move || {
                    let (index, pid, sock, log, spawned_at) = target;
                    let t = probe::Target { index, pid, sock: &sock, log: &log, spawned_at, alloc_mib, ready_by };
                    let _ = tx.send(Msg::Launched(index, probe::await_ready(&t, timeout, &cancel)));
                });
                if let Err(e) = waiter {
                    // Without its waiter this launch never reports: count it as failed.
                    in_flight -= 1;
                    if e.raw_os_error() == Some(libc::EAGAIN) {
                        run.limit_reached = true;
                        run.stop_reason = limits::eagain_reason("a waiter thread", &self.report.limits);
                    } else {
                        run.stop_reason = "cannot start a waiter thread".into();
                        error = Some(fleet::FleetError::Spawn("waiter thread".into(), e).into());
                    }
                }
            }
            while in_flight > 0 {
                self.handle(self.rx.recv(), run, &bar, &mut in_flight, &mut error);
            }
            let launch_seconds = step_start.elapsed().as_secs_f64();
            run.launch_seconds += launch_seconds;
            if let Some(e) = error.take() {
                bar.abandon_with_message(format!("{}: failed", run.label()));
                return Err(e);
            }
            if self.interrupted {
                break;
            }
            if launched_in_step > 0 {
                let measured = self.measure(run, step, launched_in_step, launch_seconds, ready_by, "ramp")?;
                if let Some(b) = measured {
                    per_vm_estimate = ((b.total.max(0.0) as u64) + (self.alloc_max() << 20)).max(8 << 20) * 2;
                }
                if let Some(t) = run.steps.last().and_then(|s| s.tasks_per_vm) {
                    tasks_per_vm = t.vmm_threads.max(1.0);
                }
                open_fds = limits::open_fds().unwrap_or(open_fds);
                step += 1;
            }
            bar.set_message(format!("{}: {} VMs, MemAvailable {} MiB", run.label(), run.ready, host::meminfo()?.available >> 20));
        }
        if run.stop_reason.is_empty() {
            run.stop_reason =
                if self.interrupted { "interrupted".into() } else { format!("all {} VMs launched", self.args.vms) };
        }
        bar.finish_and_clear();
        if !self.interrupted {
            run.idle = self.idle_check(run);
        }
        Ok(())
    }

    /// Watches the ramp's ready VMs for [`IDLE_WINDOW`]: how many are still
    /// running at its end, and the CPU time each used in it.
    fn idle_check(&self, run: &StrategyRun) -> Option<IdleCheck> {
        let pids: Vec<u32> = self
            .fleet
            .vms()
            .iter()
            .filter(|p| run.vms.get(p.index as usize).is_some_and(|v| v.pid == p.pid && v.ready.is_some()))
            .map(|p| p.pid)
            .collect();
        let before: Vec<(u32, f64)> = pids.iter().filter_map(|&pid| host::cpu_time_ms(pid).map(|t| (pid, t))).collect();
        if before.is_empty() {
            return None;
        }
        let start = Instant::now();
        std::thread::sleep(IDLE_WINDOW);
        let window = start.elapsed().as_secs_f64();
        let used: Vec<f64> = before
            .iter()
            .filter(|(pid, _)| !host::exited(*pid))
            .filter_map(|&(pid, t0)| host::cpu_time_ms(pid).map(|t1| (t1 - t0).max(0.0) / (window * 1e3) * 100.0))
            .collect();
        Some(IdleCheck {
            vms: before.len() as u64,
            alive: used.len() as u64,
            window_s: window,
            cpu_percent_mean: if used.is_empty() { 0.0 } else { used.iter().sum::<f64>() / used.len() as f64 },
            cpu_percent_max: used.iter().copied().fold(0.0, f64::max),
        })
    }

    /// Handles one message from a waiter or the signal relay.
    fn handle(
        &mut self,
        msg: Result<Msg, mpsc::RecvError>,
        run: &mut StrategyRun,
        bar: &ProgressBar,
        in_flight: &mut usize,
        error: &mut Option<DensityError>,
    ) {
        match msg {
            Ok(Msg::Launched(index, result)) => {
                *in_flight -= 1;
                // Records are pushed in launch order: the index is the position.
                let Some(vm) = run.vms.get_mut(index as usize) else { return };
                match result {
                    Ok(r) => {
                        vm.ready = Some(r);
                        run.ready += 1;
                        bar.inc(1);
                    }
                    Err(probe::LaunchError::Interrupted) => vm.error = Some("interrupted".into()),
                    // The VMM could not start its threads: a task limit.
                    Err(e @ probe::LaunchError::Exited { .. })
                        if e.to_string().contains("Resource temporarily unavailable") =>
                    {
                        vm.error = Some(e.to_string());
                        if run.stop_reason.is_empty() {
                            run.limit_reached = true;
                            run.stop_reason = limits::eagain_reason(&format!("VM {index}'s threads"), &self.report.limits);
                        }
                    }
                    Err(e) => {
                        vm.error = Some(e.to_string());
                        if error.is_none() {
                            run.stop_reason = format!("VM failed: {e}");
                            *error = Some(e.into());
                        }
                    }
                }
            }
            Ok(Msg::Signal(sig)) => {
                self.interrupted = true;
                if run.stop_reason.is_empty() {
                    run.stop_reason = format!("interrupted by signal {sig}");
                }
            }
            // Phases start only after the ramp.
            Ok(Msg::Phased(..)) => {}
            // Unreachable: the runner holds a sender itself.
            Err(mpsc::RecvError) => *in_flight = 0,
        }
    }

    /// Measures a step of stage `phase` (`ramp` or `steady`):
    /// `MemAvailable`, then every ready VM's report (or, for a peer, what
    /// `/proc` shows of it).
    fn measure(
        &mut self,
        run: &mut StrategyRun,
        step: u64,
        launched: u64,
        launch_seconds: f64,
        ready_by: probe::ReadyBy,
        phase: &'static str,
    ) -> Result<Option<Breakdown>, DensityError> {
        let start = Instant::now();
        let mem = host::meminfo()?;
        let kernel = host::kernel_memory().ok();
        let cgroup = self.fleet.cgroup_memory().zip(run.baseline.cgroup);
        let host_tasks = limits::host_tasks();
        let targets = self.ready_targets(run);
        let results = self.sample_all(&targets, ready_by);
        let rise = |now: u64, base: u64| now as i64 - base as i64;
        let mut sums = StepSums {
            mem_available_drop: run.baseline.mem_available_bytes as i64 - mem.available as i64,
            cgroup_rise: cgroup.map(|(now, base)| rise(now.usage, base.usage)),
            cgroup_kernel_rise: cgroup.and_then(|(now, base)| Some(rise(now.kernel?, base.kernel?))),
            ..StepSums::default()
        };
        let step_vms = results.len() as u64;
        let kvm_sampled: Vec<u64> = targets.iter().take(16).map(|t| limits::kvm_tasks(t.2)).collect();
        for (pos, result) in results {
            let (s, raw) = result?;
            sums.vms += 1;
            sums.vmm_pss += s.vmm_pss;
            sums.vmm_rss += s.vmm_rss;
            sums.guest_ram_resident += s.guest_ram_resident;
            sums.memmap_resident += s.memmap_resident;
            sums.workload += s.workload;
            sums.page_tables += s.page_tables;
            sums.threads += s.threads;
            sums.proc_rss += s.proc.rss;
            sums.proc_pss += s.proc.pss;
            sums.proc_anon += s.proc.anon;
            sums.kvm_memslot_estimate += s.kvm_memslot_estimate;
            sums.kvm_registered += s.kvm_registered;
            sums.reclaim_discarded += s.reclaim.discarded_bytes;
            self.csv.row(&CsvRow::new(run, step, phase, step_vms, &run.vms[pos], &s))?;
            let vm = &mut run.vms[pos];
            vm.last_sample = Some(s);
            vm.last_memory_report = raw.map(|r| output::RawJson(r.into_boxed_str()));
        }
        // A peer has no memory report to split the footprint by owner.
        let per_vm = match ready_by {
            probe::ReadyBy::Api => Breakdown::from_sums(&sums),
            probe::ReadyBy::Serial => None,
        };
        let host_per_vm = HostPerVm::from_sums(&sums);
        let kernel_per_vm = kernel.zip(run.baseline.kernel).and_then(|(now, base)| KernelPerVm::from_delta(&base, &now, sums.vms));
        let tasks_per_vm = (sums.vms > 0).then(|| {
            let n = sums.vms as f64;
            TasksPerVm {
                vmm_threads: sums.threads as f64 / n,
                kvm_tasks: (!kvm_sampled.is_empty())
                    .then(|| kvm_sampled.iter().sum::<u64>() as f64 / kvm_sampled.len() as f64),
                host_delta: host_tasks.zip(run.baseline.host_tasks).map(|(now, base)| (now as f64 - base as f64) / n),
            }
        });
        run.steps.push(Step {
            step,
            phase,
            mem_available_bytes: mem.available,
            sums,
            per_vm,
            host_per_vm,
            kernel_per_vm,
            host_tasks,
            tasks_per_vm,
            runner_rss_bytes: host::own_status().rss_bytes,
            launched,
            launch_seconds,
            measure_seconds: start.elapsed().as_secs_f64(),
        });
        Ok(per_vm)
    }
}

/// The figures derived once a strategy's ramp is over.
fn finish_strategy(run: &mut StrategyRun, report: &Report) {
    let ready: Vec<&probe::Ready> = run.vms.iter().filter_map(|v| v.ready.as_ref()).collect();
    run.time_to_ready_ms = Distribution::of(ready.iter().map(|r| r.spawn_to_ready_ms));
    run.vmm_guest_ready_ms = Distribution::of(ready.iter().filter_map(|r| r.vmm_guest_ready_ms));
    run.workload_ms = Distribution::of(ready.iter().map(|r| r.workload_ms));
    run.launch_throughput_vms_per_s = (run.launch_seconds > 0.0 && run.ready > 0).then(|| run.ready as f64 / run.launch_seconds);
    let last = run.steps.last();
    // The fleet that fit is the ramp's, also when fewer VMs ran the phases.
    let ramp_last = run.steps.iter().rev().find(|s| s.phase == "ramp");
    run.footprint = last.and_then(|s| s.per_vm);
    run.host_per_vm = last.and_then(|s| s.host_per_vm);
    run.kernel_per_vm = last.and_then(|s| s.kernel_per_vm);
    run.tasks_per_vm = last.and_then(|s| s.tasks_per_vm);
    run.fit = Fit {
        measured: ramp_last.map_or(0, |s| s.sums.vms),
        extrapolated: run.host_per_vm.and_then(|h| {
            footprint::extrapolated_fit(report.host.mem_total_bytes, report.settings.floor_bytes, run.baseline.mem_available_bytes, h.total)
        }),
    };
}

/// A progress bar on a terminal (stderr), hidden otherwise.
fn progress_bar(len: u64, strategy: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("{strategy}: starting"));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: DensityArgs,
    }

    fn parse(args: &[&str]) -> Result<DensityArgs, clap::Error> {
        let mut v = vec!["density"];
        v.extend_from_slice(args);
        T::try_parse_from(v).map(|t| t.a)
    }

    #[test]
    fn defaults_and_flags_parse() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.vms, a.mem_mib, a.vcpus, a.ramp, a.parallel), (100, 2048, 1, 50, 4));
        assert_eq!(a.strategies, vec![Strategy::Eager, Strategy::OnDemand]);
        assert_eq!(a.alloc_mib, AllocSpec::Fixed { mib: 0 });
        assert!(validate(&a).is_ok());
        let a = parse(&["--vms", "3", "--strategies", "ondemand", "--alloc-mib", "8..64", "--floor-mib", "9000", "--out", "/x"]).unwrap();
        assert_eq!(a.strategies, vec![Strategy::OnDemand]);
        assert_eq!(a.alloc_mib, AllocSpec::Range { lo: 8, hi: 64 });
        assert_eq!(a.floor_mib, Some(9000));
        assert!(parse(&["--strategies", "lazy"]).is_err());
        assert!(parse(&["--alloc-mib", "x"]).is_err());
    }

    #[test]
    fn bad_combinations_are_refused() {
        for bad in [
            &["--vms", "0"][..],
            &["--parallel", "0"],
            &["--strategies", "eager,eager"],
            &["--mem-mib", "256", "--alloc-mib", "256"],
            &["--vcpus", "0"],
        ] {
            assert!(matches!(validate(&parse(bad).unwrap()), Err(DensityError::Usage(_))), "{bad:?}");
        }
    }
}

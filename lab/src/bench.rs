//! `vmm bench`: the project's benchmarks (`make bench`), run against real
//! `vmm run` child processes and reported as medians and ratios from one run.
//!
//! Three benchmarks, each repeated and interleaved so that drift on a shared
//! host hits every variant alike:
//!
//! 1. **Boot**: exec → guest ready and exec → exit for each memmap strategy
//!    at 2 GiB (`parallel` with 2 vCPUs, the others with 1), plus the
//!    whole-process time of the tracked `--guest-cpl 3 workload=exit` command.
//!    exec → exit is the wall time around spawn + wait; exec → ready is the
//!    `guest ready` figure of the VMM's `boot timings` line (µs from the
//!    child's `main`, so it leaves out the exec itself, well under 1 ms).
//! 2. **Allocator fast path**: in-guest TSC cycles per order-0 alloc+free
//!    pair (`--bench-alloc-free`), with the on-demand grow check on and off,
//!    next to `eager`, in idle 2 GiB guests and in small guests whose memory
//!    is (nearly) all allocated, so that each ratio compares like states.
//! 3. **Memmap initialization cost per struct page**: `init_cycles /
//!    pages_initialized` from the guest's own report, per strategy.
//!
//! Results go to `--out DIR/bench.json` (every raw sample, the host, each
//! command line); a short table goes to stdout and progress to stderr. No
//! figure is ever asserted: benchmarks measure, tests check.

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Arguments of `vmm bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Directory for bench.json (created if missing).
    #[arg(long, default_value = "bench-results", value_name = "DIR")]
    pub out: PathBuf,
    /// Boots per strategy (and of the tracked workload=exit command).
    #[arg(long, default_value_t = 25, value_name = "N")]
    pub boot_runs: usize,
    /// Repetitions of each allocator and memmap measurement.
    #[arg(long, default_value_t = 9, value_name = "N")]
    pub reps: usize,
    /// Order-0 alloc+free pairs per allocator measurement.
    #[arg(long, default_value_t = 1_000_000, value_name = "PAIRS")]
    pub pairs: u64,
    /// Guest memory for the boot and memmap benchmarks, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub mem_mib: u64,
    /// Guest memory of the "all memory allocated" allocator runs, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub small_mem_mib: u64,
    /// Which benchmarks to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "boot,alloc,memmap", value_name = "LIST")]
    pub only: Vec<Section>,
    /// The vmm binary to benchmark [default: this executable].
    #[arg(long, value_name = "PATH")]
    pub vmm: Option<PathBuf>,
}

/// The benchmarks `--only` can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// exec → ready / exit per strategy.
    Boot,
    /// Cycles per order-0 alloc+free pair.
    Alloc,
    /// Cycles per struct page initialized.
    Memmap,
}

/// What can stop one benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot start `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` exited with {status}: {stderr_tail}")]
    Exit { cmd: String, status: String, stderr_tail: String },
    #[error("`{cmd}`: {what} not found in its output")]
    Missing { cmd: String, what: &'static str },
    #[error("`{cmd}`: {what}")]
    Guest { cmd: String, what: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the selected benchmarks; returns the process exit code (0 when every
/// selected benchmark produced figures, 1 otherwise, 2 for bad input).
pub fn run(args: BenchArgs) -> u8 {
    let vmm = match args.vmm.clone().map_or_else(std::env::current_exe, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmm bench: cannot find the vmm binary: {e}; pass --vmm PATH");
            return 2;
        }
    };
    if args.boot_runs == 0 || args.reps == 0 || args.pairs == 0 {
        eprintln!("vmm bench: --boot-runs, --reps and --pairs must be at least 1");
        return 2;
    }
    let b = Bench { vmm, args };
    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut results = BenchResults {
        date_utc: utc_string(started),
        host: HostInfo::read(),
        vmm: b.vmm.display().to_string(),
        settings: Settings {
            boot_runs: b.args.boot_runs,
            reps: b.args.reps,
            pairs: b.args.pairs,
            mem_mib: b.args.mem_mib,
            small_mem_mib: b.args.small_mem_mib,
        },
        boot: None,
        alloc: None,
        memmap: None,
        duration_s: 0.0,
    };
    let mut ok = true;
    if b.args.only.contains(&Section::Boot) {
        let r = b.boot();
        ok &= r.variants.iter().all(|v| v.median_ready_us.is_some() || v.median_wall_us.is_some());
        results.boot = Some(r);
    }
    if b.args.only.contains(&Section::Alloc) {
        let r = b.alloc();
        ok &= r.variants.iter().all(|v| v.median_cycles_per_pair.is_some());
        results.alloc = Some(r);
    }
    if b.args.only.contains(&Section::Memmap) {
        let r = b.memmap();
        ok &= r.variants.iter().all(|v| v.median_cycles_per_page.is_some());
        results.memmap = Some(r);
    }
    results.duration_s = t0.elapsed().as_secs_f64();
    results.host.loadavg_end = loadavg();
    print!("{}", results.table());
    if let Err(e) = write_results(&b.args.out, &results) {
        eprintln!("vmm bench: error: {}", api::ErrorChain(&e));
        return 1;
    }
    eprintln!("vmm bench: wrote {} ({:.0} s)", b.args.out.join("bench.json").display(), results.duration_s);
    if ok {
        0
    } else {
        eprintln!("vmm bench: some variants have no valid sample (see the errors in bench.json)");
        1
    }
}

fn write_results(dir: &Path, r: &BenchResults) -> Result<(), BenchError> {
    let path = dir.join("bench.json");
    let werr = |source| BenchError::Write { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(werr)?;
    let text = serde_json::to_string_pretty(r).expect("bench results serialize");
    std::fs::write(&path, text + "\n").map_err(werr)
}

// ---------------------------------------------------------------------------
// Running children

/// What one `vmm run` child produced.
#[derive(Debug)]
struct ChildRun {
    /// Wall time from just before spawn to the end of wait, in µs.
    wall_us: f64,
    stdout: String,
    stderr: String,
}

struct Bench {
    vmm: PathBuf,
    args: BenchArgs,
}

impl Bench {
    /// The command line as a user would type it (for the record).
    fn cmdline(&self, args: &[String]) -> String {
        let mut s = String::from("vmm");
        for a in args {
            s.push(' ');
            if a.contains(' ') || a.is_empty() {
                s.push_str(&format!("'{a}'"));
            } else {
                s.push_str(a);
            }
        }
        s
    }

    /// Runs `vmm ARGS` to completion, timing spawn → exit.
    fn run_child(&self, args: &[String]) -> Result<ChildRun, BenchError> {
        let cmd = self.cmdline(args);
        let t = Instant::now();
        let out = Command::new(&self.vmm)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| BenchError::Spawn { cmd: cmd.clone(), source })?;
        let wall_us = t.elapsed().as_secs_f64() * 1e6;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(BenchError::Exit { cmd, status: out.status.to_string(), stderr_tail: tail(&stderr, 300) });
        }
        Ok(ChildRun { wall_us, stdout, stderr })
    }
}

fn tail(s: &str, n: usize) -> String {
    let s = s.trim();
    let start = s.char_indices().rev().nth(n.saturating_sub(1)).map_or(0, |(i, _)| i);
    s[start..].replace('\n', " | ")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------
// 1. Boot

#[derive(Debug, Serialize)]
struct BootSample {
    wall_us: Option<f64>,
    ready_us: Option<f64>,
    /// Every field of the VMM's `boot timings` line (µs from its `main`).
    timings: BTreeMap<String, f64>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct BootVariant {
    name: String,
    strategy: String,
    vcpus: u8,
    command: String,
    median_wall_us: Option<f64>,
    median_ready_us: Option<f64>,
    p10_wall_us: Option<f64>,
    p90_wall_us: Option<f64>,
    p10_ready_us: Option<f64>,
    p90_ready_us: Option<f64>,
    ratio_wall_to_eager: Option<f64>,
    ratio_ready_to_eager: Option<f64>,
    failures: usize,
    samples: Vec<BootSample>,
}

#[derive(Debug, Serialize)]
struct BootResults {
    note: &'static str,
    variants: Vec<BootVariant>,
}

impl Bench {
    fn boot(&self) -> BootResults {
        let mem = self.args.mem_mib.to_string();
        let mut variants: Vec<(BootVariant, Vec<String>)> = Vec::new();
        for (strategy, vcpus) in [("eager", 1u8), ("parallel", 2), ("deferred", 1), ("ondemand", 1)] {
            let args = strings(&[
                "run", "--mem-mib", &mem, "--vcpus", &vcpus.to_string(), "--serial", "none",
                "--memmap-init", strategy, "--cmdline", "workload=exit",
            ]);
            variants.push((BootVariant::new(strategy, strategy, vcpus, self.cmdline(&args)), args));
        }
        // The figure the project tracks (target < 10 ms exec → exit).
        let args = strings(&[
            "run", "--mem-mib", "2048", "--guest-cpl", "3", "--serial", "none", "--cmdline", "workload=exit",
        ]);
        variants.push((BootVariant::new("tracked-cpl3-exit", "ondemand", 1, self.cmdline(&args)), args));

        // One untimed warm-up of each (binary and kernel image in the page cache).
        for (_, args) in &variants {
            let _ = self.run_child(args);
        }
        let n = self.args.boot_runs;
        for round in 0..n {
            eprintln!("vmm bench: boot round {}/{n}", round + 1);
            // Round-robin, starting one further each round, so neither drift
            // nor position in the round favours a variant.
            let k = variants.len();
            for j in 0..k {
                let (v, args) = &mut variants[(round + j) % k];
                v.samples.push(match self.run_child(args) {
                    Ok(r) => {
                        let timings = parse_timing_line(&r.stderr).unwrap_or_default();
                        let ready = timings.get("guest ready").copied();
                        BootSample {
                            wall_us: Some(r.wall_us),
                            ready_us: ready,
                            error: ready.is_none().then(|| "no `guest ready` in the timing line".into()),
                            timings,
                        }
                    }
                    Err(e) => BootSample {
                        wall_us: None,
                        ready_us: None,
                        timings: BTreeMap::new(),
                        error: Some(api::ErrorChain(&e).to_string()),
                    },
                });
            }
        }
        let mut variants: Vec<BootVariant> = variants.into_iter().map(|(v, _)| v).collect();
        for v in &mut variants {
            let wall: Vec<f64> = v.samples.iter().filter_map(|s| s.wall_us).collect();
            let ready: Vec<f64> = v.samples.iter().filter_map(|s| s.ready_us).collect();
            v.failures = v.samples.iter().filter(|s| s.error.is_some()).count();
            v.median_wall_us = median(&wall);
            v.median_ready_us = median(&ready);
            v.p10_wall_us = percentile(&wall, 10.0);
            v.p90_wall_us = percentile(&wall, 90.0);
            v.p10_ready_us = percentile(&ready, 10.0);
            v.p90_ready_us = percentile(&ready, 90.0);
        }
        let (ew, er) = (variants[0].median_wall_us, variants[0].median_ready_us);
        for v in &mut variants {
            v.ratio_wall_to_eager = ratio(v.median_wall_us, ew);
            v.ratio_ready_to_eager = ratio(v.median_ready_us, er);
        }
        BootResults {
            note: "wall_us: spawn to exit of the vmm process, measured by the bench; ready_us: \
                   `guest ready` from the VMM's boot timing line (us from the child's main)",
            variants,
        }
    }
}

impl BootVariant {
    fn new(name: &str, strategy: &str, vcpus: u8, command: String) -> BootVariant {
        BootVariant {
            name: name.into(),
            strategy: strategy.into(),
            vcpus,
            command,
            median_wall_us: None,
            median_ready_us: None,
            p10_wall_us: None,
            p90_wall_us: None,
            p10_ready_us: None,
            p90_ready_us: None,
            ratio_wall_to_eager: None,
            ratio_ready_to_eager: None,
            failures: 0,
            samples: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Allocator fast path

/// The guest's `{"bench_alloc_free": {...}}` line.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
struct AllocFreeLine {
    pairs: u64,
    cycles: u64,
    cycles_per_pair: f64,
    grow_check_on: bool,
    ok: bool,
}

#[derive(Debug, Serialize)]
struct AllocSample {
    cycles_per_pair: Option<f64>,
    line: Option<AllocFreeLine>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct AllocVariant {
    name: &'static str,
    what: &'static str,
    strategy: &'static str,
    /// The grow-check state this variant must have; samples that differ are errors.
    expect_grow_check_on: bool,
    command: String,
    median_cycles_per_pair: Option<f64>,
    min_cycles_per_pair: Option<f64>,
    max_cycles_per_pair: Option<f64>,
    samples: Vec<AllocSample>,
}

#[derive(Debug, Serialize)]
struct Calibration {
    /// MiB allocated (in a `small_mem_mib` ondemand guest): the first
    /// amount that switched the grow check off with a page still free, and
    /// 6 MiB less, where the check stays on.
    alloc_mib_check_on: Option<u64>,
    alloc_mib_check_off: Option<u64>,
    /// (alloc MiB, grow_check_on, free page for the benchmark) per probe.
    probes: Vec<(u64, Option<bool>, Option<bool>)>,
}

#[derive(Debug, Serialize)]
struct AllocResults {
    pairs: u64,
    calibration: Calibration,
    variants: Vec<AllocVariant>,
    /// Named ratios of medians (numerator / denominator).
    ratios: Vec<NamedRatio>,
}

#[derive(Debug, Serialize)]
struct NamedRatio {
    name: &'static str,
    numerator: &'static str,
    denominator: &'static str,
    ratio: Option<f64>,
}

impl Bench {
    fn alloc_args(&self, strategy: &str, mem: u64, alloc: Option<u64>, pairs: u64) -> Vec<String> {
        let mut a = strings(&["run", "--mem-mib", &mem.to_string(), "--serial", "none", "--memmap-init", strategy]);
        if let Some(m) = alloc {
            // --report json keeps the (otherwise printed) table off stdout.
            a.extend(strings(&["--alloc-mib", &m.to_string(), "--report", "json"]));
        }
        a.extend(strings(&["--bench-alloc-free", &pairs.to_string()]));
        a
    }

    /// Runs one alloc/free measurement and returns the guest's line.
    fn alloc_once(&self, args: &[String]) -> Result<AllocFreeLine, BenchError> {
        let r = self.run_child(args)?;
        let cmd = self.cmdline(args);
        let v = find_json_with_key(&r.stdout, "bench_alloc_free")
            .ok_or(BenchError::Missing { cmd: cmd.clone(), what: "the bench_alloc_free line" })?;
        serde_json::from_value::<AllocFreeLine>(v["bench_alloc_free"].clone())
            .map_err(|e| BenchError::Guest { cmd, what: format!("bad bench_alloc_free line: {e}") })
    }

    /// Finds, in a small ondemand guest, the largest allocation that leaves
    /// the grow check on and the smallest that switches it off while a page
    /// is still free for the benchmark.
    fn calibrate(&self) -> Calibration {
        let mem = self.args.small_mem_mib;
        let mut c = Calibration { alloc_mib_check_on: None, alloc_mib_check_off: None, probes: Vec::new() };
        let mut a = mem.saturating_sub(20).max(2);
        while a < mem {
            let r = self.alloc_once(&self.alloc_args("ondemand", mem, Some(a), 1));
            eprintln!("vmm bench: calibrate: alloc {a} MiB of {mem}: {r:?}");
            c.probes.push((a, r.as_ref().ok().map(|l| l.grow_check_on), r.as_ref().ok().map(|l| l.ok)));
            match r {
                Ok(l) if l.grow_check_on => c.alloc_mib_check_on = Some(a),
                Ok(l) if l.ok => {
                    c.alloc_mib_check_off = Some(a);
                    // A margin below the switch: near it, the chunk the
                    // low-watermark refill grows decides the state.
                    c.alloc_mib_check_on = a.checked_sub(6).filter(|&m| m > 0);
                    break;
                }
                _ => {}
            }
            a += 2;
        }
        c
    }

    fn alloc(&self) -> AllocResults {
        let pairs = self.args.pairs;
        let big = self.args.mem_mib;
        let small = self.args.small_mem_mib;
        eprintln!("vmm bench: allocator: calibrating the allocation that initializes all memory");
        let calibration = self.calibrate();
        let mut variants: Vec<(AllocVariant, Vec<String>)> = Vec::new();
        let mut add = |name, what, strategy, expect, args: Vec<String>| {
            let v = AllocVariant {
                name,
                what,
                strategy,
                expect_grow_check_on: expect,
                command: self.cmdline(&args),
                median_cycles_per_pair: None,
                min_cycles_per_pair: None,
                max_cycles_per_pair: None,
                samples: Vec::new(),
            };
            variants.push((v, args));
        };
        add("ondemand-idle", "idle guest, grow check on", "ondemand", true, self.alloc_args("ondemand", big, None, pairs));
        add("eager-idle", "idle guest", "eager", false, self.alloc_args("eager", big, None, pairs));
        if let Some(m) = calibration.alloc_mib_check_on {
            add("ondemand-nearly-full", "nearly all memory allocated, grow check on", "ondemand", true,
                self.alloc_args("ondemand", small, Some(m), pairs));
        }
        if let Some(m) = calibration.alloc_mib_check_off {
            add("ondemand-full", "all memory initialized, grow check off", "ondemand", false,
                self.alloc_args("ondemand", small, Some(m), pairs));
            add("eager-full", "same allocation as ondemand-full", "eager", false,
                self.alloc_args("eager", small, Some(m), pairs));
        }
        let n = self.args.reps;
        for rep in 0..n {
            eprintln!("vmm bench: allocator repetition {}/{n}", rep + 1);
            let k = variants.len();
            for j in 0..k {
                let (v, args) = &mut variants[(rep + j) % k];
                let r = self.alloc_once(args).and_then(|l| {
                    if !l.ok {
                        Err(BenchError::Guest { cmd: v.command.clone(), what: "the guest ran out of memory".into() })
                    } else if l.grow_check_on != v.expect_grow_check_on {
                        Err(BenchError::Guest {
                            cmd: v.command.clone(),
                            what: format!("grow_check_on is {}, expected {}", l.grow_check_on, v.expect_grow_check_on),
                        })
                    } else {
                        Ok(l)
                    }
                });
                v.samples.push(match r {
                    Ok(l) => AllocSample { cycles_per_pair: Some(l.cycles_per_pair), line: Some(l), error: None },
                    Err(e) => AllocSample { cycles_per_pair: None, line: None, error: Some(api::ErrorChain(&e).to_string()) },
                });
            }
        }
        let mut variants: Vec<AllocVariant> = variants.into_iter().map(|(v, _)| v).collect();
        for v in &mut variants {
            let x: Vec<f64> = v.samples.iter().filter_map(|s| s.cycles_per_pair).collect();
            v.median_cycles_per_pair = median(&x);
            v.min_cycles_per_pair = x.iter().copied().reduce(f64::min);
            v.max_cycles_per_pair = x.iter().copied().reduce(f64::max);
        }
        let med = |name: &str| variants.iter().find(|v| v.name == name).and_then(|v| v.median_cycles_per_pair);
        let mut ratios = Vec::new();
        for (name, a, b) in [
            ("grow check cost, idle guests", "ondemand-idle", "eager-idle"),
            ("grow check cost, same memory state", "ondemand-nearly-full", "ondemand-full"),
            ("ondemand after full init vs eager", "ondemand-full", "eager-full"),
        ] {
            ratios.push(NamedRatio { name, numerator: a, denominator: b, ratio: ratio(med(a), med(b)) });
        }
        AllocResults { pairs, calibration, variants, ratios }
    }
}

// ---------------------------------------------------------------------------
// 3. Memmap initialization cost per struct page

#[derive(Debug, Serialize)]
struct MemmapSample {
    init_cycles: Option<u64>,
    pages_initialized: Option<u64>,
    init_us: Option<f64>,
    fully_initialized: Option<bool>,
    cycles_per_page: Option<f64>,
    ns_per_page: Option<f64>,
    /// Guest TSC frequency implied by init_cycles / init_us.
    tsc_mhz: Option<f64>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct MemmapVariant {
    name: &'static str,
    what: &'static str,
    command: String,
    median_cycles_per_page: Option<f64>,
    median_ns_per_page: Option<f64>,
    median_pages_initialized: Option<f64>,
    samples: Vec<MemmapSample>,
}

#[derive(Debug, Serialize)]
struct MemmapResults {
    note: &'static str,
    variants: Vec<MemmapVariant>,
}

impl MemmapSample {
    fn from_report(report: &Value) -> MemmapSample {
        let g = &report["guest"];
        let cycles = g["init_cycles"].as_u64();
        let pages = g["pages_initialized"].as_u64();
        let us = g["init_us"].as_f64();
        let (cpp, nspp, mhz) = per_page(cycles, pages, us);
        MemmapSample {
            init_cycles: cycles,
            pages_initialized: pages,
            init_us: us,
            fully_initialized: g["fully_initialized"].as_bool(),
            cycles_per_page: cpp,
            ns_per_page: nspp,
            tsc_mhz: mhz,
            error: cpp.is_none().then(|| "report lacks init_cycles, pages_initialized or init_us".into()),
        }
    }

    fn failed(e: &BenchError) -> MemmapSample {
        MemmapSample {
            init_cycles: None,
            pages_initialized: None,
            init_us: None,
            fully_initialized: None,
            cycles_per_page: None,
            ns_per_page: None,
            tsc_mhz: None,
            error: Some(api::ErrorChain(e).to_string()),
        }
    }
}

/// Cycles per page, ns per page and the TSC MHz implied by `cycles`/`us`.
fn per_page(cycles: Option<u64>, pages: Option<u64>, us: Option<f64>) -> (Option<f64>, Option<f64>, Option<f64>) {
    match (cycles, pages, us) {
        (Some(c), Some(p), Some(us)) if c > 0 && p > 0 && us > 0.0 => {
            (Some(c as f64 / p as f64), Some(us * 1e3 / p as f64), Some(c as f64 / us))
        }
        _ => (None, None, None),
    }
}

impl Bench {
    /// A `--report json` run: the report object from stdout.
    fn report_once(&self, args: &[String]) -> Result<Value, BenchError> {
        let r = self.run_child(args)?;
        find_json_with_key(&r.stdout, "guest")
            .ok_or(BenchError::Missing { cmd: self.cmdline(args), what: "the JSON memory report" })
    }

    /// Deferred: boot with an API socket, poll `GET /memory` until the
    /// background initialization is done, then shut the VM down.
    fn deferred_once(&self, args: &[String], sock: &Path) -> Result<Value, BenchError> {
        let cmd = self.cmdline(args);
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new(&self.vmm)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| BenchError::Spawn { cmd: cmd.clone(), source })?;
        let sock_s = sock.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut result = Err(BenchError::Guest { cmd: cmd.clone(), what: "background init not done within 60 s".into() });
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(Some(status)) = child.try_wait() {
                result = Err(BenchError::Exit { cmd: cmd.clone(), status: status.to_string(), stderr_tail: String::new() });
                break;
            }
            let Ok(out) = Command::new(&self.vmm)
                .args(["ctl", "--api-sock", &sock_s, "memory"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            else {
                continue;
            };
            let Some(v) = find_json_with_key(&String::from_utf8_lossy(&out.stdout), "guest") else { continue };
            if v["guest"]["fully_initialized"].as_bool() == Some(true) {
                result = Ok(v);
                break;
            }
        }
        // Shut it down; the VMM closes the connection as it exits, so ctl's
        // own result says nothing. Kill it if it does not stop.
        let _ = Command::new(&self.vmm)
            .args(["ctl", "--api-sock", &sock_s, "shutdown"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let stop = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < stop => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(sock);
        result
    }

    fn memmap(&self) -> MemmapResults {
        let mem = self.args.mem_mib.to_string();
        let sock = std::env::temp_dir().join(format!("vmm-bench-{}.sock", std::process::id()));
        let base = |strategy: &str, vcpus: &str| {
            strings(&["run", "--mem-mib", &mem, "--vcpus", vcpus, "--serial", "none", "--memmap-init", strategy])
        };
        let mut eager = base("eager", "1");
        eager.extend(strings(&["--report", "json"]));
        let mut parallel = base("parallel", "2");
        parallel.extend(strings(&["--report", "json"]));
        let mut deferred = base("deferred", "1");
        deferred.extend(strings(&["--api-sock", &sock.display().to_string()]));
        let mut ondemand = base("ondemand", "1");
        ondemand.extend(strings(&["--alloc-mib", "512", "--report", "json"]));
        let mut variants: Vec<(MemmapVariant, Vec<String>)> = [
            ("eager", "all struct pages before ready, 1 vCPU", eager),
            ("parallel", "all struct pages before ready, 2 vCPUs (cycles summed over both)", parallel),
            ("deferred", "after the background init finished (polled through the API), 1 vCPU", deferred),
            ("ondemand", "after the guest allocated 512 MiB, 1 vCPU", ondemand),
        ]
        .into_iter()
        .map(|(name, what, args)| {
            let v = MemmapVariant {
                name,
                what,
                command: self.cmdline(&args),
                median_cycles_per_page: None,
                median_ns_per_page: None,
                median_pages_initialized: None,
                samples: Vec::new(),
            };
            (v, args)
        })
        .collect();
        let n = self.args.reps;
        for rep in 0..n {
            eprintln!("vmm bench: memmap repetition {}/{n}", rep + 1);
            let k = variants.len();
            for j in 0..k {
                let (v, args) = &mut variants[(rep + j) % k];
                let r = if v.name == "deferred" { self.deferred_once(args, &sock) } else { self.report_once(args) };
                v.samples.push(match r {
                    Ok(report) => MemmapSample::from_report(&report),
                    Err(e) => MemmapSample::failed(&e),
                });
            }
        }
        let mut variants: Vec<MemmapVariant> = variants.into_iter().map(|(v, _)| v).collect();
        for v in &mut variants {
            let c: Vec<f64> = v.samples.iter().filter_map(|s| s.cycles_per_page).collect();
            let ns: Vec<f64> = v.samples.iter().filter_map(|s| s.ns_per_page).collect();
            let p: Vec<f64> = v.samples.iter().filter_map(|s| s.pages_initialized.map(|p| p as f64)).collect();
            v.median_cycles_per_page = median(&c);
            v.median_ns_per_page = median(&ns);
            v.median_pages_initialized = median(&p);
        }
        MemmapResults {
            note: "guest.init_cycles / guest.pages_initialized from the guest's report; ns from \
                   guest.init_us (the guest's TSC), so ns_per_page = init_us * 1000 / pages",
            variants,
        }
    }
}

// ---------------------------------------------------------------------------
// Results, host, table

#[derive(Debug, Serialize)]
struct Settings {
    boot_runs: usize,
    reps: usize,
    pairs: u64,
    mem_mib: u64,
    small_mem_mib: u64,
}

/// The host, as `vmm density` describes it, plus the load around the run
/// (other work on a shared host).
#[derive(Debug, Serialize)]
struct HostInfo {
    #[serde(flatten)]
    machine: Option<crate::density::host::HostInfo>,
    /// `/proc/loadavg` when the bench started.
    loadavg_start: Option<String>,
    /// `/proc/loadavg` when it ended.
    loadavg_end: Option<String>,
}

impl HostInfo {
    fn read() -> HostInfo {
        HostInfo {
            machine: crate::density::host::meminfo().ok().map(crate::density::host::host_info),
            loadavg_start: loadavg(),
            loadavg_end: None,
        }
    }
}

fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string())
}

#[derive(Debug, Serialize)]
struct BenchResults {
    date_utc: String,
    host: HostInfo,
    vmm: String,
    settings: Settings,
    boot: Option<BootResults>,
    alloc: Option<AllocResults>,
    memmap: Option<MemmapResults>,
    duration_s: f64,
}

fn f1(x: Option<f64>, scale: f64) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.1}", v / scale))
}

fn r2(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.2}x"))
}

impl BenchResults {
    /// The short table for stdout (Markdown, so it pastes into docs).
    fn table(&self) -> String {
        let mut s = format!(
            "vmm bench, {} ({} CPUs, load average at start {})\n\n",
            self.date_utc,
            self.host.machine.as_ref().map_or(0, |m| m.cores),
            self.host.loadavg_start.as_deref().unwrap_or("?")
        );
        if let Some(b) = &self.boot {
            s += &format!("Boot, {} MiB, median of {} runs each (ms)\n\n", self.settings.mem_mib, self.settings.boot_runs);
            s += "| variant | vCPUs | exec→ready | ratio to eager | exec→exit | ratio to eager | failures |\n";
            s += "| --- | --- | --- | --- | --- | --- | --- |\n";
            for v in &b.variants {
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} |\n",
                    v.name,
                    v.vcpus,
                    f1(v.median_ready_us, 1e3),
                    r2(v.ratio_ready_to_eager),
                    f1(v.median_wall_us, 1e3),
                    r2(v.ratio_wall_to_eager),
                    v.failures
                );
            }
            s += "\n";
        }
        if let Some(a) = &self.alloc {
            s += &format!(
                "Allocator fast path, cycles per order-0 alloc+free pair ({} pairs, median of {})\n\n",
                a.pairs, self.settings.reps
            );
            s += "| variant | state | median | min | max |\n| --- | --- | --- | --- | --- |\n";
            for v in &a.variants {
                s += &format!(
                    "| {} | {} | {} | {} | {} |\n",
                    v.name,
                    v.what,
                    f1(v.median_cycles_per_pair, 1.0),
                    f1(v.min_cycles_per_pair, 1.0),
                    f1(v.max_cycles_per_pair, 1.0)
                );
            }
            s += "\n";
            for r in &a.ratios {
                s += &format!("- {}: {} / {} = {}\n", r.name, r.numerator, r.denominator, r2(r.ratio));
            }
            s += "\n";
        }
        if let Some(m) = &self.memmap {
            s += &format!("Memmap initialization per struct page (median of {})\n\n", self.settings.reps);
            s += "| strategy | pages initialized | cycles/page | ns/page | what |\n| --- | --- | --- | --- | --- |\n";
            for v in &m.variants {
                s += &format!(
                    "| {} | {} | {} | {} | {} |\n",
                    v.name,
                    v.median_pages_initialized.map_or_else(|| "-".into(), |p| format!("{p:.0}")),
                    f1(v.median_cycles_per_page, 1.0),
                    f1(v.median_ns_per_page, 1.0),
                    v.what
                );
            }
            s += "\n";
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Parsing and statistics (unit-tested below)

/// Parses the VMM's `vmm: boot timings (us from process start): vm created
/// N; ...; guest ready N; ...` line into name → µs.
fn parse_timing_line(stderr: &str) -> Option<BTreeMap<String, f64>> {
    const PREFIX: &str = "boot timings (us from process start):";
    let line = stderr.lines().rev().find(|l| l.contains(PREFIX))?;
    let rest = &line[line.find(PREFIX)? + PREFIX.len()..];
    let mut m = BTreeMap::new();
    for field in rest.split(';') {
        let field = field.trim();
        let Some((name, value)) = field.rsplit_once(' ') else { continue };
        if let Ok(v) = value.parse::<f64>() {
            m.insert(name.trim().to_string(), v);
        }
    }
    (!m.is_empty()).then_some(m)
}

/// The first JSON object in `out` that has `key` at its top level: one per
/// line, else the whole output as a stream of JSON values.
fn find_json_with_key(out: &str, key: &str) -> Option<Value> {
    let has = |v: &Value| v.as_object().is_some_and(|o| o.contains_key(key));
    let by_line = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(has);
    by_line.or_else(|| {
        serde_json::Deserializer::from_str(out).into_iter::<Value>().map_while(Result::ok).find(has)
    })
}

/// The median of the finite values (mean of the middle two for an even count).
fn median(xs: &[f64]) -> Option<f64> {
    percentile(xs, 50.0)
}

/// The `p`th percentile (0..=100) of the finite values, interpolating
/// linearly between closest ranks. (`vmm density` reports nearest-rank
/// percentiles of latency distributions instead; a benchmark's median of a
/// few repetitions is better served by interpolation.)
fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let pos = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// `a / b`, when both exist and `b` is positive.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => Some(a / b),
        _ => None,
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for `t`.
fn utc_string(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "vmm: boot timings (us from process start): vm created 3536; vcpu first entry 4731; \
                        guest first port write 5220; guest entered 5288; guest memory ready 103873; \
                        guest ready 104102; vm stopped 104381";

    #[test]
    fn the_timing_line_parses_into_named_fields() {
        let stderr = format!("some console text\n{LINE}\nvmm: guest exited with code 0\n");
        let m = parse_timing_line(&stderr).unwrap();
        assert_eq!(m.get("guest ready"), Some(&104102.0));
        assert_eq!(m.get("vm created"), Some(&3536.0));
        assert_eq!(m.get("guest first port write"), Some(&5220.0));
        assert_eq!(m.len(), 7);
    }

    #[test]
    fn a_missing_or_partial_timing_line_is_handled() {
        assert_eq!(parse_timing_line("vmm: error: no kvm\n"), None);
        let m = parse_timing_line("vmm: boot timings (us from process start): vm created 12; guest ready").unwrap();
        assert_eq!(m.get("vm created"), Some(&12.0));
        assert_eq!(m.get("guest ready"), None);
    }

    #[test]
    fn json_objects_are_found_by_key_among_other_output() {
        let out = "memmap strategy: ondemand\n{\"valid\":true,\"guest\":{\"init_cycles\":5}}\n\
                   {\"bench_alloc_free\":{\"pairs\":10,\"cycles\":600,\"cycles_per_pair\":60.0,\"grow_check_on\":false,\"ok\":true}}\n";
        let b = find_json_with_key(out, "bench_alloc_free").unwrap();
        let l: AllocFreeLine = serde_json::from_value(b["bench_alloc_free"].clone()).unwrap();
        assert_eq!(l, AllocFreeLine { pairs: 10, cycles: 600, cycles_per_pair: 60.0, grow_check_on: false, ok: true });
        assert_eq!(find_json_with_key(out, "guest").unwrap()["guest"]["init_cycles"], 5);
        assert_eq!(find_json_with_key(out, "nope"), None);
    }

    #[test]
    fn a_pretty_printed_report_is_found_too() {
        let out = "{\n  \"guest\": {\n    \"init_cycles\": 7\n  }\n}\n";
        assert_eq!(find_json_with_key(out, "guest").unwrap()["guest"]["init_cycles"], 7);
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 100.0), Some(5.0));
        assert_eq!(percentile(&[0.0, 10.0], 90.0), Some(9.0));
        assert_eq!(percentile(&[1.0], 101.0), None);
    }

    #[test]
    fn ratios_need_both_sides_and_a_positive_denominator() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }

    #[test]
    fn per_page_cost_converts_cycles_to_ns_with_the_guest_tsc() {
        // 2.5 GHz: 2500 cycles per µs.
        let (c, ns, mhz) = per_page(Some(2_500_000), Some(1000), Some(1000.0));
        assert_eq!(c, Some(2500.0));
        assert_eq!(ns, Some(1000.0));
        assert_eq!(mhz, Some(2500.0));
        assert_eq!(per_page(Some(1), Some(0), Some(1.0)), (None, None, None));
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
        assert_eq!(utc_string(UNIX_EPOCH + Duration::from_secs(86_400 + 3661)), "1970-01-02 01:01:01 UTC");
    }

    #[test]
    fn command_lines_are_recorded_as_typed() {
        let b = Bench { vmm: PathBuf::from("/x/vmm"), args: test_args() };
        assert_eq!(b.cmdline(&strings(&["run", "--cmdline", "a b"])), "vmm run --cmdline 'a b'");
    }

    fn test_args() -> BenchArgs {
        BenchArgs {
            out: PathBuf::from("o"),
            boot_runs: 1,
            reps: 1,
            pairs: 1,
            mem_mib: 2048,
            small_mem_mib: 256,
            only: vec![Section::Boot],
            vmm: None,
        }
    }
}

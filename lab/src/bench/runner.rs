//! `vmm bench`'s entry point: checks the flags, runs the selected
//! benchmarks in order, prints the table and writes `bench.json`.

use super::args::{BenchArgs, Section};
use super::child::{Bench, BenchError};
use super::results::{utc_string, BenchResults, HostInfo, Settings};
use super::{alloc, boot, memmap, reclaim};
use crate::host;
use std::path::Path;
use std::time::{Instant, SystemTime};

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
    if args.boot_runs == 0 || args.reps == 0 || args.pairs == 0 || args.reclaim_rounds == 0 || args.churn_cycles == 0 {
        eprintln!("vmm bench: --boot-runs, --reps, --pairs, --reclaim-rounds and --churn-cycles must be at least 1");
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
            reclaim_rounds: b.args.reclaim_rounds,
            churn_cycles: b.args.churn_cycles,
        },
        boot: None,
        alloc: None,
        memmap: None,
        reclaim: None,
        duration_s: 0.0,
    };
    let mut ok = true;
    if b.args.only.contains(&Section::Boot) {
        let r = boot::measure(&b);
        ok &= r.variants.iter().all(|v| v.median_ready_us.is_some() || v.median_wall_us.is_some());
        results.boot = Some(r);
    }
    if b.args.only.contains(&Section::Alloc) {
        let r = alloc::measure(&b);
        ok &= r.variants.iter().all(|v| v.median_cycles_per_pair.is_some());
        results.alloc = Some(r);
    }
    if b.args.only.contains(&Section::Memmap) {
        let r = memmap::measure(&b);
        ok &= r.variants.iter().all(|v| v.median_cycles_per_page.is_some());
        results.memmap = Some(r);
    }
    if b.args.only.contains(&Section::Reclaim) {
        let r = reclaim::measure(&b, b.args.reclaim_rounds, b.args.churn_cycles);
        ok &= r.variants.iter().all(|v| v.median_settled.is_some())
            && r.churn.fast_ratio_full_to_off.is_some()
            && r.churn.slow_ratio_full_to_off.is_some();
        results.reclaim = Some(r);
    }
    results.duration_s = t0.elapsed().as_secs_f64();
    results.host.loadavg_end = host::loadavg();
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

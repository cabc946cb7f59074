//! Benchmark 3, memmap initialization cost per struct page: `init_cycles /
//! pages_initialized` from the guest's own report, per strategy. `eager` and
//! `parallel` report right after ready (`--report json`); `ondemand` after the
//! guest allocated 512 MiB; `deferred` is booted with an API socket and its
//! `GET /memory` polled until the background initialization has finished.

use super::child::{cmdline, round_robin, strings, Bench, BenchError};
use crate::stats::Sorted;
use api::MemoryReport;
use serde::Serialize;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
pub struct MemmapVariant {
    pub name: &'static str,
    pub what: &'static str,
    command: String,
    pub median_cycles_per_page: Option<f64>,
    pub median_ns_per_page: Option<f64>,
    pub median_pages_initialized: Option<f64>,
    samples: Vec<MemmapSample>,
}

#[derive(Debug, Serialize)]
pub struct MemmapResults {
    note: &'static str,
    pub variants: Vec<MemmapVariant>,
}

impl MemmapSample {
    fn from_report(report: &MemoryReport) -> MemmapSample {
        let g = report.guest.as_ref();
        let cycles = g.map(|g| g.init_cycles);
        let pages = g.map(|g| g.pages_initialized);
        let us = g.and_then(|g| g.init_us);
        let (cpp, nspp, mhz) = per_page(cycles, pages, us);
        MemmapSample {
            init_cycles: cycles,
            pages_initialized: pages,
            init_us: us,
            fully_initialized: g.map(|g| g.fully_initialized),
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

/// Deferred: boot with an API socket, poll `GET /memory` until the
/// background initialization is done, then shut the VM down.
fn deferred_once(b: &Bench, args: &[String], sock: &Path) -> Result<MemoryReport, BenchError> {
    let cmd = cmdline(args);
    let api_err = |source| BenchError::Api { cmd: cmd.clone(), source };
    let client = vmm_client::Client::new().map_err(api_err)?.with_timeout(Duration::from_secs(5));
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(&b.vmm)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::Spawn { cmd: cmd.clone(), source })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut result = Err(BenchError::Guest { cmd: cmd.clone(), what: "background init not done within 60 s".into() });
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(Some(status)) = child.try_wait() {
            result = Err(BenchError::Exit { cmd: cmd.clone(), status: status.to_string(), stderr_tail: String::new() });
            break;
        }
        // Not listening yet, or not done: ask again.
        let Ok(report) = client.get::<MemoryReport>(sock, api::Endpoint::GetMemory) else { continue };
        if report.guest.as_ref().is_some_and(|g| g.fully_initialized) {
            result = Ok(report);
            break;
        }
    }
    // Shut it down; the VMM closes the connection as it exits, so the
    // answer says nothing. Kill it if it does not stop.
    let shutdown = serde_json::to_value(api::InstanceActionInfo { action_type: api::ActionType::Shutdown }).ok();
    let _ = client.call::<serde_json::Value>(sock, api::Endpoint::PutActions, shutdown.as_ref());
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

/// Runs the memmap benchmark: `reps` rounds over the four strategies.
pub fn measure(b: &Bench) -> MemmapResults {
    let mem = b.args.mem_mib.to_string();
    let sock = std::env::temp_dir().join(format!("vmm-bench-{}.sock", std::process::id()));
    let base = |strategy: &str, vcpus: &str| {
        strings(&["run", "--mem-mib", &mem, "--vcpus", vcpus, "--serial", "none", "--memmap-init", strategy])
    };
    let mut eager = base("eager", "1");
    eager.extend(strings(&["--no-api", "--report", "json"]));
    let mut parallel = base("parallel", "2");
    parallel.extend(strings(&["--no-api", "--report", "json"]));
    let mut deferred = base("deferred", "1");
    deferred.extend(strings(&["--api-sock", &sock.display().to_string()]));
    let mut ondemand = base("ondemand", "1");
    ondemand.extend(strings(&["--no-api", "--alloc-mib", "512", "--report", "json"]));
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
            command: cmdline(&args),
            median_cycles_per_page: None,
            median_ns_per_page: None,
            median_pages_initialized: None,
            samples: Vec::new(),
        };
        (v, args)
    })
    .collect();
    round_robin("memmap repetition", b.args.reps, &mut variants, |(v, args)| {
        let r = if v.name == "deferred" { deferred_once(b, args, &sock) } else { b.run_child(args).and_then(|run| run.report()) };
        v.samples.push(match r {
            Ok(report) => MemmapSample::from_report(&report),
            Err(e) => MemmapSample::failed(&e),
        });
    });
    let mut variants: Vec<MemmapVariant> = variants.into_iter().map(|(v, _)| v).collect();
    for v in &mut variants {
        let median = |f: fn(&MemmapSample) -> Option<f64>| Sorted::new(v.samples.iter().filter_map(f)).median();
        v.median_cycles_per_page = median(|s| s.cycles_per_page);
        v.median_ns_per_page = median(|s| s.ns_per_page);
        v.median_pages_initialized = median(|s| s.pages_initialized.map(|p| p as f64));
    }
    MemmapResults {
        note: "guest.init_cycles / guest.pages_initialized from the guest's report; ns from \
               guest.init_us (the guest's TSC), so ns_per_page = init_us * 1000 / pages",
        variants,
    }
}

#[cfg(test)]
mod tests {
    use super::super::child::{parse_report, tests::REPORT};
    use super::*;

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
    fn a_sample_comes_from_the_guest_half_of_the_report() {
        let mut r = parse_report(REPORT).unwrap();
        let s = MemmapSample::from_report(&r);
        assert_eq!((s.init_cycles, s.pages_initialized, s.fully_initialized), (Some(220386), Some(512), Some(false)));
        assert!(s.error.is_none() && s.cycles_per_page.is_some_and(|c| (c - 220386.0 / 512.0).abs() < 1e-9));
        // An invalid report has no guest half.
        r.guest = None;
        let s = MemmapSample::from_report(&r);
        assert!(s.cycles_per_page.is_none() && s.error.is_some());
    }
}

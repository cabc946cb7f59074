//! Benchmark 1, boot: exec → guest ready and exec → exit for each memmap
//! strategy, plus the tracked `--guest-cpl 3 workload=exit` command.
//!
//! Every child runs `--cmdline workload=exit --report json`: the guest exits
//! as soon as it is ready, and the VMM prints its memory report just before.
//! exec → exit is the wall time the bench measures around spawn + wait;
//! exec → ready is the report's `timings.guest_ready` (µs from the child's
//! `main`, so it leaves out the exec itself, well under 1 ms).

use super::child::{cmdline, round_robin, strings, Bench};
use crate::stats::{ratio, Sorted};
use api::BootTimings;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct BootSample {
    wall_us: Option<f64>,
    ready_us: Option<f64>,
    /// The report's boot milestones (µs from the child's `main`).
    timings: Option<BootTimings>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BootVariant {
    pub name: String,
    strategy: String,
    pub vcpus: u8,
    command: String,
    pub median_wall_us: Option<f64>,
    pub median_ready_us: Option<f64>,
    p10_wall_us: Option<f64>,
    p90_wall_us: Option<f64>,
    p10_ready_us: Option<f64>,
    p90_ready_us: Option<f64>,
    pub ratio_wall_to_eager: Option<f64>,
    pub ratio_ready_to_eager: Option<f64>,
    pub failures: usize,
    samples: Vec<BootSample>,
}

#[derive(Debug, Serialize)]
pub struct BootResults {
    note: &'static str,
    pub variants: Vec<BootVariant>,
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

    /// The medians and percentiles of the samples so far.
    fn summarize(&mut self) {
        let wall = Sorted::new(self.samples.iter().filter_map(|s| s.wall_us));
        let ready = Sorted::new(self.samples.iter().filter_map(|s| s.ready_us));
        self.failures = self.samples.iter().filter(|s| s.error.is_some()).count();
        self.median_wall_us = wall.median();
        self.median_ready_us = ready.median();
        self.p10_wall_us = wall.percentile(10.0);
        self.p90_wall_us = wall.percentile(90.0);
        self.p10_ready_us = ready.percentile(10.0);
        self.p90_ready_us = ready.percentile(90.0);
    }
}

/// One boot of `args`.
fn sample(b: &Bench, args: &[String]) -> BootSample {
    let failed = |wall_us, e| BootSample { wall_us, ready_us: None, timings: None, error: Some(api::ErrorChain(&e).to_string()) };
    let run = match b.run_child(args) {
        Ok(run) => run,
        Err(e) => return failed(None, e),
    };
    match run.report() {
        Ok(report) => {
            let ready = report.timings.guest_ready;
            BootSample {
                wall_us: Some(run.wall_us),
                ready_us: ready,
                error: ready.is_none().then(|| "no timings.guest_ready in the report".into()),
                timings: Some(report.timings),
            }
        }
        Err(e) => failed(Some(run.wall_us), e),
    }
}

/// Runs the boot benchmark: `boot_runs` rounds over every variant.
pub fn measure(b: &Bench) -> BootResults {
    let mem = b.args.mem_mib.to_string();
    let mut variants: Vec<(BootVariant, Vec<String>)> = Vec::new();
    for (strategy, vcpus) in [("eager", 1u8), ("parallel", 2), ("deferred", 1), ("ondemand", 1)] {
        let args = strings(&[
            "run", "--mem-mib", &mem, "--vcpus", &vcpus.to_string(), "--serial", "none", "--no-api",
            "--memmap-init", strategy, "--cmdline", "workload=exit", "--report", "json",
        ]);
        variants.push((BootVariant::new(strategy, strategy, vcpus, cmdline(&args)), args));
    }
    // The figure the project tracks (target < 10 ms exec → exit).
    let args = strings(&[
        "run", "--mem-mib", "2048", "--guest-cpl", "3", "--serial", "none", "--no-api", "--cmdline", "workload=exit",
        "--report", "json",
    ]);
    variants.push((BootVariant::new("tracked-cpl3-exit", "ondemand", 1, cmdline(&args)), args));

    // One untimed warm-up of each (binary and kernel image in the page cache).
    for (_, args) in &variants {
        let _ = b.run_child(args);
    }
    round_robin("boot round", b.args.boot_runs, &mut variants, |(v, args)| v.samples.push(sample(b, args)));
    let mut variants: Vec<BootVariant> = variants.into_iter().map(|(v, _)| v).collect();
    variants.iter_mut().for_each(BootVariant::summarize);
    // eager is the first variant.
    let (ew, er) = (variants[0].median_wall_us, variants[0].median_ready_us);
    for v in &mut variants {
        v.ratio_wall_to_eager = ratio(v.median_wall_us, ew);
        v.ratio_ready_to_eager = ratio(v.median_ready_us, er);
    }
    BootResults {
        note: "wall_us: spawn to exit of the vmm process, measured by the bench; ready_us: \
               timings.guest_ready from the child's --report json memory report (us from the child's main)",
        variants,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(wall: Option<f64>, ready: Option<f64>, error: bool) -> BootSample {
        BootSample { wall_us: wall, ready_us: ready, timings: None, error: error.then(|| "x".into()) }
    }

    #[test]
    fn a_variant_summarizes_its_samples() {
        let mut v = BootVariant::new("eager", "eager", 1, "vmm run".into());
        v.samples = vec![s(Some(4.0), Some(1.0), false), s(Some(2.0), Some(3.0), false), s(Some(9.0), None, true), s(None, None, true)];
        v.summarize();
        assert_eq!((v.median_wall_us, v.median_ready_us, v.failures), (Some(4.0), Some(2.0), 2));
        assert_eq!((v.p10_wall_us, v.p90_wall_us), (Some(2.4), Some(8.0)));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["samples"][0]["timings"], serde_json::Value::Null);
        assert!(json.get("ratio_wall_to_eager").is_some());
    }
}

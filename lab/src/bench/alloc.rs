//! Benchmark 2, the allocator's fast path: in-guest TSC cycles per order-0
//! alloc+free pair (`vmm run --bench-alloc-free`), with the on-demand grow
//! check on and off, next to `eager`, in idle 2 GiB guests and in small
//! guests whose memory is (nearly) all allocated, so that each ratio compares
//! like states. A calibration finds the allocations that give those states.

use super::child::{cmdline, round_robin, strings, Bench, BenchError};
use crate::stats::{ratio, Sorted};
use serde::{Deserialize, Serialize};

/// The guest's result, as `{"bench_alloc_free": {...}}` prints it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AllocFreeLine {
    pairs: u64,
    cycles: u64,
    cycles_per_pair: f64,
    grow_check_on: bool,
    /// The grow check's jump sites were patched out of the code.
    jump_sites_patched: bool,
    ok: bool,
}

/// The last line of `vmm run --bench-alloc-free` (after the memory report,
/// with `--report json`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchLine {
    bench_alloc_free: AllocFreeLine,
}

/// The allocator's line: the last line of `stdout`.
fn parse_alloc_line(stdout: &str) -> Result<AllocFreeLine, serde_json::Error> {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    serde_json::from_str::<BenchLine>(last).map(|l| l.bench_alloc_free)
}

#[derive(Debug, Serialize)]
struct AllocSample {
    cycles_per_pair: Option<f64>,
    line: Option<AllocFreeLine>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AllocVariant {
    pub name: &'static str,
    pub what: &'static str,
    strategy: &'static str,
    /// The grow-check state this variant must have; samples that differ are errors.
    expect_grow_check_on: bool,
    command: String,
    pub median_cycles_per_pair: Option<f64>,
    pub min_cycles_per_pair: Option<f64>,
    pub max_cycles_per_pair: Option<f64>,
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
pub struct AllocResults {
    pub pairs: u64,
    calibration: Calibration,
    pub variants: Vec<AllocVariant>,
    /// Named ratios of medians (numerator / denominator).
    pub ratios: Vec<NamedRatio>,
}

#[derive(Debug, Serialize)]
pub struct NamedRatio {
    pub name: &'static str,
    pub numerator: &'static str,
    pub denominator: &'static str,
    pub ratio: Option<f64>,
}

/// `vmm run` arguments of one measurement.
fn run_args(strategy: &str, mem: u64, alloc: Option<u64>, pairs: u64) -> Vec<String> {
    let mut a = strings(&["run", "--mem-mib", &mem.to_string(), "--serial", "none", "--no-api", "--memmap-init", strategy]);
    if let Some(m) = alloc {
        // --report json keeps the (otherwise printed) table off stdout.
        a.extend(strings(&["--alloc-mib", &m.to_string(), "--report", "json"]));
    }
    a.extend(strings(&["--bench-alloc-free", &pairs.to_string()]));
    a
}

/// Runs one alloc/free measurement and returns the guest's line.
fn once(b: &Bench, args: &[String]) -> Result<AllocFreeLine, BenchError> {
    let run = b.run_child(args)?;
    parse_alloc_line(&run.stdout).map_err(|source| BenchError::Output {
        cmd: run.cmd,
        what: "followed by a bench_alloc_free line",
        source,
    })
}

/// Finds, in a small ondemand guest, the largest allocation that leaves
/// the grow check on and the smallest that switches it off while a page
/// is still free for the benchmark.
fn calibrate(b: &Bench) -> Calibration {
    let mem = b.args.small_mem_mib;
    let mut c = Calibration { alloc_mib_check_on: None, alloc_mib_check_off: None, probes: Vec::new() };
    let mut a = mem.saturating_sub(20).max(2);
    while a < mem {
        let r = once(b, &run_args("ondemand", mem, Some(a), 1));
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

/// One sample of variant `v`: the line if the guest had memory and the
/// expected grow-check state.
fn sample(b: &Bench, v: &AllocVariant, args: &[String]) -> AllocSample {
    let r = once(b, args).and_then(|l| {
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
    match r {
        Ok(l) => AllocSample { cycles_per_pair: Some(l.cycles_per_pair), line: Some(l), error: None },
        Err(e) => AllocSample { cycles_per_pair: None, line: None, error: Some(api::ErrorChain(&e).to_string()) },
    }
}

/// Runs the allocator benchmark: calibration, then `reps` rounds over every
/// variant the calibration allows.
pub fn measure(b: &Bench) -> AllocResults {
    let pairs = b.args.pairs;
    let big = b.args.mem_mib;
    let small = b.args.small_mem_mib;
    eprintln!("vmm bench: allocator: calibrating the allocation that initializes all memory");
    let calibration = calibrate(b);
    let mut variants: Vec<(AllocVariant, Vec<String>)> = Vec::new();
    let mut add = |name, what, strategy, expect, args: Vec<String>| {
        let v = AllocVariant {
            name,
            what,
            strategy,
            expect_grow_check_on: expect,
            command: cmdline(&args),
            median_cycles_per_pair: None,
            min_cycles_per_pair: None,
            max_cycles_per_pair: None,
            samples: Vec::new(),
        };
        variants.push((v, args));
    };
    add("ondemand-idle", "idle guest, grow check on", "ondemand", true, run_args("ondemand", big, None, pairs));
    add("eager-idle", "idle guest", "eager", false, run_args("eager", big, None, pairs));
    if let Some(m) = calibration.alloc_mib_check_on {
        add("ondemand-nearly-full", "nearly all memory allocated, grow check on", "ondemand", true,
            run_args("ondemand", small, Some(m), pairs));
    }
    if let Some(m) = calibration.alloc_mib_check_off {
        add("ondemand-full", "all memory initialized, grow check off", "ondemand", false,
            run_args("ondemand", small, Some(m), pairs));
        add("eager-full", "same allocation as ondemand-full", "eager", false,
            run_args("eager", small, Some(m), pairs));
    }
    round_robin("allocator repetition", b.args.reps, &mut variants, |(v, args)| {
        let s = sample(b, v, args);
        v.samples.push(s);
    });
    let mut variants: Vec<AllocVariant> = variants.into_iter().map(|(v, _)| v).collect();
    for v in &mut variants {
        let x = Sorted::new(v.samples.iter().filter_map(|s| s.cycles_per_pair));
        v.median_cycles_per_pair = x.median();
        v.min_cycles_per_pair = x.min();
        v.max_cycles_per_pair = x.max();
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

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"bench_alloc_free":{"pairs":10,"cycles":600,"cycles_per_pair":60.0,"grow_check_on":false,"jump_sites_patched":true,"ok":true}}"#;

    #[test]
    fn the_allocator_line_is_the_last_line_of_stdout() {
        let want = AllocFreeLine { pairs: 10, cycles: 600, cycles_per_pair: 60.0, grow_check_on: false, jump_sites_patched: true, ok: true };
        assert_eq!(parse_alloc_line(&format!("{LINE}\n")).unwrap(), want);
        // After the memory report of --report json.
        let out = format!("{}{LINE}\n\n", super::super::child::tests::REPORT);
        assert_eq!(parse_alloc_line(&out).unwrap(), want);
        // A report alone, or nothing, is not the line.
        assert!(parse_alloc_line(super::super::child::tests::REPORT).is_err());
        assert!(parse_alloc_line("").is_err());
    }

    #[test]
    fn measurements_report_as_json_after_the_allocation() {
        assert_eq!(
            run_args("ondemand", 256, Some(240), 5),
            strings(&["run", "--mem-mib", "256", "--serial", "none", "--no-api", "--memmap-init", "ondemand", "--alloc-mib", "240",
                      "--report", "json", "--bench-alloc-free", "5"])
        );
        assert_eq!(run_args("eager", 2048, None, 1).last().map(String::as_str), Some("1"));
    }
}

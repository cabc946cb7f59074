//! One `vmm run` child of the bench: its command line as a user would type
//! it, the timed spawn → exit, and what it prints on stdout. With `--report
//! json` that is the memory report ([`api::MemoryReport`], one JSON line,
//! the console going to stderr); `--bench-alloc-free` adds the allocator's
//! line after it.

use super::args::BenchArgs;
use api::MemoryReport;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// What can stop one benchmark run (or the writing of the results).
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
    /// Its stdout is not what its flags make the VMM print.
    #[error("`{cmd}`: stdout is not {what}")]
    Output {
        cmd: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{cmd}`: {what}")]
    Guest { cmd: String, what: String },
    #[error("`{cmd}`: API request failed")]
    Api {
        cmd: String,
        #[source]
        source: vmm_client::ClientError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What one `vmm run` child produced.
#[derive(Debug)]
pub struct ChildRun {
    /// The command line, as [`cmdline`] gives it.
    pub cmd: String,
    /// Wall time from just before spawn to the end of wait, in µs.
    pub wall_us: f64,
    pub stdout: String,
}

impl ChildRun {
    /// The memory report a `--report json` child printed (its whole stdout).
    pub fn report(&self) -> Result<MemoryReport, BenchError> {
        parse_report(&self.stdout).map_err(|source| BenchError::Output {
            cmd: self.cmd.clone(),
            what: "one JSON memory report",
            source,
        })
    }
}

/// The binary under test and the settings of this bench.
pub struct Bench {
    pub vmm: PathBuf,
    pub args: BenchArgs,
}

impl Bench {
    /// Runs `vmm ARGS` to completion, timing spawn → exit.
    pub fn run_child(&self, args: &[String]) -> Result<ChildRun, BenchError> {
        let cmd = cmdline(args);
        let t = Instant::now();
        let out = Command::new(&self.vmm)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| BenchError::Spawn { cmd: cmd.clone(), source })?;
        let wall_us = t.elapsed().as_secs_f64() * 1e6;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(BenchError::Exit { cmd, status: out.status.to_string(), stderr_tail: tail(&stderr, 300) });
        }
        Ok(ChildRun { cmd, wall_us, stdout: String::from_utf8_lossy(&out.stdout).into_owned() })
    }
}

/// Runs `rounds` rounds over `variants`, calling `f` on each: round-robin,
/// starting one further each round, so that neither drift on the host nor
/// the position in a round favours a variant. `what` names a round in the
/// progress line on stderr.
pub fn round_robin<V>(what: &str, rounds: usize, variants: &mut [V], mut f: impl FnMut(&mut V)) {
    let k = variants.len();
    for round in 0..rounds {
        eprintln!("vmm bench: {what} {}/{rounds}", round + 1);
        for j in 0..k {
            f(&mut variants[(round + j) % k]);
        }
    }
}

/// The command line as a user would type it (for the record).
pub fn cmdline(args: &[String]) -> String {
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

/// Owned copies of `v`.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The last `n` characters of `s`, on one line.
fn tail(s: &str, n: usize) -> String {
    let s = s.trim();
    let start = s.char_indices().rev().nth(n.saturating_sub(1)).map_or(0, |(i, _)| i);
    s[start..].replace('\n', " | ")
}

/// The memory report that is the whole stdout of `vmm run --report json`.
pub fn parse_report(stdout: &str) -> Result<MemoryReport, serde_json::Error> {
    serde_json::from_str(stdout)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A real `vmm run --report json` stdout (2 GiB ondemand guest).
    pub const REPORT: &str = r#"{"valid":true,"invalid_reason":null,"strategy":"ondemand","guest":{"pages_total":524191,"pages_initialized":512,"pages_allocated":0,"pages_free":355,"pages_reserved":9276,"memmap_bytes_reserved":33554432,"memmap_bytes_initialized":32768,"chunks_total":1024,"chunks_initialized":1,"chunk_bytes":2097152,"grow_events":0,"init_cycles":220386,"init_us":110.193,"alloc_failures":0,"grow_check_on":true,"fully_initialized":false,"jump_sites_patched":false,"memmap_on_memory":false,"allocated_bytes":0,"workload_bytes":0,"cpus":1},"host":{"guest_ram_bytes":2147483648,"guest_ram_resident_bytes":208896,"memmap_resident_bytes":32768,"memmap_range_bytes":33554432,"vmm_rss_bytes":3121152,"vmm_pss_bytes":3112960,"kvm_registered_bytes":134217728,"kvm_memslot_bytes_estimate":262656,"kvm_estimate_note":"estimate"},"timings":{"process_start":0.0,"vm_created":3061.04,"vcpu_first_entry":3725.134,"guest_first_port_write":4092.789,"guest_entered":4152.982,"guest_memory_ready":7465.147,"guest_ready":11121.087,"guest_fully_initialized":null,"guest_init_memmap_us":3599.403,"guest_init_total_us":7241.597,"guest_init_full_memmap_us":null}}
"#;

    #[test]
    fn the_report_is_the_whole_stdout() {
        let r = parse_report(REPORT).unwrap();
        assert_eq!(r.timings.guest_ready, Some(11121.087));
        assert_eq!(r.timings.vm_created, Some(3061.04));
        assert_eq!(r.timings.guest_fully_initialized, None);
        assert_eq!(r.guest.as_ref().map(|g| g.init_cycles), Some(220386));
        // Anything else on stdout (a table, console text) is not a report.
        assert!(parse_report(&format!("memmap strategy: ondemand\n{REPORT}")).is_err());
        assert!(parse_report("").is_err());
        let run = ChildRun { cmd: "vmm run".into(), wall_us: 1.0, stdout: "{}".into() };
        let e = run.report().unwrap_err();
        assert!(matches!(e, BenchError::Output { .. }) && e.to_string().contains("vmm run"), "{e}");
    }

    #[test]
    fn every_round_starts_one_variant_further() {
        let mut seen = Vec::new();
        let mut variants = [0, 1, 2];
        round_robin("test round", 4, &mut variants, |v| seen.push(*v));
        assert_eq!(seen, [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]);
    }

    #[test]
    fn command_lines_are_recorded_as_typed() {
        assert_eq!(cmdline(&strings(&["run", "--cmdline", "a b", ""])), "vmm run --cmdline 'a b' ''");
    }

    #[test]
    fn the_tail_of_stderr_fits_on_one_line() {
        assert_eq!(tail("  a\nbc\n", 3), " | bc");
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("héllo", 4), "éllo");
    }
}

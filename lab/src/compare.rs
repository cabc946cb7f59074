//! `vmm compare`: the four memmap strategies side by side, from one run.
//!
//! For each strategy it boots a guest twice as a child `vmm run --report
//! json` (once idle, once after the guest allocates `--alloc-mib`), and
//! prints boot-to-ready time, the guest's initialized memmap and the
//! host-measured resident memmap. `make run` runs it.

use api::ErrorChain;
use clap::Args;
use serde_json::Value;
use std::process::{Command, Stdio};

/// Why one boot of the comparison gave no figures.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// This program's own executable (the `vmm` to run) cannot be found.
    #[error("cannot find the vmm binary")]
    Exe(#[source] std::io::Error),
    /// The child could not be started.
    #[error("cannot run vmm")]
    Spawn(#[source] std::io::Error),
    /// The child failed; its stderr says why.
    #[error("{strategy}: vmm run failed: {stderr}")]
    Run { strategy: String, stderr: String },
    /// Its stdout is not the JSON report.
    #[error("{strategy}: the report is not JSON")]
    Report {
        strategy: String,
        #[source]
        source: serde_json::Error,
    },
    /// The guest's half of the report did not pass the VMM's checks.
    #[error("{strategy}: the guest report is invalid: {reason}")]
    Invalid { strategy: String, reason: Value },
}

/// Arguments of `vmm compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub mem_mib: u64,
    /// Memory the guest allocates (and writes) in the second boot of each strategy.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub alloc_mib: u64,
    /// vCPUs for `parallel` and `deferred` (the others use one).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub smp_vcpus: u8,
    /// Strategies to compare, in order.
    #[arg(long, value_delimiter = ',', default_value = "eager,parallel,deferred,ondemand")]
    pub strategies: Vec<String>,
    /// Print every report as JSON lines instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One boot's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub ready_ms: f64,
    pub init_memmap_kib: u64,
    pub resident_memmap_kib: u64,
    pub ram_resident_mib: f64,
}

impl Row {
    /// Extracts the figures from a `--report json` object.
    pub fn from_report(r: &Value) -> Option<Row> {
        Some(Row {
            ready_ms: r.pointer("/timings/guest_ready")?.as_f64()? / 1000.0,
            init_memmap_kib: r.pointer("/guest/memmap_bytes_initialized")?.as_u64()? >> 10,
            resident_memmap_kib: r.pointer("/host/memmap_resident_bytes")?.as_u64()? >> 10,
            ram_resident_mib: r.pointer("/host/guest_ram_resident_bytes")?.as_u64()? as f64 / (1 << 20) as f64,
        })
    }
}

fn boot(args: &CompareArgs, strategy: &str, alloc: Option<u64>) -> Result<Value, CompareError> {
    let exe = std::env::current_exe().map_err(CompareError::Exe)?;
    let vcpus = if matches!(strategy, "parallel" | "deferred") { args.smp_vcpus } else { 1 };
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--serial", "none", "--no-api", "--report", "json", "--memmap-init", strategy]);
    cmd.args(["--mem-mib", &args.mem_mib.to_string(), "--vcpus", &vcpus.to_string()]);
    if let Some(a) = alloc {
        cmd.args(["--alloc-mib", &a.to_string()]);
    }
    let out = cmd.stdin(Stdio::null()).output().map_err(CompareError::Spawn)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(CompareError::Run { strategy: strategy.to_string(), stderr });
    }
    serde_json::from_slice(&out.stdout).map_err(|source| CompareError::Report { strategy: strategy.to_string(), source })
}

/// Boots `strategy` idle and with the allocation; prints both reports with
/// `--json`; returns both rows.
fn compare(args: &CompareArgs, strategy: &str) -> Result<(Row, Row), CompareError> {
    let idle = boot(args, strategy, None)?;
    let busy = boot(args, strategy, Some(args.alloc_mib))?;
    if args.json {
        println!("{}", serde_json::json!({"strategy": strategy, "state": "idle", "report": idle}));
        println!("{}", serde_json::json!({"strategy": strategy, "state": "allocated", "alloc_mib": args.alloc_mib, "report": busy}));
    }
    match (Row::from_report(&idle), Row::from_report(&busy)) {
        (Some(i), Some(b)) => Ok((i, b)),
        _ => Err(CompareError::Invalid { strategy: strategy.to_string(), reason: idle["invalid_reason"].clone() }),
    }
}

/// Runs the comparison; returns the exit code.
pub fn run(args: CompareArgs) -> u8 {
    let mut rows = Vec::new();
    for s in &args.strategies {
        if guest_abi::Strategy::from_name(s).is_none() {
            eprintln!("vmm compare: unknown strategy {s:?}; use eager, parallel, deferred or ondemand");
            return 2;
        }
        match compare(&args, s) {
            Ok((i, b)) => rows.push((s.clone(), i, b)),
            Err(e) => {
                eprintln!("vmm compare: {}", ErrorChain(&e));
                return 1;
            }
        }
    }
    if !args.json {
        print!("{}", table(&args, &rows));
    }
    0
}

/// The side-by-side table.
pub fn table(args: &CompareArgs, rows: &[(String, Row, Row)]) -> String {
    let mut s = format!(
        "{} MiB guest; \"idle\" = just booted, \"+{}M\" = after the guest allocated and wrote {} MiB\n\n",
        args.mem_mib, args.alloc_mib, args.alloc_mib
    );
    s.push_str(&format!(
        "{:<10} {:>9} | {:>12} {:>12} | {:>12} {:>12} | {:>10}\n",
        "strategy", "ready ms", "memmap init", "resident", "init +alloc", "resident", "RAM used"
    ));
    s.push_str(&format!(
        "{:<10} {:>9} | {:>12} {:>12} | {:>12} {:>12} | {:>10}\n",
        "", "(idle)", "(idle, KiB)", "(idle, KiB)", "(KiB)", "(KiB)", "(+alloc)"
    ));
    for (name, i, b) in rows {
        s.push_str(&format!(
            "{:<10} {:>9.1} | {:>12} {:>12} | {:>12} {:>12} | {:>7.1} MiB\n",
            name, i.ready_ms, i.init_memmap_kib, i.resident_memmap_kib, b.init_memmap_kib, b.resident_memmap_kib, b.ram_resident_mib
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_from_reports_and_invalid_ones_are_refused() {
        let r = serde_json::json!({
            "timings": {"guest_ready": 4500.0},
            "guest": {"memmap_bytes_initialized": 32768},
            "host": {"memmap_resident_bytes": 32768, "guest_ram_resident_bytes": 1048576},
        });
        assert_eq!(
            Row::from_report(&r),
            Some(Row { ready_ms: 4.5, init_memmap_kib: 32, resident_memmap_kib: 32, ram_resident_mib: 1.0 })
        );
        assert_eq!(Row::from_report(&serde_json::json!({"valid": false, "guest": null})), None);
    }

    #[test]
    fn errors_name_the_strategy_and_their_cause() {
        let source = serde_json::from_str::<Value>("memmap: eager").unwrap_err();
        let e = CompareError::Report { strategy: "eager".into(), source };
        assert!(ErrorChain(&e).to_string().starts_with("eager: the report is not JSON: expected value"), "{}", ErrorChain(&e));
        let e = CompareError::Invalid { strategy: "ondemand".into(), reason: Value::from("no stats block") };
        assert_eq!(e.to_string(), "ondemand: the guest report is invalid: \"no stats block\"");
    }

    #[test]
    fn the_table_has_a_row_per_strategy() {
        let args = CompareArgs { mem_mib: 2048, alloc_mib: 256, smp_vcpus: 2, strategies: vec![], json: false };
        let row = Row { ready_ms: 1.0, init_memmap_kib: 32, resident_memmap_kib: 32, ram_resident_mib: 1.0 };
        let t = table(&args, &[("eager".into(), row.clone(), row.clone()), ("ondemand".into(), row.clone(), row)]);
        assert!(t.contains("eager") && t.contains("ondemand") && t.contains("2048 MiB guest"), "{t}");
        assert_eq!(t.lines().count(), 6);
    }
}

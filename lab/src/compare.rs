//! `vmm compare`: the four memmap strategies side by side, from one run.
//!
//! For each strategy it boots a guest twice as a child `vmm run --report
//! json` (once idle, once after the guest allocates `--alloc-mib`), and
//! prints boot-to-ready time, the guest's initialized memmap and the
//! host-measured resident memmap. `make run` runs it.

use clap::Args;
use serde_json::Value;
use std::process::{Command, Stdio};

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

fn boot(args: &CompareArgs, strategy: &str, alloc: Option<u64>) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vmm binary: {e}"))?;
    let vcpus = if matches!(strategy, "parallel" | "deferred") { args.smp_vcpus } else { 1 };
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--serial", "none", "--report", "json", "--memmap-init", strategy]);
    cmd.args(["--mem-mib", &args.mem_mib.to_string(), "--vcpus", &vcpus.to_string()]);
    if let Some(a) = alloc {
        cmd.args(["--alloc-mib", &a.to_string()]);
    }
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run vmm: {e}"))?;
    if !out.status.success() {
        return Err(format!("{strategy}: vmm run failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{strategy}: the report is not JSON: {e}"))
}

/// Runs the comparison; returns the exit code.
pub fn run(args: CompareArgs) -> u8 {
    let mut rows = Vec::new();
    for s in &args.strategies {
        if guest_abi::Strategy::from_name(s).is_none() {
            eprintln!("vmm compare: unknown strategy {s:?}; use eager, parallel, deferred or ondemand");
            return 2;
        }
        let idle = boot(&args, s, None);
        let busy = boot(&args, s, Some(args.alloc_mib));
        match (idle, busy) {
            (Ok(i), Ok(b)) => {
                if args.json {
                    println!("{}", serde_json::json!({"strategy": s, "state": "idle", "report": i}));
                    println!("{}", serde_json::json!({"strategy": s, "state": "allocated", "alloc_mib": args.alloc_mib, "report": b}));
                }
                match (Row::from_report(&i), Row::from_report(&b)) {
                    (Some(i), Some(b)) => rows.push((s.clone(), i, b)),
                    _ => {
                        eprintln!("vmm compare: {s}: the guest report is invalid: {}", i["invalid_reason"]);
                        return 1;
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("vmm compare: {e}");
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
    fn the_table_has_a_row_per_strategy() {
        let args = CompareArgs { mem_mib: 2048, alloc_mib: 256, smp_vcpus: 2, strategies: vec![], json: false };
        let row = Row { ready_ms: 1.0, init_memmap_kib: 32, resident_memmap_kib: 32, ram_resident_mib: 1.0 };
        let t = table(&args, &[("eager".into(), row.clone(), row.clone()), ("ondemand".into(), row.clone(), row)]);
        assert!(t.contains("eager") && t.contains("ondemand") && t.contains("2048 MiB guest"), "{t}");
        assert_eq!(t.lines().count(), 6);
    }
}

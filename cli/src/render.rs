//! What `vmm ctl` and `vmm run --report table` print: pretty JSON, or tables
//! for a human.

use serde_json::Value;
use std::fmt::Write as _;
use crate::ctl::CtlCommand;

/// What to print for a successful answer.
pub fn render(cmd: CtlCommand, value: &Value, human: bool) -> String {
    if value.is_null() {
        // 204: nothing to show; say so only to a human.
        return if human {
            "ok\n".to_string()
        } else {
            String::new()
        };
    }
    if !human {
        let mut out = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
        out.push('\n');
        return out;
    }
    match cmd {
        CtlCommand::Memory => memory_table_json(value),
        CtlCommand::SetMemory { .. } | CtlCommand::Workload => {
            let mut top = value.clone();
            let report = top.as_object_mut().and_then(|o| o.remove("report"));
            let mut out = key_values(&top);
            if let Some(report) = report.filter(|r| !r.is_null()) {
                out.push('\n');
                out.push_str(&memory_table_json(&report));
            }
            out
        }
        _ => key_values(value),
    }
}

/// One value for a human: `-` for null, yes/no, sizes in MiB, durations in
/// µs.
fn human_value(key: &str, v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) if key.contains("bytes") => match n.as_u64() {
            Some(b) => mib(b),
            None => n.to_string(),
        },
        Value::Number(n) if key.ends_with("_us") || is_timing(key) => match n.as_f64() {
            Some(us) => format!("{us:.1} µs"),
            None => n.to_string(),
        },
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// Keys of `BootTimings` that are microsecond timestamps.
fn is_timing(key: &str) -> bool {
    key.starts_with("timings.")
}

fn mib(bytes: u64) -> String {
    // Precision loss above 2^53 bytes is irrelevant for display.
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Flattens a JSON object into `(dotted key, shown value)` rows.
fn rows(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v.as_object() {
        Some(obj) => {
            for (k, v) in obj {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_object() {
                    rows(&key, v, out);
                } else {
                    let shown = human_value(&key, v);
                    out.push((key, shown));
                }
            }
        }
        None => out.push((prefix.to_string(), human_value(prefix, v))),
    }
}

/// A generic two-column listing of a JSON answer.
fn key_values(v: &Value) -> String {
    let mut list = Vec::new();
    rows("", v, &mut list);
    let width = list
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in list {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

/// `GET /memory` for a human: the guest's view and the host's side by side,
/// then the boot timings.
pub fn memory_table_json(report: &Value) -> String {
    let mut out = String::new();
    let strategy = report
        .get("strategy")
        .map_or("-".into(), |s| human_value("strategy", s));
    let _ = writeln!(out, "memmap strategy: {strategy}");

    let mut guest = Vec::new();
    match report.get("guest") {
        Some(g) if g.is_object() => rows("", g, &mut guest),
        _ => {
            let why = report
                .get("invalid_reason")
                .and_then(Value::as_str)
                .unwrap_or("no valid report");
            guest.push(("not available:".into(), why.to_string()));
        }
    }
    let mut host = Vec::new();
    if let Some(h) = report.get("host") {
        rows("", h, &mut host);
    }
    let left = table_column("GUEST (its stats block)", &guest);
    let right = table_column("HOST (measured by the VMM)", &host);
    let left_width = left.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    for i in 0..left.len().max(right.len()) {
        let l = left.get(i).map_or("", String::as_str);
        let r = right.get(i).map_or("", String::as_str);
        let line = format!("{l:<left_width$}    {r}");
        let _ = writeln!(out, "{}", line.trim_end());
    }

    if let Some(timings) = report.get("timings") {
        let mut list = Vec::new();
        rows("timings", timings, &mut list);
        let list: Vec<(String, String)> = list
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("timings.").to_string(), v))
            .collect();
        out.push('\n');
        for line in table_column("TIMINGS (since VMM start)", &list) {
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

/// A titled column of `key  value` lines, keys padded to one width.
fn table_column(title: &str, list: &[(String, String)]) -> Vec<String> {
    let width = list
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut lines = vec![title.to_string()];
    lines.extend(list.iter().map(|(k, v)| format!("{k:<width$}  {v}")));
    lines
}


/// `GET /memory` for a human.
pub fn memory_table(report: &api::MemoryReport) -> String {
    memory_table_json(&serde_json::to_value(report).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_json_by_default() {
        let v = serde_json::json!({"state": "Running", "id": "vm0"});
        let out = render(CtlCommand::Info, &v, false);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), v);
        assert!(out.contains("\n  \""), "pretty-printed: {out}");
        assert_eq!(render(CtlCommand::Pause, &Value::Null, false), "");
        assert_eq!(render(CtlCommand::Pause, &Value::Null, true), "ok\n");
    }

    #[test]
    fn human_info_is_a_key_value_list() {
        let v = serde_json::json!({
            "id": "vm0", "state": "Halted", "vmm_version": "0.1.0",
            "started": true, "exit_code": 0, "failure_reason": null
        });
        let out = render(CtlCommand::Info, &v, true);
        assert!(out.contains("state           Halted\n"), "{out}");
        assert!(out.contains("started         yes\n"), "{out}");
        assert!(out.contains("failure_reason  -\n"), "{out}");
    }

    #[test]
    fn human_memory_puts_guest_and_host_side_by_side_in_mib() {
        let v = serde_json::to_value(api::MemoryReport::example()).unwrap();
        let out = render(CtlCommand::Memory, &v, true);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "memmap strategy: ondemand");
        assert!(
            lines[1].starts_with("GUEST") && lines[1].contains("HOST"),
            "{out}"
        );
        let ram = lines
            .iter()
            .find(|l| l.contains("guest_ram_bytes"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            ram.contains("pages_total") && ram.contains("524288"),
            "{out}"
        );
        assert!(
            ram.ends_with("guest_ram_bytes             2048.0 MiB"),
            "{ram:?}"
        );
        assert!(out.contains("memmap_bytes_reserved     32.0 MiB"), "{out}");
        assert!(out.contains("vmm_pss_bytes               5.0 MiB"), "{out}");
        assert!(
            out.contains("guest_ready                2000.5 µs"),
            "{out}"
        );
        assert!(out.contains("init_us                   41.5 µs"), "{out}");
        // Columns line up: every host key starts at the same offset.
        let col = lines[1].find("HOST").unwrap();
        assert_eq!(ram.find("guest_ram_bytes"), Some(col), "{out}");

        let mut invalid = api::MemoryReport::example();
        invalid.valid = false;
        invalid.guest = None;
        invalid.invalid_reason = Some("no stats block yet".into());
        let out = render(
            CtlCommand::Memory,
            &serde_json::to_value(invalid).unwrap(),
            true,
        );
        assert!(out.contains("not available:  no stats block yet"), "{out}");
    }

    #[test]
    fn human_workload_shows_status_then_report() {
        let v = serde_json::json!({
            "target_mib": 512, "held_bytes": 536870912u64, "status": "Ok",
            "report": serde_json::to_value(api::MemoryReport::example()).unwrap()
        });
        let out = render(CtlCommand::SetMemory { target_mib: 512 }, &v, true);
        assert!(
            out.starts_with("target_mib  512\nheld_bytes  512.0 MiB\nstatus      Ok\n\nmemmap"),
            "{out}"
        );
        let v =
            serde_json::json!({"target_mib": 0, "held_bytes": 0, "status": "Idle", "report": null});
        let out = render(CtlCommand::Workload, &v, true);
        assert!(!out.contains("memmap"), "{out}");
    }

    #[test]
    fn human_metrics_flattens_nested_counters() {
        let v = serde_json::to_value(api::Metrics::default()).unwrap();
        let out = render(CtlCommand::Metrics, &v, true);
        assert!(out.contains("vm_exits.io_out"), "{out}");
        assert!(out.contains("serial_bytes           0.0 MiB"), "{out}");
    }
}

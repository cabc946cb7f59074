//! `vmm ps --prometheus`: the whole fleet's rows ([`Row`]) in Prometheus'
//! text exposition format (version 0.0.4), one sample per VM and metric with
//! an `id` label, so that one scrape of the host covers every VM. Names
//! follow Prometheus' conventions: the `vmm_` prefix and the unit in the
//! name (`_bytes`, `_seconds`).

use crate::fleet::{Reach, Row};
use std::fmt::Write;

/// One metric: name, help, and its value for a row (none: no sample).
type Metric = (&'static str, &'static str, fn(&Row) -> Option<u64>);

/// The gauges, in the order they are written.
const METRICS: [Metric; 9] = [
    ("vmm_up", "Whether the VM answered its API (1) or not (0).", |r| Some(u64::from(r.reach == Reach::Answered))),
    ("vmm_vcpus", "vCPUs configured.", |r| r.vcpus.map(u64::from)),
    ("vmm_memory_configured_bytes", "Guest memory configured.", |r| r.mem_size_mib.map(|m| m.saturating_mul(1 << 20))),
    ("vmm_uptime_seconds", "Time since the VM started.", |r| r.uptime_s),
    ("vmm_memmap_initialized_bytes", "Memmap bytes the guest initialized.", |r| r.memmap_initialized_bytes),
    ("vmm_memmap_resident_bytes", "Memmap bytes resident on the host.", |r| r.memmap_resident_bytes),
    ("vmm_guest_ram_resident_bytes", "Guest RAM resident on the host.", |r| r.guest_ram_resident_bytes),
    ("vmm_kvm_registered_bytes", "Guest RAM registered with KVM.", |r| r.kvm_registered_bytes),
    ("vmm_process_pss_bytes", "The VMM process's proportional set size, without guest RAM.", |r| r.vmm_pss_bytes),
];

/// `value` as a label value: backslash, double quote and newline escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The exposition of `rows`.
pub fn exposition(rows: &[Row]) -> String {
    let mut out = String::new();
    for (name, help, value) in METRICS {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for row in rows {
            if let Some(v) = value(row) {
                let _ = writeln!(out, "{name}{{id=\"{}\"}} {v}", label(&row.id));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_vm_is_a_labelled_sample_and_the_text_parses() {
        let mut a = Row::without_figures("a".into(), Path::new("/r/a"), Reach::Answered);
        a.mem_size_mib = Some(256);
        a.memmap_initialized_bytes = Some(32 << 10);
        let b = Row::without_figures("we\"ird\\".into(), Path::new("/r/b"), Reach::Dead);
        let text = exposition(&[a, b]);
        assert!(text.contains("vmm_up{id=\"a\"} 1\n"), "{text}");
        assert!(text.contains("vmm_up{id=\"we\\\"ird\\\\\"} 0\n"), "{text}");
        assert!(text.contains("vmm_memory_configured_bytes{id=\"a\"} 268435456\n"), "{text}");
        assert!(!text.contains("vmm_vcpus{"), "{text}");
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let init = scrape.samples.iter().find(|s| s.metric == "vmm_memmap_initialized_bytes").unwrap();
        assert_eq!(init.labels.get("id"), Some("a"));
        assert!(matches!(init.value, prometheus_parse::Value::Gauge(v) if v == 32768.0));
        assert_eq!(scrape.samples.iter().filter(|s| s.metric == "vmm_up").count(), 2);
    }
}

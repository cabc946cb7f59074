//! `vmm ps --prometheus`: the whole fleet in one exposition, so that one
//! scrape of the host covers every VM. Each VM's samples carry an `id`
//! label; they are the families its own `GET /metrics` answers in text
//! (counters and memory figures, written by [`api::prometheus`]), plus what
//! only the listing knows: whether the VM answered, its vCPUs, configured
//! memory and uptime.

use crate::fleet::{Reach, Row};
use api::prometheus::{Exposition, Kind};

/// The exposition of `rows`.
pub fn exposition(rows: &[Row]) -> String {
    let mut e = Exposition::new();
    for row in rows {
        let labels = [("id", row.id.as_str())];
        e.add("vmm_up", "Whether the VM answered its API (1) or not (0).", Kind::Gauge, &labels, row.reach == Reach::Answered);
        let gauges: [(&'static str, &'static str, Option<u64>); 3] = [
            ("vmm_vcpus", "vCPUs configured.", row.vcpus.map(u64::from)),
            ("vmm_memory_configured_bytes", "Guest memory configured.", row.mem_size_mib.map(|m| m.saturating_mul(1 << 20))),
            ("vmm_uptime_seconds", "Time since the VM started.", row.uptime_s),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                e.add(name, help, Kind::Gauge, &labels, v);
            }
        }
        if let Some(answers) = &row.answers {
            e.counters(&labels, &answers.metrics);
            e.memory(&labels, &answers.report);
        }
    }
    e.text()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Answers;
    use api::{MemoryReport, Metrics};
    use std::path::Path;

    #[test]
    fn every_vm_is_a_labelled_sample_and_the_text_parses() {
        let mut a = Row::without_figures("a".into(), Path::new("/r/a"), Reach::Answered);
        a.mem_size_mib = Some(256);
        let mut report = MemoryReport::example();
        report.guest.as_mut().unwrap().memmap_bytes_initialized = 32 << 10;
        a.answers = Some(Box::new(Answers { metrics: Metrics { api_requests: 7, ..Metrics::default() }, report }));
        let b = Row::without_figures("we\"ird\\".into(), Path::new("/r/b"), Reach::Dead);
        let text = exposition(&[a, b]);
        assert!(text.contains("vmm_up{id=\"a\"} 1\n"), "{text}");
        assert!(text.contains("vmm_up{id=\"we\\\"ird\\\\\"} 0\n"), "{text}");
        assert!(text.contains("vmm_memory_configured_bytes{id=\"a\"} 268435456\n"), "{text}");
        assert!(!text.contains("vmm_vcpus{"), "{text}");
        // The dead VM has no figures beyond vmm_up.
        assert_eq!(text.matches("ird").count(), 1, "{text}");
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let init = scrape.samples.iter().find(|s| s.metric == "vmm_memmap_initialized_bytes").unwrap();
        assert_eq!(init.labels.get("id"), Some("a"));
        assert!(matches!(init.value, prometheus_parse::Value::Gauge(v) if v == 32768.0));
        let requests = scrape.samples.iter().find(|s| s.metric == "vmm_api_requests_total").unwrap();
        assert!(matches!(requests.value, prometheus_parse::Value::Counter(v) if v == 7.0), "{requests:?}");
        assert_eq!(scrape.samples.iter().filter(|s| s.metric == "vmm_up").count(), 2);
    }
}

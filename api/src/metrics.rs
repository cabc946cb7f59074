//! `GET /metrics`: counters since the VMM started, and [`MetricsLine`], what
//! the VMM writes to the metrics file of `PUT /metrics` on every flush.

use serde::{Deserialize, Serialize};

/// The answer to `GET /metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// vCPU exits, all vCPUs together, by reason.
    pub vm_exits: VmExitCounts,
    /// API requests received (including failed ones).
    pub api_requests: u64,
    /// API requests answered with an error.
    pub api_errors: u64,
    /// Commands sent to the guest through its mailbox.
    pub guest_commands: u64,
    /// Bytes the guest wrote to its serial port.
    pub serial_bytes: u64,
    /// Console bytes dropped: the VMM's console buffer was full (the host
    /// did not take them fast enough), the console file reached its cap
    /// (`--serial-max-bytes`), or writing failed.
    pub serial_bytes_dropped: u64,
    /// Lines the VMM could not write to its stdout or stderr (closed,
    /// failing, or full for too long).
    pub stdio_lines_dropped: u64,
    /// Things the guest wrote that the VMM refused (bad addresses, records,
    /// results); all are counted, at most 10 a second are logged.
    pub guest_protocol_errors: u64,
    /// Log lines not written to the `PUT /logger` file (it was full, or
    /// the VMM's cap on log bytes was reached).
    pub log_lines_dropped: u64,
    /// Metrics lines not written to the `PUT /metrics` file.
    pub metrics_lines_dropped: u64,
}

/// One line of the metrics file: the time of the flush, then the counters
/// of [`Metrics`] at the top level (as Firecracker puts `utc_timestamp_ms`
/// first in its own lines).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsLine<'a> {
    /// Milliseconds since the Unix epoch, UTC.
    pub utc_timestamp_ms: u64,
    /// The counters.
    #[serde(flatten)]
    pub metrics: &'a Metrics,
}

/// vCPU exits by reason (`KVM_EXIT_*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmExitCounts {
    /// Port reads (`KVM_EXIT_IO`, in).
    pub io_in: u64,
    /// Port writes (`KVM_EXIT_IO`, out).
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// `HLT`.
    pub hlt: u64,
    /// Triple faults and resets (`KVM_EXIT_SHUTDOWN`).
    pub shutdown: u64,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    pub system_event: u64,
    /// `KVM_EXIT_FAIL_ENTRY` and `KVM_EXIT_INTERNAL_ERROR`.
    pub failed: u64,
    /// Anything else.
    pub other: u64,
}

impl VmExitCounts {
    /// All exits.
    pub fn total(&self) -> u64 {
        [
            self.io_in,
            self.io_out,
            self.mmio_read,
            self.mmio_write,
            self.hlt,
            self.shutdown,
            self.system_event,
            self.failed,
            self.other,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_adds_up() {
        let c = VmExitCounts {
            io_in: 2,
            io_out: 3,
            hlt: 1,
            other: u64::MAX,
            ..Default::default()
        };
        assert_eq!(c.total(), u64::MAX);
        let c = VmExitCounts {
            io_in: 2,
            io_out: 3,
            hlt: 1,
            ..Default::default()
        };
        assert_eq!(c.total(), 6);
    }

    #[test]
    fn default_serializes_every_counter() {
        let v = serde_json::to_value(Metrics::default()).unwrap();
        assert_eq!(v["vm_exits"].as_object().unwrap().len(), 9);
        assert_eq!(v["api_requests"], 0);
    }

    #[test]
    fn a_metrics_line_is_flat_json_with_a_timestamp_first() {
        let m = Metrics { api_requests: 3, ..Default::default() };
        let line = serde_json::to_string(&MetricsLine { utc_timestamp_ms: 7, metrics: &m }).unwrap();
        assert!(line.starts_with(r#"{"utc_timestamp_ms":7,"vm_exits":{"#), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["api_requests"], 3);
        assert!(!line.contains('\n'));
    }
}

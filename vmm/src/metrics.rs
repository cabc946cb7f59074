//! The VMM's counters, shared by the vCPU threads, the API server and the
//! controller, and read by `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters, read by `GET /metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub exits_io_in: AtomicU64,
    pub exits_io_out: AtomicU64,
    pub exits_mmio_read: AtomicU64,
    pub exits_mmio_write: AtomicU64,
    pub exits_system_event: AtomicU64,
    pub exits_failed: AtomicU64,
    pub serial_bytes: AtomicU64,
    /// Console bytes dropped: the buffer was full, the console file at its
    /// cap, or the host sink failed.
    pub serial_bytes_dropped: AtomicU64,
    pub exits_hlt: AtomicU64,
    pub exits_shutdown: AtomicU64,
    pub exits_other: AtomicU64,
    pub kvm_run_interrupted: AtomicU64,
    pub guest_protocol_errors: AtomicU64,
    pub api_requests: AtomicU64,
    pub api_errors: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as `GET /metrics` answers them, with the controller's own
    /// (`guest_commands` and the dropped log and metrics lines).
    pub fn snapshot(&self, guest_commands: u64, log_lines_dropped: u64, metrics_lines_dropped: u64) -> api::Metrics {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        api::Metrics {
            vm_exits: api::VmExitCounts {
                io_in: l(&self.exits_io_in),
                io_out: l(&self.exits_io_out),
                mmio_read: l(&self.exits_mmio_read),
                mmio_write: l(&self.exits_mmio_write),
                hlt: l(&self.exits_hlt),
                shutdown: l(&self.exits_shutdown),
                system_event: l(&self.exits_system_event),
                failed: l(&self.exits_failed),
                other: l(&self.exits_other),
            },
            api_requests: l(&self.api_requests),
            api_errors: l(&self.api_errors),
            guest_commands,
            serial_bytes: l(&self.serial_bytes),
            serial_bytes_dropped: l(&self.serial_bytes_dropped),
            stdio_lines_dropped: crate::out::dropped_stdout() + crate::out::dropped_stderr(),
            guest_protocol_errors: l(&self.guest_protocol_errors),
            log_lines_dropped,
            metrics_lines_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_carries_every_counter() {
        let m = Metrics::default();
        Metrics::inc(&m.exits_io_out);
        Metrics::inc(&m.api_requests);
        let s = m.snapshot(3, 4, 5);
        assert_eq!((s.vm_exits.io_out, s.api_requests, s.guest_commands), (1, 1, 3));
        assert_eq!((s.log_lines_dropped, s.metrics_lines_dropped), (4, 5));
    }
}

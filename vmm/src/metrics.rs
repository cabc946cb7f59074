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
}

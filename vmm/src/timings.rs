//! Boot timings on the host's monotonic clock.
//!
//! Every timestamp is taken once (the first time the event happens) and
//! reported in microseconds since the process started (`main` entry).

use guest_abi::Phase;
use std::sync::OnceLock;
use std::time::Instant;

/// When each boot step happened.
#[derive(Debug)]
pub struct Timings {
    /// Process start (taken first thing in `main`).
    pub process_start: Instant,
    /// `KVM_CREATE_VM` returned and guest RAM is registered.
    pub vm_created: OnceLock<Instant>,
    /// Just before the boot vCPU's first `KVM_RUN`.
    pub vcpu_first_entry: OnceLock<Instant>,
    /// The guest's first port access, read or write (its first VM exit to
    /// the VMM). The name is kept for the report's key.
    pub guest_first_port_write: OnceLock<Instant>,
    /// The guest announced `Phase::Entered`.
    pub guest_entered: OnceLock<Instant>,
    /// The guest announced `Phase::MemoryReady`.
    pub guest_memory_ready: OnceLock<Instant>,
    /// The guest announced `Phase::Ready`.
    pub guest_ready: OnceLock<Instant>,
    /// The VM stopped.
    pub vm_stopped: OnceLock<Instant>,
}

impl Default for Timings {
    fn default() -> Self {
        Self::new()
    }
}

impl Timings {
    /// Starts the clock now.
    pub fn new() -> Timings {
        Timings::starting_at(Instant::now())
    }

    /// Starts the clock at `start`.
    pub fn starting_at(start: Instant) -> Timings {
        Timings {
            process_start: start,
            vm_created: OnceLock::new(),
            vcpu_first_entry: OnceLock::new(),
            guest_first_port_write: OnceLock::new(),
            guest_entered: OnceLock::new(),
            guest_memory_ready: OnceLock::new(),
            guest_ready: OnceLock::new(),
            vm_stopped: OnceLock::new(),
        }
    }

    /// Records `slot` now unless it is already set.
    pub fn mark_once(&self, slot: &OnceLock<Instant>) {
        if slot.get().is_none() {
            let _ = slot.set(Instant::now());
        }
    }

    /// Records a guest phase.
    pub fn mark_phase(&self, phase: Phase) {
        self.mark_once(match phase {
            Phase::Entered => &self.guest_entered,
            Phase::MemoryReady => &self.guest_memory_ready,
            Phase::Ready => &self.guest_ready,
        });
    }

    /// Microseconds from process start to `slot`, if it happened.
    pub fn us(&self, slot: &OnceLock<Instant>) -> Option<f64> {
        slot.get().map(|t| t.saturating_duration_since(self.process_start).as_secs_f64() * 1e6)
    }

    /// The timings as the API reports them.
    pub fn report(&self) -> api::BootTimings {
        api::BootTimings {
            process_start: Some(0.0),
            vm_created: self.us(&self.vm_created),
            vcpu_first_entry: self.us(&self.vcpu_first_entry),
            guest_first_port_write: self.us(&self.guest_first_port_write),
            guest_entered: self.us(&self.guest_entered),
            guest_memory_ready: self.us(&self.guest_memory_ready),
            guest_ready: self.us(&self.guest_ready),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_is_taken_once_and_reported_from_process_start() {
        let t = Timings::new();
        assert_eq!(t.us(&t.guest_ready), None);
        t.mark_phase(Phase::Ready);
        let first = t.us(&t.guest_ready).unwrap();
        t.mark_phase(Phase::Ready);
        assert_eq!(t.us(&t.guest_ready), Some(first));
        assert!(first >= 0.0);
    }
}

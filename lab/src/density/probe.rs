//! Talking to one child VM through its API socket: wait until the guest is
//! ready (timing exec → ready), apply its workload, and sample its
//! `GET /memory` report plus `/proc/PID/status` and `smaps_rollup`. A peer
//! VM has no API: its readiness is read from its console log and its
//! figures from `/proc` alone.
//!
//! Every call is one short connection ([`vmm_client::Client::request`]), so the
//! runner holds no file descriptor per VM between calls.

use super::peer;
use super::workload::Phase;
use crate::host;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Pause between two readiness polls: an eighth of the time waited so far,
/// within these bounds. Each poll costs the child ~1 ms of CPU for its memory
/// report, so a fixed short pause would steal a large share of the CPU from
/// the guests booting beside it; this keeps the cost a few percent and the
/// exec → ready figure within ~12% (the VMM's own `guest_ready` is exact).
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(20);

/// Why a VM did not become ready with its workload.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The process ended before it was ready.
    #[error("VM {index} (pid {pid}) exited before it was ready: {log}")]
    Exited { index: u64, pid: u32, log: String },
    /// Not ready in time.
    #[error("VM {index} (pid {pid}) was not ready within {} s", .timeout.as_secs())]
    Timeout { index: u64, pid: u32, timeout: Duration },
    /// The API answered the workload request with an error, or the guest
    /// could not hold the workload.
    #[error("VM {index}: the workload of {mib} MiB failed: {answer}")]
    Workload { index: u64, mib: u64, answer: String },
    /// The exchange with the API failed after the VM was ready.
    #[error("VM {index}: API request failed")]
    Api { index: u64, #[source] source: vmm_client::ClientError },
    /// The run is being interrupted.
    #[error("interrupted")]
    Interrupted,
}

/// A VM that is ready and holds its workload.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Ready {
    /// Wall time from just before `fork` to the first API answer that shows
    /// the guest ready, in ms (as the runner sees it).
    pub spawn_to_ready_ms: f64,
    /// The VMM's own `timings.guest_ready`: µs from its `main()` to the
    /// guest's ready announcement, here in ms (excludes fork/exec and the
    /// polling resolution); `None` for a peer, which has no such figure.
    pub vmm_guest_ready_ms: Option<f64>,
    /// How long `PUT /guest/memory` took, in ms (0 without a workload).
    pub workload_ms: f64,
}

/// What is being waited for.
pub struct Target<'a> {
    pub index: u64,
    pub pid: u32,
    pub sock: &'a Path,
    pub log: &'a Path,
    pub spawned_at: Instant,
    pub alloc_mib: u64,
    /// How readiness shows.
    pub ready_by: ReadyBy,
}

/// How the runner sees that a VM is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyBy {
    /// Our VMM: its API's `GET /memory` has `timings.guest_ready`; the
    /// workload is given through `PUT /guest/memory`.
    Api,
    /// A peer: the guest's serial console (the VM's log) shows
    /// [`peer::READY_LINE`], then [`peer::ALLOCATED_LINE`] when the VM has
    /// a boot-time workload.
    Serial,
}

/// One client for every VM and thread of the run.
fn request(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), vmm_client::ClientError> {
    static CLIENT: std::sync::OnceLock<Option<vmm_client::Client>> = std::sync::OnceLock::new();
    match CLIENT.get_or_init(|| vmm_client::Client::new().ok()) {
        Some(c) => c.request(sock, method, path, body),
        // Building the runtime failed once; build it again to get the reason.
        None => vmm_client::Client::new()?.request(sock, method, path, body),
    }
}

/// Waits until the guest is ready with its workload ([`ReadyBy`]).
pub fn await_ready(t: &Target<'_>, timeout: Duration, cancel: &AtomicBool) -> Result<Ready, LaunchError> {
    match t.ready_by {
        ReadyBy::Api => await_api_ready(t, timeout, cancel),
        ReadyBy::Serial => await_serial_ready(t, timeout, cancel),
    }
}

/// Polls until `seen()` or the deadline; `Ok(when)` once seen.
fn poll_until(t: &Target<'_>, timeout: Duration, cancel: &AtomicBool, mut seen: impl FnMut() -> bool) -> Result<Instant, LaunchError> {
    let deadline = t.spawned_at + timeout;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(LaunchError::Interrupted);
        }
        if Instant::now() > deadline {
            return Err(LaunchError::Timeout { index: t.index, pid: t.pid, timeout });
        }
        if seen() {
            return Ok(Instant::now());
        }
        if host::exited(t.pid) {
            return Err(LaunchError::Exited { index: t.index, pid: t.pid, log: log_tail(t.log) });
        }
        std::thread::sleep((t.spawned_at.elapsed() / 8).clamp(POLL_MIN, POLL_MAX));
    }
}

/// A peer: waits for the ready line on the guest's console, then for the
/// boot-time workload's line if it has one.
fn await_serial_ready(t: &Target<'_>, timeout: Duration, cancel: &AtomicBool) -> Result<Ready, LaunchError> {
    let ready_at = poll_until(t, timeout, cancel, || peer::log_has_line(t.log, peer::READY_LINE))?;
    let mut workload_ms = 0.0;
    if t.alloc_mib > 0 {
        let done = poll_until(t, timeout, cancel, || peer::log_has_line(t.log, peer::ALLOCATED_LINE))?;
        workload_ms = done.duration_since(ready_at).as_secs_f64() * 1e3;
    }
    let spawn_to_ready_ms = ready_at.duration_since(t.spawned_at).as_secs_f64() * 1e3;
    Ok(Ready { spawn_to_ready_ms, vmm_guest_ready_ms: None, workload_ms })
}

/// Waits until the guest is ready (polling `GET /memory`), then applies the
/// workload with `PUT /guest/memory` and waits for the guest to hold it.
fn await_api_ready(t: &Target<'_>, timeout: Duration, cancel: &AtomicBool) -> Result<Ready, LaunchError> {
    let deadline = t.spawned_at + timeout;
    let (ready_at, vmm_ready_us) = loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(LaunchError::Interrupted);
        }
        if Instant::now() > deadline {
            return Err(LaunchError::Timeout { index: t.index, pid: t.pid, timeout });
        }
        if t.sock.exists() {
            if let Ok((200, v)) = request(t.sock, "GET", "/memory", None) {
                if let Some(us) = v.pointer("/timings/guest_ready").and_then(Value::as_f64) {
                    break (Instant::now(), us);
                }
            }
        }
        if host::exited(t.pid) {
            return Err(LaunchError::Exited { index: t.index, pid: t.pid, log: log_tail(t.log) });
        }
        std::thread::sleep((t.spawned_at.elapsed() / 8).clamp(POLL_MIN, POLL_MAX));
    };
    let spawn_to_ready_ms = ready_at.duration_since(t.spawned_at).as_secs_f64() * 1e3;
    let mut workload_ms = 0.0;
    if t.alloc_mib > 0 {
        workload_ms = set_memory(t.index, t.sock, t.alloc_mib)?;
    }
    Ok(Ready { spawn_to_ready_ms, vmm_guest_ready_ms: Some(vmm_ready_us / 1e3), workload_ms })
}

/// Makes VM `index`'s workload hold `mib` MiB (`PUT /guest/memory`, which
/// answers once the guest holds it); returns how long that took, in ms.
fn set_memory(index: u64, sock: &Path, mib: u64) -> Result<f64, LaunchError> {
    let start = Instant::now();
    let body = json!({ "target_mib": mib });
    let (status, answer) =
        request(sock, "PUT", "/guest/memory", Some(&body)).map_err(|source| LaunchError::Api { index, source })?;
    if status != 200 || answer.get("status").and_then(Value::as_str) != Some("Ok") {
        return Err(LaunchError::Workload { index, mib, answer: format!("{status} {answer}") });
    }
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// How one VM went through its phases.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PhasesDone {
    /// Seconds from the start of the run (its strategy and reclaim mode)
    /// when the first phase began and the last one ended.
    pub start_s: f64,
    pub end_s: f64,
    /// Time the `peak:` phases took to allocate and write, ms in all.
    pub peak_ms: f64,
    /// Time the final `idle:` took to free down to the idle size, ms.
    pub idle_ms: f64,
}

/// Runs VM `index`'s phases one after the other; `epoch` is the run's start
/// (for [`PhasesDone`]). A hold is cut short when the run is interrupted.
pub fn run_phases(
    index: u64,
    sock: &Path,
    phases: &[Phase],
    epoch: Instant,
    cancel: &AtomicBool,
) -> Result<PhasesDone, LaunchError> {
    let start_s = epoch.elapsed().as_secs_f64();
    let (mut peak_ms, mut idle_ms) = (0.0, 0.0);
    for p in phases {
        if cancel.load(Ordering::Relaxed) {
            return Err(LaunchError::Interrupted);
        }
        match *p {
            Phase::Peak { mib } => peak_ms += set_memory(index, sock, mib)?,
            Phase::Idle { mib } => idle_ms += set_memory(index, sock, mib)?,
            Phase::Hold { ms } => {
                let until = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < until && !cancel.load(Ordering::Relaxed) {
                    std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(50)));
                }
            }
        }
    }
    Ok(PhasesDone { start_s, end_s: epoch.elapsed().as_secs_f64(), peak_ms, idle_ms })
}

/// The last lines of a child's log, on one line, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    if tail.is_empty() { "(no output)".to_string() } else { tail.join(" / ") }
}

/// One VM's figures at one step, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Sample {
    /// Whether the guest's half of the report was valid.
    pub valid: bool,
    /// Guest RAM resident on the host and this VM's own: the report's
    /// `guest_ram_resident_bytes` less its `guest_ram_shared_bytes` (the
    /// built-in kernel's pages still mapped from the page cache, which the
    /// host holds once for every VM, not once per VM).
    pub guest_ram_resident: u64,
    pub memmap_resident: u64,
    pub memmap_initialized: u64,
    pub workload: u64,
    pub allocated: u64,
    pub vmm_rss: u64,
    /// PSS excluding guest RAM (RSS when the kernel gives no PSS).
    pub vmm_pss: u64,
    pub kvm_memslot_estimate: u64,
    /// Guest RAM registered with KVM.
    pub kvm_registered: u64,
    /// What the VMM did with the guest's free page reports (`reclaim`).
    pub reclaim: ReclaimSample,
    /// `VmPTE` from `/proc/PID/status`.
    pub page_tables: u64,
    pub threads: u64,
    /// The whole process as `/proc/PID/smaps_rollup` sees it, guest RAM
    /// included: the figures taken the same way for our VMs and a peer's.
    pub proc: host::ProcMemory,
}

/// The reclaim counters of one VM's report (`GET /memory`'s `reclaim`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimSample {
    /// Free page reports the guest made.
    pub events: u64,
    /// Bytes discarded from the host, all kinds.
    pub discarded_bytes: u64,
    /// Chunks the guest returned to uninitialized (0 if it did not say).
    pub chunks_deinitialized: u64,
    /// KVM memslots deleted.
    pub memslots_unregistered: u64,
    /// Ranges the VMM refused.
    pub ranges_rejected: u64,
}

/// Why a VM could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The request failed (the VM is gone?).
    #[error("VM {index}: GET /memory failed")]
    Api { index: u64, #[source] source: vmm_client::ClientError },
    /// The answer is not a memory report.
    #[error("VM {index}: GET /memory answered {status}: {body}")]
    Answer { index: u64, status: u16, body: String },
}

/// Reads VM `index`'s memory report; returns the figures and the raw JSON.
pub fn sample(index: u64, pid: u32, sock: &Path) -> Result<(Sample, String), SampleError> {
    let (status, v) = request(sock, "GET", "/memory", None).map_err(|source| SampleError::Api { index, source })?;
    let s = parse_sample(&v).filter(|_| status == 200).ok_or_else(|| SampleError::Answer { index, status, body: v.to_string() })?;
    let st = host::proc_status(pid);
    let proc = host::proc_memory(pid);
    Ok((Sample { page_tables: st.page_table_bytes, threads: st.threads, proc, ..s }, v.to_string()))
}

/// A peer VM's figures: only what the host sees of its process (no memory
/// report: the guest's own figures stay zero and `valid` false).
pub fn sample_host(pid: u32) -> Sample {
    let st = host::proc_status(pid);
    Sample {
        vmm_rss: st.rss_bytes,
        page_tables: st.page_table_bytes,
        threads: st.threads,
        proc: host::proc_memory(pid),
        ..Sample::default()
    }
}

/// The figures of a `GET /memory` answer (`None` if its host part is missing).
pub fn parse_sample(v: &Value) -> Option<Sample> {
    let host = |k: &str| v.pointer(&format!("/host/{k}")).and_then(Value::as_u64);
    let guest = |k: &str| v.pointer(&format!("/guest/{k}")).and_then(Value::as_u64).unwrap_or(0);
    let reclaim = |k: &str| v.pointer(&format!("/reclaim/{k}")).and_then(Value::as_u64).unwrap_or(0);
    let rss = host("vmm_rss_bytes")?;
    Some(Sample {
        valid: v.get("valid").and_then(Value::as_bool).unwrap_or(false),
        guest_ram_resident: host("guest_ram_resident_bytes")?.saturating_sub(host("guest_ram_shared_bytes").unwrap_or(0)),
        memmap_resident: host("memmap_resident_bytes")?,
        memmap_initialized: guest("memmap_bytes_initialized"),
        workload: guest("workload_bytes"),
        allocated: guest("allocated_bytes"),
        vmm_rss: rss,
        vmm_pss: host("vmm_pss_bytes").unwrap_or(rss),
        kvm_memslot_estimate: host("kvm_memslot_bytes_estimate").unwrap_or(0),
        kvm_registered: host("kvm_registered_bytes").unwrap_or(0),
        reclaim: ReclaimSample {
            events: reclaim("events"),
            discarded_bytes: reclaim("discarded_bytes"),
            chunks_deinitialized: reclaim("chunks_deinitialized"),
            memslots_unregistered: reclaim("memslots_unregistered"),
            ranges_rejected: reclaim("ranges_rejected"),
        },
        page_tables: 0,
        threads: 0,
        proc: host::ProcMemory::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_report_becomes_a_sample() {
        let v = json!({
            "valid": true,
            "guest": { "memmap_bytes_initialized": 32768, "workload_bytes": 1048576, "allocated_bytes": 2097152 },
            "host": { "guest_ram_resident_bytes": 204800, "memmap_resident_bytes": 32768, "vmm_rss_bytes": 3604480,
                      "vmm_pss_bytes": 2381824, "kvm_memslot_bytes_estimate": 4202496, "kvm_registered_bytes": 2097152 },
            "reclaim": { "events": 3, "discarded_bytes": 8192, "chunks_deinitialized": null, "memslots_unregistered": 1 }
        });
        let s = parse_sample(&v).unwrap();
        assert!(s.valid);
        assert_eq!((s.guest_ram_resident, s.memmap_resident, s.memmap_initialized), (204800, 32768, 32768));
        assert_eq!((s.workload, s.allocated, s.vmm_rss, s.vmm_pss), (1048576, 2097152, 3604480, 2381824));
        assert_eq!(s.kvm_registered, 2097152);
        assert_eq!(s.reclaim, ReclaimSample { events: 3, discarded_bytes: 8192, chunks_deinitialized: 0, memslots_unregistered: 1, ranges_rejected: 0 });
        // No PSS from the kernel: RSS stands in. An invalid guest reads as 0.
        let v = json!({ "valid": false, "guest": null, "host": { "guest_ram_resident_bytes": 1, "memmap_resident_bytes": 0, "vmm_rss_bytes": 7, "vmm_pss_bytes": null } });
        let s = parse_sample(&v).unwrap();
        assert_eq!((s.valid, s.vmm_pss, s.workload), (false, 7, 0));
        assert!(parse_sample(&json!({ "fault_message": "x" })).is_none());
        // Pages shared from the page cache are not the VM's own.
        let v = json!({ "host": { "guest_ram_resident_bytes": 204800, "guest_ram_shared_bytes": 98304, "memmap_resident_bytes": 0, "vmm_rss_bytes": 7 } });
        assert_eq!(parse_sample(&v).unwrap().guest_ram_resident, 106496);
    }
}

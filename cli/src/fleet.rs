//! The VMs of a host, as `vmm ps` lists them: every socket in the runtime
//! directory (or the directories given) is asked, in parallel and with a
//! short deadline, for its status, machine configuration and memory report,
//! and becomes one [`Row`]. A VM that does not answer in time, or whose
//! socket nobody listens on any more, is still a row, saying so.

use api::{Endpoint, InstanceStatus, MachineConfig, MemoryReport, Metrics, Strategy};
use serde::Serialize;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use vmm_client::{Client, ClientError};

/// Deadline of each request to one VM.
pub const PER_VM_TIMEOUT: Duration = Duration::from_millis(500);

/// Most VMs asked at once.
pub const MAX_WORKERS: usize = 32;

/// Whether a VM answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// It answered every request.
    Answered,
    /// No answer within the deadline (busy, stopped, paused process).
    NoAnswer,
    /// Nobody listens on the socket (the VMM died without removing it).
    Dead,
    /// Something else went wrong (named in [`Row::error`]).
    Failed,
}

/// One VM of the listing; figures are `null` when the VM did not give them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Its id (the socket's name when it did not answer).
    pub id: String,
    /// Its socket.
    pub socket: PathBuf,
    /// Whether it answered.
    pub reach: Reach,
    /// Life-cycle state, as the API spells it.
    pub state: Option<String>,
    /// vCPUs configured.
    pub vcpus: Option<u8>,
    /// Memory configured, in MiB.
    pub mem_size_mib: Option<u64>,
    /// Memmap strategy.
    pub strategy: Option<Strategy>,
    /// Seconds since the VM started.
    pub uptime_s: Option<u64>,
    /// Memmap bytes the guest initialized.
    pub memmap_initialized_bytes: Option<u64>,
    /// Memmap bytes resident on the host.
    pub memmap_resident_bytes: Option<u64>,
    /// Guest RAM resident on the host.
    pub guest_ram_resident_bytes: Option<u64>,
    /// Guest RAM registered with KVM.
    pub kvm_registered_bytes: Option<u64>,
    /// The VMM process's PSS, without guest RAM.
    pub vmm_pss_bytes: Option<u64>,
    /// What went wrong, if it did not answer.
    pub error: Option<String>,
    /// The answers the row was made from, for the Prometheus exposition
    /// (not in `--json`, whose rows are the table's).
    #[serde(skip)]
    pub answers: Option<Box<Answers>>,
}

/// What a VM answered to `GET /metrics` and `GET /memory`.
#[derive(Clone, Debug, PartialEq)]
pub struct Answers {
    /// Its counters.
    pub metrics: Metrics,
    /// Its memory report.
    pub report: MemoryReport,
}

/// The sums over the rows that answered.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Rows in all.
    pub vms: usize,
    /// Rows that answered.
    pub answered: usize,
    /// Sum of [`Row::vcpus`].
    pub vcpus: u64,
    /// Sum of [`Row::mem_size_mib`].
    pub mem_size_mib: u64,
    /// Sum of [`Row::memmap_initialized_bytes`].
    pub memmap_initialized_bytes: u64,
    /// Sum of [`Row::memmap_resident_bytes`].
    pub memmap_resident_bytes: u64,
    /// Sum of [`Row::guest_ram_resident_bytes`].
    pub guest_ram_resident_bytes: u64,
    /// Sum of [`Row::kvm_registered_bytes`].
    pub kvm_registered_bytes: u64,
    /// Sum of [`Row::vmm_pss_bytes`].
    pub vmm_pss_bytes: u64,
}

impl Totals {
    /// The sums of `rows`.
    pub fn of(rows: &[Row]) -> Totals {
        let mut t = Totals { vms: rows.len(), ..Totals::default() };
        for r in rows {
            t.answered += usize::from(r.reach == Reach::Answered);
            let add = |sum: &mut u64, v: Option<u64>| *sum = sum.saturating_add(v.unwrap_or(0));
            add(&mut t.vcpus, r.vcpus.map(u64::from));
            add(&mut t.mem_size_mib, r.mem_size_mib);
            add(&mut t.memmap_initialized_bytes, r.memmap_initialized_bytes);
            add(&mut t.memmap_resident_bytes, r.memmap_resident_bytes);
            add(&mut t.guest_ram_resident_bytes, r.guest_ram_resident_bytes);
            add(&mut t.kvm_registered_bytes, r.kvm_registered_bytes);
            add(&mut t.vmm_pss_bytes, r.vmm_pss_bytes);
        }
        t
    }
}

/// Why a directory could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list {}", dir.display())]
pub struct ListSocketsError {
    dir: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The sockets in `dir`, by name. A directory that does not exist has none.
pub fn sockets(dir: &Path) -> Result<Vec<PathBuf>, ListSocketsError> {
    let err = |source| ListSocketsError { dir: dir.to_path_buf(), source };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(err)?;
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Asks every socket, at most [`MAX_WORKERS`] at once, each request with
/// `timeout`; the rows come in the order of `socks`.
pub fn query_all(socks: &[PathBuf], timeout: Duration) -> Vec<Row> {
    let next = AtomicUsize::new(0);
    let rows: Mutex<Vec<Option<Row>>> = Mutex::new(vec![None; socks.len()]);
    let workers = socks.len().clamp(1, MAX_WORKERS);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let client = Client::new().map(|c| c.with_timeout(timeout));
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(sock) = socks.get(i) else { break };
                    let row = match &client {
                        Ok(client) => query(client, sock),
                        Err(e) => failed(sock, Reach::Failed, api::ErrorChain(e).to_string()),
                    };
                    if let Ok(mut rows) = rows.lock() {
                        rows[i] = Some(row);
                    }
                }
            });
        }
    });
    rows.into_inner().unwrap_or_default().into_iter().flatten().collect()
}

/// One VM's row.
pub fn query(client: &Client, sock: &Path) -> Row {
    let answer = (|| {
        let status: InstanceStatus = client.get(sock, Endpoint::GetVmStatus)?;
        let config: MachineConfig = client.get(sock, Endpoint::GetMachineConfig)?;
        let report: MemoryReport = client.get(sock, Endpoint::GetMemory)?;
        let metrics: Metrics = client.get(sock, Endpoint::GetMetrics)?;
        Ok::<_, ClientError>((status, config, Answers { metrics, report }))
    })();
    match answer {
        Ok((status, config, answers)) => row(sock, &status, &config, answers, SystemTime::now()),
        Err(ClientError::Connect(_, e)) if e.kind() == ErrorKind::ConnectionRefused => {
            failed(sock, Reach::Dead, "connection refused: nobody listens on the socket".into())
        }
        Err(e @ ClientError::Timeout(_)) => failed(sock, Reach::NoAnswer, e.to_string()),
        Err(e) => failed(sock, Reach::Failed, api::ErrorChain(&e).to_string()),
    }
}

/// The row of a VM that answered, its uptime as of `now`.
pub fn row(sock: &Path, status: &InstanceStatus, config: &MachineConfig, answers: Answers, now: SystemTime) -> Row {
    let now_ms = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let report = &answers.report;
    let guest = report.guest.as_ref().filter(|_| report.valid);
    let host = &report.host;
    Row {
        id: status.id.clone(),
        socket: sock.to_path_buf(),
        reach: Reach::Answered,
        state: Some(status.state.to_string()),
        vcpus: Some(config.vcpu_count),
        mem_size_mib: Some(config.mem_size_mib),
        strategy: report.strategy.or(Some(config.memmap_init)),
        uptime_s: status
            .started_at_unix_ms
            .map(|t| u64::try_from(now_ms.saturating_sub(u128::from(t)) / 1000).unwrap_or(u64::MAX)),
        memmap_initialized_bytes: guest.map(|g| g.memmap_bytes_initialized),
        memmap_resident_bytes: Some(host.memmap_resident_bytes),
        guest_ram_resident_bytes: Some(host.guest_ram_resident_bytes),
        kvm_registered_bytes: Some(host.kvm_registered_bytes),
        vmm_pss_bytes: host.vmm_pss_bytes,
        error: None,
        answers: Some(Box::new(answers)),
    }
}

/// The row of a VM that did not answer.
fn failed(sock: &Path, reach: Reach, error: String) -> Row {
    let id = sock.file_name().map_or_else(|| sock.display().to_string(), |n| n.to_string_lossy().into_owned());
    Row { error: Some(error), ..Row::without_figures(id, sock, reach) }
}

impl Row {
    /// A row with its id, socket and reach, and no figures.
    pub fn without_figures(id: String, socket: &Path, reach: Reach) -> Row {
        Row {
            id,
            socket: socket.to_path_buf(),
            reach,
            state: None,
            vcpus: None,
            mem_size_mib: None,
            strategy: None,
            uptime_s: None,
            memmap_initialized_bytes: None,
            memmap_resident_bytes: None,
            guest_ram_resident_bytes: None,
            kvm_registered_bytes: None,
            vmm_pss_bytes: None,
            error: None,
            answers: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::VmState;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    fn answered(id: &str, pss: u64) -> Row {
        let mut status = InstanceStatus::new(id, VmState::Running);
        status.started_at_unix_ms = Some(1_000_000);
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_061_500);
        let mut report = MemoryReport::example();
        report.host.vmm_pss_bytes = Some(pss);
        let answers = Answers { metrics: Metrics::default(), report };
        row(Path::new("/r").join(id).as_path(), &status, &MachineConfig::default(), answers, now)
    }

    #[test]
    fn a_row_takes_the_figures_of_the_answers() {
        let r = answered("vm0", 5 << 20);
        assert_eq!(r.id, "vm0");
        assert_eq!((r.state.as_deref(), r.vcpus, r.mem_size_mib), (Some("Running"), Some(1), Some(2048)));
        assert_eq!(r.uptime_s, Some(61));
        assert_eq!(r.memmap_initialized_bytes, Some(2 << 20));
        assert_eq!(r.kvm_registered_bytes, Some(128 << 20));
        assert_eq!(r.strategy, Some(Strategy::OnDemand));
    }

    #[test]
    fn totals_add_what_answered() {
        let mut rows = vec![answered("a", 1 << 20), answered("b", 2 << 20)];
        rows.push(failed(Path::new("/r/c"), Reach::Dead, "refused".into()));
        let t = Totals::of(&rows);
        assert_eq!((t.vms, t.answered, t.vcpus, t.mem_size_mib), (3, 2, 2, 4096));
        assert_eq!(t.vmm_pss_bytes, 3 << 20);
        assert_eq!(t.memmap_initialized_bytes, 4 << 20);
        assert_eq!(rows[2].id, "c");
    }

    #[test]
    fn dead_and_silent_sockets_are_rows_and_do_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        // A socket nobody listens on any more.
        let dead = tmp.path().join("dead");
        drop(UnixListener::bind(&dead).unwrap());
        // One that accepts and never answers.
        let silent = tmp.path().join("silent");
        let _listener = UnixListener::bind(&silent).unwrap();
        std::fs::write(tmp.path().join("not-a-socket"), "").unwrap();
        let socks = sockets(tmp.path()).unwrap();
        assert_eq!(socks, vec![dead.clone(), silent.clone()]);
        let start = Instant::now();
        let rows = query_all(&socks, Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(rows[0].reach, Reach::Dead, "{rows:?}");
        assert_eq!(rows[1].reach, Reach::NoAnswer, "{rows:?}");
        assert_eq!(rows[1].id, "silent");
        assert!(sockets(&tmp.path().join("missing")).unwrap().is_empty());
    }
}

//! Firecracker compatibility: a real `vmm serve` process driven with the
//! request sequence a Firecracker client sends to boot a microVM (machine
//! configuration, boot source, logger, metrics, InstanceStart, pause and
//! resume twice each, version, exported config, FlushMetrics, Ctrl-Alt-Del),
//! each answer checked against the status and body shape of Firecracker's
//! published API (swagger 1.17) and its API server's behaviour.
//!
//! The client is a few lines of HTTP/1.1 over the Unix socket, so the tests
//! see the raw status line and body (a 204 must have no body at all).

mod common;

use common::{embedded_kernel_path, wait_for, Served};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A `vmm serve` process ([`common::Served`]).
struct Vmm(Served);

impl std::ops::Deref for Vmm {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.0
    }
}

impl Vmm {
    fn serve() -> Vmm {
        Vmm(Served::start("fc", "firecracker.socket", &["serve", "--serial", "none"]))
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        request(&self.sock, method, path, body.map(|b| b.to_string()).as_deref())
    }

    fn wait(&mut self) -> i32 {
        self.0.wait()
    }
}

/// An answer off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Asserts Firecracker's 204: no body.
    #[track_caller]
    fn no_content(&self) {
        assert_eq!((self.status, self.body.as_str()), (204, ""), "{self:?}");
    }

    /// Asserts an error with Firecracker's body, `{"fault_message": "..."}`,
    /// and returns the message.
    #[track_caller]
    fn fault(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let v = self.json();
        assert_eq!(keys(&v), ["fault_message"], "{v}");
        let msg = v["fault_message"].as_str().unwrap().to_string();
        assert!(!msg.is_empty());
        msg
    }
}

/// One request on its own connection (`Connection: close`).
fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n");
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    // A server that refuses a body without reading it may reset the
    // connection once it has answered: keep what arrived before that.
    let _ = s.write_all(req.as_bytes());
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = s.read(&mut buf) {
        bytes.extend_from_slice(&buf[..n]);
    }
    let out = String::from_utf8_lossy(&bytes);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Answer { status, body: body.to_string() }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}


fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo is needed for these tests");
    assert!(st.success());
}

#[test]
fn a_firecracker_client_boots_pauses_resumes_flushes_and_stops_a_257_mib_guest() {
    let vm = Vmm::serve();
    let log_path = vm.dir.path().join("log");
    std::fs::write(&log_path, "").unwrap();
    let metrics_path = vm.dir.path().join("metrics.fifo");
    mkfifo(&metrics_path);
    // A reader of the metrics FIFO, as Firecracker users run one.
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let fifo = metrics_path.clone();
    std::thread::spawn(move || {
        let reader = BufReader::new(std::fs::File::open(fifo).unwrap());
        for line in reader.lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // GET /: InstanceInfo, exactly Firecracker's four keys.
    let a = vm.call("GET", "/", None);
    assert_eq!(a.status, 200, "{a:?}");
    let info = a.json();
    assert_eq!(keys(&info), ["app_name", "id", "state", "vmm_version"]);
    assert_eq!(info["state"], "Not started");
    assert!(info["app_name"].is_string() && info["id"].is_string() && info["vmm_version"].is_string());

    // GET /version: FirecrackerVersion.
    let a = vm.call("GET", "/version", None);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(keys(&a.json()), ["firecracker_version"]);
    assert_eq!(a.json()["firecracker_version"], info["vmm_version"]);

    // PUT /machine-config: MachineConfiguration with every Firecracker field;
    // an odd size works.
    vm.call(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 257, "smt": false, "track_dirty_pages": false,
                    "cpu_template": "None", "huge_pages": "None"})),
    )
    .no_content();
    let a = vm.call("GET", "/machine-config", None);
    assert_eq!(a.status, 200, "{a:?}");
    let mc = a.json();
    for (k, v) in [("vcpu_count", json!(2)), ("mem_size_mib", json!(257)), ("smt", json!(false)),
                   ("track_dirty_pages", json!(false)), ("huge_pages", json!("None"))] {
        assert_eq!(mc[k], v, "{k}: {mc}");
    }
    // Required fields are required; a value that cannot be honoured is a 400
    // that says so; PATCH changes part of it.
    assert!(vm.call("PUT", "/machine-config", Some(json!({"vcpu_count": 2}))).fault(400).contains("mem_size_mib"));
    assert!(vm.call("PUT", "/machine-config", Some(json!({"mem_size_mib": 128}))).fault(400).contains("vcpu_count"));
    let msg = vm.call("PATCH", "/machine-config", Some(json!({"smt": true}))).fault(400);
    assert!(msg.contains("smt") && msg.contains("not supported by this VMM"), "{msg}");
    vm.call("PATCH", "/machine-config", Some(json!({"vcpu_count": 1}))).no_content();
    vm.call("PATCH", "/machine-config", Some(json!({"vcpu_count": 2}))).no_content();
    assert_eq!(vm.call("GET", "/machine-config", None).json()["mem_size_mib"], 257, "PATCH keeps the rest");

    // PUT /boot-source: the kernel file is checked here.
    let msg = vm.call("PUT", "/boot-source", Some(json!({"kernel_image_path": "/nonexistent/vmlinux"}))).fault(400);
    assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
    vm.call(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": embedded_kernel_path(), "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"})),
    )
    .no_content();

    // PUT /logger and PUT /metrics.
    vm.call(
        "PUT",
        "/logger",
        Some(json!({"log_path": log_path, "level": "Info", "show_level": true, "show_log_origin": false})),
    )
    .no_content();
    vm.call("PUT", "/metrics", Some(json!({"metrics_path": metrics_path}))).no_content();
    let msg = vm.call("PUT", "/metrics", Some(json!({"metrics_path": vm.dir.path().join("none")}))).fault(400);
    assert!(msg.starts_with("invalid metrics_path"), "{msg}");

    // InstanceStart.
    vm.call("PUT", "/actions", Some(json!({"action_type": "InstanceStart"}))).no_content();
    assert_eq!(vm.call("GET", "/", None).json()["state"], "Running");
    // Configuration is pre-boot only (Firecracker: 400; here 409, also a fault).
    let a = vm.call("PUT", "/machine-config", Some(json!({"vcpu_count": 1, "mem_size_mib": 128})));
    assert!((400..500).contains(&a.status), "{a:?}");
    a.fault(a.status);

    // The guest boots with all 257 MiB.
    let mut report = Value::Null;
    wait_for(
        || {
            let a = vm.call("GET", "/memory", None);
            report = a.json();
            a.status == 200 && report["timings"]["guest_ready"].is_number()
        },
        "the guest to be ready",
    );
    assert_eq!(report["valid"], true, "{report}");
    assert_eq!(report["host"]["guest_ram_bytes"], 257 * MIB);

    // PATCH /vm: Paused twice, Resumed twice, all 204 (idempotent).
    for (target, state) in [("Paused", "Paused"), ("Paused", "Paused"), ("Resumed", "Running"), ("Resumed", "Running")] {
        vm.call("PATCH", "/vm", Some(json!({"state": target}))).no_content();
        assert_eq!(vm.call("GET", "/", None).json()["state"], state);
    }

    // GET /vm/config: FullVmConfiguration.
    let a = vm.call("GET", "/vm/config", None);
    assert_eq!(a.status, 200, "{a:?}");
    let cfg = a.json();
    assert_eq!(keys(&cfg), ["boot-source", "drives", "logger", "machine-config", "metrics", "network-interfaces"]);
    assert_eq!(cfg["drives"], json!([]));
    assert_eq!(cfg["network-interfaces"], json!([]));
    assert_eq!(cfg["boot-source"]["kernel_image_path"], embedded_kernel_path());
    assert_eq!(cfg["boot-source"]["boot_args"], "console=ttyS0 reboot=k panic=1 pci=off");
    assert_eq!(cfg["machine-config"], mc);
    assert_eq!(cfg["logger"]["log_path"], log_path.to_str().unwrap());
    assert_eq!(cfg["metrics"], json!({"metrics_path": metrics_path}));

    // FlushMetrics: one JSON line of the counters on the FIFO.
    vm.call("PUT", "/actions", Some(json!({"action_type": "FlushMetrics"}))).no_content();
    let line = lines.recv_timeout(Duration::from_secs(30)).expect("a metrics line");
    let m: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(m["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000, "{m}");
    assert!(m["api_requests"].as_u64().unwrap() >= 20, "{m}");
    assert!(m["vm_exits"]["io_out"].as_u64().unwrap() > 0, "{m}");
    let counters = vm.call("GET", "/metrics", None).json();
    let mut line_keys = keys(&m);
    line_keys.retain(|k| *k != "utc_timestamp_ms");
    assert_eq!(line_keys, keys(&counters), "the line carries the counters of GET /metrics");

    // Endpoints this VMM does not have: 400, and the message says so.
    for (method, path, body) in [
        ("PUT", "/drives/rootfs", json!({"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": true, "is_read_only": false})),
        ("PUT", "/network-interfaces/eth0", json!({"iface_id": "eth0", "host_dev_name": "tap0"})),
        ("PUT", "/vsock", json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"})),
        ("PUT", "/mmds", json!({})),
        ("PUT", "/mmds/config", json!({"network_interfaces": ["eth0"]})),
        ("PUT", "/snapshot/create", json!({"snapshot_path": "/s", "mem_file_path": "/m"})),
        ("PUT", "/snapshot/load", json!({"snapshot_path": "/s", "mem_file_path": "/m"})),
        ("PUT", "/balloon", json!({"amount_mib": 0, "deflate_on_oom": false})),
        ("PUT", "/entropy", json!({})),
        ("PUT", "/cpu-config", json!({})),
    ] {
        let msg = vm.call(method, path, Some(body)).fault(400);
        assert!(msg.starts_with(&format!("{method} {path} is not supported by this VMM")), "{msg}");
    }
    let msg = vm.call("GET", "/balloon/statistics", None).fault(400);
    assert!(msg.contains("balloon"), "{msg}");

    // SendCtrlAltDel: the guest shuts down and the process exits 0.
    vm.call("PUT", "/actions", Some(json!({"action_type": "SendCtrlAltDel"}))).no_content();
    let mut vm = vm;
    assert_eq!(vm.wait(), 0);
    assert!(!vm.sock.exists(), "the socket is removed");
    check_log(&std::fs::read_to_string(&log_path).unwrap(), info["id"].as_str().unwrap());
}

/// The log file has Firecracker-style lines (`TIME [ID:THREAD:LEVEL] msg`)
/// for the requests and the life cycle, and nothing for what came before
/// the logger was set.
fn check_log(log: &str, id: &str) {
    assert!(!log.is_empty(), "the log is empty");
    for line in log.lines() {
        let (ts, rest) = line.split_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert_eq!(ts.len(), "2026-01-01T00:00:00.000000000".len(), "{line}");
        assert!(rest.starts_with(&format!("[{id}:")), "{line}");
        assert!(rest.contains(":INFO] ") || rest.contains(":WARNING] "), "{line}");
    }
    for want in ["logger configured", "API PUT /metrics: 204", "API PUT /actions: 204", "VM started: 2 vCPUs, 257 MiB",
                 "VM paused", "VM resumed", "guest ready", "VM Halted"] {
        assert!(log.contains(want), "{want:?} missing from the log:\n{log}");
    }
    assert!(!log.contains("PUT /boot-source"), "lines from before PUT /logger:\n{log}");
}

#[test]
fn errors_and_limits_before_start() {
    let vm = Vmm::serve();
    // Actions and state changes that need a running VM are faults.
    for (method, path, body) in [
        ("PATCH", "/vm", json!({"state": "Paused"})),
        ("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"})),
    ] {
        let a = vm.call(method, path, Some(body));
        assert!((400..500).contains(&a.status), "{a:?}");
        a.fault(a.status);
    }
    // FlushMetrics without a metrics file: Firecracker answers 204.
    vm.call("PUT", "/actions", Some(json!({"action_type": "FlushMetrics"}))).no_content();
    // Malformed bodies: 400.
    assert!(vm.call("PUT", "/machine-config", None).fault(400).contains("needs a JSON body"));
    let a = request(&vm.sock, "PUT", "/machine-config", Some("{not json"));
    a.fault(400);
    let msg = vm.call("PUT", "/machine-config", Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": true}))).fault(400);
    assert!(msg.contains("huge_pages"), "{msg}");
    let msg = vm.call("PUT", "/machine-config", Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}))).fault(400);
    assert!(msg.contains("cpu_template T2 is not supported by this VMM"), "{msg}");
    let msg = vm.call("PUT", "/machine-config", Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}))).fault(400);
    assert!(msg.contains("track_dirty_pages"), "{msg}");
    let msg = vm.call("PUT", "/boot-source", Some(json!({"kernel_image_path": embedded_kernel_path(), "initrd_path": "/initrd"}))).fault(400);
    assert!(msg.contains("initrd_path is not supported"), "{msg}");
    let msg = vm.call("PUT", "/logger", Some(json!({"log_path": "/nonexistent/dir/log"}))).fault(400);
    assert!(msg.contains("must be an existing file or FIFO"), "{msg}");
    assert!(!Path::new("/nonexistent/dir/log").exists());
    // Logger levels are case-insensitive, as in Firecracker; no path is fine.
    vm.call("PUT", "/logger", Some(json!({"level": "warn"}))).no_content();
    assert_eq!(vm.call("GET", "/vm/config", None).json()["logger"], json!({"level": "Warning"}));
    // A body of Firecracker's maximum size is read; one byte more is refused.
    let pad = |n: usize| format!("{{\"vcpu_count\": 1, \"mem_size_mib\": 128}}{}", " ".repeat(n));
    let base = pad(0).len();
    request(&vm.sock, "PUT", "/machine-config", Some(&pad(51_200 - base))).no_content();
    let a = request(&vm.sock, "PUT", "/machine-config", Some(&pad(51_201 - base)));
    assert!(a.fault(413).contains("at most 51200"), "{a:?}");
    // Nothing changed the state; the extension endpoint has the details.
    let status = vm.call("GET", "/vm/status", None).json();
    assert_eq!(status["state"], "Not started");
    assert_eq!(status["started"], false);
    vm.call("PUT", "/actions", Some(json!({"action_type": "Shutdown"}))).no_content();
    let mut vm = vm;
    assert_eq!(vm.wait(), 0);
}

//! Hostile API clients against a real `vmm serve`: a thousand idle
//! connections, keep-alive clients that hold their connections with a
//! request now and then, JSON arrays read as positional structs, and kernel
//! paths that would block (a FIFO) or never end (`/dev/zero`). Each test
//! asserts the VMM keeps answering everyone else.

mod common;

use common::{vmm, Served, TempDir};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_client::{fault_message, Client};

/// A liveness deadline, far above what the server needs (the issue asks
/// for 1 s; these machines are shared, so the test only fails on a lockout).
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

fn serve() -> Served {
    Served::start("hostile", "vmm.sock", &["serve", "--serial", "none"])
}

/// Raises this process's soft limit on open files to at least `n` (up to
/// the hard limit), so that the test can hold `n` connections.
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the call's duration.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur < n {
        lim.rlim_cur = n.min(lim.rlim_max);
        // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the
        // hard limit needs no privilege.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
    assert!(lim.rlim_cur >= n, "RLIMIT_NOFILE hard limit {} is below {n}", lim.rlim_max);
}

/// A `GET /` on a fresh connection: its status and how long the answer took.
fn timed_get(sock: &Path) -> (u16, Duration) {
    let client = Client::new().unwrap().with_timeout(ANSWER_DEADLINE * 3);
    let t = Instant::now();
    let (code, _) = client.request(sock, "GET", "/", None).unwrap_or_else(|e| panic!("GET / failed: {e}"));
    (code, t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn a_thousand_idle_clients_do_not_lock_out_a_new_one() {
    raise_nofile(1200);
    let s = serve();
    let idle: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&s.sock).unwrap()).collect();
    let mut times = Vec::new();
    for _ in 0..5 {
        let (code, took) = timed_get(&s.sock);
        assert_eq!(code, 200);
        assert!(took < ANSWER_DEADLINE, "GET / took {took:?} with 1,000 idle clients");
        times.push(took);
    }
    eprintln!("GET / with 1,000 idle clients: median {:?}, max {:?}", median(times.clone()), times.iter().max().unwrap());
    drop(idle);
}

#[test]
fn keep_alive_clients_that_hold_their_connections_do_not_lock_out_a_new_one() {
    raise_nofile(600);
    let s = serve();
    let sock = s.sock.clone();
    let stop = Arc::new(AtomicBool::new(false));
    // 256 keep-alive connections (twice the cap), each sending a GET in
    // turn and reconnecting when closed, for as long as the test runs.
    let hog = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let connect = || {
                let c = UnixStream::connect(&sock).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c
            };
            let mut conns: Vec<UnixStream> = (0..256).map(|_| connect()).collect();
            let mut buf = [0u8; 4096];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for c in conns.iter_mut() {
                    let ok = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_ok()
                        && matches!(c.read(&mut buf), Ok(n) if n > 0);
                    if !ok {
                        *c = connect();
                    }
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::new();
    for _ in 0..5 {
        let (code, took) = timed_get(&s.sock);
        assert_eq!(code, 200);
        assert!(took < ANSWER_DEADLINE, "GET / took {took:?} with 256 keep-alive clients");
        times.push(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = hog.join().unwrap();
    assert!(sent > 256, "the hogs ran");
    eprintln!("GET / with 256 keep-alive hogs ({sent} hog requests): median {:?}, max {:?}", median(times.clone()), times.iter().max().unwrap());
}

#[test]
fn json_arrays_are_not_read_as_positional_structs() {
    let s = serve();
    let client = Client::new().unwrap();
    for (path, body) in [("/actions", json!(["Shutdown"])), ("/machine-config", json!([4, 512]))] {
        let (code, v) = client.request(&s.sock, "PUT", path, Some(&body)).unwrap();
        assert_eq!(code, 400, "PUT {path} {body}: {v}");
        assert!(fault_message(&v).contains("must be a JSON object"), "{v}");
    }
    let (_, cfg) = client.request(&s.sock, "GET", "/machine-config", None).unwrap();
    assert_eq!(cfg["vcpu_count"], 1, "{cfg}");
    let (code, v) = client.request(&s.sock, "GET", "/", None).unwrap();
    assert_eq!((code, v["state"].as_str()), (200, Some("Not started")), "still serving, not shut down");
}

/// Paths that are no regular file of at most 64 MiB, and the message each gets.
fn bad_kernels(dir: &TempDir) -> Vec<(String, &'static str)> {
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let big = dir.path().join("big");
    std::fs::File::create(&big).unwrap().set_len((64 << 20) + 1).unwrap();
    vec![
        (fifo.display().to_string(), "is not a regular file"),
        ("/dev/zero".into(), "is not a regular file"),
        (dir.path().display().to_string(), "is not a regular file"),
        (big.display().to_string(), "a kernel image may have at most 67108864"),
    ]
}

#[test]
fn kernel_paths_that_would_block_or_never_end_are_refused() {
    let dir = TempDir::new("hostile-kernel");
    let s = serve();
    let client = Client::new().unwrap().with_timeout(ANSWER_DEADLINE);
    for (path, why) in bad_kernels(&dir) {
        let body = json!({ "kernel_image_path": path });
        let t = Instant::now();
        let (code, v) = client.request(&s.sock, "PUT", "/boot-source", Some(&body)).unwrap();
        assert_eq!(code, 400, "{path}: {v}");
        assert!(fault_message(&v).contains(why), "{path}: {v}");
        assert!(t.elapsed() < ANSWER_DEADLINE);
    }
    let (code, _) = client.request(&s.sock, "GET", "/", None).unwrap();
    assert_eq!(code, 200);
    // The same paths on the command line: a usage error (2), at once.
    for (path, why) in bad_kernels(&TempDir::new("hostile-kernel-cli")) {
        let o = vmm(&["run", "--no-api", "--serial", "none", "--kernel", &path]);
        o.assert_code(2);
        assert!(o.stderr.contains(why), "{path}: {o}");
    }
}

/// `vmm serve --keep-serving`: after the guest stops, the API answers with
/// state Halted (or Failed) and the stop's exit code, until Shutdown.
fn stops_and_stays(workload: &str) -> (serde_json::Value, i32) {
    let mut s = Served::start("hostile-stay", "vmm.sock", &["serve", "--serial", "none", "--keep-serving"]);
    let client = Client::new().unwrap();
    let put = |path: &str, body: serde_json::Value| {
        let (code, v) = client.request(&s.sock, "PUT", path, Some(&body)).unwrap();
        assert_eq!(code, 204, "PUT {path}: {v}");
    };
    put("/machine-config", json!({"vcpu_count": 1, "mem_size_mib": 64}));
    put("/boot-source", json!({"boot_args": format!("workload={workload}")}));
    put("/actions", json!({"action_type": "InstanceStart"}));
    let mut status = serde_json::Value::Null;
    common::wait_for(
        || {
            status = client.request(&s.sock, "GET", "/vm/status", None).unwrap().1;
            matches!(status["state"].as_str(), Some("Halted" | "Failed"))
        },
        "the guest to stop",
    );
    // Still serving: the stopped VM refuses what needs a running one.
    let (code, v) = client.request(&s.sock, "PATCH", "/vm", Some(&json!({"state": "Paused"}))).unwrap();
    assert_eq!(code, 409, "{v}");
    put("/actions", json!({"action_type": "Shutdown"}));
    (status, s.wait())
}

#[test]
fn a_served_vm_that_stops_is_observable_until_shutdown() {
    let (status, code) = stops_and_stays("exit");
    assert_eq!(status["state"], "Halted", "{status}");
    assert_eq!(status["exit_code"], 0, "{status}");
    assert!(status["failure_reason"].is_null(), "{status}");
    assert_eq!(code, 0);
    let (status, code) = stops_and_stays("panic");
    assert_eq!(status["state"], "Failed", "{status}");
    assert!(status["failure_reason"].as_str().is_some_and(|r| !r.is_empty()), "{status}");
    assert_eq!(status["exit_code"], code, "{status}: the process exits with the code it reported");
    assert_ne!(code, 0);
}

#[test]
fn a_machine_too_small_to_boot_is_refused_before_start() {
    let s = serve();
    let client = Client::new().unwrap();
    for mib in [2, 4] {
        let body = json!({"vcpu_count": 1, "mem_size_mib": mib});
        let (code, v) = client.request(&s.sock, "PUT", "/machine-config", Some(&body)).unwrap();
        assert_eq!(code, 400, "{v}");
        assert!(fault_message(&v).contains("at least 5 MiB"), "{v}");
    }
    // The smallest accepted size boots.
    let o = vmm(&["run", "--no-api", "--serial", "none", "--mem-mib", "5", "--cmdline", "workload=exit"]);
    o.assert_code(0);
}

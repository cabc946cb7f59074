//! Control-API integration tests: a real `vmm serve` / `vmm run --api-sock`
//! process, a real socket, a real booted guest, driven with `curl` and with
//! `vmm ctl`.

mod common;

use common::{curl, vmm, vmm_path, wait_for, Served, TempDir};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

/// A VMM process serving the API ([`common::Served`]).
struct Server(Served);

impl std::ops::Deref for Server {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.0
    }
}

impl Server {
    fn start(args: &[&str]) -> Server {
        Server(Served::start("api", "vmm.sock", args))
    }

    fn serve() -> Server {
        Server::start(&["serve", "--serial", "none"])
    }

    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        curl(&self.sock, method, path, body)
    }

    fn wait(mut self) -> i32 {
        self.0.wait()
    }
}


fn ctl(sock: &Path, args: &[&str]) -> (i32, Value, String) {
    let mut a = vec!["ctl", "--api-sock", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    let o = vmm(&a);
    let v = serde_json::from_str(o.stdout.trim()).unwrap_or(Value::Null);
    (o.code.unwrap_or(-1), v, o.stderr)
}

fn wait_ready(sock: &Path) -> Value {
    let mut report = Value::Null;
    wait_for(
        || {
            let (code, v) = curl(sock, "GET", "/memory", None);
            report = v;
            code == 200 && report["timings"]["guest_ready"].is_number()
        },
        "the guest to be ready",
    );
    report
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("{path} missing in {v}"))
}

#[test]
fn full_lifecycle_serve_configure_start_memory_pause_resume_shutdown() {
    let s = Server::serve();
    assert_eq!(std::fs::metadata(&s.sock).unwrap().permissions().mode() & 0o777, 0o600);

    let (code, info) = s.curl("GET", "/", None);
    assert_eq!(code, 200);
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "vmm");
    assert!(info["vmm_version"].is_string());
    // The extension data GET / leaves out.
    let (code, status) = s.curl("GET", "/vm/status", None);
    assert_eq!(code, 200);
    assert_eq!(status, json!({"id": info["id"], "state": "Not started", "started": false, "exit_code": null, "failure_reason": null, "started_at_unix_ms": null}));

    // Configure before start: PUT replaces (vcpu_count and mem_size_mib
    // required), PATCH changes some fields.
    let (code, _) = s.curl("PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 512, "memmap_init": "eager"}"#));
    assert_eq!(code, 204);
    let (code, _) = s.curl("PATCH", "/machine-config", Some(r#"{"vcpu_count": 1, "memmap_init": "ondemand"}"#));
    assert_eq!(code, 204);
    let (code, _) = s.curl("PUT", "/boot-source", Some(r#"{"boot_args": "quiet"}"#));
    assert_eq!(code, 204);
    let (_, cfg) = s.curl("GET", "/machine-config", None);
    assert_eq!((&cfg["vcpu_count"], &cfg["mem_size_mib"], &cfg["memmap_init"]), (&json!(1), &json!(512), &json!("ondemand")));
    // Before start the report says it is not valid (as the spec promises).
    let (code, e) = s.curl("GET", "/memory", None);
    assert_eq!((code, &e["valid"], &e["guest"]), (200, &json!(false), &Value::Null), "{e}");
    assert!(e["invalid_reason"].as_str().unwrap().contains("not started"), "{e}");

    let (code, _) = s.curl("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(code, 204);
    let before = wait_ready(&s.sock);
    assert_eq!(before["valid"], true, "{before}");
    assert_eq!(u(&before, "/host/guest_ram_bytes"), 512 * MIB);

    // Not after start.
    let (code, e) = s.curl("PATCH", "/machine-config", Some(r#"{"vcpu_count": 2}"#));
    assert_eq!(code, 409);
    assert!(e["fault_message"].as_str().unwrap().contains("Running"), "{e}");
    let (code, _) = s.curl("PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 512}"#));
    assert_eq!(code, 409);
    assert_eq!(s.curl("GET", "/vm/status", None).1["started"], true);
    let (code, _) = s.curl("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(code, 409);

    // Grow the guest's memory with vmm ctl; the answer comes when it is done.
    let (code, st, err) = ctl(&s.sock, &["set-memory", "128"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(st["status"], "Ok", "{st}");
    assert_eq!(u(&st, "/held_bytes"), 128 * MIB);
    let (_, after) = s.curl("GET", "/memory", None);
    let grown = u(&after, "/guest/memmap_bytes_initialized") - u(&before, "/guest/memmap_bytes_initialized");
    assert!((2 * MIB..=2 * MIB + (32 << 10)).contains(&grown), "grew {grown}");
    let (_, gm) = s.curl("GET", "/guest/memory", None);
    assert_eq!(gm["status"], "Ok");

    // Pause and resume.
    let (code, _, _) = ctl(&s.sock, &["pause"]);
    assert_eq!(code, 0);
    assert_eq!(s.curl("GET", "/", None).1["state"], "Paused");
    let (code, e) = s.curl("PUT", "/guest/memory", Some(r#"{"target_mib": 64}"#));
    assert_eq!(code, 409, "{e}");
    // Pausing a paused VM changes nothing (as in Firecracker).
    let (code, _) = s.curl("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(code, 204);
    assert_eq!(s.curl("GET", "/", None).1["state"], "Paused");
    let (code, _, _) = ctl(&s.sock, &["resume"]);
    assert_eq!(code, 0);
    assert_eq!(s.curl("GET", "/", None).1["state"], "Running");
    // Shrinking works after resume.
    let (_, st) = s.curl("PUT", "/guest/memory", Some(r#"{"target_mib": 64}"#));
    assert_eq!(u(&st, "/held_bytes"), 64 * MIB, "{st}");

    let (code, m) = s.curl("GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(u(&m, "/api_requests") >= 10, "{m}");
    assert!(u(&m, "/vm_exits/io_in") >= 1, "{m}");

    let (code, _, _) = ctl(&s.sock, &["shutdown"]);
    assert_eq!(code, 0);
    let sock = s.sock.clone();
    assert_eq!(s.wait(), 0);
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn every_error_status_has_a_fault_message() {
    let s = Server::serve();
    let cases: [(&str, &str, Option<&str>, u16); 11] = [
        ("GET", "/nope", None, 404),
        ("DELETE", "/machine-config", None, 405),
        ("PUT", "/machine-config", Some("{not json"), 400),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 512, "color": "red"}"#), 400),
        ("PUT", "/machine-config", Some(r#"{"mem_size_mib": 512}"#), 400),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 3, "huge_pages": "2M"}"#), 400),
        ("PATCH", "/machine-config", Some(r#"{"smt": true}"#), 400),
        ("PUT", "/drives/rootfs", Some(r#"{"drive_id": "rootfs"}"#), 400),
        ("PUT", "/logger", Some(r#"{"log_path": "/nonexistent/log.fifo"}"#), 400),
        ("PUT", "/guest/memory", Some(r#"{"target_mib": 10}"#), 409),
        ("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 409),
    ];
    for (method, path, body, status) in cases {
        let (code, v) = s.curl(method, path, body);
        assert_eq!(code, status, "{method} {path}: {v}");
        let msg = v["fault_message"].as_str().unwrap_or_else(|| panic!("no fault_message: {v}"));
        assert!(!msg.is_empty());
    }
    // An oversized body: 413.
    let big = format!(r#"{{"boot_args": "{}"}}"#, "x".repeat(64 * 1024));
    let (code, v) = s.curl("PUT", "/boot-source", Some(&big));
    assert_eq!(code, 413, "{v}");
    // A kernel that does not exist: refused at the PUT, as Firecracker does.
    let (code, v) = s.curl("PUT", "/boot-source", Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#));
    assert_eq!(code, 400, "{v}");
    assert_eq!(
        v["fault_message"],
        "invalid kernel_image_path: /nonexistent/vmlinux does not exist or cannot be reached: No such file or directory (os error 2)"
    );
    let (code, v) = s.curl("PUT", "/boot-source", Some(r#"{"kernel_image_path": "/tmp"}"#));
    assert_eq!(code, 400, "{v}");
    assert!(v["fault_message"].as_str().unwrap().contains("/tmp is not a regular file"), "{v}");
    let (_, cfg) = s.curl("GET", "/vm/config", None);
    assert_eq!(cfg["boot-source"], json!({}), "nothing was kept");
    assert_eq!(s.curl("GET", "/", None).1["state"], "Not started");
}

#[test]
fn a_client_that_disconnects_mid_body_harms_nothing() {
    let s = Server::serve();
    {
        let mut c = UnixStream::connect(&s.sock).unwrap();
        c.write_all(b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mem_si").unwrap();
        // Dropped here, half-way through the body.
    }
    {
        let mut c = UnixStream::connect(&s.sock).unwrap();
        c.write_all(b"GET / HT").unwrap();
    }
    let (code, v) = s.curl("GET", "/", None);
    assert_eq!(code, 200, "{v}");
    let (code, _) = s.curl("GET", "/machine-config", None);
    assert_eq!(code, 200);
}

#[test]
fn fifty_concurrent_clients_read_memory_while_the_guest_allocates() {
    let s = Server::start(&["run", "--serial", "none", "--mem-mib", "1024"]);
    wait_ready(&s.sock);
    let sock = s.sock.clone();
    let alloc = std::thread::spawn(move || curl(&sock, "PUT", "/guest/memory", Some(r#"{"target_mib": 512}"#)));
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let sock = s.sock.clone();
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&sock).unwrap();
                c.write_all(b"GET /memory HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                out
            })
        })
        .collect();
    for r in readers {
        let out = r.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["valid"], true, "{v}");
    }
    let (code, st) = alloc.join().unwrap();
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["status"], "Ok");
}

#[test]
fn growing_to_512_mib_grows_the_memmap_by_8_mib_under_ondemand_and_not_under_eager() {
    for (strategy, expect_growth) in [("ondemand", true), ("eager", false)] {
        let s = Server::start(&["run", "--serial", "none", "--memmap-init", strategy]);
        let before = wait_ready(&s.sock);
        let (code, st) = s.curl("PUT", "/guest/memory", Some(&json!({"target_mib": 512}).to_string()));
        assert_eq!(code, 200, "{st}");
        let after = &st["report"];
        let guest = u(after, "/guest/memmap_bytes_initialized") - u(&before, "/guest/memmap_bytes_initialized");
        let host = u(after, "/host/memmap_resident_bytes") as i64 - u(&before, "/host/memmap_resident_bytes") as i64;
        if expect_growth {
            assert!((8 * MIB..=8 * MIB + (32 << 10)).contains(&guest), "{strategy}: guest grew {guest}");
            assert!((host - (8 * MIB) as i64).abs() <= 64 << 10, "{strategy}: host grew {host}");
        } else {
            assert_eq!(guest, 0, "{strategy}");
            assert!(host.abs() <= 4096, "{strategy}: host grew {host}");
        }
        let (code, _) = s.curl("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
        assert_eq!(code, 204);
        assert_eq!(s.wait(), 0);
    }
}

#[test]
fn stale_sockets_are_replaced_and_other_files_refused() {
    let dir = TempDir::new("sock");
    let path = dir.path().join("x.sock");
    // A stale socket (bound, nobody listening).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut child = Command::new(vmm_path())
        .args(["serve", "--serial", "none", "--api-sock", path.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| UnixStream::connect(&path).is_ok(), "the replaced socket");
    let (code, _) = curl(&path, "PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#));
    assert_eq!(code, 204);
    assert!(child.wait().unwrap().success());
    assert!(!path.exists());

    let file = dir.path().join("plain");
    std::fs::write(&file, "keep me").unwrap();
    let o = vmm(&["serve", "--api-sock", file.to_str().unwrap()]);
    o.assert_code(2);
    assert!(o.stderr.contains("not a socket"), "{o}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn sigterm_stops_the_vm_and_removes_the_socket() {
    let s = Server::start(&["run", "--serial", "none", "--mem-mib", "256"]);
    wait_ready(&s.sock);
    // SAFETY: signals the child process this test started, by its PID.
    unsafe { libc_kill(s.child.id() as i32, 15) };
    let sock = s.sock.clone();
    assert_eq!(s.wait(), 0);
    assert!(!sock.exists());
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn ctl_without_a_server_says_how_to_fix_it() {
    let (code, _, err) = ctl(Path::new("/nonexistent/vmm.sock"), &["info"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot connect"), "{err}");
}

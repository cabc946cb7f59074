//! Operator integration tests: VMs found in a runtime directory by their id
//! (`vmm run --runtime-dir D --id X`), `--no-api`, and the summary that
//! opens `vmm ctl memory --human`, on real booted guests.

mod common;

use common::{vmm, vmm_path, TempDir};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a VM gets to come up or go away.
const PATIENCE: Duration = Duration::from_secs(30);

/// An idle `vmm run` in a runtime directory; killed on drop.
struct IdleVm {
    child: Child,
    sock: PathBuf,
}

impl IdleVm {
    /// Boots `vmm run --runtime-dir dir --id id` plus `extra` and waits
    /// until its guest is ready.
    fn start(dir: &Path, id: &str, extra: &[&str]) -> IdleVm {
        let child = Command::new(vmm_path())
            .args(["run", "--serial", "none", "--runtime-dir"])
            .arg(dir)
            .args(["--id", id])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let vm = IdleVm { child, sock: dir.join(id) };
        until("the guest to be ready", || {
            memory_json(&vm.sock).is_some_and(|r| r["timings"]["guest_ready"].is_number())
        });
        vm
    }
}

impl Drop for IdleVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` until it holds; fails the test after [`PATIENCE`].
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `GET /memory` through `vmm ctl`, if the VM answers.
fn memory_json(sock: &Path) -> Option<Value> {
    let o = vmm(&["ctl", "--api-sock", sock.to_str()?, "memory"]);
    (o.code == Some(0)).then(|| serde_json::from_str(o.stdout.trim()).ok())?
}

#[test]
fn a_vm_serves_its_api_on_its_id_in_the_runtime_directory() {
    let tmp = TempDir::new("ops-dir");
    let dir = tmp.path().join("run/vmm");
    let mut vm = IdleVm::start(&dir, "web-1", &["--mem-mib", "256"]);
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    let o = vmm(&["ctl", "--api-sock", vm.sock.to_str().unwrap(), "status"]);
    let status: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(status["id"], "web-1", "{status}");
    assert_eq!(status["state"], "Running", "{status}");
    assert!(status["started_at_unix_ms"].as_u64().unwrap() > 1_700_000_000_000, "{status}");

    // SIGTERM: the VM stops and its socket goes.
    let pid = vm.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    vm.child.wait().unwrap();
    assert!(!vm.sock.exists());
}

#[test]
fn the_runtime_directory_comes_from_the_environment_and_ids_are_checked() {
    let tmp = TempDir::new("ops-env");
    // A guest that exits at once still served its API on vmm-PID meanwhile;
    // the directory is made even so.
    let o = common::vmm_env(
        &["run", "--serial", "none", "--cmdline", "workload=exit"],
        &[("VMM_RUNTIME_DIR", tmp.path().join("env").to_str().unwrap())],
    );
    o.assert_code(0);
    assert!(o.stderr.contains(&format!("on {}", tmp.path().join("env/vmm-").display())), "{}", o.stderr);
    assert_eq!(std::fs::read_dir(tmp.path().join("env")).unwrap().count(), 0, "the socket is removed");

    let o = vmm(&["run", "--no-api", "--serial", "none", "--cmdline", "workload=exit"]);
    o.assert_code(0);
    assert!(!o.stderr.contains("serving the control API"), "{}", o.stderr);

    for bad in ["../x", "a b", ""] {
        let o = vmm(&["run", "--id", bad, "--cmdline", "workload=exit"]);
        o.assert_code(2);
        assert!(o.stderr.contains("--id"), "{}", o.stderr);
    }
}

#[test]
fn ps_lists_every_vm_with_totals_that_are_the_sums_and_reports_dead_sockets() {
    let tmp = TempDir::new("ops-ps");
    let _a = IdleVm::start(tmp.path(), "a", &["--mem-mib", "256"]);
    let _b = IdleVm::start(tmp.path(), "b", &["--mem-mib", "512", "--vcpus", "2"]);
    drop(std::os::unix::net::UnixListener::bind(tmp.path().join("gone")).unwrap());

    let o = vmm(&["ps", "--dir", tmp.path().to_str().unwrap(), "--json"]);
    o.assert_code(0);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    let vms = v["vms"].as_array().unwrap();
    let ids: Vec<&str> = vms.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "gone"], "{v}");
    assert_eq!(vms[0]["state"], "Running");
    assert_eq!(vms[1]["vcpus"], 2);
    assert_eq!(vms[1]["mem_size_mib"], 512);
    assert_eq!(vms[2]["reach"], "dead", "{v}");
    assert_eq!(v["total"]["vms"], 3);
    assert_eq!(v["total"]["answered"], 2);
    for key in ["vcpus", "mem_size_mib", "memmap_initialized_bytes", "memmap_resident_bytes", "guest_ram_resident_bytes", "kvm_registered_bytes", "vmm_pss_bytes"] {
        let sum: u64 = vms.iter().filter_map(|r| r[key].as_u64()).sum();
        assert_eq!(v["total"][key].as_u64(), Some(sum), "{key}: {v}");
    }
    assert_eq!(vms[0]["memmap_initialized_bytes"], 32 << 10, "{v}");

    let o = vmm(&["ps", "--dir", tmp.path().to_str().unwrap(), "--sort", "memory"]);
    o.assert_code(0);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines[0].starts_with("ID "), "{}", o.stdout);
    assert!(lines[1].starts_with("b ") && lines[2].starts_with("a "), "{}", o.stdout);
    assert!(lines[3].starts_with("gone ") && lines[3].ends_with("dead socket"), "{}", o.stdout);
    let total: Vec<&str> = lines[4].split_whitespace().collect();
    assert_eq!(total[..8], ["TOTAL", "(3", "VMs)", "2", "answered", "3", "768", "MiB"], "{}", o.stdout);
}

#[test]
fn ps_prometheus_parses_and_matches_get_memory() {
    let tmp = TempDir::new("ops-prom");
    let vm = IdleVm::start(tmp.path(), "p1", &["--mem-mib", "256"]);
    let report = memory_json(&vm.sock).unwrap();
    let o = vmm(&["ps", "--dir", tmp.path().to_str().unwrap(), "--prometheus"]);
    o.assert_code(0);
    let scrape = prometheus_parse::Scrape::parse(o.stdout.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |metric: &str| {
        let s = scrape.samples.iter().find(|s| s.metric == metric).unwrap_or_else(|| panic!("{metric}: {}", o.stdout));
        assert_eq!(s.labels.get("id"), Some("p1"));
        match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v as u64,
            ref other => panic!("{metric}: {other:?}"),
        }
    };
    assert_eq!(value("vmm_up"), 1);
    assert_eq!(value("vmm_memory_configured_bytes"), 256 << 20);
    let u = |p: &str| report.pointer(p).and_then(Value::as_u64).unwrap();
    // An idle guest's memmap and KVM registration do not move.
    assert_eq!(value("vmm_memmap_initialized_bytes"), u("/guest/memmap_bytes_initialized"));
    assert_eq!(value("vmm_memmap_resident_bytes"), u("/host/memmap_resident_bytes"));
    assert_eq!(value("vmm_kvm_registered_bytes"), u("/host/kvm_registered_bytes"));
    assert_eq!(value("vmm_guest_ram_resident_bytes"), u("/host/guest_ram_resident_bytes"));
    assert!(value("vmm_process_pss_bytes") > 0);
}

#[test]
fn an_idle_2_gib_vm_leads_its_memory_table_with_32_kib_of_metadata() {
    let tmp = TempDir::new("ops-mem");
    let vm = IdleVm::start(tmp.path(), "idle", &["--mem-mib", "2048", "--memmap-init", "ondemand"]);
    let o = vmm(&["ctl", "--api-sock", vm.sock.to_str().unwrap(), "--human", "memory"]);
    o.assert_code(0);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "SUMMARY", "{}", o.stdout);
    assert!(lines[1].starts_with("metadata initialized  32 KiB  ("), "{}", o.stdout);
    assert!(lines[2].starts_with("metadata resident     32 KiB  ("), "{}", o.stdout);
    assert!(lines[3].starts_with("guest RAM resident"), "{}", o.stdout);
    assert!(lines[4].starts_with("VMM process (PSS)"), "{}", o.stdout);
    assert!(["4", "6", "8", "10"].iter().any(|m| lines[5].starts_with(&format!("KVM                   {m} MiB registered"))), "{}", o.stdout);
    assert!(lines[6].starts_with("guest and host agree  yes"), "{}", o.stdout);
    // The details follow, as before.
    assert!(o.stdout.contains("\nmemmap strategy: ondemand\n"), "{}", o.stdout);
}

//! Operator integration tests: VMs found in a runtime directory by their id
//! (`vmm run --runtime-dir D --id X`), `--no-api`, `vmm ps` and its
//! Prometheus exposition, `vmm top` driven in tmux, a VM's own
//! `GET /metrics` in Prometheus' text format, and the summary that opens `vmm ctl memory --human`, on real
//! booted guests.

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

/// `GET /metrics` on `sock` through curl with the extra `args`: the body
/// and the content type of the answer.
fn curl_metrics(sock: &Path, query: &str, args: &[&str]) -> (String, String) {
    let o = Command::new("curl")
        .args(["-s", "--max-time", "30", "--unix-socket"])
        .arg(sock)
        .args(args)
        .args(["-w", "\n%{http_code} %{content_type}"])
        .arg(format!("http://localhost/metrics{query}"))
        .output()
        .expect("curl is needed by this test");
    let out = String::from_utf8(o.stdout).unwrap();
    let (body, status) = out.rsplit_once('\n').unwrap();
    (body.to_string(), status.to_string())
}

#[test]
fn get_metrics_answers_prometheus_text_that_parses_and_matches_get_memory() {
    let tmp = TempDir::new("ops-metrics");
    let vm = IdleVm::start(tmp.path(), "m1", &["--mem-mib", "256"]);
    let report = memory_json(&vm.sock).unwrap();
    let (text, status) = curl_metrics(&vm.sock, "", &["-H", "Accept: text/plain"]);
    assert_eq!(status, "200 text/plain; version=0.0.4; charset=utf-8", "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |metric: &str| {
        let s = scrape.samples.iter().find(|s| s.metric == metric).unwrap_or_else(|| panic!("{metric}: {text}"));
        assert!(s.labels.is_empty(), "{metric}: {text}");
        match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v as u64,
            ref other => panic!("{metric}: {other:?}"),
        }
    };
    let u = |p: &str| report.pointer(p).and_then(Value::as_u64).unwrap();
    // An idle guest's memmap, size and KVM registration do not move.
    assert_eq!(value("vmm_guest_report_valid"), 1);
    assert_eq!(value("vmm_guest_ram_bytes"), u("/host/guest_ram_bytes"));
    assert_eq!(value("vmm_guest_ram_bytes"), 256 << 20);
    assert_eq!(value("vmm_memmap_initialized_bytes"), u("/guest/memmap_bytes_initialized"));
    assert_eq!(value("vmm_memmap_resident_bytes"), u("/host/memmap_resident_bytes"));
    assert_eq!(value("vmm_memmap_range_bytes"), u("/host/memmap_range_bytes"));
    assert_eq!(value("vmm_kvm_registered_bytes"), u("/host/kvm_registered_bytes"));
    assert_eq!(value("vmm_guest_managed_bytes"), u("/guest/pages_total") * 4096);
    assert!(value("vmm_process_pss_bytes") > 0);
    // Counters are typed as such; this VM has answered requests already.
    let requests = scrape.samples.iter().find(|s| s.metric == "vmm_api_requests_total").unwrap();
    assert!(matches!(requests.value, prometheus_parse::Value::Counter(v) if v >= 1.0), "{text}");
    let exits = scrape.samples.iter().filter(|s| s.metric == "vmm_vm_exits_total").count();
    assert_eq!(exits, 9, "one sample per exit reason: {text}");

    // The query asks for text too; JSON stays the default, `*/*` included.
    let (again, status) = curl_metrics(&vm.sock, "?format=prometheus", &[]);
    assert!(status.starts_with("200 text/plain; version=0.0.4"), "{status}");
    assert!(again.contains("\nvmm_guest_ram_bytes 268435456\n"), "{again}");
    for args in [&[][..], &["-H", "Accept: */*"], &["-H", "Accept: application/json"]] {
        let (json, status) = curl_metrics(&vm.sock, "", args);
        assert_eq!(status, "200 application/json", "{args:?}");
        let v: Value = serde_json::from_str(&json).unwrap();
        assert!(v["api_requests"].as_u64().unwrap() >= 1, "{v}");
    }
    let (json, status) = curl_metrics(&vm.sock, "?format=json", &["-H", "Accept: text/plain"]);
    assert_eq!(status, "200 application/json", "{json}");
    let (err, status) = curl_metrics(&vm.sock, "?format=xml", &[]);
    assert_eq!(status, "400 application/json", "{err}");
    assert!(err.contains("format=prometheus"), "{err}");
}

/// A tmux server of this test's own (`tmux -S` on a socket in the test's
/// scratch directory, no configuration file), killed on drop; nothing
/// else's tmux is touched.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts a detached 160x40 session running `command` in `sh`, which
    /// then waits (at most 2 minutes, or until the server is killed) so that
    /// its screen can still be read.
    fn start(dir: &Path, command: &str) -> Tmux {
        let tmux = Tmux { socket: dir.join("tmux.sock") };
        let command = format!("{command}; exec sleep 120");
        let started = tmux.cmd(&["new-session", "-d", "-x", "160", "-y", "40", "sh", "-c", &command]);
        assert!(started.status.success(), "tmux (needed by this test) did not start: {}", String::from_utf8_lossy(&started.stderr));
        tmux
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-S").arg(&self.socket).args(["-f", "/dev/null"]).args(args).output().expect("tmux is needed by this test")
    }

    /// What the pane shows now.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p"]).stdout).into_owned()
    }

    /// Waits until the screen satisfies `cond`; returns it.
    fn wait_for(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if cond(&screen) {
                return screen;
            }
            assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_draws_the_vms_and_their_totals_live_and_q_restores_the_terminal() {
    let tmp = TempDir::new("ops-top");
    let _a = IdleVm::start(tmp.path(), "top-a", &["--mem-mib", "256"]);
    let _b = IdleVm::start(tmp.path(), "top-b", &["--mem-mib", "512"]);
    let command = format!(
        "'{}' top --dir '{}' --interval 0.5; echo \"top exited with $?\"; stty -a",
        vmm_path(),
        tmp.path().display()
    );
    // Not in the VMs' directory, where vmm top would list its socket.
    let tmux_dir = TempDir::new("ops-tmux");
    let tmux = Tmux::start(tmux_dir.path(), &command);
    let screen = tmux.wait_for("vmm top to draw both VMs", |s| s.contains("2 VMs, 2 answered") && s.contains("\ntop-b "));
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines[0].starts_with("vmm top ") && lines[0].contains("host MemAvailable "), "{screen}");
    assert!(lines[1].starts_with("ID ") && lines[1].contains("VMM PSS"), "{screen}");
    assert!(lines[2].starts_with("top-a ") && lines[2].contains(" Running ") && lines[2].contains(" 256 MiB "), "{screen}");
    assert!(lines[3].starts_with("top-b ") && lines[3].contains(" 512 MiB "), "{screen}");
    // The totals hold the last line of the 40-line screen.
    let last = screen.lines().nth(39).unwrap_or_default();
    assert!(last.starts_with("TOTAL (2 VMs)") && last.contains("2 answered") && last.contains(" 768 MiB "), "{screen}");

    assert!(tmux.cmd(&["send-keys", "q"]).status.success());
    let screen = tmux.wait_for("vmm top to exit and stty to answer", |s| s.contains("top exited with ") && s.contains("icanon"));
    assert!(screen.contains("top exited with 0\n"), "{screen}");
    // Back on the main screen, and the terminal is out of raw mode again.
    assert!(!screen.contains("TOTAL ("), "{screen}");
    let modes: Vec<&str> = screen.split_whitespace().collect();
    for mode in ["icanon", "echo", "isig"] {
        assert!(modes.contains(&mode) && !modes.contains(&format!("-{mode}").as_str()), "{mode}: {screen}");
    }
}

/// A closed terminal (the tmux server gone, as when an ssh session drops)
/// ends `vmm top`: crossterm's own poll spun on the dead pty at full CPU
/// and ignored SIGTERM.
#[test]
fn top_ends_when_its_terminal_goes_away() {
    let tmp = TempDir::new("ops-top-hup");
    let _a = IdleVm::start(tmp.path(), "hup-a", &["--mem-mib", "256"]);
    let tmux_dir = TempDir::new("ops-tmux-hup");
    let pid_file = tmux_dir.path().join("top.pid");
    let command = format!(
        "echo $$ > '{}'; exec '{}' top --dir '{}' --interval 0.5",
        pid_file.display(),
        vmm_path(),
        tmp.path().display()
    );
    let tmux = Tmux::start(tmux_dir.path(), &command);
    tmux.wait_for("vmm top to draw the VM", |s| s.contains("1 VMs, 1 answered"));
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "vmm", "the pane runs vmm top as {pid}");
    drop(tmux);
    let start = Instant::now();
    let running = || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| !st.contains(") Z "));
    while running() {
        if start.elapsed() > PATIENCE {
            // SAFETY: kill(2) on the PID this test's own pane started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("vmm top ({pid}) kept running after its terminal closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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

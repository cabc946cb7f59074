//! Hostile-guest tests: the built-in guest kernel booted with an attack
//! workload (`workload=attack-...`, guest-kernel/src/workload.rs), and what
//! the VMM must do whatever the guest does: not abort on a broken stdout or
//! stderr, bound its logging, stay stoppable with a stalled console, refuse
//! impossible results, give up on a silent guest, and keep its own exit
//! codes to itself (docs/security.md).

mod common;

use common::{curl, vmm, vmm_path, wait_for, TempDir};
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a stop may take in these tests: the VMM's own bound is well
/// under a second; this is generous for a loaded 2-core machine.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A small guest: the attacks need no memory.
const MEM: &str = "256";

/// A `vmm run` serving the API, with stdout and stderr as the test says;
/// killed on drop if still running.
struct Vm {
    child: Child,
    sock: PathBuf,
    _dir: TempDir,
}

impl Vm {
    fn start(tag: &str, args: &[&str], stdout: Stdio, stderr: Stdio) -> Vm {
        let dir = TempDir::new(tag);
        let sock = dir.path().join("vmm.sock");
        let mem: &[&str] = if args.contains(&"--mem-mib") { &[] } else { &["--mem-mib", MEM] };
        let child = Command::new(vmm_path())
            .arg("run")
            .args(mem)
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("cannot start vmm");
        let vm = Vm { child, sock, _dir: dir };
        wait_for(|| std::os::unix::net::UnixStream::connect(&vm.sock).is_ok(), "the API socket");
        vm
    }

    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        curl(&self.sock, method, path, body)
    }

    fn metric(&self, name: &str) -> u64 {
        let (code, m) = self.curl("GET", "/metrics", None);
        assert_eq!(code, 200, "{m}");
        m[name].as_u64().unwrap_or_else(|| panic!("no {name} in {m}"))
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
    }

    /// Waits for the process to exit within `limit`; its exit code and how long it took.
    fn exit_within(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code(), start.elapsed());
            }
            assert!(start.elapsed() < limit, "vmm did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}


fn guest_ready(vm: &Vm) -> bool {
    let (code, report) = vm.curl("GET", "/memory", None);
    code == 200 && report["timings"]["guest_ready"].is_number()
}

/// A pipe whose read end is closed: every write to it fails with EPIPE.
fn broken_pipe() -> std::io::PipeWriter {
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    w
}

#[test]
fn a_closed_stdout_and_stderr_do_not_abort_the_vmm() {
    let w = broken_pipe();
    let mut vm = Vm::start(
        "closed-stdio",
        &["--cmdline", "workload=attack-ports"],
        Stdio::from(w.try_clone().unwrap()),
        Stdio::from(w),
    );
    // The guest floods the log with protocol errors, all written to a closed stderr.
    wait_for(|| vm.metric("guest_protocol_errors") > 1000, "the guest's bad port writes");
    assert!(vm.metric("stdio_lines_dropped") > 0, "the failed writes are counted");
    vm.sigterm();
    let (code, took) = vm.exit_within(STOP_DEADLINE);
    assert_eq!(code, Some(0), "a requested stop, not an abort (134)");
    assert!(!vm.sock.exists(), "the socket is removed");
    eprintln!("closed stdio: stopped {took:?} after SIGTERM");
}

#[test]
fn guest_protocol_errors_are_rate_limited_and_a_stderr_nobody_reads_stalls_nothing() {
    // stderr: a pipe held open and never read, so the VMM's writes would block.
    let (_unread, w) = std::io::pipe().unwrap();
    let mut vm = Vm::start("unread-stderr", &["--serial", "none", "--cmdline", "workload=attack-ports"], Stdio::null(), Stdio::from(w));
    wait_for(|| vm.metric("guest_protocol_errors") > 10_000, "the guest's bad port writes");
    // The API still answers: the controller is not stuck in a write.
    let (code, _) = vm.curl("GET", "/", None);
    assert_eq!(code, 200);
    let (code, _) = vm.curl("PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#));
    assert_eq!(code, 204);
    let (code, took) = vm.exit_within(STOP_DEADLINE);
    assert_eq!(code, Some(0));
    eprintln!("unread stderr: stopped {took:?} after Shutdown");

    // With stderr read: a bounded number of lines, each summarizing the rest.
    let (mut r, w) = std::io::pipe().unwrap();
    let mut vm = Vm::start("rate-limit", &["--serial", "none", "--cmdline", "workload=attack-ports"], Stdio::null(), Stdio::from(w));
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    // Past the first one-second window too, so that later lines carry the
    // count suppressed before them (a fast guest makes 10,000 errors well
    // within the first second).
    wait_for(
        || start.elapsed() > Duration::from_millis(2500) && vm.metric("guest_protocol_errors") > 10_000,
        "the guest's bad port writes",
    );
    let errors = vm.metric("guest_protocol_errors");
    vm.sigterm();
    vm.exit_within(STOP_DEADLINE);
    let elapsed = start.elapsed().as_secs() + 2;
    let stderr = reader.join().unwrap();
    let lines = stderr.lines().filter(|l| l.contains("guest protocol error")).count() as u64;
    assert!(lines > 0 && lines <= 10 * elapsed, "{lines} lines for {errors} errors in about {elapsed} s");
    assert!(stderr.contains("more suppressed"), "{stderr}");
    assert!(stderr.contains("were not logged (rate limit)"), "the total is summarized at stop:\n{stderr}");
}

#[test]
fn a_serial_flood_into_a_pipe_nobody_reads_leaves_the_vm_stoppable() {
    for how in ["Shutdown", "SIGTERM"] {
        let (_unread, w) = std::io::pipe().unwrap();
        let mut vm = Vm::start("serial-flood", &["--cmdline", "workload=attack-serial-flood"], Stdio::from(w), Stdio::null());
        wait_for(|| vm.metric("serial_bytes_dropped") > 0, "the console buffer to overflow");
        let (code, _) = vm.curl("GET", "/", None);
        assert_eq!(code, 200, "the API answers while the console is stuck");
        match how {
            "Shutdown" => assert_eq!(vm.curl("PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#)).0, 204),
            _ => vm.sigterm(),
        }
        let (code, took) = vm.exit_within(STOP_DEADLINE);
        assert_eq!(code, Some(0), "{how}");
        assert!(!vm.sock.exists());
        eprintln!("serial flood: stopped {took:?} after {how}");
    }
}

#[test]
fn a_guest_that_never_exits_to_the_vmm_is_stopped_and_paused_on_demand() {
    let mut vm = Vm::start("spin", &["--serial", "none", "--cmdline", "workload=attack-spin"], Stdio::null(), Stdio::null());
    wait_for(|| guest_ready(&vm), "the guest to be ready");
    let (code, v) = vm.curl("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(code, 204, "{v}");
    assert_eq!(vm.curl("GET", "/vm/status", None).1["state"], "Paused");
    assert_eq!(vm.curl("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    vm.sigterm();
    let (code, took) = vm.exit_within(STOP_DEADLINE);
    assert_eq!(code, Some(0));
    eprintln!("spinning guest: stopped {took:?} after SIGTERM");
}

#[test]
fn a_console_file_is_capped() {
    let dir = TempDir::new("serial-cap");
    let path = dir.path().join("console");
    let target = format!("file:{}", path.display());
    let mut vm = Vm::start(
        "serial-cap",
        &["--serial", &target, "--serial-max-bytes", "65536", "--cmdline", "workload=attack-serial-flood"],
        Stdio::null(),
        Stdio::null(),
    );
    wait_for(|| vm.metric("serial_bytes_dropped") > 65536, "output past the cap");
    vm.sigterm();
    assert_eq!(vm.exit_within(STOP_DEADLINE).0, Some(0));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 65536);
}

#[test]
fn a_held_bytes_larger_than_ram_is_refused() {
    let o = vmm(&[
        "run", "--no-api", "--mem-mib", MEM, "--serial", "none", "--alloc-mib", "16", "--report", "json",
        "--cmdline", "workload=attack-held-max",
    ]);
    o.assert_code(0);
    let report: Value = serde_json::from_str(o.stdout.lines().next().unwrap_or("")).unwrap_or_else(|_| panic!("{o}"));
    let held = report["guest"]["workload_bytes"].as_u64().unwrap();
    assert!(held <= 256 << 20, "the guest's claim reached the report: {held}");
    assert!(o.stderr.contains("result refused"), "{o}");
}

#[test]
fn a_guest_that_never_answers_is_given_up_on() {
    // The run script: a deadline, then the VMM's own exit code 3.
    let start = Instant::now();
    let o = vmm(&[
        "run", "--no-api", "--mem-mib", MEM, "--serial", "none", "--alloc-mib", "16", "--report", "json",
        "--guest-timeout", "1", "--cmdline", "workload=attack-mailbox-silent",
    ]);
    o.assert_code(3);
    assert!(o.stderr.contains("did not finish command"), "{o}");
    eprintln!("silent guest: vmm run --alloc-mib gave up after {:?}", start.elapsed());

    // The API: a command that timed out does not wedge the next ones.
    let mut vm = Vm::start(
        "silent",
        &["--serial", "none", "--guest-timeout", "1", "--cmdline", "workload=attack-mailbox-silent"],
        Stdio::null(),
        Stdio::null(),
    );
    wait_for(|| guest_ready(&vm), "the guest to be ready");
    for _ in 0..2 {
        let (code, v) = vm.curl("PUT", "/guest/memory", Some(r#"{"target_mib": 8}"#));
        assert_eq!(code, 504, "a timeout, not 409: {v}");
    }
    let (code, v) = vm.curl("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    assert_eq!(code, 204, "{v}");
    // The guest ignores the shutdown too: stopped once that times out.
    let (code, took) = vm.exit_within(Duration::from_secs(30));
    assert_eq!(code, Some(3));
    assert!(!vm.sock.exists());
    eprintln!("silent guest: SendCtrlAltDel ended the VM after {took:?}");
}

#[test]
fn a_guest_that_answers_the_shutdown_but_does_not_exit_is_stopped() {
    let (mut vm, c) =
        Vm::start_captured("shutdown-ignored", &["--guest-timeout", "1", "--cmdline", "workload=attack-shutdown-ignored"]);
    wait_for(|| guest_ready(&vm), "the guest to be ready");
    let (code, v) = vm.curl("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    assert_eq!(code, 204, "{v}");
    // Answered at once, then the guest timeout (1 s) to exit.
    let (code, took) = vm.exit_within(Duration::from_secs(1) + STOP_DEADLINE);
    assert_eq!(code, Some(3), "the VMM's own code for an unresponsive guest");
    std::thread::sleep(Duration::from_millis(100));
    assert!(c.stderr().contains("answered the shutdown command but did not exit"), "{}", c.stderr());
    assert!(!vm.sock.exists());
    eprintln!("shutdown ignored: SendCtrlAltDel ended the VM after {took:?}");
}

#[test]
fn a_guest_cannot_choose_the_vmms_exit_code() {
    for (guest, process) in [(0, 0), (1, 65), (2, 66), (3, 67), (134, 70), (139, 75), (255, 127), (4_000_000_000u32, 64)] {
        let o = vmm(&["run", "--no-api", "--mem-mib", MEM, "--serial", "none", "--cmdline", &format!("workload=attack-exit:{guest}")]);
        o.assert_code(process);
        if guest != 0 {
            assert!(o.stdout.contains(&format!("vmm: guest exit code {guest}\n")), "{o}");
        }
    }
}

/// What a VM wrote to stdout and stderr so far, read by two threads.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<(String, String)>>);

impl Captured {
    fn stdout(&self) -> String {
        self.0.lock().unwrap().0.clone()
    }

    fn stderr(&self) -> String {
        self.0.lock().unwrap().1.clone()
    }

    fn reader(&self, mut from: impl Read + Send + 'static, err: bool) {
        let to = self.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut g = to.lock().unwrap();
                if err { g.1.push_str(&text) } else { g.0.push_str(&text) }
            }
        });
    }
}

impl Vm {
    /// A VM whose stdout (the console) and stderr (the log) the test reads.
    fn start_captured(tag: &str, args: &[&str]) -> (Vm, Captured) {
        let mut vm = Vm::start(tag, args, Stdio::piped(), Stdio::piped());
        let c = Captured::default();
        c.reader(vm.child.stdout.take().unwrap(), false);
        c.reader(vm.child.stderr.take().unwrap(), true);
        (vm, c)
    }

    /// Waits until the console shows `line`, failing at once if the VM exits.
    fn wait_console(&mut self, c: &Captured, line: &str) {
        wait_for(
            || {
                if let Some(st) = self.child.try_wait().unwrap() {
                    panic!("the VM exited ({st}) before `{line}`:\n{}\n{}", c.stdout(), c.stderr());
                }
                c.stdout().contains(line)
            },
            line,
        );
    }

    fn metrics(&self) -> Value {
        let (code, m) = self.curl("GET", "/metrics", None);
        assert_eq!(code, 200, "{m}");
        m
    }

    /// The VMM process's resident set (guest RAM included), from /proc.
    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() << 10
    }

    fn shutdown_within_deadline(&mut self) -> Duration {
        let (code, v) = self.curl("PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#));
        assert_eq!(code, 204, "{v}");
        let (code, took) = self.exit_within(STOP_DEADLINE);
        assert_eq!(code, Some(0), "a requested stop");
        assert!(!self.sock.exists());
        took
    }
}

/// Lines of `log` that are rate-limited guest diagnostics containing `what`.
fn diagnostics(log: &str, what: &str) -> u64 {
    log.lines().filter(|l| l.contains("guest protocol error") && l.contains(what)).count() as u64
}

#[test]
fn mmio_outside_ram_reads_all_ones_drops_writes_and_is_logged_within_the_rate_limit() {
    // The guest checks all-ones reads and dropped writes itself (past RAM,
    // the 32-bit hole, the top of 4 GiB and of its physical address space,
    // a write straddling the end of RAM) and exits with 99 if one fails.
    let (mut vm, c) = Vm::start_captured("mmio", &["--cmdline", "workload=attack-mmio"]);
    let start = Instant::now();
    vm.wait_console(&c, "attack-mmio: all checks passed");
    wait_for(
        || start.elapsed() > Duration::from_millis(2500) && vm.metrics()["vm_exits"]["mmio_read"].as_u64().unwrap() > 2000,
        "a storm of MMIO exits",
    );
    assert_eq!(vm.curl("GET", "/", None).0, 200, "the API answers during the storm");
    let m = vm.metrics();
    let (reads, writes) = (m["vm_exits"]["mmio_read"].as_u64().unwrap(), m["vm_exits"]["mmio_write"].as_u64().unwrap());
    // One vCPU: at most one access is between its two counters.
    assert!(writes > 1000 && m["guest_protocol_errors"].as_u64().unwrap() + 2 >= reads + writes, "every access counted: {m}");
    let took = vm.shutdown_within_deadline();
    let elapsed = start.elapsed().as_secs() + 2;
    std::thread::sleep(Duration::from_millis(100));
    let log = c.stderr();
    let lines = diagnostics(&log, "not guest RAM");
    assert!(lines > 0 && lines <= 10 * elapsed, "{lines} diagnostics for {reads} reads and {writes} writes:\n{log}");
    assert!(log.contains("MMIO read at 0x") && log.contains("MMIO write at 0x"), "{log}");
    assert!(log.contains("more suppressed"), "{log}");
    assert!(log.contains("were not logged (rate limit)"), "{log}");
    eprintln!("MMIO storm: {reads} reads, {writes} writes, {lines} log lines; stopped {took:?} after Shutdown");
}

#[test]
fn an_exception_storm_leaves_the_vmm_responsive_and_stoppable() {
    let (mut vm, c) = Vm::start_captured("exceptions", &["--cmdline", "workload=attack-exceptions"]);
    vm.wait_console(&c, "attack-exceptions: 2000 handled");
    assert_eq!(vm.curl("GET", "/", None).0, 200);
    assert_eq!(vm.curl("GET", "/memory", None).0, 200);
    assert_eq!(vm.curl("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    assert_eq!(vm.curl("GET", "/vm/status", None).1["state"], "Paused");
    assert_eq!(vm.curl("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    let took = vm.shutdown_within_deadline();
    eprintln!("exception storm: stopped {took:?} after Shutdown");
}

#[test]
fn every_vcpu_failing_or_exiting_at_once_gives_one_stop_reason_and_exit_code() {
    for vcpus in ["2", "4"] {
        let run = |w: &str| {
            vmm(&["run", "--no-api", "--mem-mib", MEM, "--vcpus", vcpus, "--serial", "none", "--cmdline", &format!("workload={w}")])
        };
        // Every vCPU writes the exit port at once, CPU i with 10 + i.
        let o = run("attack-exit-all:10");
        let codes: Vec<u32> =
            o.stdout.lines().filter_map(|l| l.strip_prefix("vmm: guest exit code ")).map(|c| c.parse().unwrap()).collect();
        assert_eq!(codes.len(), 1, "one guest exit code is reported: {o}");
        let n: u32 = vcpus.parse().unwrap();
        assert!((10..10 + n).contains(&codes[0]), "{o}");
        o.assert_code(64 + (codes[0] & 63) as i32);
        assert_eq!(o.stderr.matches("vmm: error:").count(), 1, "{o}");
        // Every vCPU reports an exception, or triple-faults, at once.
        for (w, reason) in [("attack-exception-all", "guest exception #UD"), ("attack-fault-all", "triple fault")] {
            let o = run(w);
            o.assert_code(1);
            assert_eq!(o.stderr.matches("vmm: error:").count(), 1, "{o}");
            assert!(o.stderr.contains(reason), "{w} on {vcpus} vCPUs: {o}");
        }
    }
}

#[test]
fn mem_online_abuse_from_every_vcpu_registers_each_block_once_and_nothing_outside_ram() {
    // 1 GiB on 3 vCPUs at once: addresses past RAM, in the hole, at the top;
    // every MiB of RAM (odd ones misaligned); block 0 10,000 times each.
    let ram: u64 = 1024 << 20;
    let (mut vm, c) =
        Vm::start_captured("mem-online", &["--mem-mib", "1024", "--vcpus", "3", "--cmdline", "workload=attack-mem-online:10000"]);
    let start = Instant::now();
    vm.wait_console(&c, "attack-mem-online: done on 3 CPUs");
    let (code, report) = vm.curl("GET", "/memory", None);
    assert_eq!(code, 200, "{report}");
    // Every block registered once (a KVM refusal, e.g. a slot past
    // KVM_CAP_NR_MEMSLOTS, would have stopped the VM), nothing else.
    assert_eq!(report["host"]["kvm_registered_bytes"].as_u64(), Some(ram), "{report}");
    assert_eq!(report["host"]["guest_ram_bytes"].as_u64(), Some(ram), "{report}");
    assert_eq!(report["valid"], true, "{report}");
    assert!(vm.metric("guest_protocol_errors") >= 3 * 6, "the addresses outside RAM are errors");
    // The guest still works, and its report adds up.
    let (code, v) = vm.curl("PUT", "/guest/memory", Some(r#"{"target_mib": 16}"#));
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["status"].as_str(), v["held_bytes"].as_u64()), (Some("Ok"), Some(16 << 20)), "{v}");
    assert_eq!(v["report"]["valid"], true, "{v}");
    assert_eq!(vm.curl("GET", "/vm/status", None).1["state"], "Running");
    vm.shutdown_within_deadline();
    let elapsed = start.elapsed().as_secs() + 2;
    let lines = diagnostics(&c.stderr(), "online memory");
    assert!(lines > 0 && lines <= 10 * elapsed, "{lines} lines in {elapsed} s:\n{}", c.stderr());
}

#[test]
fn a_memory_bomb_on_every_vcpu_keeps_host_memory_bounded_by_ram() {
    let ram: u64 = 256 << 20;
    let (mut vm, c) = Vm::start_captured("bomb", &["--vcpus", "2", "--cmdline", "workload=attack-memory-bomb"]);
    vm.wait_console(&c, "attack-memory-bomb: every page written on 2 CPUs");
    // The guest keeps writing every page; the API answers meanwhile.
    for _ in 0..3 {
        let (code, report) = vm.curl("GET", "/memory", None);
        assert_eq!(code, 200, "{report}");
        let h = &report["host"];
        let resident = h["guest_ram_resident_bytes"].as_u64().unwrap();
        assert_eq!(h["guest_ram_bytes"].as_u64(), Some(ram), "{report}");
        assert_eq!(h["kvm_registered_bytes"].as_u64(), Some(ram), "{report}");
        assert!(resident > ram * 9 / 10 && resident <= ram, "all of RAM and no more is resident: {report}");
        assert!(h["vmm_rss_bytes"].as_u64().unwrap() < 64 << 20, "the VMM's own memory: {report}");
        let rss = vm.rss_bytes();
        assert!(rss <= ram + (64 << 20), "VMM RSS {rss} for {ram} of RAM");
        assert_eq!(vm.curl("GET", "/", None).0, 200);
    }
    let took = vm.shutdown_within_deadline();
    eprintln!("memory bomb: RSS bounded by RAM; stopped {took:?} after Shutdown");
}

#[test]
fn vcpus_racing_on_the_ports_leave_commands_pause_and_stop_working() {
    for how in ["SendCtrlAltDel", "Shutdown"] {
        let (mut vm, c) =
            Vm::start_captured("race", &["--vcpus", "3", "--guest-timeout", "2", "--cmdline", "workload=attack-race"]);
        vm.wait_console(&c, "attack-race: 2 CPUs hammer the ports");
        // The other CPUs steal, answer and fake commands; each request still
        // gets an answer (whatever the guest made of it), never a hang.
        for _ in 0..4 {
            let (code, v) = vm.curl("PUT", "/guest/memory", Some(r#"{"target_mib": 8}"#));
            assert!(code == 200 || code == 504, "{code} {v}");
            let (code, report) = vm.curl("GET", "/memory", None);
            assert_eq!(code, 200, "{report}");
            assert!(report["guest"]["workload_bytes"].as_u64().unwrap_or(0) <= 256 << 20, "{report}");
        }
        assert_eq!(vm.curl("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
        assert_eq!(vm.curl("GET", "/vm/status", None).1["state"], "Paused");
        assert_eq!(vm.curl("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
        // The racing vCPUs keep making protocol errors; on a loaded host they
        // may not have made many yet, so wait for them (within wait_for's
        // deadline). They never all stop: the attack parks one AP at a time,
        // and a running one releases it (before that fix both APs could
        // park at once, for good, and the count stayed where it was).
        wait_for(|| vm.metric("guest_protocol_errors") > 100, "the racing vCPUs' stale DONEs and repeated phases");
        match how {
            "Shutdown" => {
                vm.shutdown_within_deadline();
            }
            _ => {
                // A graceful shutdown: the guest's command may be stolen, so
                // the VM ends by the guest's exit or at the guest timeout.
                assert_eq!(vm.curl("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);
                let (code, _) = vm.exit_within(Duration::from_secs(2) + STOP_DEADLINE);
                assert!(code == Some(0) || code == Some(3), "{code:?}\n{}", c.stderr());
            }
        }
    }
}

/// `n` from the console line `... {n} bogus ranges and records sent`.
fn bogus_count(console: &str) -> u64 {
    let line = console.lines().find(|l| l.contains("bogus ranges and records sent")).expect("the attack's summary");
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "bogus").expect("a count");
    words[i - 1].parse().unwrap_or_else(|_| panic!("no count in {line}"))
}

#[test]
fn bogus_reclaim_reports_are_rejected_counted_and_cost_the_guest_only_its_own_memory() {
    // The guest (reclaim=full, the ondemand default) sends bad records and
    // bad ranges, and one good range over a chunk it still uses; it checks
    // itself that exactly that chunk was lost (exit 99 otherwise).
    let (mut vm, c) = Vm::start_captured("bogus-reclaim", &["--cmdline", "workload=attack-reclaim"]);
    // The console arrives a few bytes at a time: wait for the end of the
    // summary line, which holds the count.
    vm.wait_console(&c, "bogus ranges and records sent");
    assert!(c.stdout().contains("attack-reclaim: own reported chunk lost, the other intact"), "{}", c.stdout());
    let bogus = bogus_count(&c.stdout());
    assert!(bogus >= 20, "{}", c.stdout());
    assert_eq!(vm.curl("GET", "/", None).0, 200, "the VMM answers");
    let (code, report) = vm.curl("GET", "/memory", None);
    assert_eq!(code, 200, "{report}");
    let r = &report["reclaim"];
    // Every bogus range and record is rejected and counted; the one good
    // range (and the guest's own passes, if any) accepted.
    assert_eq!(r["ranges_rejected"].as_u64(), Some(bogus), "{report}");
    assert!(r["ranges_accepted"].as_u64().unwrap() >= 1, "{report}");
    assert!(r["events"].as_u64().unwrap() >= bogus.min(10), "{report}");
    // The discarded figure is what the host had resident and released: the
    // one good chunk the guest wrote, at least, and never more than the
    // bytes accepted (a range accepted twice, or never touched, counts in
    // `accepted_bytes` only; vmm/src/devices/paravirt.rs shows that).
    let (accepted, discarded) = (r["accepted_bytes"].as_u64().unwrap(), r["discarded_bytes"].as_u64().unwrap());
    assert!(discarded <= accepted, "{report}");
    assert!(discarded >= 4096, "the reported chunk was written, so resident: {report}");
    // The report says why it cannot be trusted: the VMM read and validated
    // the stats block (its reason would come first), then found the
    // rejected report; the first was a record with a bad magic.
    assert_eq!(report["valid"], false, "{report}");
    let why = report["invalid_reason"].as_str().unwrap();
    assert!(why.contains("rejected memory the guest reported") && why.contains("bad magic"), "{why}");
    assert!(vm.metric("guest_protocol_errors") >= bogus, "each rejection is a protocol error");
    // The guest still runs on its kernel, stats block and memmap: a command
    // allocates and frees, and the stats block it publishes still reads.
    let (code, v) = vm.curl("PUT", "/guest/memory", Some(r#"{"target_mib": 16}"#));
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["status"].as_str(), v["held_bytes"].as_u64()), (Some("Ok"), Some(16 << 20)), "{v}");
    let (code, v) = vm.curl("PUT", "/guest/memory", Some(r#"{"target_mib": 0}"#));
    assert_eq!((code, v["status"].as_str()), (200, Some("Ok")), "{v}");
    let (_, report) = vm.curl("GET", "/memory", None);
    let why = report["invalid_reason"].as_str().unwrap();
    assert!(why.contains("rejected memory the guest reported"), "still the rejection, not a bad stats block: {why}");
    assert_eq!(vm.curl("GET", "/vm/status", None).1["state"], "Running");
    let took = vm.shutdown_within_deadline();
    eprintln!("bogus reclaim: {bogus} bogus ranges and records rejected; stopped {took:?} after Shutdown");
}

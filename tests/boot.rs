//! Boot integration tests: the real `vmm` binary boots the real guest kernel
//! on KVM, in ring 3 and in ring 0, through every way a guest can end, and
//! refuses bad input with exit code 2.

mod common;

use common::{vmm, Output};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn boot(args: &[&str]) -> Output {
    let mut a = vec!["run", "--mem-mib", "256"];
    a.extend_from_slice(args);
    vmm(&a)
}

#[test]
fn boots_in_ring_3_and_exits_cleanly() {
    let o = boot(&["--guest-cpl", "3", "--cmdline", "workload=exit"]);
    o.assert_code(0);
    assert!(o.stdout.contains("guest: up in ring 3"), "{o}");
    assert!(o.stdout.contains("paravirtual interface present"), "{o}");
    assert!(o.stdout.contains("guest: ready"), "{o}");
    assert!(o.stderr.contains("guest exited with code 0"), "{o}");
    for step in ["vm created", "vcpu first entry", "guest first port write", "guest ready", "vm stopped"] {
        assert!(o.stderr.contains(step), "timing {step:?} missing: {o}");
    }
}

#[test]
fn boots_in_ring_0_and_exits_cleanly() {
    let o = boot(&["--guest-cpl", "0", "--cmdline", "workload=exit"]);
    o.assert_code(0);
    assert!(o.stdout.contains("guest: up in ring 0"), "{o}");
}

#[test]
fn auto_cpl_follows_the_host() {
    let o = boot(&["--cmdline", "workload=exit"]);
    o.assert_code(0);
    let ring = if std::path::Path::new("/sys/module/kvm_pvm").exists() { 3 } else { 0 };
    assert!(o.stdout.contains(&format!("up in ring {ring}")), "{o}");
}

#[test]
fn boots_a_2gib_guest_with_ram_above_the_first_gib_mapped() {
    let o = vmm(&["run", "--mem-mib", "2048", "--cmdline", "workload=exit"]);
    o.assert_code(0);
    assert!(o.stdout.contains("2047 MiB RAM"), "{o}");
    assert!(!o.stdout.contains("not mapped"), "{o}");
}

#[test]
fn a_guest_panic_is_printed_and_its_code_passed_through() {
    let o = boot(&["--cmdline", "workload=panic"]);
    o.assert_code(101);
    assert!(o.stdout.contains("PANIC") && o.stdout.contains("deliberate panic"), "{o}");
    assert!(o.stderr.contains("guest exited with code 101"), "{o}");
}

#[test]
fn a_guest_panic_in_ring_0_is_reported_the_same_way() {
    let o = boot(&["--guest-cpl", "0", "--cmdline", "workload=panic"]);
    o.assert_code(101);
    assert!(o.stdout.contains("deliberate panic"), "{o}");
}

#[test]
fn a_triple_fault_is_named_with_its_rip() {
    let o = boot(&["--cmdline", "workload=fault"]);
    o.assert_code(1);
    assert!(o.stderr.contains("triple fault"), "{o}");
    assert!(o.stderr.contains("RIP 0x"), "{o}");
}

#[test]
fn a_guest_exception_is_named_with_vector_rip_and_ring() {
    for (cpl, ring) in [("3", "ring 3"), ("0", "ring 0")] {
        let o = boot(&["--guest-cpl", cpl, "--cmdline", "workload=exception"]);
        o.assert_code(1);
        assert!(o.stderr.contains("#UD (vector 6)"), "{o}");
        assert!(o.stderr.contains(ring), "{o}");
        assert!(o.stderr.contains("RIP 0x"), "{o}");
    }
}

#[test]
fn a_bad_guest_command_line_fails_the_boot() {
    let o = boot(&["--cmdline", "workload=sleep"]);
    o.assert_code(102);
    assert!(o.stdout.contains("workload="), "{o}");
}

/// A child process killed (and reaped) when the test ends, pass or fail.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User plus system CPU time of process `pid` so far, in clock ticks
/// (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn on_a_vmm_without_our_extensions_the_guest_idles_in_hlt_until_shut_down() {
    // No paravirtual ports and only the first GiB mapped, as on Firecracker:
    // the guest maps the rest itself, prints, and, with no command channel,
    // halts. A halted vCPU parks in the VMM (no interrupts to wake it) until
    // the VM is stopped.
    let dir = common::TempDir::new("hlt");
    let sock = dir.path().join("s");
    let mut vm = KillOnDrop(
        Command::new(common::vmm_path())
            .args(["run", "--mem-mib", "2048", "--legacy-only", "--api-sock"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut vm.0;
    let pid = child.id();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("idling in hlt")) {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => seen.push(l),
            Err(e) => panic!("no hlt line ({e:?}); the guest printed {seen:?}; exit {:?}", child.try_wait()),
        }
    }
    let log = seen.join("\n");
    assert!(log.contains("paravirtual interface absent") && log.contains("2047 MiB RAM"), "{log}");
    // Halted, it stays up and costs (almost) no CPU: a spinning guest would
    // take most of a core over this second.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the VM stopped by itself");
    assert!(used * 10 <= hz, "{used} ticks of CPU in one second while halted (HZ {hz})");
    // Shutdown stops it, with exit code 0.
    let o = vmm(&["ctl", "--api-sock", sock.to_str().unwrap(), "shutdown"]);
    o.assert_code(0);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the VM did not stop within 30 s of Shutdown");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("stopped by the VMM"), "{err}");
}

#[test]
fn serial_output_can_go_to_a_file_or_nowhere() {
    let dir = common::TempDir::new("serial");
    let path = dir.path().join("console.log");
    let target = format!("file:{}", path.display());
    let o = boot(&["--serial", &target, "--cmdline", "workload=exit"]);
    o.assert_code(0);
    assert!(!o.stdout.contains("guest:"), "{o}");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("guest: ready"), "{log}");

    let o = boot(&["--serial", "none", "--cmdline", "workload=exit"]);
    o.assert_code(0);
    assert!(o.stdout.is_empty(), "{o}");
    assert!(o.stderr.contains("guest ready"), "{o}");
}

#[test]
fn bad_memory_sizes_are_usage_errors() {
    // An odd size is fine, except with 2 MiB huge pages.
    for (mem, huge, needle) in [("0", false, "at least 5 MiB"), ("4", false, "at least 5 MiB"), ("7", true, "multiple of 2"), ("100000000", false, "at most")] {
        let mut args = vec!["run", "--mem-mib", mem, "--cmdline", "workload=exit"];
        if huge {
            args.push("--huge-pages");
        }
        let o = vmm(&args);
        o.assert_code(2);
        assert!(o.stderr.contains(needle), "--mem-mib {mem}: {o}");
        assert_eq!(o.stderr.trim().lines().count(), 1, "one line: {o}");
    }
}

#[test]
fn bad_kernel_files_are_usage_errors() {
    let o = vmm(&["run", "--kernel", "/nonexistent/vmlinux"]);
    o.assert_code(2);
    assert!(o.stderr.contains("cannot use kernel image: /nonexistent/vmlinux does not exist"), "{o}");

    let dir = common::TempDir::new("kernel");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a kernel").unwrap();
    let o = vmm(&["run", "--kernel", text.to_str().unwrap()]);
    o.assert_code(2);
    assert!(o.stderr.contains("not an x86-64 ELF executable (no ELF magic)"), "{o}");

    // An x86-64 ELF that is a shared object, not a kernel (the vmm binary
    // itself is no longer one: it is linked non-PIE).
    let lib = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let o = vmm(&["run", "--kernel", lib]);
    o.assert_code(2);
    assert!(o.stderr.contains("not an executable"), "{o}");
}

#[test]
fn config_files_that_are_not_small_regular_files_are_usage_errors() {
    // A FIFO with no writer (opened without O_NONBLOCK, start-up waited
    // for one forever) and a file over the 1 MiB limit: refused at once.
    let dir = common::TempDir::new("config-file");
    let fifo = dir.path().join("vm.json");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let o = vmm(&["--no-api", "--config-file", fifo.to_str().unwrap()]);
    o.assert_code(2);
    assert!(o.stderr.contains("is not a regular file"), "{o}");
    let big = dir.path().join("big.json");
    std::fs::File::create(&big).unwrap().set_len(8 << 30).unwrap();
    let o = vmm(&["--no-api", "--config-file", big.to_str().unwrap()]);
    o.assert_code(2);
    assert!(o.stderr.contains("is larger than 1048576 bytes"), "{o}");
    assert_eq!(o.stderr.trim().lines().count(), 1, "one line: {o}");
}

#[test]
fn another_elf_kernel_boots_with_kernel() {
    let o = vmm(&["run", "--mem-mib", "128", "--kernel", common::embedded_kernel_path(), "--cmdline", "workload=exit"]);
    o.assert_code(0);
    assert!(o.stdout.contains("guest: ready"), "{o}");
}

#[test]
fn a_missing_kvm_device_is_explained() {
    let o = common::vmm_env(&["run", "--cmdline", "workload=exit"], &[("VMM_KVM_DEVICE", "/nonexistent/kvm")]);
    o.assert_code(2);
    assert!(o.stderr.contains("/nonexistent/kvm does not exist"), "{o}");
    assert!(o.stderr.contains("kvm_intel"), "{o}");
}

#[test]
fn bad_flags_are_usage_errors_with_help() {
    let o = vmm(&["run", "--guest-cpl", "2"]);
    o.assert_code(2);
    assert!(o.stderr.contains("possible values"), "{o}");
    let o = vmm(&["run", "--help"]);
    o.assert_code(0);
    assert!(o.stdout.contains("Examples:"), "{o}");
}

/// A minimal x86-64 ELF executable with one segment, `code`, linked and
/// entered at `addr`.
fn elf_at(addr: u64, code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 120];
    e[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&addr.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // file offset
    for field in [16, 24] {
        e[ph + field..ph + field + 8].copy_from_slice(&addr.to_le_bytes()); // vaddr, paddr
    }
    for field in [32, 40] {
        e[ph + field..ph + field + 8].copy_from_slice(&(code.len() as u64).to_le_bytes()); // filesz, memsz
    }
    e.extend_from_slice(code);
    e
}

#[test]
fn a_kernel_linked_above_the_first_memory_block_boots() {
    // mov eax, 7; mov dx, port::EXIT (0x514); out dx, eax
    let code = [0xb8, 7, 0, 0, 0, 0x66, 0xba, 0x14, 0x05, 0xef];
    let dir = common::TempDir::new("high-elf");
    let path = dir.path().join("high.elf");
    std::fs::write(&path, elf_at(200 << 20, &code)).unwrap();
    let o = vmm(&["run", "--mem-mib", "512", "--guest-cpl", "0", "--serial", "none", "--kernel", path.to_str().unwrap()]);
    o.assert_code(71);
    assert!(o.stderr.contains("guest exited with code 7"), "{o}");
}

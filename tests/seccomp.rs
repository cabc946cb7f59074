//! Seccomp on a running VM: every thread of a `vmm run` process, the
//! application processors included, runs under a filter (`Seccomp: 2` in
//! `/proc/PID/task/*/status`) with `no_new_privs`, and the process's
//! resource limits are lowered; `--no-seccomp` turns all of that off.

mod common;

use common::{wait_for, Served};
use std::path::Path;

/// Each thread of `pid`: its name and the value of `field` in its status.
fn threads(pid: u32, field: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(status)) =
            (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("status")))
        else {
            continue;
        };
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        out.push((comm.trim().to_string(), value));
    }
    out.sort();
    out
}

/// Starts a 2-vCPU VM whose guest starts its application processor (the
/// parallel strategy uses both vCPUs) and waits until all its threads run.
fn two_vcpu_vm(tag: &str, extra: &[&str]) -> Served {
    let mut args = vec!["run", "--mem-mib", "256", "--vcpus", "2", "--memmap-init", "parallel", "--serial", "none"];
    args.extend_from_slice(extra);
    let vm = Served::start(tag, "vm.sock", &args);
    let pid = vm.child.id();
    wait_for(
        || {
            let names: Vec<_> = threads(pid, "Seccomp").into_iter().map(|(n, _)| n).collect();
            ["vcpu0", "vcpu1"].iter().all(|t| names.iter().any(|n| n == t))
        },
        "both vCPU threads",
    );
    vm
}

fn limit(pid: u32, name: &str) -> String {
    let limits = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {limits}"));
    line[name.len()..].split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

#[test]
fn every_thread_of_a_running_vm_runs_under_a_seccomp_filter() {
    let vm = two_vcpu_vm("seccomp-on", &[]);
    let pid = vm.child.id();
    let seccomp = threads(pid, "Seccomp");
    assert!(seccomp.len() >= 3, "{seccomp:?}");
    for (name, mode) in &seccomp {
        assert_eq!(mode, "2", "thread {name} of {seccomp:?}");
    }
    for (name, nnp) in threads(pid, "NoNewPrivs") {
        assert_eq!(nnp, "1", "thread {name}");
    }
    assert_eq!(limit(pid, "Max core file size"), "0 0");
    let nofile = vmm::seccomp::MAX_OPEN_FILES.to_string();
    for (i, v) in limit(pid, "Max open files").split(' ').enumerate() {
        assert!(v.parse::<u64>().unwrap() <= vmm::seccomp::MAX_OPEN_FILES, "limit {i} is {v}, over {nofile}");
    }
}

#[test]
fn no_seccomp_runs_every_thread_unfiltered() {
    let vm = two_vcpu_vm("seccomp-off", &["--no-seccomp"]);
    let seccomp = threads(vm.child.id(), "Seccomp");
    for (name, mode) in &seccomp {
        assert_eq!(mode, "0", "thread {name} of {seccomp:?}");
    }
}

//! Threads per VM process: the main thread (controller, API server and stop
//! signals on one runtime) and one thread per vCPU, nothing else. KVM adds a
//! kernel thread of its own to a VM that ran a vCPU (`kvm-nx-lpage-re`),
//! which `/proc/PID/task` lists too; it is counted apart.

mod common;

use common::{curl, wait_for, Served};
use std::path::Path;

/// The names of the tasks of `pid`: the VMM's threads, and KVM's.
fn tasks(pid: u32) -> (Vec<String>, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks.flatten().filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok()).map(|c| c.trim().to_string()).collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().partition(|n| !n.starts_with("kvm"))
}


/// Waits until the guest reported ready (and so ran on every vCPU it asked for).
fn wait_ready(sock: &Path) {
    wait_for(
        || {
            let (code, v) = curl(sock, "GET", "/memory", None);
            code == 200 && v["timings"]["guest_ready"].is_number()
        },
        "the guest to be ready",
    );
}

#[test]
fn a_served_one_vcpu_vm_runs_two_threads() {
    let vm = Served::start("threads-serve", "vm.sock", &["serve", "--serial", "none"]);
    let pid = vm.child.id();
    let (threads, _) = tasks(pid);
    assert_eq!(threads.len(), 1, "serving with no VM: the main thread alone, not {threads:?}");

    let (code, _) = curl(&vm.sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 256}"#));
    assert_eq!(code, 204);
    let (code, _) = curl(&vm.sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(code, 204);
    wait_ready(&vm.sock);
    let (threads, kvm) = tasks(pid);
    assert_eq!(threads.len(), 2, "main and vcpu0, not {threads:?}");
    assert!(threads.iter().any(|n| n == "vcpu0"), "{threads:?}");
    assert!(threads.len() + kvm.len() <= 3, "at most 3 tasks with KVM's: {threads:?} {kvm:?}");
    // The API still answers from the main thread.
    assert_eq!(curl(&vm.sock, "GET", "/", None).0, 200);
}

#[test]
fn a_running_two_vcpu_vm_runs_three_threads() {
    let args = ["run", "--mem-mib", "256", "--vcpus", "2", "--memmap-init", "parallel", "--serial", "none"];
    let vm = Served::start("threads-run", "vm.sock", &args);
    let pid = vm.child.id();
    wait_ready(&vm.sock);
    wait_for(|| tasks(pid).0.iter().any(|n| n == "vcpu1"), "the application processor's thread");
    let (threads, _) = tasks(pid);
    assert_eq!(threads.len(), 3, "main, vcpu0 and vcpu1, not {threads:?}");
}

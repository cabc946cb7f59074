//! KVM's own floor on this host ([`measure`]): the kernel memory that a bare
//! 1-vCPU VM is charged, measured in a memory cgroup of its own before a
//! density run starts its fleet. So the report can say how much of a VM's
//! "KVM + kernel" share belongs to KVM whatever a VMM does, and how much is
//! left for the VMM to cut.
//!
//! The probe VMs are as small as a VM can be: 2 MiB of RAM in one memslot,
//! the VMM's own boot data (page tables, GDT) and one `hlt` at the entry, one
//! vCPU. The probe reads the cgroup's kernel memory three times: before the
//! VMs exist (their guest RAM is already written, so its page tables are not
//! counted), once they and their vCPUs are created, and once every vCPU has
//! run to its `hlt`. The last step is where KVM fills the vCPU's MMU caches
//! (`kvm_mmu_topup_memory_cache`: pages of shadow page tables kept ready,
//! whether or not the guest ever needs them), which on a shadow-paging host
//! (PVM) is most of the floor.
//!
//! The probe runs in a forked child that joins the probe cgroup, so nothing
//! else is charged there: the runner must still be single-threaded (it is,
//! before the fleet starts), and the child only builds the VMs, writes its
//! three readings to a pipe and exits.

use super::cgroup::FleetCgroup;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Probe VMs created: enough to average the slab's rounding away, few
/// enough to take milliseconds.
pub const PROBE_VMS: u32 = 16;

/// Guest RAM of each probe VM.
const PROBE_RAM: u64 = 2 << 20;

/// How long the runner waits for the probe child.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The floor, per probe VM, in bytes of kernel memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KvmFloor {
    /// Probe VMs the figures are the mean of.
    pub vms: u32,
    /// Charged by `KVM_CREATE_VM`, one 2 MiB memslot and `KVM_CREATE_VCPU`.
    pub created_bytes: u64,
    /// Charged by the vCPU's first `KVM_RUN` (up to a `hlt`).
    pub first_run_bytes: u64,
    /// The two together: what a 1-vCPU VM that has run costs the host's
    /// kernel at the least.
    pub kernel_bytes: u64,
    /// Median time to create one (the three ioctls and its registers), µs.
    pub create_us: f64,
    /// Median time of its vCPU's first `KVM_RUN`, from the entry to the
    /// `hlt` exit, µs: the least a guest's first instruction costs here.
    pub first_run_us: f64,
}

/// The floor in `report.json`, or why it was not measured.
#[derive(Debug, Clone, Serialize)]
pub struct KvmFloorInfo {
    pub floor: Option<KvmFloor>,
    pub unavailable: Option<String>,
}

impl KvmFloorInfo {
    /// Measures the floor now, or says why not.
    pub fn measure(cgroup_name: &str) -> KvmFloorInfo {
        match measure(cgroup_name) {
            Ok(f) => KvmFloorInfo { floor: Some(f), unavailable: None },
            Err(e) => KvmFloorInfo { floor: None, unavailable: Some(e.to_string()) },
        }
    }
}

/// Why the floor was not measured.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("the runner has {0} threads; the probe forks only a single-threaded runner")]
    Threads(u64),
    #[error("no memory cgroup for the probe: {0}")]
    Cgroup(#[from] super::cgroup::CgroupError),
    #[error("the probe cgroup gives no kernel memory figure")]
    NoKernelFigure,
    #[error("cannot start the probe: {0}")]
    Spawn(std::io::Error),
    #[error("the probe did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the probe failed: {0}")]
    Probe(String),
}

/// Builds [`PROBE_VMS`] bare VMs in a child process inside cgroup
/// `cgroup_name` (a child of the runner's memory cgroup, removed after).
pub fn measure(cgroup_name: &str) -> Result<KvmFloor, FloorError> {
    let threads = procfs::process::Process::myself().and_then(|p| p.status()).map(|s| s.threads).unwrap_or(0);
    if threads != 1 {
        return Err(FloorError::Threads(threads));
    }
    let cg = FleetCgroup::create(cgroup_name)?;
    cg.read().ok().and_then(|m| m.kernel).ok_or(FloorError::NoKernelFigure)?;
    let mut fds = [0; 2];
    // SAFETY: `pipe2` writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(FloorError::Spawn(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just returned by `pipe2` and are owned
    // by nothing else.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the runner is single-threaded (checked above), so the child
    // is a whole copy of it and may run ordinary code; it leaves only by
    // `_exit`, running no destructor of the runner's state.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(FloorError::Spawn(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read_end);
        let text = match super::cgroup::join_from_child(cg.procs_fd()).map_err(|e| e.to_string()).and_then(|()| probe(&cg)) {
            Ok([a, b, c, d, e]) => format!("ok {a} {b} {c} {d} {e}"),
            Err(e) => format!("err {e}"),
        };
        let mut out = std::fs::File::from(write_end);
        let _ = std::io::Write::write_all(&mut out, text.as_bytes());
        // SAFETY: ends the child without unwinding into the runner's state.
        unsafe { libc::_exit(0) }
    }
    drop(write_end);
    let answer = read_with_deadline(read_end, Instant::now() + PROBE_TIMEOUT);
    if answer.is_none() {
        // SAFETY: `pid` is the child forked above, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: reaps the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(cg);
    let answer = answer.ok_or(FloorError::Timeout(PROBE_TIMEOUT))?;
    parse_answer(&answer)
}

/// What the child wrote, once it closed the pipe; `None` past `deadline`.
fn read_with_deadline(fd: OwnedFd, deadline: Instant) -> Option<String> {
    let mut buf = Vec::new();
    let mut file = std::fs::File::from(fd);
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut p = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
        if n <= 0 {
            continue;
        }
        let mut chunk = [0u8; 256];
        match file.read(&mut chunk) {
            Ok(0) => return Some(String::from_utf8_lossy(&buf).into_owned()),
            Ok(k) if buf.len() + k <= 4096 => buf.extend_from_slice(&chunk[..k]),
            Ok(_) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// `ok K0 K1 K2 C R` (the cgroup's kernel memory before, after creating,
/// after running; the median create and first-run times in ns) into the
/// floor per VM.
fn parse_answer(text: &str) -> Result<KvmFloor, FloorError> {
    if let Some(why) = text.strip_prefix("err ") {
        return Err(FloorError::Probe(why.to_string()));
    }
    let nums: Vec<u64> = text.strip_prefix("ok ").unwrap_or("").split(' ').filter_map(|v| v.parse().ok()).collect();
    let [k0, k1, k2, create_ns, run_ns] = nums[..] else {
        return Err(FloorError::Probe(format!("unexpected answer {text:?}")));
    };
    let per_vm = |a: u64, b: u64| b.saturating_sub(a) / u64::from(PROBE_VMS);
    let (created, run) = (per_vm(k0, k1), per_vm(k1, k2));
    Ok(KvmFloor {
        vms: PROBE_VMS,
        created_bytes: created,
        first_run_bytes: run,
        kernel_bytes: created + run,
        create_us: create_ns as f64 / 1000.0,
        first_run_us: run_ns as f64 / 1000.0,
    })
}

/// One probe VM: its RAM, VM and vCPU.
struct ProbeVm {
    _mem: GuestMemoryMmap,
    _vm: VmFd,
    vcpu: VcpuFd,
}

/// The median of some durations, in ns (0 for none).
fn median_ns(d: Vec<Duration>) -> u64 {
    crate::stats::Sorted::new(d.iter().map(|x| x.as_nanos() as f64)).median().map_or(0, |m| m as u64)
}

/// In the child: the three readings of the cgroup's kernel memory, and the
/// median create and first-run times.
fn probe(cg: &FleetCgroup) -> Result<[u64; 5], String> {
    let kernel = || cg.read().ok().and_then(|m| m.kernel).ok_or_else(|| "the cgroup gives no kernel figure".to_string());
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // Guest RAM first, written, so that its page tables are charged before
    // the first reading.
    let mut rams = Vec::new();
    for _ in 0..PROBE_VMS {
        let mem = vmm::memory::create_ram(&vmm::arch::ram_ranges(PROBE_RAM), false).map_err(|e| e.to_string())?;
        vmm::arch::write_boot_data(&mem, "", true).map_err(|e| e.to_string())?;
        vm_memory::Bytes::write_obj(&mem, 0xf4u8, GuestAddress(vmm::arch::layout::HIMEM_START)).map_err(|e| e.to_string())?;
        rams.push(mem);
    }
    let k0 = kernel()?;
    let mut vms = Vec::new();
    let (mut create, mut run) = (Vec::new(), Vec::new());
    for mem in rams {
        let t = Instant::now();
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        let region = mem.iter().next().ok_or("no RAM region")?;
        let slot = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned
        // by `mem`, which the probe VM keeps until after the VM is closed.
        unsafe { vm.set_user_memory_region(slot) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        vcpu.set_sregs(&vmm::arch::long_mode_sregs(sregs, vmm::arch::layout::PML4_START)).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        vcpu.set_regs(&vmm::arch::boot_regs(vmm::arch::layout::HIMEM_START)).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        create.push(t.elapsed());
        vms.push(ProbeVm { _mem: mem, _vm: vm, vcpu });
    }
    let k1 = kernel()?;
    for v in &mut vms {
        let t = Instant::now();
        let exit = v.vcpu.run();
        run.push(t.elapsed());
        match exit {
            Ok(VcpuExit::Hlt) => {}
            Ok(other) => return Err(format!("the probe vCPU stopped with {other:?}, not at its hlt")),
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    let k2 = kernel()?;
    Ok([k0, k1, k2, median_ns(create), median_ns(run)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_split_per_vm_and_errors_are_kept() {
        let n = u64::from(PROBE_VMS);
        let f = parse_answer(&format!("ok 1000 {} {} 450000 1500", 1000 + 200 * 1024 * n, 1000 + 560 * 1024 * n)).unwrap();
        assert_eq!((f.created_bytes, f.first_run_bytes, f.kernel_bytes), (200 << 10, 360 << 10, 560 << 10));
        assert_eq!((f.create_us, f.first_run_us), (450.0, 1.5));
        assert_eq!(median_ns(vec![Duration::from_nanos(3), Duration::from_nanos(1), Duration::from_nanos(2)]), 2);
        assert_eq!(median_ns(Vec::new()), 0);
        assert!(matches!(parse_answer("err cannot open /dev/kvm"), Err(FloorError::Probe(m)) if m == "cannot open /dev/kvm"));
        assert!(matches!(parse_answer("ok 1 2"), Err(FloorError::Probe(_))));
        assert!(matches!(parse_answer(""), Err(FloorError::Probe(_))));
        // A cgroup that shrank (another probe's memory freed) reads as 0, not as a wrap.
        assert_eq!(parse_answer("ok 5000 4000 4000 1 1").unwrap().kernel_bytes, 0);
    }
}

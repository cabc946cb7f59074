//! Application processors: started by the VMM directly in long mode (see
//! `guest_abi::ApBoot`), they run one posted job, then park in a port read.
//!
//! Which job, and on how many CPUs, is the memory manager's choice (its
//! strategy: a share of the parallel memmap initialization, or the
//! background initialization of the rest of the memmap on CPU 1): [`Aps`]
//! gives it these CPUs through `guest_kernel::mm::Cpus`. A job is posted
//! before the APs start, so an AP never waits for a release it could have
//! missed.

use crate::arch::{self, entry};
use crate::{pv, stats, MM};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use guest_abi::{port, ApBoot, ABI_VERSION, AP_BOOT_MAGIC};
use guest_kernel::mm::{ApJob, Cpus};

/// The posted job (`ApJob::to_raw`; 0: none).
static JOB: AtomicU64 = AtomicU64::new(0);
/// APs that finished the current job.
static DONE: AtomicU32 = AtomicU32::new(0);
/// APs started for the current job.
static STARTED: AtomicU32 = AtomicU32::new(0);
/// A function the APs run instead of jobs (`fn(cpu) -> !` as a number;
/// 0: none), for the attack workloads.
static AP_MAIN: AtomicUsize = AtomicUsize::new(0);
/// Whether the kernel runs in ring 0 (APs follow the boot CPU).
pub static RING0: AtomicBool = AtomicBool::new(false);

/// Whether every started AP has finished its job (and is parked or about to
/// park): then no other CPU runs kernel code that has jump sites.
pub fn aps_idle() -> bool {
    DONE.load(Ordering::Acquire) >= STARTED.load(Ordering::Acquire)
}

/// vCPUs the VMM gave this VM (1 without the paravirtual interface).
pub fn cpu_count() -> u32 {
    if !pv::present() {
        return 1;
    }
    arch::inl(port::CPU_COUNT).clamp(1, entry::MAX_CPUS as u32)
}

#[link_section = ".bss_pages"]
static AP_BOOT: pv::Shared<ApBoot> = pv::Shared::new(ApBoot {
    magic: 0, abi_version: 0, entry: 0, cr3: 0, stacks_base: 0, stack_size: 0, cpu_count: 0, reserved: 0,
});

/// Posts `job` and starts CPUs 1..`cpus`; they run it at once.
fn start_aps(job: u64, cpus: u32) {
    DONE.store(0, Ordering::Relaxed);
    STARTED.store(cpus - 1, Ordering::Release);
    JOB.store(job, Ordering::Release);
    let rec = ApBoot {
        magic: AP_BOOT_MAGIC,
        abi_version: ABI_VERSION,
        entry: entry::ap_start as *const () as u64,
        cr3: (&raw const entry::PML4) as u64,
        stacks_base: (&raw const entry::AP_STACKS) as u64,
        stack_size: entry::AP_STACK_SIZE as u64,
        cpu_count: cpus,
        reserved: 0,
    };
    // SAFETY: the record is static and written before the VMM is told.
    unsafe { AP_BOOT.ptr().write_volatile(rec) };
    arch::outl(port::AP_BOOT, AP_BOOT.ptr() as u64 as u32);
}

/// Starts CPUs 1..`cpus` (`cpus` > 1) running `f(cpu)` instead of a job.
/// Only before any AP was started (the VMM starts them once).
pub fn start_aps_running(f: fn(u64) -> !, cpus: u32) {
    AP_MAIN.store(f as usize, Ordering::Release);
    start_aps(0, cpus);
}

/// This VM's CPUs, as the memory manager's strategies use them.
pub struct Aps;

impl Cpus for Aps {
    fn count(&self) -> u32 {
        cpu_count()
    }

    fn start(&self, job: ApJob, cpus: u32) {
        start_aps(job.to_raw(), cpus);
    }

    fn wait(&self) {
        while !aps_idle() {
            core::hint::spin_loop();
        }
    }

    fn progress(&self) {
        stats::publish_memory_stats();
    }
}

/// An application processor, in ring 3 after `arch::entry`.
pub fn ap_main(cpu: u64) -> ! {
    if RING0.load(Ordering::Acquire) && arch::cpl() != 0 {
        crate::arch::idt::continue_in_ring0(ap_ring0, cpu)
    }
    ap_run(cpu)
}

extern "C" fn ap_ring0(cpu: u64) -> ! {
    ap_run(cpu)
}

fn ap_run(cpu: u64) -> ! {
    let main = AP_MAIN.load(Ordering::Acquire);
    if main != 0 {
        // SAFETY: a nonzero AP_MAIN was stored from a `fn(u64) -> !` by
        // `start_aps_running`, before the APs started.
        let f = unsafe { core::mem::transmute::<usize, fn(u64) -> !>(main) };
        f(cpu)
    }
    loop {
        if let Some(job) = ApJob::from_raw(JOB.load(Ordering::Acquire)) {
            if let Err(e) = MM.run_ap_job(job, cpu, &Aps) {
                panic!("memmap init on CPU {cpu} ({job:?}): {e}");
            }
        }
        DONE.fetch_add(1, Ordering::Release);
        // Park until the boot CPU posts another job (none today).
        arch::inl(port::AP_PARK);
    }
}

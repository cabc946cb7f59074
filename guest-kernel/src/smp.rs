//! Application processors: started by the VMM directly in long mode (see
//! `guest_abi::ApBoot`), they run one posted job, then park in a port read.
//!
//! Jobs: a share of the parallel memmap initialization (`memmap_init=parallel`,
//! like Linux's padata-parallel deferred init), or the background
//! initialization of the rest of the memmap (`memmap_init=deferred`, like
//! Linux's `pgdatinit` threads). A job is posted before the APs start, so an
//! AP never waits for a release it could have missed.

use crate::arch::{self, entry};
use crate::{pv, MM};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use guest_abi::{port, ApBoot, ABI_VERSION, AP_BOOT_MAGIC};

const JOB_NONE: u32 = 0;
const JOB_PARALLEL_INIT: u32 = 1;
const JOB_BACKGROUND_INIT: u32 = 2;

static JOB: AtomicU32 = AtomicU32::new(JOB_NONE);
static JOB_CPUS: AtomicU64 = AtomicU64::new(1);
/// APs that finished the current job.
static DONE: AtomicU32 = AtomicU32::new(0);
/// Whether the kernel runs in ring 0 (APs follow the boot CPU).
pub static RING0: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// APs started for the current job.
static STARTED: AtomicU32 = AtomicU32::new(0);

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

static AP_BOOT: pv::Shared<ApBoot> = pv::Shared::new(ApBoot {
    magic: 0, abi_version: 0, entry: 0, cr3: 0, stacks_base: 0, stack_size: 0, cpu_count: 0, reserved: 0,
});

/// Posts `job` and starts CPUs 1..`cpus`; they run it at once.
fn start_aps(job: u32, cpus: u32) {
    JOB_CPUS.store(u64::from(cpus), Ordering::Relaxed);
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

/// Initializes the memmap on every CPU (`parallel`); returns how many CPUs took part.
pub fn parallel_init() -> u32 {
    let cpus = cpu_count();
    if cpus > 1 {
        start_aps(JOB_PARALLEL_INIT, cpus);
    }
    let n = u64::from(cpus);
    if let Err(e) = MM.parallel_init_share(0, n) {
        panic!("parallel memmap init: {e}");
    }
    while DONE.load(Ordering::Acquire) < cpus - 1 {
        core::hint::spin_loop();
    }
    if let Err(e) = MM.parallel_finish() {
        panic!("parallel memmap init: {e}");
    }
    cpus
}

/// Starts background memmap initialization on CPU 1 (`deferred`); false if
/// there is no second CPU (the boot CPU then works between commands).
pub fn start_background_init() -> bool {
    let cpus = cpu_count();
    if cpus < 2 {
        return false;
    }
    start_aps(JOB_BACKGROUND_INIT, 2);
    true
}

/// Runs background initialization steps until none remain, publishing stats.
pub fn background_until_done() {
    while MM.background_step() {
        crate::kernel::publish_memory_stats();
    }
    crate::kernel::publish_memory_stats();
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
    loop {
        match JOB.load(Ordering::Acquire) {
            JOB_PARALLEL_INIT => {
                let n = JOB_CPUS.load(Ordering::Relaxed);
                if cpu < n {
                    if let Err(e) = MM.parallel_init_share(cpu, n) {
                        panic!("parallel memmap init on CPU {cpu}: {e}");
                    }
                }
            }
            JOB_BACKGROUND_INIT if cpu == 1 => background_until_done(),
            _ => {}
        }
        DONE.fetch_add(1, Ordering::Release);
        // Park until the boot CPU posts another job (none today).
        arch::inl(port::AP_PARK);
    }
}

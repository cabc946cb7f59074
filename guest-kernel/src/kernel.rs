//! Kernel main: boot sequence, memory set-up, workloads, the command loop,
//! the panic handler.

use crate::arch::{self, entry, idt, rdtsc};
use crate::workload::Workload;
use crate::{bootparams, pv, smp, stats, MM};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_abi::{exit_code, Command, CommandStatus, Phase, Reclaim, PAGE_SIZE, WAIT_TIMED_OUT};
use guest_kernel::config::{Config, Workload as BootWorkload};
use guest_kernel::mm::{Booted, MmConfig, PhysRange, GROW_CHECK};

/// The last page of RAM (for `workload=touch-offline`).
static LAST_RAM_PAGE: AtomicU64 = AtomicU64::new(0);
static TSC_ENTRY: AtomicU64 = AtomicU64::new(0);
/// End of the identity-mapped RAM, and the RAM ranges below it (for the attacks).
static MAPPED: AtomicU64 = AtomicU64::new(0);
static RAM: [[AtomicU64; 2]; 8] = [const { [const { AtomicU64::new(0) }; 2] }; 8];

/// Entered in ring 3 from `arch::entry` on every CPU.
#[no_mangle]
pub extern "C" fn kernel_entry(cpu: u64, boot_params: u64, tsc_entry: u64, ring3_entry: u64) -> ! {
    if cpu != 0 {
        smp::ap_main(cpu)
    }
    idt::init();
    TSC_ENTRY.store(tsc_entry, Ordering::Relaxed);
    if ring3_entry != 0 {
        stats::entered_in_ring3();
    }
    let info = bootparams::parse(boot_params);
    let config = match Config::parse(info.cmdline) {
        Ok(c) => c,
        Err(e) => {
            crate::serial::probe();
            pv::probe();
            println!("guest: bad value for `{}=` on the command line: {:?}", e.key, info.cmdline);
            pv::exit(exit_code::BOOT_FAILED)
        }
    };
    if config.cpl == 0 && arch::cpl() != 0 {
        smp::RING0.store(true, Ordering::Release);
        let parsed = (info, config);
        idt::continue_in_ring0(boot_ring0, &raw const parsed as u64)
    }
    boot(&info, &config)
}

/// `boot`, in ring 0, with what `kernel_entry` parsed in ring 3.
extern "C" fn boot_ring0(parsed: u64) -> ! {
    // SAFETY: `parsed` points at the tuple in `kernel_entry`'s frame on the
    // ring-3 stack. That frame never returns, and ring 0 runs on its own
    // stack, so the tuple stays intact and unaliased.
    let (info, config) = unsafe { &*(parsed as *const (bootparams::BootInfo, Config)) };
    boot(info, config)
}

fn boot(info: &bootparams::BootInfo, config: &Config) -> ! {
    crate::serial::QUIET.store(config.quiet, Ordering::Relaxed);
    crate::serial::probe();
    let pv = pv::probe();
    pv::phase(Phase::Entered);
    let ram_end = info.ram_end();
    LAST_RAM_PAGE.store(ram_end.saturating_sub(4096), Ordering::Relaxed);
    let mapped = arch::paging::map_ram(ram_end);
    MAPPED.store(mapped, Ordering::Relaxed);
    for (slot, e) in RAM.iter().zip(info.ram()) {
        slot[0].store(e.addr, Ordering::Relaxed);
        slot[1].store((e.addr + e.size).min(mapped), Ordering::Relaxed);
    }
    let ram_mib = info.ram().map(|e| e.size).sum::<u64>() >> 20;
    println!(
        "guest: up in ring {}, {} MiB RAM, paravirtual interface {}",
        arch::cpl(),
        ram_mib,
        if pv { "present" } else { "absent" }
    );
    if mapped < ram_end {
        println!("guest: RAM above {} GiB is not mapped", mapped >> 30);
    }
    pv::publish_stats(|s| {
        s.tsc_entry = TSC_ENTRY.load(Ordering::Relaxed);
        s.cpus = 1;
        s.flags |= stats::entry_flags();
    });
    pv::announce();
    // What the VMM registered before this vCPU ran is online already.
    if let Some(rec) = &info.boot_online {
        match rec.ranges(ram_end) {
            Ok(ranges) => pv::mark_online(ranges),
            Err(e) => println!("guest: boot-online record ignored: {e}"),
        }
    }

    let booted = init_memory(info, config, mapped);
    workload().set_chunk(config.chunk_bytes);
    match config.workload {
        // Test workloads that break the stats channel, before the VMM looks.
        BootWorkload::CorruptStats => stats::corrupt(),
        BootWorkload::CorruptStatsAddr if pv => arch::outl(guest_abi::port::STATS, 0xffff_f000),
        _ => {}
    }
    stats::publish_memory_stats();
    pv::publish_stats(|s| {
        s.tsc_memory_ready = rdtsc();
        s.cpus = booted.cpus;
    });
    pv::phase(Phase::MemoryReady);
    let st = MM.stats();
    println!(
        "guest: memmap {}: {} KiB of {} KiB initialized, {} MiB free",
        config.strategy.name(),
        st.memmap_bytes_initialized >> 10,
        st.memmap_bytes_reserved >> 10,
        (st.free_pages * PAGE_SIZE) >> 20
    );
    pv::publish_stats(|s| s.tsc_ready = rdtsc());
    pv::phase(Phase::Ready);
    println!("guest: ready");
    run_workload(config, &booted)
}

/// Sets up the memory manager and has it do the strategy's boot-time work,
/// on the application processors too; returns what it set going.
fn init_memory(info: &bootparams::BootInfo, config: &Config, mapped: u64) -> Booted {
    let mut ram = [PhysRange::from_len(0, 0); 32];
    let mut n = 0;
    for e in info.ram() {
        let end = (e.addr + e.size).min(mapped);
        if e.addr < end && n < ram.len() {
            ram[n] = PhysRange { start: guest_kernel::mm::PhysAddr(e.addr), end: guest_kernel::mm::PhysAddr(end) };
            n += 1;
        }
    }
    let (kstart, kend) = ((&raw const entry::__kernel_start) as u64, (&raw const entry::__kernel_end) as u64);
    // Low memory (boot data, the VMM's tables) and the kernel image with its
    // .bss, stacks and spare page directories.
    let reserved = [PhysRange::from_len(0, 0x10_0000), PhysRange::from_len(kstart, kend - kstart)];
    let (reclaim, downgraded) = config.reclaim_mode();
    if downgraded {
        println!("guest: reclaim=full needs memmap_init=ondemand; using reclaim=data");
    }
    pv::set_reclaim_delay(config.reclaim_delay_ms);
    let cfg = MmConfig {
        strategy: config.strategy,
        chunk_bytes: config.chunk_bytes,
        memmap_on_memory: config.memmap_on_memory,
        reclaim,
        reclaim_reserve_pages: config.reclaim_reserve_bytes / PAGE_SIZE,
        ..MmConfig::new(config.strategy)
    };
    // SAFETY: all RAM below `mapped` is identity-mapped and writable, and the
    // reserved ranges cover everything the kernel already uses.
    if let Err(e) = unsafe { MM.init(cfg, &ram[..n], &reserved, core::ptr::null_mut(), rdtsc) } {
        println!("guest: memory manager: {e}");
        pv::exit(exit_code::BOOT_FAILED)
    }
    // Memory is registered with KVM as the allocator first needs it.
    MM.set_online_hook(|r| pv::online_memory(r.start.0, r.end.0));
    let booted = match MM.boot(&smp::Aps) {
        Ok(b) => b,
        Err(e) => {
            println!("guest: memory manager boot: {e}");
            pv::exit(exit_code::BOOT_FAILED)
        }
    };
    if MM.fully_initialized() {
        pv::publish_stats(|s| s.tsc_fully_initialized = rdtsc());
    }
    booted
}

/// The workload's state; only the boot CPU touches it.
struct WorkloadCell(core::cell::UnsafeCell<Workload>);
// SAFETY: only the boot CPU runs workloads and commands, one at a time.
unsafe impl Sync for WorkloadCell {}
static WORKLOAD: WorkloadCell = WorkloadCell(core::cell::UnsafeCell::new(Workload::new()));

fn workload() -> &'static mut Workload {
    // SAFETY: only the boot CPU runs workloads and commands, one at a time,
    // and no caller keeps the reference across another call.
    unsafe { &mut *WORKLOAD.0.get() }
}

fn run_workload(config: &Config, booted: &Booted) -> ! {
    match config.workload {
        BootWorkload::Exit => pv::exit(exit_code::OK),
        BootWorkload::Panic => panic!("deliberate panic (workload=panic)"),
        BootWorkload::Fault => {
            println!("guest: clearing the IDT and faulting (workload=fault)");
            idt::clear();
            // SAFETY: deliberately raises #UD with an empty IDT: the CPU
            // triple-faults and the VM stops, which is this workload's point.
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        BootWorkload::Exception => {
            println!("guest: executing ud2 (workload=exception)");
            // SAFETY: deliberately raises #UD; the handler reports it to the
            // VMM and the VM stops, which is this workload's point.
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        BootWorkload::CorruptStats | BootWorkload::CorruptStatsAddr => command_loop(booted),
        BootWorkload::TouchOffline => {
            let last = LAST_RAM_PAGE.load(Ordering::Relaxed);
            println!("guest: writing {last:#x} without onlining it (workload=touch-offline)");
            // SAFETY: the page is RAM, identity-mapped, and unused; writing
            // it without onlining its block is this test workload's point.
            unsafe { (last as *mut u64).write_volatile(1) };
            command_loop(booted)
        }
        BootWorkload::Alloc(bytes) => {
            let status = workload().alloc(bytes, false);
            stats::publish_memory_stats();
            println!("guest: allocated {} MiB: {:?}", workload().held_bytes() >> 20, status);
            command_loop(booted)
        }
        BootWorkload::Wait => command_loop(booted),
        BootWorkload::Attack(a) => {
            let mut m = crate::attack::Machine { ram: [(0, 0); 8], ram_count: 0, ram_end: 0, mapped: MAPPED.load(Ordering::Relaxed) };
            m.ram_end = LAST_RAM_PAGE.load(Ordering::Relaxed) + 4096;
            for (i, r) in RAM.iter().enumerate() {
                let (s, e) = (r[0].load(Ordering::Relaxed), r[1].load(Ordering::Relaxed));
                if e > s {
                    m.ram[i] = (s, e);
                    m.ram_count = i + 1;
                }
            }
            crate::attack::run(a, &m);
            command_loop(booted)
        }
    }
}

/// Serves the VMM's commands. While the strategy leaves background work to
/// this CPU (`deferred`), initializes the memmap between commands. With no
/// VMM channel (Firecracker) there are no commands: the CPU finishes its
/// background work, then idles in `hlt` until the VMM stops the VM.
fn command_loop(booted: &Booted) -> ! {
    let mut background = booted.background_on_boot_cpu && !MM.fully_initialized();
    if !pv::present() {
        while background {
            background = MM.background_step();
        }
        maybe_patch_jump_sites();
        println!("guest: no VMM command channel; idling in hlt until the VMM stops the VM");
        arch::halt_forever()
    }
    loop {
        maybe_patch_jump_sites();
        let seq = if background {
            match pv::poll_command() {
                0 => {
                    background = MM.background_step();
                    stats::publish_memory_stats();
                    continue;
                }
                seq => seq,
            }
        } else {
            wait_or_reclaim()
        };
        let mb = pv::read_mailbox();
        if mb.seq as u32 != seq {
            continue;
        }
        let (status, r0, r1) = run_command(&mb);
        stats::publish_memory_stats();
        pv::complete(mb.seq, status, r0, r1);
    }
}

/// Waits for the next command. With reclaim on and memory freed since the
/// last pass, waits at most the reclaim delay: if no command came by then,
/// every free page has stayed free that long, and a reclaim pass reports it
/// to the VMM (see `guest_kernel::mm::reclaim`).
fn wait_or_reclaim() -> u32 {
    loop {
        let timed = MM.reclaim_wanted();
        if timed {
            pv::set_wait_timeout(pv::reclaim_delay());
        }
        let seq = pv::wait_command();
        if seq != WAIT_TIMED_OUT {
            return seq;
        }
        if timed {
            if MM.config().reclaim == Reclaim::Full {
                rearm_grow_check();
            }
            MM.reclaim(&mut pv::ReclaimPort);
            stats::publish_memory_stats();
        }
    }
}

/// Before a `reclaim=full` pass: writes the grow check's jump sites back and
/// switches it on, so chunks the pass returns to uninitialized can grow
/// again (the pass de-initializes nothing while the key is off). Between
/// commands, with every AP parked, as patching.
fn rearm_grow_check() {
    if GROW_CHECK.is_enabled() || !smp::aps_idle() {
        return;
    }
    if GROW_CHECK.sites_patched() {
        // SAFETY: this CPU is between commands and every AP has finished its
        // job, so no CPU executes a site of the key.
        if let Err(e) = unsafe { arch::jump_label::restore(&GROW_CHECK) } {
            println!("guest: grow check not restored: {e}");
            return;
        }
    }
    GROW_CHECK.enable();
}

/// Once the memory manager is fully initialized, switches the grow check off
/// for good and patches its jump sites out of the allocator (Linux's
/// `page_alloc_init_late` disabling `deferred_pages`), at a point where this
/// CPU runs no allocator code and every AP is parked. The kernel may switch
/// the global key off: `MM` is its only memory manager. (`reclaim=full`
/// switches it back on before a pass may de-initialize chunks.)
fn maybe_patch_jump_sites() {
    if GROW_CHECK.sites_patched() || !MM.fully_initialized() || !smp::aps_idle() {
        return;
    }
    GROW_CHECK.disable();
    // SAFETY: this CPU is between commands and every AP has finished its
    // job, so no CPU executes a site of the key.
    match unsafe { arch::jump_label::patch(&GROW_CHECK) } {
        Ok(n) => {
            stats::publish_memory_stats();
            let s = if n == 1 { "" } else { "s" };
            println!("guest: memmap fully initialized; grow check patched out of {n} jump site{s}");
        }
        Err(e) => println!("guest: grow check not patched: {e}"),
    }
}

fn run_command(mb: &guest_abi::Mailbox) -> (CommandStatus, u64, u64) {
    let w = workload();
    let status = match Command::decode(mb.cmd) {
        Some(Command::Report) => CommandStatus::Ok,
        Some(Command::Alloc) => w.alloc(mb.arg0, mb.arg1 & 1 != 0),
        Some(Command::Free) => w.free(mb.arg0),
        Some(Command::SetTarget) => w.set_target(mb.arg0),
        Some(Command::Shutdown) => {
            pv::complete(mb.seq, CommandStatus::Ok, w.held_bytes(), 0);
            pv::exit(mb.arg0 as u32)
        }
        Some(Command::BenchAllocFree) => {
            return match crate::workload::bench_alloc_free(mb.arg0) {
                Some(cycles) => {
                    let flags = MM.stats().grow_check_on as u64 | (GROW_CHECK.sites_patched() as u64) << 1;
                    (CommandStatus::Ok, cycles, flags)
                }
                None => (CommandStatus::OutOfMemory, 0, 0),
            };
        }
        None => CommandStatus::Invalid,
    };
    (status, w.held_bytes(), 0)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::serial::write_fmt_forced(format_args!("guest: PANIC: {info}\n"), true);
    pv::exit(exit_code::PANIC)
}

//! Kernel main: boot sequence, workloads, the command loop, the panic handler.

use crate::arch::{self, idt, rdtsc};
use crate::{bootparams, pv};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_abi::{exit_code, Command, CommandStatus, Phase};
use guest_kernel::config::{Config, Workload};

/// Boot parameters saved for the ring-0 continuation.
static BOOT_PARAMS: AtomicU64 = AtomicU64::new(0);
static TSC_ENTRY: AtomicU64 = AtomicU64::new(0);

/// Entered in ring 3 from `arch::entry` on every CPU.
#[no_mangle]
pub extern "C" fn kernel_entry(cpu: u64, boot_params: u64, tsc_entry: u64) -> ! {
    if cpu != 0 {
        ap_main(cpu)
    }
    idt::init();
    BOOT_PARAMS.store(boot_params, Ordering::Relaxed);
    TSC_ENTRY.store(tsc_entry, Ordering::Relaxed);
    let info = bootparams::parse(boot_params);
    let config = match Config::parse(info.cmdline) {
        Ok(c) => c,
        Err(e) => {
            pv::probe();
            println!(
                "guest: bad value for `{}=` on the command line: {:?}",
                e.key, info.cmdline
            );
            pv::exit(exit_code::BOOT_FAILED)
        }
    };
    if config.cpl == 0 && arch::cpl() != 0 {
        idt::continue_in_ring0(boot_ring0, 0)
    }
    boot(&info, &config)
}

extern "C" fn boot_ring0(_: u64) -> ! {
    let info = bootparams::parse(BOOT_PARAMS.load(Ordering::Relaxed));
    // The command line parsed before we came here.
    let config = Config::parse(info.cmdline).unwrap_or_default();
    boot(&info, &config)
}

fn boot(info: &bootparams::BootInfo, config: &Config) -> ! {
    crate::serial::QUIET.store(config.quiet, core::sync::atomic::Ordering::Relaxed);
    crate::serial::probe();
    let pv = pv::probe();
    pv::phase(Phase::Entered);
    let ram_end = info.ram_end();
    let mapped = arch::paging::map_ram(ram_end);
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
    });
    pv::announce();
    pv::publish_stats(|s| s.tsc_memory_ready = rdtsc());
    pv::phase(Phase::MemoryReady);
    pv::publish_stats(|s| s.tsc_ready = rdtsc());
    pv::phase(Phase::Ready);
    println!("guest: ready");
    run_workload(config)
}

fn run_workload(config: &Config) -> ! {
    match config.workload {
        Workload::Exit => pv::exit(exit_code::OK),
        Workload::Panic => panic!("deliberate panic (workload=panic)"),
        Workload::Fault => {
            println!("guest: clearing the IDT and faulting (workload=fault)");
            idt::clear();
            // SAFETY: deliberately raises #UD with an empty IDT: the CPU
            // triple-faults and the VM stops, which is this workload's point.
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        Workload::Exception => {
            println!("guest: executing ud2 (workload=exception)");
            // SAFETY: deliberately raises #UD; the handler reports it to the
            // VMM and the VM stops, which is this workload's point.
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        Workload::CorruptStats => {
            pv::publish_stats(|s| {
                s.total_pages = 10;
                s.initialized_pages = 1 << 40;
                s.memmap_range_count = u32::MAX;
                s.flags = u32::MAX;
            });
            command_loop()
        }
        Workload::CorruptStatsAddr => {
            if pv::present() {
                arch::outl(guest_abi::port::STATS, 0xffff_f000);
            }
            command_loop()
        }
        Workload::Alloc(_) | Workload::Wait => command_loop(),
    }
}

/// Serves the VMM's commands; shuts down when there is no VMM channel.
fn command_loop() -> ! {
    if !pv::present() {
        println!("guest: no VMM command channel; shutting down");
        pv::exit(exit_code::OK)
    }
    loop {
        let seq = pv::wait_command();
        let mb = pv::read_mailbox();
        if mb.seq as u32 != seq {
            continue;
        }
        let (status, r0, r1) = match Command::decode(mb.cmd) {
            Some(Command::Report) => (CommandStatus::Ok, 0, 0),
            Some(Command::Shutdown) => {
                pv::complete(mb.seq, CommandStatus::Ok, 0, 0);
                pv::exit(mb.arg0 as u32)
            }
            _ => (CommandStatus::Invalid, 0, 0),
        };
        pv::complete(mb.seq, status, r0, r1);
    }
}

fn ap_main(_cpu: u64) -> ! {
    loop {
        arch::inl(guest_abi::port::AP_PARK);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::serial::write_fmt_forced(format_args!("guest: PANIC: {info}\n"), true);
    pv::exit(exit_code::PANIC)
}

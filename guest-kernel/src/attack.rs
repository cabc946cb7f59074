//! The hostile workloads (`workload=attack-...`, see
//! [`guest_kernel::config::Attack`]) that the VMM's hostile-guest tests
//! boot (`tests/hostile_guest.rs`). Each does what a malicious kernel could:
//! lie on the paravirtual ports, flood the console, touch memory that is
//! not RAM, fault in a loop, abuse memory onlining, touch all of RAM, race
//! the VMM from every vCPU, and report memory it must not give back. None of them returns unless the VMM stops
//! the VM; what the VMM must do in each case is in docs/security.md.
//!
//! The loops run in ring 3 (natively on a PVM host) wherever they can; only
//! the exception handlers of `attack-exceptions` run in ring 0.
//!
//! The multi-vCPU attacks start the application processors themselves
//! ([`smp::start_aps_running`]) and line them up at a barrier, so that they
//! hit the VMM at the same moment.

use crate::arch::{entry, idt, inl, outb, outl};
use crate::{pv, smp};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use guest_abi::{
    port, reclaim_kind, Command, CommandStatus, Phase, ReclaimRange, ReclaimRecord, ABI_VERSION, MAX_RECLAIM_RANGES,
    PAGE_SIZE, RECLAIM_MAGIC,
};
use guest_kernel::config::Attack;

/// What an attack needs to know about the machine.
pub struct Machine {
    /// Usable RAM, `[start, end)`, identity-mapped up to `mapped`.
    pub ram: [(u64, u64); 8],
    /// Entries of `ram` in use.
    pub ram_count: usize,
    /// End of the highest RAM.
    pub ram_end: u64,
    /// End of what the kernel mapped (identity, 2 MiB pages).
    pub mapped: u64,
}

impl Machine {
    fn ram(&self) -> &[(u64, u64)] {
        &self.ram[..self.ram_count]
    }
}

/// The attack's parameters, for the application processors (set before
/// they start).
static MACHINE_RAM: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
static MACHINE_RAM_COUNT: AtomicU32 = AtomicU32::new(0);
static RAM_END: AtomicU64 = AtomicU64::new(0);
static CPUS: AtomicU32 = AtomicU32::new(1);
static ARG: AtomicU32 = AtomicU32::new(0);
static KIND: AtomicU32 = AtomicU32::new(0);
/// CPUs that reached each barrier.
static BARRIER: [AtomicU32; 4] = [const { AtomicU32::new(0) }; 4];
/// CPUs that finished their first pass (memory bomb, onlining abuse).
static FINISHED: AtomicU32 = AtomicU32::new(0);

/// Runs attack `a`. Returns only for the attacks that then serve
/// commands (the caller runs its command loop).
pub fn run(a: Attack, m: &Machine) {
    match a {
        Attack::Exit(code) => pv::exit(code),
        Attack::Spin => loop {
            core::hint::spin_loop();
        },
        Attack::SerialFlood => serial_flood(),
        Attack::Ports => bad_ports(),
        Attack::MailboxSilent => loop {
            // Takes the next command (it is now in flight) and never answers.
            let _ = pv::wait_command();
        },
        Attack::HeldMax => held_max(),
        Attack::ShutdownIgnored => loop {
            let seq = pv::wait_command();
            let mb = pv::read_mailbox();
            if mb.seq as u32 == seq {
                pv::complete(mb.seq, CommandStatus::Ok, 0, 0);
            }
        },
        Attack::Mmio => mmio(m),
        Attack::Exceptions => exception_storm(),
        Attack::MemOnline(n) => {
            start_aps(m, 1, n);
            barrier(0);
            mem_online_abuse(0, n);
            FINISHED.fetch_add(1, Ordering::AcqRel);
            while FINISHED.load(Ordering::Acquire) < CPUS.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
            println!("guest: attack-mem-online: done on {} CPUs", CPUS.load(Ordering::Relaxed));
        }
        Attack::MemoryBomb => {
            for &(s, e) in m.ram() {
                pv::online_memory(s, e);
            }
            all_cpus(m, 2, 0)
        }
        Attack::Race => {
            let cpus = start_aps(m, 3, 0);
            println!("guest: attack-race: {} CPUs hammer the ports", cpus - 1);
        }
        Attack::ExitAll(n) => all_cpus(m, 4, n),
        Attack::ExceptionAll => all_cpus(m, 5, 0),
        Attack::FaultAll => all_cpus(m, 6, 0),
        Attack::Reclaim => bogus_reclaim(m),
    }
}

/// Starts the application processors on attack `kind` (with `arg`) and
/// runs it on this CPU too.
fn all_cpus(m: &Machine, kind: u32, arg: u32) -> ! {
    start_aps(m, kind, arg);
    on_cpu(0)
}

/// Publishes the attack for the application processors and starts them;
/// returns the number of CPUs (this one included).
fn start_aps(m: &Machine, kind: u32, arg: u32) -> u32 {
    for (i, &(s, e)) in m.ram().iter().enumerate() {
        MACHINE_RAM[2 * i].store(s, Ordering::Relaxed);
        MACHINE_RAM[2 * i + 1].store(e.min(m.mapped), Ordering::Relaxed);
    }
    MACHINE_RAM_COUNT.store(m.ram_count as u32, Ordering::Relaxed);
    RAM_END.store(m.ram_end, Ordering::Relaxed);
    KIND.store(kind, Ordering::Relaxed);
    ARG.store(arg, Ordering::Relaxed);
    let cpus = smp::cpu_count();
    CPUS.store(cpus, Ordering::Release);
    if cpus > 1 {
        smp::start_aps_running(on_cpu, cpus);
    }
    cpus
}

/// Waits until every CPU reached barrier `n`.
fn barrier(n: usize) {
    let cpus = CPUS.load(Ordering::Acquire);
    BARRIER[n].fetch_add(1, Ordering::AcqRel);
    while BARRIER[n].load(Ordering::Acquire) < cpus {
        core::hint::spin_loop();
    }
}

/// The multi-CPU attacks, on CPU `cpu` (the boot CPU and every AP).
fn on_cpu(cpu: u64) -> ! {
    let arg = ARG.load(Ordering::Relaxed);
    match KIND.load(Ordering::Acquire) {
        1 => {
            barrier(0);
            mem_online_abuse(cpu, arg);
            FINISHED.fetch_add(1, Ordering::AcqRel);
            park()
        }
        2 => memory_bomb(cpu),
        3 => race(cpu),
        4 => {
            barrier(0);
            outl(port::EXIT, arg.wrapping_add(cpu as u32));
            park()
        }
        5 => {
            barrier(0);
            // SAFETY: deliberately raises #UD; the kernel's handler reports
            // it to the VMM and the VM stops.
            unsafe { asm!("ud2", options(noreturn)) }
        }
        _ => {
            barrier(0);
            if cpu == 0 {
                idt::clear();
            }
            barrier(1);
            // SAFETY: deliberately raises #UD with an empty IDT: the CPU
            // triple-faults.
            unsafe { asm!("ud2", options(noreturn)) }
        }
    }
}

/// Parks an application processor for good (the VMM wakes it only to stop).
fn park() -> ! {
    loop {
        inl(port::AP_PARK);
    }
}

fn serial_flood() -> ! {
    let mut i = 0u32;
    loop {
        outb(port::SERIAL_COM1, if i % 80 == 79 { b'\n' } else { b'A' + (i % 26) as u8 });
        i = i.wrapping_add(1);
    }
}

fn bad_ports() -> ! {
    // Every port but EXIT and EXCEPTION (they end the VM), with values
    // that name nothing: unknown phases, finished commands nobody
    // sent, addresses and memory blocks outside RAM.
    let ports = [
        port::PHASE,
        port::STATS,
        port::MAILBOX,
        port::DONE,
        port::AP_BOOT,
        port::AP_RELEASE,
        port::MEM_ONLINE,
        port::PV_END - 4,
    ];
    let mut i = 0u32;
    loop {
        for p in ports {
            outl(p, 0xffff_0000 | (i & 0xffff));
        }
        i = i.wrapping_add(1);
    }
}

fn held_max() -> ! {
    loop {
        let seq = pv::wait_command();
        let mb = pv::read_mailbox();
        if mb.seq as u32 != seq {
            continue;
        }
        if Command::decode(mb.cmd) == Some(Command::Shutdown) {
            pv::complete(mb.seq, CommandStatus::Ok, 0, 0);
            pv::exit(mb.arg0 as u32);
        }
        pv::complete(mb.seq, CommandStatus::Ok, u64::MAX, u64::MAX);
    }
}

// ---------------------------------------------------------------- MMIO

const GIB: u64 = 1 << 30;
const PAGE_2M: u64 = 2 << 20;
/// Where the MMIO attack maps what it touches: `PML4[1]`, 512 GiB up.
const WINDOW: u64 = 512 * GIB;

#[repr(C, align(4096))]
struct Table([u64; 512]);
#[link_section = ".bss_pages"]
static mut WINDOW_PDPT: Table = Table([0; 512]);
#[link_section = ".bss_pages"]
static mut WINDOW_PD: Table = Table([0; 512]);

/// Maps the 2 MiB page holding guest-physical `gpa` at window slot `slot`;
/// returns the virtual address of `gpa`.
fn map_window(slot: usize, gpa: u64) -> u64 {
    let pml4 = (&raw const entry::PML4) as *mut u64;
    // SAFETY: the window tables are used only by this attack, on the boot
    // CPU; the PML4 is the kernel's own (mapped, writable) and entry 1 is
    // not used by anything else; entries go from not present to present.
    unsafe {
        let pdpt = (&raw mut WINDOW_PDPT.0) as *mut u64;
        let pd = (&raw mut WINDOW_PD.0) as *mut u64;
        pd.add(slot).write_volatile((gpa & !(PAGE_2M - 1)) | 0x87);
        pdpt.write_volatile(pd as u64 | 0x7);
        pml4.add(1).write_volatile(pdpt as u64 | 0x7);
    }
    WINDOW + slot as u64 * PAGE_2M + gpa % PAGE_2M
}

/// The guest's physical address width (CPUID 0x8000_0008).
fn phys_bits() -> u32 {
    let r = core::arch::x86_64::__cpuid(0x8000_0008);
    (r.eax & 0xff).clamp(36, 52)
}

fn read(addr: u64, size: u32) -> u64 {
    // SAFETY: `addr` is mapped by `map_window`; what answers is the VMM's
    // MMIO handler (no RAM behind it), so the read has no effect on memory.
    unsafe {
        match size {
            1 => u64::from((addr as *const u8).read_volatile()),
            2 => u64::from((addr as *const u16).read_volatile()),
            4 => u64::from((addr as *const u32).read_volatile()),
            _ => (addr as *const u64).read_volatile(),
        }
    }
}

fn write(addr: u64, size: u32, v: u64) {
    // SAFETY: as in `read`: nothing but the VMM's MMIO handler (and, for
    // the straddling write, the last bytes of RAM, which nobody uses) is
    // behind the address.
    unsafe {
        match size {
            1 => (addr as *mut u8).write_volatile(v as u8),
            2 => (addr as *mut u16).write_volatile(v as u16),
            4 => (addr as *mut u32).write_volatile(v as u32),
            _ => (addr as *mut u64).write_volatile(v),
        }
    }
}

fn ones(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    }
}

/// `attack-mmio`.
fn mmio(m: &Machine) -> ! {
    let top = (1u64 << phys_bits()) - 4096;
    // Past the end of RAM; the 32-bit hole (never RAM in this layout); the
    // top of 4 GiB; the top of the physical address space.
    let gpas = [m.ram_end.next_multiple_of(4096), 3 * GIB + 0x1000, 4 * GIB - 4096, top];
    let mut addrs = [0u64; 4];
    for (i, &gpa) in gpas.iter().enumerate() {
        addrs[i] = map_window(i, gpa);
    }
    println!("guest: attack-mmio: at {gpas:#x?} (physical address bits: {})", phys_bits());
    let mut bad = 0u32;
    for (&gpa, &va) in gpas.iter().zip(&addrs) {
        for size in [1, 2, 4, 8] {
            let before = read(va, size);
            write(va, size, 0x1234_5678_9abc_def0);
            let after = read(va, size);
            if before != ones(size) || after != ones(size) {
                println!("guest: attack-mmio: {size}-byte access at {gpa:#x}: read {before:#x}, then {after:#x}");
                bad += 1;
            }
        }
    }
    // A write straddling the end of RAM: its RAM half lands, the rest is
    // dropped. The last block is onlined first (touching it otherwise
    // stops the VM, which is the test of `workload=touch-offline`).
    let last = m.ram_end - 4;
    if m.ram_end.is_multiple_of(PAGE_2M) {
        pv::online_memory(m.ram_end - 4096, m.ram_end);
        let va = map_window(4, last);
        map_window(5, m.ram_end);
        write(va, 8, 0x1122_3344_5566_7788);
        let got = read(va, 8);
        if got != 0xffff_ffff_5566_7788 {
            println!("guest: attack-mmio: 8-byte access across the end of RAM at {last:#x}: read {got:#x}");
            bad += 1;
        }
    }
    if bad > 0 {
        println!("guest: attack-mmio: {bad} accesses were not all ones");
        pv::exit(99)
    }
    println!("guest: attack-mmio: all checks passed; now in a loop");
    let mut i = 0u64;
    loop {
        for &va in &addrs {
            write(va, 4, i);
            let _ = read(va, 8);
        }
        i = i.wrapping_add(1);
    }
}

// ---------------------------------------------------------- exceptions

/// Exceptions the storm handled.
#[no_mangle]
static ATTACK_EXCEPTIONS: AtomicU64 = AtomicU64::new(0);
/// Where the storm's handler resumes (set before each faulting instruction).
#[no_mangle]
static ATTACK_RESUME: AtomicU64 = AtomicU64::new(0);

extern "C" {
    fn attack_isr();
    fn attack_isr_err();
}

global_asm!(
    r#"
    .section .text.attack, "ax"
    // Vectors that push an error code drop it first.
attack_isr_err:
    add rsp, 8
attack_isr:
    push rax
    lock inc qword ptr [rip + {count}]
    mov rax, [rip + {resume}]
    mov [rsp + 8], rax              // the saved RIP: resume there
    pop rax
    iretq
    "#,
    count = sym ATTACK_EXCEPTIONS,
    resume = sym ATTACK_RESUME,
);

/// `attack-exceptions`.
fn exception_storm() -> ! {
    for v in [0u8, 3, 6] {
        idt::set_handler(v, attack_isr as *const () as u64);
    }
    for v in [12u8, 13, 14] {
        idt::set_handler(v, attack_isr_err as *const () as u64);
    }
    println!("guest: attack-exceptions: #DE, #BP, #UD, #GP, #PF in a loop");
    let mut reported = 0;
    loop {
        // SAFETY: each of the five faulting instructions has its handler
        // resume at the label after it (`ATTACK_RESUME`); the registers
        // they touch are declared as clobbered.
        unsafe {
            asm!("lea {t}, [rip + 2f]", "mov [rip + {r}], {t}", "ud2", "2:", t = out(reg) _, r = sym ATTACK_RESUME);
            asm!(
                "lea {t}, [rip + 2f]",
                "mov [rip + {r}], {t}",
                "mov {t}, 0x8000000000000000",
                "mov {t}, [{t}]",
                "2:",
                t = out(reg) _,
                r = sym ATTACK_RESUME,
            );
            asm!(
                "lea {t}, [rip + 2f]",
                "mov [rip + {r}], {t}",
                "mov {t}, 0x700000000000",
                "mov {t}, [{t}]",
                "2:",
                t = out(reg) _,
                r = sym ATTACK_RESUME,
            );
            asm!(
                "lea {t}, [rip + 2f]",
                "mov [rip + {r}], {t}",
                "xor edx, edx",
                "xor ecx, ecx",
                "mov eax, 1",
                "div ecx",
                "2:",
                t = out(reg) _,
                r = sym ATTACK_RESUME,
                out("eax") _, out("ecx") _, out("edx") _,
            );
            asm!("lea {t}, [rip + 2f]", "mov [rip + {r}], {t}", "int3", "2:", t = out(reg) _, r = sym ATTACK_RESUME);
        }
        let n = ATTACK_EXCEPTIONS.load(Ordering::Relaxed);
        if n >= reported + 1000 {
            reported = n;
            println!("guest: attack-exceptions: {n} handled");
        }
    }
}

// ------------------------------------------------------------ onlining

/// One CPU's share of `attack-mem-online:N`.
fn mem_online_abuse(cpu: u64, repeats: u32) {
    let cpus = u64::from(CPUS.load(Ordering::Relaxed));
    let mib = RAM_END.load(Ordering::Relaxed) >> 20;
    // Outside RAM: right after it, the 32-bit hole, 64 GiB, the top.
    for v in [mib, 3 << 10, (3 << 10) + 1, 64 << 10, u64::from(u32::MAX) - 1, u64::from(u32::MAX)] {
        outl(port::MEM_ONLINE, v as u32);
    }
    // Every block of RAM (and of the hole), each CPU starting elsewhere,
    // on odd (misaligned) MiB numbers too.
    let start = mib * cpu / cpus;
    for i in 0..mib {
        outl(port::MEM_ONLINE, ((start + i) % mib) as u32);
    }
    // The same block again and again.
    for _ in 0..repeats {
        outl(port::MEM_ONLINE, 0);
    }
}

/// RAM as the boot CPU published it for the APs.
fn ram_ranges() -> impl Iterator<Item = (u64, u64)> {
    let n = MACHINE_RAM_COUNT.load(Ordering::Relaxed) as usize;
    (0..n.min(8)).map(|i| (MACHINE_RAM[2 * i].load(Ordering::Relaxed), MACHINE_RAM[2 * i + 1].load(Ordering::Relaxed)))
}

// --------------------------------------------------------- memory bomb

/// One CPU's share of `attack-memory-bomb`: its slice of every RAM range,
/// but low memory and the kernel image, one word per page, over and over.
fn memory_bomb(cpu: u64) -> ! {
    let cpus = u64::from(CPUS.load(Ordering::Relaxed));
    let (kstart, kend) = ((&raw const entry::__kernel_start) as u64, (&raw const entry::__kernel_end) as u64);
    let mut pass = 0u64;
    loop {
        for (s, e) in ram_ranges() {
            let pages = (e - s) / 4096;
            let (lo, hi) = (s + pages * cpu / cpus * 4096, s + pages * (cpu + 1) / cpus * 4096);
            let mut a = lo.max(1 << 20);
            while a < hi {
                if a >= kend || a + 4096 <= kstart {
                    // SAFETY: `a` is RAM, identity-mapped and onlined, and
                    // neither low memory nor the kernel image; nothing this
                    // attack still runs uses it (it never allocates again).
                    unsafe { (a as *mut u64).write_volatile(pass ^ a) };
                }
                a += 4096;
            }
        }
        if pass == 0 && FINISHED.fetch_add(1, Ordering::AcqRel) + 1 == cpus as u32 {
            println!("guest: attack-memory-bomb: every page written on {cpus} CPUs");
        }
        pass += 1;
    }
}

// --------------------------------------------------------------- races

/// 1 while one of `attack-race`'s APs is parked (or about to park).
static RACE_PARKED: AtomicU32 = AtomicU32::new(0);

/// An application processor's share of `attack-race`.
fn race(cpu: u64) -> ! {
    if cpu == 0 {
        // The boot CPU serves commands (`run`); it never gets here.
        park()
    }
    let cpus = CPUS.load(Ordering::Relaxed);
    let mailbox = pv::MAILBOX.ptr() as u64 as u32;
    let stats = pv::STATS.ptr() as u64 as u32;
    let mut i = 0u32;
    loop {
        match i % 10 {
            0 => outl(port::DONE, i / 10),
            1 => outl(port::DONE, u32::MAX - i),
            2 => outl(port::MAILBOX, mailbox),
            3 => outl(port::STATS, stats),
            4 => outl(port::AP_BOOT, 0x1000),
            5 => outl(port::AP_RELEASE, i),
            6 => outl(port::PHASE, Phase::Ready as u32),
            7 => {
                // Steals a command from the boot CPU and answers it with
                // whatever the mailbox holds.
                let seq = inl(port::POLL);
                if seq != 0 {
                    outl(port::DONE, seq);
                }
            }
            8 => {
                let _ = inl(port::CPU_COUNT);
            }
            _ => {
                // Parks where another AP can release it: one AP at a time,
                // so that another always runs and releases it (at `5`)
                // within ten rounds. Without the token every AP could park
                // at once, and the attack would end for good (issue 10's
                // flaky race test: the VM's exits stopped after a few
                // thousand protocol errors, sometimes after a handful).
                if cpus > 2 && i % 1000 == 9 && RACE_PARKED.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    inl(port::AP_PARK);
                    RACE_PARKED.store(0, Ordering::Release);
                }
            }
        }
        i = i.wrapping_add(1);
    }
}

// ------------------------------------------------------------- reclaim

/// The record `attack-reclaim` sends (its own, so that the kernel's reclaim
/// passes keep theirs).
#[link_section = ".bss_pages"]
static BOGUS: pv::Shared<ReclaimRecord> = pv::Shared::new(zero_record());

const fn zero_record() -> ReclaimRecord {
    // SAFETY: ReclaimRecord is plain integers; all-zero is a valid value.
    unsafe { core::mem::zeroed() }
}

/// Writes `rec` to [`BOGUS`] and hands the VMM its address (or `gpa`, an
/// address where no record can be); returns `accepted` as it is then.
fn send_record(rec: &ReclaimRecord, gpa: Option<u32>) -> u64 {
    let p = BOGUS.ptr();
    // SAFETY: `BOGUS` is used only by this attack, on the boot CPU; the VMM
    // reads it (and writes `accepted`) during the port write.
    unsafe {
        p.write_volatile(*rec);
        (&raw mut (*p).accepted).write_volatile(u64::MAX);
        outl(port::RECLAIM, gpa.unwrap_or(p as u64 as u32));
        (&raw const (*p).accepted).read_volatile()
    }
}

/// A record of `ranges`, `(kind, start, len)`.
fn record(ranges: &[(u32, u64, u64)]) -> ReclaimRecord {
    let mut rec = zero_record();
    rec.magic = RECLAIM_MAGIC;
    rec.abi_version = ABI_VERSION;
    rec.count = ranges.len().min(MAX_RECLAIM_RANGES) as u32;
    for (slot, &(kind, start, len)) in rec.ranges.iter_mut().zip(ranges) {
        *slot = ReclaimRange { start, len, kind, reserved: 0 };
    }
    rec
}

/// The value `attack-reclaim` writes into each word of `[start, start + len)`.
fn pattern(a: u64) -> u64 {
    a.rotate_left(17) ^ 0xa5a5_5a5a_0f0f_f0f0
}

fn fill(start: u64, len: u64) {
    for a in (start..start + len).step_by(8) {
        // SAFETY: `[start, start + len)` is a block this attack allocated
        // (RAM, identity-mapped, online) and nothing else uses.
        unsafe { (a as *mut u64).write_volatile(pattern(a)) };
    }
}

/// Words of `[start, start + len)` that still hold the pattern.
fn intact_words(start: u64, len: u64) -> u64 {
    // SAFETY: as in `fill`.
    (start..start + len).step_by(8).filter(|&a| unsafe { (a as *const u64).read_volatile() } == pattern(a)).count() as u64
}

/// Stops the VM with exit code 99 after saying why.
fn reclaim_failed(what: core::fmt::Arguments<'_>) -> ! {
    println!("guest: attack-reclaim: FAILED: {what}");
    pv::exit(99)
}

/// `attack-reclaim`. Two chunks of the guest's own memory hold a pattern:
/// `mine` is reported (once, correctly) and may be lost; `kept` is inside
/// or next to every bogus range and must be left alone, as must everything
/// the VMM protects (the kernel, whose `.bss` holds the stats block; the
/// boot data; the memmap, which the guest still runs on). Prints how many
/// ranges and records the VMM had to reject, which the test compares with
/// the VMM's count.
fn bogus_reclaim(m: &Machine) {
    // SAFETY: a copy of the published stats block (the VMM reads it too).
    let stats = unsafe { pv::STATS.ptr().read_volatile() };
    let chunk = stats.chunk_bytes;
    let order = (chunk / PAGE_SIZE).trailing_zeros();
    if !chunk.is_power_of_two() || order > guest_kernel::mm::MAX_ORDER || stats.memmap_range_count == 0 {
        reclaim_failed(format_args!("chunk {chunk:#x} or memmap ranges {} unusable", stats.memmap_range_count))
    }
    let alloc = || match crate::MM.alloc_pages(order) {
        Some(pfn) => pfn.0 * PAGE_SIZE,
        None => reclaim_failed(format_args!("no free chunk")),
    };
    // Buddy blocks of the chunk's order are chunk-aligned.
    let (mine, kept) = (alloc(), alloc());
    fill(mine, chunk);
    fill(kept, chunk);
    let memmap = stats.memmap_ranges[0].start;
    let kernel = (&raw const entry::__kernel_start) as u64;
    let stats_at = pv::STATS.ptr() as u64;
    let end = m.ram_end;
    let down = |a: u64| a - a % chunk;
    let run = |a: u64| a - a % guest_abi::online_run(a);
    println!(
        "guest: attack-reclaim: chunk {chunk:#x}; own memory at {mine:#x} and {kept:#x}; kernel {kernel:#x}, \
         stats block {stats_at:#x}, memmap {memmap:#x}, end of RAM {end:#x}"
    );
    let mut rejected = 0u64;
    let mut check = |what: &str, rec: &ReclaimRecord, gpa: Option<u32>, want: u64, ranges: u64| {
        let got = send_record(rec, gpa);
        // A record the VMM cannot place gets no `accepted` written back.
        if gpa.is_none() && got != want {
            reclaim_failed(format_args!("{what}: accepted {got:#x}, not {want:#x}"))
        }
        rejected += ranges;
    };

    // Whole records: bad magic, version and count (each with a range the
    // VMM would otherwise accept), then addresses where no record can be.
    let good = record(&[(reclaim_kind::DATA, kept, chunk)]);
    check("bad magic", &ReclaimRecord { magic: !RECLAIM_MAGIC, ..good }, None, 0, 1);
    check("bad version", &ReclaimRecord { abi_version: ABI_VERSION + 1, ..good }, None, 0, 1);
    check("count past the maximum", &ReclaimRecord { count: MAX_RECLAIM_RANGES as u32 + 1, ..good }, None, 0, 1);
    check("count u32::MAX", &ReclaimRecord { count: u32::MAX, ..good }, None, 0, 1);
    let at = BOGUS.ptr() as u64 as u32;
    for gpa in [at + 4, end as u32, (end - 8) as u32, 0xffff_fff8] {
        check("record address", &good, Some(gpa), 0, 1);
    }

    // One record of bogus ranges (each rejected), then `mine` (accepted)
    // and ranges that overlap it (rejected).
    let huge = 0u64.wrapping_sub(chunk);
    let bogus = [
        (reclaim_kind::DATA, end, chunk),                 // just past RAM
        (reclaim_kind::DATA, down(end - 1), 2 * chunk),  // across the end of RAM
        (reclaim_kind::DATA, 3 << 30, chunk),             // the 32-bit hole
        (reclaim_kind::DATA, huge, chunk),                // wraps around
        (reclaim_kind::DATA, kept, huge),                 // a length that overflows
        (reclaim_kind::DATA, kept, u64::MAX),
        (reclaim_kind::DATA, kept + PAGE_SIZE, chunk),    // unaligned start
        (reclaim_kind::DATA, kept, chunk / 2),            // unaligned length
        (reclaim_kind::DATA, kept, 0),                    // empty
        (reclaim_kind::DATA, 0, chunk),                   // the boot data
        (reclaim_kind::DATA, down(kernel), chunk),        // the kernel
        (reclaim_kind::DATA, down(stats_at), chunk),      // the stats block
        (reclaim_kind::DATA, down(memmap), chunk),        // the memmap
        (reclaim_kind::OFFLINE, run(memmap), guest_abi::online_run(memmap)),
        (reclaim_kind::OFFLINE, run(kernel), guest_abi::online_run(kernel)),
        (reclaim_kind::MEMMAP, kept, PAGE_SIZE),          // memmap pages that are not
        (reclaim_kind::MEMMAP, memmap + 1, PAGE_SIZE),
        (reclaim_kind::MEMMAP, down(kernel), PAGE_SIZE),
        (0, kept, chunk),                                 // no such kind
        (u32::MAX, kept, chunk),
    ];
    let mut ranges = [(0u32, 0u64, 0u64); 32];
    ranges[..bogus.len()].copy_from_slice(&bogus);
    let n = bogus.len();
    ranges[n] = (reclaim_kind::DATA, mine, chunk);
    ranges[n + 1] = (reclaim_kind::DATA, mine, chunk); // a duplicate
    ranges[n + 2] = (reclaim_kind::DATA, down(mine.saturating_sub(chunk)), 2 * chunk); // overlapping
    check("bogus ranges", &record(&ranges[..n + 3]), None, 1 << n, n as u64 + 2);
    let mut reserved = record(&[(reclaim_kind::DATA, kept, chunk)]);
    reserved.ranges[0].reserved = 1;
    check("a reserved field", &reserved, None, 0, 1);

    // What was lost: `mine`, and nothing else the guest holds.
    let words = chunk / 8;
    let (lost, intact) = (words - intact_words(mine, chunk), intact_words(kept, chunk));
    if lost != words || intact != words {
        reclaim_failed(format_args!("{lost} of {words} words of the reported chunk lost, {intact} of the other intact"))
    }
    println!("guest: attack-reclaim: own reported chunk lost, the other intact; {rejected} bogus ranges and records sent");
}

//! The paravirtual channel to the VMM (see `guest_abi`): presence probe,
//! phase and exit ports, the stats block, the command mailbox, and memory
//! reclaim (the idle wait's timeout and the reclaim record).

use crate::arch::{inl, outl};
use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, Ordering};
use guest_abi::{
    port, reclaim_kind, Mailbox, ReclaimRecord, StatsBlock, ABI_VERSION, MAILBOX_MAGIC, PV_MAGIC, STATS_MAGIC,
};
use guest_kernel::mm::ReclaimSink;

static PRESENT: AtomicBool = AtomicBool::new(false);

/// Probes for the VMM's paravirtual interface; the answer is remembered.
pub fn probe() -> bool {
    let present = inl(port::IDENT) == PV_MAGIC;
    PRESENT.store(present, Ordering::Relaxed);
    present
}

/// Whether the VMM implements the paravirtual interface.
pub fn present() -> bool {
    PRESENT.load(Ordering::Relaxed)
}

/// Per-run state of guest RAM registration, indexed by the block number of
/// the run's start (`guest_abi::online_run`): 0 not online, 1 being
/// onlined by some CPU, 2 online. 32-byte aligned only to fix its place in
/// `.bss` (after the small statics and the IDT, see `linker.ld`), so that
/// the part a small guest uses shares a page with them.
static BLOCKS: Blocks = Blocks([const { core::sync::atomic::AtomicU8::new(0) }; MAX_BLOCKS]);
const MAX_BLOCKS: usize = (crate::arch::paging::MAX_PHYS / guest_abi::MEMORY_BLOCK_SIZE) as usize;

#[repr(C, align(32))]
struct Blocks([core::sync::atomic::AtomicU8; MAX_BLOCKS]);

/// Makes sure the VMM has registered the memory of `[start, end)` with KVM
/// before this CPU (or any other) uses it: one `MEM_ONLINE` write per
/// `guest_abi::online_run` not yet online. Called by the memory manager
/// before it initializes a chunk; any CPU may call it.
pub fn online_memory(start: u64, end: u64) {
    if !present() || end <= start {
        return;
    }
    let mut run_start = start - start % guest_abi::online_run(start);
    while run_start < end {
        let b = run_start / guest_abi::MEMORY_BLOCK_SIZE;
        let Some(state) = BLOCKS.0.get(b as usize) else { return };
        match state.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                outl(port::MEM_ONLINE, (run_start >> 20) as u32);
                state.store(2, Ordering::Release);
            }
            Err(_) => {
                // Online, or another CPU is onlining it: wait until it is.
                while state.load(Ordering::Acquire) != 2 {
                    core::hint::spin_loop();
                }
            }
        }
        run_start += guest_abi::online_run(run_start);
    }
}

/// Marks online every `guest_abi::online_run` lying wholly inside one of
/// `ranges`: memory the VMM registered before this vCPU first ran and
/// listed in its `guest_abi::BootOnline` entry (already validated), so
/// that `online_memory` writes no `MEM_ONLINE` for it. Call before the
/// memory manager first onlines anything, on the boot CPU.
pub fn mark_online(ranges: &[guest_abi::GpaRange]) {
    if !present() {
        return;
    }
    for r in ranges {
        for run_start in guest_abi::online_runs_in(r.start, r.start.saturating_add(r.len)) {
            if let Some(state) = BLOCKS.0.get((run_start / guest_abi::MEMORY_BLOCK_SIZE) as usize) {
                state.store(2, Ordering::Release);
            }
        }
    }
}

/// The reclaim delay in ms (`reclaim_delay_ms=`, set once at boot).
static RECLAIM_DELAY_MS: AtomicU32 = AtomicU32::new(0);

/// Sets the reclaim delay.
pub fn set_reclaim_delay(ms: u32) {
    RECLAIM_DELAY_MS.store(ms, Ordering::Relaxed);
}

/// The reclaim delay in ms.
pub fn reclaim_delay() -> u32 {
    RECLAIM_DELAY_MS.load(Ordering::Relaxed)
}

/// Makes the next `WAIT` return `guest_abi::WAIT_TIMED_OUT` if no command
/// arrived within `ms` (one-shot).
pub fn set_wait_timeout(ms: u32) {
    if present() {
        outl(port::WAIT_TIMEOUT, ms);
    }
}

/// The record the boot CPU reports reclaimed memory in (only it runs
/// reclaim passes, between commands).
#[link_section = ".bss_pages"]
static RECLAIM: Shared<ReclaimRecord> = Shared(UnsafeCell::new(zero_record()));

const fn zero_record() -> ReclaimRecord {
    // SAFETY: ReclaimRecord is plain integers; all-zero is a valid value.
    unsafe { core::mem::zeroed() }
}

/// Sends reclaim records through `port::RECLAIM`. An accepted `OFFLINE`
/// range is no longer registered with KVM, so its run is marked offline
/// here: the next chunk initialized in it onlines it again first.
pub struct ReclaimPort;

impl ReclaimSink for ReclaimPort {
    fn send(&mut self, record: &ReclaimRecord) -> u64 {
        if !present() {
            return 0;
        }
        let p = RECLAIM.ptr();
        // SAFETY: the static record is written only here, by the boot CPU,
        // and read by the VMM during the port write below.
        let accepted = unsafe {
            p.write_volatile(*record);
            compiler_fence(Ordering::SeqCst);
            outl(port::RECLAIM, p as u64 as u32);
            compiler_fence(Ordering::SeqCst);
            (&raw const (*p).accepted).read_volatile()
        };
        let n = (record.count as usize).min(record.ranges.len());
        let accepted = if n == 64 { accepted } else { accepted & ((1 << n) - 1) };
        for (i, r) in record.ranges[..n].iter().enumerate() {
            if r.kind == reclaim_kind::OFFLINE && accepted & (1 << i) != 0 {
                if let Some(state) = BLOCKS.0.get((r.start / guest_abi::MEMORY_BLOCK_SIZE) as usize) {
                    state.store(0, Ordering::Release);
                }
            }
        }
        accepted
    }
}

/// Announces a boot phase.
pub fn phase(p: guest_abi::Phase) {
    if present() {
        outl(port::PHASE, p as u32);
    }
}

/// Shuts the VM down with `code`: through the exit port, else by i8042 reset.
pub fn exit(code: u32) -> ! {
    if present() {
        outl(port::EXIT, code);
    }
    crate::arch::reset()
}

/// A page-aligned cell shared with the VMM. A static of it goes in
/// `.bss_pages` (`#[link_section = ".bss_pages"]`, see `linker.ld`).
#[repr(C, align(4096))]
pub struct Shared<T>(UnsafeCell<T>);
// SAFETY: the stats block is written only under its sequence counter by the
// CPU that holds the memory manager's report lock, and the mailbox only by the
// boot CPU; the VMM reads them from outside.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub const fn new(v: T) -> Shared<T> {
        Shared(UnsafeCell::new(v))
    }

    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }
}

#[link_section = ".bss_pages"]
pub static STATS: Shared<StatsBlock> = Shared(UnsafeCell::new(zero_stats()));
#[link_section = ".bss_pages"]
pub static MAILBOX: Shared<Mailbox> = Shared(UnsafeCell::new(Mailbox {
    magic: 0,
    abi_version: 0,
    seq: 0,
    cmd: 0,
    status: 0,
    arg0: 0,
    arg1: 0,
    done_seq: 0,
    result0: 0,
    result1: 0,
}));

const fn zero_stats() -> StatsBlock {
    // SAFETY: StatsBlock is plain integers; all-zero is a valid value.
    unsafe { core::mem::zeroed() }
}

static STATS_LOCK: AtomicBool = AtomicBool::new(false);

/// Updates the stats block under its sequence counter: `f` edits a copy,
/// which is written back between an odd and an even `seq`. CPUs take turns.
pub fn publish_stats(f: impl FnOnce(&mut StatsBlock)) {
    while STATS_LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    publish_stats_locked(f);
    STATS_LOCK.store(false, Ordering::Release);
}

fn publish_stats_locked(f: impl FnOnce(&mut StatsBlock)) {
    let p = STATS.ptr();
    // SAFETY: `p` is the static stats block; only one CPU publishes at a
    // time (STATS_LOCK).
    unsafe {
        let mut s = p.read_volatile();
        let seq = s.seq | 1;
        (&raw mut (*p).seq).write_volatile(seq);
        compiler_fence(Ordering::SeqCst);
        f(&mut s);
        s.magic = STATS_MAGIC;
        s.abi_version = ABI_VERSION;
        s.seq = seq;
        p.write_volatile(s);
        compiler_fence(Ordering::SeqCst);
        (&raw mut (*p).seq).write_volatile(seq + 1);
    }
}

/// Announces the stats block and the mailbox to the VMM (once).
pub fn announce() {
    if !present() {
        return;
    }
    // SAFETY: the mailbox is static; nobody else writes it before this.
    unsafe {
        let m = MAILBOX.ptr();
        (&raw mut (*m).magic).write_volatile(MAILBOX_MAGIC);
        (&raw mut (*m).abi_version).write_volatile(ABI_VERSION);
    }
    outl(port::STATS, STATS.ptr() as u64 as u32);
    outl(port::MAILBOX, MAILBOX.ptr() as u64 as u32);
}

/// Waits for the next command (blocking in the VMM); returns its sequence number.
pub fn wait_command() -> u32 {
    inl(port::WAIT)
}

/// Returns a pending command's sequence number without blocking, or 0.
pub fn poll_command() -> u32 {
    inl(port::POLL)
}

/// Reads the mailbox as the VMM left it.
pub fn read_mailbox() -> Mailbox {
    // SAFETY: static mailbox; the VMM wrote it before answering WAIT/POLL.
    unsafe { MAILBOX.ptr().read_volatile() }
}

/// Publishes a command's result and tells the VMM it is done.
pub fn complete(seq: u64, status: guest_abi::CommandStatus, result0: u64, result1: u64) {
    let m = MAILBOX.ptr();
    // SAFETY: static mailbox, written only by the boot CPU.
    unsafe {
        (&raw mut (*m).status).write_volatile(status as u32);
        (&raw mut (*m).result0).write_volatile(result0);
        (&raw mut (*m).result1).write_volatile(result1);
        compiler_fence(Ordering::SeqCst);
        (&raw mut (*m).done_seq).write_volatile(seq);
    }
    outl(port::DONE, seq as u32);
}

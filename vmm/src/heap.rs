//! The process heap (glibc's malloc) and the main thread's stack kept to
//! what the VMM uses. Every VM is a process, so whatever the allocator or an
//! old deep call leaves resident, every idle VM pays.
//!
//! - [`configure`], before the VM's threads exist: one arena for the whole
//!   process (by default every thread that allocates gets one of its own),
//!   and fixed thresholds. glibc otherwise raises its mmap threshold each
//!   time a large block is freed, so that later large buffers come from the
//!   heap and their pages stay with the process. It also notes which
//!   thread is the main one, for [`trim_stack`], which reads where that
//!   thread's stack lies the first time it runs there (glibc reads
//!   `/proc/self/maps` for it, tens of µs better spent after the VM started
//!   than before).
//! - [`configure`] also turns off glibc's per-thread cache ("tcache") for
//!   the calling (main) thread. That cache keeps up to seven freed blocks of
//!   each small size per thread, scattered over the heap, where no trim can
//!   reach them: with it, an idle VM's heap measured 108 KiB after five
//!   `GET /memory`; without it, 44 KiB (`GLIBC_TUNABLES=
//!   glibc.malloc.tcache_count=0`, which does the same for every thread, is
//!   read at exec, too late to set from here). glibc has no public call for
//!   it; its thread-exit hook `__malloc_arena_thread_freeres` empties the
//!   cache and marks it off for the thread, and the static binary links
//!   it from `libc.a`. A dynamically linked build skips that step.
//! - [`trim`], when the event loop goes idle (the runtime's park hook) and
//!   before the VMM measures itself: gives the pages of freed memory back to
//!   the kernel (`malloc_trim`), such as what a `GET /memory` or the build
//!   of the VM left behind. It costs about a microsecond on a heap this
//!   small; freed blocks in glibc's per-thread caches stay where they are.
//! - [`trim_stack`], at the same idle point: the main thread's stack pages
//!   below the stack pointer (less [`STACK_KEEP_BYTES`]) hold nothing live,
//!   only what start-up (argument parsing, the VM's build) and the last
//!   request left there; `MADV_DONTNEED` gives them back, and a later deep
//!   call gets fresh zero pages.
//!
//! On a C library other than glibc the allocator calls are no-ops.

use std::sync::OnceLock;

/// Blocks at least this large are mapped on their own and unmapped on free.
pub const MMAP_THRESHOLD_BYTES: i32 = 64 << 10;

/// Free memory at the top of the heap beyond this is given back at once.
pub const TRIM_THRESHOLD_BYTES: i32 = 32 << 10;

/// Sets glibc's allocator up for a small process; call it before any thread
/// is started (`M_ARENA_MAX` only holds for arenas not yet made).
pub fn configure() {
    // SAFETY: pthread_self has no preconditions.
    MAIN_THREAD.get_or_init(|| unsafe { libc::pthread_self() });
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters, which glibc reads
    // under its own locks; the caller runs it before starting threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TOP_PAD, 0);
    }
    #[cfg(all(target_env = "gnu", target_feature = "crt-static"))]
    // SAFETY: glibc runs this hook as a thread exits; on a live thread it
    // frees the thread's cached blocks to the arena, marks the cache off
    // for good (glibc 2.26 and later) and detaches the thread from its
    // arena, which the next allocation attaches again. Nothing else is
    // allocating on this thread during the call.
    unsafe {
        __malloc_arena_thread_freeres();
    }
}

#[cfg(all(target_env = "gnu", target_feature = "crt-static"))]
extern "C" {
    /// glibc's per-thread malloc clean-up (`malloc/arena.c`), global in
    /// `libc.a`: empties the thread's cache and turns it off.
    fn __malloc_arena_thread_freeres();
}

/// Gives the pages of freed heap memory back to the kernel.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes the arenas' locks itself and only releases
    // memory that no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Stack kept resident below the stack pointer when the stack is trimmed:
/// the depth of the next wake-up, so it does not fault its pages anew.
pub const STACK_KEEP_BYTES: usize = 8 << 10;

const PAGE_BYTES: usize = 4096;

/// The main thread, noted by [`configure`].
static MAIN_THREAD: OnceLock<libc::pthread_t> = OnceLock::new();

/// The main thread's stack, `[low, high)`, read by the first [`trim_stack`]
/// on that thread.
static MAIN_STACK: OnceLock<Option<(usize, usize)>> = OnceLock::new();

/// The calling thread's stack as glibc knows it, `[low, high)`: for the main
/// thread from `/proc/self/maps` and `RLIMIT_STACK`, bounded by the mapping
/// below it, so the range covers no other mapping.
fn current_stack() -> Option<(usize, usize)> {
    // SAFETY: the attribute object is initialized by pthread_getattr_np
    // before it is read, and destroyed once.
    unsafe {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return None;
        }
        let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
        let rc = libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        (rc == 0 && !addr.is_null()).then_some((addr as usize, addr as usize + size))
    }
}

/// An address in the caller's frame: the stack pointer, give or take a frame.
#[inline(never)]
fn stack_pointer() -> usize {
    let marker = 0u8;
    std::hint::black_box(&marker) as *const u8 as usize
}

/// Gives back the main thread's stack pages below its stack pointer, less
/// [`STACK_KEEP_BYTES`]; does nothing on another thread or before
/// [`configure`].
pub fn trim_stack() {
    trim_stack_with(&MAIN_THREAD, &MAIN_STACK);
}

/// [`trim_stack`] with the main thread and its stack's bounds kept in `main`
/// and `stack`.
fn trim_stack_with(main: &OnceLock<libc::pthread_t>, stack: &OnceLock<Option<(usize, usize)>>) {
    let Some(&main) = main.get() else { return };
    // SAFETY: pthread_self and pthread_equal have no preconditions; `main`
    // is a thread that existed (the main thread outlives every call here).
    if unsafe { libc::pthread_equal(main, libc::pthread_self()) } == 0 {
        return;
    }
    if let Some(stack) = *stack.get_or_init(current_stack) {
        trim_stack_in(stack);
    }
}

/// [`trim_stack`] for the stack `[low, high)`, if the caller runs on it.
fn trim_stack_in((low, high): (usize, usize)) {
    let sp = stack_pointer();
    if !(low..high).contains(&sp) {
        return;
    }
    let end = sp.saturating_sub(STACK_KEEP_BYTES) & !(PAGE_BYTES - 1);
    if end > low {
        // SAFETY: `[low, end)` is the part of this thread's own stack
        // below its current frame (and the kept margin): no live data is
        // there, and no signal handler runs on it during the call. The range
        // may reach below the stack's mapping into the gap glibc bounded it
        // by; madvise then answers ENOMEM and drops what is mapped.
        unsafe {
            libc::madvise(low as *mut libc::c_void, end - low, libc::MADV_DONTNEED);
        }
    }
}

/// [`trim`] and [`trim_stack`]: what the event loop calls when it goes idle.
pub fn trim_idle() {
    trim();
    trim_stack();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident anonymous bytes of this process, from `/proc/self/smaps_rollup`.
    fn anonymous_bytes() -> u64 {
        let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
        let line = text.lines().find(|l| l.starts_with("Anonymous:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn trim_gives_freed_heap_pages_back() {
        configure();
        // Many blocks below the mmap threshold, touched, then all but a few
        // freed: without a trim their pages stay resident. Sizes above
        // glibc's per-thread cache limit (1032 bytes) so they reach the bins.
        let mut blocks: Vec<Vec<u8>> = (0..2048).map(|_| vec![1u8; 2048]).collect();
        let keep: Vec<Vec<u8>> = blocks.iter().step_by(512).cloned().collect();
        let touched = anonymous_bytes();
        blocks.clear();
        blocks.shrink_to_fit();
        trim();
        let after = anonymous_bytes();
        assert!(after + (2 << 20) < touched, "touched {touched} B, after trim {after} B");
        assert_eq!(keep.len(), 4);
        assert!(keep.iter().all(|b| b.iter().all(|&x| x == 1)));
    }

    #[test]
    fn the_stack_is_known_and_holds_the_stack_pointer() {
        let (low, high) = current_stack().unwrap();
        assert!((low..high).contains(&stack_pointer()), "{low:#x}..{high:#x}");
        // Not the main thread's: trimming is a no-op here.
        trim_stack();
    }

    #[test]
    fn the_main_stack_is_read_by_the_first_trim_on_the_main_thread_only() {
        let (main, stack) = (OnceLock::new(), OnceLock::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                trim_stack_with(&main, &stack);
                assert!(stack.get().is_none(), "no main thread noted yet");
                // SAFETY: no preconditions.
                main.set(unsafe { libc::pthread_self() }).unwrap();
                std::thread::scope(|s| {
                    s.spawn(|| trim_stack_with(&main, &stack));
                });
                assert!(stack.get().is_none(), "another thread's trim reads nothing");
                trim_stack_with(&main, &stack);
                let (low, high) = stack.get().copied().flatten().expect("read on the main thread");
                assert!((low..high).contains(&stack_pointer()), "{low:#x}..{high:#x}");
            });
        });
    }

    #[test]
    fn stack_pages_below_the_frame_are_given_back_and_come_back_zeroed() {
        // On a thread of its own, whose stack is then the "main" one.
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let (low, high) = current_stack().unwrap();
                #[inline(never)]
                fn deep(fill: u8) -> u8 {
                    let mut buf = [fill; 256 << 10];
                    std::hint::black_box(&mut buf);
                    buf[1000]
                }
                assert_eq!(deep(7), 7);
                let sp = stack_pointer();
                let resident = |from: usize, to: usize| {
                    let pages = (to - from) / PAGE_BYTES;
                    let mut v = vec![0u8; pages];
                    // SAFETY: the range lies inside this thread's stack mapping.
                    let rc = unsafe { libc::mincore(from as *mut libc::c_void, to - from, v.as_mut_ptr()) };
                    assert_eq!(rc, 0);
                    v.iter().filter(|b| **b & 1 == 1).count()
                };
                let below = (sp - (32 << 10)) & !(PAGE_BYTES - 1);
                let from = below - (128 << 10);
                assert!(from > low, "{low:#x} {from:#x} {high:#x}");
                assert_eq!(resident(from, below), 32, "the deep call touched these pages");
                trim_stack_in((low, high));
                assert_eq!(resident(from, below), 0);
                assert_eq!(deep(0), 0);
                assert_eq!(resident(from, below), 32);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}

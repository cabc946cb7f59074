//! Host signals (SIGINT, SIGTERM, SIGHUP) become events for the VMM thread,
//! so Ctrl-C or a `kill` stops the VM cleanly and removes the API socket.
//!
//! [`block`] runs first thing in `main`, before any thread exists, so every
//! thread inherits the blocked mask; [`forward_to`] starts one thread that
//! waits for them with `sigwait` and sends [`VmEvent::Signal`].

use crate::events::VmEvent;
use std::sync::mpsc::Sender;
use std::sync::{Mutex, Once};

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialize and fill a local sigset_t.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in SIGNALS {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// Blocks the signals in the calling thread (and so in every thread it starts).
pub fn block() {
    let s = set();
    // SAFETY: changes only this thread's signal mask, with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
}

static TARGET: Mutex<Option<Sender<VmEvent>>> = Mutex::new(None);

/// Sends every signal received from now on to `tx` (replacing any earlier target).
pub fn forward_to(tx: Sender<VmEvent>) {
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    static START: Once = Once::new();
    START.call_once(|| {
        let spawned = std::thread::Builder::new().name("signals".into()).stack_size(64 << 10).spawn(|| loop {
            let s = set();
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals in a valid set.
            if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                continue;
            }
            if let Some(tx) = TARGET.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                let _ = tx.send(VmEvent::Signal(sig));
            }
        });
        if let Err(e) = spawned {
            eprintln!("vmm: cannot start the signal thread ({e}); Ctrl-C will not stop the VM cleanly");
        }
    });
}

//! Host signals (SIGINT, SIGTERM, SIGHUP) become events for the controller,
//! so Ctrl-C or a `kill` stops the VM cleanly and removes the API socket.
//!
//! [`block`] runs first thing in `main`, before any thread exists, so every
//! thread inherits the blocked mask and none is interrupted by them;
//! [`forward_to`] starts one thread that waits for them (`sigwait`, through
//! `nix`) and sends [`VmEvent::Signal`].

use crate::events::VmEvent;
use nix::sys::signal::{SigSet, Signal};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, Once};

/// The signals that stop the VM.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    set
}

/// Blocks the signals in the calling thread (and so in every thread it starts).
pub fn block() {
    // Only fails for an invalid `how`, which SIG_BLOCK is not.
    let _ = stop_signals().thread_block();
}

static TARGET: Mutex<Option<Sender<VmEvent>>> = Mutex::new(None);

/// Sends every signal received from now on to `tx` (replacing any earlier target).
pub fn forward_to(tx: Sender<VmEvent>) {
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    static START: Once = Once::new();
    START.call_once(|| {
        let spawned = std::thread::Builder::new().name("signals".into()).stack_size(64 << 10).spawn(|| {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Signals);
            let set = stop_signals();
            loop {
                let Ok(sig) = set.wait() else { continue };
                if let Some(tx) = TARGET.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    let _ = tx.send(VmEvent::Signal(sig as i32));
                }
            }
        });
        if let Err(e) = spawned {
            crate::errln!("vmm: cannot start the signal thread ({e}); Ctrl-C will not stop the VM cleanly");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // Delivery itself is tested end to end (tests/api.rs sends SIGTERM to a
    // serving VMM): raising a signal inside the test harness could hit a
    // thread that does not block it and end the whole test run.
    #[test]
    fn block_masks_exactly_the_stop_signals_in_the_calling_thread() {
        let mask = std::thread::spawn(|| {
            block();
            SigSet::thread_get_mask().unwrap()
        })
        .join()
        .unwrap();
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            assert!(mask.contains(sig), "{sig:?}");
        }
        assert!(!mask.contains(Signal::SIGUSR1));
    }
}

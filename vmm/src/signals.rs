//! Host signals (SIGINT, SIGTERM, SIGHUP) stop the VM cleanly, so Ctrl-C or
//! a `kill` removes the API socket too.
//!
//! [`block`] runs first thing in `main`, before any thread exists, so every
//! thread inherits the blocked mask and none is interrupted by them. The
//! signals then stay pending for the process until read:
//! - a VMM process reads them on its main thread, with no thread of its
//!   own: [`StopSignals`] is a `signalfd` registered with the controller's
//!   runtime, awaited next to its events;
//! - the tools with no controller (`vmm top`, `vmm density`) use
//!   [`forward_to`], which starts one thread that waits for them
//!   (`sigwait`, through `nix`) and sends [`VmEvent::Signal`].

use crate::events::VmEvent;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
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

/// The stop signals as the controller's runtime sees them: a non-blocking
/// `signalfd` for the blocked stop signals, registered with that runtime's
/// I/O driver.
pub struct StopSignals {
    fd: tokio::io::unix::AsyncFd<SignalFd>,
}

impl StopSignals {
    /// Reads the stop signals from now on; call it inside the runtime that
    /// awaits [`StopSignals::recv`]. Blocks them in the calling thread first
    /// (they already are in a `vmm` process, see [`block`]).
    pub fn new() -> std::io::Result<StopSignals> {
        block();
        let fd = SignalFd::with_flags(&stop_signals(), SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        // SAFETY: `SignalFd` owns its descriptor (an `OwnedFd`), which stays
        // open and the same until the `AsyncFd` drops it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(StopSignals { fd })
    }

    /// The next stop signal's number. Pending forever if the runtime stops
    /// serving the descriptor (it shuts down).
    pub async fn recv(&self) -> i32 {
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            match ready.get_inner().read_signal() {
                Ok(Some(info)) => return info.ssi_signo as i32,
                // Nothing there (EAGAIN) or a failed read: wait for the next
                // readiness, so this never spins.
                Ok(None) | Err(_) => ready.clear_ready(),
            }
        }
    }
}

static TARGET: Mutex<Option<Sender<VmEvent>>> = Mutex::new(None);

/// Sends every signal received from now on to `tx` (replacing any earlier
/// target), from a thread of its own: for the tools, not a VM process.
pub fn forward_to(tx: Sender<VmEvent>) {
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    static START: Once = Once::new();
    START.call_once(|| {
        let spawned = std::thread::Builder::new().name("signals".into()).stack_size(64 << 10).spawn(|| {
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

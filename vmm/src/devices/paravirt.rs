//! The paravirtual device of `guest_abi`: the exit port, boot phases, the
//! stats block and mailbox addresses, the command mailbox, AP start-up and
//! parking, and memory onlining (`port::MEM_ONLINE`).
//!
//! Everything the guest writes is untrusted, and nothing it writes makes
//! the VMM do unbounded work: each boot phase and the AP start-up request
//! reach the controller once, and protocol errors (a bad address, a
//! record that does not check) at most [`PROTOCOL_ERRORS_PER_SECOND`] a
//! second; the rest are counted (`guest_protocol_errors` in `GET /metrics`)
//! and summarized in the next one sent (`suppressed`).
//!
//! A vCPU blocks here while the guest idles: a read of `port::WAIT` sleeps on
//! a condition variable until the controller submits a command (or asks the
//! VM to stop), so an idle VM costs no host CPU.

use super::outcome::PortOutcome;
use crate::events::{CommandDone, VmEvent};
use crate::memory::{RegisterError, Registrar};
use crate::metrics::Metrics;
use crate::timings::Timings;
use guest_abi::{port, ApBoot, CommandStatus, Mailbox, Phase, MAILBOX_MAGIC};
use std::sync::atomic::{AtomicU32, Ordering};
use crate::events::EventSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A command waiting for the guest.
#[derive(Debug, Clone, Copy)]
struct PendingCommand {
    seq: u64,
    cmd: u32,
    arg0: u64,
    arg1: u64,
}

/// Protocol errors sent to the controller (and so to the log) per second;
/// more are counted and summarized.
pub const PROTOCOL_ERRORS_PER_SECOND: u32 = 10;

/// The rate limit of protocol errors: a window of one second.
#[derive(Default)]
struct ErrorLimit {
    window_start: Option<Instant>,
    sent: u32,
    suppressed: u64,
}

impl ErrorLimit {
    /// Whether one more error may be sent now; if so, how many were
    /// suppressed since the last one sent.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.window_start.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            self.window_start = Some(now);
            self.sent = 0;
        }
        if self.sent >= PROTOCOL_ERRORS_PER_SECOND {
            self.suppressed += 1;
            return None;
        }
        self.sent += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[derive(Default)]
struct PvState {
    /// Boot phases already reported (bit per phase).
    phases_seen: u8,
    /// The guest asked for its application processors.
    aps_requested: bool,
    stats_gpa: Option<GuestAddress>,
    mailbox_gpa: Option<GuestAddress>,
    next_seq: u64,
    pending: Option<PendingCommand>,
    in_flight: Option<u64>,
    stop: bool,
    paused: bool,
    ap_generation: u32,
}

/// Why a command could not be submitted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the guest has not announced a command mailbox")]
    NoMailbox,
    #[error("another command is still running")]
    Busy,
    #[error("the VM is stopping")]
    Stopping,
}

/// The paravirtual device.
pub struct Paravirt {
    state: Mutex<PvState>,
    cond: Condvar,
    mem: GuestMemoryMmap,
    events: EventSender,
    timings: Arc<Timings>,
    metrics: Arc<Metrics>,
    /// vCPUs in this VM (answered on `port::CPU_COUNT`).
    vcpu_count: AtomicU32,
    /// Registers guest RAM with KVM when the guest onlines it.
    registrar: OnceLock<Arc<Registrar>>,
    errors: Mutex<ErrorLimit>,
}

impl Paravirt {
    /// The device for a VM with `mem`; events go to `events`.
    pub fn new(mem: GuestMemoryMmap, events: EventSender, timings: Arc<Timings>, metrics: Arc<Metrics>) -> Paravirt {
        Paravirt {
            state: Mutex::new(PvState { next_seq: 1, ..Default::default() }),
            cond: Condvar::new(),
            mem,
            events,
            timings,
            metrics,
            vcpu_count: AtomicU32::new(1),
            registrar: OnceLock::new(),
            errors: Mutex::default(),
        }
    }

    /// Sets the registrar that serves `port::MEM_ONLINE`.
    pub fn set_registrar(&self, r: Arc<Registrar>) {
        let _ = self.registrar.set(r);
    }

    /// The registrar, if one was set.
    pub fn registrar(&self) -> Option<&Registrar> {
        self.registrar.get().map(|r| &**r)
    }

    /// Sets the vCPU count the guest is told.
    pub fn set_vcpu_count(&self, n: u32) {
        self.vcpu_count.store(n, Ordering::Relaxed);
    }

    fn state(&self) -> MutexGuard<'_, PvState> {
        // A poisoned lock means a vCPU thread panicked mid-update; the state is
        // plain data that stays consistent, so carry on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, e: VmEvent) {
        // The controller may already be gone at shutdown; nothing to do then.
        let _ = self.events.send(e);
    }

    /// A write of `value` to paravirtual port `p` by vCPU `cpu`.
    pub fn write(&self, cpu: u8, p: u16, value: u32) -> PortOutcome {
        match p {
            port::EXIT => PortOutcome::GuestExit(value),
            port::PHASE => {
                match Phase::decode(value) {
                    Some(ph) => {
                        let mut st = self.state();
                        let bit = 1u8 << (ph as u32 % 8);
                        let first = st.phases_seen & bit == 0;
                        st.phases_seen |= bit;
                        drop(st);
                        if first {
                            self.timings.mark_phase(ph);
                            self.send(VmEvent::Phase(ph));
                        } else {
                            self.protocol_error(format_args!("boot phase {ph:?} announced again"));
                        }
                    }
                    None => self.protocol_error(format_args!("unknown boot phase {value}")),
                }
                PortOutcome::Continue
            }
            port::STATS => {
                self.state().stats_gpa = Some(GuestAddress(u64::from(value)));
                PortOutcome::Continue
            }
            port::MAILBOX => {
                self.state().mailbox_gpa = Some(GuestAddress(u64::from(value)));
                PortOutcome::Continue
            }
            port::DONE => {
                self.command_done(u64::from(value));
                PortOutcome::Continue
            }
            port::EXCEPTION => PortOutcome::GuestException,
            port::MEM_ONLINE => self.online(u64::from(value) << 20),
            port::AP_BOOT if cpu == 0 => {
                if std::mem::replace(&mut self.state().aps_requested, true) {
                    self.protocol_error(format_args!("application processors requested again"));
                    return PortOutcome::Continue;
                }
                match self.mem.read_obj::<ApBoot>(GuestAddress(u64::from(value))) {
                    Ok(rec) => self.send(VmEvent::StartAps(rec)),
                    Err(_) => self.protocol_error(format_args!("AP boot record at {value:#x} is outside guest RAM")),
                }
                PortOutcome::Continue
            }
            port::AP_RELEASE => {
                let mut st = self.state();
                st.ap_generation = st.ap_generation.wrapping_add(1);
                drop(st);
                self.cond.notify_all();
                PortOutcome::Continue
            }
            _ => PortOutcome::Continue,
        }
    }

    fn online(&self, gpa: u64) -> PortOutcome {
        let Some(registrar) = self.registrar.get() else { return PortOutcome::Continue };
        match registrar.register_range(gpa, gpa + 1) {
            Ok(()) => PortOutcome::Continue,
            Err(e @ RegisterError::NotRam { .. }) => {
                self.protocol_error(format_args!("guest asked to online memory that does not exist: {e}"));
                PortOutcome::Continue
            }
            Err(e) => PortOutcome::RegistrationFailed(e),
        }
    }

    /// A read of paravirtual port `p` by vCPU `cpu`: the value and what next.
    pub fn read(&self, cpu: u8, p: u16) -> (u32, PortOutcome) {
        match p {
            port::IDENT => (guest_abi::PV_MAGIC, PortOutcome::Continue),
            port::CPU_COUNT => (self.vcpu_count.load(Ordering::Relaxed), PortOutcome::Continue),
            port::WAIT | port::POLL => self.wait_for_command(p == port::POLL),
            port::AP_PARK if cpu != 0 => {
                let mut st = self.state();
                let gen = st.ap_generation;
                while st.ap_generation == gen && !st.stop {
                    st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.stop {
                    return (0, PortOutcome::StopRequested);
                }
                (st.ap_generation, PortOutcome::Continue)
            }
            _ => (0xffff_ffff, PortOutcome::Continue),
        }
    }

    /// `port::WAIT` (blocking) and `port::POLL`: the next command's sequence
    /// number, or 0 when polling finds none.
    fn wait_for_command(&self, poll: bool) -> (u32, PortOutcome) {
        let mut st = self.state();
        loop {
            if st.stop {
                return (0, PortOutcome::StopRequested);
            }
            if !st.paused {
                if let Some(cmd) = st.pending.take() {
                    if self.deliver(&st, cmd) {
                        st.in_flight = Some(cmd.seq);
                        return (cmd.seq as u32, PortOutcome::Continue);
                    }
                    drop(st);
                    self.send(VmEvent::CommandDone(CommandDone::failed(cmd.seq)));
                    st = self.state();
                    continue;
                }
                if poll {
                    return (0, PortOutcome::Continue);
                }
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Writes a command into the guest's mailbox; false if the mailbox is unusable.
    fn deliver(&self, st: &PvState, cmd: PendingCommand) -> bool {
        let Some(gpa) = st.mailbox_gpa else { return false };
        let mb = Mailbox {
            magic: MAILBOX_MAGIC,
            abi_version: guest_abi::ABI_VERSION,
            seq: cmd.seq,
            cmd: cmd.cmd,
            status: CommandStatus::Pending as u32,
            arg0: cmd.arg0,
            arg1: cmd.arg1,
            done_seq: 0,
            result0: 0,
            result1: 0,
        };
        match self.mem.write_obj(mb, gpa) {
            Ok(()) => true,
            Err(_) => {
                self.protocol_error(format_args!("mailbox at {:#x} is outside guest RAM", gpa.0));
                false
            }
        }
    }

    fn command_done(&self, seq_low: u64) {
        let mut st = self.state();
        let Some(seq) = st.in_flight else {
            drop(st);
            self.protocol_error(format_args!("guest finished command {seq_low} but none was running"));
            return;
        };
        st.in_flight = None;
        let gpa = st.mailbox_gpa;
        drop(st);
        let mb = gpa.and_then(|g| self.mem.read_obj::<Mailbox>(g).ok());
        let done = match mb {
            Some(mb) if mb.done_seq == seq && seq as u32 as u64 == seq_low => CommandDone {
                seq,
                status: CommandStatus::decode(mb.status),
                result0: mb.result0,
                result1: mb.result1,
            },
            _ => CommandDone::failed(seq),
        };
        self.send(VmEvent::CommandDone(done));
    }

    /// Counts a protocol error and, within the rate limit, sends it to the
    /// controller (formatted only then).
    fn protocol_error(&self, msg: std::fmt::Arguments<'_>) {
        self.metrics.guest_protocol_errors.fetch_add(1, Ordering::Relaxed);
        let admitted = self.errors.lock().unwrap_or_else(|e| e.into_inner()).admit(Instant::now());
        if let Some(suppressed) = admitted {
            self.send(VmEvent::GuestProtocolError { msg: msg.to_string(), suppressed });
        }
    }

    /// Forgets command `seq` (it timed out): the next one can be submitted,
    /// and a late answer to it is a protocol error. False if `seq` was
    /// neither waiting nor running.
    pub fn cancel(&self, seq: u64) -> bool {
        let mut st = self.state();
        if st.pending.is_some_and(|c| c.seq == seq) {
            st.pending = None;
            true
        } else if st.in_flight == Some(seq) {
            st.in_flight = None;
            true
        } else {
            false
        }
    }

    /// Queues a command for the guest; returns its sequence number. The
    /// result arrives as [`VmEvent::CommandDone`].
    pub fn submit(&self, cmd: guest_abi::Command, arg0: u64, arg1: u64) -> Result<u64, SubmitError> {
        let mut st = self.state();
        if st.stop {
            return Err(SubmitError::Stopping);
        }
        if st.mailbox_gpa.is_none() {
            return Err(SubmitError::NoMailbox);
        }
        if st.pending.is_some() || st.in_flight.is_some() {
            return Err(SubmitError::Busy);
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending = Some(PendingCommand { seq, cmd: cmd as u32, arg0, arg1 });
        drop(st);
        self.cond.notify_all();
        Ok(seq)
    }

    /// Where the guest said its stats block is.
    pub fn stats_gpa(&self) -> Option<GuestAddress> {
        self.state().stats_gpa
    }

    /// Wakes every vCPU blocked in a port read and makes it stop.
    pub fn request_stop(&self) {
        self.state().stop = true;
        self.cond.notify_all();
    }

    /// Holds (or releases) commands: a paused VM's idle vCPU stays blocked.
    pub fn set_paused(&self, paused: bool) {
        self.state().paused = paused;
        self.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{channel, EventReceiver};

    fn device() -> (Paravirt, EventReceiver) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (tx, rx) = channel();
        (Paravirt::new(mem, tx, Arc::new(Timings::new()), Arc::default()), rx)
    }

    #[test]
    fn ident_returns_the_magic_and_unknown_ports_read_all_ones() {
        let (d, _rx) = device();
        assert_eq!(d.read(0, port::IDENT).0, guest_abi::PV_MAGIC);
        assert_eq!(d.read(0, port::PV_END - 4).0, 0xffff_ffff);
    }

    #[test]
    fn phases_are_timed_and_reported_and_bad_ones_are_errors() {
        let (d, mut rx) = device();
        d.write(0, port::PHASE, Phase::Ready as u32);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Phase(Phase::Ready));
        assert!(d.timings.guest_ready.get().is_some());
        d.write(0, port::PHASE, 99);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestProtocolError { .. }));
    }

    #[test]
    fn a_command_goes_through_the_mailbox_and_back() {
        let (d, mut rx) = device();
        assert_eq!(d.submit(guest_abi::Command::Report, 0, 0), Err(SubmitError::NoMailbox));
        d.write(0, port::MAILBOX, 0x5000);
        let seq = d.submit(guest_abi::Command::Alloc, 4096, 0).unwrap();
        assert_eq!(d.submit(guest_abi::Command::Report, 0, 0), Err(SubmitError::Busy));
        assert_eq!(d.read(0, port::WAIT), (seq as u32, PortOutcome::Continue));
        let mut mb: Mailbox = d.mem.read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!((mb.cmd, mb.arg0), (guest_abi::Command::Alloc as u32, 4096));
        // The guest answers.
        mb.status = CommandStatus::Ok as u32;
        mb.result0 = 4096;
        mb.done_seq = seq;
        d.mem.write_obj(mb, GuestAddress(0x5000)).unwrap();
        d.write(0, port::DONE, seq as u32);
        assert_eq!(
            rx.try_recv().unwrap(),
            VmEvent::CommandDone(CommandDone { seq, status: Some(CommandStatus::Ok), result0: 4096, result1: 0 })
        );
        // A DONE with nothing running is the guest's error, not a panic.
        d.write(0, port::DONE, 5);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestProtocolError { .. }));
    }

    #[test]
    fn a_mailbox_outside_ram_fails_the_command_not_the_vmm() {
        let (d, mut rx) = device();
        d.write(0, port::MAILBOX, 0xffff_f000);
        let seq = d.submit(guest_abi::Command::Report, 0, 0).unwrap();
        assert_eq!(d.read(0, port::POLL), (0, PortOutcome::Continue));
        let events: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert!(matches!(events[0], VmEvent::GuestProtocolError { .. }));
        assert_eq!(events[1], VmEvent::CommandDone(CommandDone::failed(seq)));
    }

    #[test]
    fn a_flood_of_bad_writes_sends_a_bounded_number_of_events_and_counts_all() {
        let (d, mut rx) = device();
        for _ in 0..10_000 {
            d.write(0, port::PHASE, 99);
            d.write(0, port::DONE, 5);
            d.write(0, port::PHASE, Phase::Entered as u32);
        }
        let events: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let errors = events.iter().filter(|e| matches!(e, VmEvent::GuestProtocolError { .. })).count();
        // One window, maybe two if the loop straddles a second.
        assert!((1..=2 * PROTOCOL_ERRORS_PER_SECOND as usize).contains(&errors), "{errors} errors sent");
        assert_eq!(events.iter().filter(|e| **e == VmEvent::Phase(Phase::Entered)).count(), 1, "a phase is sent once");
        assert_eq!(d.metrics.guest_protocol_errors.load(Ordering::Relaxed), 30_000 - 1);
        // The next window's first error carries the count of those suppressed.
        let mut limit = ErrorLimit::default();
        let t0 = Instant::now();
        for _ in 0..PROTOCOL_ERRORS_PER_SECOND {
            assert_eq!(limit.admit(t0), Some(0));
        }
        assert_eq!(limit.admit(t0), None);
        assert_eq!(limit.admit(t0), None);
        assert_eq!(limit.admit(t0 + Duration::from_secs(1)), Some(2));
    }

    #[test]
    fn a_cancelled_command_frees_the_mailbox_and_its_late_answer_is_an_error() {
        let (d, mut rx) = device();
        d.write(0, port::MAILBOX, 0x5000);
        let seq = d.submit(guest_abi::Command::Report, 0, 0).unwrap();
        assert_eq!(d.read(0, port::POLL).0, seq as u32);
        assert_eq!(d.submit(guest_abi::Command::Report, 0, 0), Err(SubmitError::Busy));
        assert!(d.cancel(seq));
        assert!(!d.cancel(seq));
        let next = d.submit(guest_abi::Command::Report, 0, 0).unwrap();
        assert!(d.cancel(next), "a command not yet delivered is cancelled too");
        d.write(0, port::DONE, seq as u32);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestProtocolError { .. }));
    }

    #[test]
    fn a_blocked_wait_wakes_on_stop() {
        let (d, _rx) = device();
        let d = Arc::new(d);
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.read(0, port::WAIT));
        d.request_stop();
        assert_eq!(t.join().unwrap(), (0, PortOutcome::StopRequested));
    }
}

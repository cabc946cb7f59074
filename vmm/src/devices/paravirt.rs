//! The paravirtual device of `guest_abi`: the exit port, boot phases, the
//! stats block and mailbox addresses, the command mailbox, AP start-up and
//! parking, and memory onlining (`port::MEM_ONLINE`).
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
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A command waiting for the guest.
#[derive(Debug, Clone, Copy)]
struct PendingCommand {
    seq: u64,
    cmd: u32,
    arg0: u64,
    arg1: u64,
}

#[derive(Default)]
struct PvState {
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
    events: Sender<VmEvent>,
    timings: Arc<Timings>,
    metrics: Arc<Metrics>,
    /// vCPUs in this VM (answered on `port::CPU_COUNT`).
    vcpu_count: AtomicU32,
    /// Registers guest RAM with KVM when the guest onlines it.
    registrar: OnceLock<Arc<Registrar>>,
}

impl Paravirt {
    /// The device for a VM with `mem`; events go to `events`.
    pub fn new(mem: GuestMemoryMmap, events: Sender<VmEvent>, timings: Arc<Timings>, metrics: Arc<Metrics>) -> Paravirt {
        Paravirt {
            state: Mutex::new(PvState { next_seq: 1, ..Default::default() }),
            cond: Condvar::new(),
            mem,
            events,
            timings,
            metrics,
            vcpu_count: AtomicU32::new(1),
            registrar: OnceLock::new(),
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
                        self.timings.mark_phase(ph);
                        self.send(VmEvent::Phase(ph));
                    }
                    None => self.protocol_error(format!("unknown boot phase {value}")),
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
                match self.mem.read_obj::<ApBoot>(GuestAddress(u64::from(value))) {
                    Ok(rec) => self.send(VmEvent::StartAps(rec)),
                    Err(_) => self.protocol_error(format!("AP boot record at {value:#x} is outside guest RAM")),
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
                self.protocol_error(format!("guest asked to online memory that does not exist: {e}"));
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
                self.protocol_error(format!("mailbox at {:#x} is outside guest RAM", gpa.0));
                false
            }
        }
    }

    fn command_done(&self, seq_low: u64) {
        let mut st = self.state();
        let Some(seq) = st.in_flight else {
            drop(st);
            self.protocol_error(format!("guest finished command {seq_low} but none was running"));
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

    fn protocol_error(&self, msg: String) {
        self.metrics.guest_protocol_errors.fetch_add(1, Ordering::Relaxed);
        self.send(VmEvent::GuestProtocolError(msg));
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
    use std::sync::mpsc::{channel, Receiver};

    fn device() -> (Paravirt, Receiver<VmEvent>) {
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
        let (d, rx) = device();
        d.write(0, port::PHASE, Phase::Ready as u32);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Phase(Phase::Ready));
        assert!(d.timings.guest_ready.get().is_some());
        d.write(0, port::PHASE, 99);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestProtocolError(_)));
    }

    #[test]
    fn a_command_goes_through_the_mailbox_and_back() {
        let (d, rx) = device();
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
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestProtocolError(_)));
    }

    #[test]
    fn a_mailbox_outside_ram_fails_the_command_not_the_vmm() {
        let (d, rx) = device();
        d.write(0, port::MAILBOX, 0xffff_f000);
        let seq = d.submit(guest_abi::Command::Report, 0, 0).unwrap();
        assert_eq!(d.read(0, port::POLL), (0, PortOutcome::Continue));
        let events: Vec<_> = rx.try_iter().collect();
        assert!(matches!(events[0], VmEvent::GuestProtocolError(_)));
        assert_eq!(events[1], VmEvent::CommandDone(CommandDone::failed(seq)));
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

//! The paravirtual device of `guest_abi`: the exit port, boot phases, the
//! stats block and mailbox addresses, the command mailbox, AP start-up and
//! parking, memory onlining (`port::MEM_ONLINE`), and memory reclaim
//! (`port::WAIT_TIMEOUT`, `port::RECLAIM`).
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
//! VM to stop), so an idle VM costs no host CPU. After a `port::WAIT_TIMEOUT`
//! write the next `WAIT` also returns, with `guest_abi::WAIT_TIMED_OUT`, when
//! its (clamped) time passes with no command; a paused VM's wait does not
//! time out until it is resumed.
//!
//! A `port::RECLAIM` write hands over a [`guest_abi::ReclaimRecord`]: one
//! record of at most [`guest_abi::MAX_RECLAIM_RANGES`] ranges, copied out
//! through vm-memory. Each range is checked by
//! [`crate::memory::reclaim::check_record`] against the VM's reclaim policy
//! and the guest's stats block; accepted ones are discarded from the host
//! (`OFFLINE` runs also leave KVM), and `accepted` is written back before the
//! write returns. A rejected range makes the memory report invalid. The
//! discarded-bytes counters grow only by what the host had resident in an
//! accepted range (see [`crate::memory::reclaim`]), so reporting the same
//! memory twice does not inflate them.

use super::outcome::PortOutcome;
use crate::events::{CommandDone, VmEvent};
use crate::memory::reclaim::{self, GuestLayout, KvmRegistration, ReclaimPolicy, ReclaimStats};
use crate::memory::{RegisterError, Registrar};
use crate::report::guest as guest_report;
use crate::metrics::Metrics;
use crate::timings::Timings;
use guest_abi::{
    port, reclaim_kind, ApBoot, CommandStatus, Mailbox, Phase, ReclaimRecord, ABI_VERSION, MAILBOX_MAGIC,
    MAX_RECLAIM_RANGES, MAX_WAIT_TIMEOUT_MS, RECLAIM_MAGIC, WAIT_TIMED_OUT,
};
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

/// Where `accepted` lies in a [`ReclaimRecord`].
const ACCEPTED_OFFSET: u64 = core::mem::offset_of!(ReclaimRecord, accepted) as u64;

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
    /// The next `WAIT`'s timeout (`port::WAIT_TIMEOUT`, one-shot).
    wait_timeout: Option<Duration>,
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
    /// What reclaim reports may give back (mode, RAM, protected ranges);
    /// until set, every report is rejected.
    reclaim_policy: OnceLock<ReclaimPolicy>,
    /// What the reports did; locked for a whole report, so reports from
    /// several vCPUs are handled one at a time.
    reclaim: Mutex<ReclaimStats>,
    /// The guest's chunk size and memmap ranges ([`Paravirt::guest_layout`]).
    guest_layout: OnceLock<(u64, Vec<guest_abi::GpaRange>)>,
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
            reclaim_policy: OnceLock::new(),
            reclaim: Mutex::default(),
            guest_layout: OnceLock::new(),
        }
    }

    /// Sets what reclaim reports may give back (once).
    pub fn set_reclaim_policy(&self, policy: ReclaimPolicy) {
        let _ = self.reclaim_policy.set(policy);
    }

    /// What the guest's reclaim reports did so far.
    pub fn reclaim_stats(&self) -> ReclaimStats {
        let stats = self.reclaim.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock that `reclaim_report` holds for a whole record, so
        // the registration matches the counters.
        let kvm = self.registrar().map(|r| KvmRegistration {
            registered_bytes: r.registered_bytes(),
            memslots_deleted: r.slots_deleted(),
        });
        ReclaimStats { kvm, ..stats.clone() }
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
            port::WAIT_TIMEOUT => {
                let ms = value.min(MAX_WAIT_TIMEOUT_MS);
                self.state().wait_timeout = (ms != 0).then(|| Duration::from_millis(u64::from(ms)));
                PortOutcome::Continue
            }
            port::RECLAIM => {
                self.reclaim_report(GuestAddress(u64::from(value)));
                PortOutcome::Continue
            }
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
        match registrar.online(gpa) {
            Ok(()) => PortOutcome::Continue,
            Err(e @ RegisterError::NotRam { .. }) => {
                self.protocol_error(format_args!("guest asked to online memory that does not exist: {e}"));
                PortOutcome::Continue
            }
            Err(e) => PortOutcome::RegistrationFailed(e),
        }
    }

    /// `port::RECLAIM`: checks the record at `gpa`, discards what it may,
    /// writes `accepted` back, and counts it all.
    fn reclaim_report(&self, gpa: GuestAddress) {
        let mut stats = self.reclaim.lock().unwrap_or_else(|e| e.into_inner());
        stats.events += 1;
        let event = stats.events;
        let record = match self.read_reclaim_record(gpa) {
            Ok(r) => r,
            Err(why) => {
                // Nothing discarded; `accepted` = 0 if the record is where
                // one may be (never a write anywhere else).
                let size = core::mem::size_of::<ReclaimRecord>() as u64;
                if gpa.0.is_multiple_of(8) && guest_report::range_in_ram(&self.mem, gpa.0, size) {
                    let _ = self.mem.write_obj(0u64, GuestAddress(gpa.0 + ACCEPTED_OFFSET));
                }
                stats.ranges_rejected += 1;
                self.reclaim_rejected(&mut stats, format!("reclaim report {event} at {:#x} rejected: {why}", gpa.0));
                return;
            }
        };
        let ranges = &record.ranges[..record.count as usize];
        let default_policy = ReclaimPolicy::default();
        let policy = self.reclaim_policy.get().unwrap_or(&default_policy);
        let verdicts: Vec<Result<(), String>> = match self.guest_layout() {
            Ok((chunk_bytes, memmap)) => {
                let layout = GuestLayout { chunk_bytes: *chunk_bytes, memmap };
                reclaim::check_record(ranges, policy, &layout).into_iter().map(|v| v.map_err(|e| e.to_string())).collect()
            }
            Err(e) => ranges.iter().map(|_| Err(format!("the stats block cannot be trusted: {e}"))).collect(),
        };
        let mut accepted = 0u64;
        for (i, (r, verdict)) in ranges.iter().zip(verdicts).enumerate() {
            let done = verdict.and_then(|()| self.give_back(r).map_err(|e| e.to_string()));
            match done {
                Ok(released) => {
                    accepted |= 1 << i;
                    stats.ranges_accepted += 1;
                    stats.accepted_bytes = stats.accepted_bytes.saturating_add(r.len);
                    // Only what the host had resident: a range reported
                    // again, or never touched, releases (and counts) nothing.
                    let bytes = match r.kind {
                        reclaim_kind::DATA => &mut stats.data_bytes,
                        reclaim_kind::MEMMAP => &mut stats.memmap_bytes,
                        _ => &mut stats.offline_bytes,
                    };
                    *bytes = bytes.saturating_add(released);
                }
                Err(why) => {
                    stats.ranges_rejected += 1;
                    let msg = format!(
                        "reclaim report {event}: range {i} ({} {:#x} bytes at {:#x}) rejected: {why}",
                        reclaim::kind_name(r.kind),
                        r.len,
                        r.start
                    );
                    self.reclaim_rejected(&mut stats, msg);
                }
            }
        }
        // The record was read from here, so the write lands in RAM.
        let _ = self.mem.write_obj(accepted, GuestAddress(gpa.0 + ACCEPTED_OFFSET));
    }

    /// The chunk size and memmap ranges of the guest's stats block, from
    /// its first snapshot that validates (the guest fixes both at boot, and
    /// later changes are ignored).
    fn guest_layout(&self) -> Result<&(u64, Vec<guest_abi::GpaRange>), guest_report::GuestReportError> {
        if let Some(l) = self.guest_layout.get() {
            return Ok(l);
        }
        let gpa = self.stats_gpa().ok_or(guest_report::GuestReportError::NotAnnounced)?;
        let b = guest_report::read_snapshot(&self.mem, gpa)?;
        let vcpus = u8::try_from(self.vcpu_count.load(Ordering::Relaxed)).unwrap_or(u8::MAX);
        guest_report::validate(&b, &self.mem, vcpus)?;
        Ok(self.guest_layout.get_or_init(|| (b.chunk_bytes, guest_report::memmap_ranges(&b).collect())))
    }

    /// Copies out the record at `gpa` and checks its header.
    fn read_reclaim_record(&self, gpa: GuestAddress) -> Result<ReclaimRecord, String> {
        if !gpa.0.is_multiple_of(8) {
            return Err("the record is not 8-byte aligned".into());
        }
        let size = core::mem::size_of::<ReclaimRecord>() as u64;
        if !guest_report::range_in_ram(&self.mem, gpa.0, size) {
            return Err("the record is not inside guest RAM".into());
        }
        let r: ReclaimRecord = self.mem.read_obj(gpa).map_err(|_| "the record is not inside guest RAM".to_string())?;
        if r.magic != RECLAIM_MAGIC {
            return Err(format!("bad magic {:#x}", r.magic));
        }
        if r.abi_version != ABI_VERSION {
            return Err(format!("ABI version {}, not {ABI_VERSION}", r.abi_version));
        }
        if r.count as usize > MAX_RECLAIM_RANGES {
            return Err(format!("{} ranges, more than {MAX_RECLAIM_RANGES}", r.count));
        }
        Ok(r)
    }

    /// Discards one accepted range; an `OFFLINE` run leaves KVM first.
    /// Returns the bytes the host had resident in it and released.
    fn give_back(&self, r: &guest_abi::ReclaimRange) -> Result<u64, reclaim::DiscardError> {
        if r.kind == reclaim_kind::OFFLINE {
            if let Some(registrar) = self.registrar.get() {
                if let Err(e) = registrar.unregister_run(r.start, r.len) {
                    // The memslot stays; the memory is still discarded
                    // below, and the guest re-onlines it as usual.
                    self.protocol_error(format_args!("cannot take memory offline: {e}"));
                }
            }
        }
        reclaim::discard(&self.mem, GuestAddress(r.start), r.len)
    }

    /// Records a rejection: the first reason is kept for the report, and
    /// each is a (rate-limited) protocol error.
    fn reclaim_rejected(&self, stats: &mut ReclaimStats, msg: String) {
        self.protocol_error(format_args!("{msg}"));
        stats.first_rejection.get_or_insert(msg);
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
        let deadline = if poll { None } else { st.wait_timeout.take().map(|d| Instant::now() + d) };
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
                if let Some(deadline) = deadline {
                    let now = Instant::now();
                    if now >= deadline {
                        return (WAIT_TIMED_OUT, PortOutcome::Continue);
                    }
                    st = self.cond.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                    continue;
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

    /// A guest error found outside this device (an access to memory that
    /// is not RAM): counted and logged as a protocol error, under the same
    /// rate limit.
    pub fn guest_error(&self, msg: std::fmt::Arguments<'_>) {
        self.protocol_error(msg);
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
    fn a_wait_with_a_timeout_returns_timed_out_once_and_a_command_still_comes_first() {
        let (d, _rx) = device();
        d.write(0, port::MAILBOX, 0x5000);
        d.write(0, port::WAIT_TIMEOUT, 20);
        assert_eq!(d.read(0, port::POLL), (0, PortOutcome::Continue), "POLL neither waits nor uses the timeout");
        assert_eq!(d.read(0, port::WAIT), (WAIT_TIMED_OUT, PortOutcome::Continue));
        // A command waiting is delivered at once, timeout or not.
        d.write(0, port::WAIT_TIMEOUT, u32::MAX);
        let seq = d.submit(guest_abi::Command::Report, 0, 0).unwrap();
        assert_eq!(d.read(0, port::WAIT), (seq as u32, PortOutcome::Continue));
        // One-shot: the clamped timeout was used up; 0 cancels one.
        assert_eq!(d.state().wait_timeout, None);
        d.write(0, port::WAIT_TIMEOUT, 5);
        d.write(0, port::WAIT_TIMEOUT, 0);
        assert_eq!(d.state().wait_timeout, None);
        d.write(0, port::WAIT_TIMEOUT, u32::MAX);
        assert_eq!(d.state().wait_timeout, Some(Duration::from_millis(MAX_WAIT_TIMEOUT_MS.into())));
    }

    #[test]
    fn a_timed_wait_still_wakes_on_stop_and_does_not_time_out_while_paused() {
        let (d, _rx) = device();
        let d = Arc::new(d);
        d.write(0, port::WAIT_TIMEOUT, MAX_WAIT_TIMEOUT_MS);
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.read(0, port::WAIT));
        d.request_stop();
        assert_eq!(t.join().unwrap(), (0, PortOutcome::StopRequested));

        let (d, _rx) = device();
        let d = Arc::new(d);
        d.set_paused(true);
        d.write(0, port::WAIT_TIMEOUT, 1);
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.read(0, port::WAIT));
        // Well past the timeout, the paused wait is still blocked...
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished(), "a paused VM's wait timed out");
        // ... and times out once resumed.
        d.set_paused(false);
        assert_eq!(t.join().unwrap(), (WAIT_TIMED_OUT, PortOutcome::Continue));
    }

    const MIB: u64 = 1 << 20;
    const STATS_AT: u64 = 0x1000;
    const RECORD_AT: u64 = 0x2000;

    /// A device over 64 MiB of RAM with a valid stats block (2 MiB chunks,
    /// the memmap at 6..7 MiB), the kernel protected at 1..5 MiB, in `mode`.
    fn reclaim_device(mode: guest_abi::Reclaim) -> (Paravirt, EventReceiver) {
        let mem = crate::memory::create_ram(&[(GuestAddress(0), 64 * MIB)], false).unwrap();
        let (tx, rx) = channel();
        let d = Paravirt::new(mem, tx, Arc::new(Timings::new()), Arc::default());
        let mut b = guest_abi::StatsBlock {
            magic: guest_abi::STATS_MAGIC,
            abi_version: ABI_VERSION,
            strategy: guest_abi::Strategy::OnDemand as u32,
            chunk_bytes: 2 * MIB,
            section_bytes: 128 * MIB,
            total_pages: 16384,
            initialized_pages: 512,
            chunks_total: 32,
            chunks_initialized: 1,
            memmap_bytes_reserved: MIB,
            cpus: 1,
            memmap_range_count: 1,
            ..Default::default()
        };
        b.memmap_ranges[0] = guest_abi::GpaRange { start: 6 * MIB, len: MIB };
        d.mem.write_obj(b, GuestAddress(STATS_AT)).unwrap();
        d.write(0, port::STATS, STATS_AT as u32);
        d.set_reclaim_policy(ReclaimPolicy::new(mode, &d.mem, vec![(0, MIB), (MIB, 5 * MIB)]));
        (d, rx)
    }

    /// Writes a record of `ranges` and reports it; returns `accepted`.
    fn report(d: &Paravirt, ranges: &[(u32, u64, u64)]) -> u64 {
        let mut rec = ReclaimRecord { count: ranges.len() as u32, accepted: u64::MAX, ..Default::default() };
        for (slot, &(kind, start, len)) in rec.ranges.iter_mut().zip(ranges) {
            *slot = guest_abi::ReclaimRange { start, len, kind, reserved: 0 };
        }
        d.mem.write_obj(rec, GuestAddress(RECORD_AT)).unwrap();
        assert_eq!(d.write(0, port::RECLAIM, RECORD_AT as u32), PortOutcome::Continue);
        d.mem.read_obj::<ReclaimRecord>(GuestAddress(RECORD_AT)).unwrap().accepted
    }

    fn fill(d: &Paravirt, start: u64, len: u64) {
        for page in (start..start + len).step_by(4096) {
            d.mem.write_obj(0x5au8, GuestAddress(page)).unwrap();
        }
    }

    #[test]
    fn accepted_ranges_leave_the_host_and_rejected_ones_stay_and_are_reported() {
        let (d, mut rx) = reclaim_device(guest_abi::Reclaim::Full);
        fill(&d, 10 * MIB, 4 * MIB);
        fill(&d, 2 * MIB, 2 * MIB);
        fill(&d, 6 * MIB, MIB);
        fill(&d, RECORD_AT, 4096);
        let before = crate::memory::ram_resident_bytes(&d.mem);
        let accepted = report(
            &d,
            &[
                (reclaim_kind::DATA, 10 * MIB, 2 * MIB),
                (reclaim_kind::DATA, 2 * MIB, 2 * MIB),  // the kernel
                (reclaim_kind::MEMMAP, 6 * MIB, 64 << 10),
                (reclaim_kind::DATA, 11 * MIB, 2 * MIB), // misaligned
                (reclaim_kind::DATA, 12 * MIB, 2 * MIB),
            ],
        );
        assert_eq!(accepted, 0b10101);
        let after = crate::memory::ram_resident_bytes(&d.mem);
        assert_eq!(before - after, 4 * MIB + (64 << 10), "exactly the accepted ranges left the host");
        assert_eq!(d.mem.read_obj::<u8>(GuestAddress(10 * MIB)).unwrap(), 0);
        assert_eq!(d.mem.read_obj::<u8>(GuestAddress(2 * MIB)).unwrap(), 0x5a, "the kernel is untouched");
        let st = d.reclaim_stats();
        assert_eq!((st.events, st.ranges_accepted, st.ranges_rejected), (1, 3, 2));
        assert_eq!((st.data_bytes, st.memmap_bytes, st.discarded_bytes()), (4 * MIB, 64 << 10, 4 * MIB + (64 << 10)));
        assert_eq!(st.accepted_bytes, 4 * MIB + (64 << 10), "all of it was resident");
        let why = st.first_rejection.unwrap();
        assert!(why.contains("range 1") && why.contains("kernel"), "{why}");
        let errors = std::iter::from_fn(|| rx.try_recv().ok()).filter(|e| matches!(e, VmEvent::GuestProtocolError { .. })).count();
        assert_eq!(errors, 2);
    }

    #[test]
    fn memory_reported_twice_or_never_touched_is_accepted_but_counts_as_discarded_only_once() {
        let (d, _rx) = reclaim_device(guest_abi::Reclaim::Full);
        fill(&d, 10 * MIB, 2 * MIB);
        fill(&d, RECORD_AT, 4096);
        let resident = crate::memory::ram_resident_bytes(&d.mem);
        let twice = [(reclaim_kind::DATA, 10 * MIB, 2 * MIB)];
        assert_eq!(report(&d, &twice), 0b1);
        assert_eq!(resident - crate::memory::ram_resident_bytes(&d.mem), 2 * MIB);
        // The same chunk again, in a second record, and a chunk the guest
        // never touched: both accepted (they are the guest's free memory),
        // neither released anything, so neither counts as discarded.
        assert_eq!(report(&d, &twice), 0b1);
        assert_eq!(report(&d, &[(reclaim_kind::DATA, 20 * MIB, 2 * MIB)]), 0b1);
        let st = d.reclaim_stats();
        assert_eq!((st.events, st.ranges_accepted, st.ranges_rejected), (3, 3, 0));
        assert_eq!((st.accepted_bytes, st.data_bytes, st.discarded_bytes()), (6 * MIB, 2 * MIB, 2 * MIB));
        // Written again in part, that part is what the next report releases.
        fill(&d, 10 * MIB, 64 << 10);
        assert_eq!(report(&d, &twice), 0b1);
        let st = d.reclaim_stats();
        assert_eq!((st.accepted_bytes, st.data_bytes), (8 * MIB, 2 * MIB + (64 << 10)));
        // An OFFLINE run and MEMMAP pages are counted the same way.
        fill(&d, 6 * MIB, 8 << 10);
        assert_eq!(report(&d, &[(reclaim_kind::MEMMAP, 6 * MIB, 64 << 10), (reclaim_kind::OFFLINE, 32 * MIB, 4 * MIB)]), 0b11);
        let st = d.reclaim_stats();
        assert_eq!((st.accepted_bytes, st.memmap_bytes, st.offline_bytes), (8 * MIB + (64 << 10) + 4 * MIB, 8 << 10, 0));
    }

    #[test]
    fn bad_records_are_rejected_whole_and_nothing_is_discarded() {
        let (d, _rx) = reclaim_device(guest_abi::Reclaim::Full);
        fill(&d, 10 * MIB, 2 * MIB);
        fill(&d, RECORD_AT, 4096);
        let resident = crate::memory::ram_resident_bytes(&d.mem);
        let good = ReclaimRecord {
            count: 1,
            ranges: {
                let mut r = [guest_abi::ReclaimRange::default(); MAX_RECLAIM_RANGES];
                r[0] = guest_abi::ReclaimRange { start: 10 * MIB, len: 2 * MIB, kind: reclaim_kind::DATA, reserved: 0 };
                r
            },
            ..Default::default()
        };
        for bad in [
            ReclaimRecord { magic: 1, ..good },
            ReclaimRecord { abi_version: 2, ..good },
            ReclaimRecord { count: MAX_RECLAIM_RANGES as u32 + 1, ..good },
            ReclaimRecord { count: u32::MAX, ..good },
        ] {
            d.mem.write_obj(ReclaimRecord { accepted: 7, ..bad }, GuestAddress(RECORD_AT)).unwrap();
            d.write(0, port::RECLAIM, RECORD_AT as u32);
            assert_eq!(d.mem.read_obj::<ReclaimRecord>(GuestAddress(RECORD_AT)).unwrap().accepted, 0);
        }
        // Addresses that are unaligned, outside RAM, or straddle its end.
        for gpa in [RECORD_AT as u32 + 4, 64 << 20, (64 << 20) - 100, u32::MAX] {
            d.write(0, port::RECLAIM, gpa);
        }
        assert_eq!(crate::memory::ram_resident_bytes(&d.mem), resident, "nothing was discarded");
        let st = d.reclaim_stats();
        assert_eq!((st.events, st.ranges_accepted, st.ranges_rejected), (8, 0, 8));
        assert!(st.first_rejection.unwrap().contains("bad magic"));
    }

    #[test]
    fn the_mode_decides_the_kinds_and_without_a_stats_block_nothing_goes() {
        let (d, _rx) = reclaim_device(guest_abi::Reclaim::Data);
        let r = [(reclaim_kind::DATA, 10 * MIB, 2 * MIB), (reclaim_kind::MEMMAP, 6 * MIB, 4096), (reclaim_kind::OFFLINE, 16 * MIB, 2 * MIB)];
        assert_eq!(report(&d, &r), 0b001);
        let (d, _rx) = reclaim_device(guest_abi::Reclaim::Off);
        assert_eq!(report(&d, &r), 0);
        let (d, _rx) = reclaim_device(guest_abi::Reclaim::Full);
        d.mem.write_obj(0u32, GuestAddress(STATS_AT)).unwrap();
        assert_eq!(report(&d, &r), 0, "the stats block's magic is gone");
        assert!(d.reclaim_stats().first_rejection.unwrap().contains("stats block"));
    }

    #[test]
    fn an_offline_run_leaves_kvm_and_comes_back_on_mem_online() {
        let (d, _rx) = reclaim_device(guest_abi::Reclaim::Full);
        let vm = Arc::new(kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm").create_vm().unwrap());
        let registrar = Arc::new(Registrar::new(vm, d.mem.clone(), 32764));
        registrar.register_ranges(&[(0, 1), (MIB, 5 * MIB)]).unwrap();
        d.set_registrar(registrar.clone());
        let boot = registrar.registered_bytes();
        // At 16 MiB the run is 2 MiB; at 32 MiB, 4 MiB.
        d.write(0, port::MEM_ONLINE, 16);
        d.write(0, port::MEM_ONLINE, 32);
        assert_eq!(registrar.registered_bytes(), boot + 6 * MIB);
        fill(&d, 32 * MIB, 4 * MIB);
        let accepted = report(&d, &[(reclaim_kind::OFFLINE, 32 * MIB, 4 * MIB), (reclaim_kind::OFFLINE, 16 * MIB, 4 * MIB)]);
        assert_eq!(accepted, 0b01, "the second is not one run");
        assert_eq!(registrar.registered_bytes(), boot + 2 * MIB);
        assert_eq!((registrar.slots_deleted(), d.reclaim_stats().offline_bytes), (1, 4 * MIB));
        assert_eq!(crate::memory::resident_bytes(&d.mem, GuestAddress(32 * MIB), 4 * MIB), 0);
        d.write(0, port::MEM_ONLINE, 33);
        assert_eq!(registrar.registered_bytes(), boot + 6 * MIB);
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

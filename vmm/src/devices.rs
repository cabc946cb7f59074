//! The VM's port-I/O devices: COM1 (a `vm-superio` 16550), the i8042 reset
//! line, and the paravirtual device of `guest_abi` (exit code, boot phases,
//! stats block and mailbox addresses, the command mailbox, AP start-up).
//!
//! Devices are shared by every vCPU thread and by the VMM thread. The
//! paravirtual device is where a vCPU blocks while the guest idles: a read of
//! `port::WAIT` sleeps on a condition variable until the VMM thread submits a
//! command (or asks the VM to stop), so an idle VM costs no host CPU.

use crate::timings::{Metrics, Timings};
use guest_abi::{port, ApBoot, CommandStatus, Mailbox, Phase, MAILBOX_MAGIC};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_superio::{I8042Device, Serial, Trigger};

/// A request from the API thread, with where to send the answer. The VMM
/// thread answers exactly once (dropping `reply` unanswered reads as a 500).
#[derive(Debug)]
pub struct ApiCall {
    pub request: api::ApiRequest,
    pub reply: tokio::sync::oneshot::Sender<Result<api::ApiResponse, api::ApiError>>,
}

impl PartialEq for ApiCall {
    /// Calls are never equal: each carries its own reply channel.
    fn eq(&self, _: &ApiCall) -> bool {
        false
    }
}

/// Something the VMM thread acts on: what the guest did, or an API request.
#[derive(Debug, PartialEq)]
pub enum VmEvent {
    /// An API request (from the API server thread).
    Api(ApiCall),
    /// The guest reached a boot phase.
    Phase(Phase),
    /// A command finished (sequence number, status, results).
    CommandDone { seq: u64, status: Option<CommandStatus>, result0: u64, result1: u64 },
    /// The guest asked for its application processors (the `ApBoot` it wrote).
    StartAps(ApBoot),
    /// vCPU `cpu` stopped.
    VcpuStopped { cpu: u8, reason: crate::vcpu::StopReason },
    /// The guest wrote something the VMM refused (bad address, bad record).
    GuestProtocolError(String),
    /// The process received this signal (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
}

/// An interrupt line that goes nowhere: the guest polls, it takes no interrupts.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The i8042's reset line: records that the guest asked for a reset.
#[derive(Clone, Default)]
pub struct ResetLine(Arc<std::sync::atomic::AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Where the serial console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

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

/// What a port access asks of the vCPU loop.
#[derive(Debug, Clone, PartialEq)]
pub enum PortOutcome {
    /// Carry on.
    Continue,
    /// Stop this VM: the guest exited with this code.
    GuestExit(u32),
    /// Stop this VM: the guest asked for a reset.
    Reset,
    /// Stop this VM: the guest reported an exception (registers tell which).
    GuestException,
    /// Stop: the VMM asked this vCPU to stop while it waited.
    StopRequested,
    /// Stop: the VMM could not do what the guest asked (KVM refused).
    Failed(String),
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

/// All devices of one VM.
pub struct Devices {
    /// COM1, absent with `--serial none`: its ports then read as all ones,
    /// like a PC without the UART, and the guest skips console output.
    serial: Option<Mutex<Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleOut>>>,
    reset: ResetLine,
    i8042: Mutex<I8042Device<ResetLine>>,
    pv: Mutex<PvState>,
    pv_cond: Condvar,
    mem: GuestMemoryMmap,
    events: Sender<VmEvent>,
    pub timings: Arc<Timings>,
    pub metrics: Arc<Metrics>,
    /// Whether the paravirtual ports exist (off: they read as all ones).
    paravirt: AtomicBool,
    /// vCPUs in this VM (answered on `port::CPU_COUNT`).
    vcpu_count: std::sync::atomic::AtomicU32,
    /// Registers guest RAM with KVM when the guest onlines it.
    registrar: std::sync::OnceLock<Arc<crate::memory::Registrar>>,
}

/// Offset of the i8042 command port from its data port (0x60).
const I8042_DATA: u16 = 0x60;

impl Devices {
    /// Creates the devices; console output goes to `console` (no UART if `None`).
    pub fn new(
        mem: GuestMemoryMmap,
        console: Option<ConsoleOut>,
        events: Sender<VmEvent>,
        timings: Arc<Timings>,
        metrics: Arc<Metrics>,
    ) -> Devices {
        let reset = ResetLine::default();
        Devices {
            serial: console.map(|c| Mutex::new(Serial::new(NoInterrupt, c))),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
            pv: Mutex::new(PvState { next_seq: 1, ..Default::default() }),
            pv_cond: Condvar::new(),
            mem,
            events,
            timings,
            metrics,
            paravirt: AtomicBool::new(true),
            vcpu_count: std::sync::atomic::AtomicU32::new(1),
            registrar: std::sync::OnceLock::new(),
        }
    }

    /// Sets the registrar that serves `port::MEM_ONLINE`.
    pub fn set_registrar(&self, r: Arc<crate::memory::Registrar>) {
        let _ = self.registrar.set(r);
    }

    /// Bytes of guest RAM registered with KVM (all of it if nothing tracks it).
    pub fn registered_bytes(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.registrar.get().map_or_else(|| self.mem.iter().map(|r| r.len()).sum(), |r| r.registered_bytes())
    }

    /// Whether `gpa` is guest RAM.
    pub fn is_ram(&self, gpa: u64) -> bool {
        use vm_memory::GuestMemoryBackend;
        self.mem.address_in_range(GuestAddress(gpa))
    }

    /// Sets the vCPU count the guest is told.
    pub fn set_vcpu_count(&self, n: u32) {
        self.vcpu_count.store(n, Ordering::Relaxed);
    }

    /// Enables or removes the paravirtual ports (removed: a plain PC).
    pub fn set_paravirt(&self, on: bool) {
        self.paravirt.store(on, Ordering::Relaxed);
    }

    fn pv(&self) -> MutexGuard<'_, PvState> {
        // A poisoned lock means a vCPU thread panicked mid-update; the state is
        // plain data that stays consistent, so carry on with it.
        self.pv.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, e: VmEvent) {
        // The VMM thread may already be gone at shutdown; nothing to do then.
        let _ = self.events.send(e);
    }

    /// Flushes console output (at exit).
    pub fn flush_console(&self) {
        if let Some(serial) = &self.serial {
            let mut s = serial.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.writer_mut().flush();
        }
    }

    /// A port write from vCPU `cpu`.
    pub fn port_out(&self, cpu: u8, port: u16, data: &[u8]) -> PortOutcome {
        self.note_port_access();
        match port {
            p if (port::SERIAL_COM1..port::SERIAL_COM1 + 8).contains(&p) => {
                if let Some(serial) = &self.serial {
                    if p == port::SERIAL_COM1 {
                        Metrics::inc(&self.metrics.serial_bytes);
                    }
                    let mut s = serial.lock().unwrap_or_else(|e| e.into_inner());
                    // Writes to a console that went away (closed stdout) are dropped.
                    let _ = s.write((p - port::SERIAL_COM1) as u8, data.first().copied().unwrap_or(0));
                }
                PortOutcome::Continue
            }
            p if p == I8042_DATA || p == port::I8042_COMMAND => {
                let mut i = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                let _ = i.write((p - I8042_DATA) as u8, data.first().copied().unwrap_or(0));
                if self.reset.0.load(Ordering::SeqCst) {
                    PortOutcome::Reset
                } else {
                    PortOutcome::Continue
                }
            }
            p if (port::PV_BASE..port::PV_END).contains(&p) && self.paravirt.load(Ordering::Relaxed) => {
                self.pv_out(cpu, p, le_u32(data))
            }
            _ => PortOutcome::Continue,
        }
    }

    /// A port read from vCPU `cpu`; fills `data`.
    pub fn port_in(&self, cpu: u8, port: u16, data: &mut [u8]) -> PortOutcome {
        self.note_port_access();
        data.fill(0xff);
        match port {
            p if (port::SERIAL_COM1..port::SERIAL_COM1 + 8).contains(&p) => {
                if let Some(serial) = &self.serial {
                    let mut s = serial.lock().unwrap_or_else(|e| e.into_inner());
                    let v = s.read((p - port::SERIAL_COM1) as u8);
                    data.fill(0);
                    data[0] = v;
                }
                PortOutcome::Continue
            }
            p if p == I8042_DATA || p == port::I8042_COMMAND => {
                let mut i = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                data.fill(0);
                data[0] = i.read((p - I8042_DATA) as u8);
                PortOutcome::Continue
            }
            p if (port::PV_BASE..port::PV_END).contains(&p) && self.paravirt.load(Ordering::Relaxed) => {
                let (value, outcome) = self.pv_in(cpu, p);
                put_le_u32(data, value);
                outcome
            }
            _ => PortOutcome::Continue,
        }
    }

    fn note_port_access(&self) {
        self.timings.mark_once(&self.timings.guest_first_port_write);
    }

    fn pv_out(&self, cpu: u8, p: u16, value: u32) -> PortOutcome {
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
                self.pv().stats_gpa = Some(GuestAddress(u64::from(value)));
                PortOutcome::Continue
            }
            port::MAILBOX => {
                self.pv().mailbox_gpa = Some(GuestAddress(u64::from(value)));
                PortOutcome::Continue
            }
            port::DONE => {
                self.command_done(u64::from(value));
                PortOutcome::Continue
            }
            port::EXCEPTION => PortOutcome::GuestException,
            port::MEM_ONLINE => {
                let gpa = u64::from(value) << 20;
                let Some(registrar) = self.registrar.get() else { return PortOutcome::Continue };
                match registrar.register_range(gpa, gpa + 1) {
                    Ok(()) => PortOutcome::Continue,
                    Err(e @ crate::memory::MemoryError::NotRam { .. }) => {
                        self.protocol_error(format!("guest asked to online memory that does not exist: {e}"));
                        PortOutcome::Continue
                    }
                    Err(e) => PortOutcome::Failed(crate::cli::error_chain(&e)),
                }
            }
            port::AP_BOOT if cpu == 0 => {
                match self.mem.read_obj::<ApBoot>(GuestAddress(u64::from(value))) {
                    Ok(rec) => self.send(VmEvent::StartAps(rec)),
                    Err(_) => self.protocol_error(format!("AP boot record at {value:#x} is outside guest RAM")),
                }
                PortOutcome::Continue
            }
            port::AP_RELEASE => {
                let mut st = self.pv();
                st.ap_generation = st.ap_generation.wrapping_add(1);
                drop(st);
                self.pv_cond.notify_all();
                PortOutcome::Continue
            }
            _ => PortOutcome::Continue,
        }
    }

    fn pv_in(&self, cpu: u8, p: u16) -> (u32, PortOutcome) {
        match p {
            port::IDENT => (guest_abi::PV_MAGIC, PortOutcome::Continue),
            port::CPU_COUNT => (self.vcpu_count.load(Ordering::Relaxed), PortOutcome::Continue),
            port::WAIT | port::POLL => {
                let mut st = self.pv();
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
                            self.send(VmEvent::CommandDone { seq: cmd.seq, status: None, result0: 0, result1: 0 });
                            st = self.pv();
                            continue;
                        }
                    }
                    if p == port::POLL && !st.paused {
                        return (0, PortOutcome::Continue);
                    }
                    st = self.pv_cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
            port::AP_PARK if cpu != 0 => {
                let mut st = self.pv();
                let gen = st.ap_generation;
                while st.ap_generation == gen && !st.stop {
                    st = self.pv_cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.stop {
                    return (0, PortOutcome::StopRequested);
                }
                (st.ap_generation, PortOutcome::Continue)
            }
            _ => (0xffff_ffff, PortOutcome::Continue),
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
        let mut st = self.pv();
        let Some(seq) = st.in_flight else {
            drop(st);
            self.protocol_error(format!("guest finished command {seq_low} but none was running"));
            return;
        };
        st.in_flight = None;
        let gpa = st.mailbox_gpa;
        drop(st);
        let mb = gpa.and_then(|g| self.mem.read_obj::<Mailbox>(g).ok());
        let event = match mb {
            Some(mb) if mb.done_seq == seq && seq as u32 as u64 == seq_low => VmEvent::CommandDone {
                seq,
                status: CommandStatus::decode(mb.status),
                result0: mb.result0,
                result1: mb.result1,
            },
            _ => VmEvent::CommandDone { seq, status: None, result0: 0, result1: 0 },
        };
        self.send(event);
    }

    fn protocol_error(&self, msg: String) {
        self.metrics.guest_protocol_errors.fetch_add(1, Ordering::Relaxed);
        self.send(VmEvent::GuestProtocolError(msg));
    }

    /// Queues a command for the guest; returns its sequence number. The
    /// result arrives as [`VmEvent::CommandDone`].
    pub fn submit(&self, cmd: guest_abi::Command, arg0: u64, arg1: u64) -> Result<u64, SubmitError> {
        let mut st = self.pv();
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
        self.pv_cond.notify_all();
        Ok(seq)
    }

    /// Where the guest said its stats block is.
    pub fn stats_gpa(&self) -> Option<GuestAddress> {
        self.pv().stats_gpa
    }

    /// Wakes every vCPU blocked in a port read and makes it stop.
    pub fn request_stop(&self) {
        self.pv().stop = true;
        self.pv_cond.notify_all();
    }

    /// Holds (or releases) commands: a paused VM's idle vCPU stays blocked.
    pub fn set_paused(&self, paused: bool) {
        self.pv().paused = paused;
        self.pv_cond.notify_all();
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn put_le_u32(data: &mut [u8], value: u32) {
    let b = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};

    /// A console that test code can read back.
    #[derive(Clone, Default)]
    pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub fn devices() -> (Devices, Receiver<VmEvent>, SharedBuf) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (tx, rx) = channel();
        let buf = SharedBuf::default();
        let d = Devices::new(mem, Some(Box::new(buf.clone())), tx, Arc::new(Timings::new()), Arc::default());
        (d, rx, buf)
    }

    #[test]
    fn without_a_console_the_uart_is_absent() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tx, _rx) = channel();
        let d = Devices::new(mem, None, tx, Arc::new(Timings::new()), Arc::default());
        let mut lsr = [0u8];
        d.port_in(0, 0x3fd, &mut lsr);
        assert_eq!(lsr[0], 0xff, "an absent UART floats high");
        assert_eq!(d.port_out(0, 0x3f8, b"x"), PortOutcome::Continue);
    }

    #[test]
    fn serial_bytes_reach_the_console() {
        let (d, _rx, buf) = devices();
        for b in b"hi\n" {
            assert_eq!(d.port_out(0, 0x3f8, &[*b]), PortOutcome::Continue);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        d.port_in(0, 0x3fd, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter always ready");
    }

    #[test]
    fn i8042_reset_and_exit_port_stop_the_vm() {
        let (d, _rx, _) = devices();
        assert_eq!(d.port_out(0, 0x64, &[0x00]), PortOutcome::Continue);
        assert_eq!(d.port_out(0, 0x64, &[0xfe]), PortOutcome::Reset);
        let (d, _rx, _) = devices();
        assert_eq!(d.port_out(0, port::EXIT, &7u32.to_le_bytes()), PortOutcome::GuestExit(7));
    }

    #[test]
    fn ident_returns_the_magic_and_unknown_ports_read_all_ones() {
        let (d, _rx, _) = devices();
        let mut v = [0u8; 4];
        d.port_in(0, port::IDENT, &mut v);
        assert_eq!(u32::from_le_bytes(v), guest_abi::PV_MAGIC);
        d.port_in(0, 0x1234, &mut v);
        assert_eq!(v, [0xff; 4]);
    }

    #[test]
    fn phases_are_timed_and_reported_and_bad_ones_are_errors() {
        let (d, rx, _) = devices();
        d.port_out(0, port::PHASE, &(Phase::Ready as u32).to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Phase(Phase::Ready));
        assert!(d.timings.guest_ready.get().is_some());
        d.port_out(0, port::PHASE, &99u32.to_le_bytes());
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestProtocolError(_)));
    }

    #[test]
    fn a_command_goes_through_the_mailbox_and_back() {
        let (d, rx, _) = devices();
        assert_eq!(d.submit(guest_abi::Command::Report, 0, 0), Err(SubmitError::NoMailbox));
        d.port_out(0, port::MAILBOX, &0x5000u32.to_le_bytes());
        let seq = d.submit(guest_abi::Command::Alloc, 4096, 0).unwrap();
        assert_eq!(d.submit(guest_abi::Command::Report, 0, 0), Err(SubmitError::Busy));
        let mut v = [0u8; 4];
        assert_eq!(d.port_in(0, port::WAIT, &mut v), PortOutcome::Continue);
        assert_eq!(u64::from(u32::from_le_bytes(v)), seq);
        let mut mb: Mailbox = d.mem.read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!((mb.cmd, mb.arg0), (guest_abi::Command::Alloc as u32, 4096));
        // The guest answers.
        mb.status = CommandStatus::Ok as u32;
        mb.result0 = 4096;
        mb.done_seq = seq;
        d.mem.write_obj(mb, GuestAddress(0x5000)).unwrap();
        d.port_out(0, port::DONE, &(seq as u32).to_le_bytes());
        assert_eq!(
            rx.try_recv().unwrap(),
            VmEvent::CommandDone { seq, status: Some(CommandStatus::Ok), result0: 4096, result1: 0 }
        );
        // A DONE with nothing running is the guest's error, not a panic.
        d.port_out(0, port::DONE, &5u32.to_le_bytes());
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::GuestProtocolError(_)));
    }

    #[test]
    fn a_mailbox_outside_ram_fails_the_command_not_the_vmm() {
        let (d, rx, _) = devices();
        d.port_out(0, port::MAILBOX, &0xffff_f000u32.to_le_bytes());
        let seq = d.submit(guest_abi::Command::Report, 0, 0).unwrap();
        let mut v = [0u8; 4];
        assert_eq!(d.port_in(0, port::POLL, &mut v), PortOutcome::Continue);
        assert_eq!(u32::from_le_bytes(v), 0);
        let events: Vec<_> = rx.try_iter().collect();
        assert!(matches!(events[0], VmEvent::GuestProtocolError(_)));
        assert_eq!(events[1], VmEvent::CommandDone { seq, status: None, result0: 0, result1: 0 });
    }

    #[test]
    fn a_blocked_wait_wakes_on_stop() {
        let (d, _rx, _) = devices();
        let d = Arc::new(d);
        let d2 = d.clone();
        let t = std::thread::spawn(move || {
            let mut v = [0u8; 4];
            d2.port_in(0, port::WAIT, &mut v)
        });
        d.request_stop();
        assert_eq!(t.join().unwrap(), PortOutcome::StopRequested);
    }

    #[test]
    fn short_and_long_port_data_are_handled() {
        assert_eq!(le_u32(&[1]), 1);
        assert_eq!(le_u32(&[1, 0, 0, 0, 9]), 1);
        let mut d = [0u8; 2];
        put_le_u32(&mut d, 0x0102_0304);
        assert_eq!(d, [4, 3]);
    }
}

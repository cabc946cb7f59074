//! COM1: a `vm-superio` 16550 UART whose output goes to the console target
//! (stdout, a file, or nowhere). Without a console the UART is absent and
//! its ports read as all ones, like a PC without one.
//!
//! The UART never writes to the host on the vCPU thread. A byte the guest
//! sends goes into a buffer of [`CONSOLE_BUFFER_BYTES`]; a full buffer
//! drops the byte and counts it (`serial_bytes_dropped` in `GET /metrics`).
//! The first byte into an empty buffer sends one [`VmEvent::ConsoleOutput`],
//! and the controller drains the buffer with [`SerialPort::drain`], which
//! never waits for the host sink: what a full pipe does not take stays
//! buffered and is tried again. A console file takes at most its cap
//! (`--serial-max-bytes`), then drops and counts. When the VM stops, one last
//! drain waits at most [`CONSOLE_FINAL_FLUSH`].

use crate::config::SerialTarget;
use crate::events::VmEvent;
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use crate::events::EventSender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vm_superio::{Serial, Trigger};

/// Guest console bytes held for the host; more are dropped and counted.
pub const CONSOLE_BUFFER_BYTES: usize = 64 << 10;

/// How long the last drain at stop waits for a slow console.
pub const CONSOLE_FINAL_FLUSH: Duration = Duration::from_millis(250);

/// An interrupt line that goes nowhere: the guest polls, it takes no interrupts.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Why the console could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot create serial output file {path}")]
pub struct ConsoleError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl ConsoleError {
    /// The file that could not be created.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

enum Sink {
    /// A descriptor, written without blocking ([`crate::out::write_fd`]).
    Fd(File),
    /// Any writer (tests).
    Writer(Box<dyn Write + Send>),
}

/// The host side of the console: where drained bytes go, and its cap.
pub struct ConsoleOut {
    sink: Sink,
    cap: u64,
    written: u64,
}

/// What one write to the host sink did.
enum Wrote {
    /// This many bytes went out (fewer than given: the sink is full for now).
    Some(usize),
    /// The sink failed (EPIPE, EIO): the bytes are lost.
    Failed,
}

impl ConsoleOut {
    /// A console writing to `w` (tests), with no cap.
    pub fn writer(w: Box<dyn Write + Send>) -> ConsoleOut {
        ConsoleOut { sink: Sink::Writer(w), cap: u64::MAX, written: 0 }
    }

    fn write(&mut self, bytes: &[u8], deadline: Instant) -> Wrote {
        match &mut self.sink {
            Sink::Fd(f) => match crate::out::write_fd(f.as_fd(), bytes, deadline) {
                Ok(()) => Wrote::Some(bytes.len()),
                Err(crate::out::WriteError::Timeout { written }) => Wrote::Some(written),
                Err(crate::out::WriteError::Failed { .. }) => Wrote::Failed,
            },
            Sink::Writer(w) => match w.write_all(bytes) {
                Ok(()) => Wrote::Some(bytes.len()),
                Err(_) => Wrote::Failed,
            },
        }
    }
}

/// Opens the console for `target` (`None`: no UART); a file gets at most
/// `file_cap` bytes.
pub fn open_console(target: &SerialTarget, file_cap: u64) -> Result<Option<ConsoleOut>, ConsoleError> {
    Ok(Some(match target {
        SerialTarget::Stdout => {
            // Our own descriptor of stdout, written with raw `write`s (no
            // buffer in between that could block later).
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| ConsoleError { path: "/dev/stdout".into(), source })?;
            ConsoleOut { sink: Sink::Fd(File::from(fd)), cap: u64::MAX, written: 0 }
        }
        SerialTarget::None => return Ok(None),
        SerialTarget::File(p) => {
            let f = std::fs::File::create(p).map_err(|source| ConsoleError { path: p.clone(), source })?;
            ConsoleOut { sink: Sink::Fd(f), cap: file_cap, written: 0 }
        }
    }))
}

/// The buffer between the UART (vCPU threads) and the drain (controller).
struct Buffer {
    bytes: Mutex<VecDeque<u8>>,
    /// A [`VmEvent::ConsoleOutput`] was sent and not yet handled.
    wake_pending: AtomicBool,
    events: Option<EventSender>,
    metrics: Arc<Metrics>,
}

impl Buffer {
    fn bytes(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the UART writes to: the buffer.
struct UartOut(Arc<Buffer>);

impl Write for UartOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut b = self.0.bytes();
        let room = CONSOLE_BUFFER_BYTES.saturating_sub(b.len());
        let kept = data.len().min(room);
        b.extend(&data[..kept]);
        drop(b);
        if kept < data.len() {
            let lost = (data.len() - kept) as u64;
            self.0.metrics.serial_bytes_dropped.fetch_add(lost, Ordering::Relaxed);
        }
        if kept > 0 && !self.0.wake_pending.swap(true, Ordering::AcqRel) {
            if let Some(tx) = &self.0.events {
                let _ = tx.send(VmEvent::ConsoleOutput);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // vm-superio flushes after every byte; the drain writes in chunks.
        Ok(())
    }
}

/// The UART.
pub struct SerialPort {
    uart: Mutex<Serial<NoInterrupt, vm_superio::serial::NoEvents, UartOut>>,
    buffer: Arc<Buffer>,
    /// Taken only by the drain (the controller's thread), never by a vCPU.
    host: Mutex<ConsoleOut>,
}

impl SerialPort {
    /// A UART writing to `out`; the first byte into an empty buffer sends
    /// [`VmEvent::ConsoleOutput`] on `events`.
    pub fn new(out: ConsoleOut, events: Option<EventSender>, metrics: Arc<Metrics>) -> SerialPort {
        let buffer = Arc::new(Buffer {
            bytes: Mutex::new(VecDeque::new()),
            wake_pending: AtomicBool::new(false),
            events,
            metrics,
        });
        SerialPort {
            uart: Mutex::new(Serial::new(NoInterrupt, UartOut(buffer.clone()))),
            buffer,
            host: Mutex::new(out),
        }
    }

    /// Whether `port` is one of COM1's eight registers.
    pub fn owns(port: u16) -> bool {
        (guest_abi::port::SERIAL_COM1..guest_abi::port::SERIAL_COM1 + 8).contains(&port)
    }

    /// A write to register `port`.
    pub fn write(&self, port: u16, value: u8) {
        let mut s = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        // The buffer never fails a write (it drops and counts).
        let _ = s.write((port - guest_abi::port::SERIAL_COM1) as u8, value);
    }

    /// A read of register `port`.
    pub fn read(&self, port: u16) -> u8 {
        self.uart.lock().unwrap_or_else(|e| e.into_inner()).read((port - guest_abi::port::SERIAL_COM1) as u8)
    }

    /// Writes buffered output to the host, waiting at most `wait` for a
    /// full sink; returns true when nothing is left buffered.
    pub fn drain(&self, wait: Duration) -> bool {
        // Cleared first: a byte buffered from now on sends a new event.
        self.buffer.wake_pending.store(false, Ordering::Release);
        let deadline = Instant::now() + wait;
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = &self.buffer.metrics.serial_bytes_dropped;
        loop {
            // Only this thread removes bytes, so the front stays the same
            // while the lock is released for the write.
            let chunk: Vec<u8> = self.buffer.bytes().iter().take(crate::out::PIPE_BUF).copied().collect();
            if chunk.is_empty() {
                return true;
            }
            let room = usize::try_from(host.cap.saturating_sub(host.written)).unwrap_or(usize::MAX);
            let n = chunk.len().min(room);
            let (sent, lost) = match host.write(&chunk[..n], deadline) {
                Wrote::Some(k) => (k, chunk.len() - n),
                Wrote::Failed => (0, chunk.len()),
            };
            host.written += sent as u64;
            dropped.fetch_add(lost as u64, Ordering::Relaxed);
            self.buffer.bytes().drain(..sent + lost);
            if sent + lost < chunk.len() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::tests::SharedBuf;

    fn port(out: ConsoleOut) -> (SerialPort, Arc<Metrics>, crate::events::EventReceiver) {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = crate::events::channel();
        (SerialPort::new(out, Some(tx), metrics.clone()), metrics, rx)
    }

    fn send(p: &SerialPort, bytes: &[u8]) {
        for b in bytes {
            p.write(guest_abi::port::SERIAL_COM1, *b);
        }
    }

    #[test]
    fn output_is_buffered_until_drained_and_wakes_the_drain_once() {
        let buf = SharedBuf::default();
        let (p, _, mut rx) = port(ConsoleOut::writer(Box::new(buf.clone())));
        send(&p, b"hello\n");
        assert!(buf.0.lock().unwrap().is_empty(), "nothing is written on the vCPU's thread");
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 1, "one wake-up for a burst");
        assert!(p.drain(Duration::ZERO));
        assert_eq!(&*buf.0.lock().unwrap(), b"hello\n");
        send(&p, b"x");
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 1, "a drained buffer wakes again");
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let buf = SharedBuf::default();
        let (p, m, _rx) = port(ConsoleOut::writer(Box::new(buf.clone())));
        send(&p, &vec![b'x'; CONSOLE_BUFFER_BYTES + 10]);
        assert_eq!(m.serial_bytes_dropped.load(Ordering::Relaxed), 10);
        p.drain(Duration::ZERO);
        assert_eq!(buf.0.lock().unwrap().len(), CONSOLE_BUFFER_BYTES);
    }

    #[test]
    fn a_pipe_nobody_reads_keeps_bytes_buffered_and_never_blocks() {
        let (_r, w) = std::io::pipe().unwrap();
        let out = ConsoleOut { sink: Sink::Fd(File::from(std::os::fd::OwnedFd::from(w))), cap: u64::MAX, written: 0 };
        let (p, m, _rx) = port(out);
        let start = Instant::now();
        for _ in 0..8 {
            send(&p, &vec![b'y'; CONSOLE_BUFFER_BYTES]);
            p.drain(Duration::ZERO);
        }
        assert!(!p.drain(Duration::from_millis(10)), "the pipe is full: bytes stay buffered");
        assert!(m.serial_bytes_dropped.load(Ordering::Relaxed) > 0);
        assert!(start.elapsed() < Duration::from_secs(10), "a drain blocked");
    }

    #[test]
    fn a_console_file_stops_at_its_cap_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let out = open_console(&SerialTarget::File(path.clone()), 100).unwrap().unwrap();
        let (p, m, _rx) = port(out);
        send(&p, &[b'z'; 250]);
        assert!(p.drain(Duration::ZERO));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
        assert_eq!(m.serial_bytes_dropped.load(Ordering::Relaxed), 150);
    }
}

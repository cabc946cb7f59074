//! COM1: a `vm-superio` 16550 UART whose output goes to the console target
//! (stdout, a file, or nowhere). Without a console the UART is absent and
//! its ports read as all ones, like a PC without one.

use crate::config::SerialTarget;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use vm_superio::{Serial, Trigger};

/// Where the serial console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

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

/// Opens the console for `target` (`None`: no UART).
pub fn open_console(target: &SerialTarget) -> Result<Option<ConsoleOut>, ConsoleError> {
    Ok(Some(match target {
        SerialTarget::Stdout => Box::new(std::io::LineWriter::new(std::io::stdout())),
        SerialTarget::None => return Ok(None),
        SerialTarget::File(p) => {
            let f = std::fs::File::create(p).map_err(|source| ConsoleError { path: p.clone(), source })?;
            Box::new(std::io::LineWriter::new(f))
        }
    }))
}

/// The UART.
pub struct SerialPort {
    uart: Mutex<Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleOut>>,
}

impl SerialPort {
    /// A UART writing to `out`.
    pub fn new(out: ConsoleOut) -> SerialPort {
        SerialPort { uart: Mutex::new(Serial::new(NoInterrupt, out)) }
    }

    /// Whether `port` is one of COM1's eight registers.
    pub fn owns(port: u16) -> bool {
        (guest_abi::port::SERIAL_COM1..guest_abi::port::SERIAL_COM1 + 8).contains(&port)
    }

    /// A write to register `port`.
    pub fn write(&self, port: u16, value: u8) {
        let mut s = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        // Writes to a console that went away (closed stdout) are dropped.
        let _ = s.write((port - guest_abi::port::SERIAL_COM1) as u8, value);
    }

    /// A read of register `port`.
    pub fn read(&self, port: u16) -> u8 {
        self.uart.lock().unwrap_or_else(|e| e.into_inner()).read((port - guest_abi::port::SERIAL_COM1) as u8)
    }

    /// Flushes what the console buffered.
    pub fn flush(&self) {
        let mut s = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.writer_mut().flush();
    }
}

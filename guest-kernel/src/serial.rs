//! 16550 UART console on COM1, and `print!`/`println!`.
//!
//! The transmitter is polled once per 16-byte FIFO load (as Linux's 8250
//! driver does with `tx_loadsz`), so each byte costs about one VM exit.

use crate::arch::{inb, outb};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};
use guest_abi::port::SERIAL_COM1;

const THR: u16 = SERIAL_COM1;
const LSR: u16 = SERIAL_COM1 + 5;
const LSR_THRE: u8 = 1 << 5;
const FIFO_SIZE: usize = 16;

static LOCK: AtomicBool = AtomicBool::new(false);
/// Set when COM1 is absent (its status register reads all ones).
static ABSENT: AtomicBool = AtomicBool::new(false);

/// Probes COM1 once: an absent UART's line status register floats to 0xff
/// (no real 16550 reports that: bit 7 means a FIFO error with bit 6 set).
/// Without a UART the kernel skips console output entirely.
pub fn probe() -> bool {
    let present = inb(LSR) != 0xff;
    ABSENT.store(!present, Ordering::Relaxed);
    present
}
/// Set when the console is muted (`quiet` on the command line).
pub static QUIET: AtomicBool = AtomicBool::new(false);

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(FIFO_SIZE) {
            // Bounded wait: a UART that never drains must not hang the kernel.
            for _ in 0..100_000 {
                if inb(LSR) & LSR_THRE != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
            for &b in chunk {
                outb(THR, b);
            }
        }
        Ok(())
    }
}

/// Writes formatted text to the console (used by `print!`).
pub fn write_fmt(args: fmt::Arguments) {
    write_fmt_forced(args, false);
}

/// Writes even when the console is quiet (panics).
pub fn write_fmt_forced(args: fmt::Arguments, force: bool) {
    if ABSENT.load(Ordering::Relaxed) || (!force && QUIET.load(Ordering::Relaxed)) {
        return;
    }
    if force {
        // A panic may have interrupted a writer holding the lock: write anyway.
        let _ = Uart.write_fmt(args);
        return;
    }
    while LOCK.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let _ = Uart.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

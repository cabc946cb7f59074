//! The i8042 keyboard controller, reduced to what a PC guest uses to end:
//! writing 0xFE to its command port pulls the reset line, and the VM stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_superio::{I8042Device, Trigger};

/// The i8042 data port (the command port is `guest_abi::port::I8042_COMMAND`).
pub const DATA_PORT: u16 = 0x60;

/// The i8042's reset line: records that the guest asked for a reset.
#[derive(Clone, Default)]
pub struct ResetLine(Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The controller and its reset line.
pub struct I8042 {
    device: Mutex<I8042Device<ResetLine>>,
    reset: ResetLine,
}

impl Default for I8042 {
    fn default() -> Self {
        let reset = ResetLine::default();
        I8042 { device: Mutex::new(I8042Device::new(reset.clone())), reset }
    }
}

impl I8042 {
    /// Whether `port` is one of the controller's two ports.
    pub fn owns(port: u16) -> bool {
        port == DATA_PORT || port == guest_abi::port::I8042_COMMAND
    }

    /// A write to `port`; returns whether the guest asked for a reset.
    pub fn write(&self, port: u16, value: u8) -> bool {
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        // Unknown commands are ignored, as a real controller ignores them.
        let _ = d.write((port - DATA_PORT) as u8, value);
        self.reset.0.swap(false, Ordering::SeqCst)
    }

    /// A read of `port`.
    pub fn read(&self, port: u16) -> u8 {
        self.device.lock().unwrap_or_else(|e| e.into_inner()).read((port - DATA_PORT) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_resets() {
        let i = I8042::default();
        assert!(!i.write(guest_abi::port::I8042_COMMAND, 0x00));
        assert!(i.write(guest_abi::port::I8042_COMMAND, guest_abi::port::I8042_RESET));
        assert!(I8042::owns(0x60) && I8042::owns(0x64) && !I8042::owns(0x61));
    }
}

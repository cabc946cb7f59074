//! The VM's port-I/O devices and the bus that routes guest port accesses to
//! them: COM1 ([`serial`], a `vm-superio` 16550), the i8042 reset line
//! ([`i8042`]), and the paravirtual device of `guest_abi` ([`paravirt`]: exit
//! code, boot phases, stats block and mailbox addresses, the command mailbox,
//! AP start-up, memory onlining). [`bus::Devices`] holds them all; each port
//! access ends in a [`outcome::PortOutcome`] for the vCPU loop.

pub mod bus;
pub mod i8042;
pub mod outcome;
pub mod paravirt;
pub mod serial;

pub use bus::Devices;
pub use outcome::PortOutcome;
pub use paravirt::SubmitError;

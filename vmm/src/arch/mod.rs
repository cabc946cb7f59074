//! Architecture set-up: everything that depends on the guest CPU's
//! architecture. Only x86-64 is supported; its parts live in [`x86_64`].

pub mod x86_64;

pub use self::x86_64::*;

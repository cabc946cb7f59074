//! The guest kernel's architecture-independent parts, built for the guest
//! (`x86_64-unknown-none`) and for the host, where they are unit-tested.
//!
//! - [`mm`]: the physical memory manager (struct pages, memmap, buddy allocator,
//!   the four memmap initialization strategies).
//! - [`cmdline`] and [`config`]: the kernel command line and what it selects.
#![cfg_attr(target_os = "none", no_std)]

/// The command line rules, which are the contract's (`guest_abi::cmdline`).
pub use guest_abi::cmdline;
pub mod config;
pub mod mm;

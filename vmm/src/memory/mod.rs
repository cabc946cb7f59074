//! Guest RAM: its host mapping ([`ram`]), its registration with KVM
//! ([`registrar`]), how much of it the host really backs ([`residency`]),
//! and what the guest gives back ([`reclaim`]: checked, then discarded).
//!
//! KVM allocates its per-memslot metadata (about 2.2 MB per GiB on a PVM
//! host) when a slot is registered, so guest RAM is registered block by block
//! as the guest first uses it: an idle guest that uses only its first block
//! costs KVM the metadata of one block, not of all its RAM.

pub mod ram;
pub mod reclaim;
pub mod registrar;
pub mod residency;

pub use ram::{create_ram, RamError};
pub use registrar::{RegisterError, Registrar};
pub use residency::{ram_resident_bytes, resident_bytes};

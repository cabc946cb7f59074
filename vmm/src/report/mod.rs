//! The per-VM memory report: what the guest says about its memmap
//! ([`guest`], validated), what the host measures ([`host`]), and the two
//! together as the API's [`api::MemoryReport`] ([`build`]).

pub mod build;
pub mod guest;
pub mod host;

pub use build::{memory_report, not_started_report, ReportContext};

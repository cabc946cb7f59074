//! x86-64 boot set-up for the Linux 64-bit boot protocol (Firecracker's
//! layout): where things sit in guest memory ([`layout`]), the identity-mapping
//! page tables ([`paging`]), the boot GDT ([`gdt`]), `boot_params` with the
//! e820 map ([`boot_params`]), the vCPU registers, in ring 0 or at the
//! guest's ring-3 entry ([`regs`]), and CPUID
//! ([`cpuid`]). [`boot_data`] writes all of it into guest memory before the
//! first instruction runs.

pub mod boot_data;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;

pub use boot_data::{write_boot_data, write_boot_info, write_boot_online, write_entry_tables, ArchSetupError};
pub use cpuid::patch_cpuid;
pub use layout::ram_ranges;
pub use regs::{ap_regs, boot_fpu, boot_regs, long_mode_sregs, ring3_entry_state, Ring3SetupError};

//! The guest kernel: boots on the Linux x86-64 64-bit boot protocol, runs in
//! ring 3 (or ring 0 with `cpl=0`), manages memory with a lazily initialized
//! memmap, and serves the VMM's commands.
//!
//! Boot flow (boot CPU): `_start` (ring 0, `arch::entry`), or `_start_ring3`
//! for a VMM that read the image's ring-3 entry note → [`kernel_entry`]
//! (ring 3): fill the IDT, parse `boot_params` and the command line, move to
//! ring 0 if asked, probe the paravirtual interface, map all RAM, set up the
//! memory manager, announce readiness, run the workload.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("guest-kernel runs inside a VM: build it for x86_64-unknown-none and boot it with `vmm run`");
}

#[cfg(target_os = "none")]
#[macro_use]
mod serial;
#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod attack;
#[cfg(target_os = "none")]
mod bootparams;
#[cfg(target_os = "none")]
mod kernel;
#[cfg(target_os = "none")]
mod pv;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod stats;
#[cfg(target_os = "none")]
mod workload;

/// The kernel's memory manager (one zone, all RAM).
#[cfg(target_os = "none")]
#[link_section = ".bss_pages"]
pub static MM: guest_kernel::mm::MemoryManager = guest_kernel::mm::MemoryManager::empty();

//! The VM's run-time state: the [`vm::Vm`] handle the controller owns, the
//! vCPU threads and their run loop ([`vcpu`]), VM-exit decoding as a free
//! function ([`exit`]), why a vCPU stopped ([`stop`]), and the boot vCPU's
//! thread that starts ahead of the VM ([`boot_thread`]).

pub mod boot_thread;
pub mod exit;
pub mod stop;
pub mod vcpu;
pub mod vm;

//! The VM's run-time state: the [`vm::Vm`] handle the controller owns, the
//! vCPU threads and their run loop ([`vcpu`]), VM-exit decoding as a free
//! function ([`exit`]), and why a vCPU stopped ([`stop`]).

pub mod exit;
pub mod stop;
pub mod vcpu;
pub mod vm;

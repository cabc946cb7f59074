//! `vmm`: the monitor library, everything one VM process runs. The `vmm`
//! binary (package `vmm-cli`) puts a command line on top of it, and the lab
//! (package `lab`) runs experiments with many of its processes.
//!
//! # How a VM comes to life
//!
//! 1. **Configuration.** A [`config::VmConfig`] says what to build: the API's
//!    machine configuration (vCPUs, memory, memmap strategy, CPL), the kernel
//!    image and command line, and where the console goes. `vmm run` makes one
//!    from its flags; `vmm serve` starts from the default and lets
//!    `PUT /machine-config` and `PUT /boot-source` change it.
//! 2. **The controller.** [`controller::Controller`] owns the configuration
//!    and, once started, the VM. It is the only code that changes VM state:
//!    every API request, guest event and signal reaches it as an
//!    [`events::VmEvent`] on one channel.
//! 3. **Building.** On `InstanceStart` (or at once for `vmm run`),
//!    [`builder::build_microvm`] checks the configuration, reads the kernel
//!    ([`loader`]), creates the KVM VM and guest RAM ([`memory`]), registers
//!    the boot block with KVM, loads the ELF, writes the boot data
//!    ([`arch`]: page tables, GDT, `boot_params`), puts the devices on the
//!    port bus ([`devices`]) and sets up the vCPUs. The result is a paused
//!    [`vstate::vm::Vm`].
//! 4. **Running.** [`vstate::vm::Vm::start`] spawns the boot vCPU's thread,
//!    which runs [`vstate::vcpu::run`]: `KVM_RUN`, then
//!    [`vstate::exit::handle_exit`] decodes each exit and does its port I/O
//!    on the bus. The guest announces its boot phases and its stats block on
//!    the paravirtual ports, asks for its application processors, and onlines
//!    memory blocks, which [`memory::Registrar`] registers with KVM.
//! 5. **Serving.** The API server ([`api_server`]) parses HTTP requests into
//!    [`api::ApiRequest`]s and hands them to the controller; both run on the
//!    process's main thread, one tokio runtime, so a VM with N vCPUs has
//!    N + 1 threads. `GET /memory`
//!    builds a [`report`]: the guest's stats block, validated, next to what
//!    the host measures (`mincore()`, `/proc/self/smaps`, KVM's registered
//!    memory). [`timings`] and [`metrics`] feed it.
//! 6. **Stopping.** The guest exits, resets or fails; a vCPU thread reports
//!    why ([`vstate::stop::StopReason`]); the controller stops the others,
//!    and the process exit code follows from the reason. SIGINT, SIGTERM and
//!    SIGHUP ([`signals`]) and `Shutdown` stop it the same way.

pub mod api_server;
pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod devices;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod host;
pub mod host_output;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod out;
pub mod report;
pub mod script;
pub mod seccomp;
pub mod signals;
pub mod timings;
pub mod vstate;

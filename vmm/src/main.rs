//! `vmm`: a lightweight KVM VMM for container-style microVMs whose guest
//! kernel initializes its page metadata on demand, and reports what that
//! metadata costs.
//!
//! Subcommands: `run` boots a VM now. See `vmm --help`.

mod api_server;
mod arch;
mod cli;
mod ctl;
mod devices;
mod memory;
mod timings;
mod vcpu;
mod vm;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = cli::parse();
    let code = match cli.command {
        cli::Command::Run(args) => cli::run(args, Arc::new(timings::Timings::starting_at(start))),
    };
    ExitCode::from(code)
}

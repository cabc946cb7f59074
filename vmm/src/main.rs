//! `vmm`: a lightweight KVM VMM for container-style microVMs whose guest
//! kernel initializes its page metadata on demand, and reports what that
//! metadata costs.
//!
//! Subcommands: `run` boots a VM now, `serve` waits for the control API to
//! configure and start one, `ctl` talks to that API. See `vmm --help`.

mod api_server;
mod arch;
mod bench;
mod cli;
mod compare;
mod controller;
mod ctl;
mod density;
mod devices;
mod memory;
mod report;
mod signals;
mod timings;
mod vcpu;
mod vm;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

fn main() -> ExitCode {
    let start = Instant::now();
    // Before any thread exists, so every thread inherits it (see `signals`).
    signals::block();
    let cli = cli::parse();
    let timings = Arc::new(timings::Timings::starting_at(start));
    let code = match cli.command {
        cli::Command::Run(args) => cli::run(args, timings),
        cli::Command::Serve(args) => cli::serve(args, timings),
        cli::Command::Ctl(args) => ctl::run(args),
        cli::Command::Compare(args) => compare::run(args),
        cli::Command::Density(args) => density::run(args),
        cli::Command::Bench(args) => bench::run(args),
    };
    ExitCode::from(code)
}

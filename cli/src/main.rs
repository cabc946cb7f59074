//! `vmm`: a lightweight KVM VMM for container-style microVMs whose guest
//! kernel initializes its page metadata on demand, and reports what that
//! metadata costs.
//!
//! Subcommands: `run` boots a VM now, `serve` waits for the control API to
//! configure and start one, `ctl` talks to that API, `ps` lists the running
//! VMs, `top` shows them live, and `compare`,
//! `density` and `bench` run the lab's experiments. See `vmm --help`. With
//! no subcommand, `vmm` takes Firecracker's flags (`--api-sock`,
//! `--config-file`, `--no-api`, `--id`) and stands in for it.

mod args;
mod ctl;
mod firecracker_cli;
mod fleet;
mod prometheus;
mod ps;
mod render;
mod run;
mod runtime_dir;
mod stdio;
mod top;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

fn main() -> ExitCode {
    let start = Instant::now();
    // Before any thread exists, so every thread inherits it (see `signals`).
    vmm::signals::block();
    let cli = args::parse();
    let timings = Arc::new(vmm::timings::Timings::starting_at(start));
    // A VM process's allocator, set before its threads exist (see
    // `vmm::heap`); the lab's and the client's commands keep glibc's defaults.
    if matches!(cli.command, None | Some(args::Command::Run(_) | args::Command::Serve(_))) {
        vmm::heap::configure();
    }
    let Some(command) = cli.command else {
        return ExitCode::from(firecracker_cli::run(cli.firecracker, timings));
    };
    let code = match command {
        args::Command::Run(a) => run::run(a, timings),
        args::Command::Serve(a) => run::serve(a, timings),
        args::Command::Ctl(a) => ctl::run(a),
        args::Command::Ps(a) => ps::run(a),
        args::Command::Top(a) => top::run(a),
        args::Command::Compare(a) => lab::compare::run(a),
        args::Command::Density(a) => lab::density::run(a),
        args::Command::Bench(a) => lab::bench::run(a),
    };
    ExitCode::from(code)
}

//! Command-line interface: argument definitions (clap) and the `run` command.
//!
//! Exit codes: 0 when the guest shut down cleanly, the guest's own exit code
//! when it reported one (1..=255), 1 when the VM failed (triple fault, guest
//! exception, KVM error, unhandled exit) or the VMM hit a host error, and 2
//! for bad input (flags, kernel file, `/dev/kvm` access).

use crate::timings::Timings;
use crate::vm::{GuestCpl, KernelImage, SerialTarget, Vm, VmConfig};
use clap::{Parser, Subcommand, ValueEnum};
use guest_abi::Strategy;
use std::path::PathBuf;
use std::sync::Arc;

const RUN_EXAMPLES: &str = "\
Examples:
  vmm run                                    boot the built-in guest (2 GiB, 1 vCPU) and idle
  vmm run --cmdline workload=exit            boot, print timings, shut down
  vmm run --mem-mib 512 --guest-cpl 0 --cmdline workload=exit
  vmm run --serial file:/tmp/console.log --cmdline workload=exit
  vmm run --kernel ./my-vmlinux --cmdline \"console=ttyS0\"

The guest runs until it shuts down (exit code 0), reports an exit code (passed
through), or fails (exit code 1, with what happened and the guest RIP). Bad
input exits with code 2.";

/// A lightweight KVM VMM for container-style microVMs.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a microVM now and run it until the guest stops.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
}

/// Privilege level of the guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CplArg {
    /// Ring 3 on a PVM host (where ring 0 is emulated), ring 0 elsewhere.
    Auto,
    /// Ring 0, the classic kernel.
    #[value(name = "0")]
    Zero,
    /// Ring 3, deprivileged (as Xen PV and PVM guests run).
    #[value(name = "3")]
    Three,
}

/// How the guest initializes its memmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// Every struct page before the guest is ready.
    Eager,
    /// Eager, split across all vCPUs.
    Parallel,
    /// One section before ready, the rest in the background.
    Deferred,
    /// One chunk at boot, more when allocations need it.
    Ondemand,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Strategy {
        match s {
            StrategyArg::Eager => Strategy::Eager,
            StrategyArg::Parallel => Strategy::Parallel,
            StrategyArg::Deferred => Strategy::Deferred,
            StrategyArg::Ondemand => Strategy::OnDemand,
        }
    }
}

/// Arguments of `vmm run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Guest memory in MiB (a multiple of 2).
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u8,
    /// Boot this ELF kernel instead of the built-in guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Extra words for the guest command line (e.g. "workload=exit").
    #[arg(long, default_value = "", value_name = "WORDS")]
    pub cmdline: String,
    /// Privilege level of the guest kernel.
    #[arg(long, value_enum, default_value_t = CplArg::Auto)]
    pub guest_cpl: CplArg,
    /// Where the guest's serial console goes: stdout, stderr, file:PATH, or none.
    #[arg(long, default_value = "stdout", value_parser = parse_serial, value_name = "TARGET")]
    pub serial: SerialTarget,
    /// How the guest initializes its page metadata.
    #[arg(long, value_enum, default_value_t = StrategyArg::Ondemand)]
    pub memmap_init: StrategyArg,
    /// Memory covered by one memmap chunk, in KiB (power of two, 128 .. 131072).
    #[arg(long, default_value_t = 2048, value_name = "KIB")]
    pub memmap_chunk_kib: u64,
    /// Put each memory section's memmap at the start of the section.
    #[arg(long)]
    pub memmap_on_memory: bool,
    /// Let the host back guest RAM with transparent huge pages.
    #[arg(long)]
    pub huge_pages: bool,
    /// Act like a VMM without this project's extensions (no paravirtual
    /// ports, only the first GiB mapped at entry), to check the guest's
    /// portability.
    #[arg(long, hide = true)]
    pub legacy_only: bool,
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "stdout" => Ok(SerialTarget::Stdout),
        "none" => Ok(SerialTarget::None),
        "stderr" => Ok(SerialTarget::File(PathBuf::from("/dev/stderr"))),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialTarget::File(PathBuf::from(p))),
            _ => Err(format!("expected stdout, stderr, file:PATH or none, not {s:?}")),
        },
    }
}

/// Parses the process arguments (exits with code 2 and a message on bad input).
pub fn parse() -> Cli {
    Cli::parse()
}

impl RunArgs {
    /// The VM configuration these flags describe.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            kernel: self.kernel.clone().map_or(KernelImage::Embedded, KernelImage::File),
            cmdline: self.cmdline.clone(),
            cpl: match self.guest_cpl {
                CplArg::Auto => GuestCpl::Auto,
                CplArg::Zero => GuestCpl::Ring0,
                CplArg::Three => GuestCpl::Ring3,
            },
            memmap_init: self.memmap_init.into(),
            memmap_chunk_kib: self.memmap_chunk_kib,
            memmap_on_memory: self.memmap_on_memory,
            huge_pages: self.huge_pages,
            serial: self.serial.clone(),
            kvm_path: std::env::var_os("VMM_KVM_DEVICE").map_or_else(|| PathBuf::from("/dev/kvm"), PathBuf::from),
            legacy_only: self.legacy_only,
        }
    }
}

/// `vmm run`: boots the VM and runs it until the guest stops.
pub fn run(args: RunArgs, timings: Arc<Timings>) -> u8 {
    let mut vm = match Vm::build(args.vm_config(), timings.clone()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return if e.is_usage() { 2 } else { 1 };
        }
    };
    let reason = vm.run_to_completion(|_, ev| {
        if let crate::devices::VmEvent::GuestProtocolError(msg) = ev {
            eprintln!("vmm: guest protocol error: {msg}");
        }
    });
    print_timings(&timings);
    if reason.is_failure() {
        eprintln!("vmm: error: {reason}");
    } else {
        eprintln!("vmm: {reason}");
    }
    reason.exit_code().clamp(0, 255) as u8
}

fn print_timings(t: &Timings) {
    let rows = [
        ("vm created", &t.vm_created),
        ("vcpu first entry", &t.vcpu_first_entry),
        ("guest first port write", &t.guest_first_port_write),
        ("guest entered", &t.guest_entered),
        ("guest memory ready", &t.guest_memory_ready),
        ("guest ready", &t.guest_ready),
        ("vm stopped", &t.vm_stopped),
    ];
    let mut line = String::from("vmm: boot timings (us from process start):");
    for (name, slot) in rows {
        if let Some(us) = t.us(slot) {
            line.push_str(&format!(" {name} {us:.0};"));
        }
    }
    line.pop();
    eprintln!("{line}");
}

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["vmm", "run"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.command {
            Command::Run(a) => a,
        })
    }

    #[test]
    fn defaults_are_a_2gib_one_vcpu_ondemand_guest() {
        let a = run_args(&[]).unwrap();
        let c = a.vm_config();
        assert_eq!((c.mem_mib, c.vcpus), (2048, 1));
        assert_eq!(c.kernel, KernelImage::Embedded);
        assert_eq!(c.cpl, GuestCpl::Auto);
        assert_eq!(c.memmap_init, Strategy::OnDemand);
        assert_eq!(c.serial, SerialTarget::Stdout);
    }

    #[test]
    fn every_flag_parses() {
        let a = run_args(&[
            "--mem-mib", "512", "--vcpus", "2", "--kernel", "/k", "--cmdline", "workload=exit",
            "--guest-cpl", "3", "--serial", "file:/tmp/x", "--memmap-init", "eager",
            "--memmap-chunk-kib", "128", "--memmap-on-memory", "--huge-pages",
        ])
        .unwrap();
        let c = a.vm_config();
        assert_eq!((c.mem_mib, c.vcpus, c.cpl), (512, 2, GuestCpl::Ring3));
        assert_eq!(c.kernel, KernelImage::File("/k".into()));
        assert_eq!(c.serial, SerialTarget::File("/tmp/x".into()));
        assert_eq!((c.memmap_init, c.memmap_chunk_kib), (Strategy::Eager, 128));
        assert!(c.memmap_on_memory && c.huge_pages);
        assert_eq!(run_args(&["--guest-cpl", "0"]).unwrap().vm_config().cpl, GuestCpl::Ring0);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["--serial", "tty"][..],
            &["--serial", "file:"],
            &["--guest-cpl", "1"],
            &["--memmap-init", "lazy"],
            &["--mem-mib", "-1"],
            &["--vcpus", "300"],
        ] {
            let e = run_args(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn error_chains_print_on_one_line() {
        let e = crate::vm::BuildError::KernelRead {
            path: "/nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let s = error_chain(&e);
        assert!(s.contains("/nope") && !s.contains('\n'), "{s}");
    }
}

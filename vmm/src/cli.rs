//! Command-line interface: argument definitions (clap) and the `run` command.
//!
//! Exit codes: 0 when the guest shut down cleanly, the guest's own exit code
//! when it reported one (1..=255), 1 when the VM failed (triple fault, guest
//! exception, KVM error, unhandled exit) or the VMM hit a host error, and 2
//! for bad input (flags, kernel file, `/dev/kvm` access).

use crate::controller::{Controller, HostSettings, ReportFormat, Script};
use crate::timings::Timings;
use crate::vm::{GuestCpl, KernelImage, SerialTarget, VmConfig};
use clap::{Parser, Subcommand, ValueEnum};
use guest_abi::Strategy;
use std::path::PathBuf;
use std::sync::Arc;

const RUN_EXAMPLES: &str = "\
Examples:
  vmm run                                    boot the built-in guest (2 GiB, 1 vCPU) and idle
  vmm run --cmdline workload=exit            boot, print timings, shut down
  vmm run --memmap-init ondemand --alloc-mib 256 --report json
                                             boot, allocate 256 MiB in the guest, print the
                                             page-metadata report as JSON, shut down
  vmm run --memmap-init eager --report table compare: every struct page initialized at boot
  vmm run --api-sock /tmp/vm.sock            boot and serve the control API (see `vmm ctl`)
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
    /// Start empty and serve the control API; configure and start the VM through it.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(ServeArgs),
    /// Talk to a running VMM's control API.
    Ctl(crate::ctl::CtlArgs),
    /// The four memmap strategies side by side: boot time and memmap cost.
    Compare(crate::compare::CompareArgs),
    /// Density experiment: many microVMs per strategy, measured and plotted.
    Density(crate::density::DensityArgs),
    /// Benchmarks: boot per strategy, allocator fast path, memmap init cost (`make bench`).
    Bench(crate::bench::BenchArgs),
}

const SERVE_EXAMPLES: &str = "\
Examples:
  vmm serve --api-sock /tmp/vm.sock &
  curl --unix-socket /tmp/vm.sock -X PUT http://localhost/machine-config -d '{\"mem_size_mib\": 512}'
  curl --unix-socket /tmp/vm.sock -X PUT http://localhost/actions -d '{\"action_type\": \"InstanceStart\"}'
  vmm ctl --api-sock /tmp/vm.sock memory --human

The process ends when the guest stops, on a Shutdown action, or on SIGINT/SIGTERM;
the socket file is removed. See docs/api.md.";

/// Arguments of `vmm serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Path of the control socket (created with mode 0600; a stale socket is replaced).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Where the guest's serial console goes: stdout, stderr, file:PATH, or none.
    #[arg(long, default_value = "stdout", value_parser = parse_serial, value_name = "TARGET")]
    pub serial: SerialTarget,
}

/// `--report` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportArg {
    /// One JSON object on stdout (the guest console goes to stderr).
    Json,
    /// A readable table.
    Table,
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
    /// Where the guest's serial console goes: stdout, stderr, file:PATH, or
    /// none [default: stdout; stderr with --report json].
    #[arg(long, value_parser = parse_serial, value_name = "TARGET")]
    pub serial: Option<SerialTarget>,
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
    /// Once the guest is ready, make it allocate (and write) this many MiB.
    #[arg(long, value_name = "MIB")]
    pub alloc_mib: Option<u64>,
    /// Print the page-metadata report once the guest is ready (and its
    /// allocation done), then shut the guest down. With --alloc-mib and no
    /// --report, a table is printed.
    #[arg(long, value_enum)]
    pub report: Option<ReportArg>,
    /// After --alloc-mib, make the guest hold this many MiB instead (used by
    /// `make bench` to fill memory, then free it).
    #[arg(long, value_name = "MIB", hide = true, requires = "alloc_mib")]
    pub then_target_mib: Option<u64>,
    /// Benchmark: run this many order-0 alloc+free pairs in the guest once
    /// it is ready (after --alloc-mib), print the result as one JSON line
    /// on stdout, then shut down. Used by `make bench`.
    #[arg(long, value_name = "PAIRS", hide = true)]
    pub bench_alloc_free: Option<u64>,
    /// Also serve the control API on this Unix socket while the VM runs.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Register all guest RAM with KVM at boot, instead of 128 MiB block by
    /// block as the guest first uses it (to compare KVM's cost).
    #[arg(long)]
    pub register_all_memory: bool,
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
    /// The report format, if any: `--report`, or a table with `--alloc-mib`.
    pub fn report_format(&self) -> Option<ReportFormat> {
        match (self.report, self.alloc_mib) {
            (Some(ReportArg::Json), _) => Some(ReportFormat::Json),
            (Some(ReportArg::Table), _) | (None, Some(_)) => Some(ReportFormat::Table),
            (None, None) => None,
        }
    }

    /// Where the console goes: as asked, else stdout (stderr when stdout
    /// carries the JSON report).
    pub fn serial_target(&self) -> SerialTarget {
        match (&self.serial, self.report) {
            (Some(t), _) => t.clone(),
            (None, Some(ReportArg::Json)) => SerialTarget::File(PathBuf::from("/dev/stderr")),
            (None, _) => SerialTarget::Stdout,
        }
    }

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
            serial: self.serial_target(),
            kvm_path: std::env::var_os("VMM_KVM_DEVICE").map_or_else(|| PathBuf::from("/dev/kvm"), PathBuf::from),
            legacy_only: self.legacy_only,
            register_all_memory: self.register_all_memory,
        }
    }
}

/// The API's machine configuration and boot source for a VM configuration.
fn api_config(c: &VmConfig) -> (api::MachineConfig, api::BootSource) {
    let machine = api::MachineConfig {
        vcpu_count: c.vcpus,
        mem_size_mib: c.mem_mib,
        memmap_init: c.memmap_init,
        memmap_chunk_kib: c.memmap_chunk_kib,
        guest_cpl: match c.cpl {
            GuestCpl::Auto => api::GuestCpl::Auto,
            GuestCpl::Ring0 => api::GuestCpl::Ring0,
            GuestCpl::Ring3 => api::GuestCpl::Ring3,
        },
        memmap_on_memory: c.memmap_on_memory,
        huge_pages: c.huge_pages,
    };
    let boot = api::BootSource {
        kernel_image_path: match &c.kernel {
            KernelImage::Embedded => None,
            KernelImage::File(p) => Some(p.display().to_string()),
        },
        boot_args: (!c.cmdline.is_empty()).then(|| c.cmdline.clone()),
    };
    (machine, boot)
}

fn start_api(path: &std::path::Path, ctl: &Controller) -> Result<crate::api_server::ApiServer, u8> {
    let server = crate::api_server::start(path, ctl.sender(), ctl.metrics()).map_err(|e| {
        eprintln!("vmm: error: {}", error_chain(&e));
        2
    })?;
    eprintln!("vmm: serving the control API on {}", server.path().display());
    Ok(server)
}

/// `vmm run`: boots the VM and runs it until the guest stops (or, with a
/// script, until the report is printed).
pub fn run(args: RunArgs, timings: Arc<Timings>) -> u8 {
    let config = args.vm_config();
    if let Err(e) = config.validate() {
        eprintln!("vmm: error: {e}");
        return 2;
    }
    let (machine, boot) = api_config(&config);
    let host = HostSettings {
        serial: config.serial.clone(),
        kvm_path: config.kvm_path.clone(),
        legacy_only: config.legacy_only,
        register_all_memory: config.register_all_memory,
    };
    let mut ctl = Controller::new(machine, boot, host, timings.clone(), std::sync::mpsc::channel());
    let format = args.report_format();
    ctl.set_script(Script {
        alloc_mib: args.alloc_mib,
        report: format,
        then_target_mib: args.then_target_mib,
        bench_alloc_free: args.bench_alloc_free,
    });
    let server = match args.api_sock.as_deref().map(|p| start_api(p, &ctl)).transpose() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = ctl.start() {
        eprintln!("vmm: error: {}", error_chain(&e));
        return if e.is_usage() { 2 } else { 1 };
    }
    let reason = ctl.run();
    if let Some(s) = server {
        s.shutdown();
    }
    if let Some(report) = ctl.printed_report.take() {
        let json = serde_json::to_value(&report).unwrap_or_default();
        match format {
            Some(ReportFormat::Json) => println!("{json}"),
            _ => println!("{}", crate::ctl::memory_table(&json)),
        }
    }
    if let Some(b) = ctl.bench_result.take() {
        println!("{}", serde_json::json!({ "bench_alloc_free": b }));
    }
    print_timings(&timings);
    let Some(reason) = reason else { return 0 };
    if reason.is_failure() {
        eprintln!("vmm: error: {reason}");
    } else {
        eprintln!("vmm: {reason}");
    }
    reason.exit_code().clamp(0, 255) as u8
}

/// `vmm serve`: serves the API with no VM until it is configured and started.
pub fn serve(args: ServeArgs, timings: Arc<Timings>) -> u8 {
    let host = HostSettings {
        serial: args.serial.clone(),
        kvm_path: std::env::var_os("VMM_KVM_DEVICE").map_or_else(|| PathBuf::from("/dev/kvm"), PathBuf::from),
        legacy_only: false,
        register_all_memory: false,
    };
    let mut ctl = Controller::new(
        api::MachineConfig::default(),
        api::BootSource::default(),
        host,
        timings,
        std::sync::mpsc::channel(),
    );
    let server = match start_api(&args.api_sock, &ctl) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let reason = ctl.run();
    server.shutdown();
    match reason {
        Some(r) if r.is_failure() => {
            eprintln!("vmm: error: {r}");
            r.exit_code().clamp(0, 255) as u8
        }
        Some(r) => {
            eprintln!("vmm: {r}");
            r.exit_code().clamp(0, 255) as u8
        }
        None => 0,
    }
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
            _ => unreachable!("parsed `run`"),
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
        assert_eq!(a.report_format(), None);
    }

    #[test]
    fn a_json_report_moves_the_console_to_stderr_unless_told_otherwise() {
        let a = run_args(&["--alloc-mib", "256", "--report", "json"]).unwrap();
        assert_eq!(a.report_format(), Some(ReportFormat::Json));
        assert_eq!(a.serial_target(), SerialTarget::File("/dev/stderr".into()));
        let a = run_args(&["--report", "json", "--serial", "none"]).unwrap();
        assert_eq!(a.serial_target(), SerialTarget::None);
        let a = run_args(&["--alloc-mib", "16"]).unwrap();
        assert_eq!(a.report_format(), Some(ReportFormat::Table));
        assert_eq!(a.serial_target(), SerialTarget::Stdout);
    }

    #[test]
    fn the_api_round_trip_keeps_the_configuration() {
        let a = run_args(&["--mem-mib", "512", "--vcpus", "2", "--memmap-init", "deferred", "--cmdline", "quiet"]).unwrap();
        let c = a.vm_config();
        let (m, b) = api_config(&c);
        assert_eq!((m.mem_size_mib, m.vcpu_count, m.memmap_init), (512, 2, api::Strategy::Deferred));
        assert_eq!(b.boot_args.as_deref(), Some("quiet"));
        assert_eq!(b.kernel_image_path, None);
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

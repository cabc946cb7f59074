//! The `vmm` command line: every subcommand's arguments (clap), and the
//! [`VmConfig`] that `vmm run`'s flags describe.

use api::GuestCpl;
use clap::{Parser, Subcommand, ValueEnum};
use guest_abi::Strategy;
use lab::args::{cpl_parser, reclaim_parser, strategy_parser};
use crate::runtime_dir::{self, VmId};
use std::path::PathBuf;
use vmm::config::{KernelImage, SerialTarget, VmConfig};
use vmm::script::ReportFormat;

const RUN_EXAMPLES: &str = "\
Examples:
  vmm run                                    boot the built-in guest (2 GiB, 1 vCPU) and idle
  vmm run --cmdline workload=exit            boot, print timings, shut down
  vmm run --memmap-init ondemand --alloc-mib 256 --report json
                                             boot, allocate 256 MiB in the guest, print the
                                             page-metadata report as JSON, shut down
  vmm run --memmap-init eager --report table compare: every struct page initialized at boot
  vmm run --id web-1                         boot and serve the control API on web-1 in the
                                             runtime directory (/run/vmm/web-1 for root)
  vmm run --api-sock /tmp/vm.sock            serve the control API here instead (see `vmm ctl`)
  vmm run --no-api --cmdline workload=exit   serve no control API
  vmm run --mem-mib 512 --guest-cpl 0 --cmdline workload=exit
  vmm run --serial file:/tmp/console.log --cmdline workload=exit
  vmm run --kernel ./my-vmlinux --cmdline \"console=ttyS0\"

Exit codes (the VMM's own are reserved; see docs/security.md):
  0       the VM shut down cleanly (guest exit 0, reset, Shutdown, SIGTERM)
  1       the VM failed (triple fault, guest exception, KVM error) or a host error
  2       bad input (flags, kernel file, /dev/kvm access)
  3       the guest did not get ready or answer within --guest-timeout
  64-127  the guest exited with code C != 0: 64 + (C & 63); the full code is
          printed on stdout as `vmm: guest exit code C` and is GET /vm/status's exit_code

Unless --no-api, the control API is served while the
VM runs (on --api-sock, else on the VM's id in the runtime directory); the
socket file is removed at exit.";

/// A lightweight KVM VMM for container-style microVMs.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand: Firecracker's own flags (see `firecracker_cli`).
    #[command(flatten)]
    pub firecracker: FirecrackerArgs,
}

/// `vmm run ...` against the `run` subcommand alone ([`parse`]): clap
/// builds the whole command tree it parses against, and every subcommand of
/// the lab, `ctl`, `ps` and `top` made that about 0.3 ms of each VM's start.
#[derive(Debug, Parser)]
#[command(name = "vmm")]
struct RunOnly {
    #[command(subcommand)]
    command: RunOnlyCommand,
}

#[derive(Debug, Subcommand)]
enum RunOnlyCommand {
    Run(RunArgs),
}

/// Parses the process's arguments: `vmm run` with valid flags through the
/// `run` subcommand alone, everything else (other subcommands, `--help`,
/// mistakes, whose messages need the whole tree) through [`Cli`].
pub fn parse() -> Cli {
    parse_from(std::env::args_os())
}

/// [`parse`] for `args` (the program name first).
pub fn parse_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> Cli {
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    if args.get(1).is_some_and(|a| a == "run") {
        if let Ok(RunOnly { command: RunOnlyCommand::Run(a) }) = RunOnly::try_parse_from(&args) {
            return Cli { command: Some(Command::Run(a)), firecracker: FirecrackerArgs::default() };
        }
    }
    Cli::parse_from(args)
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
    /// List the running VMs (those in the runtime directory, or --dir).
    Ps(crate::ps::PsArgs),
    /// The same list, refreshed live in the terminal, with the host's MemAvailable.
    Top(crate::top::TopArgs),
    /// The four memmap strategies side by side: boot time and memmap cost.
    Compare(lab::compare::CompareArgs),
    /// Density experiment: many microVMs per strategy, measured and plotted.
    Density(lab::density::DensityArgs),
    /// Benchmarks: boot per strategy, allocator fast path, memmap init cost (`make bench`).
    Bench(lab::bench::BenchArgs),
}

const SERVE_EXAMPLES: &str = "\
Examples:
  vmm serve --id vm0 &                       serve on vm0 in the runtime directory
  vmm serve --api-sock /tmp/vm.sock &
  curl --unix-socket /tmp/vm.sock -X PUT http://localhost/machine-config -d '{\"mem_size_mib\": 512}'
  curl --unix-socket /tmp/vm.sock -X PUT http://localhost/actions -d '{\"action_type\": \"InstanceStart\"}'
  vmm ctl --api-sock /tmp/vm.sock memory --human

The process ends when the guest stops, on a Shutdown action, or on SIGINT/SIGTERM;
the socket file is removed. See docs/api.md.";

/// Where a VM's control socket goes when `--api-sock` does not say, and
/// the VM's name (`vmm run`, `vmm serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct VmPlace {
    /// The VM's name (1 to 64 of A-Z a-z 0-9 _ . -): its API id, and its
    /// socket's name in the runtime directory [default: vmm-PID].
    #[arg(long, value_name = "NAME")]
    pub id: Option<VmId>,
    /// Directory of the VMs' sockets, created with mode 0700 [default:
    /// $VMM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/vmm, else /run/vmm for root,
    /// else $TMPDIR/vmm-UID].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

impl VmPlace {
    /// The VM's id, given or `vmm-<pid>`.
    pub fn id(&self) -> VmId {
        self.id.clone().unwrap_or_else(VmId::of_this_process)
    }

    /// The runtime directory, from the flag, the environment and the user.
    pub fn runtime_dir(&self) -> PathBuf {
        runtime_dir::resolve(&runtime_dir::Sources::of_this_process(self.runtime_dir.clone()))
    }
}

/// Arguments of `vmm serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Path of the control socket (created with mode 0600; a stale socket is
    /// replaced) [default: the VM's id in the runtime directory].
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    #[command(flatten)]
    pub place: VmPlace,
    /// Where the guest's serial console goes: stdout, stderr, file:PATH, or none.
    #[arg(long, default_value = "stdout", value_parser = parse_serial, value_name = "TARGET")]
    pub serial: SerialTarget,
    /// Keep serving the API after the guest stops: `GET /vm/status` then
    /// shows Halted or Failed with its exit_code or failure_reason, until
    /// a Shutdown action or SIGTERM ends the process (with the code the
    /// guest's stop maps to). Without it the process exits when the guest
    /// stops, as Firecracker does.
    #[arg(long)]
    pub keep_serving: bool,
    /// Run without the per-thread seccomp filters (for debugging; see
    /// docs/security.md). They are on by default.
    #[arg(long)]
    pub no_seccomp: bool,
    #[command(flatten)]
    pub guest: GuestLimits,
}

/// Limits on what the guest can make the VMM do (`vmm run`, `vmm serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct GuestLimits {
    /// Most bytes of console output written to a --serial file:PATH; the
    /// rest is dropped and counted (serial_bytes_dropped in GET /metrics).
    #[arg(long, default_value_t = vmm::config::DEFAULT_SERIAL_MAX_BYTES, value_name = "BYTES")]
    pub serial_max_bytes: u64,
    /// Seconds the VMM waits for the guest to get ready (when something
    /// waits for it) and to finish each command; then a command is
    /// cancelled (504 to the API) and `run`'s script stops the VM (exit code 3).
    #[arg(long, default_value = "60", value_parser = parse_timeout, value_name = "SECS")]
    pub guest_timeout: std::time::Duration,
}

/// A `--guest-timeout` that is not a number of seconds in 0.001 ..= 86400.
#[derive(Debug, thiserror::Error)]
#[error("expected seconds between 0.001 and 86400, not {0:?}")]
pub struct TimeoutArgError(String);

/// Parses `--guest-timeout` (seconds, fractions allowed).
pub fn parse_timeout(s: &str) -> Result<std::time::Duration, TimeoutArgError> {
    match s.parse::<f64>() {
        Ok(secs) if (0.001..=86_400.0).contains(&secs) => Ok(std::time::Duration::from_secs_f64(secs)),
        _ => Err(TimeoutArgError(s.to_string())),
    }
}

/// `--report` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportArg {
    /// One JSON object on stdout (the guest console goes to stderr).
    Json,
    /// A readable table.
    Table,
}

/// Arguments of `vmm run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Guest memory in MiB.
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
    #[arg(long, value_parser = cpl_parser(), default_value = "auto")]
    pub guest_cpl: GuestCpl,
    /// Where the guest's serial console goes: stdout, stderr, file:PATH, or
    /// none [default: stdout; stderr with --report json].
    #[arg(long, value_parser = parse_serial, value_name = "TARGET")]
    pub serial: Option<SerialTarget>,
    #[command(flatten)]
    pub guest: GuestLimits,
    /// How the guest initializes its page metadata.
    #[arg(long, value_parser = strategy_parser(), default_value = "ondemand")]
    pub memmap_init: Strategy,
    /// Memory covered by one memmap chunk, in KiB (power of two, 128 .. 131072).
    #[arg(long, default_value_t = 2048, value_name = "KIB")]
    pub memmap_chunk_kib: u64,
    /// Put each memory section's memmap at the start of the section.
    #[arg(long)]
    pub memmap_on_memory: bool,
    /// Let the host back guest RAM with transparent huge pages.
    #[arg(long)]
    pub huge_pages: bool,
    /// What freed guest memory goes back to the host [default: full with
    /// --memmap-init ondemand, off with the others; full needs ondemand].
    #[arg(long, value_parser = reclaim_parser())]
    pub reclaim: Option<api::Reclaim>,
    /// How long guest memory stays free before the guest reports it, in ms
    /// (0 .. 600000) [default: the guest's, 2000].
    #[arg(long, value_name = "MS")]
    pub reclaim_delay_ms: Option<u32>,
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
    /// Serve the control API on this Unix socket while the VM runs
    /// [default: the VM's id in the runtime directory].
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    pub api_sock: Option<PathBuf>,
    /// Serve no control API (the VM cannot be found by `vmm ctl`).
    #[arg(long)]
    pub no_api: bool,
    #[command(flatten)]
    pub place: VmPlace,
    /// Register all guest RAM with KVM at boot, instead of 2 MiB block by
    /// block as the guest first uses it (to compare KVM's cost).
    #[arg(long)]
    pub register_all_memory: bool,
    /// Act like a VMM without this project's extensions (no paravirtual
    /// ports, only the first GiB mapped at entry), to check the guest's
    /// portability.
    #[arg(long, hide = true)]
    pub legacy_only: bool,
    /// Run without the per-thread seccomp filters (for debugging; see
    /// docs/security.md). They are on by default.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// A `--serial` value that is none of the accepted forms.
#[derive(Debug, thiserror::Error)]
#[error("expected stdout, stderr, file:PATH or none, not {0:?}")]
pub struct SerialArgError(String);

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialTarget, SerialArgError> {
    match s {
        "stdout" => Ok(SerialTarget::Stdout),
        "none" => Ok(SerialTarget::None),
        "stderr" => Ok(SerialTarget::File(PathBuf::from("/dev/stderr"))),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialTarget::File(PathBuf::from(p))),
            _ => Err(SerialArgError(s.to_string())),
        },
    }
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

    /// The VM configuration these flags describe (not yet validated).
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            id: self.place.id().to_string(),
            machine: api::MachineConfig {
                vcpu_count: self.vcpus,
                mem_size_mib: self.mem_mib,
                memmap_init: self.memmap_init,
                memmap_chunk_kib: self.memmap_chunk_kib,
                guest_cpl: self.guest_cpl,
                memmap_on_memory: self.memmap_on_memory,
                huge_pages: api::HugePages::from_enabled(self.huge_pages),
                reclaim: self.reclaim,
                reclaim_delay_ms: self.reclaim_delay_ms,
                ..api::MachineConfig::default()
            },
            kernel: self.kernel.clone().map_or(KernelImage::Embedded, KernelImage::File),
            cmdline: self.cmdline.clone(),
            serial: self.serial_target(),
            serial_max_bytes: self.guest.serial_max_bytes,
            guest_timeout: self.guest.guest_timeout,
            kvm_path: vmm::host::kvm_device_path(),
            legacy_only: self.legacy_only,
            register_all_memory: self.register_all_memory,
        }
    }
}

/// Firecracker's flags, taken when no subcommand is given.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Firecracker-compatible options (with no subcommand)")]
pub struct FirecrackerArgs {
    /// Serve the API on this socket [default: /run/firecracker.socket].
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's id.
    #[arg(long, value_name = "NAME")]
    pub id: Option<VmId>,
    /// Boot the VM this Firecracker configuration file describes.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// Run without the seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["vmm", "run"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.command {
            Some(Command::Run(a)) => a,
            _ => unreachable!("parsed `run`"),
        })
    }

    #[test]
    fn run_parses_alone_as_the_whole_tree_parses_it_and_other_commands_still_parse() {
        let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        for flags in [&[][..], &["--mem-mib", "512", "--no-api", "--cmdline", "workload=exit", "--report", "json"][..]] {
            let mut v = vec!["vmm", "run"];
            v.extend_from_slice(flags);
            let Some(Command::Run(fast)) = parse_from(os(&v)).command else { panic!("run") };
            assert_eq!(format!("{fast:?}"), format!("{:?}", run_args(flags).unwrap()), "{flags:?}");
        }
        assert!(matches!(parse_from(os(&["vmm", "ps", "--json"])).command, Some(Command::Ps(_))));
        assert!(parse_from(os(&["vmm", "--no-api", "--config-file", "vm.json"])).command.is_none(), "Firecracker's flags");
    }

    #[test]
    fn defaults_are_a_2gib_one_vcpu_ondemand_guest() {
        let a = run_args(&[]).unwrap();
        let c = a.vm_config();
        assert_eq!(c.machine, api::MachineConfig::default(), "the CLI and the API agree on defaults");
        assert_eq!(c.kernel, KernelImage::Embedded);
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
    fn every_flag_parses() {
        let a = run_args(&[
            "--mem-mib", "512", "--vcpus", "2", "--kernel", "/k", "--cmdline", "workload=exit",
            "--guest-cpl", "3", "--serial", "file:/tmp/x", "--memmap-init", "eager",
            "--memmap-chunk-kib", "128", "--memmap-on-memory", "--huge-pages",
        ])
        .unwrap();
        let c = a.vm_config();
        let m = &c.machine;
        assert_eq!((m.mem_size_mib, m.vcpu_count, m.guest_cpl), (512, 2, GuestCpl::Ring3));
        assert_eq!(c.kernel, KernelImage::File("/k".into()));
        assert_eq!(c.serial, SerialTarget::File("/tmp/x".into()));
        assert_eq!((m.memmap_init, m.memmap_chunk_kib), (Strategy::Eager, 128));
        assert!(m.memmap_on_memory && m.huge_pages.is_enabled());
        assert_eq!(run_args(&["--guest-cpl", "0"]).unwrap().vm_config().machine.guest_cpl, GuestCpl::Ring0);
        assert_eq!(c.boot_source().boot_args.as_deref(), Some("workload=exit"));
        assert_eq!((c.serial_max_bytes, c.guest_timeout), (16 << 20, std::time::Duration::from_secs(60)));
        let c = run_args(&["--serial-max-bytes", "4096", "--guest-timeout", "1.5"]).unwrap().vm_config();
        assert_eq!((c.serial_max_bytes, c.guest_timeout), (4096, std::time::Duration::from_millis(1500)));
    }

    #[test]
    fn reclaim_flags_parse_and_full_needs_ondemand() {
        let m = run_args(&[]).unwrap().vm_config().machine;
        assert_eq!((m.reclaim, m.effective_reclaim(), m.reclaim_delay_ms), (None, api::Reclaim::Full, None));
        let m = run_args(&["--reclaim", "data", "--reclaim-delay-ms", "100"]).unwrap().vm_config().machine;
        assert_eq!((m.effective_reclaim(), m.reclaim_delay_ms), (api::Reclaim::Data, Some(100)));
        assert_eq!(run_args(&["--memmap-init", "eager"]).unwrap().vm_config().machine.effective_reclaim(), api::Reclaim::Off);
        let c = run_args(&["--memmap-init", "parallel", "--reclaim", "full"]).unwrap().vm_config();
        assert!(c.validate().unwrap_err().to_string().contains("needs memmap_init \"ondemand\""));
        assert!(run_args(&["--reclaim", "some"]).is_err());
    }

    #[test]
    fn a_vm_is_named_and_placed() {
        let a = run_args(&["--id", "web-1", "--runtime-dir", "/r"]).unwrap();
        assert_eq!(a.vm_config().id, "web-1");
        assert_eq!(a.place.runtime_dir(), PathBuf::from("/r"));
        assert!(!a.no_api && a.api_sock.is_none());
        let a = run_args(&[]).unwrap();
        assert_eq!(a.vm_config().id, format!("vmm-{}", std::process::id()));
        assert!(run_args(&["--no-api"]).unwrap().no_api);
        let serve = match Cli::try_parse_from(["vmm", "serve", "--id", "s1"]).unwrap().command {
            Some(Command::Serve(a)) => a,
            _ => unreachable!("parsed `serve`"),
        };
        assert_eq!((serve.place.id().as_str(), serve.api_sock), ("s1", None));
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
            &["--id", "a/b"],
            &["--id", ""],
            &["--no-api", "--api-sock", "/s"],
            &["--guest-timeout", "0"],
            &["--guest-timeout", "soon"],
            &["--serial-max-bytes", "-1"],
        ] {
            let e = run_args(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}

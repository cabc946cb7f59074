//! Firecracker's command line, so that `vmm` can stand in for a
//! `firecracker` binary: with no subcommand, `vmm --api-sock PATH [--id ID]`
//! serves the API as `vmm serve` does, and `vmm --config-file FILE
//! [--no-api]` boots the VM that Firecracker's `--config-file` JSON
//! describes, as `vmm run` does. `vmm density --peer firecracker=PATH`
//! starts its peer VMs this way, so a test can run the peer part of a
//! density run with this binary where no Firecracker is installed.
//!
//! Only the flags such a launcher needs are taken (`--api-sock`, `--id`,
//! `--config-file`, `--no-api`, `--no-seccomp`); the config file may hold
//! the parts this VMM has (`boot-source`, `machine-config`, empty `drives`
//! and `network-interfaces`; `logger` and `metrics` are ignored with a
//! warning: set them through the API instead).

use crate::args::{Cli, Command, FirecrackerArgs, GuestLimits, RunArgs, ServeArgs, VmPlace};
use api::ErrorChain;
use clap::Parser;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm::config::SerialTarget;
use vmm::timings::Timings;

/// Firecracker's default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// The largest config file read (Firecracker's own API body limit is 50 KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The parts of Firecracker's config file that this VMM has.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(rename = "boot-source")]
    boot_source: api::BootSource,
    #[serde(rename = "machine-config", default)]
    machine_config: Option<api::MachineConfigPut>,
    #[serde(default)]
    drives: Vec<api::NoDevice>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<api::NoDevice>,
    #[serde(default)]
    logger: Option<serde_json::Value>,
    #[serde(default)]
    metrics: Option<serde_json::Value>,
}

/// Why a config file cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read the config file {0:?}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the config file {0:?} is not a regular file (a FIFO, a device or a directory cannot be one)")]
    NotAFile(PathBuf),
    #[error("the config file {0:?} is larger than {MAX_CONFIG_BYTES} bytes; a configuration is a few hundred")]
    TooLarge(PathBuf),
    #[error("the config file {0:?} is not a configuration this VMM can boot")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("the config file's machine-config is refused")]
    Machine(#[from] api::MachineConfigError),
    #[error("the config file's boot-source is refused")]
    Boot(#[from] api::BootSourceError),
}

/// What a config file asks for.
#[derive(Debug, Clone, PartialEq)]
struct Parsed {
    machine: api::MachineConfig,
    boot: api::BootSource,
    ignored: Vec<&'static str>,
}

fn parse_config(path: &Path, text: &str) -> Result<Parsed, ConfigFileError> {
    let c: ConfigFile = serde_json::from_str(text).map_err(|e| ConfigFileError::Parse(path.into(), e))?;
    // The lists cannot hold a value (`NoDevice` has none); they are read so
    // that Firecracker's `"drives": []` is accepted.
    let (_, _) = (c.drives, c.network_interfaces);
    let machine = c.machine_config.map_or_else(api::MachineConfig::default, api::MachineConfigPut::into_config);
    machine.validate()?;
    c.boot_source.validate()?;
    let mut ignored = Vec::new();
    if c.logger.is_some_and(|v| !v.is_null()) {
        ignored.push("logger");
    }
    if c.metrics.is_some_and(|v| !v.is_null()) {
        ignored.push("metrics");
    }
    Ok(Parsed { machine, boot: c.boot_source, ignored })
}

/// Reads the config file at `path` without ever blocking or reading more
/// than [`MAX_CONFIG_BYTES`] + 1 bytes: opened with `O_NONBLOCK` (a FIFO
/// does not wait for a writer), checked with `fstat` on that descriptor to
/// be a regular file no larger than the limit, then read from it (so the
/// file checked is the file read, and one that grows meanwhile is still cut
/// at the limit), as the kernel image is (`vmm::config::open_kernel_image`).
fn read_config(path: &Path) -> Result<Parsed, ConfigFileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_error = |e| ConfigFileError::Read(path.into(), e);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(ConfigFileError::NotAFile(path.into()));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigFileError::TooLarge(path.into()));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text).map_err(read_error)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigFileError::TooLarge(path.into()));
    }
    parse_config(path, &text)
}

/// `vmm run`'s defaults, as if it had been given no flag.
fn default_run_args() -> RunArgs {
    match Cli::parse_from(["vmm", "run"]).command {
        Some(Command::Run(a)) => a,
        _ => unreachable!("parsed `run`"),
    }
}

/// The `vmm run` arguments for a parsed config file.
fn run_args(fc: &FirecrackerArgs, p: &Parsed) -> RunArgs {
    let m = &p.machine;
    RunArgs {
        mem_mib: m.mem_size_mib,
        vcpus: m.vcpu_count,
        kernel: p.boot.kernel_image_path.as_ref().map(PathBuf::from),
        cmdline: p.boot.boot_args.clone().unwrap_or_default(),
        guest_cpl: m.guest_cpl,
        memmap_init: m.memmap_init,
        memmap_chunk_kib: m.memmap_chunk_kib,
        memmap_on_memory: m.memmap_on_memory,
        huge_pages: m.huge_pages.is_enabled(),
        serial: Some(SerialTarget::Stdout),
        api_sock: (!fc.no_api).then(|| fc.api_sock.clone().unwrap_or_else(|| DEFAULT_API_SOCK.into())),
        no_api: fc.no_api,
        place: VmPlace { id: fc.id.clone(), runtime_dir: None },
        no_seccomp: fc.no_seccomp,
        ..default_run_args()
    }
}

/// Runs `vmm` with Firecracker's flags; returns the exit code.
pub fn run(fc: FirecrackerArgs, timings: Arc<Timings>) -> u8 {
    let Some(path) = &fc.config_file else {
        let args = ServeArgs {
            api_sock: Some(fc.api_sock.clone().unwrap_or_else(|| DEFAULT_API_SOCK.into())),
            place: VmPlace { id: fc.id.clone(), runtime_dir: None },
            serial: SerialTarget::Stdout,
            keep_serving: false,
            no_seccomp: fc.no_seccomp,
            guest: GuestLimits {
                serial_max_bytes: vmm::config::DEFAULT_SERIAL_MAX_BYTES,
                guest_timeout: vmm::config::DEFAULT_GUEST_TIMEOUT,
            },
        };
        return crate::run::serve(args, timings);
    };
    let parsed = match read_config(path) {
        Ok(p) => p,
        Err(e) => {
            vmm::errln!("vmm: error: {}", ErrorChain(&e));
            return 2;
        }
    };
    for part in &parsed.ignored {
        vmm::errln!("vmm: warning: the config file's {part} is ignored; set it with PUT /{part} instead");
    }
    crate::run::run(run_args(&fc, &parsed), timings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Parsed, ConfigFileError> {
        parse_config(Path::new("c.json"), text)
    }

    #[test]
    fn a_firecracker_config_file_becomes_run_arguments() {
        let p = parse(
            r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0 workload=wait"},
                "drives": [], "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "smt": false},
                "network-interfaces": [], "logger": null, "metrics": null}"#,
        )
        .unwrap();
        assert!(p.ignored.is_empty());
        let fc = FirecrackerArgs { config_file: Some("c.json".into()), no_api: true, id: "peer-1".parse().ok(), ..Default::default() };
        let a = run_args(&fc, &p);
        let c = a.vm_config();
        assert_eq!((c.machine.vcpu_count, c.machine.mem_size_mib, c.id.as_str()), (2, 512, "peer-1"));
        assert_eq!(c.kernel, vmm::config::KernelImage::File("/k".into()));
        assert_eq!(c.cmdline, "console=ttyS0 workload=wait");
        assert!(a.no_api && a.api_sock.is_none());
        assert_eq!(c.serial, SerialTarget::Stdout);
        // With the API: Firecracker's default socket unless one is named.
        let a = run_args(&FirecrackerArgs { no_api: false, ..fc }, &p);
        assert_eq!(a.api_sock.as_deref(), Some(Path::new(DEFAULT_API_SOCK)));
    }

    #[test]
    fn what_this_vmm_lacks_is_refused_or_named() {
        let base = r#""boot-source": {"kernel_image_path": "/k"}"#;
        let p = parse(&format!("{{{base}, \"logger\": {{\"log_path\": \"/l\"}}}}")).unwrap();
        assert_eq!(p.ignored, ["logger"]);
        assert_eq!(p.machine, api::MachineConfig::default(), "no machine-config: the defaults");
        for bad in [
            format!("{{{base}, \"drives\": [{{\"drive_id\": \"rootfs\"}}]}}"),
            format!("{{{base}, \"balloon\": {{}}}}"),
            "{\"drives\": []}".to_string(),
            "not json".to_string(),
        ] {
            assert!(matches!(parse(&bad), Err(ConfigFileError::Parse(..))), "{bad}");
        }
        let smt = format!("{{{base}, \"machine-config\": {{\"vcpu_count\": 1, \"mem_size_mib\": 128, \"smt\": true}}}}");
        assert!(matches!(parse(&smt), Err(ConfigFileError::Machine(_))));
        assert!(matches!(parse(r#"{"boot-source": {"kernel_image_path": ""}}"#), Err(ConfigFileError::Boot(_))));
    }

    /// `read_config(path)` on another thread, failing the test (instead of
    /// hanging it) if it blocks.
    fn read_within_deadline(path: &Path) -> Result<Parsed, ConfigFileError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(read_config(&p));
        });
        rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap_or_else(|_| panic!("reading {path:?} blocked"))
    }

    #[test]
    fn a_config_file_that_is_not_a_small_regular_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("vm.json");
        std::fs::write(&good, r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        assert!(read_within_deadline(&good).is_ok());
        // A FIFO with no writer: opening it without O_NONBLOCK waits forever.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let e = read_within_deadline(&fifo).unwrap_err();
        assert!(matches!(e, ConfigFileError::NotAFile(_)), "{e:?}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        for dev in ["/dev/zero", "/dev/null"] {
            assert!(matches!(read_within_deadline(Path::new(dev)), Err(ConfigFileError::NotAFile(_))), "{dev}");
        }
        assert!(matches!(read_within_deadline(dir.path()), Err(ConfigFileError::NotAFile(_))), "a directory");
        // Sparse files just past the limit and far past it: refused by size,
        // before any byte is read; at the limit exactly, read (and not JSON).
        let big = dir.path().join("big.json");
        for len in [MAX_CONFIG_BYTES + 1, 64 << 30] {
            std::fs::File::create(&big).unwrap().set_len(len).unwrap();
            let e = read_within_deadline(&big).unwrap_err();
            assert!(matches!(e, ConfigFileError::TooLarge(_)), "{len}: {e:?}");
            assert!(e.to_string().contains(&MAX_CONFIG_BYTES.to_string()), "{e}");
        }
        std::fs::File::create(&big).unwrap().set_len(MAX_CONFIG_BYTES).unwrap();
        assert!(matches!(read_within_deadline(&big), Err(ConfigFileError::Parse(..))));
        assert!(matches!(read_within_deadline(&dir.path().join("none")), Err(ConfigFileError::Read(..))));
    }

    #[test]
    fn firecrackers_flags_parse_without_a_subcommand() {
        let cli = Cli::try_parse_from(["vmm", "--no-api", "--config-file", "/c.json", "--id", "fc-3"]).unwrap();
        assert!(cli.command.is_none());
        assert!(cli.firecracker.no_api && cli.firecracker.config_file.is_some());
        assert!(Cli::try_parse_from(["vmm", "--no-api"]).is_err(), "--no-api needs --config-file");
        assert!(Cli::try_parse_from(["vmm", "--api-sock", "/s", "run"]).is_err(), "not with a subcommand");
        assert!(Cli::try_parse_from(["vmm"]).is_err(), "nothing at all: help");
    }
}

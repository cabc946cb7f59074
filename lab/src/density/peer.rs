//! The peer of a density run (`--peer firecracker=PATH`): another VMM that
//! boots ELF kernels with Firecracker's command line runs the same fleet of
//! the same guest, so that side-by-side figures come from one run.
//!
//! Each peer VM is `PATH --no-api --config-file FILE --id ID`. The file is
//! Firecracker's JSON (`boot-source`, empty `drives`, `machine-config`): the
//! guest is this binary's own embedded kernel, written once to the run's
//! work directory ([`write_guest`]), and its command line is the one our
//! own VMs get ([`boot_args`]: the same CPL, strategy and chunk), with the
//! workload as a boot-time `workload=alloc:NM` since a peer has no API to
//! give it later. Without the paravirtual device the guest idles in `hlt`
//! once ready.
//!
//! A peer has no memory report, so it is measured from the host only: the
//! runner sees it ready when the guest's serial console (the peer's
//! stdout, in its log file) prints `guest: ready` (and, with a workload,
//! `guest: allocated`), and it takes the same host-side figures as for
//! our VMs (process RSS/PSS/anonymous memory, page tables, threads, the
//! kernel's counters and `MemAvailable`).

use std::path::{Path, PathBuf};

/// The peer VMMs this runner knows how to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    /// Firecracker, or anything with its `--config-file` and `--no-api`.
    Firecracker,
}

impl PeerKind {
    /// The name `--peer` takes.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Firecracker => "firecracker",
        }
    }
}

/// `--peer KIND=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub kind: PeerKind,
    pub path: PathBuf,
}

/// Why a `--peer` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerSpecError {
    #[error("expected KIND=PATH (e.g. firecracker=/usr/bin/firecracker), not {0:?}")]
    Syntax(String),
    #[error("unknown peer {0:?}; the known one is firecracker")]
    Kind(String),
}

impl std::str::FromStr for PeerSpec {
    type Err = PeerSpecError;
    fn from_str(s: &str) -> Result<PeerSpec, PeerSpecError> {
        let (kind, path) = s.split_once('=').ok_or_else(|| PeerSpecError::Syntax(s.to_string()))?;
        if path.is_empty() {
            return Err(PeerSpecError::Syntax(s.to_string()));
        }
        let kind = match kind {
            "firecracker" => PeerKind::Firecracker,
            other => return Err(PeerSpecError::Kind(other.to_string())),
        };
        Ok(PeerSpec { kind, path: PathBuf::from(path) })
    }
}

/// Why the peer cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer binary is not an executable file.
    #[error("the peer binary {0:?} is not an executable file")]
    NotExecutable(PathBuf),
    /// The guest kernel could not be written for the peer.
    #[error("cannot write the guest kernel to {0:?}")]
    Guest(PathBuf, #[source] std::io::Error),
    /// A VM's config file could not be written.
    #[error("cannot write the peer's config file {0:?}")]
    Config(PathBuf, #[source] std::io::Error),
}

/// Checks that `path` is an executable regular file.
pub fn check_executable(path: &Path) -> Result<(), PeerError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        _ => Err(PeerError::NotExecutable(path.to_path_buf())),
    }
}

/// Writes the guest kernel this binary embeds to `dir/guest.elf` (in the
/// run's private directory) for the peer to boot; returns its path.
pub fn write_guest(dir: &Path) -> Result<PathBuf, PeerError> {
    let path = dir.join("guest.elf");
    std::fs::write(&path, vmm::loader::EMBEDDED_KERNEL).map_err(|e| PeerError::Guest(path.clone(), e))?;
    Ok(path)
}

/// The guest command line for a peer VM: Firecracker's usual console words,
/// then the words our own VMM gives the same guest (CPL, strategy, chunk),
/// then the workload.
pub fn boot_args(strategy: guest_abi::Strategy, alloc_mib: u64) -> String {
    let ours = vmm::config::VmConfig {
        machine: api::MachineConfig { memmap_init: strategy, ..api::MachineConfig::default() },
        cmdline: workload_word(alloc_mib),
        ..vmm::config::VmConfig::default()
    };
    format!("console=ttyS0 reboot=k panic=1 pci=off {}", ours.guest_cmdline())
}

/// `workload=wait`, or the boot-time allocation of `alloc_mib` MiB.
fn workload_word(alloc_mib: u64) -> String {
    if alloc_mib == 0 {
        "workload=wait".into()
    } else {
        format!("workload=alloc:{alloc_mib}M")
    }
}

/// Firecracker's config file for one VM.
pub fn config_json(kernel: &Path, boot_args: &str, vcpus: u8, mem_mib: u64) -> serde_json::Value {
    serde_json::json!({
        "boot-source": { "kernel_image_path": kernel, "boot_args": boot_args },
        "drives": [],
        "machine-config": { "vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": false },
        "network-interfaces": [],
        "logger": null,
        "metrics": null,
    })
}

/// Writes VM `name`'s config file into `dir`; returns its path.
pub fn write_config(dir: &Path, name: &str, config: &serde_json::Value) -> Result<PathBuf, PeerError> {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string()).map_err(|e| PeerError::Config(path.clone(), e))?;
    Ok(path)
}

/// The serial line that shows a guest ready.
pub const READY_LINE: &str = "guest: ready";
/// The serial line that shows a guest's boot-time workload done.
pub const ALLOCATED_LINE: &str = "guest: allocated";

/// Most bytes of a peer's log the runner reads when it looks for a line:
/// the guest prints a few hundred bytes before it is ready.
pub const MAX_LOG_SCAN: u64 = 64 << 10;

/// Whether the start of `log` (at most [`MAX_LOG_SCAN`] bytes) has a line
/// that starts with `prefix`.
pub fn log_has_line(log: &Path, prefix: &str) -> bool {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(log) else { return false };
    let mut text = Vec::new();
    if f.take(MAX_LOG_SCAN).read_to_end(&mut text).is_err() {
        return false;
    }
    String::from_utf8_lossy(&text).lines().any(|l| l.trim_start().starts_with(prefix))
}


#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::Strategy;

    #[test]
    fn peer_specs_parse() {
        let p: PeerSpec = "firecracker=/opt/fc".parse().unwrap();
        assert_eq!((p.kind, p.path), (PeerKind::Firecracker, PathBuf::from("/opt/fc")));
        assert_eq!("firecracker=a=b".parse::<PeerSpec>().unwrap().path, PathBuf::from("a=b"));
        assert!(matches!("firecracker".parse::<PeerSpec>(), Err(PeerSpecError::Syntax(_))));
        assert!(matches!("firecracker=".parse::<PeerSpec>(), Err(PeerSpecError::Syntax(_))));
        assert!(matches!("qemu=/x".parse::<PeerSpec>(), Err(PeerSpecError::Kind(_))));
    }

    #[test]
    fn the_peer_guest_gets_our_words_and_its_workload_on_the_command_line() {
        let a = boot_args(Strategy::Eager, 0);
        assert!(a.starts_with("console=ttyS0 "), "{a}");
        assert!(a.contains(" memmap_init=eager ") && a.contains(" memmap_chunk=2048K ") && a.contains(" cpl="), "{a}");
        assert!(a.ends_with(" workload=wait"), "{a}");
        assert!(boot_args(Strategy::OnDemand, 64).ends_with(" workload=alloc:64M"));
    }

    #[test]
    fn the_config_file_is_firecrackers_shape() {
        let v = config_json(Path::new("/w/guest.elf"), "console=ttyS0", 1, 2048);
        assert_eq!(v["boot-source"]["kernel_image_path"], "/w/guest.elf");
        assert_eq!(v["drives"], serde_json::json!([]));
        assert_eq!(v["machine-config"]["mem_size_mib"], 2048);
        assert_eq!(v["machine-config"]["smt"], false);
    }

    #[test]
    fn the_guest_and_configs_are_written_and_the_log_is_scanned_for_lines() {
        let dir = tempfile::tempdir().unwrap();
        let guest = write_guest(dir.path()).unwrap();
        assert_eq!(std::fs::read(&guest).unwrap(), vmm::loader::EMBEDDED_KERNEL);
        assert!(std::fs::read(&guest).unwrap().starts_with(b"\x7fELF"));
        let c = write_config(dir.path(), "peer-0", &config_json(&guest, "x", 1, 256)).unwrap();
        let back: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(c).unwrap()).unwrap();
        assert_eq!(back["machine-config"]["mem_size_mib"], 256);
        let log = dir.path().join("log");
        assert!(!log_has_line(&log, READY_LINE), "no file yet");
        std::fs::write(&log, "Running Firecracker\nguest: up in ring 3\n").unwrap();
        assert!(!log_has_line(&log, READY_LINE));
        std::fs::write(&log, "guest: up in ring 3\nguest: ready\n").unwrap();
        assert!(log_has_line(&log, READY_LINE));
        assert!(!log_has_line(&log, ALLOCATED_LINE));
        assert!(check_executable(&guest).is_err(), "mode 0644 is not executable");
        assert!(check_executable(Path::new("/bin/sh")).is_ok());
        assert!(check_executable(dir.path()).is_err());
    }
}

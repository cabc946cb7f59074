//! The one configuration a VM is built from. The CLI (`vmm run` flags) and
//! the API (`PUT /machine-config`, `PUT /boot-source`) both produce a
//! [`VmConfig`]; the builder consumes it. The machine part is the API's own
//! [`api::MachineConfig`], so its rules live in one place.
//! [`check_kernel_image`] is the host-side check of a kernel path, done at
//! `PUT /boot-source` as Firecracker does.

use crate::arch::layout;
use std::io;
use std::path::{Path, PathBuf};

/// Which kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// The guest kernel built into this binary.
    Embedded,
    /// An ELF file.
    File(PathBuf),
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdout,
    File(PathBuf),
    None,
}

/// The default cap of a serial console file (`--serial-max-bytes`).
pub const DEFAULT_SERIAL_MAX_BYTES: u64 = 16 << 20;

/// The default time the VMM waits for the guest (`--guest-timeout`): well
/// under the API server's wait for the VMM thread, so the controller
/// answers a command that timed out itself.
pub const DEFAULT_GUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// The VM's id, as `GET /` and `GET /vm/status` answer it and the log
    /// names it (`vmm-<pid>` unless the caller names the VM).
    pub id: String,
    /// vCPUs, memory, memmap strategy and chunk, CPL, huge pages.
    pub machine: api::MachineConfig,
    pub kernel: KernelImage,
    /// Extra words for the guest command line (after the VMM's own).
    pub cmdline: String,
    pub serial: SerialTarget,
    /// Most bytes of guest console written to a `--serial file:PATH`;
    /// later output is dropped and counted (`serial_bytes_dropped`).
    pub serial_max_bytes: u64,
    /// How long the VMM waits for the guest at each step: to be ready
    /// (when something waits for it) and to finish each command.
    pub guest_timeout: std::time::Duration,
    /// Path of `/dev/kvm` (tests point it elsewhere).
    pub kvm_path: PathBuf,
    /// Behave like a VMM without this project's extensions (as Firecracker
    /// boots an ELF kernel): no paravirtual ports, boot page tables that map
    /// only the first GiB. Tests use it to check the guest stays portable.
    pub legacy_only: bool,
    /// Register all guest RAM with KVM at boot instead of block by block as
    /// the guest onlines it (for comparison).
    pub register_all_memory: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            id: format!("vmm-{}", std::process::id()),
            machine: api::MachineConfig::default(),
            kernel: KernelImage::Embedded,
            cmdline: String::new(),
            serial: SerialTarget::Stdout,
            serial_max_bytes: DEFAULT_SERIAL_MAX_BYTES,
            guest_timeout: DEFAULT_GUEST_TIMEOUT,
            kvm_path: crate::host::kvm_device_path(),
            legacy_only: false,
            register_all_memory: false,
        }
    }
}

// The API refuses what the VMM would refuse, at `PUT /machine-config`.
const _: () = assert!(api::MAX_MEM_SIZE_MIB == layout::MAX_RAM >> 20);
const _: () = assert!(api::MIN_CHUNK_KIB << 10 == guest_abi::MIN_CHUNK_SIZE);
const _: () = assert!(api::MAX_CHUNK_KIB << 10 == guest_abi::SECTION_SIZE);
const _: () = assert!(api::DEFAULT_CHUNK_KIB << 10 == guest_abi::DEFAULT_CHUNK_SIZE);

/// Why a kernel path cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum KernelImageError {
    /// Nothing there, or a directory on the way cannot be searched.
    #[error("{} does not exist or cannot be reached", path.display())]
    Missing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory, FIFO, device or socket.
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// Larger than [`MAX_KERNEL_IMAGE_BYTES`] (or it grew past it while read).
    #[error("{} is {bytes} bytes; a kernel image may have at most {MAX_KERNEL_IMAGE_BYTES}", path.display())]
    TooLarge { path: PathBuf, bytes: u64 },
    /// It exists and cannot be read.
    #[error("{} cannot be opened for reading", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Largest kernel image the VMM reads (64 MiB; the built-in guest is about
/// 110 KiB). A bigger file is refused at `PUT /boot-source` and `--kernel`.
pub const MAX_KERNEL_IMAGE_BYTES: u64 = 64 << 20;

/// Opens a kernel image without ever blocking: `O_NONBLOCK` so that a FIFO
/// (or a device) does not wait for a writer, `O_CLOEXEC`, then `fstat` on
/// the descriptor itself, which must be a regular file of at most
/// [`MAX_KERNEL_IMAGE_BYTES`]. Returns the file and its size; the caller
/// reads from this descriptor (never the path again), so the file checked
/// is the file read.
pub fn open_kernel_image(path: &Path) -> Result<(std::fs::File, u64), KernelImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => {
                KernelImageError::Missing { path: path.into(), source }
            }
            _ => KernelImageError::Unreadable { path: path.into(), source },
        })?;
    let meta = file.metadata().map_err(|source| KernelImageError::Unreadable { path: path.into(), source })?;
    if !meta.is_file() {
        return Err(KernelImageError::NotAFile { path: path.into() });
    }
    if meta.len() > MAX_KERNEL_IMAGE_BYTES {
        return Err(KernelImageError::TooLarge { path: path.into(), bytes: meta.len() });
    }
    Ok((file, meta.len()))
}

/// Checks that `path` is a regular file (after symlinks) of at most
/// [`MAX_KERNEL_IMAGE_BYTES`] that this process can open for reading, with
/// [`open_kernel_image`]. The file is read again at `InstanceStart`.
pub fn check_kernel_image(path: &Path) -> Result<(), KernelImageError> {
    open_kernel_image(path).map(drop)
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Machine(#[from] api::MachineConfigError),
    #[error(transparent)]
    Boot(#[from] api::BootSourceError),
}

impl VmConfig {
    /// Memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.machine.mem_size_bytes()
    }

    /// The full guest command line: the VMM's words, then the user's (which win).
    pub fn guest_cmdline(&self) -> String {
        let m = &self.machine;
        let mut s = format!(
            "cpl={} memmap_init={} memmap_chunk={}K",
            crate::host::resolve_cpl(m.guest_cpl),
            m.memmap_init.name(),
            m.memmap_chunk_kib
        );
        if m.memmap_on_memory {
            s.push_str(" memmap_on_memory=on");
        }
        s.push_str(" reclaim=");
        s.push_str(m.effective_reclaim().name());
        if let Some(ms) = m.reclaim_delay_ms {
            s.push_str(&format!(" reclaim_delay_ms={ms}"));
        }
        if !self.cmdline.trim().is_empty() {
            s.push(' ');
            s.push_str(self.cmdline.trim());
        }
        s
    }

    /// Checks every rule (the API's); the message says what to do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.machine.validate()?;
        self.boot_source().validate()?;
        Ok(())
    }

    /// The boot source as the API describes it.
    pub fn boot_source(&self) -> api::BootSource {
        api::BootSource {
            kernel_image_path: match &self.kernel {
                KernelImage::Embedded => None,
                KernelImage::File(p) => Some(p.display().to_string()),
            },
            boot_args: (!self.cmdline.is_empty()).then(|| self.cmdline.clone()),
            initrd_path: None,
        }
    }

    /// Replaces the kernel and command line with an API boot source (one
    /// that passed [`api::BootSource::validate`], so without an initrd).
    pub fn set_boot_source(&mut self, b: &api::BootSource) {
        self.kernel = b.kernel_image_path.as_ref().map_or(KernelImage::Embedded, |p| KernelImage::File(p.into()));
        self.cmdline = b.boot_args.clone().unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_machine(f: impl FnOnce(&mut api::MachineConfig)) -> VmConfig {
        let mut c = VmConfig::default();
        f(&mut c.machine);
        c
    }

    #[test]
    fn validation_says_what_to_do() {
        assert!(VmConfig::default().validate().is_ok());
        let msg = |c: VmConfig| c.validate().unwrap_err().to_string();
        assert!(msg(with_machine(|m| m.mem_size_mib = 0)).contains("at least 5 MiB"));
        assert!(msg(with_machine(|m| {
            m.mem_size_mib = 7;
            m.huge_pages = api::HugePages::Size2M;
        }))
        .contains("multiple of 2"));
        assert!(with_machine(|m| m.mem_size_mib = 257).validate().is_ok(), "odd sizes boot");
        assert!(msg(with_machine(|m| m.mem_size_mib = 1 << 30)).contains("at most"));
        assert!(msg(with_machine(|m| m.vcpu_count = 0)).contains("vCPU"));
        assert!(msg(with_machine(|m| m.memmap_chunk_kib = 100)).contains("128"));
        let c = VmConfig { cmdline: "a\u{1}b".into(), ..Default::default() };
        assert!(msg(c).contains("control characters"));
    }

    #[test]
    fn user_words_come_last_so_they_win() {
        let c = VmConfig {
            machine: api::MachineConfig { guest_cpl: api::GuestCpl::Ring0, ..Default::default() },
            cmdline: " workload=exit cpl=3 ".into(),
            ..Default::default()
        };
        assert_eq!(c.guest_cmdline(), "cpl=0 memmap_init=ondemand memmap_chunk=2048K reclaim=full workload=exit cpl=3");
    }

    #[test]
    fn the_reclaim_mode_and_delay_reach_the_guest() {
        let c = with_machine(|m| {
            m.guest_cpl = api::GuestCpl::Ring3;
            m.memmap_init = api::Strategy::Eager;
        });
        assert_eq!(c.guest_cmdline(), "cpl=3 memmap_init=eager memmap_chunk=2048K reclaim=off");
        let c = with_machine(|m| {
            m.guest_cpl = api::GuestCpl::Ring3;
            m.reclaim = Some(api::Reclaim::Data);
            m.reclaim_delay_ms = Some(250);
        });
        assert_eq!(c.guest_cmdline(), "cpl=3 memmap_init=ondemand memmap_chunk=2048K reclaim=data reclaim_delay_ms=250");
        let c = with_machine(|m| {
            m.memmap_init = api::Strategy::Deferred;
            m.reclaim = Some(api::Reclaim::Full);
        });
        assert!(c.validate().unwrap_err().to_string().contains("needs memmap_init \"ondemand\""));
    }

    #[test]
    fn the_boot_source_round_trips() {
        let mut c = VmConfig::default();
        assert_eq!(c.boot_source(), api::BootSource::default());
        let b = api::BootSource { kernel_image_path: Some("/k".into()), boot_args: Some("quiet".into()), initrd_path: None };
        c.set_boot_source(&b);
        assert_eq!((c.kernel.clone(), c.cmdline.as_str()), (KernelImage::File("/k".into()), "quiet"));
        assert_eq!(c.boot_source(), b);
    }

    #[test]
    fn kernel_paths_are_checked_like_firecracker_does() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("vmlinux");
        let e = check_kernel_image(&missing).unwrap_err();
        assert!(matches!(e, KernelImageError::Missing { .. }), "{e}");
        assert!(e.to_string().ends_with("vmlinux does not exist or cannot be reached"), "{e}");
        let e = check_kernel_image(dir.path()).unwrap_err();
        assert!(matches!(e, KernelImageError::NotAFile { .. }), "{e}");
        std::fs::write(&missing, b"\x7fELF").unwrap();
        check_kernel_image(&missing).unwrap();
        check_kernel_image(Path::new(crate::loader::EMBEDDED_KERNEL_PATH)).unwrap();
        // A FIFO with no writer: refused at once instead of blocking in open.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = check_kernel_image(&fifo).unwrap_err();
        assert!(matches!(e, KernelImageError::NotAFile { .. }), "{e}");
        let e = check_kernel_image(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, KernelImageError::NotAFile { .. }), "{e}");
        assert!(e.to_string().ends_with("/dev/zero is not a regular file"), "{e}");
        // Sparse: 64 MiB + 1 byte costs no disk.
        let big = dir.path().join("big");
        std::fs::File::create(&big).unwrap().set_len(MAX_KERNEL_IMAGE_BYTES + 1).unwrap();
        let e = check_kernel_image(&big).unwrap_err();
        assert!(matches!(e, KernelImageError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("at most 67108864"), "{e}");
        std::fs::File::create(&big).unwrap().set_len(MAX_KERNEL_IMAGE_BYTES).unwrap();
        check_kernel_image(&big).unwrap();
    }
}

//! A VM: the builder that turns a [`VmConfig`] into a ready, paused VM, and
//! the VMM thread's handle to start it, watch its events and stop it.
//!
//! Threads: the VMM thread (the caller) owns the [`Vm`]; each vCPU runs on
//! its own thread (spawned by [`Vm::start`], and by the guest's AP start-up
//! request) and reports back through [`VmEvent`]s. Only the VMM thread changes
//! VM state.

use crate::arch::{self, layout};
use crate::devices::{ConsoleOut, Devices, VmEvent};
use crate::timings::{Metrics, Timings};
use crate::vcpu;
use guest_abi::{ApBoot, Strategy, AP_BOOT_MAGIC};
use kvm_bindings::{kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::io::Cursor;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest kernel built from `guest-kernel/`, embedded at build time.
pub static EMBEDDED_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_PATH"));

/// Stack size of vCPU threads: the run loop needs little, and every VM of a
/// density run pays for what its threads touch.
const VCPU_STACK: usize = 256 << 10;

/// Which kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// The guest kernel built into this binary.
    Embedded,
    /// An ELF file.
    File(PathBuf),
}

/// The guest's privilege level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCpl {
    /// Ring 3 on a PVM host, ring 0 elsewhere.
    Auto,
    /// Ring 0.
    Ring0,
    /// Ring 3.
    Ring3,
}

impl GuestCpl {
    /// The ring to pass to the guest (`cpl=`).
    pub fn resolve(self) -> u8 {
        match self {
            GuestCpl::Ring0 => 0,
            GuestCpl::Ring3 => 3,
            GuestCpl::Auto if is_pvm_host() => 3,
            GuestCpl::Auto => 0,
        }
    }
}

/// Whether `/dev/kvm` is served by PVM (ring-0 guest code is emulated there).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdout,
    File(PathBuf),
    None,
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub kernel: KernelImage,
    /// Extra words for the guest command line (after the VMM's own).
    pub cmdline: String,
    pub cpl: GuestCpl,
    pub memmap_init: Strategy,
    pub memmap_chunk_kib: u64,
    pub memmap_on_memory: bool,
    pub huge_pages: bool,
    pub serial: SerialTarget,
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
            mem_mib: 2048,
            vcpus: 1,
            kernel: KernelImage::Embedded,
            cmdline: String::new(),
            cpl: GuestCpl::Auto,
            memmap_init: Strategy::OnDemand,
            memmap_chunk_kib: guest_abi::DEFAULT_CHUNK_SIZE >> 10,
            memmap_on_memory: false,
            huge_pages: false,
            serial: SerialTarget::Stdout,
            kvm_path: PathBuf::from("/dev/kvm"),
            legacy_only: false,
            register_all_memory: false,
        }
    }
}

/// Most vCPUs a VM may have (the guest kernel's limit).
pub const MAX_VCPUS: u8 = 32;

// The API refuses what the VMM would refuse, at `PUT /machine-config`.
const _: () = assert!(api::MAX_VCPUS == MAX_VCPUS);
const _: () = assert!(api::MAX_MEM_SIZE_MIB == layout::MAX_RAM >> 20);

impl VmConfig {
    /// The full guest command line: the VMM's words, then the user's (which win).
    pub fn guest_cmdline(&self) -> String {
        let mut s = format!(
            "cpl={} memmap_init={} memmap_chunk={}K",
            self.cpl.resolve(),
            self.memmap_init.name(),
            self.memmap_chunk_kib
        );
        if self.memmap_on_memory {
            s.push_str(" memmap_on_memory=on");
        }
        if !self.cmdline.trim().is_empty() {
            s.push(' ');
            s.push_str(self.cmdline.trim());
        }
        s
    }

    /// Checks the numbers; the message says what to do.
    pub fn validate(&self) -> Result<(), BuildError> {
        let bad = |m: String| Err(BuildError::Config(m));
        if self.mem_mib == 0 {
            return bad("memory size must be more than 0 MiB (e.g. --mem-mib 2048)".into());
        }
        if !self.mem_mib.is_multiple_of(2) {
            return bad(format!("memory size must be a multiple of 2 MiB (got {}; try {})", self.mem_mib, self.mem_mib + 1));
        }
        let max_mib = layout::MAX_RAM >> 20;
        if self.mem_mib > max_mib {
            return bad(format!(
                "memory size {} MiB is more than this VMM can map for a guest (at most {max_mib} MiB)",
                self.mem_mib
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vCPU count must be 1..={MAX_VCPUS} (got {})", self.vcpus));
        }
        let chunk = self.memmap_chunk_kib << 10;
        if !chunk.is_power_of_two() || !(guest_abi::MIN_CHUNK_SIZE..=guest_abi::SECTION_SIZE).contains(&chunk) {
            return bad(format!(
                "memmap chunk must be a power of two from {} to {} KiB (got {})",
                guest_abi::MIN_CHUNK_SIZE >> 10,
                guest_abi::SECTION_SIZE >> 10,
                self.memmap_chunk_kib
            ));
        }
        Ok(())
    }
}

/// Why a VM could not be built. [`BuildError::is_usage`] tells the user's
/// mistakes (exit code 2) from the host's failures.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(String),
    #[error("{path} does not exist: this host has no KVM (load the kvm_intel or kvm_amd module, or use a host with virtualization)")]
    KvmMissing { path: PathBuf },
    #[error("permission denied opening {path}: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root")]
    KvmDenied { path: PathBuf },
    #[error("cannot open {path}")]
    KvmOpen {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot read kernel image {path}: {source} (pass an existing ELF file to --kernel, or omit it to boot the built-in guest)")]
    KernelRead { path: PathBuf, source: std::io::Error },
    #[error("kernel image {path} is not an x86-64 ELF executable ({why})")]
    KernelNotElf { path: String, why: &'static str },
    #[error("cannot load kernel image {path}")]
    KernelLoad {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("cannot prepare the guest's boot data")]
    Arch(#[from] arch::ArchSetupError),
    #[error("cannot start the vCPU thread")]
    VcpuThread(#[source] std::io::Error),
    #[error("cannot set up vCPU {cpu}: {what}")]
    Vcpu {
        cpu: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl BuildError {
    /// Whether this is the user's input to fix (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            BuildError::Config(_)
                | BuildError::KvmMissing { .. }
                | BuildError::KvmDenied { .. }
                | BuildError::KernelRead { .. }
                | BuildError::KernelNotElf { .. }
        )
    }
}

/// Checks that `image` is a 64-bit little-endian x86-64 ELF executable.
pub fn check_elf(image: &[u8]) -> Result<(), &'static str> {
    if image.len() < 64 || &image[..4] != b"\x7fELF" {
        return Err("no ELF magic");
    }
    if image[4] != 2 {
        return Err("not a 64-bit ELF");
    }
    if image[5] != 1 {
        return Err("not little-endian");
    }
    let machine = u16::from_le_bytes([image[18], image[19]]);
    if machine != 62 {
        return Err("not built for x86-64");
    }
    let kind = u16::from_le_bytes([image[16], image[17]]);
    if kind != 2 {
        return Err("not an executable (ET_EXEC)");
    }
    Ok(())
}

struct VcpuThread {
    cpu: u8,
    handle: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    /// The thread reported that it stopped (it is returning).
    stopped: bool,
}

/// A built VM.
pub struct Vm {
    pub config: VmConfig,
    _kvm: Kvm,
    _vm_fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub devices: Arc<Devices>,
    pending_vcpus: Vec<Option<VcpuFd>>,
    threads: Vec<VcpuThread>,
    event_tx: std::sync::mpsc::Sender<VmEvent>,
    boot_sregs: kvm_sregs,
    control: Arc<vcpu::RunControl>,
    /// Guest TSC frequency, to turn guest cycle counts into time.
    pub tsc_khz: Option<u32>,
}

fn open_kvm(path: &Path) -> Result<Kvm, BuildError> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Err(BuildError::KvmMissing { path: path.into() });
    };
    Kvm::new_with_path(cpath).map_err(|e| kvm_open_error(path, e))
}

/// Names why `/dev/kvm` could not be opened, with the usual fix.
fn kvm_open_error(path: &Path, e: kvm_ioctls::Error) -> BuildError {
    match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => BuildError::KvmMissing { path: path.into() },
        libc::EACCES | libc::EPERM => BuildError::KvmDenied { path: path.into() },
        _ => BuildError::KvmOpen { path: path.into(), source: e },
    }
}

fn open_console(target: &SerialTarget) -> Result<Option<ConsoleOut>, BuildError> {
    Ok(Some(match target {
        SerialTarget::Stdout => Box::new(std::io::LineWriter::new(std::io::stdout())),
        SerialTarget::None => return Ok(None),
        SerialTarget::File(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| BuildError::Config(format!("cannot create serial output file {}: {e}", p.display())))?;
            Box::new(std::io::LineWriter::new(f))
        }
    }))
}

impl Vm {
    /// Builds a VM ready to start: KVM VM and guest RAM registered, kernel and
    /// boot data loaded, vCPUs created and set up for 64-bit entry. Events go
    /// to `event_tx`, whose receiving end the caller (the VMM thread) keeps
    /// and shares with the API thread; counters go to `metrics`.
    pub fn build_with_events(
        config: VmConfig,
        timings: Arc<Timings>,
        metrics: Arc<Metrics>,
        event_tx: std::sync::mpsc::Sender<VmEvent>,
    ) -> Result<Vm, BuildError> {
        config.validate()?;
        let (image, name): (std::borrow::Cow<'_, [u8]>, String) = match &config.kernel {
            KernelImage::Embedded => (EMBEDDED_KERNEL.into(), "(built-in guest)".into()),
            KernelImage::File(p) => (
                std::fs::read(p).map_err(|source| BuildError::KernelRead { path: p.clone(), source })?.into(),
                p.display().to_string(),
            ),
        };
        check_elf(&image).map_err(|why| BuildError::KernelNotElf { path: name.clone(), why })?;
        let console = open_console(&config.serial)?;

        let kvm = open_kvm(&config.kvm_path)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(BuildError::CreateVm)?);
        let mem = crate::memory::create_ram(&arch::ram_ranges(config.mem_mib << 20), config.huge_pages)?;
        let registrar = Arc::new(crate::memory::Registrar::new(vm_fd.clone(), mem.clone()));
        if config.register_all_memory || config.legacy_only {
            // Without the paravirtual device the guest cannot ask for more.
            registrar.register_all()?;
        } else {
            // The first block holds the boot data and the kernel; the guest
            // onlines the others as its allocator first needs them.
            registrar.register_range(0, 1)?;
        }
        timings.mark_once(&timings.vm_created);

        let loaded = Elf::load(&mem, None, &mut Cursor::new(&image[..]), Some(GuestAddress(layout::HIMEM_START)))
            .map_err(|source| BuildError::KernelLoad { path: name.clone(), source })?;
        let guest_cmdline = config.guest_cmdline();
        arch::write_boot_data(&mem, &guest_cmdline, config.legacy_only)?;

        let devices = Arc::new(Devices::new(mem.clone(), console, event_tx.clone(), timings.clone(), metrics.clone()));
        devices.set_paravirt(!config.legacy_only);
        devices.set_vcpu_count(u32::from(config.vcpus));
        devices.set_registrar(registrar);

        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok();
        let mut pending_vcpus = Vec::new();
        let mut tsc_khz = None;
        let mut boot_sregs = kvm_sregs::default();
        for cpu in 0..config.vcpus {
            let vcpu_err = |what| move |source| BuildError::Vcpu { cpu, what, source };
            let vcpu = vm_fd.create_vcpu(u64::from(cpu)).map_err(vcpu_err("KVM_CREATE_VCPU"))?;
            if let Some(c) = &cpuid {
                let mut c: CpuId = c.clone();
                tsc_khz = vcpu.get_tsc_khz().ok();
                arch::patch_cpuid(&mut c, cpu, tsc_khz);
                vcpu.set_cpuid2(&c).map_err(vcpu_err("KVM_SET_CPUID2"))?;
            }
            let sregs = vcpu.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
            let sregs = arch::long_mode_sregs(sregs, layout::PML4_START);
            if cpu == 0 {
                vcpu.set_sregs(&sregs).map_err(vcpu_err("KVM_SET_SREGS"))?;
                vcpu.set_regs(&arch::boot_regs(loaded.kernel_load.0)).map_err(vcpu_err("KVM_SET_REGS"))?;
                vcpu.set_fpu(&arch::boot_fpu()).map_err(vcpu_err("KVM_SET_FPU"))?;
                boot_sregs = sregs;
            }
            pending_vcpus.push(Some(vcpu));
        }

        let config_vcpus = config.vcpus;
        Ok(Vm {
            config,
            _kvm: kvm,
            _vm_fd: vm_fd,
            mem,
            devices,
            pending_vcpus,
            threads: Vec::new(),
            event_tx,
            boot_sregs,
            control: Arc::new(vcpu::RunControl::new(usize::from(config_vcpus))),
            tsc_khz,
        })
    }

    fn spawn_vcpu(&mut self, cpu: u8) -> Result<(), std::io::Error> {
        let Some(mut vcpu) = self.pending_vcpus.get_mut(cpu as usize).and_then(Option::take) else {
            return Ok(());
        };
        vcpu::install_kick_handler();
        let devices = self.devices.clone();
        let control = self.control.clone();
        let tx = self.event_tx.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{cpu}"))
            .stack_size(VCPU_STACK)
            .spawn(move || {
                let reason = vcpu::run(&mut vcpu, cpu, &devices, &control, &stop2);
                let _ = tx.send(VmEvent::VcpuStopped { cpu, reason });
            })?;
        self.threads.push(VcpuThread { cpu, handle, stop, stopped: false });
        Ok(())
    }

    /// Starts the boot vCPU.
    pub fn start(&mut self) -> Result<(), std::io::Error> {
        self.spawn_vcpu(0)
    }

    /// Starts the application processors the guest asked for; returns how
    /// many, or why the record was refused.
    pub fn start_aps(&mut self, rec: ApBoot) -> Result<usize, String> {
        if rec.magic != AP_BOOT_MAGIC || rec.abi_version != guest_abi::ABI_VERSION {
            return Err("AP boot record has a bad magic or version".into());
        }
        let wanted = (rec.cpu_count as usize).min(self.pending_vcpus.len());
        let mut started = 0;
        for cpu in 1..wanted {
            let Some(Some(vcpu)) = self.pending_vcpus.get(cpu) else { continue };
            let stack_top = rec
                .stacks_base
                .checked_add(rec.stack_size.checked_mul(cpu as u64).ok_or("AP stack overflows")?)
                .ok_or("AP stack overflows")?;
            let sregs = arch::long_mode_sregs(self.boot_sregs, rec.cr3);
            vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS for CPU {cpu}: {e}"))?;
            vcpu.set_regs(&arch::ap_regs(rec.entry, stack_top, cpu as u64))
                .map_err(|e| format!("KVM_SET_REGS for CPU {cpu}: {e}"))?;
            vcpu.set_fpu(&arch::boot_fpu()).map_err(|e| format!("KVM_SET_FPU for CPU {cpu}: {e}"))?;
            self.spawn_vcpu(cpu as u8).map_err(|e| format!("cannot start the thread of CPU {cpu}: {e}"))?;
            started += 1;
        }
        Ok(started)
    }

    /// Notes that vCPU `cpu` stopped (its thread is returning).
    pub fn vcpu_stopped(&mut self, cpu: u8) {
        if let Some(t) = self.threads.iter_mut().find(|t| t.cpu == cpu) {
            t.stopped = true;
        }
    }

    /// Pauses the VM: holds commands, and keeps every vCPU out of the guest
    /// (kicking those in `KVM_RUN`). Returns once no vCPU runs guest code.
    pub fn pause(&mut self) {
        self.control.set_paused(true);
        self.devices.set_paused(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let running: Vec<_> =
                self.threads.iter().filter(|t| !t.stopped && self.control.in_guest(t.cpu as usize)).collect();
            if running.is_empty() || Instant::now() > deadline {
                break;
            }
            for t in running {
                if !t.handle.is_finished() {
                    // SAFETY: the thread is alive, so its pthread_t is valid;
                    // the kick signal has a no-op handler.
                    unsafe { libc::pthread_kill(t.handle.as_pthread_t(), vcpu::kick_signal()) };
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Resumes a paused VM.
    pub fn resume(&mut self) {
        self.control.set_paused(false);
        self.devices.set_paused(false);
    }

    /// Stops every vCPU (waking blocked ones, kicking running ones out of
    /// `KVM_RUN`) and joins their threads.
    pub fn stop(&mut self) {
        self.devices.request_stop();
        for t in &self.threads {
            t.stop.store(true, Ordering::Release);
        }
        self.control.wake();
        let deadline = Instant::now() + Duration::from_secs(5);
        for t in self.threads.drain(..) {
            if t.stopped {
                // It sent its last event and is returning: just join.
                let _ = t.handle.join();
                continue;
            }
            while !t.handle.is_finished() && Instant::now() < deadline {
                // SAFETY: the thread is alive (not finished, not joined), so
                // its pthread_t is valid; the signal has a no-op handler.
                unsafe { libc::pthread_kill(t.handle.as_pthread_t(), vcpu::kick_signal()) };
                std::thread::sleep(Duration::from_micros(200));
            }
            if t.handle.is_finished() {
                let _ = t.handle.join();
            }
        }
        self.devices.flush_console();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_kernel_is_an_x86_64_elf() {
        assert_eq!(check_elf(EMBEDDED_KERNEL), Ok(()));
    }

    #[test]
    fn non_elf_images_are_named_precisely() {
        assert_eq!(check_elf(b"hello"), Err("no ELF magic"));
        let mut img = EMBEDDED_KERNEL[..64].to_vec();
        img[18] = 183; // aarch64
        assert_eq!(check_elf(&img), Err("not built for x86-64"));
        img[4] = 1;
        assert_eq!(check_elf(&img), Err("not a 64-bit ELF"));
    }

    #[test]
    fn config_validation_says_what_to_do() {
        let c = |mem_mib, vcpus| VmConfig { mem_mib, vcpus, ..Default::default() }.validate();
        assert!(c(2048, 1).is_ok());
        assert!(c(0, 1).unwrap_err().to_string().contains("more than 0"));
        assert!(c(3, 1).unwrap_err().to_string().contains("multiple of 2"));
        assert!(c(1 << 30, 1).unwrap_err().to_string().contains("at most"));
        assert!(c(2048, 0).unwrap_err().to_string().contains("vCPU"));
        let bad_chunk = VmConfig { memmap_chunk_kib: 100, ..Default::default() }.validate();
        assert!(bad_chunk.unwrap_err().to_string().contains("power of two"));
        assert!(c(0, 1).unwrap_err().is_usage());
    }

    #[test]
    fn user_words_come_last_so_they_win() {
        let c = VmConfig { cpl: GuestCpl::Ring0, cmdline: " workload=exit cpl=3 ".into(), ..Default::default() };
        assert_eq!(c.guest_cmdline(), "cpl=0 memmap_init=ondemand memmap_chunk=2048K workload=exit cpl=3");
    }

    #[test]
    fn kvm_open_errors_say_which_problem_and_the_fix() {
        let p = Path::new("/dev/kvm");
        let e = |errno| kvm_open_error(p, kvm_ioctls::Error::new(errno));
        let denied = e(libc::EACCES);
        assert!(matches!(denied, BuildError::KvmDenied { .. }));
        assert!(denied.is_usage());
        let msg = denied.to_string();
        assert!(msg.contains("permission denied opening /dev/kvm") && msg.contains("kvm group"), "{msg}");
        assert!(matches!(e(libc::EPERM), BuildError::KvmDenied { .. }));
        assert!(matches!(e(libc::ENOENT), BuildError::KvmMissing { .. }));
        let other = e(libc::EMFILE);
        assert!(matches!(other, BuildError::KvmOpen { .. }));
        assert!(!other.is_usage(), "a host failure, not the user's input");
    }

    #[test]
    fn a_missing_kvm_device_is_a_usage_error_that_names_the_path() {
        let e = open_kvm(Path::new("/nonexistent/kvm")).err().unwrap();
        assert!(matches!(e, BuildError::KvmMissing { .. }));
        assert!(e.to_string().contains("/nonexistent/kvm"));
        assert!(e.is_usage());
    }
}

//! The builder: a [`VmConfig`] in, a [`Vm`] out, ready to start and not yet
//! running (Firecracker's `build_microvm_for_boot`). [`build_microvm`] is the
//! whole boot flow in one function, step by step.

use crate::arch::{self, layout};
use crate::config::{ConfigError, VmConfig};
use crate::devices::serial::{open_console, ConsoleError};
use crate::devices::Devices;
use crate::events::EventSender;
use crate::loader::{Image, LoadError};
use crate::memory::reclaim::ReclaimPolicy;
use crate::memory::{self, RamError, RegisterError, Registrar};
use crate::metrics::Metrics;
use crate::timings::Timings;
use crate::vstate::boot_thread::BootThread;
use crate::vstate::vm::{Vm, VmParts, VCPU_STACK};
use kvm_bindings::{kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vm_memory::GuestAddress;

/// Why a VM could not be built. [`BuildError::is_usage`] tells the user's
/// mistakes (exit code 2, HTTP 400) from the host's failures.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    #[error(transparent)]
    Kernel(#[from] LoadError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error("cannot register the boot memory with KVM")]
    Register(#[from] RegisterError),
    #[error("cannot prepare the guest's boot data")]
    Arch(#[from] arch::ArchSetupError),
    #[error("cannot start the boot vCPU's thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot set up vCPU {cpu}: {what}")]
    Vcpu {
        cpu: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl BuildError {
    /// Whether this is the user's input to fix (exit code 2, HTTP 400).
    pub fn is_usage(&self) -> bool {
        match self {
            BuildError::Config(_)
            | BuildError::KvmMissing { .. }
            | BuildError::KvmDenied { .. }
            | BuildError::Console(_)
            | BuildError::Arch(arch::ArchSetupError::CmdlineTooLong { .. } | arch::ArchSetupError::CmdlineNul) => true,
            BuildError::Kernel(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// Where a VM's threads report, and the clocks and counters they share.
#[derive(Clone)]
pub struct BuildContext {
    pub timings: Arc<Timings>,
    pub metrics: Arc<Metrics>,
    pub events: EventSender,
}

/// Builds a VM ready to start: KVM VM and guest RAM registered, kernel and
/// boot data loaded, vCPUs created and set up for 64-bit entry.
pub fn build_microvm(config: VmConfig, ctx: &BuildContext) -> Result<Vm, BuildError> {
    // 1. Everything the user gave is checked before any resource is taken.
    config.validate()?;
    let image = Image::read(&config.kernel)?;
    let console = open_console(&config.serial, config.serial_max_bytes)?;

    // 2. The KVM VM and its RAM.
    let kvm = open_kvm(&config.kvm_path)?;
    // The boot vCPU's thread starts now: it fetches the supported CPUID and
    // installs its seccomp filter while this thread goes on (see
    // `BootThread`); `create_vcpus` takes the CPUID from it if it is there
    // by then.
    let mut boot_thread = BootThread::spawn("vcpu0".into(), VCPU_STACK, kvm_cpath(&config.kvm_path)?)
        .map_err(BuildError::Thread)?;
    let vm_fd = Arc::new(kvm.create_vm().map_err(BuildError::CreateVm)?);
    let mem = memory::create_ram(&arch::ram_ranges(config.mem_bytes()), config.machine.huge_pages.is_enabled())?;

    // 3. Registration with KVM: the blocks that hold the boot data (the
    //    first) and the kernel's segments, wherever it is linked. The guest
    //    onlines the others as its allocator first needs them (without the
    //    paravirtual device it cannot, so a legacy VM gets all of its RAM).
    //    Blocks are 2 MiB unless the host's memslot limit needs them larger.
    //    What an idle (`ondemand`) guest onlines while it boots is
    //    registered now too, so that no memslot changes once its vCPU runs,
    //    and the guest finds all that is registered listed in its boot data
    //    (`guest_abi::BootOnline`), so it writes no `MEM_ONLINE` for it.
    //    Every memslot KVM adds waits for an SRCU grace period (0.1 to
    //    several ms), and nothing but the first `KVM_RUN` needs them, so
    //    the boot ranges (known from the config, the image and the RAM) are
    //    handed to the boot vCPU's thread, to register ahead of its run loop
    //    while this thread goes on (the rest of this step, step 4). If the
    //    thread has not begun by step 5 (it is still fetching the CPUID, or
    //    not yet scheduled on a loaded host), this thread registers them
    //    itself then, so that the thread fetches the CPUID meanwhile; step 6
    //    waits for them.
    let registrar = Arc::new(Registrar::new(vm_fd.clone(), mem.clone(), kvm.get_nr_memslots()));
    let mut registration = if config.register_all_memory || config.legacy_only {
        registrar.register_all()?;
        ctx.timings.mark_once(&ctx.timings.vm_created);
        None
    } else {
        let mut boot = image.segments();
        boot.push((0, 1));
        let first_chunk = ondemand_boot_ranges(&config, &image.segments(), &mem);
        boot.extend(first_chunk.iter().flatten().map(|r| (r.start, r.start + r.len)));
        let (r, g, t) = (registrar.clone(), boot.clone(), ctx.timings.clone());
        Some((boot_thread.hand(move || register_boot(&r, &g, &t)), boot))
    };

    //    Meanwhile, what the guest finds at its first instruction: its ELF
    //    segments, command line and boot_params (written through the host
    //    mapping; KVM reads none of it before the first `KVM_RUN`). The
    //    boot GDT and page tables follow with the vCPUs, only if a vCPU
    //    enters through them (`create_vcpus`).
    let entry = image.load(&mem, config.machine.huge_pages.is_enabled())?;
    arch::write_boot_info(&mem, &config.guest_cmdline())?;

    // 4. The devices on the port bus.
    let devices = Arc::new(Devices::new(
        mem.clone(),
        console,
        !config.legacy_only,
        ctx.events.clone(),
        ctx.timings.clone(),
        ctx.metrics.clone(),
    ));
    if let Some(pv) = devices.paravirt() {
        pv.set_vcpu_count(u32::from(config.machine.vcpu_count));
        pv.set_registrar(registrar.clone());
        // What the guest may give back: never the boot data (low memory)
        // or the kernel's segments.
        let mut protected = image.segments();
        protected.push((0, layout::HIMEM_START));
        pv.set_reclaim_policy(ReclaimPolicy::new(config.machine.effective_reclaim(), &mem, protected));
    }

    // 5. The vCPUs: CPUID for each, the boot vCPU's registers for 64-bit entry.
    if let Some((handed, _)) = registration.as_mut() {
        handed.run_here_unless_begun();
    }
    let cpuid = boot_thread.supported_cpuid().or_else(|| kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok());
    //    The boot vCPU starts at the guest's ring-3 entry if its image has a
    //    valid note, except on `--legacy-only`, which boots as Firecracker
    //    does (at `_start`, in ring 0).
    let ring3 = image.ring3_entry().ok().filter(|_| !config.legacy_only);
    let boot = BootEntry { entry, ring3: ring3.as_ref().map(|e| (&mem, e)), tables: Some((&mem, config.legacy_only)) };
    let vcpus = create_vcpus(&vm_fd, cpuid, config.machine.vcpu_count, &boot)?;

    // 6. The boot registration (step 3) has finished before the VM exists,
    //    so the vCPU never runs without it and its failure fails the build;
    //    the guest's boot data lists exactly what it registered.
    if let Some((handed, boot)) = registration {
        // `None`: the thread began and ended without finishing (it cannot
        // panic in a release build, which aborts); register here.
        handed.wait().unwrap_or_else(|| register_boot(&registrar, &boot, &ctx.timings))?;
    }
    arch::write_boot_online(&mem, &registrar.registered_ranges())?;

    Ok(Vm::new(VmParts {
        config,
        kvm,
        vm_fd,
        mem,
        devices,
        vcpus: vcpus.fds,
        boot_sregs: vcpus.boot_sregs,
        tsc_khz: vcpus.tsc_khz,
        events: ctx.events.clone(),
        boot_thread: Some(boot_thread),
    }))
}

/// Registers the boot `ranges` and marks `vm_created` once they are.
fn register_boot(registrar: &Registrar, ranges: &[(u64, u64)], timings: &Timings) -> Result<(), RegisterError> {
    registrar.register_ranges(ranges)?;
    timings.mark_once(&timings.vm_created);
    Ok(())
}

/// The vCPUs of a VM, the boot one set up for entry.
struct Vcpus {
    fds: Vec<VcpuFd>,
    boot_sregs: kvm_sregs,
    tsc_khz: Option<u32>,
}

/// Where the boot vCPU starts: the ELF entry in ring 0 (Linux 64-bit boot
/// protocol), or, when the image has a valid ring-3 entry note, there, with
/// the guest memory whose GDT and TSS that entry needs written.
struct BootEntry<'a> {
    entry: GuestAddress,
    ring3: Option<(&'a vm_memory::GuestMemoryMmap, &'a guest_abi::entry_note::Ring3Entry)>,
    /// Where to write the VMM's boot GDT and page tables
    /// ([`arch::write_entry_tables`], the flag being its `first_gib_only`)
    /// if a vCPU needs them: the boot vCPU entering in ring 0, or
    /// application processors (which use the GDT).
    tables: Option<(&'a vm_memory::GuestMemoryMmap, bool)>,
}

/// Creates `count` vCPUs, each with `cpuid` (KVM's supported CPUID,
/// patched per vCPU) if there is one. The boot vCPU starts at `boot`'s
/// ring-3 entry if it has one that the guest's descriptors and KVM accept,
/// else at its ELF entry in ring 0.
fn create_vcpus(vm_fd: &VmFd, cpuid: Option<CpuId>, count: u8, boot: &BootEntry) -> Result<Vcpus, BuildError> {
    let mut out = Vcpus { fds: Vec::with_capacity(count.into()), boot_sregs: kvm_sregs::default(), tsc_khz: None };
    for cpu in 0..count {
        let vcpu_err = |what| move |source| BuildError::Vcpu { cpu, what, source };
        let vcpu = vm_fd.create_vcpu(u64::from(cpu)).map_err(vcpu_err("KVM_CREATE_VCPU"))?;
        if let Some(c) = &cpuid {
            let mut c: CpuId = c.clone();
            out.tsc_khz = vcpu.get_tsc_khz().ok();
            arch::patch_cpuid(&mut c, cpu, out.tsc_khz);
            vcpu.set_cpuid2(&c).map_err(vcpu_err("KVM_SET_CPUID2"))?;
        }
        if cpu == 0 {
            let initial = vcpu.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
            // Application processors start from these sregs too, with every
            // segment and table register replaced (`Vm::start_aps`).
            let ring3 = boot
                .ring3
                .and_then(|(mem, e)| arch::ring3_entry_state(mem, initial, e).ok())
                .filter(|(s, r)| vcpu.set_sregs(s).and_then(|()| vcpu.set_regs(r)).is_ok());
            if ring3.is_none() || count > 1 {
                if let Some((mem, first_gib_only)) = boot.tables {
                    arch::write_entry_tables(mem, first_gib_only)?;
                }
            }
            out.boot_sregs = match ring3 {
                Some((sregs, _)) => sregs,
                None => {
                    let sregs = arch::long_mode_sregs(initial, layout::PML4_START);
                    vcpu.set_sregs(&sregs).map_err(vcpu_err("KVM_SET_SREGS"))?;
                    vcpu.set_regs(&arch::boot_regs(boot.entry.0)).map_err(vcpu_err("KVM_SET_REGS"))?;
                    sregs
                }
            };
            vcpu.set_fpu(&arch::boot_fpu()).map_err(vcpu_err("KVM_SET_FPU"))?;
        }
        out.fds.push(vcpu);
    }
    Ok(out)
}

/// What an `ondemand` guest writes while it boots (its first chunk with
/// free memory, and that chunk's struct pages), computed with the guest's
/// own layout function ([`guest_abi::layout::ondemand_boot_ranges`]) from
/// the inputs the guest uses: its e820 RAM, low memory and the kernel's
/// segments reserved, and the memmap words of its command line (ours and
/// the user's, read by the guest's rules, `guest_abi::cmdline`). `None` for
/// other strategies (nothing to predict that is not all of RAM), and for a
/// command line the guest would refuse.
fn ondemand_boot_ranges(
    config: &VmConfig,
    segments: &[(u64, u64)],
    mem: &vm_memory::GuestMemoryMmap,
) -> Option<[guest_abi::GpaRange; 2]> {
    use guest_abi::{layout, GpaRange, PAGE_SIZE};
    let (strategy, chunk_bytes, on_memory) = guest_abi::cmdline::memmap_words(&config.guest_cmdline()).ok()?;
    if strategy != api::Strategy::OnDemand {
        return None;
    }
    // As the guest normalizes them: RAM rounded in, reserved memory out.
    let ram: Vec<GpaRange> = arch::boot_params::e820_map(mem)
        .iter()
        .map(|e| (e.addr.next_multiple_of(PAGE_SIZE), (e.addr + e.size) / PAGE_SIZE * PAGE_SIZE))
        .filter(|(s, e)| e > s)
        .map(|(s, e)| GpaRange { start: s, len: e - s })
        .collect();
    let kernel = (segments.iter().map(|s| s.0).min()?, segments.iter().map(|s| s.1).max()?);
    let kernel_start = kernel.0 / PAGE_SIZE * PAGE_SIZE;
    let reserved = [
        GpaRange { start: 0, len: arch::layout::HIMEM_START },
        GpaRange { start: kernel_start, len: kernel.1.next_multiple_of(PAGE_SIZE) - kernel_start },
    ];
    let geometry = layout::MemmapGeometry { chunk_bytes, section_bytes: guest_abi::SECTION_SIZE, on_memory };
    layout::ondemand_boot_ranges(&ram, &reserved, &geometry)
}

fn open_kvm(path: &Path) -> Result<Kvm, BuildError> {
    Kvm::new_with_path(kvm_cpath(path)?).map_err(|e| kvm_open_error(path, e))
}

/// `path` for `open`: a path with a NUL byte cannot name the device.
fn kvm_cpath(path: &Path) -> Result<std::ffi::CString, BuildError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| BuildError::KvmMissing { path: path.into() })
}

/// Names why `/dev/kvm` could not be opened, with the usual fix.
fn kvm_open_error(path: &Path, e: kvm_ioctls::Error) -> BuildError {
    match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => BuildError::KvmMissing { path: path.into() },
        libc::EACCES | libc::EPERM => BuildError::KvmDenied { path: path.into() },
        _ => BuildError::KvmOpen { path: path.into(), source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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

    #[test]
    fn a_bad_config_fails_before_kvm_is_touched() {
        let (tx, _rx) = crate::events::channel();
        let ctx = BuildContext { timings: Arc::default(), metrics: Arc::default(), events: tx };
        let mut c = VmConfig { kvm_path: "/nonexistent/kvm".into(), ..Default::default() };
        c.machine.mem_size_mib = 0;
        let e = build_microvm(c, &ctx).err().unwrap();
        assert!(matches!(e, BuildError::Config(_)) && e.is_usage(), "{e}");
    }

    #[test]
    fn a_small_vm_builds_with_its_boot_blocks_and_first_chunk_registered() {
        let (tx, _rx) = crate::events::channel();
        let ctx = BuildContext { timings: Arc::default(), metrics: Arc::default(), events: tx };
        let mut c = VmConfig { serial: crate::config::SerialTarget::None, ..Default::default() };
        c.machine.mem_size_mib = 256;
        let vm = build_microvm(c.clone(), &ctx).unwrap();
        // The first block (boot data), the blocks under the kernel's
        // segments and the blocks of the guest's first chunk and its struct
        // pages (2 MiB runs this low), nothing else.
        let block = guest_abi::MEMORY_BLOCK_SIZE;
        let segments = Image::read(&c.kernel).unwrap().segments();
        let chunk = ondemand_boot_ranges(&c, &segments, &vm.mem).expect("the default is ondemand");
        let mut blocks: Vec<u64> = vec![0];
        for (start, end) in segments.iter().copied().chain(chunk.iter().map(|r| (r.start, r.start + r.len))) {
            blocks.extend(start / block..end.div_ceil(block));
        }
        blocks.sort_unstable();
        blocks.dedup();
        assert_eq!(vm.devices.registered_bytes(), blocks.len() as u64 * block);
        assert!(vm.devices.registered_bytes() <= 10 << 20, "{}", vm.devices.registered_bytes());
        assert!(ctx.timings.vm_created.get().is_some());
        // The guest finds every registered block listed in its boot data.
        let registrar = vm.devices.paravirt().and_then(|p| p.registrar()).unwrap();
        let head: u64 = vm.mem.read_obj(GuestAddress(layout::ZERO_PAGE_START + guest_abi::SETUP_DATA_OFFSET)).unwrap();
        let rec: guest_abi::BootOnline = vm.mem.read_obj(GuestAddress(head + 16)).unwrap();
        let listed: Vec<(u64, u64)> =
            rec.ranges(c.mem_bytes()).expect("a valid record").iter().map(|r| (r.start, r.start + r.len)).collect();
        assert_eq!(listed, registrar.registered_ranges());
        assert_eq!(listed.iter().map(|(s, e)| e - s).sum::<u64>(), vm.devices.registered_bytes());
        // One vCPU, started at the built-in guest's ring-3 entry: the VMM's
        // boot GDT and page tables are not written (their pages stay
        // unbacked); with a second vCPU (whose start uses the GDT) they are.
        let low = |vm: &Vm| {
            [layout::GDT_START, layout::PML4_START, layout::PDPT_START, layout::PD_START]
                .map(|a| memory::resident_bytes(&vm.mem, GuestAddress(a), 1))
        };
        assert_eq!(low(&vm), [0; 4]);
        let mut two = c.clone();
        two.machine.vcpu_count = 2;
        let vm2 = build_microvm(two, &ctx).unwrap();
        assert!(low(&vm2).iter().all(|&b| b == 4096), "{:?}", low(&vm2));
        // Other strategies predict nothing; the user's own memmap words
        // count as the guest counts them (later words win).
        let mut eager = c.clone();
        eager.machine.memmap_init = api::Strategy::Eager;
        assert!(ondemand_boot_ranges(&eager, &segments, &vm.mem).is_none());
        let user = VmConfig { cmdline: "memmap_init=eager".into(), ..c.clone() };
        assert!(ondemand_boot_ranges(&user, &segments, &vm.mem).is_none());
        let user = VmConfig { cmdline: "memmap_chunk=128K".into(), ..c.clone() };
        assert_eq!(ondemand_boot_ranges(&user, &segments, &vm.mem).map(|r| r[0].len), Some(128 << 10));
        let bad = VmConfig { cmdline: "memmap_chunk=3M".into(), ..c };
        assert!(ondemand_boot_ranges(&bad, &segments, &vm.mem).is_none(), "the guest will not boot");
    }

    #[test]
    fn an_idle_guest_boots_to_ready_without_a_memslot_change() {
        // The registration before the first entry covers everything the
        // guest onlines while it boots: KVM's memslots stay as built, and
        // the guest, told so in its boot data, asks for nothing
        // (`MEM_ONLINE` writes), with the default layout and with its
        // memmap on memory, and with the user's own chunk size.
        for (on_memory, cmdline) in [(false, ""), (true, ""), (false, "memmap_chunk=128K")] {
            idle_boot_to_ready(on_memory, cmdline);
        }
    }

    fn idle_boot_to_ready(on_memory: bool, cmdline: &str) {
        let (tx, mut rx) = crate::events::channel();
        let ctx = BuildContext { timings: Arc::default(), metrics: Arc::default(), events: tx };
        let mut c = VmConfig { serial: crate::config::SerialTarget::None, ..Default::default() };
        c.machine.mem_size_mib = 2048;
        c.machine.memmap_on_memory = on_memory;
        c.cmdline = cmdline.into();
        let mut vm = build_microvm(c, &ctx).unwrap();
        let registrar = |vm: &Vm| {
            vm.devices.paravirt().and_then(|p| p.registrar()).map(|r| (r.slots_used(), r.registered_bytes(), r.online_requests()))
        };
        let built = registrar(&vm).expect("the paravirtual device tracks registration");
        vm.start().unwrap();
        wait_ready(&mut rx);
        assert_eq!(built.2, 0);
        assert_eq!(registrar(&vm), Some(built), "(slots, bytes, MEM_ONLINE writes) at build and at ready, on_memory {on_memory}, {cmdline:?}");
        vm.stop();
    }

    /// A KVM VM with 64 MiB of RAM holding `image`, and the image's entry.
    fn vm_with(image: &Image) -> (Kvm, VmFd, vm_memory::GuestMemoryMmap, GuestAddress) {
        let kvm = Kvm::new().unwrap();
        let vm_fd = kvm.create_vm().unwrap();
        let mem = memory::create_ram(&arch::ram_ranges(64 << 20), false).unwrap();
        let entry = image.load(&mem, false).unwrap();
        (kvm, vm_fd, mem, entry)
    }

    #[test]
    fn the_boot_vcpu_starts_at_a_valid_ring3_entry_and_in_ring_0_otherwise() {
        let image = Image::read(&crate::config::KernelImage::Embedded).unwrap();
        let e = image.ring3_entry().unwrap();
        let (_kvm, vm_fd, mem, entry) = vm_with(&image);
        let vcpus = create_vcpus(&vm_fd, None, 2, &BootEntry { entry, ring3: Some((&mem, &e)), tables: None }).unwrap();
        let (s, r) = (vcpus.fds[0].get_sregs().unwrap(), vcpus.fds[0].get_regs().unwrap());
        assert_eq!((s.cs.selector, s.cs.dpl, s.ss.selector, s.ss.dpl), (e.user_cs, 3, e.user_ss, 3));
        assert_eq!((s.tr.selector, s.tr.base, s.gdt.base, s.idt.base, s.cr3), (e.tss_selector, e.tss_base, e.gdt_base, e.idt_base, e.cr3));
        assert_eq!((r.rip, r.rsp, r.rflags), (e.entry, e.stack_top, 0x2));
        assert_eq!(vcpus.boot_sregs.cs.dpl, 3);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(e.tss_base + 4)).unwrap(), e.rsp0, "TSS.RSP0 as the prologue sets it");
        // Without a note: the ELF entry, in ring 0, on the VMM's GDT.
        let (_kvm, vm_fd, _mem, entry) = vm_with(&image);
        let vcpus = create_vcpus(&vm_fd, None, 1, &BootEntry { entry, ring3: None, tables: None }).unwrap();
        let (s, r) = (vcpus.fds[0].get_sregs().unwrap(), vcpus.fds[0].get_regs().unwrap());
        assert_eq!((s.cs.dpl, s.cr3, r.rip), (0, layout::PML4_START, entry.0));
        // A note whose user selectors name the guest's kernel segments.
        let (_kvm, vm_fd, mem, entry) = vm_with(&image);
        let kernel = guest_abi::entry_note::Ring3Entry { user_cs: 0x08 | 3, user_ss: 0x10 | 3, ..e };
        let vcpus = create_vcpus(&vm_fd, None, 1, &BootEntry { entry, ring3: Some((&mem, &kernel)), tables: None }).unwrap();
        assert_eq!((vcpus.fds[0].get_sregs().unwrap().cs.dpl, vcpus.fds[0].get_regs().unwrap().rip), (0, entry.0));
    }

    #[test]
    fn guests_boot_to_ready_through_the_ring3_entry_and_without_the_note() {
        // The built-in kernel with its PT_NOTE header blanked (PT_NULL).
        let mut bytes = crate::loader::EMBEDDED_KERNEL.to_vec();
        let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
        let count = usize::from(u16::from_le_bytes([bytes[0x38], bytes[0x39]]));
        let h = (0..count).map(|i| phoff + i * 56).find(|&h| bytes[h] == 4).expect("a PT_NOTE header");
        bytes[h..h + 4].copy_from_slice(&0u32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux-no-note");
        std::fs::write(&path, &bytes).unwrap();
        let no_note = crate::config::KernelImage::File(path);
        assert!(Image::read(&no_note).unwrap().ring3_entry().is_err());
        let ring3 = guest_abi::stats_flags::RING3_ENTRY;
        for (c, flag) in [
            // The built-in guest, 2 GiB ondemand: at its ring-3 entry.
            (VmConfig::default(), ring3),
            (VmConfig { kernel: no_note, ..Default::default() }, 0),
            // The ring-0 kernel: the ring-3 entry, then the #UD gate to ring 0.
            (VmConfig { cmdline: "cpl=0".into(), ..Default::default() }, ring3),
        ] {
            let (tx, mut rx) = crate::events::channel();
            let ctx = BuildContext { timings: Arc::default(), metrics: Arc::default(), events: tx };
            let mut c = VmConfig { serial: crate::config::SerialTarget::None, ..c };
            c.machine.mem_size_mib = 2048;
            let mut vm = build_microvm(c, &ctx).unwrap();
            vm.start().unwrap();
            wait_ready(&mut rx);
            assert_eq!(guest_flags(&vm) & ring3, flag);
            vm.stop();
        }
    }

    /// Waits for the guest's `Ready` (panics if its vCPU stops first).
    fn wait_ready(rx: &mut crate::events::EventReceiver) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match rx.try_recv() {
                Ok(crate::events::VmEvent::Phase(guest_abi::Phase::Ready)) => break,
                Ok(crate::events::VmEvent::VcpuStopped { reason, .. }) => panic!("stopped before ready: {reason:?}"),
                Ok(_) => {}
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(2)),
                Err(e) => panic!("no Ready within 60 s: {e}"),
            }
        }
    }

    /// The [`guest_abi::stats_flags`] the guest published, in a stats block
    /// that the report accepts.
    fn guest_flags(vm: &Vm) -> u32 {
        let at = vm.devices.stats_gpa().expect("the guest published its stats block");
        let b = crate::report::guest::read_snapshot(&vm.mem, at).unwrap();
        crate::report::guest::validate(&b, &vm.mem, 1).unwrap();
        b.flags
    }
}

//! The kernel image: the guest built into this binary or an ELF file, checked
//! to be an x86-64 executable and loaded into guest memory.
//!
//! Loading maps what it can instead of copying it: every whole page of a
//! segment's file bytes is mapped over guest RAM from the image's file,
//! private and copy-on-write ([`crate::memory::ram::map_file`]), so that all VMs
//! share the page-cache pages of the kernel until a guest writes one (then
//! that page alone becomes its own). The embedded kernel is mapped from the
//! running binary (`/proc/self/exe`, where it sits page-aligned). A
//! `--kernel` file is copied: a running binary cannot be written in place,
//! but a kernel file can be, and a VM must not see its kernel change (or
//! fault, if the file is truncated) because someone copied a new build over
//! the path. Partial pages (a segment's first page
//! when it does not start on a page boundary, its last when its file bytes
//! end mid-page, so that what follows them, `.bss`, stays zero; a page two
//! segments share) are copied. Everything is copied, as `linux-loader`
//! does, when the RAM has huge pages, the layout is unusual, there is no
//! file, or the mapped pages do not read exactly as the image.
//!
//! The image may publish a ring-3 entry note (`guest_abi::entry_note`):
//! [`Image::ring3_entry`] finds it and checks every value against the
//! image's own segments; the builder then starts the boot vCPU in ring 3.

use crate::arch::layout::HIMEM_START;
use crate::config::{open_kernel_image, KernelImage, KernelImageError, MAX_KERNEL_IMAGE_BYTES};
use crate::memory::ram::{self, OverlayError};
use guest_abi::entry_note::{self, EntryNoteError, Ring3Entry};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::borrow::Cow;
#[cfg(test)]
use std::cell::Cell;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The embedded kernel's bytes, page-aligned in the binary: its pages are
/// then whole pages of the binary's file, which [`Image::load`] maps.
#[repr(C, align(4096))]
struct PageAligned<T: ?Sized>(T);

const EMBEDDED_LEN: usize = include_bytes!(env!("GUEST_KERNEL_PATH")).len();
static EMBEDDED: PageAligned<[u8; EMBEDDED_LEN]> = PageAligned(*include_bytes!(env!("GUEST_KERNEL_PATH")));

/// The guest kernel built from `guest-kernel/`, embedded at build time
/// (page-aligned).
pub static EMBEDDED_KERNEL: &[u8] = &EMBEDDED.0;

/// Where the build left the embedded kernel's ELF file (tests boot it as a file).
pub const EMBEDDED_KERNEL_PATH: &str = env!("GUEST_KERNEL_PATH");

/// Host page size the kernel's segments are mapped in.
const PAGE: u64 = 4096;

/// Why the kernel image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not a regular file, too large, or cannot be opened.
    #[error("cannot use kernel image")]
    File(#[from] KernelImageError),
    #[error("cannot read kernel image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel image {name} is not an x86-64 ELF executable ({why})")]
    NotElf { name: String, why: &'static str },
    #[error("cannot load kernel image {name}")]
    Load {
        name: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// A mapping of the image was refused and fresh memory could not be put
    /// back over it either (the host is out of mappings or memory).
    #[error("cannot restore guest RAM under kernel image {name}")]
    Restore {
        name: String,
        #[source]
        source: OverlayError,
    },
}

impl LoadError {
    /// Whether the image the user named is at fault (rather than the host).
    pub fn is_usage(&self) -> bool {
        matches!(self, LoadError::File(_) | LoadError::Read { .. } | LoadError::NotElf { .. })
    }
}

/// Why an image's ring-3 entry note cannot be used (the boot vCPU then
/// enters at the ELF entry in ring 0, as without a note).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ring3EntryError {
    #[error("no ring-3 entry note")]
    Missing,
    #[error("malformed PT_NOTE segment")]
    MalformedNotes,
    #[error("bad ring-3 entry record: {0}")]
    Record(EntryNoteError),
    /// An address (with the bytes that must follow it) is not inside one
    /// loaded identity-mapped (`p_vaddr` = `p_paddr`) segment.
    #[error("{what} at {addr:#x} is outside the image's segments")]
    Outside { what: &'static str, addr: u64 },
    #[error("{what} {value:#x} is not aligned to {align}")]
    Misaligned { what: &'static str, value: u64, align: u64 },
    #[error("bad {what} {value:#x}")]
    Invalid { what: &'static str, value: u64 },
}

/// Where an image's bytes can be mapped from.
enum Source {
    /// [`EMBEDDED_KERNEL`], in the running binary's file.
    Embedded,
    /// A file the bytes were read from, kept open until the image is
    /// loaded (the mappings then hold it): only the tests map from one,
    /// to check the mapping against files they change.
    #[cfg(test)]
    File(Cell<Option<File>>),
    /// Bytes only (a `--kernel` file, the fuzzers): always copied.
    Bytes,
}

/// A kernel image in memory, checked to be an x86-64 ELF executable.
pub struct Image {
    bytes: Cow<'static, [u8]>,
    name: String,
    source: Source,
}

/// What [`Image::load_into`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loaded {
    entry: GuestAddress,
    /// Bytes of guest RAM mapped from the image's file (the rest copied).
    mapped: u64,
}

impl Image {
    /// Reads and checks the image.
    pub fn read(kernel: &KernelImage) -> Result<Image, LoadError> {
        let image = match kernel {
            KernelImage::Embedded => {
                Image { bytes: EMBEDDED_KERNEL.into(), name: "(built-in guest)".into(), source: Source::Embedded }
            }
            KernelImage::File(p) => {
                let (_file, bytes) = read_file(p)?;
                Image { bytes: bytes.into(), name: p.display().to_string(), source: Source::Bytes }
            }
        };
        check_elf(&image.bytes).map_err(|why| LoadError::NotElf { name: image.name.clone(), why })?;
        Ok(image)
    }

    /// An image from bytes already in memory, unchecked (for the fuzzers).
    #[doc(hidden)]
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Image {
        Image { bytes: bytes.into(), name: name.into(), source: Source::Bytes }
    }

    /// The guest-physical ranges `[start, end)` its loadable segments occupy
    /// (`PT_LOAD` program headers, by physical address, as they are loaded).
    /// Headers that do not fit in the image are skipped: loading refuses them.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        load_segments(&self.bytes)
    }

    /// The boot CPU's ring-3 entry, from the image's `MVMGUEST` note,
    /// checked: the record decodes ([`Ring3Entry::decode`]); every address
    /// lies, with what it points at, inside one `PT_LOAD` segment whose
    /// virtual and physical addresses agree (the entry in an executable one,
    /// within its file bytes); page tables 4 KiB aligned, stacks 16, the GDT
    /// and IDT 8; limits that fit whole descriptors; selectors inside the GDT,
    /// of the right privilege, the TSS's not overlapping the user segments.
    /// The descriptors themselves are checked where they are read from guest
    /// memory (`arch::regs::ring3_entry_state`).
    pub fn ring3_entry(&self) -> Result<Ring3Entry, Ring3EntryError> {
        let desc = find_note(&self.bytes, entry_note::NOTE_NAME, entry_note::NOTE_TYPE)?
            .ok_or(Ring3EntryError::Missing)?;
        let e = Ring3Entry::decode(desc).map_err(Ring3EntryError::Record)?;
        check_ring3_entry(&e, &program_headers(&self.bytes))?;
        Ok(e)
    }

    /// Loads the ELF segments into guest memory from 1 MiB up; returns the
    /// entry point. Whole pages of the segments are mapped from the image's
    /// file where they can be (never when `huge_pages` backs the RAM); the
    /// rest is copied. Call it once, on fresh guest RAM, before the boot
    /// vCPU first runs (the RAM may be registered with KVM by then: KVM
    /// looks up the host mapping only when the guest touches a page).
    pub fn load(&self, mem: &GuestMemoryMmap, huge_pages: bool) -> Result<GuestAddress, LoadError> {
        self.load_into(mem, huge_pages).map(|l| l.entry)
    }

    fn load_into(&self, mem: &GuestMemoryMmap, huge_pages: bool) -> Result<Loaded, LoadError> {
        if !huge_pages {
            if let Some(plan) = plan(&self.bytes, mem) {
                let mapped = self.map_runs(&plan, mem)?;
                if mapped > 0 {
                    if copy_rest(&self.bytes, &plan, mem) {
                        return Ok(Loaded { entry: GuestAddress(plan.entry), mapped });
                    }
                    self.unmap_runs(&plan.runs, mem)?;
                }
            }
        }
        let loaded = Elf::load(mem, None, &mut Cursor::new(&self.bytes[..]), Some(GuestAddress(HIMEM_START)))
            .map_err(|source| LoadError::Load { name: self.name.clone(), source })?;
        Ok(Loaded { entry: loaded.kernel_load, mapped: 0 })
    }

    /// The file to map the image from and the offset of the image in it;
    /// `None` if there is none (nothing is mapped then). A test's file is
    /// handed out once.
    fn mapping_source(&self) -> Option<(File, u64)> {
        match &self.source {
            Source::Embedded => {
                let offset = exe_file_offset(EMBEDDED_KERNEL)?;
                offset.is_multiple_of(PAGE).then_some(())?;
                Some((File::open("/proc/self/exe").ok()?, offset))
            }
            #[cfg(test)]
            Source::File(file) => Some((file.take()?, 0)),
            Source::Bytes => None,
        }
    }

    /// Maps the plan's runs from the image's file; returns the bytes mapped.
    /// Nothing stays mapped (0) unless every run mapped and reads exactly
    /// as the image: the file may have changed since it was read, or
    /// `/proc/self/exe` may not hold this binary's bytes where expected.
    fn map_runs(&self, plan: &Plan, mem: &GuestMemoryMmap) -> Result<u64, LoadError> {
        if plan.runs.is_empty() {
            return Ok(0);
        }
        let Some((file, base)) = self.mapping_source() else {
            return Ok(0);
        };
        let mut mapped = 0;
        for (i, run) in plan.runs.iter().enumerate() {
            let image = &self.bytes[run.offset as usize..(run.offset + run.len) as usize];
            let ok = base.checked_add(run.offset).is_some_and(|offset| {
                ram::map_file(mem, GuestAddress(run.gpa), run.len, &file, offset).is_ok()
                    && reads_as(mem, run.gpa, image)
            });
            if !ok {
                // A failed MAP_FIXED may have unmapped the range too.
                self.unmap_runs(&plan.runs[..=i], mem)?;
                return Ok(0);
            }
            mapped += run.len;
        }
        Ok(mapped)
    }

    /// Puts fresh RAM back over `runs`.
    fn unmap_runs(&self, runs: &[Run], mem: &GuestMemoryMmap) -> Result<(), LoadError> {
        for run in runs {
            ram::map_anonymous(mem, GuestAddress(run.gpa), run.len)
                .map_err(|source| LoadError::Restore { name: self.name.clone(), source })?;
        }
        Ok(())
    }
}

/// One `PT_LOAD` segment with file bytes, as loaded: `filesz` bytes of the
/// image from `offset` at guest-physical `paddr`, zero up to `memsz`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Whole pages of one segment's file bytes, mapped from the image's file:
/// `len` bytes of the image from `offset` at guest-physical `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    gpa: u64,
    offset: u64,
    len: u64,
}

/// How an image is loaded when its pages can be mapped: the segments (all
/// copied but for their runs) and the runs.
#[derive(Debug)]
struct Plan {
    entry: u64,
    segments: Vec<Segment>,
    runs: Vec<Run>,
}

/// The plan for loading `image` into `mem` with mapped pages, or `None` when
/// anything is unusual (then `linux-loader` copies it, or says what is
/// wrong). Usual is: the header `linux-loader` accepts (program headers of
/// 56 bytes past the ELF header, the entry at or above 1 MiB), `PT_NOTE`
/// segments of well-formed notes none of which is a PVH (`Xen`) note, which
/// `linux-loader` would parse, and `PT_LOAD` segments with
/// their file bytes inside the image and guest RAM, `filesz <= memsz`, that
/// do not overlap each other.
fn plan(image: &[u8], mem: &GuestMemoryMmap) -> Option<Plan> {
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    let u16_at = |o: usize| field::<2>(image, o, 0).map(u16::from_le_bytes);
    let u64_at = |o: usize, at: usize| field::<8>(image, o, at).map(u64::from_le_bytes);
    let (entry, phoff, entsize, count) = (u64_at(0x18, 0)?, u64_at(0x20, 0)?, u16_at(0x36)?, u16_at(0x38)?);
    let headers = program_headers(image);
    if entsize != 56 || phoff < 64 || entry < HIMEM_START || headers.len() != usize::from(count) {
        return None;
    }
    let mut segments = Vec::new();
    for h in &headers {
        match h.kind {
            // A note `linux-loader` reads as it does ours (no PVH entry, no
            // header past the segment) changes nothing; others go to it.
            PT_NOTE => {
                let notes = notes(segment_bytes(image, h.offset, h.filesz)?)?;
                if notes.iter().any(|n| n.name == PVH_NOTE_NAME) {
                    return None;
                }
                continue;
            }
            PT_LOAD => {}
            _ => continue,
        }
        let s = Segment { offset: h.offset, paddr: h.paddr, filesz: h.filesz, memsz: h.memsz };
        if s.filesz == 0 {
            continue; // `linux-loader` skips these too
        }
        let file_end = s.offset.checked_add(s.filesz)?;
        s.paddr.checked_add(s.memsz)?;
        if file_end > image.len() as u64
            || s.filesz > s.memsz
            || !mem.check_range(GuestAddress(s.paddr), s.filesz as usize)
        {
            return None;
        }
        segments.push(s);
    }
    let mut by_addr = segments.clone();
    by_addr.sort_by_key(|s| s.paddr);
    if by_addr.windows(2).any(|w| w[0].paddr + w[0].memsz > w[1].paddr) {
        return None;
    }
    let runs = segments
        .iter()
        .filter(|s| s.offset % PAGE == s.paddr % PAGE)
        .filter_map(|s| {
            let gpa = s.paddr.next_multiple_of(PAGE);
            let end = (s.paddr + s.filesz) / PAGE * PAGE;
            (gpa < end).then_some(Run { gpa, offset: s.offset + (gpa - s.paddr), len: end - gpa })
        })
        .collect();
    Some(Plan { entry, segments, runs })
}

/// Copies every segment's file bytes but its run (the rest of guest RAM is
/// fresh, so what lies past `filesz` reads as zero); false if guest memory
/// refused a write (nothing the plan let through).
fn copy_rest(image: &[u8], plan: &Plan, mem: &GuestMemoryMmap) -> bool {
    plan.segments.iter().all(|s| {
        let end = s.paddr + s.filesz;
        let run = plan.runs.iter().find(|r| r.gpa >= s.paddr && r.gpa + r.len <= end);
        let pieces = match run {
            Some(r) => [(s.paddr, r.gpa), (r.gpa + r.len, end)],
            None => [(s.paddr, end), (end, end)],
        };
        pieces.iter().filter(|(a, b)| a < b).all(|&(a, b)| {
            let from = (s.offset + (a - s.paddr)) as usize;
            mem.write_slice(&image[from..from + (b - a) as usize], GuestAddress(a)).is_ok()
        })
    })
}

/// Whether guest memory from `gpa` reads exactly `expected`.
fn reads_as(mem: &GuestMemoryMmap, gpa: u64, expected: &[u8]) -> bool {
    let mut page = [0u8; PAGE as usize];
    expected.chunks(PAGE as usize).enumerate().all(|(i, want)| {
        let got = &mut page[..want.len()];
        mem.read_slice(got, GuestAddress(gpa + (i as u64) * PAGE)).is_ok() && got == want
    })
}

/// The offset in the running executable's file of `bytes`, found from the
/// program headers of the running executable (`dl_iterate_phdr`, whose
/// first object is always the executable): `bytes` must lie in the file
/// bytes of one of its `PT_LOAD` segments.
fn exe_file_offset(bytes: &[u8]) -> Option<u64> {
    const PT_LOAD: u32 = 1;
    struct Query {
        start: u64,
        end: u64,
        found: Option<u64>,
    }
    unsafe extern "C" fn first_object(info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> i32 {
        // SAFETY: `data` is the `Query` that `exe_file_offset` passed, alive
        // and not otherwise borrowed for the duration of the call; `info` is
        // glibc's description of a loaded object, valid during the callback,
        // with `dlpi_phnum` program headers at `dlpi_phdr` (or none).
        let (query, info) = unsafe { (&mut *data.cast::<Query>(), &*info) };
        let phdrs = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: see above: glibc's program header table of the object.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        query.found = phdrs.iter().filter(|h| h.p_type == PT_LOAD).find_map(|h| {
            let start = info.dlpi_addr.checked_add(h.p_vaddr)?;
            let end = start.checked_add(h.p_filesz)?;
            (start <= query.start && query.end <= end).then(|| h.p_offset + (query.start - start))
        });
        1 // the executable only
    }
    let start = bytes.as_ptr() as u64;
    let mut query = Query { start, end: start + bytes.len() as u64, found: None };
    // SAFETY: the callback only reads what glibc hands it and writes `query`,
    // which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first_object), (&raw mut query).cast()) };
    query.found
}

/// Reads a kernel file opened by [`open_kernel_image`] (regular, at most
/// [`MAX_KERNEL_IMAGE_BYTES`], never blocking), reading at most one byte past
/// the cap so a file that grows meanwhile is refused, not read forever.
fn read_file(path: &std::path::Path) -> Result<(File, Vec<u8>), LoadError> {
    let (file, len) = open_kernel_image(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    (&file)
        .take(MAX_KERNEL_IMAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    if bytes.len() as u64 > MAX_KERNEL_IMAGE_BYTES {
        return Err(KernelImageError::TooLarge { path: path.to_path_buf(), bytes: bytes.len() as u64 }.into());
    }
    Ok((file, bytes))
}

/// The `[p_paddr, p_paddr + p_memsz)` of every `PT_LOAD` header of a 64-bit
/// little-endian ELF image (checked by [`check_elf`]).
fn load_segments(image: &[u8]) -> Vec<(u64, u64)> {
    const PT_LOAD: u32 = 1;
    let u16_at = |o: usize| field::<2>(image, o, 0).map(u16::from_le_bytes);
    let u32_at = |o: usize, at: usize| field::<4>(image, o, at).map(u32::from_le_bytes);
    let u64_at = |o: usize, at: usize| field::<8>(image, o, at).map(u64::from_le_bytes);
    let (Some(phoff), Some(entsize), Some(count)) = (u64_at(0x20, 0), u16_at(0x36), u16_at(0x38)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for i in 0..usize::from(count) {
        // Every offset comes from the image: none may wrap around.
        let Some(h) = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i.checked_mul(usize::from(entsize))?))
        else {
            break;
        };
        let (Some(kind), Some(paddr), Some(memsz)) = (u32_at(h, 0), u64_at(h, 0x18), u64_at(h, 0x28)) else { break };
        if kind == PT_LOAD && memsz > 0 {
            out.push((paddr, paddr.saturating_add(memsz)));
        }
    }
    out
}

/// The name of the PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`).
const PVH_NOTE_NAME: &[u8] = b"Xen\0";

/// One ELF program header, as far as the mapped-load plan and the ring-3
/// entry note need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Every program header of the image that fits in it (a header past the
/// end ends the list).
fn program_headers(image: &[u8]) -> Vec<Phdr> {
    let u16_at = |o: usize| field::<2>(image, o, 0).map(u16::from_le_bytes);
    let u32_at = |o: usize, at: usize| field::<4>(image, o, at).map(u32::from_le_bytes);
    let u64_at = |o: usize, at: usize| field::<8>(image, o, at).map(u64::from_le_bytes);
    let (Some(phoff), Some(56), Some(count)) = (u64_at(0x20, 0), u16_at(0x36), u16_at(0x38)) else {
        return Vec::new();
    };
    let header = |i: usize| {
        let h = usize::try_from(phoff).ok()?.checked_add(i.checked_mul(56)?)?;
        Some(Phdr {
            kind: u32_at(h, 0)?,
            flags: u32_at(h, 4)?,
            offset: u64_at(h, 8)?,
            vaddr: u64_at(h, 0x10)?,
            paddr: u64_at(h, 0x18)?,
            filesz: u64_at(h, 0x20)?,
            memsz: u64_at(h, 0x28)?,
        })
    };
    (0..usize::from(count)).map_while(header).collect()
}

/// The `filesz` bytes of the image from `offset`, if they are all in it.
fn segment_bytes(image: &[u8], offset: u64, filesz: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    image.get(start..start.checked_add(usize::try_from(filesz).ok()?)?)
}

/// One ELF note: its name (with the NUL), type and descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Note<'a> {
    name: &'a [u8],
    kind: u32,
    desc: &'a [u8],
}

/// The notes of one `PT_NOTE` segment's bytes: 12-byte headers (`n_namesz`,
/// `n_descsz`, `n_type`), name and descriptor each padded to 4 bytes (padding
/// after the last descriptor may be missing, as `linux-loader` allows). `None`
/// if a header, name or descriptor runs past the segment.
fn notes(mut bytes: &[u8]) -> Option<Vec<Note<'_>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let word = |o: usize| field::<4>(bytes, o, 0).map(u32::from_le_bytes);
        let (namesz, descsz, kind) = (word(0)? as usize, word(4)? as usize, word(8)?);
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = name_end.checked_next_multiple_of(4)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let name = bytes.get(12..name_end)?;
        let desc = bytes.get(desc_start..desc_end)?;
        out.push(Note { name, kind, desc });
        let next = desc_end.checked_next_multiple_of(4)?;
        bytes = bytes.get(next..).unwrap_or_default();
    }
    Some(out)
}

/// The descriptor of the first note named `name` of type `kind` in the
/// image's `PT_NOTE` segments; `Ok(None)` if there is none.
fn find_note<'a>(image: &'a [u8], name: &[u8], kind: u32) -> Result<Option<&'a [u8]>, Ring3EntryError> {
    const PT_NOTE: u32 = 4;
    for h in program_headers(image).iter().filter(|h| h.kind == PT_NOTE) {
        let bytes = segment_bytes(image, h.offset, h.filesz).ok_or(Ring3EntryError::MalformedNotes)?;
        let found = notes(bytes).ok_or(Ring3EntryError::MalformedNotes)?;
        if let Some(n) = found.iter().find(|n| n.name == name && n.kind == kind) {
            return Ok(Some(n.desc));
        }
    }
    Ok(None)
}

/// Checks a decoded [`Ring3Entry`] against the image's program headers (see
/// [`Image::ring3_entry`]).
fn check_ring3_entry(e: &Ring3Entry, headers: &[Phdr]) -> Result<(), Ring3EntryError> {
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;
    // `[addr, addr + len)` inside one identity-mapped loaded segment
    // (within its file bytes if `file`), executable if `exec`.
    let inside = |what, addr: u64, len: u64, exec: bool, file: bool| {
        let fits = |h: &&Phdr| {
            let size = if file { h.filesz } else { h.memsz };
            let end = addr.checked_add(len);
            h.kind == PT_LOAD
                && h.vaddr == h.paddr
                && (!exec || h.flags & PF_X != 0)
                && addr >= h.paddr
                && end.is_some_and(|end| h.paddr.checked_add(size).is_some_and(|seg_end| end <= seg_end))
        };
        headers.iter().find(fits).map(|_| ()).ok_or(Ring3EntryError::Outside { what, addr })
    };
    let aligned = |what, value: u64, align: u64| {
        if value.is_multiple_of(align) {
            Ok(())
        } else {
            Err(Ring3EntryError::Misaligned { what, value, align })
        }
    };
    let invalid = |what, value: u16| Err(Ring3EntryError::Invalid { what, value: value.into() });
    inside("entry", e.entry, 1, true, true)?;
    aligned("boot stack top", e.stack_top, 16)?;
    inside("boot stack top", e.stack_top.wrapping_sub(16), 16, false, false)?;
    aligned("ring-0 stack top", e.rsp0, 16)?;
    inside("ring-0 stack top", e.rsp0.wrapping_sub(16), 16, false, false)?;
    aligned("page table", e.cr3, 4096)?;
    inside("page table", e.cr3, 4096, false, true)?;
    aligned("GDT", e.gdt_base, 8)?;
    let gdt_size = u64::from(e.gdt_limit) + 1;
    if !gdt_size.is_multiple_of(8) {
        return invalid("GDT limit", e.gdt_limit);
    }
    inside("GDT", e.gdt_base, gdt_size, false, true)?;
    aligned("IDT", e.idt_base, 8)?;
    let idt_size = u64::from(e.idt_limit) + 1;
    if !idt_size.is_multiple_of(16) {
        return invalid("IDT limit", e.idt_limit);
    }
    inside("IDT", e.idt_base, idt_size, false, false)?;
    if e.tss_limit < 103 {
        return invalid("TSS limit", e.tss_limit);
    }
    inside("TSS", e.tss_base, u64::from(e.tss_limit) + 1, false, false)?;
    // Selectors: GDT (TI = 0), not null, the descriptor inside the limit,
    // the user ones with RPL 3, the TSS's (16 bytes) with RPL 0 and apart.
    for (what, sel, rpl, bytes) in
        [("user code selector", e.user_cs, 3, 8), ("user data selector", e.user_ss, 3, 8), ("TSS selector", e.tss_selector, 0, 16)]
    {
        let index = u64::from(sel & !7);
        if sel & 3 != rpl || sel & 4 != 0 || index == 0 || index + bytes > gdt_size {
            return invalid(what, sel);
        }
    }
    let tss = e.tss_selector & !7;
    if [e.user_cs & !7, e.user_ss & !7].iter().any(|&s| s == tss || s == tss + 8) || e.user_cs & !7 == e.user_ss & !7 {
        return invalid("TSS selector", e.tss_selector);
    }
    Ok(())
}

/// The `N` bytes at `base + at` in `image`, or `None` if they are not all
/// inside it, including when `base + at + N` does not fit in a `usize`
/// (both offsets come from the untrusted image).
fn field<const N: usize>(image: &[u8], base: usize, at: usize) -> Option<[u8; N]> {
    let start = base.checked_add(at)?;
    image.get(start..start.checked_add(N)?)?.try_into().ok()
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
    fn the_embedded_kernel_loads_from_1_mib_up() {
        let segs = load_segments(EMBEDDED_KERNEL);
        assert!(!segs.is_empty());
        assert!(segs.iter().all(|&(s, e)| s >= HIMEM_START && e > s), "{segs:x?}");
    }

    #[test]
    fn truncated_program_headers_yield_no_segments() {
        let mut img = EMBEDDED_KERNEL[..64].to_vec();
        assert!(load_segments(&img).is_empty(), "headers past the end of the image");
        img[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(load_segments(&img).is_empty());
    }

    #[test]
    fn offsets_near_the_top_of_the_address_space_yield_nothing() {
        // A program header table that starts just below u64::MAX (and
        // usize::MAX): every field offset past it would wrap around.
        for phoff in [u64::MAX, u64::MAX - 4, u64::MAX - 0x18, u64::MAX - 0x28, usize::MAX as u64 - 0x27] {
            let mut img = EMBEDDED_KERNEL[..0x1000].to_vec();
            img[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
            assert!(load_segments(&img).is_empty(), "phoff {phoff:#x}");
        }
        // A table that fits, with an entry size that walks past the end.
        let mut img = EMBEDDED_KERNEL[..0x1000].to_vec();
        img[0x36..0x38].copy_from_slice(&u16::MAX.to_le_bytes());
        img[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(load_segments(&img).len() <= 1);
        let image = [0u8; 16];
        for (base, at) in [(usize::MAX, 0), (usize::MAX - 3, 0), (usize::MAX - 0x18, 0x18), (8, usize::MAX), (9, 0)] {
            assert_eq!(field::<8>(&image, base, at), None, "{base:#x} + {at:#x}");
        }
        assert_eq!(field::<8>(&image, 4, 4), Some([0; 8]));
    }

    #[test]
    fn a_missing_file_names_its_path_once() {
        let e = Image::read(&KernelImage::File("/nonexistent/vmlinux".into())).err().unwrap();
        assert!(e.is_usage());
        assert_eq!(
            api::ErrorChain(&e).to_string(),
            "cannot use kernel image: /nonexistent/vmlinux does not exist or cannot be reached: \
             No such file or directory (os error 2)"
        );
    }

    #[test]
    fn devices_directories_and_oversized_files_are_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        for p in [std::path::PathBuf::from("/dev/zero"), dir.path().to_path_buf()] {
            let e = Image::read(&KernelImage::File(p.clone())).err().unwrap();
            assert!(e.is_usage(), "{e}");
            assert!(matches!(e, LoadError::File(KernelImageError::NotAFile { .. })), "{p:?}: {e}");
        }
        let big = dir.path().join("big");
        std::fs::File::create(&big).unwrap().set_len(MAX_KERNEL_IMAGE_BYTES + 1).unwrap();
        let e = Image::read(&KernelImage::File(big)).err().unwrap();
        assert!(matches!(e, LoadError::File(KernelImageError::TooLarge { .. })), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Image::read(&KernelImage::File(fifo)).err().unwrap();
        assert!(matches!(e, LoadError::File(KernelImageError::NotAFile { .. })), "{e}");
        let ok = Image::read(&KernelImage::File(EMBEDDED_KERNEL_PATH.into())).unwrap();
        assert_eq!(&ok.bytes[..], EMBEDDED_KERNEL);
    }

    /// Fresh guest RAM for loading tests: 8 MiB holds the guest kernel with
    /// its `.bss` and stacks.
    fn ram() -> GuestMemoryMmap {
        crate::memory::create_ram(&[(GuestAddress(0), 8 << 20)], false).unwrap()
    }

    /// Guest RAM from 1 MiB to the end of the image's last segment.
    fn kernel_bytes(image: &Image, mem: &GuestMemoryMmap) -> Vec<u8> {
        let end = image.segments().iter().map(|s| s.1).max().unwrap().next_multiple_of(PAGE);
        let mut out = vec![0u8; (end - HIMEM_START) as usize];
        mem.read_slice(&mut out, GuestAddress(HIMEM_START)).unwrap();
        out
    }

    /// Bytes of guest RAM a copy loads into `mem`, as `linux-loader` does.
    fn copied(image: &Image) -> (GuestMemoryMmap, Loaded) {
        let mem = ram();
        let loaded = image.load_into(&mem, true).unwrap();
        assert_eq!(loaded.mapped, 0, "huge pages: copied");
        (mem, loaded)
    }

    /// Every whole page of every segment's file bytes, for the guest kernel.
    fn whole_pages(image: &[u8]) -> u64 {
        let plan = plan(image, &ram()).unwrap();
        plan.runs.iter().map(|r| r.len).sum()
    }

    /// What the copy gives, from 1 MiB to past the last segment: every
    /// segment's file bytes, zero past `p_filesz` (`.bss`) and between.
    fn assert_same_as_copy(image: &Image, mem: &GuestMemoryMmap) {
        let (copy, _) = copied(image);
        let (got, want) = (kernel_bytes(image, mem), kernel_bytes(image, &copy));
        if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("guest RAM differs from the copy at {:#x}", HIMEM_START + at as u64);
        }
        for s in plan(&image.bytes, mem).unwrap().segments {
            let mut tail = vec![0xffu8; (s.memsz - s.filesz) as usize];
            mem.read_slice(&mut tail, GuestAddress(s.paddr + s.filesz)).unwrap();
            assert!(tail.iter().all(|b| *b == 0), "past p_filesz of the segment at {:#x}", s.paddr);
        }
    }

    #[test]
    fn the_embedded_kernel_is_page_aligned_and_found_in_the_running_binary() {
        assert!((EMBEDDED_KERNEL.as_ptr() as u64).is_multiple_of(PAGE));
        let offset = exe_file_offset(EMBEDDED_KERNEL).expect("in a PT_LOAD segment of this binary");
        let mut exe = std::fs::read("/proc/self/exe").unwrap();
        exe.drain(..offset as usize);
        assert!(exe.starts_with(EMBEDDED_KERNEL), "the bytes at {offset:#x} of /proc/self/exe");
        let heap = vec![0u8; 16].into_boxed_slice();
        assert_eq!(exe_file_offset(&heap), None, "on the heap, not in the file");
    }

    #[test]
    fn the_embedded_kernel_maps_its_whole_pages_and_reads_as_a_copy() {
        let image = Image::read(&KernelImage::Embedded).unwrap();
        let mem = ram();
        let loaded = image.load_into(&mem, false).unwrap();
        // .text, .rodata and .data: most of the image's pages.
        assert_eq!(loaded.mapped, whole_pages(EMBEDDED_KERNEL));
        assert!(loaded.mapped >= 64 << 10, "{loaded:?}");
        assert_eq!(loaded, Loaded { mapped: loaded.mapped, ..copied(&image).1 });
        assert_same_as_copy(&image, &mem);
    }

    /// An image read from `path` whose pages are mapped from that file, as
    /// the embedded kernel's are from the running binary.
    fn mapped_from(path: &std::path::Path) -> Image {
        let (file, bytes) = read_file(path).unwrap();
        check_elf(&bytes).unwrap();
        Image { bytes: bytes.into(), name: path.display().to_string(), source: Source::File(Cell::new(Some(file))) }
    }

    #[test]
    fn a_kernel_file_given_with_kernel_is_copied_not_mapped() {
        let image = Image::read(&KernelImage::File(EMBEDDED_KERNEL_PATH.into())).unwrap();
        let mem = ram();
        assert_eq!(image.load_into(&mem, false).unwrap().mapped, 0);
        assert_same_as_copy(&image, &mem);
    }

    #[test]
    fn a_mapped_file_maps_its_whole_pages_and_reads_as_a_copy() {
        let image = mapped_from(EMBEDDED_KERNEL_PATH.as_ref());
        let mem = ram();
        let loaded = image.load_into(&mem, false).unwrap();
        assert_eq!(loaded.mapped, whole_pages(&image.bytes));
        assert_same_as_copy(&image, &mem);
        // The file is handed out once: loading again copies.
        assert_eq!(image.load_into(&ram(), false).unwrap().mapped, 0);
    }

    #[test]
    fn a_guest_write_to_a_mapped_page_changes_neither_the_file_nor_another_vm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::copy(EMBEDDED_KERNEL_PATH, &path).unwrap();
        let load = || {
            let image = mapped_from(&path);
            let mem = ram();
            assert!(image.load_into(&mem, false).unwrap().mapped > 0);
            mem
        };
        let (a, b) = (load(), load());
        let at = GuestAddress(HIMEM_START + PAGE); // inside .text, mapped
        let before: u64 = b.read_obj(at).unwrap();
        a.write_obj(!before, at).unwrap();
        assert_eq!(a.read_obj::<u64>(at).unwrap(), !before, "the guest reads what it wrote");
        assert_eq!(b.read_obj::<u64>(at).unwrap(), before, "another VM's copy is its own");
        assert_eq!(std::fs::read(&path).unwrap(), EMBEDDED_KERNEL, "the file is never written");
    }

    #[test]
    fn huge_pages_and_bytes_without_a_file_are_copied() {
        let image = Image::read(&KernelImage::Embedded).unwrap();
        let (mem, loaded) = copied(&image);
        assert_eq!(loaded.entry, image.load_into(&ram(), false).unwrap().entry);
        assert_same_as_copy(&image, &mem);
        let bytes = Image::from_bytes(EMBEDDED_KERNEL.to_vec(), "bytes");
        let mem = ram();
        assert_eq!(bytes.load_into(&mem, false).unwrap().mapped, 0);
        assert_same_as_copy(&bytes, &mem);
    }

    #[test]
    fn a_file_changed_after_it_was_read_is_copied_as_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::copy(EMBEDDED_KERNEL_PATH, &path).unwrap();
        let image = mapped_from(&path);
        // Rewritten in place (same inode) between reading and loading.
        let mut changed = EMBEDDED_KERNEL.to_vec();
        let last = changed.len() - 1;
        for b in &mut changed[0x1000..last] {
            *b = !*b;
        }
        std::fs::write(&path, &changed).unwrap();
        let mem = ram();
        assert_eq!(image.load_into(&mem, false).unwrap().mapped, 0, "the mapped bytes are checked");
        assert_same_as_copy(&image, &mem);
    }

    #[test]
    fn a_segment_whose_offset_is_not_page_congruent_is_copied_alone() {
        // The first segment's file bytes moved to the end of the image, at an
        // offset 8 bytes past a page boundary: it cannot be mapped, the
        // others still are.
        let mut bytes = EMBEDDED_KERNEL.to_vec();
        let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
        let first = plan(&bytes, &ram()).unwrap().segments[0];
        let h = (0..usize::from(u16::from_le_bytes([bytes[0x38], bytes[0x39]])))
            .map(|i| phoff + i * 56)
            .find(|&h| bytes[h] == 1)
            .unwrap();
        let moved = bytes.len().next_multiple_of(PAGE as usize) + 8;
        let data = bytes[first.offset as usize..(first.offset + first.filesz) as usize].to_vec();
        bytes.resize(moved, 0);
        bytes.extend_from_slice(&data);
        bytes[h + 8..h + 16].copy_from_slice(&(moved as u64).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, &bytes).unwrap();
        let image = mapped_from(&path);
        let mem = ram();
        let first_pages = plan(EMBEDDED_KERNEL, &ram()).unwrap().runs[0].len;
        assert_eq!(image.load_into(&mem, false).unwrap().mapped, whole_pages(EMBEDDED_KERNEL) - first_pages);
        assert_same_as_copy(&image, &mem);
    }

    #[test]
    fn unusual_layouts_have_no_plan() {
        let mem = ram();
        assert!(plan(EMBEDDED_KERNEL, &mem).is_some());
        // Too little RAM for the segments.
        let small = crate::memory::create_ram(&[(GuestAddress(0), 1 << 20)], false).unwrap();
        assert!(plan(EMBEDDED_KERNEL, &small).is_none());
        let mut img = EMBEDDED_KERNEL.to_vec();
        img[0x36] = 55; // program header size
        assert!(plan(&img, &mem).is_none());
        let mut img = EMBEDDED_KERNEL.to_vec();
        img[0x18..0x20].copy_from_slice(&0x1000u64.to_le_bytes()); // entry below 1 MiB
        assert!(plan(&img, &mem).is_none());
        // The second segment moved onto the first.
        let mut img = EMBEDDED_KERNEL.to_vec();
        let phoff = u64::from_le_bytes(img[0x20..0x28].try_into().unwrap()) as usize;
        img[phoff + 56 + 0x18..phoff + 56 + 0x20].copy_from_slice(&HIMEM_START.to_le_bytes());
        assert!(plan(&img, &mem).is_none());
        // The embedded kernel loaded from such an image still loads (copied).
        let image = Image::from_bytes(img, "overlapping");
        assert_eq!(image.load_into(&mem, false).unwrap().mapped, 0);
    }

    /// The file offset of the embedded kernel's `PT_NOTE` header and of its
    /// ring-3 entry record (past the 12-byte note header and the padded name).
    fn note_offsets(image: &[u8]) -> (usize, usize) {
        let phoff = u64::from_le_bytes(image[0x20..0x28].try_into().unwrap()) as usize;
        let count = usize::from(u16::from_le_bytes([image[0x38], image[0x39]]));
        let h = (0..count).map(|i| phoff + i * 56).find(|&h| image[h] == 4).expect("a PT_NOTE header");
        let offset = u64::from_le_bytes(image[h + 8..h + 16].try_into().unwrap()) as usize;
        assert_eq!(&image[offset + 12..offset + 21], entry_note::NOTE_NAME);
        (h, offset + 24)
    }

    /// The embedded kernel with its ring-3 entry record changed by `f`.
    fn with_record(f: impl FnOnce(&mut Ring3Entry)) -> Image {
        let mut bytes = EMBEDDED_KERNEL.to_vec();
        let (_, at) = note_offsets(&bytes);
        let mut e = Ring3Entry::decode(&bytes[at..at + entry_note::ENTRY_SIZE]).unwrap();
        f(&mut e);
        bytes[at..at + entry_note::ENTRY_SIZE].copy_from_slice(&e.to_bytes());
        Image::from_bytes(bytes, "patched")
    }

    #[test]
    fn the_embedded_kernel_publishes_a_valid_ring3_entry() {
        let image = Image::read(&KernelImage::Embedded).unwrap();
        let e = image.ring3_entry().unwrap();
        let elf_entry = u64::from_le_bytes(EMBEDDED_KERNEL[0x18..0x20].try_into().unwrap());
        assert!(e.entry > elf_entry, "past `_start`'s ring-0 prologue: {e:x?}");
        assert_eq!((e.user_cs & 3, e.user_ss & 3, e.tss_selector), (3, 3, 0x28));
        let segments = image.segments();
        for addr in [e.entry, e.cr3, e.gdt_base, e.idt_base, e.tss_base, e.stack_top - 1, e.rsp0 - 1] {
            assert!(segments.iter().any(|&(s, end)| (s..end).contains(&addr)), "{addr:#x}");
        }
        // The note does not stop the kernel's pages being mapped, and
        // `linux-loader` (Firecracker's loader too) reads past it: no PVH entry.
        assert!(plan(EMBEDDED_KERNEL, &ram()).is_some());
        let loaded = Elf::load(&ram(), None, &mut Cursor::new(EMBEDDED_KERNEL), Some(GuestAddress(HIMEM_START))).unwrap();
        assert_eq!(loaded.pvh_boot_cap, linux_loader::loader::elf::PvhBootCapability::PvhEntryNotPresent);
    }

    #[test]
    fn a_bad_or_missing_ring3_entry_note_is_refused() {
        use Ring3EntryError as E;
        let bad = |f: fn(&mut Ring3Entry)| with_record(f).ring3_entry().unwrap_err();
        assert_eq!(bad(|e| e.version = 2), E::Record(EntryNoteError::BadVersion(2)));
        assert_eq!(bad(|e| e.magic = 0), E::Record(EntryNoteError::BadMagic(0)));
        assert_eq!(bad(|e| e.size = 8), E::Record(EntryNoteError::BadSize(8)));
        // Addresses outside the image, or in the wrong kind of segment.
        assert!(matches!(bad(|e| e.entry = 0x1000), E::Outside { what: "entry", .. }));
        assert!(matches!(bad(|e| e.entry = e.gdt_base), E::Outside { what: "entry", .. }), "not executable");
        assert!(matches!(bad(|e| e.cr3 = !0xfff), E::Outside { what: "page table", .. }));
        assert!(matches!(bad(|e| e.gdt_base = u64::MAX - 7), E::Outside { what: "GDT", .. }), "wraps");
        assert!(matches!(bad(|e| e.tss_base = 0x8000_0000), E::Outside { what: "TSS", .. }));
        assert!(matches!(bad(|e| e.stack_top = 0), E::Outside { .. }));
        assert!(matches!(bad(|e| e.rsp0 = 0x10), E::Outside { .. }));
        // Alignment and limits.
        assert!(matches!(bad(|e| e.cr3 += 8), E::Misaligned { what: "page table", .. }));
        assert!(matches!(bad(|e| e.stack_top -= 8), E::Misaligned { .. }));
        assert!(matches!(bad(|e| e.gdt_limit = 0x10), E::Invalid { what: "GDT limit", .. }));
        assert!(matches!(bad(|e| e.idt_limit = 0x7), E::Invalid { what: "IDT limit", .. }));
        assert!(matches!(bad(|e| e.tss_limit = 50), E::Invalid { what: "TSS limit", .. }));
        // Selectors: privilege, table, inside the GDT, apart from the TSS.
        assert!(matches!(bad(|e| e.user_cs = 0x20), E::Invalid { what: "user code selector", .. }));
        assert!(matches!(bad(|e| e.user_ss = 0x1f), E::Invalid { what: "user data selector", .. }), "LDT");
        assert!(matches!(bad(|e| e.user_ss = 0x3), E::Invalid { .. }), "null");
        assert!(matches!(bad(|e| e.tss_selector = e.gdt_limit & !7), E::Invalid { what: "TSS selector", .. }));
        assert!(matches!(bad(|e| e.tss_selector = (e.user_cs & !7) - 8), E::Invalid { what: "TSS selector", .. }));
        // A truncated note, a note past the end of the image, no note.
        let (h, at) = note_offsets(EMBEDDED_KERNEL);
        let mut img = EMBEDDED_KERNEL.to_vec();
        img[h + 0x20..h + 0x28].copy_from_slice(&40u64.to_le_bytes()); // p_filesz: the record cut short
        assert_eq!(Image::from_bytes(img.clone(), "cut").ring3_entry().unwrap_err(), E::MalformedNotes);
        assert!(plan(&img, &ram()).is_none(), "linux-loader decides about a malformed note");
        img[h + 8..h + 16].copy_from_slice(&(EMBEDDED_KERNEL.len() as u64 - 8).to_le_bytes());
        assert_eq!(Image::from_bytes(img.clone(), "past").ring3_entry().unwrap_err(), E::MalformedNotes);
        // A descriptor shorter than the record (n_descsz and p_filesz cut).
        let mut img = EMBEDDED_KERNEL.to_vec();
        img[at - 20..at - 16].copy_from_slice(&(entry_note::ENTRY_SIZE as u32 - 8).to_le_bytes());
        let filesz = u64::from_le_bytes(img[h + 0x20..h + 0x28].try_into().unwrap());
        img[h + 0x20..h + 0x28].copy_from_slice(&(filesz - 8).to_le_bytes());
        let short = Image::from_bytes(img, "short").ring3_entry();
        assert_eq!(short, Err(E::Record(EntryNoteError::BadSize(entry_note::ENTRY_SIZE - 8))));
        let mut img = EMBEDDED_KERNEL.to_vec();
        img[h..h + 4].copy_from_slice(&0u32.to_le_bytes()); // PT_NULL
        assert_eq!(Image::from_bytes(img, "none").ring3_entry().unwrap_err(), E::Missing);
        let mut img = EMBEDDED_KERNEL.to_vec();
        img[at - 12..at - 3].copy_from_slice(b"MVMGUESS\0");
        assert_eq!(Image::from_bytes(img, "other").ring3_entry().unwrap_err(), E::Missing);
    }

    #[test]
    fn notes_are_walked_without_trusting_their_sizes() {
        let note = |namesz: u32, descsz: u32, body: &[u8]| {
            let mut n = [namesz.to_le_bytes(), descsz.to_le_bytes(), 7u32.to_le_bytes()].concat();
            n.extend_from_slice(body);
            n
        };
        let two = [note(4, 5, b"Xen\0abcde\0\0\0"), note(2, 0, b"ab\0\0")].concat();
        let walked = notes(&two).unwrap();
        assert_eq!(walked.len(), 2);
        assert_eq!((walked[0].name, walked[0].desc, walked[1].name), (&b"Xen\0"[..], &b"abcde"[..], &b"ab"[..]));
        for bad in [note(u32::MAX, 0, b""), note(4, u32::MAX, b"abcd"), note(0, 0, b"")[..11].to_vec()] {
            assert_eq!(notes(&bad), None);
        }
        // A PVH note goes to linux-loader (which reads it), not the mapped plan.
        let (_, at) = note_offsets(EMBEDDED_KERNEL);
        let mut img = EMBEDDED_KERNEL.to_vec();
        img[at - 20..at - 16].copy_from_slice(&4u32.to_le_bytes());
        img[at - 12..at - 8].copy_from_slice(b"Xen\0");
        assert!(plan(&img, &ram()).is_none());
    }
}

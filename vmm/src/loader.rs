//! The kernel image: the guest built into this binary or an ELF file, checked
//! to be an x86-64 executable and loaded into guest memory with
//! `linux-loader`.

use crate::arch::layout::HIMEM_START;
use crate::config::{open_kernel_image, KernelImage, KernelImageError, MAX_KERNEL_IMAGE_BYTES};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::borrow::Cow;
use std::io::{Cursor, Read};
use std::path::PathBuf;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest kernel built from `guest-kernel/`, embedded at build time.
pub static EMBEDDED_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_PATH"));

/// Where the build left the embedded kernel's ELF file (tests boot it as a file).
pub const EMBEDDED_KERNEL_PATH: &str = env!("GUEST_KERNEL_PATH");

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
}

impl LoadError {
    /// Whether the image the user named is at fault (rather than the host).
    pub fn is_usage(&self) -> bool {
        matches!(self, LoadError::File(_) | LoadError::Read { .. } | LoadError::NotElf { .. })
    }
}

/// A kernel image in memory, checked to be an x86-64 ELF executable.
pub struct Image {
    bytes: Cow<'static, [u8]>,
    name: String,
}

impl Image {
    /// Reads and checks the image.
    pub fn read(kernel: &KernelImage) -> Result<Image, LoadError> {
        let image = match kernel {
            KernelImage::Embedded => Image { bytes: EMBEDDED_KERNEL.into(), name: "(built-in guest)".into() },
            KernelImage::File(p) => Image { bytes: read_file(p)?.into(), name: p.display().to_string() },
        };
        check_elf(&image.bytes).map_err(|why| LoadError::NotElf { name: image.name.clone(), why })?;
        Ok(image)
    }

    /// An image from bytes already in memory, unchecked (for the fuzzers).
    #[doc(hidden)]
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Image {
        Image { bytes: bytes.into(), name: name.into() }
    }

    /// The guest-physical ranges `[start, end)` its loadable segments occupy
    /// (`PT_LOAD` program headers, by physical address, as they are loaded).
    /// Headers that do not fit in the image are skipped: loading refuses them.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        load_segments(&self.bytes)
    }

    /// Loads the ELF segments into guest memory from 1 MiB up; returns the entry point.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<GuestAddress, LoadError> {
        let loaded = Elf::load(mem, None, &mut Cursor::new(&self.bytes[..]), Some(GuestAddress(HIMEM_START)))
            .map_err(|source| LoadError::Load { name: self.name.clone(), source })?;
        Ok(loaded.kernel_load)
    }
}

/// Reads a kernel file opened by [`open_kernel_image`] (regular, at most
/// [`MAX_KERNEL_IMAGE_BYTES`], never blocking), reading at most one byte past
/// the cap so a file that grows meanwhile is refused, not read forever.
fn read_file(path: &std::path::Path) -> Result<Vec<u8>, LoadError> {
    let (file, len) = open_kernel_image(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_KERNEL_IMAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    if bytes.len() as u64 > MAX_KERNEL_IMAGE_BYTES {
        return Err(KernelImageError::TooLarge { path: path.to_path_buf(), bytes: bytes.len() as u64 }.into());
    }
    Ok(bytes)
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
}

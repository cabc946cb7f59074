//! The kernel image: the guest built into this binary or an ELF file, checked
//! to be an x86-64 executable and loaded into guest memory with
//! `linux-loader`.

use crate::arch::layout::HIMEM_START;
use crate::config::KernelImage;
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::borrow::Cow;
use std::io::Cursor;
use std::path::PathBuf;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest kernel built from `guest-kernel/`, embedded at build time.
pub static EMBEDDED_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_PATH"));

/// Where the build left the embedded kernel's ELF file (tests boot it as a file).
pub const EMBEDDED_KERNEL_PATH: &str = env!("GUEST_KERNEL_PATH");

/// Why the kernel image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
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
        matches!(self, LoadError::Read { .. } | LoadError::NotElf { .. })
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
            KernelImage::File(p) => Image {
                bytes: std::fs::read(p).map_err(|source| LoadError::Read { path: p.clone(), source })?.into(),
                name: p.display().to_string(),
            },
        };
        check_elf(&image.bytes).map_err(|why| LoadError::NotElf { name: image.name.clone(), why })?;
        Ok(image)
    }

    /// Loads the ELF segments into guest memory from 1 MiB up; returns the entry point.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<GuestAddress, LoadError> {
        let loaded = Elf::load(mem, None, &mut Cursor::new(&self.bytes[..]), Some(GuestAddress(HIMEM_START)))
            .map_err(|source| LoadError::Load { name: self.name.clone(), source })?;
        Ok(loaded.kernel_load)
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
    fn a_missing_file_names_its_path_once() {
        let e = Image::read(&KernelImage::File("/nonexistent/vmlinux".into())).err().unwrap();
        assert!(e.is_usage());
        assert_eq!(e.to_string(), "cannot read kernel image /nonexistent/vmlinux");
    }
}

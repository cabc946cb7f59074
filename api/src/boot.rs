//! `PUT /boot-source`: which kernel to boot and its command line.
//!
//! Firecracker's `BootSource`, with `kernel_image_path` optional: without it
//! the VMM boots the guest kernel built into it. `boot_args` are appended to
//! the arguments the VMM derives from the machine configuration
//! (`memmap_init=`, `cpl=`, ...). `initrd_path` is accepted as a field but
//! refused if set: this VMM loads no initrd. A `PUT` replaces the whole boot
//! source. [`BootSource::validate`] checks the fields; the VMM checks at the
//! `PUT`, as Firecracker does, that the kernel file is a readable regular
//! file.

use serde::{Deserialize, Serialize};

/// Longest command line accepted, in bytes (x86 Linux `COMMAND_LINE_SIZE`,
/// less room for the arguments the VMM adds).
pub const MAX_BOOT_ARGS_LEN: usize = 1024;

/// The body of `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of an ELF (or bzImage) kernel; absent: the built-in kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_image_path: Option<String>,
    /// Extra kernel command-line arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Firecracker's initrd; refused unless `null` (no initrd support).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// Why a boot source was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BootSourceError {
    /// `kernel_image_path` is `""`.
    #[error(
        "kernel_image_path is empty; give a host path, or leave it out to boot the built-in kernel"
    )]
    EmptyKernelPath,
    /// `boot_args` too long.
    #[error("boot_args is {0} bytes long; at most {MAX_BOOT_ARGS_LEN} are accepted")]
    BootArgsTooLong(usize),
    /// `boot_args` holds a NUL or another control character.
    #[error("boot_args must be printable text without control characters (found {0:?})")]
    BootArgsControlChar(char),
    /// `initrd_path` was given.
    #[error("initrd_path is not supported by this VMM: it boots an ELF kernel without an initrd; leave initrd_path out")]
    InitrdUnsupported,
}

impl BootSource {
    /// Checks the fields; the file itself is checked by the VMM.
    pub fn validate(&self) -> Result<(), BootSourceError> {
        if self.initrd_path.is_some() {
            return Err(BootSourceError::InitrdUnsupported);
        }
        if self.kernel_image_path.as_deref() == Some("") {
            return Err(BootSourceError::EmptyKernelPath);
        }
        if let Some(args) = &self.boot_args {
            if args.len() > MAX_BOOT_ARGS_LEN {
                return Err(BootSourceError::BootArgsTooLong(args.len()));
            }
            if let Some(c) = args.chars().find(|c| c.is_control()) {
                return Err(BootSourceError::BootArgsControlChar(c));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_fields_optional() {
        let b: BootSource = serde_json::from_str("{}").unwrap();
        assert_eq!(b, BootSource::default());
        b.validate().unwrap();
        let b: BootSource =
            serde_json::from_str(r#"{"kernel_image_path":"/k.elf","boot_args":"quiet"}"#).unwrap();
        assert_eq!(b.kernel_image_path.as_deref(), Some("/k.elf"));
        b.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<BootSource>(r#"{"initrd":"/x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `initrd`"), "{err}");
        let b: BootSource = serde_json::from_str(r#"{"initrd_path":"/x"}"#).unwrap();
        assert_eq!(b.validate(), Err(BootSourceError::InitrdUnsupported));
        let b: BootSource = serde_json::from_str(r#"{"kernel_image_path":"/k","initrd_path":null}"#).unwrap();
        b.validate().unwrap();
    }

    #[test]
    fn validation() {
        let b = BootSource {
            kernel_image_path: Some(String::new()),
            boot_args: None,
            initrd_path: None,
        };
        assert_eq!(b.validate(), Err(BootSourceError::EmptyKernelPath));
        let b = BootSource {
            kernel_image_path: None,
            boot_args: Some("a".repeat(1025)),
            initrd_path: None,
        };
        assert_eq!(
            b.validate().unwrap_err().to_string(),
            "boot_args is 1025 bytes long; at most 1024 are accepted"
        );
        let b = BootSource {
            kernel_image_path: None,
            boot_args: Some("a\nb".into()),
            initrd_path: None,
        };
        assert_eq!(
            b.validate(),
            Err(BootSourceError::BootArgsControlChar('\n'))
        );
    }
}

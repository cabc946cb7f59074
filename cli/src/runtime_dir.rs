//! Where a VM's control socket goes when no `--api-sock` names one: the
//! runtime directory ([`resolve`]), with one socket per VM named after the
//! VM's id ([`VmId`]), so that the operator's tools find every VM there.
//!
//! The directory is, first found: `--runtime-dir`, `$VMM_RUNTIME_DIR`,
//! `$XDG_RUNTIME_DIR/vmm`, `/run/vmm` for root, `$TMPDIR/vmm-$UID` (`/tmp`
//! when `TMPDIR` is unset). It is created with mode 0700 ([`create`]).

use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The environment variable that names the runtime directory.
pub const ENV: &str = "VMM_RUNTIME_DIR";

/// Longest id.
pub const MAX_ID_LEN: usize = 64;

/// A VM's name: 1 to 64 of `A-Z a-z 0-9 _ . -`, not `.` or `..` (it names a
/// file in the runtime directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmId(String);

/// Why a string is not a [`VmId`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmIdError {
    /// Empty or over 64 bytes.
    #[error("an id is 1 to {MAX_ID_LEN} characters long (got {0})")]
    Length(usize),
    /// A character outside the set.
    #[error("an id takes only A-Z, a-z, 0-9, '_', '.' and '-' (got {0:?})")]
    Character(char),
    /// `.` or `..`.
    #[error("an id cannot be {0:?}")]
    Dots(String),
}

impl VmId {
    /// `vmm-<pid>`, the id of a VM not given one.
    pub fn of_this_process() -> VmId {
        VmId(format!("vmm-{}", std::process::id()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VmId {
    type Err = VmIdError;

    fn from_str(s: &str) -> Result<VmId, VmIdError> {
        if s.is_empty() || s.len() > MAX_ID_LEN {
            return Err(VmIdError::Length(s.len()));
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c))) {
            return Err(VmIdError::Character(c));
        }
        if s == "." || s == ".." {
            return Err(VmIdError::Dots(s.to_string()));
        }
        Ok(VmId(s.to_string()))
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the runtime directory is chosen from (the process's, in
/// [`Sources::of_this_process`]; tests make up their own).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `--runtime-dir`.
    pub flag: Option<PathBuf>,
    /// `$VMM_RUNTIME_DIR`.
    pub env_dir: Option<OsString>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg: Option<OsString>,
    /// `$TMPDIR`.
    pub tmpdir: Option<OsString>,
    /// The effective user id.
    pub euid: u32,
}

impl Sources {
    /// The flag, with this process's environment and user.
    pub fn of_this_process(flag: Option<PathBuf>) -> Sources {
        let set = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        Sources {
            flag,
            env_dir: set(ENV),
            xdg: set("XDG_RUNTIME_DIR"),
            tmpdir: set("TMPDIR"),
            // SAFETY: geteuid has no preconditions and cannot fail.
            euid: unsafe { libc::geteuid() },
        }
    }
}

/// The runtime directory these sources choose.
pub fn resolve(s: &Sources) -> PathBuf {
    if let Some(dir) = &s.flag {
        return dir.clone();
    }
    if let Some(dir) = &s.env_dir {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = &s.xdg {
        return Path::new(xdg).join("vmm");
    }
    if s.euid == 0 {
        return PathBuf::from("/run/vmm");
    }
    let tmp = s.tmpdir.clone().unwrap_or_else(|| "/tmp".into());
    Path::new(&tmp).join(format!("vmm-{}", s.euid))
}

/// Why the runtime directory could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the runtime directory {}", path.display())]
pub struct CreateRuntimeDirError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist.
pub fn create(dir: &Path) -> Result<(), CreateRuntimeDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CreateRuntimeDirError { path: dir.to_path_buf(), source })
}

/// The socket of VM `id` in `dir`.
pub fn socket_path(dir: &Path, id: &VmId) -> PathBuf {
    dir.join(id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ids_are_checked() {
        assert_eq!("web-1.a_b".parse::<VmId>().unwrap().as_str(), "web-1.a_b");
        assert_eq!("a".repeat(64).parse::<VmId>().unwrap().as_str().len(), 64);
        assert_eq!("".parse::<VmId>(), Err(VmIdError::Length(0)));
        assert_eq!("a".repeat(65).parse::<VmId>(), Err(VmIdError::Length(65)));
        assert_eq!("a/b".parse::<VmId>(), Err(VmIdError::Character('/')));
        assert_eq!("é".parse::<VmId>(), Err(VmIdError::Character('é')));
        assert_eq!("a b".parse::<VmId>(), Err(VmIdError::Character(' ')));
        assert!(matches!("..".parse::<VmId>(), Err(VmIdError::Dots(_))));
        assert!(matches!(".".parse::<VmId>(), Err(VmIdError::Dots(_))));
        assert_eq!(VmId::of_this_process().to_string(), format!("vmm-{}", std::process::id()));
    }

    #[test]
    fn the_directory_is_the_first_source_set() {
        let mut s = Sources {
            flag: Some("/f".into()),
            env_dir: Some("/e".into()),
            xdg: Some("/x".into()),
            tmpdir: Some("/t".into()),
            euid: 1000,
        };
        assert_eq!(resolve(&s), Path::new("/f"));
        s.flag = None;
        assert_eq!(resolve(&s), Path::new("/e"));
        s.env_dir = None;
        assert_eq!(resolve(&s), Path::new("/x/vmm"));
        s.xdg = None;
        assert_eq!(resolve(&s), Path::new("/t/vmm-1000"));
        s.tmpdir = None;
        assert_eq!(resolve(&s), Path::new("/tmp/vmm-1000"));
        s.euid = 0;
        assert_eq!(resolve(&s), Path::new("/run/vmm"));
    }

    #[test]
    fn the_directory_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/vmm");
        create(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Again: it exists.
        create(&dir).unwrap();
        let id: VmId = "vm0".parse().unwrap();
        assert_eq!(socket_path(&dir, &id), dir.join("vm0"));
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(create(&file.join("x")).is_err());
    }
}

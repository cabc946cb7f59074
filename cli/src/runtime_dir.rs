//! Where a VM's control socket goes when no `--api-sock` names one: the
//! runtime directory ([`resolve`]), with one socket per VM named after the
//! VM's id ([`VmId`]), so that the operator's tools find every VM there.
//!
//! The directory is, first found: `--runtime-dir`, `$VMM_RUNTIME_DIR`,
//! `$XDG_RUNTIME_DIR/vmm`, `/run/vmm` for root, `$TMPDIR/vmm-$UID` (`/tmp`
//! when `TMPDIR` is unset). It is created with mode 0700 ([`create`]).

use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
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

/// Why the runtime directory could not be made, or cannot be trusted with
/// the VMs' sockets.
#[derive(Debug, thiserror::Error)]
pub enum CreateRuntimeDirError {
    /// It could not be created (a file is in the way, no permission, ...).
    #[error("cannot create the runtime directory {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// It could not be examined after creating it.
    #[error("cannot check the runtime directory {}", path.display())]
    Check {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// It is a symbolic link: the sockets would go wherever it points.
    #[error("the runtime directory {} is a symbolic link; name a real directory", .0.display())]
    Symlink(PathBuf),
    /// Another user owns it, and could replace the sockets in it.
    #[error("the runtime directory {} belongs to user {owner}, not to this user ({euid}); choose another one", path.display())]
    NotOwned { path: PathBuf, owner: u32, euid: u32 },
    /// Other users may write in it, and could replace the sockets in it.
    #[error("the runtime directory {} is writable by other users (mode {mode:o}); chmod go-w it or choose another one", path.display())]
    OpenToOthers { path: PathBuf, mode: u32 },
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist,
/// then checks that it is fit to hold sockets: a real directory (not a
/// symbolic link), owned by this user, that no other user may write in.
pub fn create(dir: &Path) -> Result<(), CreateRuntimeDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CreateRuntimeDirError::Create { path: dir.to_path_buf(), source })?;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|source| CreateRuntimeDirError::Check { path: dir.to_path_buf(), source })?;
    if meta.file_type().is_symlink() {
        return Err(CreateRuntimeDirError::Symlink(dir.to_path_buf()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(CreateRuntimeDirError::NotOwned { path: dir.to_path_buf(), owner: meta.uid(), euid });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(CreateRuntimeDirError::OpenToOthers { path: dir.to_path_buf(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
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
        assert!(matches!(create(&file), Err(CreateRuntimeDirError::Create { .. })));
    }

    #[test]
    fn a_symlink_or_a_directory_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        create(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = create(&link).unwrap_err();
        assert!(matches!(e, CreateRuntimeDirError::Symlink(_)), "{e}");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = create(&real).unwrap_err();
        assert!(e.to_string().contains("writable by other users (mode 777)"), "{e}");
        // Readable by others is fine: only the owner can replace a socket.
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        create(&real).unwrap();
    }
}

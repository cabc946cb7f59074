//! The API socket file: claiming its path (refusing a non-socket or a live
//! server, replacing a stale socket), binding it private to the VMM's user,
//! and removing it on exit only if it is still the one we bound.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};

/// Mode of the socket file: only the VMM's user may connect.
pub const SOCKET_MODE: u32 = 0o600;

/// Largest socket path (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Why the socket path could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The path does not fit in a Unix socket address.
    #[error("API socket path {0:?} is longer than {MAX_SOCKET_PATH_BYTES} bytes; choose a shorter --api-sock")]
    PathTooLong(PathBuf),
    /// The directory the socket would go in does not exist.
    #[error("cannot create API socket {0:?}: directory {1:?} does not exist")]
    NoParentDir(PathBuf, PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0:?} exists and is not a socket; remove it or choose another --api-sock")]
    NotASocket(PathBuf),
    /// A live server answers on the path.
    #[error("another VMM is serving {0:?}; stop it or choose another --api-sock")]
    InUse(PathBuf),
    /// Checking what is at the path failed.
    #[error("cannot check existing API socket {0:?}")]
    Probe(PathBuf, #[source] io::Error),
    /// Removing a stale socket failed.
    #[error("cannot remove stale API socket {0:?}")]
    RemoveStale(PathBuf, #[source] io::Error),
    /// `bind` failed.
    #[error("cannot listen on API socket {0:?}")]
    Bind(PathBuf, #[source] io::Error),
    /// Setting the socket's mode or non-blocking flag failed.
    #[error("cannot set up API socket {0:?}")]
    Setup(PathBuf, #[source] io::Error),
}

/// Device and inode of a socket file we bound.
pub type SocketIdentity = (u64, u64);

/// Claims `path`: refuses a non-socket or a live socket, replaces a stale
/// one, binds, and restricts the file to [`SOCKET_MODE`].
pub fn bind(path: &Path) -> Result<(StdUnixListener, SocketIdentity), SocketError> {
    let owned = || path.to_path_buf();
    if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        return Err(SocketError::PathTooLong(owned()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(SocketError::NoParentDir(owned(), parent.to_path_buf()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match StdUnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| SocketError::RemoveStale(owned(), e))?
            }
            Err(e) => return Err(SocketError::Probe(owned(), e)),
        },
        Ok(_) => return Err(SocketError::NotASocket(owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(SocketError::Probe(owned(), e)),
    }
    let listener = StdUnixListener::bind(path).map_err(|e| SocketError::Bind(owned(), e))?;
    // Between bind and chmod the file has the umask's mode for a moment;
    // the directory holding it is what guards that window.
    let setup = || -> io::Result<SocketIdentity> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        listener.set_nonblocking(true)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((meta.dev(), meta.ino()))
    };
    match setup() {
        Ok(identity) => Ok((listener, identity)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(SocketError::Setup(owned(), e))
        }
    }
}

/// Removes the socket file at `path` if it is still the one we bound (so we
/// never remove a file someone else put there since).
pub fn remove_if_ours(path: &Path, identity: SocketIdentity) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == identity {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_private_and_removed_only_while_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_l, id) = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, SOCKET_MODE);
        remove_if_ours(&path, id);
        assert!(!path.exists());
        let (_l2, id) = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        remove_if_ours(&path, id);
        assert!(path.exists(), "a file that replaced the socket is kept");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(StdUnixListener::bind(&path).unwrap());
        let (live, _) = bind(&path).expect("stale socket replaced");
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::InUse(_)), "{err}");
        assert!(err.to_string().contains("another VMM is serving"), "{err}");
        drop(live);
    }

    #[test]
    fn regular_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert!(err.to_string().contains("exists and is not a socket; remove it"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn missing_directory_and_long_path_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = bind(&dir.path().join("nope/api.sock")).unwrap_err();
        assert!(matches!(err, SocketError::NoParentDir(..)), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = bind(&dir.path().join("x".repeat(120))).unwrap_err();
        assert!(matches!(err, SocketError::PathTooLong(_)), "{err}");
    }
}

//! The fleet's own memory cgroup: every VM of a density run is started in
//! one child cgroup of the runner's memory cgroup, so the run can read what
//! the host charged to exactly these processes (their memory, and the kernel
//! memory allocated on their behalf: KVM's accounted objects, page tables,
//! kernel stacks), which no other tenant of the host moves, next to the
//! host-wide `MemAvailable` drop, which they do.
//!
//! cgroup v1 (a `memory` hierarchy: `memory.usage_in_bytes`, which includes
//! the kernel memory, and `memory.kmem.usage_in_bytes`) and cgroup v2 (a
//! child where the `memory` controller is enabled: `memory.current`, and
//! `memory.stat`'s `kernel`) are both read. Where neither can be made (no
//! memory controller, not delegated, no permission) the run goes on without
//! it and says why ([`FleetCgroup::create`]'s error).
//!
//! What the cgroup does not see: kernel memory KVM or the kernel allocate
//! without accounting it to a cgroup (some debugfs and per-VM objects), and
//! file pages that another cgroup read first (the `vmm` binary). So its
//! figure is a floor of a VM's host footprint, and a fleet's steady state
//! compared with its fresh state on the same cgroup is exact for what it
//! covers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which cgroup interface the fleet's cgroup is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// Why the fleet has no cgroup of its own.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` could not be read.
    #[error("cannot read {0}: {1}")]
    Proc(&'static str, io::Error),
    /// The runner's cgroup has no memory controller mounted where it can see.
    #[error("no memory cgroup: {0}")]
    NoMemoryController(String),
    /// The child cgroup could not be made or set up.
    #[error("cannot set up the fleet's memory cgroup {0}: {1}")]
    Setup(PathBuf, io::Error),
    /// cgroup v2 without the memory controller delegated to children of the
    /// runner's cgroup.
    #[error("the memory controller is not enabled for children of {0} (cgroup v2; the runner's own cgroup would have to be a leaf with memory in its parent's cgroup.subtree_control)")]
    NotDelegated(PathBuf),
}

/// What the fleet's cgroup holds now, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupMemory {
    /// Everything charged: user and kernel memory.
    pub usage: u64,
    /// Of that, kernel memory (`None` where the interface does not give it).
    pub kernel: Option<u64>,
}

/// The fleet's memory cgroup; removed when dropped (after its processes are
/// gone: `Fleet` drops it last).
#[derive(Debug)]
pub struct FleetCgroup {
    dir: PathBuf,
    version: Version,
    /// `cgroup.procs` of the cgroup, open for the children to write "0" to
    /// between `fork` and `exec` (that moves the writer; it does not need a
    /// PID formatted in the child).
    procs: File,
}

/// One line of `/proc/self/cgroup`: `(controllers, path)`.
fn own_cgroups(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let _id = f.next()?;
            Some((f.next()?, f.next()?))
        })
        .collect()
}

/// A cgroup mount from `/proc/self/mountinfo`: `(root, mount point, fstype,
/// super options)`.
fn cgroup_mounts(text: &str) -> Vec<(String, PathBuf, String, String)> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let (root, point) = (pre.get(3)?, pre.get(4)?);
            let (fstype, opts) = (post.first()?, post.get(2).copied().unwrap_or(""));
            fstype.starts_with("cgroup").then(|| (unescape(root), PathBuf::from(unescape(point)), fstype.to_string(), opts.to_string()))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.len() >= i + 4 && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of the runner's own memory cgroup and its interface, from
/// the texts of `/proc/self/cgroup` and `/proc/self/mountinfo`. v1's memory
/// hierarchy is preferred where both exist (a v2 mount beside it has no
/// memory controller).
fn memory_cgroup_dir(cgroup: &str, mountinfo: &str) -> Result<(PathBuf, Version), CgroupError> {
    let own = own_cgroups(cgroup);
    let mounts = cgroup_mounts(mountinfo);
    let within = |root: &str, point: &Path, path: &str| -> Option<PathBuf> {
        let rest = if root == "/" { path } else { path.strip_prefix(root)? };
        Some(point.join(rest.trim_start_matches('/')))
    };
    if let Some((_, path)) = own.iter().find(|(c, _)| c.split(',').any(|c| c == "memory")) {
        let m = mounts
            .iter()
            .find(|(_, _, t, o)| t == "cgroup" && o.split(',').any(|o| o == "memory"))
            .ok_or_else(|| CgroupError::NoMemoryController("the memory hierarchy (cgroup v1) is not mounted".into()))?;
        let dir = within(&m.0, &m.1, path)
            .ok_or_else(|| CgroupError::NoMemoryController(format!("{path} is outside the mounted memory hierarchy")))?;
        return Ok((dir, Version::V1));
    }
    if let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) {
        let m = mounts
            .iter()
            .find(|(_, _, t, _)| t == "cgroup2")
            .ok_or_else(|| CgroupError::NoMemoryController("cgroup v2 is not mounted".into()))?;
        let dir =
            within(&m.0, &m.1, path).ok_or_else(|| CgroupError::NoMemoryController(format!("{path} is outside the mounted cgroup v2")))?;
        return Ok((dir, Version::V2));
    }
    Err(CgroupError::NoMemoryController("the runner is in no memory cgroup".into()))
}

/// How the runner names its cgroups (and work directories):
/// `vmm-density-<runner's PID>-<suffix>`.
pub const NAME_PREFIX: &str = "vmm-density-";

/// Removes the cgroups under `parent` that a runner left behind: named
/// [`NAME_PREFIX`]`<pid>-…` for a PID that is not alive (`alive`) and not
/// this process. A runner killed with SIGKILL cannot remove its own. Only
/// empty cgroups can be removed (`rmdir` refuses one with tasks), so a live
/// fleet is never touched; failures are ignored.
fn remove_stale(parent: &Path, alive: impl Fn(u32) -> bool) -> Vec<PathBuf> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(parent) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten().take(4096) {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(NAME_PREFIX)).and_then(|r| r.split('-').next()?.parse::<u32>().ok()) else {
            continue;
        };
        if pid != me && !alive(pid) && std::fs::remove_dir(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Reads a file of a few numbers.
fn read_small(path: &Path) -> io::Result<String> {
    let mut s = std::fs::read_to_string(path)?;
    s.truncate(s.trim_end().len());
    Ok(s)
}

fn read_u64(path: &Path) -> io::Result<u64> {
    read_small(path)?.parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

/// v2's kernel memory: `memory.stat`'s `kernel` (Linux 5.18 and later).
fn v2_kernel(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("kernel ")).and_then(|v| v.trim().parse().ok())
}

impl FleetCgroup {
    /// Makes the child cgroup `name` of the runner's memory cgroup.
    pub fn create(name: &str) -> Result<FleetCgroup, CgroupError> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| CgroupError::Proc("/proc/self/cgroup", e))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| CgroupError::Proc("/proc/self/mountinfo", e))?;
        let (parent, version) = memory_cgroup_dir(&cgroup, &mountinfo)?;
        if version == Version::V2 {
            let control = read_small(&parent.join("cgroup.subtree_control")).unwrap_or_default();
            if !control.split(' ').any(|c| c == "memory") {
                return Err(CgroupError::NotDelegated(parent));
            }
        }
        remove_stale(&parent, |pid| Path::new(&format!("/proc/{pid}")).exists());
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(CgroupError::Setup(dir, e)),
        }
        let opened = OpenOptions::new().write(true).open(dir.join("cgroup.procs"));
        let cg = match opened {
            Ok(procs) => FleetCgroup { dir, version, procs },
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(CgroupError::Setup(dir, e));
            }
        };
        // Readable now, or not at all.
        cg.read().map_err(|e| CgroupError::Setup(cg.dir.clone(), e))?;
        Ok(cg)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The descriptor a child writes "0" to, between `fork` and `exec`, to
    /// join the cgroup ([`join_from_child`]).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// What the cgroup holds now.
    pub fn read(&self) -> io::Result<CgroupMemory> {
        match self.version {
            Version::V1 => Ok(CgroupMemory {
                usage: read_u64(&self.dir.join("memory.usage_in_bytes"))?,
                kernel: read_u64(&self.dir.join("memory.kmem.usage_in_bytes")).ok(),
            }),
            Version::V2 => Ok(CgroupMemory {
                usage: read_u64(&self.dir.join("memory.current"))?,
                kernel: std::fs::read_to_string(self.dir.join("memory.stat")).ok().as_deref().and_then(v2_kernel),
            }),
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open
/// as `fd`. Async-signal-safe (one `write`), for `pre_exec`.
pub fn join_from_child(fd: RawFd) -> io::Result<()> {
    // SAFETY: writes one byte from a static buffer to a descriptor the
    // parent opened; no memory is handed to the kernel beyond that byte.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    if n == 1 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

impl Drop for FleetCgroup {
    fn drop(&mut self) {
        // The children are reaped by now; the kernel may take a moment to
        // let go of the last of them (rmdir fails with EBUSY meanwhile).
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
33 25 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 25 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
35 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_memory_hierarchy_is_found_and_preferred_over_a_bare_v2_mount() {
        let cg = "9:pids:/\n4:memory:/process_api/abc\n0::/\n";
        let (dir, v) = memory_cgroup_dir(cg, MOUNTINFO).unwrap();
        assert_eq!((dir, v), (PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"), Version::V1));
    }

    #[test]
    fn v2_is_used_when_it_is_the_only_hierarchy() {
        let mi = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let (dir, v) = memory_cgroup_dir("0::/user.slice/u.scope\n", mi).unwrap();
        assert_eq!((dir, v), (PathBuf::from("/sys/fs/cgroup/user.slice/u.scope"), Version::V2));
    }

    #[test]
    fn a_mount_whose_root_is_the_containers_own_cgroup_is_followed() {
        // Inside a cgroup namespace-less container the mount's root is the
        // container's cgroup and /proc/self/cgroup shows the full path.
        let mi = "33 25 0:28 /docker/x /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let (dir, _) = memory_cgroup_dir("4:memory:/docker/x/inner\n", mi).unwrap();
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/memory/inner"));
        assert!(matches!(memory_cgroup_dir("4:memory:/elsewhere\n", mi), Err(CgroupError::NoMemoryController(_))));
    }

    #[test]
    fn no_memory_controller_is_an_error_that_says_so() {
        let e = memory_cgroup_dir("9:pids:/\n", MOUNTINFO).unwrap_err();
        assert!(e.to_string().contains("no memory cgroup"), "{e}");
        let mi = "34 25 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let e = memory_cgroup_dir("4:memory:/a\n", mi).unwrap_err();
        assert!(e.to_string().contains("not mounted"), "{e}");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
        assert_eq!(unescape("plain"), "plain");
    }

    #[test]
    fn only_empty_cgroups_of_runners_that_are_gone_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let me = std::process::id();
        for n in [format!("{NAME_PREFIX}4242-1f"), format!("{NAME_PREFIX}4243-2e"), format!("{NAME_PREFIX}{me}-3d"), "other-4242".into(), format!("{NAME_PREFIX}x-1")] {
            std::fs::create_dir(parent.path().join(n)).unwrap();
        }
        // 4243 is gone too, but its cgroup still holds something (a
        // directory stands in for a task: rmdir refuses both).
        std::fs::create_dir(parent.path().join(format!("{NAME_PREFIX}4243-2e/child"))).unwrap();
        let removed = remove_stale(parent.path(), |pid| pid == 1);
        assert_eq!(removed, vec![parent.path().join(format!("{NAME_PREFIX}4242-1f"))]);
        let mut left: Vec<String> = std::fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        let mut kept = vec![format!("{NAME_PREFIX}4243-2e"), format!("{NAME_PREFIX}{me}-3d"), format!("{NAME_PREFIX}x-1"), "other-4242".into()];
        kept.sort();
        assert_eq!(left, kept);
        // A live runner's cgroup is kept even when empty.
        std::fs::create_dir(parent.path().join(format!("{NAME_PREFIX}4244-1"))).unwrap();
        assert!(remove_stale(parent.path(), |pid| pid == 4244).is_empty());
    }

    #[test]
    fn v2_kernel_memory_comes_from_memory_stat() {
        assert_eq!(v2_kernel("anon 4096\nfile 0\nkernel 12288\nkernel_stack 16384\n"), Some(12288));
        assert_eq!(v2_kernel("anon 4096\n"), None);
    }
}

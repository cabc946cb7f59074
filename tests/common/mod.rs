//! Helpers shared by the integration tests: run the `vmm` binary with a
//! deadline, capture its output, and make scratch directories.
#![allow(dead_code)]

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// No test VM should live longer than this; a hang fails the test instead of CI.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// What a `vmm` process did.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit code {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

impl Output {
    /// Fails the test unless the process exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "{self}");
    }
}

/// Path of the `vmm` binary under test.
pub fn vmm_path() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// Path of the guest kernel ELF that the `vmm` binary embeds.
pub fn embedded_kernel_path() -> &'static str {
    vmm::loader::EMBEDDED_KERNEL_PATH
}

/// Runs `vmm` with `args`.
pub fn vmm(args: &[&str]) -> Output {
    vmm_env(args, &[])
}

/// Runs `vmm` with `args` and extra environment variables; kills it at the deadline.
pub fn vmm_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(vmm_path());
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start vmm");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().unwrap();
    let stderr = t_err.join().unwrap();
    assert!(status.is_some(), "vmm {args:?} did not finish within {DEADLINE:?}\n{stdout}\n{stderr}");
    Output { code: status.and_then(|s| s.code()), stdout, stderr }
}

/// A scratch directory, `vmm-test-TAG-XXXXXX` under the temporary
/// directory (made by `tempfile`: a fresh name, mode 0700), removed with
/// everything in it when dropped.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = tempfile::Builder::new().prefix(&format!("vmm-test-{tag}-")).tempdir();
        TempDir(dir.unwrap_or_else(|e| panic!("cannot create a scratch directory for {tag}: {e}")))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A `vmm` process serving the API on a socket in its own scratch directory
/// (`--api-sock DIR/SOCK_NAME` is added to its arguments); killed on drop.
pub struct Served {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: TempDir,
}

impl Served {
    /// Starts `vmm ARGS --api-sock ...` and waits until the socket answers.
    pub fn start(tag: &str, sock_name: &str, args: &[&str]) -> Served {
        let dir = TempDir::new(tag);
        let sock = dir.path().join(sock_name);
        let child = Command::new(vmm_path())
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start vmm");
        let s = Served { child, sock, dir };
        wait_for(|| std::os::unix::net::UnixStream::connect(&s.sock).is_ok(), "the API socket");
        s
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait(&mut self) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(start.elapsed() < Duration::from_secs(30), "vmm did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` until it holds; fails the test after 30 s.
pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One API request with curl (at most 30 s): the status (0 if curl got no
/// answer) and the body as JSON (Null if empty, a string if not JSON).
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut c = Command::new("curl");
    c.args(["-s", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"]).arg(sock);
    c.args(["-X", method, &format!("http://localhost{path}")]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = c.output().expect("curl is needed for these tests");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let v = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into()))
    };
    (code.trim().parse().unwrap_or(0), v)
}

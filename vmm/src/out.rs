//! Writes to the process's standard output and standard error (and to the
//! console's host file) that never panic and never block for long.
//!
//! `println!` and `eprintln!` panic when the write fails (EPIPE once the
//! reader went away: Rust ignores SIGPIPE, so the write returns the error),
//! and with `panic = "abort"` that kills the VMM. They also block for as
//! long as a pipe nobody reads stays full. Here every write waits at most a
//! deadline for the descriptor to take data (`poll`), writes at most
//! [`PIPE_BUF`] bytes at a time (a pipe with room takes that much without
//! blocking), and counts what it could not write instead of failing:
//! [`dropped_stdout`] and [`dropped_stderr`] (`GET /metrics`).
//!
//! - [`outln!`](crate::outln) and [`errln!`](crate::errln): a line on stdout or stderr,
//!   waiting up to [`LINE_WAIT`] (the CLI's own messages, the final report).
//! - [`diag`]: a line on stderr that does not wait at all (the controller's
//!   warnings, which a guest can trigger: the event thread never stalls on them).
//!
//! Once a write to a descriptor timed out, later writes to it do not wait
//! until one succeeds again, so a stuck sink costs one [`LINE_WAIT`], not one
//! per line.

use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most bytes written by one `write`: what a pipe takes atomically, and
/// what it takes without blocking once `poll` says it has room.
pub const PIPE_BUF: usize = 4096;

/// How long a line on stdout or stderr waits for a slow reader.
pub const LINE_WAIT: Duration = Duration::from_secs(1);

/// Longest line written; longer ones are cut.
pub const MAX_LINE_BYTES: usize = 1 << 20;

static STDOUT_DROPPED: AtomicU64 = AtomicU64::new(0);
static STDERR_DROPPED: AtomicU64 = AtomicU64::new(0);
static STDOUT_STUCK: AtomicBool = AtomicBool::new(false);
static STDERR_STUCK: AtomicBool = AtomicBool::new(false);

/// Held for each `poll`-then-`write`, so two writers of this process (say the
/// console and a diagnostic, with `2>&1` the same pipe) cannot both see room
/// that only one of them gets.
static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// Why not all bytes were written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The descriptor took no more data before the deadline.
    #[error("the output took only {written} bytes before the deadline")]
    Timeout { written: usize },
    /// The write failed (EPIPE, EIO, ...).
    #[error("write failed after {written} bytes")]
    Failed {
        written: usize,
        #[source]
        source: io::Error,
    },
}

impl WriteError {
    /// Bytes written before the error.
    pub fn written(&self) -> usize {
        match self {
            WriteError::Timeout { written } | WriteError::Failed { written, .. } => *written,
        }
    }
}

/// Waits until `fd` takes data or `deadline` passes; true if it does.
fn wait_writable(fd: RawFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            // POLLERR/POLLHUP: the write itself reports the error.
            return true;
        }
        if n == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Writes all of `bytes` to `fd` unless it takes nothing more until
/// `deadline` (an instant in the past: do not wait at all).
pub fn write_fd(fd: BorrowedFd<'_>, bytes: &[u8], deadline: Instant) -> Result<(), WriteError> {
    let fd = fd.as_raw_fd();
    let mut written = 0;
    while written < bytes.len() {
        if !wait_writable(fd, deadline) {
            return Err(WriteError::Timeout { written });
        }
        let _guard = WRITE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if !wait_writable(fd, Instant::now()) {
            // Another writer took the room; wait again without the lock.
            drop(_guard);
            if Instant::now() >= deadline {
                return Err(WriteError::Timeout { written });
            }
            continue;
        }
        let chunk = &bytes[written..bytes.len().min(written + PIPE_BUF)];
        // SAFETY: `chunk` is valid for reads of its length; `fd` is open
        // for the borrow's lifetime.
        let n = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN) => continue,
                _ => return Err(WriteError::Failed { written, source: e }),
            }
        }
        written += n as usize;
    }
    Ok(())
}

/// One of the process's standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn parts(self) -> (RawFd, &'static AtomicU64, &'static AtomicBool) {
        match self {
            Stream::Stdout => (libc::STDOUT_FILENO, &STDOUT_DROPPED, &STDOUT_STUCK),
            Stream::Stderr => (libc::STDERR_FILENO, &STDERR_DROPPED, &STDERR_STUCK),
        }
    }
}

/// Writes `text` to `stream`, waiting up to `wait` (none if the stream
/// timed out before); counts a line that did not go out whole. True if it did.
pub fn write_stream(stream: Stream, text: &str, wait: Duration) -> bool {
    let (fd, dropped, stuck) = stream.parts();
    let wait = if stuck.load(Ordering::Relaxed) { Duration::ZERO } else { wait };
    let mut end = text.len().min(MAX_LINE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    // SAFETY: the standard descriptors stay open for the whole process.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match write_fd(fd, &text.as_bytes()[..end], Instant::now() + wait) {
        Ok(()) => {
            stuck.store(false, Ordering::Relaxed);
            true
        }
        Err(e) => {
            if matches!(e, WriteError::Timeout { .. }) {
                stuck.store(true, Ordering::Relaxed);
            }
            dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Writes formatted text and a newline to `stream` (see [`write_stream`]).
pub fn line(stream: Stream, args: std::fmt::Arguments<'_>, wait: Duration) -> bool {
    let mut text = String::new();
    let _ = text.write_fmt(args);
    text.push('\n');
    write_stream(stream, &text, wait)
}

/// A line on stderr that does not wait: for diagnostics a guest or client
/// can trigger, written from threads that must not stall.
pub fn diag(args: std::fmt::Arguments<'_>) -> bool {
    line(Stream::Stderr, args, Duration::ZERO)
}

/// Lines (or chunks) not written to stdout.
pub fn dropped_stdout() -> u64 {
    STDOUT_DROPPED.load(Ordering::Relaxed)
}

/// Lines (or chunks) not written to stderr.
pub fn dropped_stderr() -> u64 {
    STDERR_DROPPED.load(Ordering::Relaxed)
}

/// `println!` that never panics and waits at most [`out::LINE_WAIT`](crate::out::LINE_WAIT).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::line($crate::out::Stream::Stdout, format_args!($($arg)*), $crate::out::LINE_WAIT)
    };
}

/// `print!` that never panics and waits at most [`out::LINE_WAIT`](crate::out::LINE_WAIT).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write_stream($crate::out::Stream::Stdout, &format!($($arg)*), $crate::out::LINE_WAIT)
    };
}

/// `eprintln!` that never panics and waits at most [`out::LINE_WAIT`](crate::out::LINE_WAIT).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::line($crate::out::Stream::Stderr, format_args!($($arg)*), $crate::out::LINE_WAIT)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    fn pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
        std::io::pipe().unwrap()
    }

    #[test]
    fn a_full_pipe_times_out_instead_of_blocking() {
        let (_r, w) = pipe();
        let big = vec![b'x'; 1 << 20];
        let start = Instant::now();
        let e = write_fd(w.as_fd(), &big, Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, WriteError::Timeout { .. }), "{e}");
        assert!(e.written() > 0 && e.written() < big.len(), "{}", e.written());
        assert!(start.elapsed() < Duration::from_secs(10), "it blocked");
    }

    #[test]
    fn a_pipe_without_reader_is_an_error_not_a_panic() {
        let (r, w) = pipe();
        drop(r);
        let e = write_fd(w.as_fd(), b"hello\n", Instant::now()).unwrap_err();
        assert!(matches!(e, WriteError::Failed { written: 0, .. }), "{e}");
    }

    #[test]
    fn bytes_reach_a_reader() {
        let (mut r, w) = pipe();
        write_fd(w.as_fd(), b"hello\n", Instant::now()).unwrap();
        let mut buf = [0u8; 16];
        let n = r.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello\n");
    }
}

//! The host files of `PUT /logger` and `PUT /metrics`: opened once, written
//! one line at a time by the controller, never blocking it.
//!
//! A path must name something that exists (a file, a FIFO, a character
//! device such as `/dev/null`); nothing is created, as in Firecracker. It is
//! opened with `O_NONBLOCK` and `O_APPEND`, so a FIFO whose reader is slow
//! makes lines drop (and count) instead of stalling the VM. Every line is at
//! most [`MAX_LINE_BYTES`], so it reaches a FIFO whole or not at all,
//! and a file gets at most [`MAX_OUTPUT_BYTES`].

use api::LogLevel;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest line written, newline included: `PIPE_BUF`, the most a FIFO
/// takes atomically. Longer messages are cut.
pub const MAX_LINE_BYTES: usize = 4096;
/// Most bytes written to one file; later lines are dropped.
pub const MAX_OUTPUT_BYTES: u64 = 16 << 20;

/// Why a log or metrics path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputFileError {
    /// It cannot be opened for writing (missing, a directory, no permission).
    #[error("cannot open {} for writing; it must be an existing file or FIFO", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// It opened, but is not a file, a FIFO or a character device (a block
    /// device, say, whose contents the lines would overwrite).
    #[error("{} is not a regular file, a FIFO or a character device", path.display())]
    Kind { path: PathBuf },
}

/// An open log or metrics file.
#[derive(Debug)]
pub(super) struct HostOutput {
    file: File,
    written: u64,
}

impl HostOutput {
    /// Opens `path` for writing without creating it. A FIFO with no
    /// reader yet is opened read-write, so the open does not fail and
    /// lines wait in the pipe until a reader comes (or drop when full).
    pub(super) fn open(path: &Path) -> Result<HostOutput, OutputFileError> {
        let open = |read| {
            OpenOptions::new()
                .read(read)
                .append(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
        };
        let file = match open(false) {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => open(true),
            other => other,
        }
        .map_err(|source| OutputFileError::Open { path: path.into(), source })?;
        // What was opened, not what the path named a moment before (it may
        // have been swapped since): only a file, a FIFO or a character device.
        let kind = file
            .metadata()
            .map_err(|source| OutputFileError::Open { path: path.into(), source })?
            .file_type();
        if !(kind.is_file() || kind.is_fifo() || kind.is_char_device()) {
            return Err(OutputFileError::Kind { path: path.into() });
        }
        Ok(HostOutput { file, written: 0 })
    }

    /// Writes `text` and a newline in one `write`, cut to
    /// [`MAX_LINE_BYTES`]. False if the line was dropped: the file
    /// would block, failed, took only part, or is at its cap.
    pub(super) fn write_line(&mut self, text: &str) -> bool {
        let mut end = text.len().min(MAX_LINE_BYTES - 1);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut line = Vec::with_capacity(end + 1);
        line.extend_from_slice(&text.as_bytes()[..end]);
        line.push(b'\n');
        if self.written + line.len() as u64 > MAX_OUTPUT_BYTES {
            return false;
        }
        match self.file.write(&line) {
            Ok(n) => {
                self.written += n as u64;
                n == line.len()
            }
            Err(_) => false,
        }
    }
}

/// The log of `PUT /logger`: its configuration, its file, and how many
/// lines it dropped.
#[derive(Debug, Default)]
pub(super) struct HostLog {
    config: Option<api::Logger>,
    out: Option<HostOutput>,
    dropped: u64,
}

impl HostLog {
    /// Uses `config` and `out` from now on (replacing any earlier ones).
    pub(super) fn configure(&mut self, config: api::Logger, out: Option<HostOutput>) {
        self.config = Some(config);
        self.out = out;
    }

    /// The configuration of `PUT /logger`, if one was given.
    pub(super) fn config(&self) -> Option<&api::Logger> {
        self.config.as_ref()
    }

    /// Lines not written.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes one line, Firecracker's way:
    /// `TIMESTAMP [ID:THREAD(:LEVEL)(:FILE:LINE)] message`. Without a
    /// file, warnings and errors go to standard error as `vmm: message`,
    /// without waiting ([`crate::out::diag`]); a line stderr does not take
    /// is dropped and counted.
    pub(super) fn line(
        &mut self,
        id: &str,
        level: LogLevel,
        module: &str,
        file: &str,
        line: u32,
        msg: std::fmt::Arguments<'_>,
    ) {
        let config = self.config.clone().unwrap_or_default();
        let Some(out) = self.out.as_mut() else {
            // Not waiting: a guest can trigger warnings, and a stderr that
            // nobody reads must not stall the controller.
            if level.enabled_at(LogLevel::Warning)
                && level.enabled_at(config.level())
                && !crate::out::diag(format_args!("vmm: {msg}"))
            {
                self.dropped += 1;
            }
            return;
        };
        if !level.enabled_at(config.level()) || config.module.as_deref().is_some_and(|m| !module.starts_with(m)) {
            return;
        }
        let thread = std::thread::current();
        let mut text = format!("{} [{id}:{}", utc_timestamp(SystemTime::now()), thread.name().unwrap_or("vmm"));
        if config.show_level == Some(true) {
            text.push(':');
            text.push_str(&level.name().to_uppercase());
        }
        if config.show_log_origin == Some(true) {
            text.push_str(&format!(":{file}:{line}"));
        }
        text.push_str(&format!("] {msg}"));
        if !out.write_line(&text) {
            self.dropped += 1;
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub(super) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`, UTC (the format of Firecracker's log
/// lines).
pub(super) fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// The calendar date (year, month, day) of a day number counted from
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        let t = UNIX_EPOCH + Duration::new(1_709_210_096, 5);
        assert_eq!(utc_timestamp(t), "2024-02-29T12:34:56.000000005");
        assert_eq!(unix_millis(t), 1_709_210_096_000);
    }

    #[test]
    fn a_missing_path_is_refused_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let e = HostOutput::open(&path).unwrap_err();
        assert!(e.to_string().contains("must be an existing file or FIFO"), "{e}");
        assert!(!path.exists());
        assert!(HostOutput::open(dir.path()).is_err(), "a directory");
    }

    #[test]
    fn lines_are_appended_whole_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "old\n").unwrap();
        let mut out = HostOutput::open(&path).unwrap();
        assert!(out.write_line("one"));
        assert!(out.write_line(&"é".repeat(MAX_LINE_BYTES)));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["old", "one"]);
        assert!(lines[2].len() < MAX_LINE_BYTES && lines[2].starts_with('é'));
        out.written = MAX_OUTPUT_BYTES;
        assert!(!out.write_line("over the cap"));
    }

    #[test]
    fn a_fifo_without_reader_opens_and_a_full_one_drops_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut out = HostOutput::open(&path).unwrap();
        let line = "x".repeat(MAX_LINE_BYTES - 1);
        let written = (0..1000).take_while(|_| out.write_line(&line)).count();
        assert!(written < 1000, "a full pipe must drop lines, not block");
    }

    #[test]
    fn the_log_filters_by_level_and_module_and_formats_like_firecracker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "").unwrap();
        let mut log = HostLog::default();
        let config = api::Logger {
            level: Some(LogLevel::Info),
            show_level: Some(true),
            show_log_origin: Some(true),
            module: Some("vmm::controller".into()),
            ..Default::default()
        };
        log.configure(config, Some(HostOutput::open(&path).unwrap()));
        log.line("vm0", LogLevel::Info, "vmm::controller", "c.rs", 7, format_args!("hello {}", 1));
        log.line("vm0", LogLevel::Debug, "vmm::controller", "c.rs", 8, format_args!("too detailed"));
        log.line("vm0", LogLevel::Error, "vmm::builder", "b.rs", 9, format_args!("other module"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let (ts, rest) = text.trim_end().split_once(' ').unwrap();
        assert_eq!(ts.len(), "1970-01-01T00:00:00.000000000".len(), "{ts}");
        assert!(rest.starts_with("[vm0:") && rest.ends_with(":INFO:c.rs:7] hello 1"), "{rest}");
        assert_eq!(log.dropped(), 0);
    }
}

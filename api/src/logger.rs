//! `PUT /logger` ([`Logger`]) and `PUT /metrics` ([`MetricsConfig`]):
//! where the VMM writes its log lines and its metrics, as Firecracker's
//! bodies of the same names describe them.
//!
//! Both paths name a file or FIFO that already exists (Firecracker does not
//! create them either); the VMM opens it at the `PUT` and answers 400 if it
//! cannot. Only the field checks that need no I/O live here.

use serde::{de, Deserialize, Deserializer, Serialize};
use std::fmt;

/// A log level, Firecracker's `Logger.level`. JSON: written as
/// `"Error"`, `"Warning"`, `"Info"`, `"Debug"`, `"Trace"` or `"Off"`; read
/// case-insensitively, and `"Warn"` is accepted too (as Firecracker does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum LogLevel {
    /// Nothing is logged.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warning,
    /// And what happens (the default).
    #[default]
    Info,
    /// And details.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// All levels, in Firecracker's order.
    pub const ALL: [LogLevel; 6] = [
        LogLevel::Error,
        LogLevel::Warning,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
        LogLevel::Off,
    ];

    /// The JSON spelling.
    pub const fn name(self) -> &'static str {
        match self {
            LogLevel::Off => "Off",
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
        }
    }

    /// Parses a level, ignoring case; `"warn"` is `Warning`.
    pub fn from_name(name: &str) -> Option<LogLevel> {
        if name.eq_ignore_ascii_case("warn") {
            return Some(LogLevel::Warning);
        }
        LogLevel::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name))
    }

    /// Whether a line at `self` is written when the logger is set to `max`.
    pub fn enabled_at(self, max: LogLevel) -> bool {
        self != LogLevel::Off && self <= max
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LogLevel, D::Error> {
        let name = String::deserialize(d)?;
        LogLevel::from_name(&name).ok_or_else(|| {
            de::Error::invalid_value(
                de::Unexpected::Str(&name),
                &"one of Error, Warning, Info, Debug, Trace, Off (any case)",
            )
        })
    }
}

/// The body of `PUT /logger` (Firecracker's `Logger`). Every field is
/// optional; a `PUT` replaces the whole logger configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// An existing file or FIFO for the log lines; absent: the VMM's warnings
    /// and errors go to its standard error, as without a logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Most detailed level written (default `Info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Put the level in each line (default `false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Put the source file and line in each line (default `false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Write only lines from modules whose path starts with this (e.g.
    /// `vmm::controller`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Why a logger configuration was refused (before any file is opened).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoggerError {
    /// `log_path` is `""`.
    #[error("log_path is empty; give the path of an existing file or FIFO, or leave it out")]
    EmptyLogPath,
    /// `module` is `""`.
    #[error("module is empty; give a module path such as vmm::controller, or leave it out")]
    EmptyModule,
}

impl Logger {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), LoggerError> {
        if self.log_path.as_deref() == Some("") {
            return Err(LoggerError::EmptyLogPath);
        }
        if self.module.as_deref() == Some("") {
            return Err(LoggerError::EmptyModule);
        }
        Ok(())
    }

    /// The level in effect.
    pub fn level(&self) -> LogLevel {
        self.level.unwrap_or_default()
    }
}

/// The body of `PUT /metrics` (Firecracker's `Metrics`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// An existing file or FIFO; each flush writes one JSON line.
    pub metrics_path: String,
}

/// Why a metrics configuration was refused (before any file is opened).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetricsConfigError {
    /// `metrics_path` is `""`.
    #[error("metrics_path is empty; give the path of an existing file or FIFO")]
    EmptyMetricsPath,
}

impl MetricsConfig {
    /// Checks the field.
    pub fn validate(&self) -> Result<(), MetricsConfigError> {
        if self.metrics_path.is_empty() {
            return Err(MetricsConfigError::EmptyMetricsPath);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn levels_read_in_any_case_and_write_canonically() {
        for l in LogLevel::ALL {
            assert_eq!(serde_json::to_value(l).unwrap(), json!(l.name()));
            let lower = l.name().to_lowercase();
            assert_eq!(serde_json::from_value::<LogLevel>(json!(lower)).unwrap(), l);
            assert_eq!(serde_json::from_value::<LogLevel>(json!(l.name().to_uppercase())).unwrap(), l);
        }
        assert_eq!(serde_json::from_value::<LogLevel>(json!("warn")).unwrap(), LogLevel::Warning);
        assert!(serde_json::from_value::<LogLevel>(json!("verbose")).is_err());
        assert!(serde_json::from_value::<LogLevel>(json!(3)).is_err());
    }

    #[test]
    fn level_filter() {
        assert!(LogLevel::Error.enabled_at(LogLevel::Info));
        assert!(LogLevel::Info.enabled_at(LogLevel::Info));
        assert!(!LogLevel::Debug.enabled_at(LogLevel::Info));
        assert!(!LogLevel::Error.enabled_at(LogLevel::Off));
        assert!(LogLevel::Trace.enabled_at(LogLevel::Trace));
    }

    #[test]
    fn logger_bodies() {
        let l: Logger = serde_json::from_str(
            r#"{"log_path":"/tmp/log.fifo","level":"Debug","show_level":true,"show_log_origin":false,"module":"vmm"}"#,
        )
        .unwrap();
        l.validate().unwrap();
        assert_eq!(l.level(), LogLevel::Debug);
        let l: Logger = serde_json::from_str("{}").unwrap();
        assert_eq!(l.level(), LogLevel::Info);
        l.validate().unwrap();
        let l: Logger = serde_json::from_str(r#"{"log_path":""}"#).unwrap();
        assert_eq!(l.validate(), Err(LoggerError::EmptyLogPath));
        let l: Logger = serde_json::from_str(r#"{"module":""}"#).unwrap();
        assert_eq!(l.validate(), Err(LoggerError::EmptyModule));
        assert!(serde_json::from_str::<Logger>(r#"{"path":"/x"}"#).is_err());
    }

    #[test]
    fn metrics_bodies() {
        let m: MetricsConfig = serde_json::from_str(r#"{"metrics_path":"/tmp/m.fifo"}"#).unwrap();
        m.validate().unwrap();
        assert!(serde_json::from_str::<MetricsConfig>("{}").is_err());
        let m = MetricsConfig { metrics_path: String::new() };
        assert_eq!(m.validate(), Err(MetricsConfigError::EmptyMetricsPath));
    }
}

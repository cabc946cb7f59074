//! `vmm ctl`: a small client for a running VMM's API socket. Each subcommand
//! is one request; the answer is printed as pretty JSON, or as a table with
//! `--human`.
//!
//! Exit codes: 0 on a 2xx answer, 1 on an error answer (its `fault_message`
//! goes to stderr) or a broken exchange, 2 when the socket cannot be reached.
//! [`request`] is the reusable blocking call underneath.

use api::{
    ActionType, Endpoint, GuestMemoryTarget, InstanceActionInfo, VmStateTarget, VmStateUpdate,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request may take in all. Longer than the server's own wait for
/// the VMM (120 s), so its 504 arrives before this gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

/// Largest answer read (a memory report is a few KiB).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

const CTL_EXAMPLES: &str = "\
Examples:
  vmm ctl --api-sock /tmp/vmm.sock info
  vmm ctl --api-sock /tmp/vmm.sock --human memory
  vmm ctl --api-sock /tmp/vmm.sock set-memory 512
  vmm ctl --api-sock /tmp/vmm.sock pause

Every subcommand is one HTTP request; `vmm ctl SUBCOMMAND --help` shows the
equivalent curl command. Exit codes: 0 on success, 1 when the VMM answers an
error (printed to stderr), 2 when the socket cannot be reached.";

/// Talk to a running VMM through its API socket.
#[derive(Debug, clap::Args)]
#[command(after_help = CTL_EXAMPLES)]
pub struct CtlArgs {
    /// The VMM's API socket (as given to `vmm run --api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Print a readable table instead of JSON.
    #[arg(long, global = true)]
    pub human: bool,
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

/// The requests `vmm ctl` can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Show the VM's id, state and exit code (GET /).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock info

Equivalent request:
  curl --unix-socket /tmp/vmm.sock http://localhost/")]
    Info,
    /// Show the machine configuration (GET /machine-config).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock config

Equivalent request:
  curl --unix-socket /tmp/vmm.sock http://localhost/machine-config")]
    Config,
    /// Show the memory report: the guest's memmap next to what the host sees
    /// (GET /memory).
    #[command(after_help = "\
Examples:
  vmm ctl --api-sock /tmp/vmm.sock memory
  vmm ctl --api-sock /tmp/vmm.sock --human memory

Equivalent request:
  curl --unix-socket /tmp/vmm.sock http://localhost/memory")]
    Memory,
    /// Show the guest workload's last memory target and how it ended
    /// (GET /guest/memory).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock workload

Equivalent request:
  curl --unix-socket /tmp/vmm.sock http://localhost/guest/memory")]
    Workload,
    /// Make the guest workload hold TARGET_MIB MiB (0 frees it all); waits
    /// until the guest is done (PUT /guest/memory).
    #[command(after_help = "\
Examples:
  vmm ctl --api-sock /tmp/vmm.sock set-memory 512
  vmm ctl --api-sock /tmp/vmm.sock --human set-memory 0

Equivalent request:
  curl --unix-socket /tmp/vmm.sock -X PUT -H 'Content-Type: application/json' \\
       -d '{\"target_mib\": 512}' http://localhost/guest/memory")]
    SetMemory {
        /// Memory the workload should hold, in MiB.
        target_mib: u64,
    },
    /// Start a VM that was configured through the API (PUT /actions
    /// InstanceStart).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock start

Equivalent request:
  curl --unix-socket /tmp/vmm.sock -X PUT -H 'Content-Type: application/json' \\
       -d '{\"action_type\": \"InstanceStart\"}' http://localhost/actions")]
    Start,
    /// Stop the vCPUs, keeping guest memory (PATCH /vm Paused).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock pause

Equivalent request:
  curl --unix-socket /tmp/vmm.sock -X PATCH -H 'Content-Type: application/json' \\
       -d '{\"state\": \"Paused\"}' http://localhost/vm")]
    Pause,
    /// Run paused vCPUs again (PATCH /vm Resumed).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock resume

Equivalent request:
  curl --unix-socket /tmp/vmm.sock -X PATCH -H 'Content-Type: application/json' \\
       -d '{\"state\": \"Resumed\"}' http://localhost/vm")]
    Resume,
    /// Stop the VM now; its state becomes Halted (PUT /actions Shutdown).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock shutdown

Equivalent request:
  curl --unix-socket /tmp/vmm.sock -X PUT -H 'Content-Type: application/json' \\
       -d '{\"action_type\": \"Shutdown\"}' http://localhost/actions")]
    Shutdown,
    /// Ask the guest to shut down cleanly (PUT /actions SendCtrlAltDel).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock ctrl-alt-del

Equivalent request:
  curl --unix-socket /tmp/vmm.sock -X PUT -H 'Content-Type: application/json' \\
       -d '{\"action_type\": \"SendCtrlAltDel\"}' http://localhost/actions")]
    CtrlAltDel,
    /// Show the VMM's counters: exits, API requests, guest commands
    /// (GET /metrics).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock --human metrics

Equivalent request:
  curl --unix-socket /tmp/vmm.sock http://localhost/metrics")]
    Metrics,
}

impl CtlCommand {
    /// The endpoint the command calls.
    pub fn endpoint(self) -> Endpoint {
        match self {
            CtlCommand::Info => Endpoint::GetInstanceInfo,
            CtlCommand::Config => Endpoint::GetMachineConfig,
            CtlCommand::Memory => Endpoint::GetMemory,
            CtlCommand::Workload => Endpoint::GetGuestMemory,
            CtlCommand::SetMemory { .. } => Endpoint::PutGuestMemory,
            CtlCommand::Start | CtlCommand::Shutdown | CtlCommand::CtrlAltDel => {
                Endpoint::PutActions
            }
            CtlCommand::Pause | CtlCommand::Resume => Endpoint::PatchVm,
            CtlCommand::Metrics => Endpoint::GetMetrics,
        }
    }

    /// The request body, built from the API's own types.
    pub fn body(self) -> Option<Value> {
        let action = |action_type| serde_json::to_value(InstanceActionInfo { action_type });
        let state = |state| serde_json::to_value(VmStateUpdate { state });
        let body = match self {
            CtlCommand::SetMemory { target_mib } => {
                serde_json::to_value(GuestMemoryTarget { target_mib })
            }
            CtlCommand::Start => action(ActionType::InstanceStart),
            CtlCommand::Shutdown => action(ActionType::Shutdown),
            CtlCommand::CtrlAltDel => action(ActionType::SendCtrlAltDel),
            CtlCommand::Pause => state(VmStateTarget::Paused),
            CtlCommand::Resume => state(VmStateTarget::Resumed),
            _ => return None,
        };
        // These plain structs always serialize.
        body.ok()
    }
}

/// Why a request could not be completed (an error answer is not one of
/// these: [`request`] returns its status and body).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The socket is not there or nobody listens on it.
    #[error("cannot connect to {0:?}")]
    Connect(PathBuf, #[source] io::Error),
    /// The client's runtime could not be built.
    #[error("cannot create the client runtime")]
    Runtime(#[source] io::Error),
    /// Method or path do not make an HTTP request.
    #[error("invalid request {method} {path}")]
    BadRequest {
        /// Method given.
        method: String,
        /// Path given.
        path: String,
        /// What is wrong with them.
        #[source]
        source: hyper::http::Error,
    },
    /// The HTTP exchange failed (the VMM hung up, or answered garbage).
    #[error("HTTP exchange with the VMM failed")]
    Http(#[source] hyper::Error),
    /// The answer's body could not be read (too large, connection lost).
    #[error("cannot read the VMM's answer")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The answer is not JSON.
    #[error("the VMM answered {0} with a body that is not JSON")]
    InvalidJson(u16, #[source] serde_json::Error),
    /// No answer in time.
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// Sends one request to the API socket at `sock` and waits for the answer:
/// its status and JSON body (`Value::Null` when there is none, as for 204).
/// Blocking; builds its own small runtime, so call it from any thread that
/// is not inside a tokio runtime.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), CtlError> {
    let req = build_request(method, path, body)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(CtlError::Runtime)?;
    runtime.block_on(async {
        tokio::time::timeout(REQUEST_TIMEOUT, exchange(sock, req))
            .await
            .map_err(|_| CtlError::Timeout(REQUEST_TIMEOUT))?
    })
}

/// The HTTP request for `method`, `path` and an optional JSON body.
fn build_request(
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Request<Full<Bytes>>, CtlError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "localhost");
    let bytes = match body {
        Some(v) => {
            builder = builder.header(CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    builder
        .body(Full::new(bytes))
        .map_err(|source| CtlError::BadRequest {
            method: method.to_string(),
            path: path.to_string(),
            source,
        })
}

async fn exchange(sock: &Path, req: Request<Full<Bytes>>) -> Result<(u16, Value), CtlError> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| CtlError::Connect(sock.to_path_buf(), e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(CtlError::Http)?;
    // The connection's own errors surface through `send_request`.
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(CtlError::Http)?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(CtlError::Body)?
        .to_bytes();
    if body.trim_ascii().is_empty() {
        return Ok((status, Value::Null));
    }
    let value = serde_json::from_slice(&body).map_err(|e| CtlError::InvalidJson(status, e))?;
    Ok((status, value))
}

/// Runs `vmm ctl`; returns the process exit code.
pub fn run(args: CtlArgs) -> u8 {
    let endpoint = args.cmd.endpoint();
    let body = args.cmd.body();
    let sock = &args.api_sock;
    match request(
        sock,
        endpoint.method().as_str(),
        endpoint.path(),
        body.as_ref(),
    ) {
        Ok((status, value)) if (200..300).contains(&status) => {
            print!("{}", render(args.cmd, &value, args.human));
            0
        }
        Ok((status, value)) => {
            eprintln!(
                "vmm ctl: {}: {}",
                status_line(status),
                fault_message(&value)
            );
            1
        }
        Err(CtlError::Connect(_, e)) => {
            eprintln!(
                "vmm ctl: cannot connect to {}: {e}; is the VMM running with --api-sock {}?",
                sock.display(),
                sock.display()
            );
            2
        }
        Err(e) => {
            eprintln!(
                "vmm ctl: {}",
                api::ApiErrorBody::from_error(&e).fault_message
            );
            1
        }
    }
}

/// "409 Conflict".
fn status_line(status: u16) -> String {
    match StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

/// The `fault_message` of an error body, or the whole body if it has none.
fn fault_message(body: &Value) -> String {
    match body.get("fault_message").and_then(Value::as_str) {
        Some(msg) => msg.to_string(),
        None if body.is_null() => "(no message)".to_string(),
        None => body.to_string(),
    }
}

/// What to print for a successful answer.
fn render(cmd: CtlCommand, value: &Value, human: bool) -> String {
    if value.is_null() {
        // 204: nothing to show; say so only to a human.
        return if human {
            "ok\n".to_string()
        } else {
            String::new()
        };
    }
    if !human {
        let mut out = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
        out.push('\n');
        return out;
    }
    match cmd {
        CtlCommand::Memory => memory_table(value),
        CtlCommand::SetMemory { .. } | CtlCommand::Workload => {
            let mut top = value.clone();
            let report = top.as_object_mut().and_then(|o| o.remove("report"));
            let mut out = key_values(&top);
            if let Some(report) = report.filter(|r| !r.is_null()) {
                out.push('\n');
                out.push_str(&memory_table(&report));
            }
            out
        }
        _ => key_values(value),
    }
}

/// One value for a human: `-` for null, yes/no, sizes in MiB, durations in
/// µs.
fn human_value(key: &str, v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) if key.contains("bytes") => match n.as_u64() {
            Some(b) => mib(b),
            None => n.to_string(),
        },
        Value::Number(n) if key.ends_with("_us") || is_timing(key) => match n.as_f64() {
            Some(us) => format!("{us:.1} µs"),
            None => n.to_string(),
        },
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// Keys of `BootTimings` that are microsecond timestamps.
fn is_timing(key: &str) -> bool {
    key.starts_with("timings.")
}

fn mib(bytes: u64) -> String {
    // Precision loss above 2^53 bytes is irrelevant for display.
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Flattens a JSON object into `(dotted key, shown value)` rows.
fn rows(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v.as_object() {
        Some(obj) => {
            for (k, v) in obj {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_object() {
                    rows(&key, v, out);
                } else {
                    let shown = human_value(&key, v);
                    out.push((key, shown));
                }
            }
        }
        None => out.push((prefix.to_string(), human_value(prefix, v))),
    }
}

/// A generic two-column listing of a JSON answer.
fn key_values(v: &Value) -> String {
    let mut list = Vec::new();
    rows("", v, &mut list);
    let width = list
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in list {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

/// `GET /memory` for a human: the guest's view and the host's side by side,
/// then the boot timings.
pub(crate) fn memory_table(report: &Value) -> String {
    let mut out = String::new();
    let strategy = report
        .get("strategy")
        .map_or("-".into(), |s| human_value("strategy", s));
    let _ = writeln!(out, "memmap strategy: {strategy}");

    let mut guest = Vec::new();
    match report.get("guest") {
        Some(g) if g.is_object() => rows("", g, &mut guest),
        _ => {
            let why = report
                .get("invalid_reason")
                .and_then(Value::as_str)
                .unwrap_or("no valid report");
            guest.push(("not available:".into(), why.to_string()));
        }
    }
    let mut host = Vec::new();
    if let Some(h) = report.get("host") {
        rows("", h, &mut host);
    }
    let left = table_column("GUEST (its stats block)", &guest);
    let right = table_column("HOST (measured by the VMM)", &host);
    let left_width = left.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    for i in 0..left.len().max(right.len()) {
        let l = left.get(i).map_or("", String::as_str);
        let r = right.get(i).map_or("", String::as_str);
        let line = format!("{l:<left_width$}    {r}");
        let _ = writeln!(out, "{}", line.trim_end());
    }

    if let Some(timings) = report.get("timings") {
        let mut list = Vec::new();
        rows("timings", timings, &mut list);
        let list: Vec<(String, String)> = list
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("timings.").to_string(), v))
            .collect();
        out.push('\n');
        for line in table_column("TIMINGS (since VMM start)", &list) {
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

/// A titled column of `key  value` lines, keys padded to one width.
fn table_column(title: &str, list: &[(String, String)]) -> Vec<String> {
    let width = list
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut lines = vec![title.to_string()];
    lines.extend(list.iter().map(|(k, v)| format!("{k:<width$}  {v}")));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_server::tests::{sample_report, Fixture, TempDir};
    use api::ApiRequest;
    use clap::{CommandFactory, Parser};

    /// `vmm ctl` as its own program, for parsing tests.
    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    const ALL: [CtlCommand; 11] = [
        CtlCommand::Info,
        CtlCommand::Config,
        CtlCommand::Memory,
        CtlCommand::Workload,
        CtlCommand::SetMemory { target_mib: 512 },
        CtlCommand::Start,
        CtlCommand::Pause,
        CtlCommand::Resume,
        CtlCommand::Shutdown,
        CtlCommand::CtrlAltDel,
        CtlCommand::Metrics,
    ];

    #[test]
    fn every_command_builds_a_request_the_api_accepts() {
        for cmd in ALL {
            let e = cmd.endpoint();
            let body = cmd.body().map(|b| b.to_string()).unwrap_or_default();
            let parsed = ApiRequest::parse(e.method().as_str(), e.path(), body.as_bytes())
                .unwrap_or_else(|err| panic!("{cmd:?}: {err}"));
            assert_eq!(parsed.endpoint(), e);
        }
        assert_eq!(
            CtlCommand::SetMemory { target_mib: 64 }.body().unwrap(),
            serde_json::json!({"target_mib": 64})
        );
        assert_eq!(
            CtlCommand::Shutdown.body().unwrap(),
            serde_json::json!({"action_type": "Shutdown"})
        );
    }

    #[test]
    fn requests_carry_host_and_content_type() {
        let req = build_request(
            "PUT",
            "/guest/memory",
            Some(&serde_json::json!({"target_mib": 1})),
        )
        .unwrap();
        assert_eq!(req.method(), "PUT");
        assert_eq!(req.uri(), "/guest/memory");
        assert_eq!(req.headers()[HOST], "localhost");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/json");
        let req = build_request("GET", "/", None).unwrap();
        assert!(req.headers().get(CONTENT_TYPE).is_none());
        assert!(matches!(
            build_request("GE T", "/", None),
            Err(CtlError::BadRequest { .. })
        ));
    }

    #[test]
    fn parses_the_command_line() {
        let w =
            Wrapper::try_parse_from(["ctl", "--api-sock", "/s", "set-memory", "256", "--human"])
                .unwrap();
        assert_eq!(w.ctl.api_sock, Path::new("/s"));
        assert!(w.ctl.human);
        assert_eq!(w.ctl.cmd, CtlCommand::SetMemory { target_mib: 256 });
        assert!(Wrapper::try_parse_from(["ctl", "memory"]).is_err());
        assert!(Wrapper::try_parse_from(["ctl", "--api-sock", "/s", "set-memory", "-1"]).is_err());
        Wrapper::command().debug_assert();
    }

    #[test]
    fn every_command_documents_its_curl_equivalent() {
        let mut app = Wrapper::command();
        for cmd in ALL {
            let e = cmd.endpoint();
            let name = format!("{cmd:?}");
            let sub = app
                .get_subcommands_mut()
                .find(|s| {
                    s.get_name().replace('-', "") == name.split(' ').next().unwrap().to_lowercase()
                })
                .unwrap_or_else(|| panic!("no subcommand for {name}"));
            let help = sub.render_long_help().to_string();
            assert!(
                help.contains(&format!("http://localhost{}", e.path())),
                "{name}: {help}"
            );
            assert!(help.contains("curl --unix-socket"), "{name}");
            if e.method() != api::Method::Get {
                assert!(help.contains(&format!("-X {}", e.method())), "{name}");
            }
            if let Some(body) = cmd.body() {
                // The documented body is the one sent (modulo spacing).
                let first_key = body.as_object().unwrap().keys().next().unwrap().clone();
                assert!(help.contains(&format!("\"{first_key}\"")), "{name}");
            }
        }
    }

    #[test]
    fn renders_json_by_default() {
        let v = serde_json::json!({"state": "Running", "id": "vm0"});
        let out = render(CtlCommand::Info, &v, false);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), v);
        assert!(out.contains("\n  \""), "pretty-printed: {out}");
        assert_eq!(render(CtlCommand::Pause, &Value::Null, false), "");
        assert_eq!(render(CtlCommand::Pause, &Value::Null, true), "ok\n");
    }

    #[test]
    fn human_info_is_a_key_value_list() {
        let v = serde_json::json!({
            "id": "vm0", "state": "Halted", "vmm_version": "0.1.0",
            "started": true, "exit_code": 0, "failure_reason": null
        });
        let out = render(CtlCommand::Info, &v, true);
        assert!(out.contains("state           Halted\n"), "{out}");
        assert!(out.contains("started         yes\n"), "{out}");
        assert!(out.contains("failure_reason  -\n"), "{out}");
    }

    #[test]
    fn human_memory_puts_guest_and_host_side_by_side_in_mib() {
        let v = serde_json::to_value(sample_report()).unwrap();
        let out = render(CtlCommand::Memory, &v, true);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "memmap strategy: ondemand");
        assert!(
            lines[1].starts_with("GUEST") && lines[1].contains("HOST"),
            "{out}"
        );
        let ram = lines
            .iter()
            .find(|l| l.contains("guest_ram_bytes"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            ram.contains("pages_total") && ram.contains("524288"),
            "{out}"
        );
        assert!(
            ram.ends_with("guest_ram_bytes             2048.0 MiB"),
            "{ram:?}"
        );
        assert!(out.contains("memmap_bytes_reserved     32.0 MiB"), "{out}");
        assert!(out.contains("vmm_pss_bytes               -"), "{out}");
        assert!(
            out.contains("guest_ready                5000.0 µs"),
            "{out}"
        );
        assert!(out.contains("init_us                   12.5 µs"), "{out}");
        // Columns line up: every host key starts at the same offset.
        let col = lines[1].find("HOST").unwrap();
        assert_eq!(ram.find("guest_ram_bytes"), Some(col), "{out}");

        let mut invalid = sample_report();
        invalid.valid = false;
        invalid.guest = None;
        invalid.invalid_reason = Some("no stats block yet".into());
        let out = render(
            CtlCommand::Memory,
            &serde_json::to_value(invalid).unwrap(),
            true,
        );
        assert!(out.contains("not available:  no stats block yet"), "{out}");
    }

    #[test]
    fn human_workload_shows_status_then_report() {
        let v = serde_json::json!({
            "target_mib": 512, "held_bytes": 536870912u64, "status": "Ok",
            "report": serde_json::to_value(sample_report()).unwrap()
        });
        let out = render(CtlCommand::SetMemory { target_mib: 512 }, &v, true);
        assert!(
            out.starts_with("target_mib  512\nheld_bytes  512.0 MiB\nstatus      Ok\n\nmemmap"),
            "{out}"
        );
        let v =
            serde_json::json!({"target_mib": 0, "held_bytes": 0, "status": "Idle", "report": null});
        let out = render(CtlCommand::Workload, &v, true);
        assert!(!out.contains("memmap"), "{out}");
    }

    #[test]
    fn human_metrics_flattens_nested_counters() {
        let v = serde_json::to_value(api::Metrics::default()).unwrap();
        let out = render(CtlCommand::Metrics, &v, true);
        assert!(out.contains("vm_exits.io_out"), "{out}");
        assert!(out.contains("serial_bytes           0.0 MiB"), "{out}");
    }

    #[test]
    fn end_to_end_against_the_server() {
        let f = Fixture::new();
        let (status, v) = request(f.sock(), "GET", "/", None).unwrap();
        assert_eq!((status, v["state"].as_str()), (200, Some("Running")));
        let body = serde_json::json!({"target_mib": 64});
        let (status, v) = request(f.sock(), "PUT", "/guest/memory", Some(&body)).unwrap();
        assert_eq!((status, v["held_bytes"].as_u64()), (200, Some(64 << 20)));
        let (status, v) = request(
            f.sock(),
            "PATCH",
            "/vm",
            Some(&serde_json::json!({"state": "Paused"})),
        )
        .unwrap();
        assert_eq!((status, v), (204, Value::Null));
        let (status, v) = request(f.sock(), "GET", "/nope", None).unwrap();
        assert_eq!(status, 404);
        assert!(fault_message(&v).contains("no such path"));

        let args = |cmd| CtlArgs {
            api_sock: f.sock().to_path_buf(),
            human: true,
            cmd,
        };
        assert_eq!(run(args(CtlCommand::Memory)), 0);
        assert_eq!(run(args(CtlCommand::Pause)), 0);
        assert_eq!(run(args(CtlCommand::Start)), 1); // The fake VMM answers 409.
    }

    #[test]
    fn unreachable_socket_is_exit_2() {
        let dir = TempDir::new();
        let err = request(&dir.sock(), "GET", "/", None).unwrap_err();
        assert!(matches!(err, CtlError::Connect(..)), "{err}");
        let code = run(CtlArgs {
            api_sock: dir.sock(),
            human: false,
            cmd: CtlCommand::Info,
        });
        assert_eq!(code, 2);
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_line(409), "409 Conflict");
        assert_eq!(status_line(599), "599");
        assert_eq!(
            fault_message(&serde_json::json!({"fault_message": "x"})),
            "x"
        );
        assert_eq!(fault_message(&serde_json::json!([1])), "[1]");
    }
}

//! `vmm ctl`: a small client for a running VMM's API socket. Each subcommand
//! is one request; the answer is printed as the VMM sent it, pretty JSON, or
//! with `--human` decoded into its API type (`api::InstanceInfo` for `info`,
//! `api::MemoryReport` for `memory`, ...) and shown as a table.
//!
//! Exit codes: 0 on a 2xx answer, 1 on an error answer (its `fault_message`
//! goes to stderr) or a broken exchange, 2 when the socket cannot be reached.
//! The request itself is `vmm_client`'s (one [`Client`] per run); the tables
//! are [`crate::render`]'s.

use crate::render;
use api::{ActionType, Endpoint, ErrorChain, GuestMemoryTarget, InstanceActionInfo, VmStateTarget, VmStateUpdate};
use hyper::StatusCode;
use serde_json::Value;
use std::path::{Path, PathBuf};
use vmm_client::{Client, ClientError};

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
    /// Show the VM's id, state and version, as Firecracker does (GET /).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock info

Equivalent request:
  curl --unix-socket /tmp/vmm.sock http://localhost/")]
    Info,
    /// Show whether the VM started, how it ended, its exit code and failure
    /// reason (GET /vm/status, this VMM's extension).
    #[command(after_help = "\
Example:
  vmm ctl --api-sock /tmp/vmm.sock status

Equivalent request:
  curl --unix-socket /tmp/vmm.sock http://localhost/vm/status")]
    Status,
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
            CtlCommand::Status => Endpoint::GetVmStatus,
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

/// Runs `vmm ctl`; returns the process exit code.
pub fn run(args: CtlArgs) -> u8 {
    let sock = &args.api_sock;
    match Client::new().and_then(|client| answer(&client, sock, args.cmd, args.human)) {
        Ok(out) => {
            crate::stdio::print(&out);
            0
        }
        Err(e) => {
            let (code, message) = failure(&e, sock);
            crate::stdio::eprint_line(format_args!("vmm ctl: {message}"));
            code
        }
    }
}

/// The exit code and message for a request that did not succeed: 1 for an
/// error answer (its status and `fault_message`) or a broken exchange, 2 when
/// nothing listens on the socket.
fn failure(e: &ClientError, sock: &Path) -> (u8, String) {
    match e {
        ClientError::Fault { status, fault_message } => (1, format!("{}: {fault_message}", status_line(*status))),
        ClientError::Connect(_, source) => (
            2,
            format!(
                "cannot connect to {}: {source}; is the VMM running with --api-sock {}?",
                sock.display(),
                sock.display()
            ),
        ),
        e => (1, ErrorChain(e).to_string()),
    }
}

/// Sends `cmd` and renders a successful answer: as it came (pretty JSON), or
/// for a human, decoded into its API type (each arm's `call` takes the type
/// its renderer wants) and shown as a table. An error answer is a
/// [`ClientError::Fault`], a body of another type a
/// [`ClientError::UnexpectedBody`].
fn answer(client: &Client, sock: &Path, cmd: CtlCommand, human: bool) -> Result<String, ClientError> {
    let (endpoint, body) = (cmd.endpoint(), cmd.body());
    let body = body.as_ref();
    if !human {
        return Ok(render::json(&client.call::<Value>(sock, endpoint, body)?));
    }
    Ok(match cmd {
        CtlCommand::Info => render::instance_info(&client.call(sock, endpoint, body)?),
        CtlCommand::Status => render::instance_status(&client.call(sock, endpoint, body)?),
        CtlCommand::Config => render::machine_config(&client.call(sock, endpoint, body)?),
        CtlCommand::Memory => render::memory_table(&client.call(sock, endpoint, body)?),
        CtlCommand::Workload | CtlCommand::SetMemory { .. } => {
            render::guest_memory_status(&client.call(sock, endpoint, body)?)
        }
        CtlCommand::Metrics => render::metrics(&client.call(sock, endpoint, body)?),
        CtlCommand::Start
        | CtlCommand::Pause
        | CtlCommand::Resume
        | CtlCommand::Shutdown
        | CtlCommand::CtrlAltDel => {
            // A 204 has no body, which decodes as `()`; a body would be
            // unexpected.
            client.call::<()>(sock, endpoint, body)?;
            render::NO_CONTENT.to_string()
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use api::{
        ApiError, ApiRequest, ApiResponse, GuestMemoryOutcome, GuestMemoryStatus, InstanceInfo, MachineConfig,
        MemoryReport, Metrics, VmState,
    };
    use clap::{CommandFactory, Parser};
    use vmm::events::VmEvent;

    /// `vmm ctl` as its own program, for parsing tests.
    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    const ALL: [CtlCommand; 12] = [
        CtlCommand::Info,
        CtlCommand::Status,
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

    /// The request `cmd` sends, as the VMM thread receives it.
    fn request_of(cmd: CtlCommand) -> ApiRequest {
        let e = cmd.endpoint();
        let body = cmd.body().map(|b| b.to_string()).unwrap_or_default();
        ApiRequest::parse(e.method().as_str(), e.path(), body.as_bytes()).unwrap_or_else(|err| panic!("{cmd:?}: {err}"))
    }

    #[test]
    fn every_command_builds_a_request_the_api_accepts() {
        for cmd in ALL {
            assert_eq!(request_of(cmd).endpoint(), cmd.endpoint());
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
    fn unreachable_socket_is_exit_2() {
        let dir = tempfile::tempdir().unwrap();
        let code = run(CtlArgs {
            api_sock: dir.path().join("none.sock"),
            human: false,
            cmd: CtlCommand::Info,
        });
        assert_eq!(code, 2);
    }

    /// What the fake VMM answers: the API's examples, and a 409 for a start.
    fn fake_answer(request: ApiRequest) -> Result<ApiResponse, ApiError> {
        let status = GuestMemoryStatus {
            target_mib: 512,
            held_bytes: 512 << 20,
            status: GuestMemoryOutcome::Ok,
            report: Some(MemoryReport::example()),
        };
        Ok(match request {
            ApiRequest::GetInstanceInfo => ApiResponse::InstanceInfo(InstanceInfo::new("vm0", "0.1.0", VmState::Running)),
            ApiRequest::GetVmStatus => ApiResponse::InstanceStatus(api::InstanceStatus::new("vm0", VmState::Running)),
            ApiRequest::GetMachineConfig => ApiResponse::MachineConfig(MachineConfig::default()),
            ApiRequest::GetMemory => ApiResponse::MemoryReport(Box::new(MemoryReport::example())),
            ApiRequest::GetGuestMemory | ApiRequest::PutGuestMemory(_) => ApiResponse::GuestMemoryStatus(Box::new(status)),
            ApiRequest::GetMetrics => ApiResponse::Metrics(Metrics::default()),
            ApiRequest::PutActions(InstanceActionInfo { action_type: ActionType::InstanceStart }) => {
                return Err(ApiError::InvalidState { action: "start the VM".into(), state: VmState::Running })
            }
            _ => ApiResponse::NoContent,
        })
    }

    /// A real API server whose VMM thread answers with [`fake_answer`].
    fn fake_vmm() -> (vmm::api_server::ApiServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (to_vmm, mut events) = vmm::events::channel();
        std::thread::spawn(move || {
            while let Some(event) = events.blocking_recv() {
                if let VmEvent::Api(call) = event {
                    let _ = call.reply.send(fake_answer(call.request));
                }
            }
        });
        let server = vmm::api_server::start(&dir.path().join("api.sock"), to_vmm, Default::default()).unwrap();
        (server, dir)
    }

    #[test]
    fn answers_print_as_pretty_json_or_as_their_type_s_table() {
        let (server, _dir) = fake_vmm();
        let client = Client::new().unwrap();
        for cmd in ALL {
            let json = answer(&client, server.path(), cmd, false);
            let human = answer(&client, server.path(), cmd, true);
            let response = match fake_answer(request_of(cmd)) {
                Ok(response) => response,
                Err(e) => {
                    for got in [json, human] {
                        match got {
                            Err(ClientError::Fault { status, fault_message }) => {
                                assert_eq!((status, fault_message), (e.status(), e.body().fault_message));
                            }
                            other => panic!("{cmd:?}: {other:?}"),
                        }
                    }
                    continue;
                }
            };
            // Without --human: the answer's JSON as sent, pretty-printed.
            let sent = response.to_json().unwrap();
            let expected = match sent {
                Some(bytes) => serde_json::to_string_pretty(&serde_json::from_slice::<Value>(&bytes).unwrap()).unwrap() + "\n",
                None => String::new(),
            };
            assert_eq!(json.unwrap(), expected, "{cmd:?}");
            // With it: the table of the answer's type.
            let table = match response {
                ApiResponse::NoContent => render::NO_CONTENT.to_string(),
                ApiResponse::InstanceInfo(v) => render::instance_info(&v),
                ApiResponse::MachineConfig(v) => render::machine_config(&v),
                ApiResponse::MemoryReport(v) => render::memory_table(&v),
                ApiResponse::GuestMemoryStatus(v) => render::guest_memory_status(&v),
                ApiResponse::Metrics(v) => render::metrics(&v),
                ApiResponse::InstanceStatus(v) => render::instance_status(&v),
                other => panic!("{cmd:?}: vmm ctl sends no request answered {other:?}"),
            };
            assert_eq!(human.unwrap(), table, "{cmd:?}");
        }
    }

    #[test]
    fn failures_map_to_exit_codes_and_messages() {
        let sock = Path::new("/run/vm.sock");
        let fault = ClientError::Fault { status: 409, fault_message: "the VM is Running".into() };
        assert_eq!(failure(&fault, sock), (1, "409 Conflict: the VM is Running".to_string()));
        let refused = ClientError::Connect(sock.into(), std::io::ErrorKind::ConnectionRefused.into());
        let (code, message) = failure(&refused, sock);
        assert_eq!(code, 2);
        assert!(message.starts_with("cannot connect to /run/vm.sock: "), "{message}");
        assert!(message.ends_with("; is the VMM running with --api-sock /run/vm.sock?"), "{message}");
        // A 2xx answer that is not of the command's type: a broken exchange.
        let source = serde_json::from_value::<MemoryReport>(Value::Null).unwrap_err();
        let (code, message) = failure(&ClientError::UnexpectedBody("MemoryReport", source), sock);
        assert_eq!(code, 1);
        assert!(message.starts_with("the VMM answered with a body that is not a MemoryReport: "), "{message}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_line(409), "409 Conflict");
        assert_eq!(status_line(599), "599");
    }
}

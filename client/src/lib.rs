//! A blocking client for a VMM's control API socket: one HTTP/1.1 request per
//! call over a Unix socket, with hyper. [`Client`] holds one small runtime
//! and may be shared by threads; [`Client::request`] returns the status and
//! the JSON body, [`Client::get`] a typed answer.
//!
//! ```no_run
//! let client = vmm_client::Client::new().unwrap();
//! let report: api::MemoryReport = client.get("/tmp/vm.sock".as_ref(), api::Endpoint::GetMemory).unwrap();
//! println!("{} bytes of memmap resident", report.host.memmap_resident_bytes);
//! ```
//!
//! It lives apart from the monitor (which only serves the API) and from the
//! `vmm` binary (whose `ctl` renders the answers), because the lab's
//! experiments talk to hundreds of VMs through it too.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request may take in all. Longer than the server's own wait for
/// the VMM (120 s), so its 504 arrives before this gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

/// Largest answer read (a memory report is a few KiB).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Why a request could not be completed (an error answer is not one of
/// these: [`Client::request`] returns its status and body).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
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
    /// The answer is JSON, not of the expected type.
    #[error("the VMM answered with a body that is not a {0}")]
    UnexpectedBody(&'static str, #[source] serde_json::Error),
    /// The VMM answered with an error status.
    #[error("the VMM answered {status}: {fault_message}")]
    Fault {
        /// The HTTP status.
        status: u16,
        /// The error body's `fault_message`.
        fault_message: String,
    },
    /// No answer in time.
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// A client for any number of API sockets.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
}

impl Client {
    /// A client with its own single-threaded runtime.
    pub fn new() -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Client { runtime, timeout: REQUEST_TIMEOUT })
    }

    /// The same client with a shorter (or longer) deadline per request.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Sends one request to the API socket at `sock` and waits for the
    /// answer: its status and JSON body (`Value::Null` when there is none, as
    /// for 204). Blocking; call it from any thread that is not inside a tokio
    /// runtime (threads may call it at once).
    pub fn request(&self, sock: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
        let req = build_request(method, path, body)?;
        self.runtime.block_on(async {
            tokio::time::timeout(self.timeout, exchange(sock, req))
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))?
        })
    }

    /// Calls `endpoint` with `body` and decodes a successful answer as `T`;
    /// an error status is a [`ClientError::Fault`].
    pub fn call<T: DeserializeOwned>(&self, sock: &Path, endpoint: api::Endpoint, body: Option<&Value>) -> Result<T, ClientError> {
        let (status, value) = self.request(sock, endpoint.method().as_str(), endpoint.path(), body)?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Fault { status, fault_message: fault_message(&value) });
        }
        serde_json::from_value(value).map_err(|e| ClientError::UnexpectedBody(std::any::type_name::<T>(), e))
    }

    /// A `GET` of `endpoint`, decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, sock: &Path, endpoint: api::Endpoint) -> Result<T, ClientError> {
        self.call(sock, endpoint, None)
    }
}

/// The `fault_message` of an error body, or the whole body if it has none.
pub fn fault_message(body: &Value) -> String {
    match body.get("fault_message").and_then(Value::as_str) {
        Some(msg) => msg.to_string(),
        None if body.is_null() => "(no message)".to_string(),
        None => body.to_string(),
    }
}

/// The HTTP request for `method`, `path` and an optional JSON body.
fn build_request(method: &str, path: &str, body: Option<&Value>) -> Result<Request<Full<Bytes>>, ClientError> {
    let mut builder = Request::builder().method(method).uri(path).header(HOST, "localhost");
    let bytes = match body {
        Some(v) => {
            builder = builder.header(CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    builder
        .body(Full::new(bytes))
        .map_err(|source| ClientError::BadRequest { method: method.to_string(), path: path.to_string(), source })
}

async fn exchange(sock: &Path, req: Request<Full<Bytes>>) -> Result<(u16, Value), ClientError> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| ClientError::Connect(sock.to_path_buf(), e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ClientError::Http)?;
    // The connection's own errors surface through `send_request`.
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(ClientError::Http)?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(ClientError::Body)?
        .to_bytes();
    if body.trim_ascii().is_empty() {
        return Ok((status, Value::Null));
    }
    let value = serde_json::from_slice(&body).map_err(|e| ClientError::InvalidJson(status, e))?;
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{ApiRequest, ApiResponse, VmState};
    use vmm::events::VmEvent;

    /// A real API server with a controller that answers from fixed data.
    fn server() -> (vmm::api_server::ApiServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = vmm::events::channel();
        std::thread::spawn(move || {
            while let Some(event) = rx.blocking_recv() {
                let VmEvent::Api(call) = event else { continue };
                let answer = match call.request {
                    ApiRequest::GetInstanceInfo => {
                        Ok(ApiResponse::InstanceInfo(api::InstanceInfo::new("vm0", "0.1.0", VmState::Running)))
                    }
                    ApiRequest::GetMemory => Ok(ApiResponse::MemoryReport(Box::new(api::MemoryReport::example()))),
                    ApiRequest::PutGuestMemory(t) => Ok(ApiResponse::GuestMemoryStatus(Box::new(api::GuestMemoryStatus {
                        target_mib: t.target_mib,
                        held_bytes: t.target_bytes(),
                        status: api::GuestMemoryOutcome::Ok,
                        report: None,
                    }))),
                    ApiRequest::PutActions(_) => {
                        Err(api::ApiError::InvalidState { action: "start the VM".into(), state: VmState::Running })
                    }
                    _ => Ok(ApiResponse::NoContent),
                };
                let _ = call.reply.send(answer);
            }
        });
        let server = vmm::api_server::start(&dir.path().join("api.sock"), tx, Default::default()).unwrap();
        (server, dir)
    }

    #[test]
    fn requests_carry_host_and_content_type() {
        let req = build_request("PUT", "/guest/memory", Some(&serde_json::json!({"target_mib": 1}))).unwrap();
        assert_eq!(req.method(), "PUT");
        assert_eq!(req.uri(), "/guest/memory");
        assert_eq!(req.headers()[HOST], "localhost");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/json");
        let req = build_request("GET", "/", None).unwrap();
        assert!(req.headers().get(CONTENT_TYPE).is_none());
        assert!(matches!(build_request("GE T", "/", None), Err(ClientError::BadRequest { .. })));
    }

    #[test]
    fn one_client_serves_many_requests_raw_and_typed() {
        let (server, _dir) = server();
        let sock = server.path();
        let client = Client::new().unwrap();
        let (status, v) = client.request(sock, "GET", "/", None).unwrap();
        assert_eq!((status, v["state"].as_str()), (200, Some("Running")));
        let body = serde_json::json!({"target_mib": 64});
        let (status, v) = client.request(sock, "PUT", "/guest/memory", Some(&body)).unwrap();
        assert_eq!((status, v["held_bytes"].as_u64()), (200, Some(64 << 20)));
        let (status, v) = client.request(sock, "PATCH", "/vm", Some(&serde_json::json!({"state": "Paused"}))).unwrap();
        assert_eq!((status, v), (204, Value::Null));
        let (status, v) = client.request(sock, "GET", "/nope", None).unwrap();
        assert_eq!(status, 404);
        assert!(fault_message(&v).contains("no such path"));
        let report: api::MemoryReport = client.get(sock, api::Endpoint::GetMemory).unwrap();
        assert_eq!(report, api::MemoryReport::example());
        let start = serde_json::json!({"action_type": "InstanceStart"});
        let e = client.call::<Value>(sock, api::Endpoint::PutActions, Some(&start)).unwrap_err();
        assert!(matches!(e, ClientError::Fault { status: 409, .. }), "{e}");
        let e = client.get::<api::MemoryReport>(sock, api::Endpoint::GetInstanceInfo).unwrap_err();
        assert!(matches!(e, ClientError::UnexpectedBody(..)), "{e}");
    }

    #[test]
    fn an_unreachable_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Client::new().unwrap().request(&dir.path().join("none.sock"), "GET", "/", None).unwrap_err();
        assert!(matches!(err, ClientError::Connect(..)), "{err}");
    }

    #[test]
    fn fault_messages_are_read_from_error_bodies() {
        assert_eq!(fault_message(&serde_json::json!({"fault_message": "x"})), "x");
        assert_eq!(fault_message(&serde_json::json!([1])), "[1]");
        assert_eq!(fault_message(&Value::Null), "(no message)");
    }
}

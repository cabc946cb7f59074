//! The API server: a hyper HTTP/1.1 server on a Unix socket, as tasks on
//! the current-thread tokio runtime of the VMM's main thread, where the
//! controller runs too ([`bind`], [`ApiServer::serve`]). Tests and tools
//! with no controller run it on a thread of its own ([`start`]).
//!
//! It only turns bytes into [`api::ApiRequest`]s and answers back; it never
//! touches VM state. A request goes:
//!
//! 1. hyper reads the request line and headers: a client that starts a
//!    head and does not finish it within `header_read` gets 408, and a head
//!    hyper cannot parse or that is too large gets 400 or 431, each with a
//!    JSON body (hyper's own answers are replaced, see `http/wire.rs`).
//! 2. [`api::Endpoint::find`] answers 404/405 at once; a `Content-Length`
//!    over [`api::MAX_BODY_BYTES`] is answered 413 without reading the body.
//! 3. The body is read with a hard cap of [`api::MAX_BODY_BYTES`] (413 past
//!    it) and a deadline (`body_read`, 408 past it), then parsed with
//!    [`api::ApiRequest::parse`] (400 and friends on error).
//! 4. The request goes to the controller as a [`crate::events::VmEvent::Api`]; this side
//!    waits for the reply on a oneshot channel (504 after `vmm_reply`, 503 if
//!    the controller no longer takes events, 500 if it dropped the reply).
//! 5. The answer is written as JSON (`Content-Type: application/json`; 204
//!    has no body; errors are `{"fault_message": ...}`, 405 with `Allow`).
//!
//! Steps 2 to 5 are [`super::http`]. Every connection is its own task with
//! a small read buffer. At most `max_connections` are open at once; at the
//! cap the longest-idle connection is closed to make room for a new one
//! ([`super::connections`]), so no number of idle or keep-alive clients
//! locks a new client out. hyper's `header_read_timeout` closes a
//! connection that sends no complete request head within `header_read`,
//! and it also runs while a keep-alive connection waits for its next
//! request: that is the idle timeout.
//!
//! When the server stops, requests still waiting for the controller and
//! requests arriving on open connections are answered 503, then the
//! connections close (at most 2 s later).

use super::connections::{ConnectionStats, Connections};
use super::http::{serve_connection, Context, Limits};
use super::socket::{bind as bind_socket, remove_if_ours, SocketError, SocketIdentity};
use crate::events::EventSender;
use crate::metrics::Metrics;
use std::io;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Stack of the API thread; the work it does is small and shallow.
const THREAD_STACK_BYTES: usize = 512 * 1024;

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket path could not be claimed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The tokio runtime could not be built.
    #[error("cannot create the API runtime")]
    Runtime(#[source] io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the API thread")]
    Thread(#[source] io::Error),
}

/// A bound API socket and its server. Dropping it stops the server (and
/// joins its thread, if [`start`] gave it one), ends every connection, and
/// removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket we bound, so we never remove a file
    /// someone else put at the path since.
    identity: SocketIdentity,
    stop: Option<oneshot::Sender<()>>,
    /// What [`ApiServer::serve`] takes.
    unserved: Option<Unserved>,
    thread: Option<JoinHandle<()>>,
    connections: Arc<Connections>,
    /// The serving side's "stopping" flag, set as soon as
    /// [`ApiServer::stop_serving`] is called.
    stopping: Arc<watch::Sender<bool>>,
}

/// A bound server that nothing serves yet.
struct Unserved {
    listener: StdUnixListener,
    ctx: Arc<Context>,
    stop: oneshot::Receiver<()>,
    /// The socket file, removed as soon as the server stops accepting.
    socket: (PathBuf, SocketIdentity),
}

impl std::fmt::Debug for Unserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unserved").field("listener", &self.listener).finish_non_exhaustive()
    }
}

/// Binds the API socket at `path` for a server that runs on the caller's
/// runtime: [`ApiServer::serve`] gives the future that serves it. A client
/// may connect as soon as this returns (the kernel queues it until the
/// runtime accepts). This is how a VMM process serves: on its main thread,
/// next to the controller ([`crate::controller::Controller::run`]).
pub fn bind(path: &Path, to_vmm: EventSender, metrics: Arc<Metrics>) -> Result<ApiServer, ApiServerError> {
    bind_with(path, to_vmm, metrics, Limits::DEFAULT)
}

pub(crate) fn bind_with(
    path: &Path,
    to_vmm: EventSender,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<ApiServer, ApiServerError> {
    let (listener, identity) = bind_socket(path)?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let connections = Connections::new(limits.max_connections);
    let stopping = Arc::new(watch::Sender::new(false));
    let ctx = Arc::new(Context {
        to_vmm,
        metrics,
        limits,
        connections: connections.clone(),
        stopping: stopping.clone(),
    });
    Ok(ApiServer {
        path: path.to_path_buf(),
        identity,
        stop: Some(stop_tx),
        unserved: Some(Unserved { listener, ctx, stop: stop_rx, socket: (path.to_path_buf(), identity) }),
        thread: None,
        connections,
        stopping,
    })
}

/// Starts the API server on `path` on a thread of its own, with its own
/// runtime: for tests and tools that answer requests from a thread of their
/// own (a fake controller). A VMM process does not use it ([`bind`]).
/// Returns once the socket is listening.
pub fn start(path: &Path, to_vmm: EventSender, metrics: Arc<Metrics>) -> Result<ApiServer, ApiServerError> {
    start_with(path, to_vmm, metrics, Limits::DEFAULT)
}

pub(crate) fn start_with(
    path: &Path,
    to_vmm: EventSender,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<ApiServer, ApiServerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ApiServerError::Runtime)?;
    let mut server = bind_with(path, to_vmm, metrics, limits)?;
    let Some(serving) = server.serve() else { unreachable!("a server just bound is not served yet") };
    let thread = std::thread::Builder::new()
        .name("api".into())
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || runtime.block_on(serving));
    // On error, dropping the server removes the socket file.
    server.thread = Some(thread.map_err(ApiServerError::Thread)?);
    Ok(server)
}

impl ApiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many connections are open, and how many were evicted or refused.
    pub fn connection_stats(&self) -> ConnectionStats {
        self.connections.stats()
    }

    /// The server as a future for the caller's runtime (None if it was
    /// taken already). It accepts connections, each a task of its own on
    /// that runtime, until [`ApiServer::stop_serving`] (or dropping the
    /// server), then answers what is in flight (for at most 2 s)
    /// and resolves.
    pub fn serve(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let Unserved { listener, ctx, stop, socket } = self.unserved.take()?;
        Some(serve(listener, ctx, stop, socket))
    }

    /// Stops accepting: the future of [`ApiServer::serve`] drains and ends.
    pub fn stop_serving(&mut self) {
        // At once, so that an answer the controller has just given (to the
        // request that stopped the VM) tells its client to close.
        self.stopping.send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the server and removes the socket file (as dropping it does).
    pub fn shutdown(self) {
        drop(self);
    }

    fn stop(&mut self) {
        self.stop_serving();
        if let Some(thread) = self.thread.take() {
            // The thread only returns or panics; a panic there has already
            // been printed and must not take the VMM down with it.
            let _ = thread.join();
        }
        remove_if_ours(&self.path, self.identity);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a stopping server lets in-flight requests finish (so the answer
/// to the request that stopped the VM still reaches its client).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The server: accepts connections until `stop` fires, then stops
/// accepting and lets in-flight requests finish (at most [`DRAIN_TIMEOUT`]).
#[expect(clippy::manual_async_fn, reason = "the signature states the Send + 'static that spawning it needs")]
fn serve(
    listener: StdUnixListener,
    ctx: Arc<Context>,
    stop: oneshot::Receiver<()>,
    socket: (PathBuf, SocketIdentity),
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                crate::out::diag(format_args!("vmm: API server: cannot register the socket: {e}"));
                return;
            }
        };
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let table = ctx.connections.clone();
        // An error means the ApiServer was dropped: stop as well.
        let mut stop = stop;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut stop => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    // At the cap, the longest-idle connection makes room;
                    // if every one is busy, this one is closed at once.
                    let Some(admitted) = table.admit() else {
                        drop(stream);
                        continue;
                    };
                    tokio::spawn(serve_connection(stream, admitted, ctx.clone(), graceful.watcher()));
                }
                Err(e) => {
                    // Out of file descriptors or similar: wait instead of spinning.
                    crate::out::diag(format_args!("vmm: API server: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // From now on every request still waiting, or arriving on an open
        // connection, is answered 503 instead of being cut off.
        // `send` would not store the value while no request is subscribed.
        ctx.stopping.send_replace(true);
        // No client can connect once the file is gone. Those the kernel
        // queued before are served (503) rather than reset with the listener.
        remove_if_ours(&socket.0, socket.1);
        let late = queued_connections(listener);
        let mut queued = tokio::task::JoinSet::new();
        // hyper's graceful shutdown closes a connection that has not sent a
        // request yet; a queued client has not been read at all, so it gets
        // its 503 (with `Connection: close`) outside that.
        let queued_graceful = hyper_util::server::graceful::GracefulShutdown::new();
        for stream in late {
            if let Some(admitted) = table.admit() {
                queued.spawn(serve_connection(stream, admitted, ctx.clone(), queued_graceful.watcher()));
            }
        }
        let drain = async {
            tokio::join!(graceful.shutdown(), queued.join_all());
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    }
}

/// Most queued connections a stopping server still answers.
const MAX_QUEUED: usize = 128;

/// The connections waiting in `listener`'s backlog (at most [`MAX_QUEUED`]),
/// taken without blocking. Once the socket file is removed, nothing can be
/// added to the backlog, so this is every client that connected in time.
fn queued_connections(listener: tokio::net::UnixListener) -> Vec<tokio::net::UnixStream> {
    let Ok(listener) = listener.into_std() else { return Vec::new() };
    let mut out = Vec::new();
    while out.len() < MAX_QUEUED {
        let Ok((stream, _)) = listener.accept() else { break };
        let stream = stream.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(stream));
        if let Ok(stream) = stream {
            out.push(stream);
        }
    }
    out
}


#[cfg(test)]
pub(crate) mod tests {
    use super::super::socket::SOCKET_MODE;
    use super::*;
    use api::{
        ActionType, ApiError, ApiRequest, ApiResponse, GuestMemoryOutcome, GuestMemoryStatus, InstanceInfo,
        MachineConfig, MemoryReport, VmState, MAX_BODY_BYTES,
    };
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream as StdUnixStream;
    use std::sync::atomic::Ordering;
    use crate::events::{channel, EventReceiver, VmEvent};

    /// The VMM thread of the tests: answers from fixed data. `PUT /boot-source`
    /// drops its reply unanswered; `PUT /guest/memory` with `target_mib: 999`
    /// is never answered (held until the channel closes).
    fn fake_vmm(mut rx: EventReceiver) {
        let mut held = Vec::new();
        while let Some(event) = rx.blocking_recv() {
            let VmEvent::Api(call) = event else { continue };
            let answer = match call.request {
                ApiRequest::GetInstanceInfo => Ok(ApiResponse::InstanceInfo(InstanceInfo::new(
                    "vm0",
                    "0.1.0",
                    VmState::Running,
                ))),
                ApiRequest::GetMachineConfig => {
                    Ok(ApiResponse::MachineConfig(MachineConfig::default()))
                }
                ApiRequest::GetMemory => Ok(ApiResponse::MemoryReport(Box::new(MemoryReport::example()))),
                ApiRequest::GetMetrics => Ok(ApiResponse::Metrics(api::Metrics::default())),
                ApiRequest::PutActions(a) if a.action_type == ActionType::InstanceStart => {
                    Err(ApiError::InvalidState {
                        action: "start the VM".into(),
                        state: VmState::Running,
                    })
                }
                ApiRequest::PutBootSource(_) => {
                    drop(call.reply);
                    continue;
                }
                ApiRequest::PutGuestMemory(t) if t.target_mib == 999 => {
                    held.push(call.reply);
                    continue;
                }
                ApiRequest::PutGuestMemory(t) => Ok(ApiResponse::GuestMemoryStatus(Box::new(
                    GuestMemoryStatus {
                        target_mib: t.target_mib,
                        held_bytes: t.target_bytes(),
                        status: GuestMemoryOutcome::Ok,
                        report: None,
                    },
                ))),
                _ => Ok(ApiResponse::NoContent),
            };
            let _ = call.reply.send(answer);
        }
    }

    /// A server with the fake VMM behind it.
    pub(crate) struct Fixture {
        pub(crate) server: ApiServer,
        pub(crate) metrics: Arc<Metrics>,
        pub(crate) _dir: tempfile::TempDir,
    }

    impl Fixture {
        pub(crate) fn new() -> Fixture {
            Fixture::with_limits(Limits {
                header_read: Duration::from_millis(300),
                body_read: Duration::from_millis(300),
                vmm_reply: Duration::from_millis(500),
                max_connections: 128,
            })
        }

        fn with_limits(limits: Limits) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let (tx, rx) = channel();
            std::thread::spawn(move || fake_vmm(rx));
            let metrics = Arc::new(Metrics::default());
            let server = start_with(&dir.path().join("api.sock"), tx, metrics.clone(), limits).unwrap();
            Fixture {
                server,
                metrics,
                _dir: dir,
            }
        }

        pub(crate) fn sock(&self) -> &Path {
            self.server.path()
        }
    }

    /// An answer as read off the wire.
    #[derive(Debug)]
    struct Raw {
        status: u16,
        head: String,
        body: String,
    }

    impl Raw {
        fn parse(bytes: &[u8]) -> Raw {
            let text = String::from_utf8_lossy(bytes).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Raw {
                status,
                head: head.to_ascii_lowercase(),
                body: body.to_string(),
            }
        }

        fn fault(&self) -> String {
            let v: serde_json::Value = serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"));
            assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
            v["fault_message"].as_str().unwrap().to_string()
        }
    }

    fn connect(sock: &Path) -> StdUnixStream {
        let s = StdUnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends `bytes` and reads the answer until the server closes.
    fn raw(sock: &Path, bytes: &[u8]) -> Raw {
        let mut s = connect(sock);
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        Raw::parse(&out)
    }

    /// A one-request exchange (`Connection: close`).
    fn call(sock: &Path, method: &str, path: &str, body: &str) -> Raw {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        raw(sock, req.as_bytes())
    }

    #[test]
    fn answers_get_and_the_socket_is_private() {
        let f = Fixture::new();
        let mode = std::fs::metadata(f.sock()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        let r = call(f.sock(), "GET", "/", "");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.head.contains("content-type: application/json"), "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["state"], "Running");
        assert_eq!(f.metrics.api_requests.load(Ordering::Relaxed), 1);
        assert_eq!(f.metrics.api_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn no_content_has_no_body() {
        let f = Fixture::new();
        let r = call(f.sock(), "PATCH", "/vm", r#"{"state":"Paused"}"#);
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(r.body, "");
    }

    #[test]
    fn keep_alive_serves_several_requests() {
        let f = Fixture::new();
        let mut s = connect(f.sock());
        let req = b"GET /machine-config HTTP/1.1\r\nHost: x\r\n\r\n";
        s.write_all(req).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    }

    #[test]
    fn live_socket_is_refused() {
        let f = Fixture::new();
        let (tx, _rx) = channel();
        let err = start(f.sock(), tx, Arc::default()).unwrap_err();
        assert!(matches!(err, ApiServerError::Socket(SocketError::InUse(_))), "{err}");
        assert!(err.to_string().contains("another VMM is serving"), "{err}");
        // The first server is unharmed.
        assert_eq!(call(f.sock(), "GET", "/", "").status, 200);
    }

    #[test]
    fn socket_is_removed_on_shutdown_and_drop() {
        let f = Fixture::new();
        let path = f.sock().to_path_buf();
        f.server.shutdown();
        assert!(!path.exists());
        let f = Fixture::new();
        let path = f.sock().to_path_buf();
        drop(f.server);
        assert!(!path.exists());
    }

    #[test]
    fn request_errors_are_json_faults() {
        let f = Fixture::new();
        let r = call(f.sock(), "GET", "/nope", "");
        assert_eq!(r.status, 404, "{r:?}");
        assert!(r.fault().contains("no such path"), "{r:?}");

        let r = call(f.sock(), "DELETE", "/guest/memory", "");
        assert_eq!(r.status, 405, "{r:?}");
        assert!(r.head.contains("\r\nallow: get, put"), "{r:?}");
        assert!(r.fault().contains("DELETE is not allowed"), "{r:?}");

        let r = call(f.sock(), "PUT", "/machine-config", "{");
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r
            .fault()
            .starts_with("invalid body for PUT /machine-config"));

        let r = call(f.sock(), "PATCH", "/machine-config", r#"{"vcpus": 2}"#);
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.fault().contains("unknown field `vcpus`"), "{r:?}");

        let r = call(f.sock(), "PUT", "/actions", "");
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.fault(), "PUT /actions needs a JSON body");

        let r = call(
            f.sock(),
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        assert_eq!(r.status, 409, "{r:?}");
        assert!(r.head.contains("content-type: application/json"));
        assert_eq!(r.fault(), "cannot start the VM while the VM is Running");

        assert_eq!(f.metrics.api_requests.load(Ordering::Relaxed), 6);
        assert_eq!(f.metrics.api_errors.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn oversized_bodies_get_413() {
        let f = Fixture::new();
        // Declared too large: answered before the body is read.
        let head = format!(
            "PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{{",
            MAX_BODY_BYTES + 1
        );
        let r = raw(f.sock(), head.as_bytes());
        assert_eq!(r.status, 413, "{r:?}");
        assert!(r.fault().contains(&format!("at most {MAX_BODY_BYTES}")), "{r:?}");

        // Chunked, with no length up front: cut off at the cap.
        let mut req =
            b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for _ in 0..MAX_BODY_BYTES.div_ceil(0x1000) {
            req.extend_from_slice(b"1000\r\n");
            req.extend_from_slice(&[b' '; 0x1000]);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let r = raw(f.sock(), &req);
        assert_eq!(r.status, 413, "{r:?}");
        assert!(r.fault().contains(&format!("over {MAX_BODY_BYTES} bytes")), "{r:?}");

        // Exactly the cap is fine (blank padding around a valid body).
        let mut body = vec![b' '; MAX_BODY_BYTES - 2];
        body.splice(0..0, *b"{}");
        let r = call(
            f.sock(),
            "PATCH",
            "/machine-config",
            std::str::from_utf8(&body).unwrap(),
        );
        assert_eq!(r.status, 204, "{r:?}");
    }

    #[test]
    fn half_a_body_then_hang_up_harms_nothing() {
        let f = Fixture::new();
        {
            let mut s = connect(f.sock());
            s.write_all(
                b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mem",
            )
            .unwrap();
        }
        let r = call(f.sock(), "GET", "/", "");
        assert_eq!(r.status, 200, "{r:?}");
    }

    #[test]
    fn slow_body_gets_408() {
        let f = Fixture::new();
        let mut s = connect(f.sock());
        s.write_all(b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let r = Raw::parse(&out);
        assert_eq!(r.status, 408, "{r:?}");
        assert!(r.fault().contains("did not arrive"), "{r:?}");
    }

    #[test]
    fn a_head_that_never_completes_gets_408_and_a_silent_client_is_closed() {
        let f = Fixture::new();
        let mut buf = [0u8; 512];
        // Nothing sent: closed without an answer (a 408 could cross a
        // request sent at that moment).
        let mut s = connect(f.sock());
        let n = s.read(&mut buf).expect("server kept a silent client");
        assert_eq!(n, 0, "{:?}", Raw::parse(&buf[..n]));
        // Half a head, on a fresh connection and after a keep-alive answer.
        for before in [&b""[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"] {
            let mut s = connect(f.sock());
            let mut out = Vec::new();
            if !before.is_empty() {
                // A keep-alive client: its first answer, then half a head.
                s.write_all(before).unwrap();
                while !out.ends_with(b"}") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "closed before the first answer");
                    out.extend_from_slice(&buf[..n]);
                }
            }
            s.write_all(b"GET / HTTP/1.1\r\nHost").unwrap();
            s.read_to_end(&mut out).expect("server kept a slow client");
            let text = String::from_utf8_lossy(&out).into_owned();
            let last = &text[text.rfind("HTTP/1.1 ").unwrap_or(0)..];
            let r = Raw::parse(last.as_bytes());
            assert_eq!(r.status, 408, "{text}");
            assert!(r.head.contains("content-type: application/json"), "{r:?}");
            assert!(r.fault().contains("did not arrive within 0.3 s"), "{r:?}");
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1 + usize::from(!before.is_empty()), "{text}");
        }
        assert_eq!(call(f.sock(), "GET", "/", "").status, 200);
    }

    #[test]
    fn what_hyper_refuses_itself_gets_a_json_fault() {
        let f = Fixture::new();
        let bad = |r: &Raw, status: u16, says: &str| {
            assert_eq!(r.status, status, "{r:?}");
            assert!(r.head.contains("content-type: application/json"), "{r:?}");
            assert!(r.fault().contains(says), "{r:?}");
        };
        for junk in [
            &b"\x00\x01\x02\xff\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"PUT /actions HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ] {
            bad(&raw(f.sock(), junk), 400, "is not valid HTTP/1.1");
        }
        // A body hyper cannot decode reaches the service, which answers.
        let r = raw(f.sock(), b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        bad(&r, 400, "cannot read the request body");
        bad(&raw(f.sock(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 400, "HTTP/2 is not served");
        // Too many headers, and a head larger than the read buffer.
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let r = raw(f.sock(), format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes());
        bad(&r, 431, "at most 32 headers");
        let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "y".repeat(70_000));
        bad(&raw(f.sock(), huge.as_bytes()), 431, "bytes of request line and headers");
        // A target over the server's limit (well under hyper's).
        let long = format!("/{}", "a".repeat(super::super::http::MAX_TARGET_BYTES));
        bad(&call(f.sock(), "GET", &long, ""), 414, "at most 4096 are accepted");
        // A header value that is not text is the service's to judge.
        let r = raw(f.sock(), b"GET / HTTP/1.1\r\nX: \xff\xfe\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(call(f.sock(), "GET", "/", "").status, 200);
    }

    #[test]
    fn answers_before_hyper_s_own_pass_unchanged() {
        let f = Fixture::new();
        // Pipelined: two good requests (one HEAD, answered without a body,
        // one with Expect: 100-continue), then garbage.
        let mut req = b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        req.extend_from_slice(b"PATCH /vm HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 18\r\n\r\n");
        req.extend_from_slice(br#"{"state":"Paused"}"#);
        req.extend_from_slice(b"GET /machine-config HTTP/1.1\r\nHost: x\r\n\r\n");
        req.extend_from_slice(b"\x01 nonsense\r\n\r\n");
        let mut s = connect(f.sock());
        s.write_all(&req).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let statuses: Vec<&str> = text
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &text[i + 9..(i + 12).min(text.len())])
            .filter(|code| code.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        assert!(statuses == ["405", "204", "200", "400"] || statuses == ["405", "100", "204", "200", "400"], "{text}");
        let machine = &text[text.find("HTTP/1.1 200").unwrap()..text.rfind("HTTP/1.1 400").unwrap()];
        let body = Raw::parse(machine.as_bytes()).body;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v["mem_size_mib"], 2048, "{text}");
        let last = Raw::parse(&text.as_bytes()[text.rfind("HTTP/1.1 400").unwrap()..]);
        assert!(last.fault().contains("is not valid HTTP/1.1"), "{last:?}");
    }

    #[test]
    fn fifty_concurrent_clients_all_get_answers() {
        let f = Fixture::new();
        let sock = f.sock().to_path_buf();
        // Open every connection first, so they are all in flight at once.
        let streams: Vec<StdUnixStream> = (0..50).map(|_| connect(&sock)).collect();
        let threads: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                std::thread::spawn(move || {
                    let req = if i % 2 == 0 {
                        "GET /memory HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string()
                    } else {
                        let body = format!(r#"{{"target_mib": {i}}}"#);
                        format!(
                            "PUT /guest/memory HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    s.write_all(req.as_bytes()).unwrap();
                    let mut out = Vec::new();
                    s.read_to_end(&mut out).unwrap();
                    (i, Raw::parse(&out))
                })
            })
            .collect();
        for t in threads {
            let (i, r) = t.join().unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            if i % 2 == 1 {
                assert_eq!(v["target_mib"], i as u64);
            } else {
                assert_eq!(v["valid"], true);
            }
        }
        assert_eq!(f.metrics.api_requests.load(Ordering::Relaxed), 50);
    }

    #[test]
    fn dropped_reply_is_500() {
        let f = Fixture::new();
        let r = call(f.sock(), "PUT", "/boot-source", "{}");
        assert_eq!(r.status, 500, "{r:?}");
        assert_eq!(r.fault(), "internal error: the VMM did not answer");
    }

    #[test]
    fn slow_vmm_is_504() {
        let f = Fixture::new();
        let r = call(f.sock(), "PUT", "/guest/memory", r#"{"target_mib":999}"#);
        assert_eq!(r.status, 504, "{r:?}");
        assert!(r.fault().contains("did not answer within"), "{r:?}");
    }

    #[test]
    fn idle_keep_alive_connection_is_closed() {
        let f = Fixture::new();
        let mut s = connect(f.sock());
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // The answer, then EOF once the idle connection times out.
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("idle connection kept open");
        assert_eq!(Raw::parse(&out).status, 200);
    }

    #[test]
    fn shutdown_with_a_request_in_flight_does_not_hang() {
        let f = Fixture::with_limits(Limits {
            vmm_reply: Duration::from_secs(60),
            ..Limits::DEFAULT
        });
        let sock = f.sock().to_path_buf();
        let client = std::thread::spawn(move || {
            call(&sock, "PUT", "/guest/memory", r#"{"target_mib":999}"#)
        });
        while f.metrics.api_requests.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        f.server.shutdown();
        // The waiting client gets the documented 503, not a cut connection.
        let r = client.join().unwrap();
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.fault().contains("shutting down"), "{r:?}");
    }

    #[test]
    fn idle_connections_at_the_cap_make_room_for_a_new_client() {
        let f = Fixture::with_limits(Limits {
            header_read: Duration::from_secs(60),
            max_connections: 4,
            ..Limits::DEFAULT
        });
        // Keep-alive clients between requests, then silent ones: twice the cap.
        let mut idle: Vec<StdUnixStream> = (0..2).map(|_| connect(f.sock())).collect();
        for s in idle.iter_mut() {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = [0u8; 512];
            assert!(s.read(&mut buf).unwrap() > 0);
        }
        idle.extend((0..6).map(|_| connect(f.sock())));
        // Without eviction this would wait for the 60 s header timeout.
        let r = call(f.sock(), "GET", "/", "");
        assert_eq!(r.status, 200, "{r:?}");
        // The oldest were closed to make room: they read EOF (or a reset).
        let mut buf = [0u8; 16];
        let closed = idle[0].read(&mut buf);
        assert!(matches!(closed, Ok(0)) || closed.is_err(), "{closed:?}");
        let stats = f.server.connection_stats();
        assert!(stats.open <= 4, "{stats:?}");
        assert!(stats.evicted >= 5, "{stats:?}");
    }

    #[test]
    fn the_answer_to_the_request_that_stops_the_server_closes_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = channel();
        let mut server = bind(&dir.path().join("api.sock"), tx, Arc::default()).unwrap();
        let sock = server.path().to_path_buf();
        let serving = server.serve().unwrap();
        // A keep-alive client: without `Connection: close` in the answer it
        // could send its next request into a closing connection.
        let client = std::thread::spawn(move || {
            let body = r#"{"action_type":"Shutdown"}"#;
            let req = format!("PUT /actions HTTP/1.1\r\nHost: vmm\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            raw(&sock, req.as_bytes())
        });
        // One thread for the server and the "controller", as in a VMM: the
        // controller answers Shutdown, then stops the server, with nothing
        // in between that lets the connection write its answer.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let served = tokio::spawn(serving);
            let Some(VmEvent::Api(call)) = rx.recv().await else { panic!("no API call") };
            let _ = call.reply.send(Ok(ApiResponse::NoContent));
            server.stop_serving();
            served.await.unwrap();
        });
        let r = client.join().unwrap();
        assert_eq!(r.status, 204, "{r:?}");
        assert!(r.head.to_ascii_lowercase().contains("connection: close"), "{r:?}");
    }

    #[test]
    fn a_client_queued_when_the_server_stops_gets_503_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (tx, _rx) = channel();
        let mut server = bind(&path, tx, Arc::default()).unwrap();
        // Connected and sent, but still in the kernel's backlog: nothing
        // has accepted it when the server is told to stop.
        let mut client = connect(&path);
        client.write_all(b"GET / HTTP/1.1\r\nHost: vmm\r\n\r\n").unwrap();
        server.stop_serving();
        let serving = server.serve().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let thread = std::thread::spawn(move || runtime.block_on(serving));
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        thread.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer:?}");
        assert!(answer.contains("shutting down"), "{answer:?}");
        // The socket went away when the server stopped accepting.
        assert!(!path.exists());
    }

    #[test]
    fn exiting_vmm_is_503() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = channel();
        drop(rx);
        let server = start(&dir.path().join("api.sock"), tx, Arc::default()).unwrap();
        let r = call(server.path(), "GET", "/", "");
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.fault().contains("shutting down"), "{r:?}");
    }
}

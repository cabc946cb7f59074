//! One API connection on the wire: hyper serves it, and this module makes
//! sure that what hyper answers on its own carries a `fault_message` body
//! like every other error, and that a request head that never completes
//! gets a 408 before the close.
//!
//! hyper answers three kinds of request without ever calling the service:
//! a request line or header it cannot parse (400), a head over its read
//! buffer or header count (431) and a target over its own URI limit (414).
//! It writes those answers itself, with an empty body, and then closes the
//! connection. A head that does not arrive within `header_read` ends the
//! connection with a timeout error and no answer at all. hyper 1 has no hook
//! to change either, so this module sits between hyper and the socket:
//!
//! 1. [`Wire`] is the connection's I/O as hyper sees it. Every answer the
//!    service gives is queued in [`Exchange`] (with whether it answers a
//!    `HEAD`, which hyper writes without its body) before hyper writes it,
//!    and hyper writes answers in that order. So when hyper starts writing
//!    a final (non-1xx) response and the queue is empty, the service gave
//!    no answer for it: it is hyper's own. [`Wire`] drops those bytes (and
//!    hyper's shutdown of the socket) instead of sending them.
//! 2. To know where each response starts, [`Wire`] frames what hyper
//!    writes: it parses each response head with `httparse` (as hyper parses
//!    requests) and lets the head and `content-length` body bytes through.
//!    This relies on hyper writing every head whole into one buffer before
//!    writing it out (its "flatten" write strategy, which it uses because
//!    [`Wire`] does not offer vectored writes). If a head cannot be framed
//!    for any reason, everything passes through unchanged from then on and
//!    nothing is replaced: the failure mode is hyper's own empty answer.
//! 3. When hyper's connection future ends with its error, [`serve_connection`]
//!    writes the JSON answer hyper's error calls for (400, 414, 431; 408
//!    for a head that started but did not complete in time) and closes,
//!    reading and discarding what the client still sends for at most
//!    [`LINGER`], so the client reads the answer instead of a reset.
//!
//! The alternative of checking each request head with `httparse` before
//! hyper reads it needs to know where every request ends (its body's
//! `content-length` or chunked framing) to find the next head: that is an
//! HTTP/1.1 request parser of our own. Framing our own responses needs only
//! `content-length`, since every body the service returns has a known size.
//!
//! A connection that sent nothing since its last answer (a fresh one, or a
//! keep-alive one between requests) is closed without an answer when the
//! header timeout hits, as RFC 9112 section 9.5 allows: a 408 there could
//! cross a request the client sends at that moment and be read as its
//! answer.

use super::{handle, Context, Limits};
use crate::api_server::connections::Admitted;
use crate::metrics::Metrics;
use api::ApiErrorBody;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// hyper's per-connection read buffer cap: request head plus a full body
/// ([`api::MAX_BODY_BYTES`], 50 KiB), with room to spare (hyper's minimum
/// is 8 KiB). A request that fits is read whole, so even one refused with
/// 413 gets its answer instead of a reset connection.
pub(crate) const CONNECTION_BUFFER_BYTES: usize = 64 * 1024;
const _: () = assert!(api::MAX_BODY_BYTES + 8 * 1024 <= CONNECTION_BUFFER_BYTES);

/// Most bytes of request line and headers (431 past it). hyper's read
/// buffer alone does not bound a head: one read can take it past the cap.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
const _: () = assert!(super::MAX_TARGET_BYTES + 4 * 1024 <= MAX_HEAD_BYTES);

/// Most headers a request may carry (431 past it).
pub(crate) const MAX_HEADERS: usize = 32;

/// How long a connection that got one of these answers is kept to deliver
/// it: writing it, then reading and discarding what the client still sends
/// (so that closing with unread bytes does not reset the connection before
/// the client has read the answer).
const LINGER: Duration = Duration::from_secs(1);

/// Most bytes read and discarded while lingering.
const LINGER_BYTES: u64 = 1 << 20;

/// Serves one accepted connection until it ends or is evicted, then writes
/// the JSON answer that hyper's own error calls for, if any.
pub(crate) async fn serve_connection(
    stream: UnixStream,
    mut admitted: Admitted,
    ctx: Arc<Context>,
    watcher: Watcher,
) {
    let exchange = Arc::new(Exchange::default());
    let id = admitted.id;
    let (give_back, given_back) = oneshot::channel();
    let ended = {
        let service_ctx = ctx.clone();
        let service_exchange = exchange.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let ctx = service_ctx.clone();
            let exchange = service_exchange.clone();
            async move {
                let _busy = ctx.connections.busy(id);
                let to_head = req.method() == Method::HEAD;
                let response = handle(req, &ctx).await;
                exchange.answered(to_head);
                Ok::<_, Infallible>(response)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(ctx.limits.header_read)
            .max_buf_size(CONNECTION_BUFFER_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS);
        let wire = Wire {
            parts: Some(WireParts { stream, out: Outgoing::Boundary }),
            exchange: exchange.clone(),
            give_back: Some(give_back),
        };
        let conn = watcher.watch(builder.serve_connection(TokioIo::new(wire), service));
        // Eviction drops the connection, which closes it.
        tokio::select! {
            ended = conn => Some(ended),
            _ = &mut admitted.evicted => None,
        }
    };
    // Errors here are the client's (malformed request, timeout, hang-up);
    // nothing else is hurt by them.
    let Some(Err(error)) = ended else { return };
    // hyper has dropped the connection's I/O by now, which gave the socket back.
    let Ok(WireParts { mut stream, out }) = given_back.await else { return };
    let Some((status, message)) = exchange.fallback(&out, &error, &ctx.limits) else { return };
    Metrics::inc(&ctx.metrics.api_requests);
    Metrics::inc(&ctx.metrics.api_errors);
    let answer = raw_fault(status, &message);
    tokio::select! {
        _ = tokio::time::timeout(LINGER, deliver(&mut stream, &answer)) => {}
        _ = &mut admitted.evicted => {}
    }
}

/// Writes `answer`, shuts the writing side, then reads and discards what
/// the client still sends (at most [`LINGER_BYTES`]) until it closes.
async fn deliver(stream: &mut UnixStream, answer: &[u8]) -> io::Result<()> {
    stream.write_all(answer).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        match stream.read(&mut sink).await? {
            0 => break,
            n => discarded += n as u64,
        }
    }
    Ok(())
}

/// A complete HTTP/1.1 error answer with a `fault_message` body, for when
/// hyper is no longer there to write one (the connection then closes).
fn raw_fault(status: StatusCode, message: &str) -> Vec<u8> {
    let body = serde_json::to_vec(&ApiErrorBody { fault_message: message.to_string() })
        .unwrap_or_else(|_| br#"{"fault_message":"internal error"}"#.to_vec());
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

/// What the service and the connection's I/O share.
#[derive(Debug, Default)]
struct Exchange {
    /// The service's answers that hyper has not started to write yet, in
    /// order: for each, whether it answers a `HEAD` request.
    answers: Mutex<VecDeque<bool>>,
    /// Bytes read from the client so far.
    read: AtomicU64,
    /// `read` when the service last answered.
    read_at_answer: AtomicU64,
}

impl Exchange {
    fn answers(&self) -> std::sync::MutexGuard<'_, VecDeque<bool>> {
        // Nothing panics while holding the lock; the queue stays consistent.
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The service answered a request (`to_head`: a `HEAD` one).
    fn answered(&self, to_head: bool) {
        self.read_at_answer.store(self.read.load(Ordering::Relaxed), Ordering::Relaxed);
        self.answers().push_back(to_head);
    }

    /// Whether the client sent something since the last answer (or since
    /// it connected): a request head it has not finished.
    fn started_a_head(&self) -> bool {
        self.read.load(Ordering::Relaxed) > self.read_at_answer.load(Ordering::Relaxed)
    }

    /// The answer hyper's connection error calls for, if hyper did not
    /// give it a body (or gave none at all) and the connection is between
    /// responses.
    fn fallback(&self, out: &Outgoing, error: &hyper::Error, limits: &Limits) -> Option<(StatusCode, String)> {
        match *out {
            Outgoing::Swallowed(code) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
                Some((status, own_answer_message(status, error)))
            }
            Outgoing::Boundary if self.answers().is_empty() => {
                if error.is_timeout() && self.started_a_head() {
                    Some((
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the request line and headers did not arrive within {} s",
                            limits.header_read.as_secs_f64()
                        ),
                    ))
                } else if error.is_parse() {
                    // hyper closes without writing for these (an HTTP/2 preface).
                    Some((StatusCode::BAD_REQUEST, own_answer_message(StatusCode::BAD_REQUEST, error)))
                } else if error.is_incomplete_message() && self.started_a_head() {
                    Some((
                        StatusCode::BAD_REQUEST,
                        "the client closed its side of the connection before the request head was complete"
                            .to_string(),
                    ))
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// The `fault_message` for an answer hyper gave on its own.
fn own_answer_message(status: StatusCode, error: &hyper::Error) -> String {
    match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => format!(
            "the request head is too large: at most {MAX_HEADERS} headers and {MAX_HEAD_BYTES} bytes \
             of request line and headers are accepted"
        ),
        StatusCode::URI_TOO_LONG => {
            format!("the request target is too long: at most {} bytes are accepted", super::MAX_TARGET_BYTES)
        }
        StatusCode::BAD_REQUEST if error.is_parse_version_h2() => {
            "HTTP/2 is not served; send HTTP/1.1 requests".to_string()
        }
        _ => format!("the request is not valid HTTP/1.1 ({error})"),
    }
}

/// Where the bytes hyper writes stand.
#[derive(Debug)]
enum Outgoing {
    /// At the start of a response (or of the connection).
    Boundary,
    /// Inside a response being sent: this many bytes of it (head and body)
    /// are still to go.
    Passing(usize),
    /// hyper's own answer, with this status, is being written: its bytes are
    /// dropped, and [`serve_connection`] answers in its place.
    Swallowed(u16),
    /// A response could not be framed: everything goes through as written.
    Lost,
}

impl Outgoing {
    /// What to do with the response that starts at `buf` (hyper's whole
    /// buffer of what it has to write).
    fn at_response_start(buf: &[u8], exchange: &Exchange) -> Outgoing {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut head = httparse::Response::new(&mut headers);
        let (Ok(httparse::Status::Complete(head_len)), Some(code)) = (head.parse(buf), head.code) else {
            return Outgoing::Lost;
        };
        if (100..200).contains(&code) {
            // "100 Continue": hyper's, before the service's answer; no body.
            return Outgoing::Passing(head_len);
        }
        let Some(to_head) = exchange.answers().pop_front() else {
            return Outgoing::Swallowed(code);
        };
        if to_head || code == 204 || code == 304 {
            return Outgoing::Passing(head_len);
        }
        let length = head
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        match length.and_then(|body| head_len.checked_add(body)) {
            Some(total) => Outgoing::Passing(total),
            None => Outgoing::Lost,
        }
    }
}

/// The connection's socket as hyper sees it (see the module doc). hyper
/// needs to own it; when hyper drops it, the socket and where its bytes
/// stand are given back to [`serve_connection`].
struct Wire {
    /// Always there until dropped.
    parts: Option<WireParts>,
    exchange: Arc<Exchange>,
    give_back: Option<oneshot::Sender<WireParts>>,
}

struct WireParts {
    stream: UnixStream,
    out: Outgoing,
}

impl Wire {
    fn parts(&mut self) -> io::Result<&mut WireParts> {
        self.parts.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        if let (Some(parts), Some(give_back)) = (self.parts.take(), self.give_back.take()) {
            // The receiver is gone if the task ended first: the socket closes.
            let _ = give_back.send(parts);
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.parts()?.stream).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        this.exchange.read.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let exchange = this.exchange.clone();
        let WireParts { stream, out } = this.parts()?;
        if buf.is_empty() {
            return Pin::new(stream).poll_write(cx, buf);
        }
        if let Outgoing::Boundary = out {
            *out = Outgoing::at_response_start(buf, &exchange);
        }
        match *out {
            Outgoing::Swallowed(_) => Poll::Ready(Ok(buf.len())),
            Outgoing::Passing(left) => {
                let n = ready!(Pin::new(stream).poll_write(cx, &buf[..left.min(buf.len())]))?;
                *out = match left - n.min(left) {
                    0 => Outgoing::Boundary,
                    left => Outgoing::Passing(left),
                };
                Poll::Ready(Ok(n))
            }
            Outgoing::Lost | Outgoing::Boundary => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().parts()?.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let WireParts { stream, out } = self.get_mut().parts()?;
        if let Outgoing::Swallowed(_) = out {
            // The answer that replaces hyper's is still to be written.
            return Poll::Ready(Ok(()));
        }
        Pin::new(stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(answers: &[bool]) -> Exchange {
        let e = Exchange::default();
        e.answers().extend(answers.iter().copied());
        e
    }

    const OURS: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\
                          date: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n{\"a\"}";
    const HYPERS: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n";

    #[test]
    fn a_response_the_service_gave_passes_whole_and_one_it_did_not_is_swallowed() {
        let e = exchange(&[false]);
        let mut bytes = OURS.to_vec();
        bytes.extend_from_slice(HYPERS);
        assert!(matches!(Outgoing::at_response_start(&bytes, &e), Outgoing::Passing(n) if n == OURS.len()));
        // The service's answer was used up: the next head is hyper's.
        assert!(matches!(Outgoing::at_response_start(HYPERS, &e), Outgoing::Swallowed(400)));
    }

    #[test]
    fn head_answers_interim_answers_and_unframeable_ones() {
        // A HEAD answer has a content-length but no body.
        let e = exchange(&[true]);
        let head_len = OURS.len() - 5;
        assert!(matches!(Outgoing::at_response_start(OURS, &e), Outgoing::Passing(n) if n == head_len));
        // 100 Continue comes before the service answers, and uses no answer.
        let e = exchange(&[]);
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert!(matches!(Outgoing::at_response_start(cont, &e), Outgoing::Passing(25)));
        // A partial head, or no length: never replaced.
        assert!(matches!(Outgoing::at_response_start(&OURS[..20], &exchange(&[false])), Outgoing::Lost));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(matches!(Outgoing::at_response_start(chunked, &exchange(&[false])), Outgoing::Lost));
    }

    #[test]
    fn the_raw_answer_is_json_with_its_length() {
        let a = raw_fault(StatusCode::REQUEST_TIMEOUT, "too \"slow\"");
        let text = String::from_utf8(a).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["fault_message"], "too \"slow\"");
    }
}

//! One request, from hyper's parsed head to the answer written back: route,
//! body read under a cap and a deadline, parse into an [`api::ApiRequest`],
//! hand-off to the controller, wait for its reply, encode. Nothing here
//! touches VM state.

use crate::events::{ApiCall, VmEvent};
use crate::metrics::Metrics;
use api::{ApiError, ApiErrorBody, ApiRequest, ApiResponse, Endpoint, MAX_BODY_BYTES};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use crate::events::EventSender;
use std::sync::Arc;
use std::time::Duration;
use super::connections::Connections;
use tokio::sync::{oneshot, watch};

mod prometheus;
mod wire;

pub(crate) use wire::serve_connection;

/// Longest request target (path and query) served; 414 past it. The
/// API's paths are short; hyper's own limit is the 64 KiB head.
pub(crate) const MAX_TARGET_BYTES: usize = 4096;


/// The timeouts and limits of the server (shorter in tests).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// To receive a request's line and headers. It is also the idle
    /// timeout: hyper starts this clock whenever it waits for a request
    /// head, so a keep-alive connection with no next request is closed
    /// after it too.
    pub(crate) header_read: Duration,
    /// To receive a request's body.
    pub(crate) body_read: Duration,
    /// For the VMM thread to answer (`PUT /guest/memory` waits on the guest).
    pub(crate) vmm_reply: Duration,
    /// Connections open at once; at the cap the longest-idle one is closed
    /// for a new one ([`super::connections`]).
    pub(crate) max_connections: usize,
}

impl Limits {
    pub(crate) const DEFAULT: Limits = Limits {
        header_read: Duration::from_secs(5),
        body_read: Duration::from_secs(5),
        vmm_reply: Duration::from_secs(120),
        max_connections: 128,
    };
}


/// What every request handler needs.
pub(crate) struct Context {
    pub(crate) to_vmm: EventSender,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: Limits,
    /// Which connections are open, and which are busy.
    pub(crate) connections: Arc<Connections>,
    /// Set when the server stops: waiting requests are answered 503, and
    /// every answer from then on closes its connection.
    pub(crate) stopping: Arc<watch::Sender<bool>>,
}

/// Answers one request and counts it.
pub(crate) async fn handle(req: Request<Incoming>, ctx: &Context) -> Response<Full<Bytes>> {
    Metrics::inc(&ctx.metrics.api_requests);
    let mut response = with_fault_body(answer(req, ctx).await);
    if response.status().is_client_error() || response.status().is_server_error() {
        Metrics::inc(&ctx.metrics.api_errors);
    }
    // The answer to the request that stopped the VMM, and any after it:
    // the client must not send another request on this connection.
    if *ctx.stopping.borrow() {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Every error answer carries a `fault_message`: one without a body gets
/// a generic one (no path builds such an answer; this keeps it so).
fn with_fault_body(response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let status = response.status();
    let is_error = status.is_client_error() || status.is_server_error();
    if is_error && response.body().size_hint().exact() == Some(0) {
        let reason = status.canonical_reason().unwrap_or("error");
        let mut replaced = fault(status, format!("{reason} ({})", status.as_u16()));
        for (name, value) in response.headers() {
            if name != CONTENT_TYPE {
                replaced.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return replaced;
    }
    response
}

async fn answer(req: Request<Incoming>, ctx: &Context) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or(0, |t| t.as_str().len());
    if target > MAX_TARGET_BYTES {
        return fault(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target} bytes long; at most {MAX_TARGET_BYTES} are accepted"),
        );
    }
    let (method, path) = (parts.method.as_str(), parts.uri.path());
    // Route first, so a wrong path is answered without reading its body.
    if let Err(e) = Endpoint::find(method, path) {
        return error_response(&e.into());
    }
    if *ctx.stopping.borrow() {
        return shutting_down();
    }
    let body = match read_body(body, ctx.limits.body_read).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request = match ApiRequest::parse(method, path, &body) {
        Ok(request) => request,
        Err(e) => return error_response(&e),
    };
    if let Some(response) = prometheus::answer(&request, &parts, ctx).await {
        return response;
    }
    let (reply, answer) = oneshot::channel();
    if ctx
        .to_vmm
        .send(VmEvent::Api(ApiCall { request, reply }))
        .is_err()
    {
        return shutting_down();
    }
    let mut stopping = ctx.stopping.subscribe();
    let waited = tokio::select! {
        // An answer already there wins over the server stopping.
        biased;
        waited = tokio::time::timeout(ctx.limits.vmm_reply, answer) => waited,
        _ = stopping.wait_for(|&stop| stop) => return shutting_down(),
    };
    match waited {
        Ok(Ok(Ok(response))) => success_response(&response),
        Ok(Ok(Err(e))) => error_response(&e),
        Ok(Err(_)) => error_response(&ApiError::NoAnswer),
        Err(_) => fault(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the VMM did not answer within {} s; the request may still take effect",
                ctx.limits.vmm_reply.as_secs()
            ),
        ),
    }
}

/// 503: the VMM thread takes no more requests, or the server is stopping.
fn shutting_down() -> Response<Full<Bytes>> {
    fault(
        StatusCode::SERVICE_UNAVAILABLE,
        "the VMM is shutting down and takes no more requests".into(),
    )
}

/// Reads a body of at most [`MAX_BODY_BYTES`] within `deadline`, or the
/// error response to send instead.
async fn read_body(body: Incoming, deadline: Duration) -> Result<Bytes, Response<Full<Bytes>>> {
    let declared = body.size_hint().lower();
    if declared > MAX_BODY_BYTES as u64 {
        let len = usize::try_from(declared).unwrap_or(usize::MAX);
        return Err(error_response(&ApiError::PayloadTooLarge(len)));
    }
    match tokio::time::timeout(deadline, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(fault(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is over {MAX_BODY_BYTES} bytes; at most {MAX_BODY_BYTES} are accepted"),
        )),
        Ok(Err(e)) => Err(fault(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Err(_) => Err(fault(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                deadline.as_secs_f64()
            ),
        )),
    }
}

fn success_response(response: &ApiResponse) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(response.status()).unwrap_or(StatusCode::OK);
    match response.to_json() {
        Ok(Some(body)) => json_response(status, Bytes::from(body)),
        Ok(None) => json_response(StatusCode::NO_CONTENT, Bytes::new()),
        Err(e) => error_response(&ApiError::Encode(e)),
    }
}

fn error_response(err: &ApiError) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = fault_body(status, &err.body());
    if let Some(allow) = err.allow_header() {
        if let Ok(value) = HeaderValue::from_str(&allow) {
            response.headers_mut().insert(ALLOW, value);
        }
    }
    response
}

/// An error answer raised by the HTTP side itself (no [`ApiError`] for it).
fn fault(status: StatusCode, fault_message: String) -> Response<Full<Bytes>> {
    fault_body(status, &ApiErrorBody { fault_message })
}

fn fault_body(status: StatusCode, body: &ApiErrorBody) -> Response<Full<Bytes>> {
    let json = serde_json::to_vec(body)
        .unwrap_or_else(|_| br#"{"fault_message":"internal error"}"#.to_vec());
    json_response(status, Bytes::from(json))
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_answer_without_a_body_gets_a_fault_message() {
        let mut empty = json_response(StatusCode::METHOD_NOT_ALLOWED, Bytes::new());
        empty.headers_mut().insert(ALLOW, HeaderValue::from_static("GET"));
        let fixed = with_fault_body(empty);
        assert_eq!(fixed.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(fixed.headers()[ALLOW], "GET");
        assert_eq!(fixed.headers()[CONTENT_TYPE], "application/json");
        let body = fixed.body().size_hint().exact().unwrap();
        assert!(body > 0);
        // Success answers and errors with a body are kept as they are.
        let ok = with_fault_body(json_response(StatusCode::NO_CONTENT, Bytes::new()));
        assert_eq!(ok.body().size_hint().exact(), Some(0));
        let e = with_fault_body(fault(StatusCode::CONFLICT, "busy".into()));
        assert_eq!(e.body().size_hint().exact(), Some(br#"{"fault_message":"busy"}"#.len() as u64));
    }
}

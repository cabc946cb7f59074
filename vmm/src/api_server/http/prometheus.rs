//! `GET /metrics` in Prometheus' text format: content negotiation and the
//! answer. JSON stays the default (as Firecracker answers); a request gets
//! the text exposition ([`api::prometheus::vm`]: the counters, and the
//! memory figures of `GET /memory`) when its `Accept` header prefers
//! `text/plain` (version 0.0.4) to `application/json`, as a Prometheus
//! server's scrape does, or when it asks with `?format=prometheus`.
//! `?format=json` asks for JSON whatever `Accept` says.

use super::{error_response, fault, Context};
use crate::events::{ApiCall, VmEvent};
use api::{ApiError, ApiRequest, ApiResponse};
use headers_accept::Accept;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use mediatype::MediaType;
use std::str::FromStr;
use tokio::sync::oneshot;

/// How `GET /metrics` is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// The JSON body of `api::Metrics`.
    Json,
    /// Prometheus' text exposition format.
    Prometheus,
}

/// A `format` query value that names no format.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?} in the query: use format=prometheus or format=json")]
struct UnknownFormat(String);

/// The answer to `request` when it is a `GET /metrics` that asked for
/// Prometheus' text (or named an unknown format); `None` for every other
/// request, which is answered as usual.
pub(super) async fn answer(request: &ApiRequest, parts: &Parts, ctx: &Context) -> Option<Response<Full<Bytes>>> {
    if !matches!(request, ApiRequest::GetMetrics) {
        return None;
    }
    let accept = parts.headers.get(ACCEPT).and_then(|v| v.to_str().ok());
    match negotiate(accept, parts.uri.query()) {
        Ok(Format::Json) => None,
        Ok(Format::Prometheus) => Some(exposition(ctx).await),
        Err(e) => Some(fault(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

/// The format asked for: `?format=` first, then the `Accept` header; JSON
/// when neither prefers text, including a header that does not parse.
fn negotiate(accept: Option<&str>, query: Option<&str>) -> Result<Format, UnknownFormat> {
    let asked = query.and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "format"));
    if let Some((_, value)) = asked {
        return match value.as_ref() {
            "prometheus" | "text" => Ok(Format::Prometheus),
            "json" => Ok(Format::Json),
            other => Err(UnknownFormat(other.chars().take(64).collect())),
        };
    }
    let Some(accept) = accept.and_then(|a| Accept::from_str(a).ok()) else {
        return Ok(Format::Json);
    };
    let (Ok(json), Ok(text)) = (MediaType::parse("application/json"), MediaType::parse("text/plain; version=0.0.4")) else {
        return Ok(Format::Json);
    };
    // On a tie (`*/*`, or no type the client names), JSON: listed first.
    let available = [json, text];
    Ok(match accept.negotiate(&available) {
        Some(chosen) if *chosen == available[1] => Format::Prometheus,
        _ => Format::Json,
    })
}

/// Asks the VMM thread for the counters and the memory report, and writes
/// them as one exposition. Before the VM has booted there is no report: the
/// counters alone.
async fn exposition(ctx: &Context) -> Response<Full<Bytes>> {
    let metrics = match ask(ctx, ApiRequest::GetMetrics).await {
        Ok(Ok(ApiResponse::Metrics(m))) => m,
        Ok(Ok(_)) => return error_response(&ApiError::NoAnswer),
        Ok(Err(e)) => return error_response(&e),
        Err(response) => return response,
    };
    let report = match ask(ctx, ApiRequest::GetMemory).await {
        Ok(Ok(ApiResponse::MemoryReport(r))) => Some(r),
        Ok(Err(ApiError::InvalidState { .. })) => None,
        Ok(Ok(_)) => return error_response(&ApiError::NoAnswer),
        Ok(Err(e)) => return error_response(&e),
        Err(response) => return response,
    };
    let mut response = Response::new(Full::new(Bytes::from(api::prometheus::vm(&metrics, report.as_deref()))));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(api::prometheus::CONTENT_TYPE));
    response
}

/// One request to the VMM thread and its reply, or the error response when
/// no reply comes (the VMM is shutting down, or did not answer in time).
async fn ask(ctx: &Context, request: ApiRequest) -> Result<Result<ApiResponse, ApiError>, Response<Full<Bytes>>> {
    let (reply, answer) = oneshot::channel();
    if ctx.to_vmm.send(VmEvent::Api(ApiCall { request, reply })).is_err() {
        return Err(fault(StatusCode::SERVICE_UNAVAILABLE, "the VMM is shutting down and takes no more requests".into()));
    }
    match tokio::time::timeout(ctx.limits.vmm_reply, answer).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(_)) => Ok(Err(ApiError::NoAnswer)),
        Err(_) => Err(fault(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the VMM did not answer within {} s", ctx.limits.vmm_reply.as_secs()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_unless_text_is_preferred_or_asked_for() {
        let n = |accept, query| negotiate(accept, query).unwrap();
        assert_eq!(n(None, None), Format::Json);
        assert_eq!(n(Some("*/*"), None), Format::Json);
        assert_eq!(n(Some("application/json"), None), Format::Json);
        assert_eq!(n(Some("image/png"), None), Format::Json);
        assert_eq!(n(Some("not a media type;;;"), None), Format::Json);
        assert_eq!(n(Some("text/plain"), None), Format::Prometheus);
        assert_eq!(n(Some("text/plain; version=0.0.4"), None), Format::Prometheus);
        assert_eq!(n(Some("application/json;q=0.5, text/plain"), None), Format::Prometheus);
        assert_eq!(n(Some("text/plain;q=0.5, application/json"), None), Format::Json);
        // What a Prometheus server sends when it scrapes.
        let scrape = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
                      application/openmetrics-text;version=0.0.1;q=0.5,\
                      text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,\
                      text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(n(Some(scrape), None), Format::Prometheus);
        // The query wins over the header.
        assert_eq!(n(Some("application/json"), Some("format=prometheus")), Format::Prometheus);
        assert_eq!(n(Some("text/plain"), Some("a=1&format=json")), Format::Json);
        assert_eq!(n(None, Some("other=1")), Format::Json);
        assert_eq!(negotiate(None, Some("format=xml")), Err(UnknownFormat("xml".into())));
    }
}

//! The errors the API answers with, their HTTP status codes, and the body
//! every error is sent with ([`ApiErrorBody`]).

use crate::boot::BootSourceError;
use crate::instance::VmState;
use crate::logger::{LoggerError, MetricsConfigError};
use crate::machine::MachineConfigError;
use crate::memory::GuestMemoryTargetError;
use crate::endpoint::{Endpoint, RouteError, MAX_BODY_BYTES};
use serde::{Deserialize, Serialize};

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiErrorBody {
    /// What went wrong and, where it can, what to do about it.
    pub fault_message: String,
}

impl ApiErrorBody {
    /// The message of `err` followed by those of its sources (see [`ErrorChain`]).
    pub fn from_error(err: &dyn std::error::Error) -> Self {
        ApiErrorBody { fault_message: ErrorChain(err).to_string() }
    }
}

/// Displays an error and its sources on one line, joined with `": "` (each
/// error's own message does not repeat its source). Every part of the VMM
/// prints errors this way, on the console and in `fault_message`.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Everything a request can fail with: raised by the HTTP side while parsing
/// ([`crate::ApiRequest::parse`]) or by the VMM thread while acting.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON for the endpoint (syntax, type, unknown or
    /// missing field).
    #[error("invalid body for {0}")]
    InvalidBody(Endpoint, #[source] serde_json::Error),
    /// The body is JSON but not an object (serde would read an array as
    /// the struct's fields in order, so arrays are refused before parsing).
    #[error("invalid body for {0}: the body must be a JSON object")]
    NotAnObject(Endpoint),
    /// The endpoint needs a body and none was sent.
    #[error("{0} needs a JSON body")]
    MissingBody(Endpoint),
    /// The endpoint takes no body and one was sent.
    #[error("{0} takes no body")]
    UnexpectedBody(Endpoint),
    /// `PUT /machine-config` asked for an invalid configuration.
    #[error("invalid machine configuration")]
    MachineConfig(#[from] MachineConfigError),
    /// `PUT /boot-source` was invalid.
    #[error("invalid boot source")]
    BootSource(#[from] BootSourceError),
    /// `PUT /guest/memory` was invalid.
    #[error("invalid guest memory target")]
    GuestMemoryTarget(#[from] GuestMemoryTargetError),
    /// `PUT /logger` was invalid.
    #[error("invalid logger configuration")]
    Logger(#[from] LoggerError),
    /// `PUT /metrics` was invalid.
    #[error("invalid metrics configuration")]
    MetricsConfig(#[from] MetricsConfigError),
    /// A host path in the request (`kernel_image_path`, `log_path`,
    /// `metrics_path`) names nothing the VMM can use; checked by the VMM at
    /// the `PUT`: 400.
    #[error("invalid {field}")]
    HostPath {
        /// The field that holds the path.
        field: &'static str,
        /// What is wrong with it (the VMM's own error).
        #[source]
        source: BoxError,
    },
    /// No endpoint for this method and path (404 or 405).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The request is valid but not in the VM's current state (e.g.
    /// `PUT /machine-config` once started, pausing a halted VM).
    #[error("cannot {action} while the VM is {state}")]
    InvalidState {
        /// What was asked, in words ("change the machine configuration").
        action: String,
        /// The state the VM is in.
        state: VmState,
    },
    /// `InstanceStart` refused the configuration the caller gave (a missing
    /// kernel file, an invalid size, no access to `/dev/kvm`, ...): 400.
    #[error("cannot start the VM")]
    StartRefused(#[source] BoxError),
    /// `InstanceStart` failed on the host's side (KVM, memory, threads): 500.
    #[error("the host failed to start the VM")]
    StartFailed(#[source] BoxError),
    /// The guest cannot take a command now (no mailbox yet, one running,
    /// stopping): 409.
    #[error("the guest cannot take the command")]
    GuestBusy(#[source] BoxError),
    /// The guest did not finish the command in time: 504. The command is
    /// cancelled, so the next one can be sent.
    #[error("the guest did not finish the command within {} s", .0.as_secs_f64())]
    GuestTimeout(std::time::Duration),
    /// The vCPUs could not be stopped for a pause in time; the VM keeps
    /// running: 500.
    #[error("cannot pause the VM")]
    PauseFailed(#[source] BoxError),
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("request body is {0} bytes; at most {MAX_BODY_BYTES} are accepted")]
    PayloadTooLarge(usize),
    /// The VMM thread dropped the request without answering: 500.
    #[error("internal error: the VMM did not answer")]
    NoAnswer,
    /// The answer could not be encoded as JSON: 500.
    #[error("internal error: cannot encode the answer")]
    Encode(#[source] serde_json::Error),
}

/// An error from another crate, carried with its chain of sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ApiError {
    /// The HTTP status code this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidBody(..)
            | ApiError::NotAnObject(_)
            | ApiError::MissingBody(_)
            | ApiError::UnexpectedBody(_)
            | ApiError::MachineConfig(_)
            | ApiError::BootSource(_)
            | ApiError::GuestMemoryTarget(_)
            | ApiError::Logger(_)
            | ApiError::MetricsConfig(_)
            | ApiError::HostPath { .. }
            | ApiError::StartRefused(_) => 400,
            ApiError::Route(e) => e.status(),
            ApiError::InvalidState { .. } | ApiError::GuestBusy(_) => 409,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::StartFailed(_) | ApiError::PauseFailed(_) | ApiError::NoAnswer | ApiError::Encode(_) => 500,
            ApiError::GuestTimeout(_) => 504,
        }
    }

    /// The body to answer with.
    pub fn body(&self) -> ApiErrorBody {
        ApiErrorBody::from_error(self)
    }

    /// The `Allow` header value for a 405 answer.
    pub fn allow_header(&self) -> Option<String> {
        match self {
            ApiError::Route(e) => e.allow_header(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_joins_the_source_chain() {
        let err = ApiError::from(MachineConfigError::MemSizeTooSmall(0));
        assert_eq!(err.status(), 400);
        assert_eq!(
            err.body().fault_message,
            "invalid machine configuration: memory size (mem_size_mib) must be at least 5 MiB, the least the guest boots in (got 0); the default is 2048"
        );
        let err = ApiError::HostPath {
            field: "log_path",
            source: std::io::Error::from(std::io::ErrorKind::NotFound).into(),
        };
        assert_eq!(err.status(), 400);
        assert_eq!(err.body().fault_message, "invalid log_path: entity not found");
    }

    #[test]
    fn statuses_and_messages() {
        let e = ApiError::InvalidState {
            action: "change the machine configuration".into(),
            state: VmState::Running,
        };
        assert_eq!(e.status(), 409);
        assert_eq!(
            e.to_string(),
            "cannot change the machine configuration while the VM is Running"
        );
        let e = ApiError::from(RouteError::MethodNotAllowed {
            method: "DELETE".into(),
            path: "/machine-config".into(),
            allowed: vec![crate::endpoint::Method::Get, crate::endpoint::Method::Put],
        });
        assert_eq!(e.status(), 405);
        assert_eq!(
            e.to_string(),
            "DELETE is not allowed on /machine-config; use GET or PUT"
        );
        assert_eq!(e.allow_header().as_deref(), Some("GET, PUT"));
        assert_eq!(ApiError::PayloadTooLarge(1 << 20).status(), 413);
        assert_eq!(ApiError::from(RouteError::NotFound("/x".into())).status(), 404);
        assert_eq!(ApiError::NoAnswer.status(), 500);
        assert_eq!(ApiError::NoAnswer.allow_header(), None);
        let refused = ApiError::StartRefused(std::io::Error::from(std::io::ErrorKind::NotFound).into());
        assert_eq!(refused.status(), 400, "the caller's fault");
        assert_eq!(refused.body().fault_message, "cannot start the VM: entity not found");
        let failed = ApiError::StartFailed(std::io::Error::from(std::io::ErrorKind::OutOfMemory).into());
        assert_eq!(failed.status(), 500, "the host's fault");
    }

    #[test]
    fn body_shape() {
        let v = serde_json::to_value(ApiError::from(RouteError::NotFound("/x".into())).body()).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["fault_message"]
        );
        assert!(serde_json::from_str::<ApiErrorBody>(r#"{"fault_message":"x","code":1}"#).is_err());
    }
}

//! The errors the API answers with, their HTTP status codes, and the body
//! every error is sent with ([`ApiErrorBody`]).

use crate::boot::BootSourceError;
use crate::instance::VmState;
use crate::machine::MachineConfigError;
use crate::memory::GuestMemoryTargetError;
use crate::routes::{Endpoint, Method, MAX_BODY_BYTES};
use serde::{Deserialize, Serialize};

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiErrorBody {
    /// What went wrong and, where it can, what to do about it.
    pub fault_message: String,
}

impl ApiErrorBody {
    /// The message of `err` followed by those of its sources, joined with
    /// `": "` (each error's own message does not repeat its source).
    pub fn from_error(err: &dyn std::error::Error) -> Self {
        let mut fault_message = err.to_string();
        let mut source = err.source();
        while let Some(e) = source {
            fault_message.push_str(": ");
            fault_message.push_str(&e.to_string());
            source = e.source();
        }
        ApiErrorBody { fault_message }
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
    /// No such path.
    #[error("no such path: {0:?}; see openapi.yaml for the paths served")]
    NotFound(String),
    /// The path exists, not with this method.
    #[error("{method} is not allowed on {path}; use {}", allowed_list(.allowed))]
    MethodNotAllowed {
        /// Method received.
        method: String,
        /// Path received.
        path: String,
        /// Methods the path serves.
        allowed: Vec<Method>,
    },
    /// The request is valid but not in the VM's current state (e.g.
    /// `PUT /machine-config` once started, pausing a halted VM).
    #[error("cannot {action} while the VM is {state}")]
    InvalidState {
        /// What was asked, in words ("change the machine configuration").
        action: String,
        /// The state the VM is in.
        state: VmState,
    },
    /// `InstanceStart` could not build the VM from its configuration (a
    /// missing kernel file, no access to `/dev/kvm`, ...).
    #[error("cannot start the VM: {0}")]
    StartFailed(String),
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("request body is {0} bytes; at most {MAX_BODY_BYTES} are accepted")]
    PayloadTooLarge(usize),
    /// A failure of the VMM itself.
    #[error("internal error: {0}")]
    Internal(String),
}

fn allowed_list(methods: &[Method]) -> String {
    let names: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
    names.join(" or ")
}

impl ApiError {
    /// The HTTP status code this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidBody(..)
            | ApiError::MissingBody(_)
            | ApiError::UnexpectedBody(_)
            | ApiError::MachineConfig(_)
            | ApiError::BootSource(_)
            | ApiError::GuestMemoryTarget(_)
            | ApiError::StartFailed(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::InvalidState { .. } => 409,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::Internal(_) => 500,
        }
    }

    /// The body to answer with.
    pub fn body(&self) -> ApiErrorBody {
        ApiErrorBody::from_error(self)
    }

    /// The `Allow` header value for a 405 answer.
    pub fn allow_header(&self) -> Option<String> {
        match self {
            ApiError::MethodNotAllowed { allowed, .. } => {
                let names: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
                Some(names.join(", "))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_joins_the_source_chain() {
        let err = ApiError::from(MachineConfigError::MemSizeOdd(3));
        assert_eq!(err.status(), 400);
        assert_eq!(
            err.body().fault_message,
            "invalid machine configuration: mem_size_mib must be a multiple of 2 (got 3); use 2 or 4"
        );
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
        let e = ApiError::MethodNotAllowed {
            method: "DELETE".into(),
            path: "/machine-config".into(),
            allowed: vec![Method::Get, Method::Put],
        };
        assert_eq!(e.status(), 405);
        assert_eq!(
            e.to_string(),
            "DELETE is not allowed on /machine-config; use GET or PUT"
        );
        assert_eq!(e.allow_header().as_deref(), Some("GET, PUT"));
        assert_eq!(ApiError::PayloadTooLarge(1 << 20).status(), 413);
        assert_eq!(ApiError::NotFound("/x".into()).status(), 404);
        assert_eq!(ApiError::Internal("boom".into()).status(), 500);
        assert_eq!(ApiError::Internal("x".into()).allow_header(), None);
    }

    #[test]
    fn body_shape() {
        let v = serde_json::to_value(ApiError::NotFound("/x".into()).body()).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["fault_message"]
        );
        assert!(serde_json::from_str::<ApiErrorBody>(r#"{"fault_message":"x","code":1}"#).is_err());
    }
}

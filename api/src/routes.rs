//! The route table ([`Endpoint`]), request parsing ([`ApiRequest::parse`]) and
//! responses ([`ApiResponse`]): the only place that knows which method and
//! path carry which type. `openapi.yaml` is checked against [`Endpoint::ALL`]
//! by this crate's tests.

use crate::boot::BootSource;
use crate::error::ApiError;
use crate::instance::{InstanceActionInfo, InstanceInfo, VmStateUpdate};
use crate::machine::{MachineConfig, MachineConfigUpdate};
use crate::memory::{GuestMemoryStatus, GuestMemoryTarget, MemoryReport};
use crate::metrics::Metrics;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;

/// Largest request body accepted, in bytes; larger ones get 413. The HTTP
/// server should check `Content-Length` against it before reading the body.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The HTTP methods the API serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
}

impl Method {
    /// The method as written in a request line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }

    /// Parses a request-line method (case-sensitive, as HTTP says).
    pub fn from_name(name: &str) -> Option<Method> {
        [Method::Get, Method::Put, Method::Patch]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One operation of the API: a method on a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /` → [`InstanceInfo`].
    GetInstanceInfo,
    /// `GET /machine-config` → [`MachineConfig`].
    GetMachineConfig,
    /// `PUT /machine-config` with [`MachineConfigUpdate`] → 204.
    PutMachineConfig,
    /// `PUT /boot-source` with [`BootSource`] → 204.
    PutBootSource,
    /// `PUT /actions` with [`InstanceActionInfo`] → 204.
    PutActions,
    /// `PATCH /vm` with [`VmStateUpdate`] → 204.
    PatchVm,
    /// `GET /memory` → [`MemoryReport`].
    GetMemory,
    /// `GET /guest/memory` → [`GuestMemoryStatus`].
    GetGuestMemory,
    /// `PUT /guest/memory` with [`GuestMemoryTarget`] → [`GuestMemoryStatus`].
    PutGuestMemory,
    /// `GET /metrics` → [`Metrics`].
    GetMetrics,
}

/// Error statuses every endpoint may answer: a body where none belongs or an
/// unparsable one (400), and the path-level ones (404, 405, 413, 500).
const COMMON_ERRORS: &[u16] = &[400, 404, 405, 413, 500];
/// The same plus 409, for endpoints that depend on the VM's state.
const STATEFUL_ERRORS: &[u16] = &[400, 404, 405, 409, 413, 500];

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 10] = [
        Endpoint::GetInstanceInfo,
        Endpoint::GetMachineConfig,
        Endpoint::PutMachineConfig,
        Endpoint::PutBootSource,
        Endpoint::PutActions,
        Endpoint::PatchVm,
        Endpoint::GetMemory,
        Endpoint::GetGuestMemory,
        Endpoint::PutGuestMemory,
        Endpoint::GetMetrics,
    ];

    /// The HTTP method.
    pub const fn method(self) -> Method {
        match self {
            Endpoint::GetInstanceInfo
            | Endpoint::GetMachineConfig
            | Endpoint::GetMemory
            | Endpoint::GetGuestMemory
            | Endpoint::GetMetrics => Method::Get,
            Endpoint::PutMachineConfig
            | Endpoint::PutBootSource
            | Endpoint::PutActions
            | Endpoint::PutGuestMemory => Method::Put,
            Endpoint::PatchVm => Method::Patch,
        }
    }

    /// The path.
    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::GetInstanceInfo => "/",
            Endpoint::GetMachineConfig | Endpoint::PutMachineConfig => "/machine-config",
            Endpoint::PutBootSource => "/boot-source",
            Endpoint::PutActions => "/actions",
            Endpoint::PatchVm => "/vm",
            Endpoint::GetMemory => "/memory",
            Endpoint::GetGuestMemory | Endpoint::PutGuestMemory => "/guest/memory",
            Endpoint::GetMetrics => "/metrics",
        }
    }

    /// Name of the request body's type (and OpenAPI schema), if it has one.
    pub const fn request_type(self) -> Option<&'static str> {
        match self {
            Endpoint::PutMachineConfig => Some("MachineConfigUpdate"),
            Endpoint::PutBootSource => Some("BootSource"),
            Endpoint::PutActions => Some("InstanceActionInfo"),
            Endpoint::PatchVm => Some("VmStateUpdate"),
            Endpoint::PutGuestMemory => Some("GuestMemoryTarget"),
            _ => None,
        }
    }

    /// Name of the success body's type (and OpenAPI schema), if it has one.
    pub const fn response_type(self) -> Option<&'static str> {
        match self {
            Endpoint::GetInstanceInfo => Some("InstanceInfo"),
            Endpoint::GetMachineConfig => Some("MachineConfig"),
            Endpoint::GetMemory => Some("MemoryReport"),
            Endpoint::GetGuestMemory | Endpoint::PutGuestMemory => Some("GuestMemoryStatus"),
            Endpoint::GetMetrics => Some("Metrics"),
            _ => None,
        }
    }

    /// Status of a successful answer: 200 with a body, 204 without.
    pub const fn success_status(self) -> u16 {
        match self.response_type() {
            Some(_) => 200,
            None => 204,
        }
    }

    /// Error statuses the endpoint can answer (all with [`crate::ApiErrorBody`]).
    pub const fn error_statuses(self) -> &'static [u16] {
        match self {
            Endpoint::PutMachineConfig
            | Endpoint::PutBootSource
            | Endpoint::PutActions
            | Endpoint::PatchVm
            | Endpoint::PutGuestMemory => STATEFUL_ERRORS,
            _ => COMMON_ERRORS,
        }
    }

    /// Finds the endpoint for a request line: 404 for an unknown path, 405
    /// (with the allowed methods) for a known path and another method. One
    /// trailing `/` is ignored.
    pub fn find(method: &str, path: &str) -> Result<Endpoint, ApiError> {
        let path = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => path,
        };
        let on_path: Vec<Endpoint> = Endpoint::ALL
            .into_iter()
            .filter(|e| e.path() == path)
            .collect();
        if on_path.is_empty() {
            return Err(ApiError::NotFound(path.to_string()));
        }
        let wanted = Method::from_name(method);
        on_path
            .iter()
            .copied()
            .find(|e| Some(e.method()) == wanted)
            .ok_or_else(|| ApiError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_string(),
                allowed: on_path.iter().map(|e| e.method()).collect(),
            })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.path())
    }
}

/// A parsed request, ready to be handed to the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`; validated by the VMM against the current config
    /// with [`MachineConfig::apply`].
    PutMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source` (already validated).
    PutBootSource(BootSource),
    /// `PUT /actions`.
    PutActions(InstanceActionInfo),
    /// `PATCH /vm`.
    PatchVm(VmStateUpdate),
    /// `GET /memory`.
    GetMemory,
    /// `GET /guest/memory`.
    GetGuestMemory,
    /// `PUT /guest/memory`; validated by the VMM, which knows the guest size.
    PutGuestMemory(GuestMemoryTarget),
    /// `GET /metrics`.
    GetMetrics,
}

impl ApiRequest {
    /// Parses a request from its method, path and body. Does every check that
    /// needs no VM state: route, body size, body presence, JSON shape
    /// (unknown fields are errors), [`BootSource::validate`].
    pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
        let endpoint = Endpoint::find(method, path)?;
        if body.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge(body.len()));
        }
        let body = body.trim_ascii();
        let has_body = !body.is_empty();
        match (endpoint.request_type(), has_body) {
            (None, true) => return Err(ApiError::UnexpectedBody(endpoint)),
            (Some(_), false) => return Err(ApiError::MissingBody(endpoint)),
            _ => {}
        }
        Ok(match endpoint {
            Endpoint::GetInstanceInfo => ApiRequest::GetInstanceInfo,
            Endpoint::GetMachineConfig => ApiRequest::GetMachineConfig,
            Endpoint::PutMachineConfig => ApiRequest::PutMachineConfig(json(endpoint, body)?),
            Endpoint::PutBootSource => {
                let source: BootSource = json(endpoint, body)?;
                source.validate()?;
                ApiRequest::PutBootSource(source)
            }
            Endpoint::PutActions => ApiRequest::PutActions(json(endpoint, body)?),
            Endpoint::PatchVm => ApiRequest::PatchVm(json(endpoint, body)?),
            Endpoint::GetMemory => ApiRequest::GetMemory,
            Endpoint::GetGuestMemory => ApiRequest::GetGuestMemory,
            Endpoint::PutGuestMemory => ApiRequest::PutGuestMemory(json(endpoint, body)?),
            Endpoint::GetMetrics => ApiRequest::GetMetrics,
        })
    }

    /// The endpoint this request came from.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            ApiRequest::GetInstanceInfo => Endpoint::GetInstanceInfo,
            ApiRequest::GetMachineConfig => Endpoint::GetMachineConfig,
            ApiRequest::PutMachineConfig(_) => Endpoint::PutMachineConfig,
            ApiRequest::PutBootSource(_) => Endpoint::PutBootSource,
            ApiRequest::PutActions(_) => Endpoint::PutActions,
            ApiRequest::PatchVm(_) => Endpoint::PatchVm,
            ApiRequest::GetMemory => Endpoint::GetMemory,
            ApiRequest::GetGuestMemory => Endpoint::GetGuestMemory,
            ApiRequest::PutGuestMemory(_) => Endpoint::PutGuestMemory,
            ApiRequest::GetMetrics => Endpoint::GetMetrics,
        }
    }
}

fn json<T: DeserializeOwned>(endpoint: Endpoint, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidBody(endpoint, e))
}

/// A successful answer from the VMM thread.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    /// 204, no body.
    NoContent,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /memory`.
    MemoryReport(Box<MemoryReport>),
    /// `GET` and `PUT /guest/memory`.
    GuestMemoryStatus(Box<GuestMemoryStatus>),
    /// `GET /metrics`.
    Metrics(Metrics),
}

impl ApiResponse {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            ApiResponse::NoContent => 204,
            _ => 200,
        }
    }

    /// The schema name of the body, as in [`Endpoint::response_type`].
    pub fn type_name(&self) -> Option<&'static str> {
        match self {
            ApiResponse::NoContent => None,
            ApiResponse::InstanceInfo(_) => Some("InstanceInfo"),
            ApiResponse::MachineConfig(_) => Some("MachineConfig"),
            ApiResponse::MemoryReport(_) => Some("MemoryReport"),
            ApiResponse::GuestMemoryStatus(_) => Some("GuestMemoryStatus"),
            ApiResponse::Metrics(_) => Some("Metrics"),
        }
    }

    /// The JSON body, `None` for 204.
    pub fn to_json(&self) -> Result<Option<Vec<u8>>, serde_json::Error> {
        fn enc<T: Serialize>(v: &T) -> Result<Option<Vec<u8>>, serde_json::Error> {
            serde_json::to_vec(v).map(Some)
        }
        match self {
            ApiResponse::NoContent => Ok(None),
            ApiResponse::InstanceInfo(v) => enc(v),
            ApiResponse::MachineConfig(v) => enc(v),
            ApiResponse::MemoryReport(v) => enc(v),
            ApiResponse::GuestMemoryStatus(v) => enc(v),
            ApiResponse::Metrics(v) => enc(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::{ActionType, VmState, VmStateTarget};
    use crate::machine::Strategy;

    #[test]
    fn every_endpoint_is_found_by_its_method_and_path() {
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::find(e.method().as_str(), e.path()).unwrap(), e);
        }
        assert_eq!(
            Endpoint::find("GET", "/metrics/").unwrap(),
            Endpoint::GetMetrics
        );
    }

    #[test]
    fn routes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for e in Endpoint::ALL {
            assert!(seen.insert((e.method(), e.path())), "{e}");
        }
    }

    #[test]
    fn unknown_path_and_method() {
        let e = Endpoint::find("GET", "/nope").unwrap_err();
        assert_eq!(e.status(), 404);
        let e = Endpoint::find("DELETE", "/guest/memory").unwrap_err();
        assert_eq!(e.status(), 405);
        assert_eq!(e.allow_header().as_deref(), Some("GET, PUT"));
        assert_eq!(Endpoint::find("get", "/").unwrap_err().status(), 405);
    }

    #[test]
    fn parse_bodies() {
        let r = ApiRequest::parse("PUT", "/machine-config", br#"{"memmap_init":"eager"}"#).unwrap();
        let ApiRequest::PutMachineConfig(u) = &r else {
            panic!("{r:?}")
        };
        assert_eq!(u.memmap_init, Some(Strategy::Eager));
        assert_eq!(r.endpoint(), Endpoint::PutMachineConfig);

        let r = ApiRequest::parse("PUT", "/actions", br#" {"action_type":"InstanceStart"} "#);
        assert_eq!(
            r.unwrap(),
            ApiRequest::PutActions(InstanceActionInfo {
                action_type: ActionType::InstanceStart
            })
        );
        let r = ApiRequest::parse("PATCH", "/vm", br#"{"state":"Resumed"}"#).unwrap();
        assert_eq!(
            r,
            ApiRequest::PatchVm(VmStateUpdate {
                state: VmStateTarget::Resumed
            })
        );
        let r = ApiRequest::parse("PUT", "/guest/memory", br#"{"target_mib":64}"#).unwrap();
        assert_eq!(
            r,
            ApiRequest::PutGuestMemory(GuestMemoryTarget { target_mib: 64 })
        );
        assert_eq!(
            ApiRequest::parse("GET", "/", b"").unwrap(),
            ApiRequest::GetInstanceInfo
        );
        assert_eq!(
            ApiRequest::parse("GET", "/memory", b"\r\n").unwrap(),
            ApiRequest::GetMemory
        );
    }

    #[test]
    fn every_endpoint_parses_and_round_trips() {
        for e in Endpoint::ALL {
            let body: &[u8] = match e.request_type() {
                Some("MachineConfigUpdate") | Some("BootSource") => b"{}",
                Some("InstanceActionInfo") => br#"{"action_type":"Shutdown"}"#,
                Some("VmStateUpdate") => br#"{"state":"Paused"}"#,
                Some("GuestMemoryTarget") => br#"{"target_mib":0}"#,
                Some(other) => panic!("no example body for {other}"),
                None => b"",
            };
            let r = ApiRequest::parse(e.method().as_str(), e.path(), body).unwrap();
            assert_eq!(r.endpoint(), e);
        }
    }

    #[test]
    fn parse_errors() {
        let status = |m, p, b: &[u8]| ApiRequest::parse(m, p, b).unwrap_err().status();
        assert_eq!(status("PUT", "/machine-config", b""), 400);
        assert_eq!(status("GET", "/metrics", b"{}"), 400);
        assert_eq!(status("PUT", "/machine-config", b"{"), 400);
        assert_eq!(status("PUT", "/machine-config", br#"{"vcpus":2}"#), 400);
        assert_eq!(
            status("PUT", "/boot-source", br#"{"kernel_image_path":""}"#),
            400
        );
        assert_eq!(status("PUT", "/nope", b""), 404);
        assert_eq!(status("POST", "/actions", b""), 405);
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(status("PUT", "/machine-config", &big), 413);

        let e = ApiRequest::parse("PUT", "/machine-config", br#"{"vcpus":2}"#).unwrap_err();
        let msg = e.body().fault_message;
        assert!(
            msg.starts_with("invalid body for PUT /machine-config: unknown field `vcpus`"),
            "{msg}"
        );
        let e = ApiRequest::parse("PUT", "/actions", b"").unwrap_err();
        assert_eq!(e.body().fault_message, "PUT /actions needs a JSON body");
    }

    #[test]
    fn responses() {
        assert_eq!(ApiResponse::NoContent.status(), 204);
        assert_eq!(ApiResponse::NoContent.to_json().unwrap(), None);
        let r = ApiResponse::InstanceInfo(InstanceInfo::new("a", "1", VmState::NotStarted));
        assert_eq!(r.status(), 200);
        assert_eq!(r.type_name(), Endpoint::GetInstanceInfo.response_type());
        let v: serde_json::Value = serde_json::from_slice(&r.to_json().unwrap().unwrap()).unwrap();
        assert_eq!(v["state"], "NotStarted");
        let r = ApiResponse::MachineConfig(MachineConfig::default());
        assert_eq!(r.type_name(), Endpoint::GetMachineConfig.response_type());
    }

    #[test]
    fn success_statuses() {
        assert_eq!(Endpoint::PutActions.success_status(), 204);
        assert_eq!(Endpoint::PutGuestMemory.success_status(), 200);
        assert!(Endpoint::PatchVm.error_statuses().contains(&409));
        assert!(!Endpoint::GetMetrics.error_statuses().contains(&409));
    }
}

//! Request parsing ([`ApiRequest::parse`]) and responses ([`ApiResponse`]):
//! what travels between the HTTP server and the VMM thread.

use crate::boot::BootSource;
use crate::endpoint::{Endpoint, MAX_BODY_BYTES};
use crate::error::ApiError;
use crate::instance::{
    FirecrackerVersion, InstanceActionInfo, InstanceInfo, InstanceStatus, VmStateUpdate,
};
use crate::logger::{Logger, MetricsConfig};
use crate::machine::{MachineConfig, MachineConfigPut, MachineConfigUpdate};
use crate::vm_config::FullVmConfiguration;
use crate::memory::{GuestMemoryStatus, GuestMemoryTarget, MemoryReport};
use crate::metrics::Metrics;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A parsed request, ready to be handed to the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /vm/status`.
    GetVmStatus,
    /// `GET /version`.
    GetVersion,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`; validated by the VMM with
    /// [`MachineConfig::replace`].
    PutMachineConfig(MachineConfigPut),
    /// `PATCH /machine-config`; validated by the VMM against the current
    /// config with [`MachineConfig::apply`].
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source` (already validated).
    PutBootSource(BootSource),
    /// `PUT /actions`.
    PutActions(InstanceActionInfo),
    /// `PATCH /vm`.
    PatchVm(VmStateUpdate),
    /// `PUT /logger` (fields validated; the VMM opens the file).
    PutLogger(Logger),
    /// `PUT /metrics` (field validated; the VMM opens the file).
    PutMetrics(MetricsConfig),
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
    /// (unknown fields are errors), [`BootSource::validate`],
    /// [`Logger::validate`], [`MetricsConfig::validate`].
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
            Endpoint::GetVmStatus => ApiRequest::GetVmStatus,
            Endpoint::GetVersion => ApiRequest::GetVersion,
            Endpoint::GetVmConfig => ApiRequest::GetVmConfig,
            Endpoint::GetMachineConfig => ApiRequest::GetMachineConfig,
            Endpoint::PutMachineConfig => ApiRequest::PutMachineConfig(json(endpoint, body)?),
            Endpoint::PatchMachineConfig => {
                ApiRequest::PatchMachineConfig(json(endpoint, body)?)
            }
            Endpoint::PutLogger => {
                let logger: Logger = json(endpoint, body)?;
                logger.validate()?;
                ApiRequest::PutLogger(logger)
            }
            Endpoint::PutMetrics => {
                let metrics: MetricsConfig = json(endpoint, body)?;
                metrics.validate()?;
                ApiRequest::PutMetrics(metrics)
            }
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
            ApiRequest::GetVmStatus => Endpoint::GetVmStatus,
            ApiRequest::GetVersion => Endpoint::GetVersion,
            ApiRequest::GetVmConfig => Endpoint::GetVmConfig,
            ApiRequest::GetMachineConfig => Endpoint::GetMachineConfig,
            ApiRequest::PutMachineConfig(_) => Endpoint::PutMachineConfig,
            ApiRequest::PatchMachineConfig(_) => Endpoint::PatchMachineConfig,
            ApiRequest::PutLogger(_) => Endpoint::PutLogger,
            ApiRequest::PutMetrics(_) => Endpoint::PutMetrics,
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

/// Parses a body that must be a JSON object. serde reads a JSON array into
/// a struct field by field (`["Shutdown"]` would be an `InstanceActionInfo`),
/// so anything but an object is refused first: a JSON text whose first byte
/// (after the blanks that `parse` trimmed) is `{` is an object or invalid.
fn json<T: DeserializeOwned>(endpoint: Endpoint, body: &[u8]) -> Result<T, ApiError> {
    if body.first() != Some(&b'{') {
        return Err(ApiError::NotAnObject(endpoint));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidBody(endpoint, e))
}

/// A successful answer from the VMM thread.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    /// 204, no body.
    NoContent,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /vm/status`.
    InstanceStatus(InstanceStatus),
    /// `GET /version`.
    Version(FirecrackerVersion),
    /// `GET /vm/config`.
    VmConfig(Box<FullVmConfiguration>),
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
            ApiResponse::InstanceStatus(_) => Some("InstanceStatus"),
            ApiResponse::Version(_) => Some("FirecrackerVersion"),
            ApiResponse::VmConfig(_) => Some("FullVmConfiguration"),
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
            ApiResponse::InstanceStatus(v) => enc(v),
            ApiResponse::Version(v) => enc(v),
            ApiResponse::VmConfig(v) => enc(v),
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
    fn parse_bodies() {
        let r = ApiRequest::parse("PATCH", "/machine-config", br#"{"memmap_init":"eager"}"#).unwrap();
        let ApiRequest::PatchMachineConfig(u) = &r else {
            panic!("{r:?}")
        };
        assert_eq!(u.memmap_init, Some(Strategy::Eager));
        assert_eq!(r.endpoint(), Endpoint::PatchMachineConfig);
        let r = ApiRequest::parse(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":2,"mem_size_mib":257,"smt":false,"huge_pages":"None"}"#,
        )
        .unwrap();
        let ApiRequest::PutMachineConfig(p) = &r else {
            panic!("{r:?}")
        };
        assert_eq!((p.vcpu_count, p.mem_size_mib), (2, 257));
        let r = ApiRequest::parse("PUT", "/logger", br#"{"log_path":"/tmp/l","level":"warn"}"#);
        assert!(matches!(r, Ok(ApiRequest::PutLogger(_))), "{r:?}");
        let r = ApiRequest::parse("PUT", "/metrics", br#"{"metrics_path":"/tmp/m"}"#);
        assert!(matches!(r, Ok(ApiRequest::PutMetrics(_))), "{r:?}");
        let r = ApiRequest::parse("PUT", "/actions", br#"{"action_type":"FlushMetrics"}"#);
        assert_eq!(
            r.unwrap(),
            ApiRequest::PutActions(InstanceActionInfo {
                action_type: ActionType::FlushMetrics
            })
        );

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
                Some("MachineConfigUpdate") | Some("BootSource") | Some("Logger") => b"{}",
                Some("MachineConfigPut") => br#"{"vcpu_count":1,"mem_size_mib":128}"#,
                Some("MetricsConfig") => br#"{"metrics_path":"/m"}"#,
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
        assert_eq!(status("PUT", "/machine-config", br#"{"vcpu_count":1}"#), 400);
        assert_eq!(status("PUT", "/machine-config", br#"{"mem_size_mib":128}"#), 400);
        assert_eq!(status("PUT", "/logger", br#"{"log_path":""}"#), 400);
        assert_eq!(status("PUT", "/metrics", br#"{"metrics_path":""}"#), 400);
        assert_eq!(status("PUT", "/metrics", b"{}"), 400);
        assert_eq!(status("PUT", "/boot-source", br#"{"initrd_path":"/i"}"#), 400);
        assert_eq!(status("PUT", "/drives/rootfs", br#"{}"#), 400);
        assert_eq!(status("GET", "/version", b"{}"), 400);
        assert_eq!(status("GET", "/metrics", b"{}"), 400);
        assert_eq!(status("PUT", "/machine-config", b"{"), 400);
        assert_eq!(status("PATCH", "/machine-config", br#"{"vcpus":2}"#), 400);
        assert_eq!(
            status("PUT", "/boot-source", br#"{"kernel_image_path":""}"#),
            400
        );
        assert_eq!(status("PUT", "/nope", b""), 404);
        assert_eq!(status("POST", "/actions", b""), 405);
        // Arrays (read positionally by serde), strings, numbers, null.
        for (path, body) in [
            ("/actions", &br#"["Shutdown"]"#[..]),
            ("/machine-config", b"[4,512]"),
            ("/machine-config", b"null"),
            ("/guest/memory", b"[64]"),
            ("/boot-source", br#""x""#),
            ("/actions", b"7"),
        ] {
            let e = ApiRequest::parse("PUT", path, body).unwrap_err();
            assert!(matches!(e, ApiError::NotAnObject(_)), "{path} {e}");
            assert_eq!(e.status(), 400);
            assert!(e.body().fault_message.ends_with("the body must be a JSON object"), "{e}");
        }
        let e = ApiRequest::parse("PATCH", "/vm", br#"["Paused"]"#).unwrap_err();
        assert!(matches!(e, ApiError::NotAnObject(_)), "{e}");
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(status("PUT", "/machine-config", &big), 413);

        let e = ApiRequest::parse("PATCH", "/machine-config", br#"{"vcpus":2}"#).unwrap_err();
        let msg = e.body().fault_message;
        assert!(
            msg.starts_with("invalid body for PATCH /machine-config: unknown field `vcpus`"),
            "{msg}"
        );
        let e = ApiRequest::parse("PUT", "/machine-config", br#"{"vcpu_count":1}"#).unwrap_err();
        let msg = e.body().fault_message;
        assert!(msg.contains("missing field `mem_size_mib`"), "{msg}");
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
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["app_name"], "vmm");
        let r = ApiResponse::MachineConfig(MachineConfig::default());
        assert_eq!(r.type_name(), Endpoint::GetMachineConfig.response_type());
    }
}

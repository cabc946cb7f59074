//! The route table: [`Endpoint`], one method on one path, and the only place
//! that knows which method and path carry which type. `openapi.yaml` is
//! checked against [`Endpoint::ALL`] by this crate's tests.
//!
//! Paths of Firecracker's API that this VMM does not serve (drives, network
//! interfaces, vsock, MMDS, snapshots, balloon, ...) are answered 400 with a
//! message naming the endpoint as unsupported ([`RouteError::Unsupported`]),
//! so a Firecracker client sees its usual status and a clear reason.

use std::fmt;

/// Largest request body accepted, in bytes (Firecracker's limit, 50 KiB);
/// larger ones get 413. The HTTP server should check `Content-Length`
/// against it before reading the body.
pub const MAX_BODY_BYTES: usize = 51_200;

/// Firecracker's paths that this VMM does not serve: the first path segment,
/// and what it is for (the message says so).
const UNSUPPORTED: &[(&str, &str)] = &[
    ("drives", "block devices (drives)"),
    ("network-interfaces", "network interfaces"),
    ("vsock", "vsock devices"),
    ("mmds", "the microVM metadata service (MMDS)"),
    ("snapshot", "snapshots"),
    ("balloon", "the balloon device"),
    ("entropy", "the entropy device"),
    ("cpu-config", "custom CPU templates (cpu-config)"),
    ("pmem", "pmem devices"),
    ("serial", "serial console configuration"),
    ("hotplug", "memory hotplug"),
];

/// Why a request line matches no endpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No such path (404).
    #[error("no such path: {0:?}; see openapi.yaml for the paths served")]
    NotFound(String),
    /// The path exists, not with this method (405).
    #[error("{method} is not allowed on {path}; use {}", allowed_list(.allowed, " or "))]
    MethodNotAllowed {
        /// Method received.
        method: String,
        /// Path received.
        path: String,
        /// Methods the path serves.
        allowed: Vec<Method>,
    },
    /// A Firecracker endpoint this VMM does not have (400, as Firecracker
    /// answers requests it cannot serve).
    #[error("{method} {path} is not supported by this VMM: it has no {feature}; see docs/api.md for what it serves")]
    Unsupported {
        /// Method received.
        method: String,
        /// Path received.
        path: String,
        /// What the endpoint configures, in words.
        feature: &'static str,
    },
}

fn allowed_list(methods: &[Method], sep: &str) -> String {
    let names: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
    names.join(sep)
}

impl RouteError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            RouteError::MethodNotAllowed { .. } => 405,
            RouteError::Unsupported { .. } => 400,
        }
    }

    /// The `Allow` header value for a 405 answer.
    pub fn allow_header(&self) -> Option<String> {
        match self {
            RouteError::MethodNotAllowed { allowed, .. } => Some(allowed_list(allowed, ", ")),
            RouteError::NotFound(_) | RouteError::Unsupported { .. } => None,
        }
    }
}

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
    /// `GET /` → [`InstanceInfo`](crate::InstanceInfo).
    GetInstanceInfo,
    /// `GET /vm/status` → [`InstanceStatus`](crate::InstanceStatus) (an extension).
    GetVmStatus,
    /// `GET /version` → [`FirecrackerVersion`](crate::FirecrackerVersion).
    GetVersion,
    /// `GET /vm/config` → [`FullVmConfiguration`](crate::FullVmConfiguration).
    GetVmConfig,
    /// `GET /machine-config` → [`MachineConfig`](crate::MachineConfig).
    GetMachineConfig,
    /// `PUT /machine-config` with [`MachineConfigPut`](crate::MachineConfigPut) → 204.
    PutMachineConfig,
    /// `PATCH /machine-config` with [`MachineConfigUpdate`](crate::MachineConfigUpdate) → 204.
    PatchMachineConfig,
    /// `PUT /boot-source` with [`BootSource`](crate::BootSource) → 204.
    PutBootSource,
    /// `PUT /actions` with [`InstanceActionInfo`](crate::InstanceActionInfo) → 204.
    PutActions,
    /// `PATCH /vm` with [`VmStateUpdate`](crate::VmStateUpdate) → 204.
    PatchVm,
    /// `PUT /logger` with [`Logger`](crate::Logger) → 204.
    PutLogger,
    /// `PUT /metrics` with [`MetricsConfig`](crate::MetricsConfig) → 204.
    PutMetrics,
    /// `GET /memory` → [`MemoryReport`](crate::MemoryReport).
    GetMemory,
    /// `GET /guest/memory` → [`GuestMemoryStatus`](crate::GuestMemoryStatus).
    GetGuestMemory,
    /// `PUT /guest/memory` with [`GuestMemoryTarget`](crate::GuestMemoryTarget) → [`GuestMemoryStatus`](crate::GuestMemoryStatus).
    PutGuestMemory,
    /// `GET /metrics` → [`Metrics`](crate::Metrics).
    GetMetrics,
}

/// Error statuses every endpoint may answer: a body where none belongs or an
/// unparsable one (400), the path-level ones (404, 405), the HTTP side's
/// limits (408 body timeout, 413 body size, 414 and 431 from hyper for a
/// request head too large), 500, 503 while the VMM shuts down, and 504 when
/// the VMM thread does not answer in time.
const COMMON_ERRORS: &[u16] = &[400, 404, 405, 408, 413, 414, 431, 500, 503, 504];
/// The same plus 409, for endpoints that depend on the VM's state.
const STATEFUL_ERRORS: &[u16] = &[400, 404, 405, 408, 409, 413, 414, 431, 500, 503, 504];

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 16] = [
        Endpoint::GetInstanceInfo,
        Endpoint::GetVmStatus,
        Endpoint::GetVersion,
        Endpoint::GetVmConfig,
        Endpoint::GetMachineConfig,
        Endpoint::PutMachineConfig,
        Endpoint::PatchMachineConfig,
        Endpoint::PutBootSource,
        Endpoint::PutActions,
        Endpoint::PatchVm,
        Endpoint::PutLogger,
        Endpoint::PutMetrics,
        Endpoint::GetMemory,
        Endpoint::GetGuestMemory,
        Endpoint::PutGuestMemory,
        Endpoint::GetMetrics,
    ];

    /// The HTTP method.
    pub const fn method(self) -> Method {
        match self {
            Endpoint::GetInstanceInfo
            | Endpoint::GetVmStatus
            | Endpoint::GetVersion
            | Endpoint::GetVmConfig
            | Endpoint::GetMachineConfig
            | Endpoint::GetMemory
            | Endpoint::GetGuestMemory
            | Endpoint::GetMetrics => Method::Get,
            Endpoint::PutMachineConfig
            | Endpoint::PutBootSource
            | Endpoint::PutActions
            | Endpoint::PutLogger
            | Endpoint::PutMetrics
            | Endpoint::PutGuestMemory => Method::Put,
            Endpoint::PatchVm | Endpoint::PatchMachineConfig => Method::Patch,
        }
    }

    /// The path.
    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::GetInstanceInfo => "/",
            Endpoint::GetVmStatus => "/vm/status",
            Endpoint::GetVersion => "/version",
            Endpoint::GetVmConfig => "/vm/config",
            Endpoint::GetMachineConfig
            | Endpoint::PutMachineConfig
            | Endpoint::PatchMachineConfig => "/machine-config",
            Endpoint::PutLogger => "/logger",
            Endpoint::PutBootSource => "/boot-source",
            Endpoint::PutActions => "/actions",
            Endpoint::PatchVm => "/vm",
            Endpoint::GetMemory => "/memory",
            Endpoint::GetGuestMemory | Endpoint::PutGuestMemory => "/guest/memory",
            Endpoint::GetMetrics | Endpoint::PutMetrics => "/metrics",
        }
    }

    /// Name of the request body's type (and OpenAPI schema), if it has one.
    pub const fn request_type(self) -> Option<&'static str> {
        match self {
            Endpoint::PutMachineConfig => Some("MachineConfigPut"),
            Endpoint::PatchMachineConfig => Some("MachineConfigUpdate"),
            Endpoint::PutLogger => Some("Logger"),
            Endpoint::PutMetrics => Some("MetricsConfig"),
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
            Endpoint::GetVmStatus => Some("InstanceStatus"),
            Endpoint::GetVersion => Some("FirecrackerVersion"),
            Endpoint::GetVmConfig => Some("FullVmConfiguration"),
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
            | Endpoint::PatchMachineConfig
            | Endpoint::PutBootSource
            | Endpoint::PutActions
            | Endpoint::PatchVm
            | Endpoint::PutLogger
            | Endpoint::PutMetrics
            | Endpoint::PutGuestMemory => STATEFUL_ERRORS,
            _ => COMMON_ERRORS,
        }
    }

    /// Finds the endpoint for a request line: 400 for a Firecracker path
    /// this VMM does not serve, 404 for an unknown path, 405 (with the
    /// allowed methods) for a known path and another method. One trailing
    /// `/` is ignored.
    pub fn find(method: &str, path: &str) -> Result<Endpoint, RouteError> {
        let path = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => path,
        };
        let on_path: Vec<Endpoint> = Endpoint::ALL
            .into_iter()
            .filter(|e| e.path() == path)
            .collect();
        if on_path.is_empty() {
            let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
            if let Some((_, feature)) = UNSUPPORTED.iter().find(|(p, _)| *p == first) {
                return Err(RouteError::Unsupported {
                    method: method.to_string(),
                    path: path.to_string(),
                    feature,
                });
            }
            return Err(RouteError::NotFound(path.to_string()));
        }
        let wanted = Method::from_name(method);
        on_path
            .iter()
            .copied()
            .find(|e| Some(e.method()) == wanted)
            .ok_or_else(|| RouteError::MethodNotAllowed {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = Endpoint::find("PATCH", "/vm/config").unwrap_err();
        assert_eq!((e.status(), e.allow_header().as_deref()), (405, Some("GET")));
    }

    #[test]
    fn firecracker_endpoints_this_vmm_lacks_are_400_and_say_so() {
        for (method, path, feature) in [
            ("PUT", "/drives/rootfs", "block devices (drives)"),
            ("PATCH", "/drives/rootfs", "block devices (drives)"),
            ("PUT", "/network-interfaces/eth0", "network interfaces"),
            ("PUT", "/vsock", "vsock devices"),
            ("GET", "/mmds", "the microVM metadata service (MMDS)"),
            ("PUT", "/mmds/config", "the microVM metadata service (MMDS)"),
            ("PUT", "/snapshot/create", "snapshots"),
            ("PUT", "/snapshot/load", "snapshots"),
            ("GET", "/balloon", "the balloon device"),
            ("GET", "/balloon/statistics", "the balloon device"),
            ("PUT", "/entropy", "the entropy device"),
            ("PUT", "/cpu-config", "custom CPU templates (cpu-config)"),
        ] {
            let e = Endpoint::find(method, path).unwrap_err();
            assert_eq!(e.status(), 400, "{method} {path}");
            assert_eq!(
                e.to_string(),
                format!("{method} {path} is not supported by this VMM: it has no {feature}; see docs/api.md for what it serves")
            );
            assert_eq!(e.allow_header(), None);
        }
        // A path Firecracker does not have either stays 404.
        assert_eq!(Endpoint::find("GET", "/drivesx").unwrap_err().status(), 404);
    }

    #[test]
    fn firecracker_paths_that_are_served() {
        for (method, path) in [
            ("GET", "/"),
            ("GET", "/version"),
            ("GET", "/vm/config"),
            ("PUT", "/machine-config"),
            ("PATCH", "/machine-config"),
            ("GET", "/machine-config"),
            ("PUT", "/boot-source"),
            ("PUT", "/logger"),
            ("PUT", "/metrics"),
            ("PUT", "/actions"),
            ("PATCH", "/vm"),
        ] {
            let e = Endpoint::find(method, path).unwrap();
            assert_eq!((e.method().as_str(), e.path()), (method, path));
        }
    }

    #[test]
    fn success_statuses() {
        assert_eq!(Endpoint::PutActions.success_status(), 204);
        assert_eq!(Endpoint::PutGuestMemory.success_status(), 200);
        assert!(Endpoint::PatchVm.error_statuses().contains(&409));
        assert!(!Endpoint::GetMetrics.error_statuses().contains(&409));
    }
}

//! The VMM's HTTP API as Rust types: request and response bodies, their
//! validation, the errors and the route table. No KVM, no I/O, no HTTP here:
//! the server parses into these types, the VMM thread acts on them, and
//! `openapi.yaml` (checked against these types by the tests) describes them
//! to everyone else.
//!
//! # A request, step by step
//!
//! 1. The HTTP server (one thread, on a Unix socket) reads a request line,
//!    headers and a body of at most [`MAX_BODY_BYTES`].
//! 2. It calls [`ApiRequest::parse`] with the method, path and body. That
//!    finds the [`Endpoint`] (or answers 404/405, or 400 for a Firecracker
//!    endpoint this VMM does not have), decodes the JSON body into
//!    its type — every request type has `deny_unknown_fields`, so a typo is a
//!    400, not a silently ignored field — and runs the checks that need no VM
//!    state. On error it answers `err.status()` with `err.body()`, an
//!    [`ApiErrorBody`].
//! 3. It sends the [`ApiRequest`] to the VMM thread over a channel and waits.
//!    It never touches VM state itself.
//! 4. The VMM thread checks the request against the VM's state (e.g.
//!    [`MachineConfig::replace`] validates a `PUT`, [`MachineConfig::apply`]
//!    merges and validates a `PATCH`; a request the state forbids is an
//!    [`ApiError::InvalidState`], 409), checks the host paths it names (the
//!    kernel, log and metrics files), acts, and sends back
//!    `Result<ApiResponse, ApiError>`.
//! 5. The server writes [`ApiResponse::status`] and [`ApiResponse::to_json`]
//!    (or the error's status and body).
//!
//! # Example
//!
//! ```
//! use api::{ApiRequest, ApiResponse, MachineConfig, Strategy};
//!
//! let mut config = MachineConfig::default();
//! // PUT replaces the configuration; vcpu_count and mem_size_mib are required.
//! let req = ApiRequest::parse(
//!     "PUT",
//!     "/machine-config",
//!     br#"{"vcpu_count": 2, "mem_size_mib": 4096, "huge_pages": "None"}"#,
//! )
//! .unwrap();
//! if let ApiRequest::PutMachineConfig(put) = req {
//!     config.replace(put).unwrap(); // On the VMM thread.
//! }
//! // PATCH changes only the fields given.
//! let req = ApiRequest::parse("PATCH", "/machine-config", br#"{"memmap_init": "deferred"}"#).unwrap();
//! if let ApiRequest::PatchMachineConfig(update) = req {
//!     config.apply(&update).unwrap();
//! }
//! assert_eq!(config.memmap_init, Strategy::Deferred);
//! assert_eq!(config.vcpu_count, 2); // Untouched fields keep their value.
//!
//! let err = ApiRequest::parse("PATCH", "/machine-config", br#"{"mem_size_mb": 1}"#).unwrap_err();
//! assert_eq!(err.status(), 400);
//! assert!(err.body().fault_message.contains("unknown field `mem_size_mb`"));
//!
//! // A Firecracker endpoint this VMM lacks: 400, and the message says so.
//! let err = ApiRequest::parse("PUT", "/drives/rootfs", b"{}").unwrap_err();
//! assert_eq!(err.status(), 400);
//! assert!(err.body().fault_message.contains("not supported by this VMM"));
//!
//! let resp = ApiResponse::MachineConfig(config);
//! assert_eq!(resp.status(), 200);
//! ```
//!
//! # Conventions
//!
//! - Where an endpoint is also Firecracker's, paths, field names, state
//!   names, success statuses and idempotence are Firecracker's
//!   (`docs/api.md` has the endpoint-by-endpoint table).
//! - Enumerations are JSON strings (`"Running"`, `"ondemand"`, `"auto"`).
//! - Response bodies always carry every key; unknown values are `null`.
//! - Request bodies may leave out optional keys (or send `null`).
//! - Sizes are bytes unless the name says `_mib` or `_kib`; times are
//!   microseconds (`f64`).

mod boot;
mod endpoint;
mod error;
mod instance;
mod logger;
mod machine;
mod memory;
mod metrics;
pub mod prometheus;
mod request;
pub mod units;
mod vm_config;

#[cfg(test)]
mod openapi_tests;

pub use boot::{BootSource, BootSourceError, MAX_BOOT_ARGS_LEN};
pub use endpoint::{Endpoint, Method, RouteError, MAX_BODY_BYTES};
pub use error::{ApiError, ApiErrorBody, BoxError, ErrorChain};
pub use instance::{
    ActionType, FirecrackerVersion, InstanceActionInfo, InstanceInfo, InstanceStatus, VmState,
    VmStateTarget, VmStateUpdate, APP_NAME,
};
pub use logger::{LogLevel, Logger, LoggerError, MetricsConfig, MetricsConfigError};
pub use machine::{
    CpuTemplate, GuestCpl, HugePages, MachineConfig, MachineConfigError, MachineConfigPut,
    MachineConfigUpdate, Reclaim, Strategy, DEFAULT_CHUNK_KIB, DEFAULT_MEM_SIZE_MIB, DEFAULT_VCPU_COUNT,
    MAX_CHUNK_KIB, MAX_MEM_SIZE_MIB, MAX_RECLAIM_DELAY_MS, MAX_VCPUS, MIN_CHUNK_KIB, MIN_MEM_SIZE_MIB,
};
pub use memory::{
    BootTimings, GuestMemoryOutcome, GuestMemoryStatus, GuestMemoryTarget, GuestMemoryTargetError,
    GuestMemoryView, HostMemoryView, MemoryReport, ReclaimView,
};
pub use metrics::{Metrics, MetricsLine, VmExitCounts};
pub use request::{ApiRequest, ApiResponse};
pub use vm_config::{FullVmConfiguration, NoDevice};

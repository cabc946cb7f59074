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
//!    finds the [`Endpoint`] (or answers 404/405), decodes the JSON body into
//!    its type — every request type has `deny_unknown_fields`, so a typo is a
//!    400, not a silently ignored field — and runs the checks that need no VM
//!    state. On error it answers `err.status()` with `err.body()`, an
//!    [`ApiErrorBody`].
//! 3. It sends the [`ApiRequest`] to the VMM thread over a channel and waits.
//!    It never touches VM state itself.
//! 4. The VMM thread checks the request against the VM's state (e.g.
//!    [`MachineConfig::apply`] merges and validates a partial update; a
//!    request the state forbids is an [`ApiError::InvalidState`], 409), acts,
//!    and sends back `Result<ApiResponse, ApiError>`.
//! 5. The server writes [`ApiResponse::status`] and [`ApiResponse::to_json`]
//!    (or the error's status and body).
//!
//! # Example
//!
//! ```
//! use api::{ApiRequest, ApiResponse, MachineConfig, Strategy};
//!
//! let mut config = MachineConfig::default();
//! let req = ApiRequest::parse(
//!     "PUT",
//!     "/machine-config",
//!     br#"{"mem_size_mib": 4096, "memmap_init": "deferred"}"#,
//! )
//! .unwrap();
//! if let ApiRequest::PutMachineConfig(update) = req {
//!     config.apply(&update).unwrap(); // On the VMM thread.
//! }
//! assert_eq!(config.memmap_init, Strategy::Deferred);
//! assert_eq!(config.vcpu_count, 1); // Untouched fields keep their value.
//!
//! let err = ApiRequest::parse("PUT", "/machine-config", br#"{"mem_size_mb": 1}"#).unwrap_err();
//! assert_eq!(err.status(), 400);
//! assert!(err.body().fault_message.contains("unknown field `mem_size_mb`"));
//!
//! let resp = ApiResponse::MachineConfig(config);
//! assert_eq!(resp.status(), 200);
//! ```
//!
//! # Conventions
//!
//! - Enumerations are JSON strings (`"Running"`, `"ondemand"`, `"auto"`).
//! - Response bodies always carry every key; unknown values are `null`.
//! - Request bodies may leave out optional keys (or send `null`).
//! - Sizes are bytes unless the name says `_mib` or `_kib`; times are
//!   microseconds (`f64`).

mod boot;
mod endpoint;
mod error;
mod instance;
mod machine;
mod memory;
mod metrics;
mod request;

#[cfg(test)]
mod openapi_tests;

pub use boot::{BootSource, BootSourceError, MAX_BOOT_ARGS_LEN};
pub use endpoint::{Endpoint, Method, RouteError, MAX_BODY_BYTES};
pub use error::{ApiError, ApiErrorBody, BoxError, ErrorChain};
pub use instance::{
    ActionType, InstanceActionInfo, InstanceInfo, VmState, VmStateTarget, VmStateUpdate,
};
pub use machine::{
    GuestCpl, MachineConfig, MachineConfigError, MachineConfigUpdate, Strategy, DEFAULT_CHUNK_KIB,
    DEFAULT_MEM_SIZE_MIB, DEFAULT_VCPU_COUNT, MAX_CHUNK_KIB, MAX_MEM_SIZE_MIB, MAX_VCPUS,
    MIN_CHUNK_KIB,
};
pub use memory::{
    BootTimings, GuestMemoryOutcome, GuestMemoryStatus, GuestMemoryTarget, GuestMemoryTargetError,
    GuestMemoryView, HostMemoryView, MemoryReport,
};
pub use metrics::{Metrics, VmExitCounts};
pub use request::{ApiRequest, ApiResponse};

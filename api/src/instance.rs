//! The VM's life cycle: `GET /` ([`InstanceInfo`], Firecracker's shape),
//! `GET /vm/status` ([`InstanceStatus`], this VMM's extension with the exit
//! code and failure reason), `GET /version` ([`FirecrackerVersion`]),
//! `PUT /actions` ([`InstanceActionInfo`]) and `PATCH /vm`
//! ([`VmStateUpdate`]).
//!
//! The states, and what moves the VM between them:
//!
//! ```text
//! Not started --InstanceStart--> Running <--PATCH /vm Paused/Resumed--> Paused
//!                                  |
//!                                  +--guest exit, Shutdown, Ctrl-Alt-Del--> Halted
//!                                  +--error (KVM, bad guest)--------------> Failed
//! ```
//!
//! `Halted` and `Failed` are final, and this VMM's own: Firecracker has only
//! the first three states (its process exits when the guest stops, as this
//! one does once in-flight answers are sent). Pausing a paused VM and
//! resuming a running one succeed and change nothing, as in Firecracker.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where the VM is in its life cycle.
///
/// JSON: Firecracker's spelling (`"Not started"`, `"Running"`, `"Paused"`),
/// and `"Halted"`, `"Failed"`. The details of the two final states are
/// fields of [`InstanceStatus`] (`exit_code`, `failure_reason`), so `state`
/// is always a plain string that scripts can compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Configurable; `InstanceStart` has not been sent.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped by `PATCH /vm`; guest memory is kept.
    Paused,
    /// The guest shut down (exit code in [`InstanceStatus::exit_code`]).
    Halted,
    /// The VM stopped on an error ([`InstanceStatus::failure_reason`]).
    Failed,
}

impl VmState {
    /// All states.
    pub const ALL: [VmState; 5] = [
        VmState::NotStarted,
        VmState::Running,
        VmState::Paused,
        VmState::Halted,
        VmState::Failed,
    ];

    /// The JSON spelling.
    pub const fn name(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Halted => "Halted",
            VmState::Failed => "Failed",
        }
    }

    /// True once the VM has been started (whatever happened since).
    pub const fn started(self) -> bool {
        !matches!(self, VmState::NotStarted)
    }

    /// True for the states the VM never leaves.
    pub const fn is_final(self) -> bool {
        matches!(self, VmState::Halted | VmState::Failed)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `app_name` of [`InstanceInfo`]: this VMM's name (Firecracker says
/// `"Firecracker"`).
pub const APP_NAME: &str = "vmm";

/// The answer to `GET /`: Firecracker's `InstanceInfo`, field for field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// Application name, [`APP_NAME`].
    pub app_name: String,
    /// Instance id (given on the VMM command line, or generated).
    pub id: String,
    /// Life-cycle state.
    pub state: VmState,
    /// Version of the VMM binary.
    pub vmm_version: String,
}

impl InstanceInfo {
    /// The info of instance `id` in `state`.
    pub fn new(id: impl Into<String>, vmm_version: impl Into<String>, state: VmState) -> Self {
        InstanceInfo {
            app_name: APP_NAME.into(),
            id: id.into(),
            state,
            vmm_version: vmm_version.into(),
        }
    }
}

/// The answer to `GET /vm/status` (an extension: Firecracker has no such
/// endpoint): the state with what `GET /` leaves out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceStatus {
    /// Instance id, as in [`InstanceInfo::id`].
    pub id: String,
    /// Life-cycle state.
    pub state: VmState,
    /// Whether `InstanceStart` has been accepted (`state` is not `Not started`).
    pub started: bool,
    /// The guest's exit code once `state` is `Halted` or `Failed`, else `null`.
    pub exit_code: Option<i32>,
    /// What went wrong once `state` is `Failed`, else `null`.
    pub failure_reason: Option<String>,
    /// When the VM started (`InstanceStart`, or `vmm run`'s boot), in
    /// milliseconds since the Unix epoch; `null` before. `vmm ps` shows the
    /// uptime from it.
    pub started_at_unix_ms: Option<u64>,
}

impl InstanceStatus {
    /// The status for `state`, keeping `started` consistent with it.
    pub fn new(id: impl Into<String>, state: VmState) -> Self {
        InstanceStatus {
            id: id.into(),
            state,
            started: state.started(),
            exit_code: None,
            failure_reason: None,
            started_at_unix_ms: None,
        }
    }
}

/// The answer to `GET /version`: Firecracker's `FirecrackerVersion` shape,
/// carrying this VMM's version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerVersion {
    /// Version of the VMM binary (the same as [`InstanceInfo::vmm_version`]).
    pub firecracker_version: String,
}

/// What `PUT /actions` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActionType {
    /// Write one line of the counters of `GET /metrics` to the metrics file
    /// (`PUT /metrics`); nothing if none is set. Allowed in every state.
    FlushMetrics,
    /// Build the VM from the configuration and run it (`Not started` only).
    InstanceStart,
    /// Press Ctrl-Alt-Del: the guest is asked to shut down cleanly.
    SendCtrlAltDel,
    /// Stop the VM now; the state becomes `Halted` (an extension).
    Shutdown,
}

impl ActionType {
    /// All actions.
    pub const ALL: [ActionType; 4] = [
        ActionType::FlushMetrics,
        ActionType::InstanceStart,
        ActionType::SendCtrlAltDel,
        ActionType::Shutdown,
    ];
}

/// The body of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// The state `PATCH /vm` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmStateTarget {
    /// Stop the vCPUs (`Running`; a no-op when `Paused`).
    Paused,
    /// Run them again (`Paused`; a no-op when `Running`).
    Resumed,
}

impl VmStateTarget {
    /// All targets.
    pub const ALL: [VmStateTarget; 2] = [VmStateTarget::Paused, VmStateTarget::Resumed];
}

/// The body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    /// The state wanted.
    pub state: VmStateTarget,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_serialize_as_plain_strings() {
        for s in VmState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.name()));
            assert_eq!(
                serde_json::from_value::<VmState>(json!(s.name())).unwrap(),
                s
            );
            assert_eq!(s.to_string(), s.name());
        }
        assert!(serde_json::from_value::<VmState>(json!("running")).is_err());
        assert_eq!(serde_json::to_value(VmState::NotStarted).unwrap(), json!("Not started"));
        assert!(serde_json::from_value::<VmState>(json!("NotStarted")).is_err());
    }

    #[test]
    fn final_and_started() {
        assert!(!VmState::NotStarted.started());
        assert!(VmState::Halted.started() && VmState::Halted.is_final());
        assert!(VmState::Failed.is_final());
        assert!(!VmState::Paused.is_final());
    }

    #[test]
    fn instance_info_is_firecrackers_shape() {
        let info = InstanceInfo::new("vm0", "0.1.0", VmState::NotStarted);
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            json!({"app_name": "vmm", "id": "vm0", "state": "Not started", "vmm_version": "0.1.0"})
        );
        let v = serde_json::to_value(FirecrackerVersion { firecracker_version: "0.1.0".into() }).unwrap();
        assert_eq!(v, json!({"firecracker_version": "0.1.0"}));
    }

    #[test]
    fn instance_status_keeps_every_key() {
        let mut status = InstanceStatus::new("vm0", VmState::Failed);
        status.failure_reason = Some("KVM_RUN: Bad address".into());
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            json!({
                "id": "vm0", "state": "Failed", "started": true, "exit_code": null,
                "failure_reason": "KVM_RUN: Bad address", "started_at_unix_ms": null
            })
        );
        assert!(!InstanceStatus::new("vm0", VmState::NotStarted).started);
    }

    #[test]
    fn actions_parse() {
        for a in ActionType::ALL {
            let body = json!({ "action_type": a });
            let parsed: InstanceActionInfo = serde_json::from_value(body).unwrap();
            assert_eq!(parsed.action_type, a);
        }
        let v: InstanceActionInfo =
            serde_json::from_str(r#"{"action_type":"SendCtrlAltDel"}"#).unwrap();
        assert_eq!(v.action_type, ActionType::SendCtrlAltDel);
        let v: InstanceActionInfo =
            serde_json::from_str(r#"{"action_type":"FlushMetrics"}"#).unwrap();
        assert_eq!(v.action_type, ActionType::FlushMetrics);
        let v: InstanceActionInfo =
            serde_json::from_str(r#"{"action_type":"SendCtrlAltDel"}"#).unwrap();
        assert_eq!(v.action_type, ActionType::SendCtrlAltDel);
        assert!(serde_json::from_str::<InstanceActionInfo>(r#"{"action_type":"Reboot"}"#).is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<InstanceActionInfo>(
            r#"{"action_type":"Shutdown","force":true}"#
        )
        .is_err());
        assert!(serde_json::from_str::<VmStateUpdate>(r#"{"state":"Paused","x":1}"#).is_err());
    }

    #[test]
    fn vm_state_update_accepts_only_paused_and_resumed() {
        for t in VmStateTarget::ALL {
            let v: VmStateUpdate = serde_json::from_value(json!({ "state": t })).unwrap();
            assert_eq!(v.state, t);
        }
        assert!(serde_json::from_str::<VmStateUpdate>(r#"{"state":"Running"}"#).is_err());
    }
}

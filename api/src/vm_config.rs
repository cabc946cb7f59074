//! `GET /vm/config`: the whole configuration in Firecracker's
//! `FullVmConfiguration` shape (the shape of its `--config-file`), as far as
//! this VMM has the parts: no drives and no network interfaces (always
//! empty lists); no balloon, vsock, MMDS, entropy device or CPU config
//! (left out).

use crate::boot::BootSource;
use crate::logger::{Logger, MetricsConfig};
use crate::machine::MachineConfig;
use serde::{Deserialize, Serialize};

/// A device this VMM does not have: the element type of the lists that are
/// always empty. It has no values, so such a list cannot hold one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoDevice {}

/// The answer to `GET /vm/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// The kernel and its arguments (`PUT /boot-source`).
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// Block devices: none.
    pub drives: Vec<NoDevice>,
    /// The logger (`PUT /logger`), `null` if none was set.
    pub logger: Option<Logger>,
    /// vCPUs, memory and the rest (`GET /machine-config`).
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    /// The metrics file (`PUT /metrics`), `null` if none was set.
    pub metrics: Option<MetricsConfig>,
    /// Network interfaces: none.
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NoDevice>,
}

impl FullVmConfiguration {
    /// The configuration with these parts and no devices.
    pub fn new(
        boot_source: BootSource,
        machine_config: MachineConfig,
        logger: Option<Logger>,
        metrics: Option<MetricsConfig>,
    ) -> Self {
        FullVmConfiguration {
            boot_source,
            drives: Vec::new(),
            logger,
            machine_config,
            metrics,
            network_interfaces: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shape_is_firecrackers() {
        let c = FullVmConfiguration::new(
            BootSource { kernel_image_path: Some("/k".into()), ..Default::default() },
            MachineConfig::default(),
            None,
            Some(MetricsConfig { metrics_path: "/m".into() }),
        );
        let v = serde_json::to_value(&c).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["boot-source", "drives", "logger", "machine-config", "metrics", "network-interfaces"]);
        assert_eq!(v["drives"], json!([]));
        assert_eq!(v["network-interfaces"], json!([]));
        assert_eq!(v["logger"], json!(null));
        assert_eq!(v["boot-source"]["kernel_image_path"], "/k");
        assert_eq!(v["machine-config"]["vcpu_count"], 1);
        assert_eq!(v["metrics"]["metrics_path"], "/m");
        // It reads back; a device in a list cannot.
        assert_eq!(serde_json::from_value::<FullVmConfiguration>(v.clone()).unwrap(), c);
        let mut with_drive = v;
        with_drive["drives"] = json!([{"drive_id": "rootfs"}]);
        assert!(serde_json::from_value::<FullVmConfiguration>(with_drive).is_err());
    }
}

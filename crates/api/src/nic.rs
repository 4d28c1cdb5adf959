//! A VM's network interfaces ([`NicSpec`]): virtio-net on a tap device attached to a
//! bridge of the host. The MAC is fixed at creation and travels with the VM, so the
//! guest keeps its address and its connections across hosts.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One NIC of a VM (`VmSpec::nics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicSpec {
    /// The host bridge its tap joins (every host the VM may move to has one of that name).
    pub bridge: String,
    /// Its MAC address (`52:54:00:xx:xx:xx`); chosen by the agent at creation when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The guest's static IPv4 address with prefix (`10.77.0.12/24`), set by the guest
    /// itself from its kernel command line (the guest kernel has no `ip=` autoconfig).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl NicSpec {
    /// A NIC on `bridge` with an agent-chosen MAC and no address.
    pub fn on(bridge: impl Into<String>) -> NicSpec {
        NicSpec { bridge: bridge.into(), mac: None, address: None }
    }

    /// QEMU id of NIC number `index` (its netdev; the device is `<id>-dev`).
    pub fn netdev_id(index: usize) -> String {
        format!("net{index}")
    }
}

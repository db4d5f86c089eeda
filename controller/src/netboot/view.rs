//! JSON shapes of the netboot admin API, shared by the API and `shoalctl`.

use serde::{Deserialize, Serialize};

/// An image in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageView {
    /// Version.
    pub version: String,
    /// Whether machines without an assignment boot it.
    pub default: bool,
    /// Kernel size in bytes.
    pub kernel_bytes: u64,
    /// Initramfs size in bytes.
    pub initrd_bytes: u64,
    /// Kernel SHA-256.
    pub kernel_sha256: String,
    /// Initramfs SHA-256.
    pub initrd_sha256: String,
    /// Build time.
    pub built_at: String,
}

/// A machine seen on the netboot network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineView {
    /// MAC address.
    pub mac: String,
    /// Vendor from the IEEE OUI list, if known.
    pub vendor: Option<String>,
    /// Firmware architecture from DHCP option 93.
    pub arch: Option<String>,
    /// First seen, RFC 3339.
    pub first_seen: String,
    /// Last seen, RFC 3339.
    pub last_seen: String,
    /// Admitted to boot.
    pub admitted: bool,
    /// Image last served to it.
    pub last_image: Option<String>,
    /// Last boot script, RFC 3339.
    pub last_boot: Option<String>,
    /// The node it enrolled as, if any.
    pub node: Option<String>,
}

/// Body of `POST /v1/images/default` and `POST /v1/nodes/{id}/image`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetImage {
    /// Image version.
    pub version: String,
}

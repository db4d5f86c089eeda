//! Netboot images and machines: `/v1/images…`, `/v1/machines…`, `/v1/nodes/{id}/image`.

use std::fmt;

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

/// A hardware (Ethernet) address; in URLs (`/v1/machines/{mac}/…`) as `52:54:00:12:34:56` or
/// [`Mac::dashed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Text that should be a MAC address is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MacError {
    /// Not six bytes of hex, with or without `:` or `-` between them.
    #[error("{0:?} is not a MAC address")]
    Invalid(String),
}

impl std::str::FromStr for Mac {
    type Err = MacError;

    /// Accepts `52:54:00:12:34:56`, `52-54-00-12-34-56` and `525400123456`, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
        let bytes = hex::decode(&hex).map_err(|_| MacError::Invalid(s.to_owned()))?;
        let arr: [u8; 6] = bytes
            .try_into()
            .map_err(|_| MacError::Invalid(s.to_owned()))?;
        Ok(Mac(arr))
    }
}

impl Mac {
    /// The form used in URLs and file names: `52-54-00-12-34-56`.
    pub fn dashed(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_every_written_form_and_nothing_else() {
        let mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        for text in ["52:54:00:12:34:56", "52-54-00-12-34-56", "525400123456"] {
            assert_eq!(text.parse::<Mac>(), Ok(mac), "{text}");
        }
        let upper: Mac = "52:54:00:AB:CD:EF".parse().expect("upper case parses");
        assert_eq!(upper.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(mac.dashed(), "52-54-00-12-34-56");
        for bad in ["52:54:00", "52:54:00:12:34:56:78", "zz:54:00:12:34:56", ""] {
            assert_eq!(
                bad.parse::<Mac>().map_err(|e| e.to_string()),
                Err(format!("{bad:?} is not a MAC address"))
            );
        }
    }
}

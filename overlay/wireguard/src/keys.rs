//! WireGuard keys (x25519, base64 as `wg` prints them) and the client configuration a device is
//! given.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

/// A 32-byte WireGuard key (public or private).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

/// Public keys print; a private key is only ever shown where it is meant to be.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", &self.to_string()[..8])
    }
}

/// A key that is not 32 bytes of base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WireGuard key (expected 44 characters of base64, as `wg genkey`/`wg pubkey` print): {0:?}")]
pub struct KeyParseError(pub String);

impl FromStr for Key {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Key, KeyParseError> {
        let err = || KeyParseError(s.chars().take(64).collect());
        let bytes = STANDARD.decode(s.trim()).map_err(|_| err())?;
        Ok(Key(bytes.try_into().map_err(|_| err())?))
    }
}

impl Key {
    /// A fresh private key from the OS's random source.
    pub fn generate_private() -> Key {
        let secret = StaticSecret::random_from_rng(rand_core06::OsRng);
        Key(secret.to_bytes())
    }

    /// The public key of this private key.
    pub fn public(&self) -> Key {
        Key(PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }
}

/// What a device's configuration says.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The device's private key, if it was generated for it (else the operator fills it in).
    pub private_key: Option<Key>,
    /// The device's overlay address.
    pub address: Ipv4Addr,
    /// The gateways' shared public key.
    pub gateway_public_key: Key,
    /// The endpoint the client sends to (the network's floating gateway endpoint).
    pub endpoint: String,
    /// The network's subnet, as `A.B.C.D/N`.
    pub allowed_ips: String,
}

impl ClientConfig {
    /// The `wg-quick` configuration file.
    pub fn render(&self) -> String {
        let private = self
            .private_key
            .map(|k| k.to_string())
            .unwrap_or_else(|| "<the device's private key>".to_owned());
        format!(
            "[Interface]\nPrivateKey = {private}\nAddress = {}/32\n\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {}\nPersistentKeepalive = 25\n",
            self.address, self.gateway_public_key, self.endpoint, self.allowed_ips
        )
    }
}

/// Longest endpoint accepted: a 253-character DNS name, ':' and a port.
pub const MAX_ENDPOINT_LEN: usize = 253 + 6;

/// Checks `HOST:PORT` (a DNS name of letters, digits, '-' and '.') or `IP:PORT`: what a client can
/// use, and nothing that could add a line to the configuration file it is written into.
pub fn check_endpoint(endpoint: &str) -> Result<(), KeyParseError> {
    let err = || KeyParseError(endpoint.chars().take(64).collect());
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(err());
    }
    if endpoint.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match endpoint.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && port.parse::<u16>().is_ok() =>
        {
            Ok(())
        }
        _ => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_base64_and_bad_ones_are_refused() {
        let private = Key::generate_private();
        let text = private.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<Key>(), Ok(private));
        assert_ne!(private.public(), private);
        assert!("short".parse::<Key>().is_err());
        assert!(STANDARD.encode([1u8; 31]).parse::<Key>().is_err());
    }

    #[test]
    fn the_public_key_matches_wireguards_test_vector() {
        // RFC 7748 §6.1: Alice's private and public key.
        let private = Key(hex_bytes(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            private.public().0,
            hex_bytes("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
    }

    fn hex_bytes(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or_default();
        }
        out
    }

    #[test]
    fn the_config_is_what_wg_quick_reads() {
        let private = Key::generate_private();
        let config = ClientConfig {
            private_key: Some(private),
            address: Ipv4Addr::new(10, 90, 0, 10),
            gateway_public_key: private.public(),
            endpoint: "gw.example.net:51820".into(),
            allowed_ips: "10.90.0.0/16".into(),
        };
        let text = config.render();
        assert!(text.starts_with("[Interface]\nPrivateKey = "));
        assert!(text.contains("Address = 10.90.0.10/32\n"));
        assert!(text.contains("\n[Peer]\n"));
        assert!(text.contains("Endpoint = gw.example.net:51820\n"));
        assert!(text.contains("AllowedIPs = 10.90.0.0/16\n"));
        assert!(check_endpoint("gw.example.net:51820").is_ok());
        assert!(check_endpoint("[fd00::1]:51820").is_ok());
        assert!(check_endpoint("gw.example.net").is_err());
        assert!(check_endpoint("gw:1\nPostUp = rm -rf /:51820").is_err());
        assert!(check_endpoint("gw :51820").is_err());
        assert!(check_endpoint(&format!("{}:51820", "a".repeat(300))).is_err());
    }
}

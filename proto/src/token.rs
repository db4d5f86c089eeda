//! The join token an operator pastes into an agent.
//!
//! Format: `shoal1.<id>.<secret>.<ca>`, where `id` (16 hex) names the token in listings, `secret`
//! (32 hex, 128 random bits) proves it, and `ca` (64 hex) is the SHA-256 of the fleet CA
//! certificate (DER). The CA hash lets a brand-new agent authenticate the controller before it has
//! any trust anchor, the way kubeadm's `--discovery-token-ca-cert-hash` does, without a second
//! thing to paste.

use std::{fmt, str::FromStr};

const PREFIX: &str = "shoal1";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public identifier, shown by `shoalctl token list`.
    pub id: String,
    /// The secret; the controller stores only its hash.
    pub secret: String,
    /// SHA-256 of the fleet CA certificate (DER).
    pub ca_sha256: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFormatError {
    /// Wrong number of parts or wrong prefix.
    #[error("not a shoal join token: expected shoal1.<id>.<secret>.<ca-hash>")]
    Shape,
    /// A part has the wrong length or is not lower-case hex.
    #[error("join token {0} is malformed: expected {1} hex digits")]
    Part(&'static str, usize),
}

fn hex_part(s: &str, name: &'static str, len: usize) -> Result<(), TokenFormatError> {
    if s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(TokenFormatError::Part(name, len))
    }
}

impl FromStr for JoinToken {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenFormatError::Shape);
        };
        hex_part(id, "id", 16)?;
        hex_part(secret, "secret", 32)?;
        hex_part(ca, "CA hash", 64)?;
        let mut ca_sha256 = [0u8; 32];
        for (i, byte) in ca_sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&ca[2 * i..2 * i + 2], 16)
                .map_err(|_| TokenFormatError::Part("CA hash", 64))?;
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256,
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.", self.id, self.secret)?;
        for b in self.ca_sha256 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            id: "0123456789abcdef".into(),
            secret: "ab".repeat(16),
            ca_sha256: [7; 32],
        }
    }

    #[test]
    fn round_trips_through_text() {
        let text = sample().to_string();
        assert_eq!(text.parse::<JoinToken>(), Ok(sample()));
        assert_eq!(
            format!("  {text}\n").parse::<JoinToken>(),
            Ok(sample()),
            "file contents with newline"
        );
    }

    #[test]
    fn rejects_malformed_tokens() {
        let good = sample().to_string();
        assert_eq!("".parse::<JoinToken>(), Err(TokenFormatError::Shape));
        assert_eq!(
            good.replace("shoal1", "shoal2").parse::<JoinToken>(),
            Err(TokenFormatError::Shape)
        );
        assert_eq!(
            format!("{good}.x").parse::<JoinToken>(),
            Err(TokenFormatError::Shape)
        );
        assert_eq!(
            good[..good.len() - 1].parse::<JoinToken>(),
            Err(TokenFormatError::Part("CA hash", 64))
        );
        assert_eq!(
            good.replace("0123", "XY23").parse::<JoinToken>(),
            Err(TokenFormatError::Part("id", 16))
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", sample()).contains(&"ab".repeat(16)));
    }
}

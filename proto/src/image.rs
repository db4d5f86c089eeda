//! Signed netboot images: the manifest `images/build.sh` writes (`manifest.json`) and signs
//! (`manifest.sig`, a raw 64-byte Ed25519 signature over the manifest's exact bytes, the same
//! scheme as agent releases), and the rules its fields follow.
//!
//! Value types only, shared by the controller (which stores and serves images, and checks the files
//! against the manifest) and the agent (which verifies a [`crate::SignedKexecImage`] with its own
//! image keys before it kexecs, taking the hashes and the command line from the verified manifest).
//! The crypto and the JSON parsing are theirs: a verifier checks the signature first, then parses,
//! then calls [`ImageManifest::validate`].

use serde::{Deserialize, Serialize};

use crate::release::is_plain_name;

/// The manifest format this build writes and understands.
pub const IMAGE_MANIFEST_FORMAT: u32 = 1;
/// The manifest's file name in an image directory.
pub const IMAGE_MANIFEST_FILE: &str = "manifest.json";
/// The signature's file name in an image directory.
pub const IMAGE_SIGNATURE_FILE: &str = "manifest.sig";
/// Longest image command line ([`ImageManifest::cmdline`]). The kernel takes 2048 bytes on x86; the
/// boot's own arguments (controller, token, image) need room beside it.
pub const MAX_IMAGE_CMDLINE: usize = 1024;

/// One file of an image, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// File name in the image directory (a plain name).
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, 64 lower-case hex characters.
    pub sha256: String,
}

/// A build input (a Debian package and its version, or the agent binary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInput {
    /// Name.
    pub name: String,
    /// Version or hash.
    pub version: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Format version, [`IMAGE_MANIFEST_FORMAT`].
    pub format: u32,
    /// The image's version (a plain name).
    pub version: String,
    /// The kernel.
    pub kernel: ImageFile,
    /// The initramfs.
    pub initrd: ImageFile,
    /// Extra kernel command line (e.g. `console=ttyS0`): printable ASCII, at most
    /// [`MAX_IMAGE_CMDLINE`] bytes.
    #[serde(default)]
    pub cmdline: String,
    /// What the image was built from.
    #[serde(default)]
    pub inputs: Vec<ImageInput>,
    /// Build time (RFC 3339), from SOURCE_DATE_EPOCH.
    #[serde(default)]
    pub built_at: String,
}

/// Why a manifest breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageManifestError {
    /// A format this build does not know.
    #[error("unknown image manifest format {0}")]
    Format(u32),
    /// A version or file name that is not a plain name.
    #[error("invalid name {0:?}: use letters, digits, '.', '-', '_' and '+'")]
    Name(String),
    /// Another field breaks its rule.
    #[error("{0}")]
    Field(String),
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ImageManifest {
    /// Checks the fields against the rules: the format, plain names for the version and both files,
    /// two distinct data files (neither the manifest nor its signature), non-empty files with
    /// SHA-256 in lower-case hex, and a command line of printable ASCII within
    /// [`MAX_IMAGE_CMDLINE`]. Says nothing about the signature.
    pub fn validate(&self) -> Result<(), ImageManifestError> {
        if self.format != IMAGE_MANIFEST_FORMAT {
            return Err(ImageManifestError::Format(self.format));
        }
        for name in [&self.version, &self.kernel.file, &self.initrd.file] {
            if !is_plain_name(name) {
                return Err(ImageManifestError::Name(name.clone()));
            }
        }
        let reserved = |f: &str| f == IMAGE_MANIFEST_FILE || f == IMAGE_SIGNATURE_FILE;
        if self.kernel.file == self.initrd.file
            || reserved(&self.kernel.file)
            || reserved(&self.initrd.file)
        {
            return Err(ImageManifestError::Field(
                "kernel and initrd must be two distinct data files".into(),
            ));
        }
        for f in [&self.kernel, &self.initrd] {
            if !is_sha256_hex(&f.sha256) {
                return Err(ImageManifestError::Field(format!(
                    "{}: sha256 must be 64 lower-case hex characters",
                    f.file
                )));
            }
            if f.size == 0 {
                return Err(ImageManifestError::Field(format!(
                    "{}: size must not be zero",
                    f.file
                )));
            }
        }
        if self.cmdline.len() > MAX_IMAGE_CMDLINE {
            return Err(ImageManifestError::Field(format!(
                "cmdline is {} bytes, more than {MAX_IMAGE_CMDLINE}",
                self.cmdline.len()
            )));
        }
        // No control characters: the command line goes into iPXE scripts and a C string.
        if !self.cmdline.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(ImageManifestError::Field(
                "cmdline must be printable ASCII".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ImageManifest {
        ImageManifest {
            format: IMAGE_MANIFEST_FORMAT,
            version: "2026.11.23-1".into(),
            kernel: ImageFile {
                file: "vmlinuz".into(),
                size: 10,
                sha256: "ab".repeat(32),
            },
            initrd: ImageFile {
                file: "initrd.img".into(),
                size: 20,
                sha256: "cd".repeat(32),
            },
            cmdline: "console=ttyS0 panic=10".into(),
            inputs: vec![],
            built_at: String::new(),
        }
    }

    #[test]
    fn image_manifest_rules() {
        assert_eq!(manifest().validate(), Ok(()));
        let bad = |f: fn(&mut ImageManifest)| {
            let mut m = manifest();
            f(&mut m);
            m.validate()
        };
        assert_eq!(bad(|m| m.format = 2), Err(ImageManifestError::Format(2)));
        assert!(matches!(
            bad(|m| m.version = "../x".into()),
            Err(ImageManifestError::Name(_))
        ));
        assert!(matches!(
            bad(|m| m.kernel.file = "a/b".into()),
            Err(ImageManifestError::Name(_))
        ));
        assert!(matches!(
            bad(|m| m.initrd.file = "vmlinuz".into()),
            Err(ImageManifestError::Field(_))
        ));
        assert!(matches!(
            bad(|m| m.kernel.file = "manifest.sig".into()),
            Err(ImageManifestError::Field(_))
        ));
        assert!(matches!(
            bad(|m| m.kernel.sha256 = "AB".repeat(32)),
            Err(ImageManifestError::Field(_))
        ));
        assert!(matches!(
            bad(|m| m.initrd.size = 0),
            Err(ImageManifestError::Field(_))
        ));
        assert!(matches!(
            bad(|m| m.cmdline = "a\nkernel http://x".into()),
            Err(ImageManifestError::Field(_))
        ));
        assert!(matches!(
            bad(|m| m.cmdline = "x".repeat(MAX_IMAGE_CMDLINE + 1)),
            Err(ImageManifestError::Field(_))
        ));
    }
}

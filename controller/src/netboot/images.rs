//! The image store: signed netboot images (kernel + initramfs + manifest) under `DATA_DIR/images/`.
//!
//! An image directory, as `images/build.sh` writes it, holds `manifest.json`, `manifest.sig` (a raw
//! 64-byte Ed25519 signature over the exact bytes of `manifest.json`), and the two files the
//! manifest names. The controller trusts the public keys given with `--image-key` (32 raw bytes as
//! hex, the `.pub` file build.sh writes). Adding an image verifies the signature first, then each
//! file's size and SHA-256, and refuses on any mismatch; only then is the image moved into the
//! store.
//!
//! Layout: `images/<version>/{manifest.json,manifest.sig,<kernel>,<initrd>}`; uploads go to
//! `images/.staging-<version>/` and are renamed in place once verified. The default image's version
//! is kept in `images/default`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Files an upload may contain.
pub const MANIFEST: &str = shoal_proto::IMAGE_MANIFEST_FILE;
/// The manifest's signature.
pub const SIGNATURE: &str = shoal_proto::IMAGE_SIGNATURE_FILE;

/// Why an image was refused or the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The manifest is not valid JSON of the expected shape.
    #[error("bad manifest: {0}")]
    BadManifest(String),
    /// No trusted key verifies the signature.
    #[error("manifest signature does not verify with any trusted image key")]
    BadSignature,
    /// No trusted key is configured.
    #[error("no trusted image key: start the controller with --image-key FILE (the .pub written by images/build.sh)")]
    NoTrustedKey,
    /// A file's size or hash differs from the manifest.
    #[error("{file}: {what} mismatch (manifest {expected}, file {actual})")]
    Mismatch {
        /// The file.
        file: String,
        /// `size` or `sha256`.
        what: &'static str,
        /// What the manifest says.
        expected: String,
        /// What the file has.
        actual: String,
    },
    /// A file the manifest names is missing.
    #[error("missing file {0}")]
    Missing(String),
    /// A version or file name that is not a plain name.
    #[error("invalid name {0:?}: use letters, digits, '.', '-', '_' and '+'")]
    BadName(String),
    /// The version is already in the store.
    #[error("image {0} already exists")]
    Exists(String),
    /// No image has this version.
    #[error("no image {0}")]
    Unknown(String),
    /// A trusted key file is unusable.
    #[error("image key {path}: {cause}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        cause: String,
    },
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The manifest types and their field rules are shared with the agent, which verifies an image
/// itself before it kexecs into it ([`shoal_proto::ImageManifest`]).
pub use shoal_proto::{ImageFile as FileEntry, ImageInput as Input, ImageManifest as Manifest};

/// Checks that `name` is a plain file or version name ([`shoal_proto::is_plain_name`]).
pub fn check_name(name: &str) -> Result<(), ImageError> {
    if shoal_proto::is_plain_name(name) {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_owned()))
    }
}

/// Parses a trusted key: 64 hex characters (32 bytes), surrounding whitespace ignored.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    hex::decode(text.trim()).ok()?.try_into().ok()
}

/// Reads a trusted key file.
pub fn read_key(path: &Path) -> Result<[u8; 32], ImageError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    parse_key(&text).ok_or_else(|| ImageError::BadKey {
        path: path.to_owned(),
        cause: "expected 64 hex characters (an Ed25519 public key)".into(),
    })
}

/// Verifies a manifest's signature with the trusted keys and parses it. Pure: no file access.
pub fn verify_manifest(
    manifest: &[u8],
    signature: &[u8],
    keys: &[[u8; 32]],
) -> Result<Manifest, ImageError> {
    if keys.is_empty() {
        return Err(ImageError::NoTrustedKey);
    }
    let verified = keys.iter().any(|k| {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k)
            .verify(manifest, signature)
            .is_ok()
    });
    if !verified {
        return Err(ImageError::BadSignature);
    }
    let m: Manifest =
        serde_json::from_slice(manifest).map_err(|e| ImageError::BadManifest(e.to_string()))?;
    m.validate().map_err(|e| match e {
        shoal_proto::ImageManifestError::Name(n) => ImageError::BadName(n),
        other => ImageError::BadManifest(other.to_string()),
    })?;
    Ok(m)
}

/// Checks one file against its manifest entry.
fn verify_file(dir: &Path, entry: &FileEntry) -> Result<(), ImageError> {
    let path = dir.join(&entry.file);
    let mut f = fs::File::open(&path).map_err(|_| ImageError::Missing(entry.file.clone()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut f, &mut hasher).map_err(io(&path))?;
    if size != entry.size {
        return Err(ImageError::Mismatch {
            file: entry.file.clone(),
            what: "size",
            expected: entry.size.to_string(),
            actual: size.to_string(),
        });
    }
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(&entry.sha256) {
        return Err(ImageError::Mismatch {
            file: entry.file.clone(),
            what: "sha256",
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Verifies a whole image directory: signature, then every file.
pub fn verify_dir(dir: &Path, keys: &[[u8; 32]]) -> Result<Manifest, ImageError> {
    let mpath = dir.join(MANIFEST);
    let manifest = fs::read(&mpath).map_err(|_| ImageError::Missing(MANIFEST.into()))?;
    let signature =
        fs::read(dir.join(SIGNATURE)).map_err(|_| ImageError::Missing(SIGNATURE.into()))?;
    let m = verify_manifest(&manifest, &signature, keys)?;
    verify_file(dir, &m.kernel)?;
    verify_file(dir, &m.initrd)?;
    Ok(m)
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Its manifest.
    pub manifest: Manifest,
    /// Whether it is the default image.
    pub default: bool,
}

/// The image store on disk.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    keys: Vec<[u8; 32]>,
}

impl ImageStore {
    /// Opens (creating) `root`, with the trusted keys; removes interrupted uploads.
    pub fn open(root: PathBuf, keys: Vec<[u8; 32]>) -> Result<ImageStore, ImageError> {
        fs::create_dir_all(&root).map_err(io(&root))?;
        for entry in fs::read_dir(&root).map_err(io(&root))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".staging-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(ImageStore { root, keys })
    }

    /// Whether any key is trusted.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    fn staging(&self, version: &str) -> PathBuf {
        self.root.join(format!(".staging-{version}"))
    }

    /// Writes one uploaded file into the version's staging directory.
    pub fn stage(&self, version: &str, name: &str, bytes: &[u8]) -> Result<(), ImageError> {
        check_name(version)?;
        check_name(name)?;
        if self.root.join(version).exists() {
            return Err(ImageError::Exists(version.to_owned()));
        }
        let dir = self.staging(version);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(name);
        // Through an exclusive temporary file: a half-written upload never has the final name.
        shoal_overlay::pki::write_private_file(&path, bytes, 0o644).map_err(io(&path))
    }

    /// Verifies the staged upload and moves it into the store. A refused upload is deleted.
    pub fn commit(&self, version: &str) -> Result<Manifest, ImageError> {
        check_name(version)?;
        let dir = self.staging(version);
        let result = verify_dir(&dir, &self.keys).and_then(|m| {
            if m.version != version {
                return Err(ImageError::BadManifest(format!(
                    "manifest is for version {}, uploaded as {version}",
                    m.version
                )));
            }
            let target = self.root.join(version);
            if target.exists() {
                return Err(ImageError::Exists(version.to_owned()));
            }
            fs::rename(&dir, &target).map_err(io(&target))?;
            Ok(m)
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        let m = result?;
        if self.default_version()?.is_none() {
            self.set_default(&m.version)?;
        }
        Ok(m)
    }

    /// The manifest of a stored image (re-verified signature, not the files: those are checked at
    /// add).
    pub fn get(&self, version: &str) -> Result<Manifest, ImageError> {
        check_name(version)?;
        let dir = self.root.join(version);
        if !dir.is_dir() {
            return Err(ImageError::Unknown(version.to_owned()));
        }
        let manifest =
            fs::read(dir.join(MANIFEST)).map_err(|_| ImageError::Missing(MANIFEST.into()))?;
        let m: Manifest = serde_json::from_slice(&manifest)
            .map_err(|e| ImageError::BadManifest(e.to_string()))?;
        Ok(m)
    }

    /// A stored image's `manifest.json` exactly as signed, and `manifest.sig`: what an agent
    /// verifies with its own image keys before it kexecs into the image.
    pub fn signed_manifest(&self, version: &str) -> Result<(Vec<u8>, Vec<u8>), ImageError> {
        check_name(version)?;
        let dir = self.root.join(version);
        if !dir.is_dir() {
            return Err(ImageError::Unknown(version.to_owned()));
        }
        let manifest =
            fs::read(dir.join(MANIFEST)).map_err(|_| ImageError::Missing(MANIFEST.into()))?;
        let signature =
            fs::read(dir.join(SIGNATURE)).map_err(|_| ImageError::Missing(SIGNATURE.into()))?;
        Ok((manifest, signature))
    }

    /// A stored image's file path, for serving; only the kernel and initrd the manifest names.
    pub fn file(&self, version: &str, name: &str) -> Result<PathBuf, ImageError> {
        let m = self.get(version)?;
        if name != m.kernel.file && name != m.initrd.file {
            return Err(ImageError::Missing(name.to_owned()));
        }
        Ok(self.root.join(version).join(name))
    }

    /// All images, by version.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let default = self.default_version()?;
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            if let Ok(manifest) = self.get(&name) {
                out.push(ImageInfo {
                    default: default.as_deref() == Some(name.as_str()),
                    manifest,
                });
            }
        }
        out.sort_by(|a, b| a.manifest.version.cmp(&b.manifest.version));
        Ok(out)
    }

    /// The default image's version.
    pub fn default_version(&self) -> Result<Option<String>, ImageError> {
        let path = self.root.join("default");
        match fs::read_to_string(&path) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_owned())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Io { path, source: e }),
        }
    }

    /// Makes a stored image the default.
    pub fn set_default(&self, version: &str) -> Result<(), ImageError> {
        self.get(version)?;
        let path = self.root.join("default");
        shoal_overlay::pki::write_private_file(&path, version.as_bytes(), 0o644).map_err(io(&path))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::signature::KeyPair;

    pub(crate) struct TestImage {
        pub dir: tempfile::TempDir,
        pub public: [u8; 32],
    }

    /// Writes a signed image with small fake kernel and initrd.
    pub(crate) fn make_image(version: &str) -> TestImage {
        make_image_with(version, b"initrd bytes")
    }

    /// Writes a signed image with a small fake kernel and `initrd` as its initramfs.
    pub(crate) fn make_image_with(version: &str, initrd: &[u8]) -> TestImage {
        let dir = tempfile::tempdir().expect("tempdir");
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let entry = |name: &str, data: &[u8]| {
            fs::write(dir.path().join(name), data).expect("write");
            FileEntry {
                file: name.into(),
                size: data.len() as u64,
                sha256: hex::encode(Sha256::digest(data)),
            }
        };
        let m = Manifest {
            format: 1,
            version: version.into(),
            kernel: entry("vmlinuz", b"kernel bytes"),
            initrd: entry("initrd.img", initrd),
            cmdline: "console=ttyS0".into(),
            inputs: vec![],
            built_at: String::new(),
        };
        let bytes = serde_json::to_vec_pretty(&m).expect("json");
        fs::write(dir.path().join(MANIFEST), &bytes).expect("write");
        fs::write(dir.path().join(SIGNATURE), key.sign(&bytes).as_ref()).expect("write");
        let public = key.public_key().as_ref().try_into().expect("32 bytes");
        TestImage { dir, public }
    }

    fn upload(store: &ImageStore, from: &Path, version: &str) -> Result<Manifest, ImageError> {
        for name in [MANIFEST, SIGNATURE, "vmlinuz", "initrd.img"] {
            store.stage(version, name, &fs::read(from.join(name)).expect("read"))?;
        }
        store.commit(version)
    }

    #[test]
    fn a_signed_image_is_added_and_becomes_the_default() {
        let img = make_image("1.0");
        assert_eq!(
            verify_dir(img.dir.path(), &[img.public])
                .expect("verifies")
                .version,
            "1.0"
        );
        let root = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(root.path().join("images"), vec![img.public]).expect("open");
        upload(&store, img.dir.path(), "1.0").expect("added");
        assert_eq!(
            store.default_version().expect("default"),
            Some("1.0".into())
        );
        assert_eq!(store.list().expect("list").len(), 1);
        assert!(store.file("1.0", "vmlinuz").expect("file").exists());
        assert!(matches!(
            store.file("1.0", "manifest.sig"),
            Err(ImageError::Missing(_))
        ));
        assert!(matches!(
            upload(&store, img.dir.path(), "1.0"),
            Err(ImageError::Exists(_))
        ));
    }

    #[test]
    fn wrong_signature_hash_or_size_is_refused() {
        let img = make_image("1.0");
        let other = make_image("1.0");
        assert!(matches!(
            verify_dir(img.dir.path(), &[other.public]),
            Err(ImageError::BadSignature)
        ));
        assert!(matches!(
            verify_dir(img.dir.path(), &[]),
            Err(ImageError::NoTrustedKey)
        ));
        // Same size, different content.
        fs::write(img.dir.path().join("initrd.img"), b"INITRD bytes").expect("write");
        assert!(matches!(
            verify_dir(img.dir.path(), &[img.public]),
            Err(ImageError::Mismatch { what: "sha256", .. })
        ));
        fs::write(img.dir.path().join("initrd.img"), b"short").expect("write");
        assert!(matches!(
            verify_dir(img.dir.path(), &[img.public]),
            Err(ImageError::Mismatch { what: "size", .. })
        ));
        // A tampered manifest no longer verifies.
        let mut m = fs::read(img.dir.path().join(MANIFEST)).expect("read");
        m[10] ^= 1;
        fs::write(img.dir.path().join(MANIFEST), m).expect("write");
        assert!(matches!(
            verify_dir(img.dir.path(), &[img.public]),
            Err(ImageError::BadSignature)
        ));
        // A refused upload leaves nothing behind.
        let root = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(root.path().to_owned(), vec![img.public]).expect("open");
        assert!(upload(&store, img.dir.path(), "1.0").is_err());
        assert!(store.list().expect("list").is_empty());
        assert!(!root.path().join(".staging-1.0").exists());
    }

    #[test]
    fn names_cannot_escape_the_store() {
        for bad in ["../x", "a/b", ".hidden", "", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("2026.11.23-1+b1").is_ok());
    }
}

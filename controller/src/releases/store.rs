//! The controller's store of signed agent releases, and serving them to agents in chunks.
//!
//! Layout: `DATA_DIR/releases/<version>/<target>/{agent,manifest.json,manifest.sig,key_id}`. An
//! upload is staged file by file under `releases/.staging/<version>/<target>/` and committed by one
//! `rename` of the whole directory after [`releases::verify_upload`] accepted it, so a release is
//! either absent or complete. Everything lives in files, not in the sled store: the binary must be
//! a file (it is streamed), and one rename keeps manifest and binary from disagreeing after a
//! crash, which a sled record beside a file could not.
//!
//! The controller checks uploads against its own `--release-key`s so an operator learns of a wrong
//! key at once, but it is not the party that decides: agents verify again with their own key.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use serde::Serialize;
use shoal_proto::{
    check_release_name, ReleaseManifest, SignedRelease, UpdateFailure, MAX_RELEASE_CHUNK,
};

use crate::releases::verify;

/// File names inside a release directory, the same as in the upload API's paths.
pub use shoal_api::releases::{BINARY, MANIFEST, SIGNATURE};
const KEY_ID: &str = "key_id";
const STAGING: &str = ".staging";

/// Why a release could not be stored or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseStoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The upload does not verify (signature, key, size, hash) or its names break the rules.
    #[error("release refused: {0}")]
    Refused(#[from] UpdateFailure),
    /// A file name other than `agent`, `manifest.json`, `manifest.sig` was uploaded.
    #[error("unknown release file {0:?}: upload agent, manifest.json and manifest.sig")]
    BadFile(String),
    /// A different release with this version and target is already stored.
    #[error("release {version} for {target} already exists with different contents")]
    Exists {
        /// The version.
        version: String,
        /// The target.
        target: String,
    },
    /// No such release.
    #[error("no release {version} for target {target}")]
    Unknown {
        /// The version.
        version: String,
        /// The target.
        target: String,
    },
    /// The controller was started without `--release-key`, so it accepts no uploads.
    #[error("the controller has no --release-key: start it with the release public key to accept releases")]
    NoKeys,
}

/// A stored release as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRelease {
    /// The verified manifest.
    pub manifest: ReleaseManifest,
    /// The id of the key that signed it.
    pub key_id: String,
}

/// The release directory tree.
#[derive(Debug)]
pub struct ReleaseStore {
    root: PathBuf,
    keys: Vec<[u8; 32]>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseStoreError + '_ {
    move |source| ReleaseStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<(), ReleaseStoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

impl ReleaseStore {
    /// Opens (creating) `root` with the trusted release keys; drops interrupted uploads.
    pub fn open(root: PathBuf, keys: Vec<[u8; 32]>) -> Result<ReleaseStore, ReleaseStoreError> {
        let staging = root.join(STAGING);
        match fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&staging)(e)),
        }
        fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(ReleaseStore { root, keys })
    }

    fn dir(&self, version: &str, target: &str) -> Result<PathBuf, ReleaseStoreError> {
        check_release_name(version)?;
        check_release_name(target)?;
        Ok(self.root.join(version).join(target))
    }

    fn staging(&self, version: &str, target: &str) -> Result<PathBuf, ReleaseStoreError> {
        check_release_name(version)?;
        check_release_name(target)?;
        Ok(self.root.join(STAGING).join(version).join(target))
    }

    /// Writes one uploaded file (`agent`, `manifest.json` or `manifest.sig`) into the staging
    /// directory.
    pub fn stage(
        &self,
        version: &str,
        target: &str,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), ReleaseStoreError> {
        if ![BINARY, MANIFEST, SIGNATURE].contains(&name) {
            return Err(ReleaseStoreError::BadFile(name.to_owned()));
        }
        if self.keys.is_empty() {
            return Err(ReleaseStoreError::NoKeys);
        }
        let dir = self.staging(version, target)?;
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(name);
        // Through an exclusive temporary file: a half-written upload never has the final name.
        shoal_overlay::pki::write_private_file(&path, bytes, 0o644).map_err(io(&path))
    }

    /// Verifies the staged upload and moves it into the store; a refused upload is deleted. Adding
    /// the same release twice is not an error.
    pub fn commit(&self, version: &str, target: &str) -> Result<StoredRelease, ReleaseStoreError> {
        let staging = self.staging(version, target)?;
        let result = self.commit_staged(&staging, version, target);
        let _ = fs::remove_dir_all(&staging);
        result
    }

    fn commit_staged(
        &self,
        staging: &Path,
        version: &str,
        target: &str,
    ) -> Result<StoredRelease, ReleaseStoreError> {
        if self.keys.is_empty() {
            return Err(ReleaseStoreError::NoKeys);
        }
        let read = |name: &str| {
            let path = staging.join(name);
            fs::read(&path).map_err(io(&path))
        };
        let signed = SignedRelease {
            manifest: read(MANIFEST)?,
            signature: read(SIGNATURE)?,
            key_id: String::new(),
        };
        let binary = read(BINARY)?;
        let manifest = verify::verify_upload(&signed, &binary, &self.keys)?;
        drop(binary);
        if manifest.version != version || manifest.target != target {
            return Err(UpdateFailure::Malformed(format!(
                "the manifest is for {} on {}, uploaded as {version} on {target}",
                manifest.version, manifest.target
            ))
            .into());
        }
        let key_id = self
            .keys
            .iter()
            .find(|k| {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k)
                    .verify(&signed.manifest, &signed.signature)
                    .is_ok()
            })
            .map(|k| verify::key_id(k))
            .unwrap_or_default();
        let key_path = staging.join(KEY_ID);
        shoal_overlay::pki::write_private_file(&key_path, key_id.as_bytes(), 0o644)
            .map_err(io(&key_path))?;
        fsync_dir(staging)?;
        let dir = self.dir(version, target)?;
        if dir.exists() {
            return match self.get(version, target) {
                Ok((stored, _)) if stored.manifest == signed.manifest => {
                    Ok(StoredRelease { manifest, key_id })
                }
                _ => Err(ReleaseStoreError::Exists {
                    version: version.into(),
                    target: target.into(),
                }),
            };
        }
        let parent = self.root.join(version);
        fs::create_dir_all(&parent).map_err(io(&parent))?;
        fs::rename(staging, &dir).map_err(io(&dir))?;
        fsync_dir(&parent)?;
        Ok(StoredRelease { manifest, key_id })
    }

    /// A stored release's envelope and the path of its binary.
    pub fn get(
        &self,
        version: &str,
        target: &str,
    ) -> Result<(SignedRelease, PathBuf), ReleaseStoreError> {
        let dir = self.dir(version, target)?;
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ReleaseStoreError::Unknown {
                    version: version.to_owned(),
                    target: target.to_owned(),
                },
                _ => io(&path)(e),
            })
        };
        let signed = SignedRelease {
            manifest: read(MANIFEST)?,
            signature: read(SIGNATURE)?,
            key_id: String::from_utf8_lossy(&read(KEY_ID)?).trim().to_owned(),
        };
        Ok((signed, dir.join(BINARY)))
    }

    /// Every stored release, by version then target.
    pub fn list(&self) -> Result<Vec<StoredRelease>, ReleaseStoreError> {
        let mut out = Vec::new();
        for version in read_dir_names(&self.root)? {
            if version.starts_with('.') || check_release_name(&version).is_err() {
                continue;
            }
            for target in read_dir_names(&self.root.join(&version))? {
                let Ok((signed, _)) = self.get(&version, &target) else {
                    continue;
                };
                // Stored manifests were verified at upload; one that no longer parses is skipped.
                if let Ok(manifest) = serde_json::from_slice::<ReleaseManifest>(&signed.manifest) {
                    out.push(StoredRelease {
                        manifest,
                        key_id: signed.key_id,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The targets `version` is stored for.
    pub fn targets(&self, version: &str) -> Result<Vec<String>, ReleaseStoreError> {
        check_release_name(version)?;
        let dir = self.root.join(version);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        Ok(read_dir_names(&dir)?
            .into_iter()
            .filter(|t| check_release_name(t).is_ok())
            .collect())
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, ReleaseStoreError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Reads the chunk of `binary` at `offset` (at most [`MAX_RELEASE_CHUNK`] bytes); empty at the end.
/// Blocking: call from a blocking task.
pub fn read_chunk(binary: &Path, offset: u64) -> Result<Vec<u8>, ReleaseStoreError> {
    let mut f = fs::File::open(binary).map_err(io(binary))?;
    f.seek(SeekFrom::Start(offset)).map_err(io(binary))?;
    let mut buf = Vec::with_capacity(MAX_RELEASE_CHUNK);
    f.take(MAX_RELEASE_CHUNK as u64)
        .read_to_end(&mut buf)
        .map_err(io(binary))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::releases::verify::{load_signing_key, sign_release};
    use shoal_proto::UnixMillis;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIK+B2im/6O/v2TLJvQeJok4Rx0py/TkTrJAYqLjrQq7a\n\
        -----END PRIVATE KEY-----\n";
    const PUB: &str = "46badf9cba6ddc2caefc23d7cbe486fbf70c11833afb5952c750170fdf0e3aa2";
    const TARGET: &str = "x86_64-unknown-linux-gnu";

    fn store(dir: &Path) -> ReleaseStore {
        let key: [u8; 32] = hex::decode(PUB).expect("hex").try_into().expect("32");
        ReleaseStore::open(dir.join("releases"), vec![key]).expect("open")
    }

    fn upload(
        s: &ReleaseStore,
        binary: &[u8],
        signed: &SignedRelease,
        version: &str,
    ) -> Result<StoredRelease, ReleaseStoreError> {
        s.stage(version, TARGET, BINARY, binary)?;
        s.stage(version, TARGET, MANIFEST, &signed.manifest)?;
        s.stage(version, TARGET, SIGNATURE, &signed.signature)?;
        s.commit(version, TARGET)
    }

    #[test]
    fn a_signed_release_is_stored_listed_and_served_in_chunks() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        let key = load_signing_key(KEY).expect("key");
        let binary: Vec<u8> = (0..(MAX_RELEASE_CHUNK * 2 + 10)).map(|i| i as u8).collect();
        let (_, signed) =
            sign_release(&binary, "0.2.0", TARGET, UnixMillis(1), &key).expect("sign");
        let stored = upload(&s, &binary, &signed, "0.2.0").expect("stored");
        assert_eq!(stored.key_id, signed.key_id);
        upload(&s, &binary, &signed, "0.2.0").expect("the same release again is fine");
        assert_eq!(s.list().expect("list"), vec![stored]);
        assert_eq!(
            s.targets("0.2.0").expect("targets"),
            vec![TARGET.to_owned()]
        );
        let (env, path) = s.get("0.2.0", TARGET).expect("get");
        assert_eq!(env, signed);
        let mut back = Vec::new();
        loop {
            let chunk = read_chunk(&path, back.len() as u64).expect("chunk");
            assert!(chunk.len() <= MAX_RELEASE_CHUNK);
            if chunk.is_empty() {
                break;
            }
            back.extend(chunk);
        }
        assert_eq!(back, binary);
        assert!(matches!(
            s.get("0.3.0", TARGET),
            Err(ReleaseStoreError::Unknown { .. })
        ));
    }

    #[test]
    fn bad_uploads_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        let key = load_signing_key(KEY).expect("key");
        let binary = b"\x7fELF agent".repeat(50);
        let (_, signed) =
            sign_release(&binary, "0.2.0", TARGET, UnixMillis(1), &key).expect("sign");
        let mut bad = signed.clone();
        bad.signature[3] ^= 1;
        assert!(matches!(
            upload(&s, &binary, &bad, "0.2.0"),
            Err(ReleaseStoreError::Refused(_))
        ));
        assert!(matches!(
            upload(&s, &binary[1..], &signed, "0.2.0"),
            Err(ReleaseStoreError::Refused(UpdateFailure::Truncated { .. }))
        ));
        assert!(matches!(
            upload(&s, &binary, &signed, "0.3.0"),
            Err(ReleaseStoreError::Refused(UpdateFailure::Malformed(_)))
        ));
        assert!(matches!(
            s.stage("../x", TARGET, BINARY, b""),
            Err(ReleaseStoreError::Refused(_))
        ));
        assert!(matches!(
            s.stage("0.2.0", TARGET, "other", b""),
            Err(ReleaseStoreError::BadFile(_))
        ));
        assert!(s.list().expect("list").is_empty());
        let none = ReleaseStore::open(dir.path().join("r2"), vec![]).expect("open");
        assert!(matches!(
            none.stage("0.2.0", TARGET, BINARY, b"x"),
            Err(ReleaseStoreError::NoKeys)
        ));
    }
}

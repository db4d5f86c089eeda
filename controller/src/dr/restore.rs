//! Restoring an archive into a new data dir, all or nothing.
//!
//! The target must be absent or an empty directory. The archive is decrypted and checked in memory
//! first, so a wrong passphrase or a damaged, truncated or hostile file is refused before anything
//! is written. Then everything is written into a temporary sibling directory (`.NAME.restore-…`
//! beside the target), the store is imported and opened again to count its nodes, the CA and the
//! admin credential are loaded as the controller will load them, everything is fsynced, and only
//! then is the directory renamed into place (and its parent fsynced). Any failure removes the
//! temporary directory: the target is left as it was.

use std::path::{Path, PathBuf};

use super::archive::{self, ArchiveError, Manifest};
use crate::store::{Backend, SledBackend, Store, StoreError};

/// Why a restore was refused or failed. The target dir is untouched in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The archive cannot be used (wrong passphrase, damaged, not an archive, too large).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The target exists and is not an empty directory.
    #[error("{0} is not empty: restore into a new or empty directory")]
    NotEmpty(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The restored store could not be written or opened.
    #[error("restored store: {0}")]
    Store(#[from] StoreError),
    /// The restored data dir does not load as the controller would load it.
    #[error("the restored data dir does not verify: {0}")]
    Verify(String),
}

/// What a restore wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// The archive's manifest.
    pub manifest: Manifest,
    /// The data dir now holding it.
    pub data_dir: PathBuf,
    /// Nodes the restored store holds, counted after opening it.
    pub nodes: usize,
}

/// What [`verify_archive`] found.
pub type VerifyReport = RestoreReport;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Restores the archive in `sealed` (opened with `passphrase`) into `data_dir`, which must be
/// absent or empty. All or nothing: see the module docs.
pub fn restore(
    sealed: &[u8],
    passphrase: &str,
    data_dir: &Path,
) -> Result<RestoreReport, RestoreError> {
    check_target(data_dir)?;
    let archive = archive::open(sealed, passphrase)?;
    let name = data_dir
        .file_name()
        .ok_or_else(|| RestoreError::Verify(format!("{} has no name", data_dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(
        ".{name}.restore-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = write_and_verify(&archive, &tmp).and_then(|nodes| {
        // An empty target directory is replaced by the rename (Linux renames a directory over an
        // empty one); a non-empty one was refused above.
        check_target(data_dir)?;
        std::fs::rename(&tmp, data_dir).map_err(io(data_dir))?;
        sync_dir(&parent)?;
        Ok(nodes)
    });
    match result {
        Ok(nodes) => Ok(RestoreReport {
            manifest: archive.manifest,
            data_dir: data_dir.to_owned(),
            nodes,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Restores the archive into `scratch_dir` (absent or empty) and checks that it opens as a
/// controller's data dir: the store opens and holds the nodes the manifest counts, the CA and the
/// admin credential load. The seam for scheduled backups, which verify each archive they write;
/// the caller removes `scratch_dir` afterwards.
pub fn verify_archive(
    sealed: &[u8],
    passphrase: &str,
    scratch_dir: &Path,
) -> Result<VerifyReport, RestoreError> {
    restore(sealed, passphrase, scratch_dir)
}

fn check_target(dir: &Path) -> Result<(), RestoreError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
        Ok(meta) if !meta.is_dir() => Err(RestoreError::NotEmpty(dir.to_owned())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
            if entries.next().is_some() {
                return Err(RestoreError::NotEmpty(dir.to_owned()));
            }
            Ok(())
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), RestoreError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// Writes the archive into `dir` (created, 0700), verifies it, and returns its node count.
fn write_and_verify(archive: &archive::Archive, dir: &Path) -> Result<usize, RestoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    for f in &archive.files {
        let path = dir.join(&f.name);
        shoal_overlay::pki::write_private_file(&path, &f.bytes, f.mode & 0o777)
            .map_err(io(&path))?;
    }
    let store_dir = dir.join("store");
    {
        let backend = SledBackend::open(&store_dir)?;
        for t in &archive.tables {
            backend.import(&t.name, &t.entries)?;
        }
        backend.flush()?;
    }
    let nodes = {
        let store = Store::open(&store_dir)?;
        let nodes = store.nodes()?.len();
        store.flush()?;
        nodes
    };
    if nodes as u64 != archive.manifest.nodes {
        return Err(RestoreError::Verify(format!(
            "the store holds {nodes} nodes, the manifest says {}",
            archive.manifest.nodes
        )));
    }
    crate::registry::ca::Ca::load_or_create(dir)
        .map_err(|e| RestoreError::Verify(e.to_string()))?;
    shoal_api::AdminConf::read(&dir.join(shoal_api::ADMIN_CONF_FILE))
        .map_err(|e| RestoreError::Verify(e.to_string()))?;
    sync_dir(&store_dir)?;
    sync_dir(dir)?;
    Ok(nodes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use super::*;
    use crate::{
        dr::{
            archive::tests::{PASS, TEST_WORK_FACTOR},
            snapshot::snapshot_archive_with,
        },
        server::{now_ms, Controller, ControllerConfig},
    };

    fn api() -> SocketAddr {
        "127.0.0.1:7441".parse().unwrap()
    }

    fn controller(dir: &Path) -> Arc<Controller> {
        Controller::open(ControllerConfig::for_tests(dir.to_owned()), api()).unwrap()
    }

    /// A controller with three nodes in the default network, and its sealed archive.
    fn fleet(dir: &Path) -> (Arc<Controller>, Vec<u8>) {
        let ctl = controller(dir);
        for m in ["m1", "m2", "m3"] {
            crate::test_support::enrol_for_tests(&ctl.store, m, &[("role", "db")], now_ms());
        }
        let sealed = snapshot_archive_with(&ctl, PASS, TEST_WORK_FACTOR).unwrap();
        (ctl, sealed)
    }

    fn empty_or_absent(dir: &Path) -> bool {
        !dir.exists() || std::fs::read_dir(dir).unwrap().next().is_none()
    }

    fn no_leftovers(parent: &Path) {
        let names: Vec<String> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.contains(".restore-")),
            "temporary restore dirs left behind: {names:?}"
        );
    }

    #[test]
    fn a_restored_data_dir_is_the_same_fleet() {
        let old = tempfile::tempdir().unwrap();
        let (ctl, sealed) = fleet(old.path());
        let nodes = ctl.store.nodes().unwrap();
        let members = ctl.store.memberships_by_node().unwrap();
        let tables = ctl.store.freeze().unwrap().tables().unwrap();
        let conf = std::fs::read(old.path().join(shoal_api::ADMIN_CONF_FILE)).unwrap();
        let ca_key = std::fs::read(old.path().join("ca.key")).unwrap();
        let (ca, token) = (ctl.ca.sha256(), ctl.admin_token_sha256);
        drop(ctl);

        let new = tempfile::tempdir().unwrap();
        let target = new.path().join("data");
        let report = restore(&sealed, PASS, &target).unwrap();
        assert_eq!(report.nodes, 3);
        assert_eq!(report.manifest.nodes, 3);
        no_leftovers(new.path());
        {
            let restored = Store::open(&target.join("store")).unwrap();
            assert_eq!(
                restored.freeze().unwrap().tables().unwrap(),
                tables,
                "every table"
            );
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&target), 0o700);
        assert_eq!(mode(&target.join("ca.key")), 0o600);
        assert_eq!(std::fs::read(target.join("ca.key")).unwrap(), ca_key);
        let secrets = crate::backups::secrets::SECRETS_KEY_FILE;
        assert_eq!(
            std::fs::read(target.join(secrets)).unwrap(),
            std::fs::read(old.path().join(secrets)).unwrap(),
            "the backup targets' sealing key travels with the archive"
        );
        assert_eq!(mode(&target.join(secrets)), 0o600);
        assert_eq!(
            std::fs::read(target.join(shoal_api::ADMIN_CONF_FILE)).unwrap(),
            conf
        );

        let ctl = controller(&target);
        assert_eq!(ctl.ca.sha256(), ca, "the same CA");
        assert_eq!(ctl.admin_token_sha256, token, "the same admin credential");
        assert_eq!(ctl.store.nodes().unwrap(), nodes, "the same nodes");
        assert_eq!(
            ctl.store.memberships_by_node().unwrap(),
            members,
            "the same overlay addresses"
        );
        assert_eq!(
            std::fs::read(target.join(shoal_api::ADMIN_CONF_FILE)).unwrap(),
            conf,
            "admin.conf kept as it was (same address)"
        );
    }

    #[test]
    fn a_wrong_passphrase_writes_nothing() {
        let old = tempfile::tempdir().unwrap();
        let (_ctl, sealed) = fleet(old.path());
        let new = tempfile::tempdir().unwrap();
        let target = new.path().join("data");
        let e = restore(&sealed, "not the passphrase", &target).unwrap_err();
        assert!(
            matches!(e, RestoreError::Archive(ArchiveError::WrongPassphrase)),
            "{e:?}"
        );
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        assert!(!target.exists());
        no_leftovers(new.path());
    }

    #[test]
    fn truncated_or_flipped_files_write_nothing() {
        let old = tempfile::tempdir().unwrap();
        let (_ctl, sealed) = fleet(old.path());
        let new = tempfile::tempdir().unwrap();
        let target = new.path().join("data");
        std::fs::create_dir(&target).unwrap();
        for len in [sealed.len() / 3, sealed.len() - 1] {
            let e = restore(&sealed[..len], PASS, &target).unwrap_err();
            assert!(
                matches!(e, RestoreError::Archive(ArchiveError::Damaged(_))),
                "truncated to {len}: {e:?}"
            );
            assert!(e.to_string().contains("damaged or truncated"), "{e}");
        }
        let mut flipped = sealed.clone();
        let at = flipped.len() - 100;
        flipped[at] ^= 0x40;
        let e = restore(&flipped, PASS, &target).unwrap_err();
        assert!(
            matches!(e, RestoreError::Archive(ArchiveError::Damaged(_))),
            "{e:?}"
        );
        assert!(empty_or_absent(&target), "the empty target stays empty");
        no_leftovers(new.path());
        // The good file goes into the empty directory.
        restore(&sealed, PASS, &target).unwrap();
    }

    #[test]
    fn a_non_empty_target_is_refused() {
        let old = tempfile::tempdir().unwrap();
        let (_ctl, sealed) = fleet(old.path());
        let e = restore(&sealed, PASS, old.path()).unwrap_err();
        assert!(matches!(e, RestoreError::NotEmpty(_)), "{e:?}");
        assert!(e.to_string().contains("not empty"), "{e}");
        let file = old.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            restore(&sealed, PASS, &file),
            Err(RestoreError::NotEmpty(_))
        ));
    }

    #[test]
    fn verify_archive_counts_the_nodes() {
        let old = tempfile::tempdir().unwrap();
        let (_ctl, sealed) = fleet(old.path());
        let scratch = tempfile::tempdir().unwrap();
        let report = verify_archive(&sealed, PASS, &scratch.path().join("verify")).unwrap();
        assert_eq!(report.nodes, 3);
        assert!(
            report.manifest.tables > 0
                && report.manifest.files == super::super::archive::FILES.len() as u64
        );
    }
}

//! Restore verification: hash a sample of the live files right after a backup, later restore
//! exactly those files into a scratch directory and compare.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::types::{Entry, EntryKind, FileHash, Mismatch, SampleVerification};
use crate::{Repo, Restic};

/// Up to `n` regular files of `entries`, chosen uniformly without repetition.
pub fn sample_files<R: Rng + ?Sized>(entries: &[Entry], n: usize, rng: &mut R) -> Vec<Entry> {
    let files: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .collect();
    let n = n.min(files.len());
    let mut picked: Vec<usize> = rand::seq::index::sample(rng, files.len(), n).into_vec();
    picked.sort_unstable();
    picked.into_iter().map(|i| files[i].clone()).collect()
}

/// Hashes the live files of `sample` (snapshot entries of a backup of absolute paths, so the
/// snapshot path is the live path). Run it right after the backup: a file whose size or mtime no
/// longer matches its entry, or that changes while it is hashed, changed since restic read it and
/// is skipped, as is one that cannot be read.
pub async fn record_hashes(sample: &[Entry]) -> Vec<FileHash> {
    let sample = sample.to_vec();
    let hashed = tokio::task::spawn_blocking(move || {
        sample
            .iter()
            .filter_map(|entry| match hash_if_unchanged(entry) {
                Ok(Some(h)) => Some(h),
                Ok(None) => {
                    tracing::debug!(path = %entry.path, "changed since the backup; not sampled");
                    None
                }
                Err(e) => {
                    tracing::debug!(path = %entry.path, error = %e, "unreadable; not sampled");
                    None
                }
            })
            .collect()
    })
    .await;
    hashed.unwrap_or_default()
}

fn matches_entry(meta: &std::fs::Metadata, entry: &Entry) -> bool {
    meta.is_file() && meta.len() == entry.size && meta.modified().ok() == entry.mtime
}

fn hash_if_unchanged(entry: &Entry) -> std::io::Result<Option<FileHash>> {
    let path = Path::new(&entry.path);
    let mut file = std::fs::File::open(path)?;
    if !matches_entry(&file.metadata()?, entry) {
        return Ok(None);
    }
    let (size, sha256) = hash_reader(&mut file)?;
    if size != entry.size || !matches_entry(&std::fs::metadata(path)?, entry) {
        return Ok(None);
    }
    Ok(Some(FileHash {
        path: entry.path.clone(),
        size,
        sha256,
    }))
}

fn hash_reader(r: &mut impl Read) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Removes the scratch directory however verification ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "could not remove scratch dir");
            }
        }
    }
}

impl Restic {
    /// Restores exactly the files of `hashes` from `snapshot` into a fresh directory under
    /// `scratch_dir` and compares each with its recorded size and SHA-256. A file restic could not
    /// restore (a damaged pack), a missing file and a different one are [`Mismatch`]es; only a
    /// restore that could not run at all is an `Err`. The fresh directory is always removed.
    pub async fn verify_sample(
        &self,
        repo: &Repo,
        snapshot: &str,
        hashes: &[FileHash],
        scratch_dir: &Path,
    ) -> Result<SampleVerification> {
        if hashes.is_empty() {
            return Ok(SampleVerification::default());
        }
        let dir = scratch_dir.join(format!("shoal-verify-{:016x}", rand::random::<u64>()));
        tokio::fs::create_dir_all(scratch_dir)
            .await
            .map_err(|e| Error::io(format!("creating {}", scratch_dir.display()), e))?;
        tokio::fs::create_dir(&dir)
            .await
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let scratch = Scratch(dir);
        let includes: Vec<String> = hashes.iter().map(|h| h.path.clone()).collect();
        let (_, _, file_errors) = self
            .restore_reporting(repo, snapshot, &includes, &scratch.0)
            .await?;
        let root = scratch.0.clone();
        let hashes = hashes.to_vec();
        let result = tokio::task::spawn_blocking(move || compare(&root, &hashes, &file_errors))
            .await
            .map_err(|e| Error::io("comparing restored files", std::io::Error::other(e)))?;
        drop(scratch);
        Ok(result)
    }
}

fn compare(
    root: &Path,
    hashes: &[FileHash],
    file_errors: &[(String, String)],
) -> SampleVerification {
    let mut out = SampleVerification::default();
    for h in hashes {
        out.checked += 1;
        if let Some((_, why)) = file_errors.iter().find(|(p, _)| *p == h.path) {
            out.mismatches.push(Mismatch {
                path: h.path.clone(),
                why: format!("restic could not restore it: {why}"),
            });
            continue;
        }
        let restored = root.join(h.path.trim_start_matches('/'));
        let why = match std::fs::File::open(&restored).and_then(|mut f| hash_reader(&mut f)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing".to_string()),
            Err(e) => Some(format!("unreadable: {e}")),
            Ok((size, sha)) => {
                out.bytes += size;
                if size != h.size {
                    Some(format!("size {size}, recorded {}", h.size))
                } else if sha != h.sha256 {
                    Some(format!("sha256 {sha}, recorded {}", h.sha256))
                } else {
                    None
                }
            }
        };
        if let Some(why) = why {
            out.mismatches.push(Mismatch {
                path: h.path.clone(),
                why,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            size: 1,
            mtime: None,
        }
    }

    #[test]
    fn samples_only_files_without_repeats() {
        let mut entries = vec![entry("/d", EntryKind::Dir)];
        for i in 0..50 {
            entries.push(entry(&format!("/d/{i}"), EntryKind::File));
        }
        entries.push(entry("/d/link", EntryKind::Symlink));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let s = sample_files(&entries, 10, &mut rng);
        assert_eq!(s.len(), 10);
        assert!(s.iter().all(|e| e.kind == EntryKind::File));
        let mut paths: Vec<_> = s.iter().map(|e| &e.path).collect();
        paths.dedup();
        assert_eq!(paths.len(), 10);
        assert_eq!(sample_files(&entries, 500, &mut rng).len(), 50);
    }

    #[tokio::test]
    async fn record_hashes_skips_changed_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        std::fs::write(&a, b"hello").expect("write");
        let meta = std::fs::metadata(&a).expect("meta");
        let good = Entry {
            path: a.to_string_lossy().into_owned(),
            kind: EntryKind::File,
            size: 5,
            mtime: meta.modified().ok(),
        };
        let stale = Entry {
            size: 4,
            ..good.clone()
        };
        let hashes = record_hashes(&[good, stale]).await;
        assert_eq!(hashes.len(), 1);
        assert_eq!(
            hashes[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}

//! sftp repositories for a daemon: restic runs `ssh`, which needs a key and the server's host key
//! on disk. [`SftpAccess::prepare`] writes both into a private directory for one run and points
//! `-o sftp.command` at them with `StrictHostKeyChecking=yes` (an unknown or changed host key is
//! refused, never learned); dropping the returned guard's directory is the caller's
//! ([`SftpAccess::cleanup`]).

use std::path::{Path, PathBuf};

use crate::{Error, Repo, Result};

/// The files an sftp run uses; remove them with [`SftpAccess::cleanup`] after the run.
#[derive(Debug)]
pub struct SftpAccess {
    dir: PathBuf,
}

/// `user@host` and the port of an sftp URL: `sftp:user@host:/path` or
/// `sftp://user@host:port//path`.
pub fn sftp_destination(url: &str) -> Option<(String, Option<u16>)> {
    let rest = url.strip_prefix("sftp:")?;
    if let Some(rest) = rest.strip_prefix("//") {
        let authority = rest.split('/').next()?;
        return match authority.rsplit_once(':') {
            Some((h, p)) => Some((h.to_owned(), Some(p.parse().ok()?))),
            None => Some((authority.to_owned(), None)),
        };
    }
    let (dest, _path) = rest.split_once(':')?;
    (!dest.is_empty()).then(|| (dest.to_owned(), None))
}

async fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::write(path, bytes).await?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).await
}

impl SftpAccess {
    /// For an `sftp:` repository: writes `known_hosts` (required) and the private key (if any)
    /// into `dir` (created 0700; its path must not contain spaces, as restic splits the command
    /// on them) and adds the `sftp.command` option to `repo`. Other repositories are left as they
    /// are and `None` is returned.
    pub async fn prepare(
        repo: &mut Repo,
        key: Option<&str>,
        known_hosts: Option<&str>,
        dir: &Path,
    ) -> Result<Option<SftpAccess>> {
        if !repo.url.starts_with("sftp:") {
            return Ok(None);
        }
        let io = |what: &Path, e| Error::io(format!("writing {}", what.display()), e);
        let known = known_hosts.ok_or_else(|| {
            Error::InvalidArgument("an sftp repository without known_hosts is refused".into())
        })?;
        if dir.to_string_lossy().contains(char::is_whitespace) {
            return Err(Error::InvalidArgument(format!(
                "{} contains whitespace, which restic's sftp.command cannot carry",
                dir.display()
            )));
        }
        let (dest, port) = sftp_destination(&repo.url).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "cannot read user@host from {}",
                repo.redacted_url()
            ))
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| io(dir, e))?;
            tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .await
                .map_err(|e| io(dir, e))?;
        }
        let access = SftpAccess {
            dir: dir.to_owned(),
        };
        let kh = dir.join("known_hosts");
        write_private(&kh, known.as_bytes())
            .await
            .map_err(|e| io(&kh, e))?;
        let mut ssh = format!(
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} \
             -o ConnectTimeout=10 -o ServerAliveInterval=15",
            kh.display()
        );
        if let Some(key) = key {
            let path = dir.join("id");
            let mut key = key.to_owned();
            if !key.ends_with('\n') {
                key.push('\n');
            }
            write_private(&path, key.as_bytes())
                .await
                .map_err(|e| io(&path, e))?;
            ssh.push_str(&format!(" -o IdentitiesOnly=yes -i {}", path.display()));
        }
        if let Some(p) = port {
            ssh.push_str(&format!(" -p {p}"));
        }
        repo.options
            .push(format!("sftp.command={ssh} {dest} -s sftp"));
        Ok(Some(access))
    }

    /// Removes the key and known_hosts.
    pub async fn cleanup(self) {
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            sftp_destination("sftp:root@10.0.0.5:/srv/restic"),
            Some(("root@10.0.0.5".into(), None))
        );
        assert_eq!(
            sftp_destination("sftp://backup@host:2222//srv/restic"),
            Some(("backup@host".into(), Some(2222)))
        );
        assert_eq!(sftp_destination("sftp:/nohost"), None);
        assert_eq!(sftp_destination("s3:http://x/b"), None);
    }

    #[tokio::test]
    async fn an_sftp_repository_gets_pinned_host_keys_and_a_private_key_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let run = dir.path().join("run");
        let mut repo = Repo::new("sftp:root@10.0.0.5:/srv/r/n1", "pw");
        assert!(
            SftpAccess::prepare(&mut repo.clone(), None, None, &run)
                .await
                .is_err(),
            "no known_hosts"
        );
        let access = SftpAccess::prepare(
            &mut repo,
            Some("KEY"),
            Some("10.0.0.5 ssh-ed25519 AAAA"),
            &run,
        )
        .await
        .expect("prepare")
        .expect("sftp");
        let opt = &repo.options[0];
        assert!(
            opt.contains("StrictHostKeyChecking=yes") && opt.ends_with("root@10.0.0.5 -s sftp"),
            "{opt}"
        );
        assert_eq!(
            std::fs::read_to_string(run.join("id")).expect("key"),
            "KEY\n"
        );
        access.cleanup().await;
        assert!(!run.exists());
        let mut s3 = Repo::new("s3:http://h/b", "pw");
        assert!(SftpAccess::prepare(&mut s3, None, None, &run)
            .await
            .expect("ok")
            .is_none());
    }
}

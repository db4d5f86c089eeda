//! A restic repository: where it is and how to open it. Secrets (the password, backend credentials)
//! reach restic through its environment, never its argv, and never appear in `Debug` output.

use std::fmt;

use crate::error::{Error, Result};

/// A restic repository and the secrets that open it.
#[derive(Clone, PartialEq, Eq)]
pub struct Repo {
    /// The repository location as restic spells it: a local path, `sftp:user@host:/path`,
    /// `rest:http://host:8000/path/`, `s3:http://host:9000/bucket/path`, …
    pub url: String,
    /// The repository password (given to restic as `RESTIC_PASSWORD`).
    pub password: String,
    /// Extra environment for restic, e.g. `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` for s3.
    /// Values are treated as secrets.
    pub env: Vec<(String, String)>,
    /// Extended options, each passed as `-o <option>`, e.g. `sftp.command=ssh -i key host -s sftp`.
    pub options: Vec<String>,
}

impl Repo {
    /// A repository at `url` opened with `password`, with no extra environment or options.
    pub fn new(url: impl Into<String>, password: impl Into<String>) -> Repo {
        Repo {
            url: url.into(),
            password: password.into(),
            env: Vec::new(),
            options: Vec::new(),
        }
    }

    /// The repository of node `node_id` under the target `base`: `base` with `node_id` appended as
    /// one more path component, spelled right for each backend (local paths, `sftp:`, `rest:`,
    /// `s3:`, and the `bucket:path` backends `b2:`, `gs:`, `azure:`, `swift:`, `rclone:`). Every node
    /// has its own repository so that locks, pruning and damage never cross nodes. The password,
    /// environment and options are copied from `base`.
    ///
    /// `node_id` must be a single path component of letters, digits, `.`, `-` and `_` (and not `.`
    /// or `..`); anything else is [`Error::InvalidArgument`].
    pub fn for_node(base: &Repo, node_id: &str) -> Result<Repo> {
        Ok(Repo {
            url: node_url(&base.url, node_id)?,
            ..base.clone()
        })
    }

    /// The location with any `user:password@` in a URL replaced by `user:***@`, for messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for Repo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Repo")
            .field("url", &self.redacted_url())
            .field("password", &"<redacted>")
            .field("env", &env)
            .field("options", &self.options.len())
            .finish()
    }
}

fn check_node_id(node_id: &str) -> Result<()> {
    let ok = !node_id.is_empty()
        && node_id != "."
        && node_id != ".."
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "node id {node_id:?} is not a single path component of [A-Za-z0-9._-]"
        )))
    }
}

/// `base` + one path component `node`.
fn node_url(base: &str, node: &str) -> Result<String> {
    check_node_id(node)?;
    if base.is_empty() {
        return Err(Error::InvalidArgument("empty repository location".into()));
    }
    // Backends spelled `scheme:bucket[:path]`: without a path, the node is the path.
    for (scheme, sep) in [
        ("b2:", ":"),
        ("rclone:", ":"),
        ("gs:", ":/"),
        ("azure:", ":/"),
        ("swift:", ":/"),
    ] {
        if let Some(rest) = base.strip_prefix(scheme) {
            if !rest.contains(':') {
                return Ok(format!("{base}{sep}{node}"));
            }
            return Ok(join(base, node));
        }
    }
    if let Some(rest) = base.strip_prefix("sftp:") {
        // `sftp:host:` and `sftp:user@host:` name the login directory; `sftp://host//abs` is a URL.
        if !rest.starts_with("//") && base.ends_with(':') {
            return Ok(format!("{base}{node}"));
        }
        return Ok(join(base, node));
    }
    // rest:, s3:, local:, and plain local paths: slash-separated.
    Ok(join(base, node))
}

/// `base/node`, with `base`'s trailing slashes folded into one (a lone `/` stays the root).
fn join(base: &str, node: &str) -> String {
    let trimmed = base.trim_end_matches('/');
    // `rest:http://host:8000/` trims to `rest:http://host:8000`; `/` trims to the empty string.
    format!("{trimmed}/{node}")
}

fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find('/')
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!(
                    "{}{user}:***{}",
                    &url[..authority_start],
                    &url[authority_start + at..]
                )
            } else {
                url.to_string()
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(base: &str) -> String {
        Repo::for_node(&Repo::new(base, "pw"), "node-1")
            .expect("valid")
            .url
    }

    #[test]
    fn local_paths_get_a_component() {
        assert_eq!(node("/srv/backup"), "/srv/backup/node-1");
        assert_eq!(node("/srv/backup/"), "/srv/backup/node-1");
        assert_eq!(node("/srv/backup//"), "/srv/backup/node-1");
        assert_eq!(node("/"), "/node-1");
        assert_eq!(node("relative/dir"), "relative/dir/node-1");
        assert_eq!(node("local:/srv/b"), "local:/srv/b/node-1");
    }

    #[test]
    fn sftp_forms() {
        assert_eq!(
            node("sftp:backup@host:/srv/restic"),
            "sftp:backup@host:/srv/restic/node-1"
        );
        assert_eq!(
            node("sftp:backup@host:/srv/restic/"),
            "sftp:backup@host:/srv/restic/node-1"
        );
        assert_eq!(node("sftp:backup@host:"), "sftp:backup@host:node-1");
        assert_eq!(node("sftp:host:repos"), "sftp:host:repos/node-1");
        assert_eq!(
            node("sftp://backup@host:2222//srv/restic"),
            "sftp://backup@host:2222//srv/restic/node-1"
        );
    }

    #[test]
    fn rest_forms_with_and_without_trailing_slash() {
        assert_eq!(
            node("rest:http://host:8000/"),
            "rest:http://host:8000/node-1"
        );
        assert_eq!(
            node("rest:http://host:8000"),
            "rest:http://host:8000/node-1"
        );
        assert_eq!(
            node("rest:https://u:p@host:8000/fleet/"),
            "rest:https://u:p@host:8000/fleet/node-1"
        );
    }

    #[test]
    fn s3_and_bucket_backends() {
        assert_eq!(
            node("s3:http://minio:9000/backups"),
            "s3:http://minio:9000/backups/node-1"
        );
        assert_eq!(
            node("s3:s3.amazonaws.com/bucket/prefix/"),
            "s3:s3.amazonaws.com/bucket/prefix/node-1"
        );
        assert_eq!(node("b2:bucket"), "b2:bucket:node-1");
        assert_eq!(node("b2:bucket:fleet"), "b2:bucket:fleet/node-1");
        assert_eq!(node("gs:bucket"), "gs:bucket:/node-1");
        assert_eq!(node("azure:c:/fleet/"), "azure:c:/fleet/node-1");
    }

    #[test]
    fn node_ids_must_be_one_component() {
        let base = Repo::new("/srv", "pw");
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "../x"] {
            assert!(
                matches!(Repo::for_node(&base, bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let mut repo = Repo::new("rest:https://fleet:hunter2@host:8000/x/", "sekrit-pw");
        repo.env
            .push(("AWS_SECRET_ACCESS_KEY".into(), "aws-sekrit".into()));
        let shown = format!("{repo:?}");
        for secret in ["hunter2", "sekrit-pw", "aws-sekrit"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("fleet:***@host:8000"), "{shown}");
        assert!(shown.contains("AWS_SECRET_ACCESS_KEY"), "{shown}");
    }
}

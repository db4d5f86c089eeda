//! shoalctl's own config file, `~/.config/shoal/config.toml` (`$XDG_CONFIG_HOME/shoal/…` when
//! set): named contexts, one per fleet, and the current one. A context either holds an
//! `admin.conf`'s three fields itself or names an `admin.conf` file:
//!
//! ```toml
//! current-context = "home"
//!
//! [contexts.home]
//! admin-conf = "/var/lib/shoal/admin.conf"
//!
//! [contexts.lab]
//! api = "https://10.0.0.2:7441"
//! token = "…"
//! ca = "-----BEGIN CERTIFICATE-----…"
//! ```
//!
//! It holds bearer tokens, so it is written with mode 0600 (its directory 0700), whole and
//! atomically (a temporary file renamed over it).

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::admin_conf::{AdminConf, AdminConfError};

/// The file's name in `~/.config/shoal/`.
pub const CONTEXTS_FILE: &str = "config.toml";

/// The longest context name.
pub const MAX_CONTEXT_NAME: usize = 63;

/// Why the contexts file or a context could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextsError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a shoalctl config file.
    #[error("{path} is not a shoalctl config file: {cause}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        cause: String,
    },
    /// No context has that name.
    #[error("no context {name:?} (contexts: {})", if known.is_empty() { "none".to_owned() } else { known.join(", ") })]
    NoContext {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: Vec<String>,
    },
    /// A context is neither an `admin-conf` path nor `api`, `token` and `ca`.
    #[error("context {name:?}: {cause}")]
    Invalid {
        /// The context.
        name: String,
        /// What is wrong.
        cause: String,
    },
    /// A context name that is not 1 to 63 of `A-Z a-z 0-9 . _ -`.
    #[error("{0:?} is not a context name (1 to 63 of A-Z, a-z, 0-9, '.', '_', '-')")]
    BadName(String),
    /// The `admin.conf` a context names could not be read.
    #[error(transparent)]
    AdminConf(#[from] AdminConfError),
}

/// One fleet's credentials: a path to its `admin.conf`, or that file's fields.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContextEntry {
    /// An `admin.conf` read each time (follows the file when the controller rewrites it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_conf: Option<PathBuf>,
    /// The admin API's URL (with `token` and `ca`: a copy of an `admin.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The fleet CA (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl std::fmt::Debug for ContextEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextEntry")
            .field("admin_conf", &self.admin_conf)
            .field("api", &self.api)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ContextEntry {
    /// A context holding a copy of `conf`.
    pub fn inline(conf: AdminConf) -> ContextEntry {
        ContextEntry {
            admin_conf: None,
            api: Some(conf.api),
            token: Some(conf.token),
            ca: Some(conf.ca),
        }
    }

    /// A context that reads the `admin.conf` at `path`.
    pub fn linked(path: PathBuf) -> ContextEntry {
        ContextEntry {
            admin_conf: Some(path),
            ..ContextEntry::default()
        }
    }

    /// The credentials: read from the named file, or the fields held here.
    pub fn resolve(&self, name: &str) -> Result<AdminConf, ContextsError> {
        let invalid = |cause: &str| ContextsError::Invalid {
            name: name.to_owned(),
            cause: cause.to_owned(),
        };
        match (&self.admin_conf, &self.api, &self.token, &self.ca) {
            (Some(path), None, None, None) => Ok(AdminConf::read(path)?),
            (Some(_), ..) => Err(invalid("admin-conf excludes api, token and ca")),
            (None, Some(api), Some(token), Some(ca)) => Ok(AdminConf {
                api: api.clone(),
                token: token.clone(),
                ca: ca.clone(),
            }),
            (None, ..) => Err(invalid("needs admin-conf, or all of api, token and ca")),
        }
    }

    /// Where the credentials come from, for listings: the file, or `inline`.
    pub fn source(&self) -> String {
        match &self.admin_conf {
            Some(p) => p.display().to_string(),
            None => "inline".to_owned(),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContextsFile {
    /// The context used without `--context`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Every context by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, ContextEntry>,
}

/// Checks a context name: 1 to 63 of `A-Z a-z 0-9 . _ -`.
pub fn check_context_name(name: &str) -> Result<(), ContextsError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CONTEXT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ContextsError::BadName(name.to_owned()))
    }
}

/// The file's default place: `$XDG_CONFIG_HOME/shoal/config.toml`, else
/// `$HOME/.config/shoal/config.toml`; `None` without either variable.
pub fn default_path() -> Option<PathBuf> {
    let non_empty = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    non_empty("XDG_CONFIG_HOME")
        .or_else(|| non_empty("HOME").map(|h| h.join(".config")))
        .map(|d| d.join("shoal").join(CONTEXTS_FILE))
}

impl ContextsFile {
    /// Reads the file; an absent file is an empty one.
    pub fn load(path: &Path) -> Result<ContextsFile, ContextsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ContextsError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let file: ContextsFile = toml::from_str(&text).map_err(|e| ContextsError::Parse {
            path: path.display().to_string(),
            cause: e.to_string(),
        })?;
        for name in file.contexts.keys() {
            check_context_name(name)?;
        }
        Ok(file)
    }

    /// Writes the file whole: directory 0700 if it is made, file 0600, renamed into place.
    pub fn save(&self, path: &Path) -> Result<(), ContextsError> {
        let io = |source| ContextsError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = toml::to_string(self).map_err(|e| ContextsError::Parse {
            path: path.display().to_string(),
            cause: e.to_string(),
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let tmp = path.with_extension(format!("toml.tmp-{}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(
                b"# shoalctl contexts: one per fleet. Holds admin tokens: keep private.\n",
            )?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    /// The context called `name`.
    pub fn get(&self, name: &str) -> Result<&ContextEntry, ContextsError> {
        self.contexts
            .get(name)
            .ok_or_else(|| ContextsError::NoContext {
                name: name.to_owned(),
                known: self.contexts.keys().cloned().collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn conf(api: &str) -> AdminConf {
        AdminConf {
            api: api.into(),
            token: "secret-token".into(),
            ca: "pem".into(),
        }
    }

    #[test]
    fn contexts_round_trip_privately_and_resolve_both_forms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shoal").join(CONTEXTS_FILE);
        assert_eq!(
            ContextsFile::load(&path).expect("absent"),
            ContextsFile::default()
        );

        let linked = dir.path().join("admin.conf");
        std::fs::write(&linked, "api = \"https://b\"\ntoken = \"t\"\nca = \"c\"\n").expect("write");
        let mut file = ContextsFile::default();
        file.contexts
            .insert("a".into(), ContextEntry::inline(conf("https://a")));
        file.contexts
            .insert("b".into(), ContextEntry::linked(linked.clone()));
        file.current_context = Some("a".into());
        file.save(&path).expect("saved");

        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        let back = ContextsFile::load(&path).expect("loads");
        assert_eq!(back, file);
        assert_eq!(
            back.get("a").expect("a").resolve("a").expect("a"),
            conf("https://a")
        );
        assert_eq!(
            back.get("b").expect("b").resolve("b").expect("b").api,
            "https://b"
        );
        assert!(
            !format!("{back:?}").contains("secret-token"),
            "Debug redacts"
        );
        assert!(matches!(
            back.get("c"),
            Err(ContextsError::NoContext { .. })
        ));
    }

    #[test]
    fn bad_files_names_and_half_contexts_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONTEXTS_FILE);
        std::fs::write(&path, "current-context = 3").expect("write");
        assert!(matches!(
            ContextsFile::load(&path),
            Err(ContextsError::Parse { .. })
        ));
        std::fs::write(&path, "[contexts.\"a b\"]\napi = \"x\"").expect("write");
        assert!(matches!(
            ContextsFile::load(&path),
            Err(ContextsError::BadName(_))
        ));
        for bad in ["", "a/b", "a b", &"x".repeat(64)] {
            assert!(check_context_name(bad).is_err(), "{bad:?}");
        }
        check_context_name("home-lab_2.eu").expect("fine");
        let half = ContextEntry {
            api: Some("https://a".into()),
            ..ContextEntry::default()
        };
        assert!(matches!(
            half.resolve("h"),
            Err(ContextsError::Invalid { .. })
        ));
        let both = ContextEntry {
            api: Some("https://a".into()),
            ..ContextEntry::linked("/x".into())
        };
        assert!(matches!(
            both.resolve("h"),
            Err(ContextsError::Invalid { .. })
        ));
    }
}

//! The errors of every restic operation, classified from restic's exit code and stderr.

use std::path::PathBuf;

/// What went wrong running restic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The restic binary could not be started (not on `$PATH`, or not at the configured path).
    #[error(
        "restic is not installed ({binary:?} could not be started: {source}); \
         install the Debian package `restic` (apt-get install restic)"
    )]
    NotInstalled {
        /// The program that was started.
        binary: PathBuf,
        /// Why it could not be started.
        source: std::io::Error,
    },
    /// There is no repository at the location (its `config` file does not exist); `init` creates
    /// one.
    #[error("no restic repository at {url}: {detail}")]
    RepositoryMissing {
        /// The repository's location, with any credentials redacted.
        url: String,
        /// restic's words.
        detail: String,
    },
    /// The repository exists but the password opens none of its keys.
    #[error("wrong password for the restic repository at {url}")]
    WrongPassword {
        /// The repository's location, with any credentials redacted.
        url: String,
    },
    /// Another run holds a lock that excludes this one (an exclusive lock, or any lock for an
    /// operation that needs an exclusive one). A stale lock of a dead run is removed with
    /// [`Restic::unlock_stale`](crate::Restic::unlock_stale).
    #[error("the restic repository at {url} is locked: {detail}")]
    Locked {
        /// The repository's location, with any credentials redacted.
        url: String,
        /// restic's description of the lock (PID, host, user, age).
        detail: String,
    },
    /// The repository's backend could not be reached (connection refused, DNS, ssh failure, …).
    #[error("the restic repository at {url} is unreachable: {detail}")]
    Unreachable {
        /// The repository's location, with any credentials redacted.
        url: String,
        /// restic's words.
        detail: String,
    },
    /// restic exited unsuccessfully for another reason.
    #[error("`restic {command}` failed (exit code {code:?}): {stderr_tail}")]
    Failed {
        /// The subcommand and its arguments (never a secret: those travel in the environment).
        command: String,
        /// The exit code; `None` when restic was killed by a signal.
        code: Option<i32>,
        /// The last few KiB of restic's stderr.
        stderr_tail: String,
    },
    /// restic did not finish within the configured timeout and was killed.
    #[error("`restic {command}` timed out after {after:?} and was killed")]
    Timeout {
        /// The subcommand and its arguments.
        command: String,
        /// The timeout that expired.
        after: std::time::Duration,
    },
    /// restic's output could not be understood (an unexpected shape, or a line over the limit).
    #[error("could not parse the output of `restic {command}`: {detail}")]
    Parse {
        /// The subcommand.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// An argument was refused before restic was started (an empty retention policy, a node id
    /// that is not a single path component, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A local I/O error (reading restic's pipes, hashing files, the scratch directory).
    #[error("I/O error: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The result of restic operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

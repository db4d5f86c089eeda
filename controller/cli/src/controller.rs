//! `shoalctl controller backup`: the controller's state in one encrypted file.

use std::{
    io::{BufRead, IsTerminal, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};

use crate::output::Out;
use clap::Subcommand;
use shoal_api::{
    dr::{check_passphrase, BackupRequest, BACKUP_PATH, MAX_ARCHIVE_BYTES},
    AdminClient,
};

/// How long taking, encrypting and downloading a backup may take.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Subcommand)]
pub enum ControllerCmd {
    /// Writes an encrypted backup of the controller (store, CA, admin credential) to a file,
    /// while it keeps serving. Restore it with `shoal-controller restore`. Without
    /// --passphrase-file the passphrase is asked for twice on a terminal, or read as the first
    /// line of standard input when that is not a terminal.
    Backup {
        /// Where to write the archive (mode 0600; written beside and renamed into place).
        #[arg(long)]
        out: PathBuf,
        /// A file whose first line is the passphrase (at least 12 characters).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

pub fn controller(client: &AdminClient, cmd: ControllerCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        ControllerCmd::Backup {
            out: path,
            passphrase_file,
        } => {
            let passphrase = match passphrase_file {
                Some(f) => passphrase_from_file(&f)?,
                None => passphrase_interactive()?,
            };
            check_passphrase(&passphrase).map_err(anyhow::Error::msg)?;
            let bytes = client.post_for_bytes(
                BACKUP_PATH,
                &BackupRequest { passphrase },
                MAX_ARCHIVE_BYTES,
                BACKUP_TIMEOUT,
            )?;
            write_private(&path, &bytes)?;
            let written = serde_json::json!({ "path": path, "bytes": bytes.len() });
            out.show(&written, || {
                say!("wrote {} ({} bytes)", path.display(), bytes.len())
            })?;
        }
    }
    Ok(())
}

/// The first line of `path`, without its line ending.
pub fn passphrase_from_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the passphrase file {}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

fn passphrase_interactive() -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the passphrase from standard input")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    let first = rpassword::prompt_password("backup passphrase: ")?;
    check_passphrase(&first).map_err(anyhow::Error::msg)?;
    let again = rpassword::prompt_password("again: ")?;
    if first != again {
        bail!("the passphrases differ");
    }
    Ok(first)
}

/// Writes `bytes` to `path` with mode 0600: a temporary file beside it, fsync, rename, so a failed
/// backup never leaves a truncated file under the name.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

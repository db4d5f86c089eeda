//! `shoal-controller restore`: a backup archive into a new data dir.

use std::{
    io::{BufRead, IsTerminal},
    path::PathBuf,
};

use anyhow::Context;
use shoal_controller::dr;

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The archive `shoalctl controller backup` wrote.
    #[arg(long)]
    from: PathBuf,
    /// The new data directory: must not exist yet, or be empty. Start the controller on it with
    /// `shoal-controller serve --data-dir DIR` and the flags it ran with before.
    #[arg(long)]
    data_dir: PathBuf,
    /// A file whose first line is the passphrase. Without it the passphrase is asked for on a
    /// terminal, or read as the first line of standard input when that is not a terminal.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&args.from)
        .with_context(|| format!("cannot read {}", args.from.display()))?;
    if meta.len() > shoal_api::dr::MAX_ARCHIVE_BYTES {
        anyhow::bail!(
            "{} is {} bytes, larger than any backup ({} bytes at most)",
            args.from.display(),
            meta.len(),
            shoal_api::dr::MAX_ARCHIVE_BYTES
        );
    }
    let bytes = std::fs::read(&args.from)
        .with_context(|| format!("cannot read {}", args.from.display()))?;
    let passphrase = match &args.passphrase_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the passphrase file {}", f.display()))?;
            text.lines().next().unwrap_or_default().to_owned()
        }
        None if std::io::stdin().is_terminal() => {
            rpassword::prompt_password("backup passphrase: ")?
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the passphrase from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    let report = dr::restore(&bytes, &passphrase, &args.data_dir).with_context(|| {
        format!(
            "restoring {} into {}",
            args.from.display(),
            args.data_dir.display()
        )
    })?;
    let m = &report.manifest;
    println!(
        "restored {} into {}: {} nodes, {} tables, {} entries (backup of controller {} taken at {})",
        args.from.display(),
        report.data_dir.display(),
        report.nodes,
        m.tables,
        m.entries,
        m.controller_version,
        shoal_controller_core::time::rfc3339(m.created_at)
    );
    if !m.left_out.is_empty() {
        println!(
            "not in the backup; upload these again (shoalctl release add, shoalctl image add):"
        );
        for item in &m.left_out {
            println!("  {item}");
        }
    }
    println!(
        "start it with: shoal-controller serve --data-dir {} (and the flags it ran with before)",
        report.data_dir.display()
    );
    Ok(())
}

//! What is generated from the clap definitions: shell completion scripts (`shoalctl completion
//! bash|zsh|fish`) and man pages (`shoalctl generate-man DIR`, hidden: for packagers).

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::Cli;

/// Prints the completion script for `shell` on stdout.
pub fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "shoalctl", &mut std::io::stdout());
    Ok(())
}

/// Writes `shoalctl.1` and a page per subcommand (`shoalctl-nodes-list.1`, …) into `dir`.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    let pages = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
        .count();
    eprintln!("wrote {pages} man pages into {}", dir.display());
    Ok(())
}

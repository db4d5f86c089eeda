//! Finding the shoal binaries under test.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Environment variable naming the directory that holds the binaries; overrides the search.
pub const BIN_DIR_ENV: &str = "SHOAL_BIN_DIR";

/// Paths of the binaries a fleet runs.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The directory they are in.
    pub dir: PathBuf,
    /// `shoal-controller`.
    pub controller: PathBuf,
    /// `shoal-agent`.
    pub agent: PathBuf,
    /// `shoalctl`.
    pub ctl: PathBuf,
}

const NAMES: [&str; 3] = ["shoal-controller", "shoal-agent", "shoalctl"];

impl Bins {
    /// Locates the binaries: in `$SHOAL_BIN_DIR` if set; otherwise next to the running executable,
    /// or one level up when it runs from `target/<profile>/deps/` (as test executables do).
    pub fn locate() -> Result<Self> {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            let dir = PathBuf::from(dir);
            return match Self::in_dir(&dir) {
                Some(b) => Ok(b),
                None => bail!(
                    "{BIN_DIR_ENV}={} does not hold all of {NAMES:?}; run `cargo build --workspace --bins` first",
                    dir.display()
                ),
            };
        }
        let exe = std::env::current_exe()?;
        let mut candidates = Vec::new();
        if let Some(dir) = exe.parent() {
            candidates.push(dir.to_path_buf());
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(up) = dir.parent() {
                    candidates.push(up.to_path_buf());
                }
            }
        }
        for dir in &candidates {
            if let Some(b) = Self::in_dir(dir) {
                return Ok(b);
            }
        }
        bail!(
            "the shoal binaries {NAMES:?} are not in {}; run `cargo build --workspace --bins` first \
             (with the same profile as the tests), or point {BIN_DIR_ENV} at them",
            candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ")
        )
    }

    fn in_dir(dir: &Path) -> Option<Self> {
        let [controller, agent, ctl] = NAMES.map(|n| dir.join(n));
        if [&controller, &agent, &ctl].iter().all(|p| p.is_file()) {
            Some(Bins {
                dir: dir.to_path_buf(),
                controller,
                agent,
                ctl,
            })
        } else {
            None
        }
    }
}

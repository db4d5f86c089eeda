//! What the command lines of shoal's daemons (`shoal-agent`, `shoal-controller serve`) share:
//!
//! - [`expand_config_file`]: a TOML file whose keys are the command's long flags, turned into
//!   flags in front of the command line's own, so every flag, including ones added later, can be
//!   set from the file, and a flag given on the command line (or its environment variable) wins.
//! - [`LogFormat`] and [`init_logging`]: `--log-format text|json` on stderr (journald under
//!   systemd).
//! - [`dns_name`]: the one check of a host name given on a command line.

mod config_file;
mod logging;
mod names;
#[doc(hidden)]
pub mod testing;

pub use config_file::{expand_config_file, expand_config_file_with_env, ConfigError, NO_CONFIG};
pub use logging::{init_logging, LogFormat};
pub use names::dns_name;

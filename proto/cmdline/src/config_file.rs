//! Config files as flags. A daemon's TOML file holds `key = value` lines whose keys are the
//! command's long flags (`snake_case` or `kebab-case`): a string or number is the flag's value,
//! an array repeats a repeatable flag, a boolean turns a switch on (or leaves it off). The file is
//! turned into `--flag=value` arguments placed before the command line's own, and clap parses the
//! result as usual, so every flag's own checks apply and a flag added later needs nothing here.
//!
//! Precedence: a flag on the command line replaces the file's value for it (for repeatable flags
//! too: the file's list is dropped, not merged); so does a flag's environment variable when it is
//! set. The file comes from `--config FILE`, else the default path when that file exists;
//! `--config ''` reads none.

use std::{
    collections::HashSet,
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction, Command};

/// The `--config` value that reads no file, not even the default one.
pub const NO_CONFIG: &str = "";

/// The id and long name of the flag that names the file.
const CONFIG: &str = "config";

/// Why a config file could not be turned into flags. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {cause}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        cause: String,
    },
    /// A key names no flag of the command.
    #[error("config file {path}: unknown key `{key}` (`{command}` has no --{flag} flag)")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
        /// The flag it would be.
        flag: String,
        /// The command the flags are looked up in.
        command: String,
    },
    /// A key's value does not fit its flag (a list for a flag given once, a table, a string for
    /// a switch).
    #[error("config file {path}: key `{key}`: {problem}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// `--config` was the last argument.
    #[error("--config needs a file (or '' for none)")]
    MissingFile,
}

/// Expands the config file of `args` (the whole command line, program name first) for `cmd` into
/// flags; see the module docs. `default` is read when `--config` is absent and it exists. Commands
/// without a `--config` flag (another subcommand) get `args` back unchanged.
pub fn expand_config_file(
    cmd: &Command,
    args: Vec<OsString>,
    default: &Path,
) -> Result<Vec<OsString>, ConfigError> {
    expand_config_file_with_env(cmd, args, default, |name| std::env::var_os(name))
}

/// [`expand_config_file`] with the environment passed in (`env(name)`), for tests.
pub fn expand_config_file_with_env(
    cmd: &Command,
    mut args: Vec<OsString>,
    default: &Path,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<OsString>, ConfigError> {
    let mut cmd = cmd.clone();
    // Propagates global flags into subcommands, so they can be set from a subcommand's file.
    cmd.build();
    let Some((leaf, start)) = locate(&cmd, &args, 1) else {
        return Ok(args);
    };
    // The whole line: a global flag given before the subcommand's name counts too.
    let given = given_flags(leaf, &args[1.min(args.len())..])?;
    if given.help_or_version {
        // `--version` and `--help` answer without a file (a broken one must not stop them).
        return Ok(args);
    }
    let path = match given.config {
        Some(v) if v == NO_CONFIG => return Ok(args),
        Some(v) => PathBuf::from(v),
        None if default.exists() => default.to_owned(),
        None => return Ok(args),
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.clone(),
            cause: e.to_string().trim_end().to_owned(),
        })?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let unknown = || ConfigError::UnknownKey {
            path: path.clone(),
            key: key.clone(),
            flag: flag.clone(),
            command: leaf.get_name().to_owned(),
        };
        let arg = find_flag(leaf, &flag).ok_or_else(unknown)?;
        if arg.get_id() == CONFIG {
            return Err(ConfigError::BadValue {
                path,
                key,
                problem: "a config file cannot name another one".into(),
            });
        }
        if given.ids.contains(arg.get_id().as_str()) {
            continue;
        }
        let env_set = arg
            .get_env()
            .and_then(|name| env(&name.to_string_lossy()))
            .is_some_and(|v| !v.is_empty());
        if env_set {
            continue;
        }
        flags.extend(
            to_flags(arg, value).map_err(|problem| ConfigError::BadValue {
                path: path.clone(),
                key: key.clone(),
                problem,
            })?,
        );
    }
    args.splice(start..start, flags);
    Ok(args)
}

/// The (sub)command that has the `--config` flag and the index where its arguments start:
/// options before a subcommand's name are skipped.
fn locate<'a>(cmd: &'a Command, args: &[OsString], from: usize) -> Option<(&'a Command, usize)> {
    if cmd.get_arguments().any(|a| a.get_id() == CONFIG) {
        return Some((cmd, from));
    }
    let mut i = from;
    while i < args.len() {
        let token = args[i].to_str()?;
        if token == "--" {
            return None;
        }
        if let Some(name) = token.strip_prefix("--") {
            let takes = find_flag(cmd, name).is_some_and(takes_value);
            i += if takes && !name.contains('=') { 2 } else { 1 };
            continue;
        }
        if token.starts_with('-') {
            i += 1;
            continue;
        }
        let sub = cmd.find_subcommand(token)?;
        return locate(sub, args, i + 1);
    }
    None
}

/// What the command line itself gives: the ids of its flags, and the `--config` value.
struct Given {
    ids: HashSet<String>,
    config: Option<OsString>,
    help_or_version: bool,
}

fn given_flags(cmd: &Command, tokens: &[OsString]) -> Result<Given, ConfigError> {
    let mut given = Given {
        ids: HashSet::new(),
        config: None,
        help_or_version: false,
    };
    let mut i = 0;
    while i < tokens.len() {
        let token = tokens[i].as_os_str();
        i += 1;
        let Some(text) = token.to_str() else { continue };
        if text == "--" {
            break;
        }
        if ["--help", "-h", "--version", "-V"].contains(&text) {
            given.help_or_version = true;
        }
        let (arg, inline) = if let Some(rest) = text.strip_prefix("--") {
            let (name, value) = match rest.split_once('=') {
                Some((n, v)) => (n, Some(OsString::from(v))),
                None => (rest, None),
            };
            (find_flag(cmd, name), value)
        } else if let Some(rest) = text.strip_prefix('-').filter(|r| !r.is_empty()) {
            let mut chars = rest.chars();
            let short = chars.next();
            let tail = chars.as_str();
            let arg = cmd
                .get_arguments()
                .find(|a| short.is_some() && a.get_short() == short);
            let value = (!tail.is_empty()).then(|| OsString::from(tail.trim_start_matches('=')));
            (arg, value)
        } else {
            continue;
        };
        let Some(arg) = arg else { continue };
        let value = match inline {
            Some(v) => Some(v),
            None if takes_value(arg) => {
                let v = tokens.get(i).cloned();
                i += 1;
                v
            }
            None => None,
        };
        if arg.get_id() == CONFIG {
            given.config = Some(value.ok_or(ConfigError::MissingFile)?);
        }
        given.ids.insert(arg.get_id().as_str().to_owned());
    }
    Ok(given)
}

/// The flag named `--name` (or one of its aliases) of `cmd`.
fn find_flag<'a>(cmd: &'a Command, name: &str) -> Option<&'a Arg> {
    let name = name.split_once('=').map_or(name, |(n, _)| n);
    cmd.get_arguments().find(|a| {
        !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
            && (a.get_long() == Some(name)
                || a.get_all_aliases().is_some_and(|al| al.contains(&name)))
    })
}

fn takes_value(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

/// The arguments one key stands for.
fn to_flags(arg: &Arg, value: toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().unwrap_or_else(|| arg.get_id().as_str());
    let flag = || OsString::from(format!("--{long}"));
    let with = |v: String| OsString::from(format!("--{long}={v}"));
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => match value {
            // A switch set to its "off" value is simply not given.
            toml::Value::Boolean(on) => {
                let sets = matches!(arg.get_action(), ArgAction::SetTrue);
                Ok(if on == sets { vec![flag()] } else { vec![] })
            }
            other => Err(format!(
                "--{long} is a switch: expected true or false, found {}",
                other.type_str()
            )),
        },
        ArgAction::Count => match value {
            toml::Value::Integer(n) if (0..=255).contains(&n) => Ok(vec![flag(); n as usize]),
            other => Err(format!(
                "--{long} counts: expected a number from 0 to 255, found {other}"
            )),
        },
        ArgAction::Append => match value {
            toml::Value::Array(items) => items
                .into_iter()
                .map(|v| scalar(long, v).map(with))
                .collect(),
            v => Ok(vec![with(scalar(long, v)?)]),
        },
        ArgAction::Set => match value {
            toml::Value::Array(_) => Err(format!(
                "--{long} takes one value, not a list (it is not repeatable)"
            )),
            v => Ok(vec![with(scalar(long, v)?)]),
        },
        other => Err(format!("--{long} cannot be set from a file ({other:?})")),
    }
}

/// One value as the command line would spell it.
fn scalar(long: &str, value: toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        other => Err(format!(
            "--{long}: expected a string, number or boolean, found {}",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::{Arg, ArgAction, Command};

    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn daemon() -> Command {
        Command::new("d")
            .arg(
                Arg::new("config")
                    .long("config")
                    .action(ArgAction::Set)
                    .global(false),
            )
            .arg(
                Arg::new("controller")
                    .long("controller")
                    .env("TEST_CONTROLLER")
                    .value_delimiter(',')
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("state_dir")
                    .long("state-dir")
                    .action(ArgAction::Set),
            )
            .arg(
                Arg::new("no_overlay")
                    .long("no-overlay")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("health_check")
                    .long("health-check")
                    .alias("update-check")
                    .action(ArgAction::Set),
            )
            .arg(
                Arg::new("allow_exec")
                    .long("allow-exec")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("offset")
                    .long("offset")
                    .allow_negative_numbers(true)
                    .action(ArgAction::Set),
            )
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("d.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    fn expand(args: &[&str], default: &Path) -> Result<Vec<String>, ConfigError> {
        expand_config_file_with_env(&daemon(), os(args), default, |_| None).map(|v| {
            v.into_iter()
                .map(|a| a.into_string().expect("utf-8"))
                .collect()
        })
    }

    #[test]
    fn keys_become_flags_in_both_spellings_with_lists_switches_and_numbers() {
        let (_d, path) = file(
            "controller = [\"a:1\", \"b:2\"]\nstate_dir = \"/s\"\nno-overlay = true\n\
             allow_exec = \"/bin/true\"\noffset = -3\nupdate-check = \"/c\"\n",
        );
        let p = path.to_str().expect("utf-8");
        let out = expand(&["d", "--config", p], Path::new("/nonexistent")).expect("expanded");
        // Placed before the command line's own arguments, in the file's key order (sorted).
        assert_eq!(
            out,
            [
                "d",
                "--allow-exec=/bin/true",
                "--controller=a:1",
                "--controller=b:2",
                "--no-overlay",
                "--offset=-3",
                "--state-dir=/s",
                "--health-check=/c",
                "--config",
                p
            ]
        );
        let m = daemon()
            .try_get_matches_from(&out)
            .expect("clap takes what the file became");
        let controllers: Vec<&String> = m.get_many("controller").expect("set").collect();
        assert_eq!(controllers, ["a:1", "b:2"]);
        assert_eq!(
            m.get_one::<String>("offset").map(String::as_str),
            Some("-3")
        );
        assert!(m.get_flag("no_overlay"));
    }

    #[test]
    fn command_line_flags_and_environment_win_over_the_file_also_for_repeatable_ones() {
        let (_d, path) =
            file("controller = [\"a:1\", \"b:2\"]\nstate-dir = \"/s\"\nno_overlay = false\n");
        let p = path.to_str().expect("utf-8");
        let out = expand(
            &[
                "d",
                "--controller",
                "c:3",
                "--config=".to_owned().as_str(),
                "--state-dir=/t",
            ],
            Path::new("/nonexistent"),
        )
        .expect("no file");
        assert_eq!(
            out,
            ["d", "--controller", "c:3", "--config=", "--state-dir=/t"]
        );
        let out = expand(
            &["d", "--controller", "c:3", "--config", p, "--state-dir=/t"],
            Path::new("/nonexistent"),
        )
        .expect("expanded");
        // Nothing of the file is left: both flags were given, and a false switch is not given.
        assert_eq!(
            out,
            ["d", "--controller", "c:3", "--config", p, "--state-dir=/t"]
        );
        // An environment variable counts as given.
        let env = |name: &str| (name == "TEST_CONTROLLER").then(|| OsString::from("e:4"));
        let out =
            expand_config_file_with_env(&daemon(), os(&["d", "--config", p]), Path::new("/x"), env)
                .expect("expanded");
        assert_eq!(out, os(&["d", "--state-dir=/s", "--config", p]));
    }

    #[test]
    fn the_default_file_is_read_only_when_present_and_config_empty_turns_it_off() {
        let (_d, path) = file("state-dir = \"/s\"\n");
        assert_eq!(
            expand(&["d"], &path).expect("default"),
            ["d", "--state-dir=/s"]
        );
        assert_eq!(
            expand(&["d", "--config", ""], &path).expect("off"),
            ["d", "--config", ""]
        );
        assert_eq!(
            expand(&["d"], Path::new("/nonexistent/d.toml")).expect("absent"),
            ["d"]
        );
        let err = expand(&["d", "--config", "/nonexistent/x.toml"], &path)
            .expect_err("a named file must exist");
        assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
        assert!(matches!(
            expand(&["d", "--config"], &path),
            Err(ConfigError::MissingFile)
        ));
        // --version and --help need no file, and a broken one does not stop them.
        let (_b, broken) = file("nonsense = [\n");
        assert_eq!(
            expand(&["d", "--version"], &broken).expect("version"),
            ["d", "--version"]
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_the_key() {
        let cases = [
            (
                "stat_dir = \"/s\"\n",
                "unknown key `stat_dir` (`d` has no --stat-dir flag)",
            ),
            ("help = true\n", "unknown key `help`"),
            (
                "state-dir = [\"/a\", \"/b\"]\n",
                "key `state-dir`: --state-dir takes one value",
            ),
            (
                "no-overlay = \"yes\"\n",
                "key `no-overlay`: --no-overlay is a switch",
            ),
            (
                "[controller]\nx = 1\n",
                "key `controller`: --controller: expected a string",
            ),
            (
                "config = \"/other.toml\"\n",
                "key `config`: a config file cannot name another",
            ),
            ("state-dir = \n", "is not valid TOML"),
        ];
        for (text, want) in cases {
            let (_d, path) = file(text);
            let p = path.to_str().expect("utf-8");
            let err = expand(&["d", "--config", p], Path::new("/x"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains(p), "names the file: {err}");
        }
    }

    #[test]
    fn a_subcommand_gets_its_file_and_the_parent_s_global_flags() {
        let cmd = Command::new("ctl")
            .arg(Arg::new("log_format").long("log-format").global(true))
            .subcommand(Command::new("other"))
            .subcommand(
                Command::new("serve")
                    .arg(Arg::new("config").long("config"))
                    .arg(Arg::new("listen").long("listen")),
            );
        let (_d, path) = file("listen = \"0.0.0.0:1\"\nlog_format = \"json\"\n");
        let p = path.to_str().expect("utf-8");
        let out = expand_config_file_with_env(
            &cmd,
            os(&["ctl", "--log-format", "text", "serve", "--config", p]),
            Path::new("/x"),
            |_| None,
        )
        .expect("expanded");
        // A global flag given before the subcommand's name wins over the file too.
        assert_eq!(
            out,
            os(&[
                "ctl",
                "--log-format",
                "text",
                "serve",
                "--listen=0.0.0.0:1",
                "--config",
                p
            ])
        );
        let out = expand_config_file_with_env(
            &cmd,
            os(&["ctl", "serve", "--config", p]),
            Path::new("/x"),
            |_| None,
        )
        .expect("expanded");
        assert_eq!(
            out,
            os(&[
                "ctl",
                "serve",
                "--listen=0.0.0.0:1",
                "--log-format=json",
                "--config",
                p
            ])
        );
        let other = os(&["ctl", "other"]);
        assert_eq!(
            expand_config_file_with_env(&cmd, other.clone(), &path, |_| None).expect("other"),
            other
        );
    }
}

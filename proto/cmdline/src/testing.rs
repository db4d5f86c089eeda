//! For the daemons' tests: every flag of a command can be set from its config file.

use std::ffi::{OsStr, OsString};

use clap::{parser::ValueSource, ArgAction, Command};

/// Values tried, in order, until the flag's value parser takes one (a flag with possible values
/// or a default uses those first).
const SAMPLES: &[&str] = &[
    "1",
    "10s",
    "127.0.0.1:7440",
    "10.0.0.0/24",
    "10.0.0.10-10.0.0.20",
    "127.0.0.1",
    "shoal.example.org",
    "/tmp",
    "x",
];

/// Checks that each flag of `cmd` (or of its subcommand `sub`) — but `--config`, `--help` and
/// `--version` — set alone in a config file (keys spelt in `snake_case` and `kebab-case` in turn)
/// reaches clap as if given on the command line, with the file's value. Flags that must be given
/// (required ones) are added to each file. Returns every failure, one line each.
pub fn check_every_flag_from_file(cmd: &Command, sub: Option<&str>) -> Result<usize, String> {
    let mut root = cmd.clone();
    root.build();
    let leaf = match sub {
        Some(name) => root
            .find_subcommand(name)
            .ok_or_else(|| format!("no subcommand {name}"))?
            .clone(),
        None => root.clone(),
    };
    let dir = std::env::temp_dir().join(format!("shoal-cmdline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut failures = Vec::new();
    let mut checked = 0;
    let flags: Vec<&clap::Arg> = leaf
        .get_arguments()
        .filter(|a| {
            a.get_long().is_some()
                && a.get_id() != "config"
                && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
        })
        .collect();
    let required: Vec<(&clap::Arg, String)> = flags
        .iter()
        .filter(|a| a.is_required_set())
        .filter_map(|a| sample(&leaf, a).map(|v| (*a, v)))
        .collect();
    for (i, arg) in flags.iter().enumerate() {
        let long = arg.get_long().unwrap_or_default();
        let Some(value) = sample(&leaf, arg) else {
            failures.push(format!("--{long}: no sample value its parser takes"));
            continue;
        };
        let key = if i % 2 == 0 {
            long.replace('-', "_")
        } else {
            long.to_owned()
        };
        let mut text = line(arg, &key, &value);
        for (r, v) in &required {
            if r.get_id() != arg.get_id() {
                text.push_str(&line(r, r.get_long().unwrap_or_default(), v));
            }
        }
        let path = dir.join(format!("{long}.toml"));
        if let Err(e) = std::fs::write(&path, &text) {
            failures.push(format!("--{long}: {e}"));
            continue;
        }
        let mut args: Vec<OsString> = vec![root.get_name().into()];
        args.extend(sub.map(OsString::from));
        args.extend(["--config".into(), path.clone().into_os_string()]);
        let expanded = match crate::expand_config_file_with_env(
            &root,
            args,
            std::path::Path::new("/nonexistent"),
            |_| None,
        ) {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("--{long}: {e}"));
                continue;
            }
        };
        let parsed = root
            .clone()
            .ignore_errors(true)
            .try_get_matches_from(&expanded);
        let matches = match &parsed {
            Ok(m) => match sub {
                Some(name) => m.subcommand_matches(name),
                None => Some(m),
            },
            Err(e) => {
                failures.push(format!("--{long}: clap refused {expanded:?}: {e}"));
                continue;
            }
        };
        let id = arg.get_id().as_str();
        let Some(m) = matches else {
            failures.push(format!("--{long}: no matches for the subcommand"));
            continue;
        };
        if m.value_source(id) != Some(ValueSource::CommandLine) {
            failures.push(format!("--{long}: not set from {text:?} ({expanded:?})"));
            continue;
        }
        if arg.get_action().takes_values() {
            let raw: Vec<&OsStr> = m.get_raw(id).into_iter().flatten().collect();
            if raw != [OsStr::new(&value)] {
                failures.push(format!("--{long}: got {raw:?}, not {value:?}"));
                continue;
            }
        }
        checked += 1;
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failures.is_empty() {
        Ok(checked)
    } else {
        Err(failures.join("\n"))
    }
}

fn line(arg: &clap::Arg, key: &str, value: &str) -> String {
    let quoted = format!("{value:?}");
    match arg.get_action() {
        ArgAction::SetTrue => format!("{key} = true\n"),
        ArgAction::SetFalse => format!("{key} = false\n"),
        ArgAction::Append => format!("{key} = [{quoted}]\n"),
        _ => format!("{key} = {quoted}\n"),
    }
}

/// A value the flag's parser takes: its first possible value, its default, or the first sample.
fn sample(cmd: &Command, arg: &clap::Arg) -> Option<String> {
    if !arg.get_action().takes_values() {
        return Some("true".into());
    }
    // The flag's own parser, through the command alone (clap keeps `ValueParser::parse_ref`
    // private): a value it refuses fails the parse; a missing required flag, checked after every
    // value was parsed, does not count.
    let probe = cmd.clone().mut_args(|a| a.required(false));
    let takes = |v: &str| {
        let long = arg.get_long().unwrap_or_default();
        match probe
            .clone()
            .try_get_matches_from([cmd.get_name().to_owned(), format!("--{long}={v}")])
        {
            Ok(m) => m.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine),
            Err(e) => e.kind() == clap::error::ErrorKind::MissingRequiredArgument,
        }
    };
    let possible = arg
        .get_possible_values()
        .into_iter()
        .map(|p| p.get_name().to_owned());
    let defaults = arg
        .get_default_values()
        .iter()
        .filter_map(|d| d.to_str().map(str::to_owned));
    possible
        .chain(defaults)
        .chain(SAMPLES.iter().map(|s| (*s).to_owned()))
        .find(|v| !v.is_empty() && takes(v))
}

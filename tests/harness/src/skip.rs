//! The skip rule, written once: a test that needs a capability this machine may lack (root, a tool,
//! permission to mount) either runs, or prints `skipped: <reason>` and returns. Where the tests
//! must run (`SHOAL_REQUIRE_HOST_TESTS` or `CI` set, as `.ci/run` does) a missing capability fails
//! the test instead, so a CI machine that lost a capability cannot pass by skipping.
//!
//! A capability check returns `Result<T, Missing>` (or an `anyhow::Result` whose chain holds a
//! [`Missing`]); [`require!`](crate::require) applies the rule to it:
//!
//! ```no_run
//! # fn a_test() {
//! use shoal_testkit::{require, skip, Tmpfs};
//! require!(skip::root());
//! let losetup = require!(skip::tool("losetup", "mount"));
//! let fs = require!(Tmpfs::new("40m"));
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// The variable that makes a missing capability a failure (`.ci/run` sets it to 1).
pub const REQUIRE_ENV: &str = "SHOAL_REQUIRE_HOST_TESTS";

/// A capability a test needs is missing here; the reason is written for the person running the
/// tests (what is missing and how to get it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(String);

impl Missing {
    /// A missing capability, with why.
    pub fn new(reason: impl Into<String>) -> Missing {
        Missing(reason.into())
    }

    /// Why the test cannot run.
    pub fn reason(&self) -> &str {
        &self.0
    }

    /// `Err(Missing)` for `Some(reason)`: for checks that say why not, or `None`.
    pub fn check(why_not: Option<String>) -> Result<(), Missing> {
        match why_not {
            Some(reason) => Err(Missing(reason)),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Missing {}

/// Whether tests must run rather than skip: [`REQUIRE_ENV`] or `CI` is set to something other than
/// empty, `0` or `false`.
pub fn required() -> bool {
    [REQUIRE_ENV, "CI"].iter().any(|k| {
        std::env::var(k)
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
    })
}

/// Applies the rule to a test that cannot run because of `missing`: panics when tests are
/// [`required`], or prints `skipped: <test>: <reason>` (the caller then returns). `test` names the
/// test: libtest names each test's thread after it; `fallback` (the module path) is used where it
/// does not.
#[track_caller]
pub fn skip(fallback: &str, missing: &Missing) {
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or(fallback);
    if required() {
        panic!("{test} cannot run: {missing} ({REQUIRE_ENV} or CI is set, so it must)");
    }
    println!("skipped: {test}: {missing}");
}

/// For [`require!`](crate::require): the [`Missing`] capability in `err`'s chain, or a panic with
/// the whole error when it is some other failure (a check that broke is not a reason to skip).
#[doc(hidden)]
#[track_caller]
pub fn missing_or_panic(err: anyhow::Error) -> Missing {
    match err.chain().find_map(|c| c.downcast_ref::<Missing>()) {
        Some(m) => m.clone(),
        None => panic!("{err:?}"),
    }
}

/// `require!(check)`: the value of an `Ok` check; for a [`Missing`] capability the test skips (with
/// the reason printed) by returning, or fails under [`required`]; any other error fails the test.
/// `check` is a `Result<T, E>` with `E` a [`Missing`], an `anyhow::Error` or another error type.
///
/// It returns from the function it is written in, so write it in the test function itself; a
/// helper that checks several things returns `Result<(), Missing>` for the test to `require!`.
#[macro_export]
macro_rules! require {
    ($check:expr $(,)?) => {
        match $check {
            ::core::result::Result::Ok(value) => value,
            ::core::result::Result::Err(err) => {
                let missing = $crate::skip::missing_or_panic(err.into());
                $crate::skip::skip(module_path!(), &missing);
                return;
            }
        }
    };
}

/// Root (euid 0): namespaces, mounts, loop devices.
pub fn root() -> Result<(), Missing> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Missing::new("needs root; run the tests as root"))
    }
}

/// The program `name` on `$PATH` (or in `/usr/sbin`, `/sbin`, which a non-login root shell may
/// lack): its path, or [`Missing`] naming the Debian `package` to install.
pub fn tool(name: &str, package: &str) -> Result<PathBuf, Missing> {
    find_program(name).ok_or_else(|| {
        Missing::new(format!(
            "`{name}` is missing (Debian package {package}); run scripts/deps"
        ))
    })
}

/// Where `name` is on `$PATH`, `/usr/sbin` or `/sbin`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_found_anywhere_in_the_chain() {
        let err = anyhow::Error::new(Missing::new("no frobnicator")).context("setting up");
        assert_eq!(missing_or_panic(err).reason(), "no frobnicator");
    }

    #[test]
    #[should_panic(expected = "disk on fire")]
    fn other_errors_fail_the_test() {
        missing_or_panic(anyhow::anyhow!("disk on fire"));
    }

    #[test]
    fn check_turns_a_reason_into_missing() {
        assert_eq!(Missing::check(None), Ok(()));
        assert_eq!(Missing::check(Some("why".into())), Err(Missing::new("why")));
    }

    #[test]
    fn finds_sh_and_not_a_made_up_tool() {
        assert!(tool("sh", "dash").is_ok());
        let err = tool("shoal-no-such-tool", "shoal-nothing").expect_err("missing");
        assert!(err.reason().contains("shoal-nothing"), "{err}");
    }

    #[test]
    fn require_passes_the_value_through() {
        let v = require!(Ok::<u32, Missing>(7));
        assert_eq!(v, 7);
    }

    #[test]
    #[ignore = "run in a child process by the_rule_skips_or_fails_by_the_environment"]
    fn child_needs_a_missing_capability() {
        require!(Err::<(), _>(Missing::new("a made-up capability")));
        unreachable!("require! returns for a missing capability");
    }

    /// The rule end to end: this test binary runs the test above in a child process, once with the
    /// requirement unset (it skips and passes) and once with it set (it fails with the reason).
    #[test]
    fn the_rule_skips_or_fails_by_the_environment() {
        let child = |required: bool| {
            let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
            cmd.args([
                "--ignored",
                "--exact",
                "skip::tests::child_needs_a_missing_capability",
                "--nocapture",
            ])
            .env_remove("CI")
            .env_remove(REQUIRE_ENV);
            if required {
                cmd.env(REQUIRE_ENV, "1");
            }
            let out = cmd.output().expect("run the test binary");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        };
        let (passed, text) = child(false);
        assert!(passed, "skips without the requirement: {text}");
        assert!(
            text.contains(
                "skipped: skip::tests::child_needs_a_missing_capability: a made-up capability"
            ),
            "{text}"
        );
        let (passed, text) = child(true);
        assert!(!passed, "fails under {REQUIRE_ENV}=1: {text}");
        assert!(text.contains("cannot run: a made-up capability"), "{text}");
    }
}

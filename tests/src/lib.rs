//! Harness for shoal's host tests (tier 3 in `shared/conventions.md`): every host in its own
//! network namespace.
//!
//! - [`netns`]: namespaces, LANs (a bridge in a namespace of its own, veth pairs to hosts), cutting
//!   a host off.
//! - [`process`]: a supervisor that runs binaries inside namespaces with their output in per-test
//!   log files.
//! - [`wait`]: [`eventually`] / [`consistently`], deadline-bounded polling; the only way tests
//!   wait.
//! - [`bins`]: finds `shoal-controller`, `shoal-agent` and `shoalctl` next to the test executable.
//! - [`fleet`]: a controller plus agents on one LAN, and `shoalctl` with its JSON parsed.
//! - [`netboot`]: a controller serving netboot on a LAN, and diskless qemu VMs booting from it.
//! - [`releases`]: agent releases: a signing key, versions made by patching the version slot,
//!   install dirs.
//!
//! Host tests start with [`require_host_tests!`]: without root or network namespaces they print why
//! and skip, except under CI (env `CI` or `SHOAL_REQUIRE_HOST_TESTS` set), where they fail instead.

pub mod bins;
pub mod fleet;
pub mod netboot;
pub mod netns;
pub mod process;
pub mod qmp;
pub mod releases;
pub mod wait;

use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub use bins::Bins;
pub use fleet::{Agent, Fleet, FleetConfig};
pub use netns::{Netns, Topology};
pub use process::{PanicLogs, Proc, ProcSpec};
pub use wait::{abort, consistently, eventually};

/// Why host tests cannot run on this machine, or `None` when they can (root, `ip`, `unshare`, and
/// network namespaces can be created). Checked once per process.
pub fn host_tests_unavailable() -> Option<String> {
    static RESULT: OnceLock<Option<String>> = OnceLock::new();
    RESULT.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some(
            "host tests need root (they create network namespaces); run them as root".into(),
        );
    }
    for (tool, package) in [("ip", "iproute2"), ("unshare", "util-linux")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!(
                "`{tool}` is missing (Debian package {package}); run scripts/deps"
            ));
        }
    }
    let name = format!("{}{}-probe", netns::PREFIX, std::process::id());
    match Netns::create(&name) {
        Ok(ns) => {
            drop(ns);
            None
        }
        Err(e) => Some(format!("cannot create a network namespace: {e:#}")),
    }
}

/// Whether host tests must run (and fail rather than skip): env `CI` or `SHOAL_REQUIRE_HOST_TESTS`
/// is set to something other than empty, `0` or `false`.
pub fn host_tests_required() -> bool {
    ["CI", "SHOAL_REQUIRE_HOST_TESTS"].iter().any(|k| {
        std::env::var(k)
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
    })
}

/// At the top of a host test: returns early (skips, with the reason printed) when host tests cannot
/// run here, or panics when they cannot run but must ([`host_tests_required`]).
#[macro_export]
macro_rules! require_host_tests {
    () => {
        if let Some(reason) = $crate::host_tests_unavailable() {
            if $crate::host_tests_required() {
                panic!("host tests cannot run: {reason} (and CI / SHOAL_REQUIRE_HOST_TESTS says they must)");
            }
            eprintln!("SKIPPED {}: {reason}", module_path!());
            println!("SKIPPED {}: {reason}", module_path!());
            return;
        }
    };
}

/// At the top of a netboot (qemu) host test: [`require_host_tests!`], then skips when qemu, iPXE or
/// the firmware `$fw` is missing here, or panics when they are missing but must be there.
#[macro_export]
macro_rules! require_netboot {
    ($fw:expr) => {
        $crate::require_host_tests!();
        if let Some(reason) = $crate::netboot::netboot_unavailable($fw) {
            if $crate::host_tests_required() {
                panic!("netboot tests cannot run: {reason} (and CI / SHOAL_REQUIRE_HOST_TESTS says they must)");
            }
            println!("SKIPPED {}: {reason}", module_path!());
            return;
        }
    };
}

/// `.or_panic()` on a `Result`: panics with the whole error chain. Host tests run their scenario as
/// a `fn(&mut Fleet) -> anyhow::Result<()>` and call `.or_panic()` while the fleet is still alive,
/// so the fleet sees the panic when it drops and prints every process's log.
pub trait OrPanic<T> {
    /// The value, or a panic showing the error and its causes.
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for anyhow::Result<T> {
    #[track_caller]
    fn or_panic(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{e:?}"),
        }
    }
}

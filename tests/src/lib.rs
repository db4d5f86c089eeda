//! Harness for shoal's host tests (tier 3 in `shared/conventions.md`): every host in its own
//! network namespace.
//!
//! - [`netns`]: namespaces, LANs (a bridge in a namespace of its own, veth pairs to hosts), cutting
//!   a host off.
//! - [`process`]: a supervisor that runs binaries inside namespaces with their output in per-test
//!   log files.
//! - [`wait`]: [`eventually`] / [`consistently`], deadline-bounded polling; the only way tests
//!   wait. They live in [`shoal_testkit`] (with the skip rule, [`Tmpfs`] and the command runner)
//!   and are re-exported here.
//! - [`backup_servers`]: real backup targets (an S3 object store, an sftp server) for restic.
//! - [`bins`]: finds `shoal-controller`, `shoal-agent` and `shoalctl` next to the test executable.
//! - [`fleet`]: a controller plus agents on one LAN, and `shoalctl` with its JSON parsed.
//! - [`events`]: filters over the event log as `shoalctl events -o json` prints it.
//! - [`netboot`]: a controller serving netboot on a LAN, and diskless qemu VMs booting from it.
//! - [`releases`]: agent releases: a signing key, versions made by patching the version slot,
//!   install dirs.
//!
//! Host tests start with [`require_host_tests!`]: without root or network namespaces they print why
//! and skip, except under CI (env `CI` or `SHOAL_REQUIRE_HOST_TESTS` set), where they fail instead.
//! That is [`shoal_testkit`]'s one rule ([`testkit::require!`]); a test that needs more (a tool, a
//! tmpfs) checks it with the same macro.

pub mod backup_servers;
pub mod bins;
pub mod container;
pub mod events;
pub mod fleet;
pub mod ha;
pub mod netboot;
pub mod netns;
pub mod process;
pub mod qmp;
pub mod releases;

use std::sync::OnceLock;

pub use bins::Bins;
pub use fleet::{Agent, Fleet, FleetConfig};
pub use netns::{Netns, Topology};
pub use process::{PanicLogs, Proc, ProcSpec};
pub use shoal_testkit as testkit;
pub use shoal_testkit::{abort, consistently, eventually, wait, Tmpfs};

use shoal_testkit::skip::{self, Missing};

/// Whether host tests can run on this machine: root, `ip`, `unshare`, and network namespaces can be
/// created; or the [`Missing`] capability. Checked once per process.
pub fn host_tests_available() -> Result<(), Missing> {
    static RESULT: OnceLock<Result<(), Missing>> = OnceLock::new();
    RESULT.get_or_init(probe).clone()
}

/// Why host tests cannot run on this machine, or `None` when they can ([`host_tests_available`]).
pub fn host_tests_unavailable() -> Option<String> {
    host_tests_available().err().map(|m| m.to_string())
}

fn probe() -> Result<(), Missing> {
    skip::root().map_err(|_| {
        Missing::new("host tests need root (they create network namespaces); run them as root")
    })?;
    skip::tool("ip", "iproute2")?;
    skip::tool("unshare", "util-linux")?;
    let name = format!("{}{}-probe", netns::PREFIX, std::process::id());
    match Netns::create(&name) {
        Ok(ns) => {
            drop(ns);
            Ok(())
        }
        Err(e) => Err(Missing::new(format!(
            "cannot create a network namespace: {e:#}"
        ))),
    }
}

/// At the top of a host test: skips (with the reason printed) when host tests cannot run here
/// ([`host_tests_available`]), or fails when they cannot run but must ([`testkit::required`]).
#[macro_export]
macro_rules! require_host_tests {
    () => {
        $crate::testkit::require!($crate::host_tests_available());
    };
}

/// At the top of a netboot (qemu) host test: [`require_host_tests!`], then the same rule for qemu,
/// iPXE and the firmware `$fw`.
#[macro_export]
macro_rules! require_netboot {
    ($fw:expr) => {
        $crate::require_host_tests!();
        $crate::testkit::require!($crate::testkit::Missing::check(
            $crate::netboot::netboot_unavailable($fw)
        ));
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

//! Test helpers shared by every tier of shoal's tests (`shared/conventions.md`), none of which
//! needs a shoal crate:
//!
//! - [`skip`]: the one rule for a test that needs a capability (root, a tool, mounting): it runs,
//!   or prints `skipped: <reason>` and returns, and under `SHOAL_REQUIRE_HOST_TESTS` (or `CI`) it
//!   fails instead. Use it through [`require!`].
//! - [`tmpfs`]: [`Tmpfs`], a tmpfs mounted for one test and unmounted on drop.
//! - [`cmd`]: running commands to completion, with their stderr in the error.
//! - [`etcd`]: [`EtcdCluster`], real etcd members started by a test (loopback or namespaces).
//! - [`wait`]: [`eventually`] / [`consistently`], deadline-bounded polling; the only way blocking
//!   tests wait.
//! - `wait_async` (feature `tokio`): the same for async tests.
//!
//! Helpers that need the controller or the agent live with the tests that use them: the in-process
//! controller in `controller/tests/common`, host-test fleets in `shoal-tests`.

pub mod cmd;
pub mod etcd;
pub mod skip;
pub mod tmpfs;
pub mod wait;
#[cfg(feature = "tokio")]
pub mod wait_async;

pub use etcd::{EtcdCluster, EtcdMemberSpec};
pub use skip::{required, Missing};
pub use tmpfs::Tmpfs;
pub use wait::{abort, consistently, eventually};

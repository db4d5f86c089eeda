//! Helpers shared by the controller's in-process integration tests (tier 2): the in-process
//! controller, real agents, hand-driven connections and event filters ([`harness`]), and the
//! deadline waits of `shoal-testkit` (where the skip rule and `Tmpfs` live too).

// Each test binary uses its own part of the harness.
#![allow(dead_code)]

pub mod harness;

#[allow(unused_imports)]
pub use shoal_testkit::wait_async::{consistently, eventually};

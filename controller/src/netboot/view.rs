//! JSON shapes of the netboot admin API: defined in `shoal_api::netboot`, shared with `shoalctl`,
//! re-exported here under their old paths.

pub use shoal_api::netboot::{ImageView, MachineView, SetImage};

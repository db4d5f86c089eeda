//! What the admin API returns: the JSON views of the registry. The shapes live in `shoal-api`,
//! shared with `shoalctl`; they are re-exported here under their old paths. The controller's own
//! part is how times are written in them ([`rfc3339`]).

pub use shoal_api::{
    drives::{
        DriveCommandView, DrivePolicies, DrivePolicyView, DriveView, EffectivePolicyView,
        SelfTestRequest, SelfTestView, SetDrivePolicy, SmartView, StateDetail,
    },
    error::ApiError,
    events::EventView,
    identity::{CertView, PendingView, ReenrolRequest, RevokeCertRequest, RevokedCertView},
    networks::{CreateNetwork, MemberSpec, MemberView, NetworkDetail, NetworkUpdate, NetworkView},
    nodes::{NodeView, OverlayAddressView},
    overlay::{OverlayCountersView, PathView},
    refusals::RefusalsView,
    tokens::{CreateToken, CreatedToken, TokenView},
};

/// RFC 3339 UTC text for a Unix time in milliseconds. Agents send times too (SMART reads, reports):
/// one past year 9999, which RFC 3339 cannot write, is shown as milliseconds instead of failing the
/// whole view.
pub fn rfc3339(ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms)) {
        Some(t) if write!(out, "{}", humantime::format_rfc3339_seconds(t)).is_ok() => out,
        _ => format!("{ms} ms after the Unix epoch"),
    }
}

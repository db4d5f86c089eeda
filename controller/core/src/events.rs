//! The event log's vocabulary: each domain names what it logs in its own enum ([`RegistryEvent`],
//! [`OverlayEvent`], [`DriveEvent`], [`MaintenanceEvent`], [`ReleaseEvent`]), and [`EventKind`] is
//! one of them. A kind is written and shown by its name (`drive_appeared`), which is what the
//! store keeps and the admin API returns, so enums may be reordered or split without touching
//! stored logs.
//!
//! [`RegistryEvent`]: crate::registry::RegistryEvent
//! [`OverlayEvent`]: crate::networks::OverlayEvent
//! [`DriveEvent`]: crate::drives::DriveEvent
//! [`MaintenanceEvent`]: crate::rollout::MaintenanceEvent
//! [`ReleaseEvent`]: crate::releases::ReleaseEvent

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    backups::BackupEvent, drives::DriveEvent, networks::OverlayEvent, registry::RegistryEvent,
    releases::ReleaseEvent, rollout::MaintenanceEvent,
};

/// Declares a domain's event enum: each variant with its doc and its stored name.
#[macro_export]
macro_rules! event_kinds {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every kind of this domain.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name the log keeps and shows.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }
    };
}

event_kinds! {
    /// What the event log itself logs.
    pub enum LogEvent {
        /// Events about a node over its budget were not logged; this one says how many, of which
        /// kind and when.
        EventsSuppressed => "events_suppressed",
    }
}

/// What happened, in one event: a kind of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Nodes, tokens, enrolment and identity.
    Registry(RegistryEvent),
    /// Overlay networks.
    Overlay(OverlayEvent),
    /// Drives and their policies.
    Drives(DriveEvent),
    /// Windows, budgets, rollouts and maintenance runs.
    Maintenance(MaintenanceEvent),
    /// Agent releases and updates.
    Releases(ReleaseEvent),
    /// Backup targets, jobs, runs and verifications.
    Backups(BackupEvent),
    /// The log itself.
    Log(LogEvent),
}

impl EventKind {
    /// The name the log keeps and shows (`drive_appeared`).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Registry(e) => e.name(),
            EventKind::Overlay(e) => e.name(),
            EventKind::Drives(e) => e.name(),
            EventKind::Maintenance(e) => e.name(),
            EventKind::Releases(e) => e.name(),
            EventKind::Backups(e) => e.name(),
            EventKind::Log(e) => e.name(),
        }
    }

    /// Every kind of every domain.
    pub fn all() -> impl Iterator<Item = EventKind> {
        let registry = RegistryEvent::ALL.iter().map(|e| EventKind::Registry(*e));
        let overlay = OverlayEvent::ALL.iter().map(|e| EventKind::Overlay(*e));
        let drives = DriveEvent::ALL.iter().map(|e| EventKind::Drives(*e));
        let maintenance = MaintenanceEvent::ALL
            .iter()
            .map(|e| EventKind::Maintenance(*e));
        let releases = ReleaseEvent::ALL.iter().map(|e| EventKind::Releases(*e));
        let backups = BackupEvent::ALL.iter().map(|e| EventKind::Backups(*e));
        let log = LogEvent::ALL.iter().map(|e| EventKind::Log(*e));
        registry
            .chain(overlay)
            .chain(drives)
            .chain(maintenance)
            .chain(releases)
            .chain(backups)
            .chain(log)
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::all().find(|k| k.name() == name)
    }

    /// The kind a log written before kinds were named (protocol 5 and earlier controllers) stored
    /// as position `index` of its single enum.
    pub fn from_legacy_index(index: u32) -> Option<EventKind> {
        LEGACY_ORDER
            .get(index as usize)
            .and_then(|name| EventKind::from_name(name))
    }
}

/// The kinds in the order the one `EventKind` enum of earlier controllers declared them: their
/// stored events name a kind by its position here. Frozen.
const LEGACY_ORDER: &[&str] = &[
    "enrolled",
    "reenrolled",
    "up",
    "down",
    "removed",
    "token_created",
    "token_revoked",
    "network_created",
    "network_deleted",
    "network_changed",
    "drive_appeared",
    "drive_removed",
    "drive_prepared",
    "drive_prepare_failed",
    "drive_missing",
    "drive_verdict_changed",
    "drive_self_test_completed",
    "drive_policy_changed",
    "window_created",
    "window_deleted",
    "budget_set",
    "budget_deleted",
    "rollout_started",
    "rollout_paused",
    "rollout_resumed",
    "rollout_aborted",
    "rollout_done",
    "node_upgrade_started",
    "node_upgrade_succeeded",
    "node_upgrade_failed",
    "node_rolled_back",
    "release_added",
    "agent_update_offered",
    "agent_update_succeeded",
    "agent_update_failed",
    "agent_update_rolled_back",
    "node_reboot_requested",
    "node_rebooting",
    "node_reboot_refused",
    "node_cordoned",
    "node_in_maintenance",
    "node_up",
    "node_maintenance_failed",
    "node_boot_report",
    "claim_refused",
    "enrolment_pending",
    "enrolment_approved",
    "enrolment_denied",
    "reenrol_armed",
    "certificate_revoked",
    "certificate_refused",
    "key_rotated",
    "events_suppressed",
];

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        EventKind::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown event kind {name:?}")))
    }
}

impl From<RegistryEvent> for EventKind {
    fn from(e: RegistryEvent) -> Self {
        EventKind::Registry(e)
    }
}

impl From<OverlayEvent> for EventKind {
    fn from(e: OverlayEvent) -> Self {
        EventKind::Overlay(e)
    }
}

impl From<DriveEvent> for EventKind {
    fn from(e: DriveEvent) -> Self {
        EventKind::Drives(e)
    }
}

impl From<MaintenanceEvent> for EventKind {
    fn from(e: MaintenanceEvent) -> Self {
        EventKind::Maintenance(e)
    }
}

impl From<ReleaseEvent> for EventKind {
    fn from(e: ReleaseEvent) -> Self {
        EventKind::Releases(e)
    }
}

impl From<BackupEvent> for EventKind {
    fn from(e: BackupEvent) -> Self {
        EventKind::Backups(e)
    }
}

impl From<LogEvent> for EventKind {
    fn from(e: LogEvent) -> Self {
        EventKind::Log(e)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_name_is_unique_and_round_trips() {
        let names: Vec<&str> = EventKind::all().map(EventKind::name).collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(
            names.len(),
            unique.len(),
            "duplicate event names: {names:?}"
        );
        for kind in EventKind::all() {
            assert_eq!(EventKind::from_name(kind.name()), Some(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), kind);
        }
    }

    #[test]
    fn every_legacy_position_still_names_its_kind() {
        for (i, name) in LEGACY_ORDER.iter().enumerate() {
            let kind = EventKind::from_legacy_index(i as u32)
                .unwrap_or_else(|| panic!("legacy kind {name} is not a kind any more"));
            assert_eq!(kind.name(), *name);
        }
        assert!(EventKind::all().count() >= LEGACY_ORDER.len());
        assert_eq!(
            EventKind::from_legacy_index(LEGACY_ORDER.len() as u32),
            None
        );
    }
}

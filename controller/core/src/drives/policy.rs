//! Drive policies: what a node does with a drive that appears (`report`, `approve`, `prepare`) and
//! which filesystem prepared drives get. Sans-IO: the records and the rule that picks a node's
//! policy; the store and the pushing to agents are in [`crate::drive_hub`].
//!
//! A policy is set for one node (`--node ID`) or for a label selector (`--selector SELECTOR`,
//! matched like overlay network selectors, [`crate::selector`]). A node's effective
//! policy:
//! 1. its node policy, if it has one: the operator said exactly what this machine does;
//! 2. else, among the selector policies matching its labels, the most cautious mode (`report` <
//!    `approve` < `prepare`), so a node that is in two groups never erases a drive because one of
//!    the groups allows it; on a tie, the policy whose selector sorts first (canonical text)
//!    gives the filesystem;
//! 3. else the default: `report`, `ext4`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{DrivePolicy, NodeId, UnixMillis};

use crate::selector::Selector;

/// Whom a policy is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyTarget {
    /// One node.
    Node(NodeId),
    /// Every node whose labels the selector matches (stored in its compatible form: a record
    /// of the old `KEY=VALUE` form reads unchanged).
    Selector(Selector),
}

impl PolicyTarget {
    /// The key in the `drive_policies` tree: `node:ID` or `selector:CANONICAL-TEXT` (for a
    /// `KEY=VALUE` selector the key it always had).
    pub fn key(&self) -> String {
        match self {
            PolicyTarget::Node(n) => format!("node:{n}"),
            PolicyTarget::Selector(s) => format!("selector:{s}"),
        }
    }
}

impl std::fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyTarget::Node(n) => write!(f, "node {n}"),
            PolicyTarget::Selector(s) => write!(f, "selector {s}"),
        }
    }
}

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Whom it is for.
    pub target: PolicyTarget,
    /// What it says.
    pub policy: DrivePolicy,
    /// When it was set.
    pub set_at: UnixMillis,
}

/// Where a node's effective policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The node's own policy.
    Node,
    /// A selector policy (the most cautious matching one).
    Selector(Selector),
    /// No policy applies: `report`, `ext4`.
    Default,
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Node => f.write_str("node"),
            PolicySource::Selector(s) => write!(f, "selector {s}"),
            PolicySource::Default => f.write_str("default"),
        }
    }
}

/// A node's effective policy and where it comes from (see the module docs for the rule).
pub fn resolve(
    node: &NodeId,
    labels: &BTreeMap<String, String>,
    policies: &[PolicyRecord],
) -> (DrivePolicy, PolicySource) {
    if let Some(p) = policies
        .iter()
        .find(|p| p.target == PolicyTarget::Node(node.clone()))
    {
        return (p.policy, PolicySource::Node);
    }
    policies
        .iter()
        .filter_map(|p| match &p.target {
            PolicyTarget::Selector(s) if s.matches(labels) => Some((p.policy, s)),
            _ => None,
        })
        .min_by(|a, b| (a.0.mode, a.1.to_string()).cmp(&(b.0.mode, b.1.to_string())))
        .map(|(policy, s)| (policy, PolicySource::Selector(s.clone())))
        .unwrap_or((DrivePolicy::default(), PolicySource::Default))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shoal_proto::{DrivePolicyMode as Mode, Filesystem};

    fn rec(target: PolicyTarget, mode: Mode, filesystem: Filesystem) -> PolicyRecord {
        PolicyRecord {
            target,
            policy: DrivePolicy { mode, filesystem },
            set_at: UnixMillis(0),
        }
    }

    fn sel(k: &str, v: &str) -> PolicyTarget {
        PolicyTarget::Selector(Selector::equals(k, v))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_is_report_ext4() {
        let n = NodeId("n1".into());
        let policies = [rec(sel("role", "db"), Mode::Prepare, Filesystem::Xfs)];
        assert_eq!(
            resolve(&n, &labels(&[("role", "web")]), &policies),
            (DrivePolicy::default(), PolicySource::Default)
        );
        assert_eq!(
            DrivePolicy::default(),
            DrivePolicy {
                mode: Mode::Report,
                filesystem: Filesystem::Ext4
            }
        );
    }

    #[test]
    fn node_policy_wins_over_selectors_even_when_bolder() {
        let n = NodeId("n1".into());
        let policies = [
            rec(sel("role", "db"), Mode::Report, Filesystem::Ext4),
            rec(
                PolicyTarget::Node(n.clone()),
                Mode::Prepare,
                Filesystem::Xfs,
            ),
            rec(
                PolicyTarget::Node(NodeId("n2".into())),
                Mode::Approve,
                Filesystem::Ext4,
            ),
        ];
        assert_eq!(
            resolve(&n, &labels(&[("role", "db")]), &policies),
            (
                DrivePolicy {
                    mode: Mode::Prepare,
                    filesystem: Filesystem::Xfs
                },
                PolicySource::Node
            )
        );
    }

    #[test]
    fn most_cautious_matching_selector_wins() {
        let n = NodeId("n1".into());
        let policies = [
            rec(sel("rack", "a"), Mode::Prepare, Filesystem::Xfs),
            rec(sel("role", "db"), Mode::Approve, Filesystem::Xfs),
            rec(sel("zone", "1"), Mode::Report, Filesystem::Ext4), // does not match
        ];
        let l = labels(&[("rack", "a"), ("role", "db"), ("zone", "2")]);
        assert_eq!(
            resolve(&n, &l, &policies),
            (
                DrivePolicy {
                    mode: Mode::Approve,
                    filesystem: Filesystem::Xfs
                },
                PolicySource::Selector(Selector::equals("role", "db"))
            )
        );
        assert_eq!(resolve(&n, &l, &policies).1.to_string(), "selector role=db");
        // Only the bold one matches: it applies.
        assert_eq!(
            resolve(&n, &labels(&[("rack", "a")]), &policies).0.mode,
            Mode::Prepare
        );
    }

    #[test]
    fn ties_take_the_filesystem_of_the_first_selector() {
        let n = NodeId("n1".into());
        let policies = [
            rec(sel("zz", "1"), Mode::Prepare, Filesystem::Ext4),
            rec(sel("aa", "1"), Mode::Prepare, Filesystem::Xfs),
        ];
        let (policy, source) = resolve(&n, &labels(&[("aa", "1"), ("zz", "1")]), &policies);
        assert_eq!(
            (policy.filesystem, source),
            (
                Filesystem::Xfs,
                PolicySource::Selector(Selector::equals("aa", "1"))
            )
        );
    }

    #[test]
    fn multi_term_selectors_pick_nodes() {
        let n = NodeId("n1".into());
        let multi: Selector = "role=db,zone in (a,b),!spot".parse().unwrap();
        let policies = [rec(
            PolicyTarget::Selector(multi.clone()),
            Mode::Approve,
            Filesystem::Xfs,
        )];
        let source = |l: &[(&str, &str)]| resolve(&n, &labels(l), &policies).1;
        assert_eq!(
            source(&[("role", "db"), ("zone", "b")]),
            PolicySource::Selector(multi.clone())
        );
        assert_eq!(
            source(&[("role", "db"), ("zone", "c")]),
            PolicySource::Default
        );
        assert_eq!(
            source(&[("role", "db"), ("zone", "a"), ("spot", "")]),
            PolicySource::Default
        );
        assert_eq!(
            PolicyTarget::Selector(multi).key(),
            "selector:role=db,!spot,zone in (a,b)"
        );
    }

    #[test]
    fn policy_records_of_the_old_encoding_read() {
        /// The record as stored before multi-term selectors.
        #[derive(Serialize)]
        enum OldTarget {
            #[allow(dead_code)]
            Node(NodeId),
            Selector(String, String),
        }
        #[derive(Serialize)]
        struct OldRecord {
            target: OldTarget,
            policy: DrivePolicy,
            set_at: UnixMillis,
        }
        let old = OldRecord {
            target: OldTarget::Selector("role".into(), "db".into()),
            policy: DrivePolicy {
                mode: Mode::Prepare,
                filesystem: Filesystem::Xfs,
            },
            set_at: UnixMillis(7),
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        let new: PolicyRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            new,
            rec(sel("role", "db"), Mode::Prepare, Filesystem::Xfs).with_set_at(7)
        );
        assert_eq!(new.target.key(), "selector:role=db");
        assert_eq!(postcard::to_allocvec(&new).unwrap(), bytes);
    }

    impl PolicyRecord {
        fn with_set_at(self, at: u64) -> PolicyRecord {
            PolicyRecord {
                set_at: UnixMillis(at),
                ..self
            }
        }
    }

    #[test]
    fn target_keys_are_distinct() {
        assert_eq!(PolicyTarget::Node(NodeId("n1".into())).key(), "node:n1");
        assert_eq!(sel("role", "db").key(), "selector:role=db");
        assert_eq!(sel("role", "db").to_string(), "selector role=db");
    }
}

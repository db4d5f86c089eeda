//! Drive policies: what a node does with a drive that appears (`report`, `approve`, `prepare`) and
//! which filesystem prepared drives get. Sans-IO: the records and the rule that picks a node's
//! policy; the store and the pushing to agents are in [`crate::drive_hub`].
//!
//! A policy is set for one node (`--node ID`) or for a label selector (`--selector KEY=VALUE`,
//! matched like overlay network selectors, [`crate::networks::parse_selector`]). A node's effective
//! policy:
//! 1. its node policy, if it has one: the operator said exactly what this machine does;
//! 2. else, among the selector policies matching its labels, the most cautious mode (`report` <
//!    `approve` < `prepare`), so a node that is in two groups never erases a drive because one of
//!    the groups allows it; on a tie, the policy whose selector sorts first (`KEY=VALUE` text)
//!    gives the filesystem;
//! 3. else the default: `report`, `ext4`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::{DrivePolicy, NodeId, UnixMillis};

use crate::selector::selector_matches;

/// Whom a policy is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyTarget {
    /// One node.
    Node(NodeId),
    /// Every node whose labels have `KEY=VALUE`.
    Selector(String, String),
}

impl PolicyTarget {
    /// The key in the `drive_policies` tree: `node:ID` or `selector:KEY=VALUE`.
    pub fn key(&self) -> String {
        match self {
            PolicyTarget::Node(n) => format!("node:{n}"),
            PolicyTarget::Selector(k, v) => format!("selector:{k}={v}"),
        }
    }
}

impl std::fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyTarget::Node(n) => write!(f, "node {n}"),
            PolicyTarget::Selector(k, v) => write!(f, "selector {k}={v}"),
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
    Selector(String, String),
    /// No policy applies: `report`, `ext4`.
    Default,
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Node => f.write_str("node"),
            PolicySource::Selector(k, v) => write!(f, "selector {k}={v}"),
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
            PolicyTarget::Selector(k, v) if selector_matches(k, v, labels) => {
                Some((p.policy, k, v))
            }
            _ => None,
        })
        .min_by(|a, b| {
            (a.0.mode, format!("{}={}", a.1, a.2)).cmp(&(b.0.mode, format!("{}={}", b.1, b.2)))
        })
        .map(|(policy, k, v)| (policy, PolicySource::Selector(k.clone(), v.clone())))
        .unwrap_or((DrivePolicy::default(), PolicySource::Default))
}

#[cfg(test)]
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
        PolicyTarget::Selector(k.into(), v.into())
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
                PolicySource::Selector("role".into(), "db".into())
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
                PolicySource::Selector("aa".into(), "1".into())
            )
        );
    }

    #[test]
    fn target_keys_are_distinct() {
        assert_eq!(PolicyTarget::Node(NodeId("n1".into())).key(), "node:n1");
        assert_eq!(sel("role", "db").key(), "selector:role=db");
        assert_eq!(sel("role", "db").to_string(), "selector role=db");
    }
}

//! Changing a node's labels (`shoalctl nodes label`): what a change may do, with kubectl's rules —
//! setting a label the node has with another value needs `overwrite`, `KEY-` removes (a label the
//! node lacks is not an error), one request may not both set and remove a key. Keys and values
//! follow [`crate::selector`]'s rules; a node has at most [`MAX_LABELS`]; labels the controller sets
//! itself ([`RESERVED_KEYS`]) cannot be changed by hand.
//!
//! Labels already stored (from join tokens written before these rules) are kept as they are: only
//! what a change adds is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::enrolment::NETBOOT_MAC_LABEL;
use crate::selector::{check_label_key, check_label_value, LabelError};

/// Most labels one node (or one join token) may have, and most keys one change may name.
pub const MAX_LABELS: usize = 64;

/// Labels the controller sets and relies on: `netboot.mac` binds a netbooted node to the MAC its
/// per-boot tokens are minted for.
pub const RESERVED_KEYS: &[&str] = &[NETBOOT_MAC_LABEL];

/// What an operator asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelChange {
    /// Labels to set.
    pub set: BTreeMap<String, String>,
    /// Keys to remove.
    pub remove: BTreeSet<String>,
    /// Whether a label the node has may get another value.
    pub overwrite: bool,
}

/// One label that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelEdit {
    /// A label the node did not have.
    Added {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// A label that got another value.
    Changed {
        /// Key.
        key: String,
        /// Value before.
        from: String,
        /// Value now.
        to: String,
    },
    /// A label removed.
    Removed {
        /// Key.
        key: String,
        /// Value it had.
        value: String,
    },
}

impl fmt::Display for LabelEdit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelEdit::Added { key, value } => write!(f, "{key}={value} added"),
            LabelEdit::Changed { key, from, to } => write!(f, "{key}={to} (was {from})"),
            LabelEdit::Removed { key, value } => write!(f, "{key} removed (was {value})"),
        }
    }
}

/// Why a label change was refused. Nothing of a refused change is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelChangeError {
    /// A key or value outside the rules.
    #[error(transparent)]
    Label(#[from] LabelError),
    /// A label the controller manages.
    #[error("label {0:?} is set by the controller and cannot be changed by hand")]
    Reserved(String),
    /// The node has the label with another value and `overwrite` was not given.
    #[error("node already has {key}={current}; pass --overwrite to change it")]
    Exists {
        /// Key.
        key: String,
        /// The node's value.
        current: String,
    },
    /// The same key set and removed.
    #[error("label {0:?} is both set and removed; do one or the other")]
    SetAndRemove(String),
    /// Nothing asked.
    #[error("no label change given: name KEY=VALUE to set or KEY- to remove")]
    Nothing,
    /// The change names too many keys, or leaves the node with too many labels.
    #[error("a node may have at most {MAX_LABELS} labels (this change would leave {0})")]
    TooMany(usize),
}

/// Checks the labels a token gives (every one must follow the rules; none reserved).
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelChangeError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelChangeError::TooMany(labels.len()));
    }
    for (k, v) in labels {
        check_label_key(k)?;
        check_label_value(v)?;
        if RESERVED_KEYS.contains(&k.as_str()) {
            return Err(LabelChangeError::Reserved(k.clone()));
        }
    }
    Ok(())
}

/// Applies `change` to `labels`, all or nothing; returns what changed (empty: nothing did).
pub fn apply(
    labels: &mut BTreeMap<String, String>,
    change: &LabelChange,
) -> Result<Vec<LabelEdit>, LabelChangeError> {
    if change.set.is_empty() && change.remove.is_empty() {
        return Err(LabelChangeError::Nothing);
    }
    let named = change.set.len().saturating_add(change.remove.len());
    if named > MAX_LABELS {
        return Err(LabelChangeError::TooMany(named));
    }
    for key in change.set.keys().chain(&change.remove) {
        check_label_key(key)?;
        if RESERVED_KEYS.contains(&key.as_str()) {
            return Err(LabelChangeError::Reserved(key.clone()));
        }
    }
    for value in change.set.values() {
        check_label_value(value)?;
    }
    if let Some(key) = change.set.keys().find(|k| change.remove.contains(*k)) {
        return Err(LabelChangeError::SetAndRemove(key.clone()));
    }
    if !change.overwrite {
        if let Some((key, current)) = change
            .set
            .iter()
            .find_map(|(k, v)| labels.get(k).filter(|c| *c != v).map(|c| (k, c)))
        {
            return Err(LabelChangeError::Exists {
                key: key.clone(),
                current: current.clone(),
            });
        }
    }
    let mut next = labels.clone();
    let mut edits = Vec::new();
    for key in &change.remove {
        if let Some(value) = next.remove(key) {
            edits.push(LabelEdit::Removed {
                key: key.clone(),
                value,
            });
        }
    }
    for (key, value) in &change.set {
        match next.insert(key.clone(), value.clone()) {
            None => edits.push(LabelEdit::Added {
                key: key.clone(),
                value: value.clone(),
            }),
            Some(from) if from != *value => edits.push(LabelEdit::Changed {
                key: key.clone(),
                from,
                to: value.clone(),
            }),
            Some(_) => {}
        }
    }
    // Labels stored before the bound may exceed it; a change may not add to that.
    if next.len() > MAX_LABELS && next.len() > labels.len() {
        return Err(LabelChangeError::TooMany(next.len()));
    }
    *labels = next;
    Ok(edits)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn change(set: &[(&str, &str)], remove: &[&str], overwrite: bool) -> LabelChange {
        LabelChange {
            set: labels(set),
            remove: remove.iter().map(|k| k.to_string()).collect(),
            overwrite,
        }
    }

    #[test]
    fn kubectl_rules() {
        let mut l = labels(&[("role", "web"), ("zone", "a")]);
        // A different value needs --overwrite; nothing is applied without it.
        let err = apply(
            &mut l,
            &change(&[("rack", "r1"), ("role", "db")], &[], false),
        );
        assert_eq!(
            err,
            Err(LabelChangeError::Exists {
                key: "role".into(),
                current: "web".into()
            })
        );
        assert_eq!(l, labels(&[("role", "web"), ("zone", "a")]));
        assert_eq!(
            err.unwrap_err().to_string(),
            "node already has role=web; pass --overwrite to change it"
        );
        // The same value is no change and needs no --overwrite.
        assert_eq!(
            apply(&mut l, &change(&[("role", "web")], &[], false)),
            Ok(vec![])
        );
        let edits = apply(
            &mut l,
            &change(&[("rack", "r1"), ("role", "db")], &["zone", "gone"], true),
        )
        .unwrap();
        assert_eq!(l, labels(&[("rack", "r1"), ("role", "db")]));
        assert_eq!(
            edits.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["zone removed (was a)", "rack=r1 added", "role=db (was web)"]
        );
        assert_eq!(
            apply(&mut l, &change(&[("a", "1")], &["a"], true)),
            Err(LabelChangeError::SetAndRemove("a".into()))
        );
        assert_eq!(
            apply(&mut l, &change(&[], &[], true)),
            Err(LabelChangeError::Nothing)
        );
    }

    #[test]
    fn rules_and_bounds() {
        let mut l = labels(&[("netboot.mac", "52:54:00:00:00:01")]);
        assert_eq!(
            apply(&mut l, &change(&[], &["netboot.mac"], true)),
            Err(LabelChangeError::Reserved("netboot.mac".into()))
        );
        assert!(matches!(
            apply(&mut l, &change(&[("bad key", "x")], &[], true)),
            Err(LabelChangeError::Label(LabelError::BadKey(_)))
        ));
        assert!(matches!(
            apply(&mut l, &change(&[("k", "a,b")], &[], true)),
            Err(LabelChangeError::Label(LabelError::BadValue(_)))
        ));
        let many: Vec<(String, String)> = (0..MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        let set = many.iter().cloned().collect();
        let c = LabelChange {
            set,
            remove: BTreeSet::new(),
            overwrite: false,
        };
        // netboot.mac plus 64 more is one too many.
        assert_eq!(
            apply(&mut l, &c),
            Err(LabelChangeError::TooMany(MAX_LABELS + 1))
        );
        assert!(check_labels(&labels(&[("role", "db")])).is_ok());
        assert!(check_labels(&labels(&[("netboot.mac", "x")])).is_err());
        assert!(check_labels(&labels(&[("role", "a b")])).is_err());
    }
}

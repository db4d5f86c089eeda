//! Label selectors (`KEY=VALUE`) and the one matching rule that overlay networks, drive policies,
//! windows and rollouts share, and the name rule for operator-named things.

use std::collections::BTreeMap;

/// A `(key, value)` label selector.
pub type Selector = (String, String);

/// A selector that is not `KEY=VALUE` with a non-empty key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {0:?} is not KEY=VALUE")]
pub struct BadSelector(pub String);

/// Parses `KEY=VALUE`.
pub fn parse_selector(s: &str) -> Result<Selector, BadSelector> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(BadSelector(s.to_owned())),
    }
}

/// Whether the selector `key=value` matches a node's labels: the node has the label with that
/// value. The one matching rule for overlay networks, drive policies, windows and rollouts.
pub fn selector_matches(key: &str, value: &str, labels: &BTreeMap<String, String>) -> bool {
    labels.get(key).map(String::as_str) == Some(value)
}

/// A selector as `KEY=VALUE`.
pub fn selector_text((k, v): &Selector) -> String {
    format!("{k}={v}")
}

/// Whether `name` fits `[a-z0-9][a-z0-9-]{0,30}` (networks, windows).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=31).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

//! Picking events out of the event log as an operator reads it (`shoalctl events -o json`, see
//! [`Fleet::events`](crate::Fleet::events)): one JSON object per event with `seq`, `at`, `kind`,
//! `node` (absent for fleet-wide events) and `message`. A missing field reads as empty (0 for
//! `seq`), so a filter never fails on an event it does not care about.
//!
//! The in-process tests of `controller/tests` filter the admin API's typed event view instead;
//! their filters live in `controller/tests/common/harness.rs`.

use serde_json::Value;

/// The event's kind (`up`, `node_upgrade_started`…).
pub fn kind(e: &Value) -> &str {
    e["kind"].as_str().unwrap_or_default()
}

/// The id of the node the event is about; empty for fleet-wide events.
pub fn node(e: &Value) -> &str {
    e["node"].as_str().unwrap_or_default()
}

/// The event's sequence number.
pub fn seq(e: &Value) -> u64 {
    e["seq"].as_u64().unwrap_or_default()
}

/// The event's message.
pub fn message(e: &Value) -> &str {
    e["message"].as_str().unwrap_or_default()
}

/// Whether `e` is of `kind` and about `node`.
pub fn is(e: &Value, kind: &str, node: &str) -> bool {
    e["kind"] == kind && e["node"] == node
}

/// The kinds of `events`, in log order.
pub fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["kind"].as_str()).collect()
}

/// The sequence number of the newest event; 0 for an empty log.
pub fn last_seq(events: &[Value]) -> u64 {
    events.last().map(seq).unwrap_or_default()
}

/// The events about `node` after sequence number `after`, in log order.
pub fn of_node_after(events: Vec<Value>, node: &str, after: u64) -> Vec<Value> {
    events
        .into_iter()
        .filter(|e| e["node"] == node && seq(e) > after)
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn picks_by_kind_node_and_sequence() {
        let log = vec![
            json!({"seq": 1, "kind": "enrolled", "node": "n1", "message": "node n1 enrolled"}),
            json!({"seq": 2, "kind": "token_created", "message": "join token t created"}),
            json!({"seq": 3, "kind": "up", "node": "n1", "message": "node n1 up"}),
            json!({"seq": 4, "kind": "up", "node": "n2"}),
        ];
        assert_eq!(kinds(&log), ["enrolled", "token_created", "up", "up"]);
        assert!(is(&log[2], "up", "n1") && !is(&log[3], "up", "n1"));
        assert_eq!((node(&log[1]), message(&log[3])), ("", ""));
        assert_eq!(last_seq(&log), 4);
        assert_eq!(last_seq(&[]), 0);
        let after: Vec<u64> = of_node_after(log, "n1", 1).iter().map(seq).collect();
        assert_eq!(after, [3]);
    }
}

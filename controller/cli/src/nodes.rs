//! Nodes by name, labels, and label-selector filters: `nodes label`, the `-l SELECTOR` filters of
//! the list commands (the controller parses and matches the selector, `GET /v1/nodes?selector=`),
//! and naming a node by its hostname wherever a node id is taken.

use std::collections::BTreeSet;

use anyhow::bail;
use shoal_api::{
    nodes::{LabelNode, LabelsChanged, NodeView},
    AdminClient,
};

/// The node id `name` stands for: a node's id, or the hostname of exactly one node. A hostname
/// two nodes share is an error listing them; a name no node has is passed on as it is (the
/// controller answers for it: a removed node's certificates, a node not found).
pub fn resolve(client: &AdminClient, name: &str) -> anyhow::Result<String> {
    let nodes = client.nodes(None)?;
    resolve_in(&nodes, name)
}

/// [`resolve`] over a node list already fetched.
pub fn resolve_in(nodes: &[NodeView], name: &str) -> anyhow::Result<String> {
    if nodes.iter().any(|n| n.id == name) {
        return Ok(name.to_owned());
    }
    let by_host: Vec<&NodeView> = nodes.iter().filter(|n| n.hostname == name).collect();
    match by_host.as_slice() {
        [] => Ok(name.to_owned()),
        [one] => Ok(one.id.clone()),
        many => {
            let candidates: Vec<String> = many
                .iter()
                .map(|n| format!("{} ({}, {})", n.id, n.status, n.hardware_id))
                .collect();
            bail!(
                "hostname {name:?} is not unique; name the node by id: {}",
                candidates.join(", ")
            )
        }
    }
}

/// [`resolve`] for an optional name.
pub fn resolve_opt(client: &AdminClient, name: Option<String>) -> anyhow::Result<Option<String>> {
    name.map(|n| resolve(client, &n)).transpose()
}

/// The ids of the nodes `selector` matches (`None`: no filter).
pub fn matching(
    client: &AdminClient,
    selector: Option<&str>,
) -> anyhow::Result<Option<BTreeSet<String>>> {
    let Some(selector) = selector else {
        return Ok(None);
    };
    Ok(Some(
        client
            .nodes(Some(selector))?
            .into_iter()
            .map(|n| n.id)
            .collect(),
    ))
}

/// Whether a row about `node` passes the filter.
pub fn keep(filter: &Option<BTreeSet<String>>, node: &str) -> bool {
    filter.as_ref().is_none_or(|ids| ids.contains(node))
}

/// `KEY=VALUE` (set) or `KEY-` (remove), as `kubectl label` takes them.
pub fn parse_label_args(args: &[String]) -> anyhow::Result<LabelNode> {
    let mut req = LabelNode::default();
    for arg in args {
        if let Some((k, v)) = arg.split_once('=') {
            if req.set.insert(k.to_owned(), v.to_owned()).is_some() {
                bail!("label {k:?} is given twice");
            }
        } else if let Some(k) = arg.strip_suffix('-') {
            req.remove.push(k.to_owned());
        } else {
            bail!("{arg:?} is neither KEY=VALUE (set a label) nor KEY- (remove one)");
        }
    }
    if req.set.is_empty() && req.remove.is_empty() {
        bail!("name at least one KEY=VALUE or KEY-");
    }
    Ok(req)
}

/// `nodes label NODE KEY=VALUE... KEY-...`.
pub fn label(
    client: &AdminClient,
    node: &str,
    args: &[String],
    overwrite: bool,
) -> anyhow::Result<LabelsChanged> {
    let mut req = parse_label_args(args)?;
    req.overwrite = overwrite;
    let id = resolve(client, node)?;
    Ok(client.label_node(&id, &req)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(id: &str, hostname: &str) -> NodeView {
        NodeView {
            id: id.into(),
            hostname: hostname.into(),
            status: "up".into(),
            hardware_id: format!("dmi-uuid:{id}"),
            ..NodeView::default()
        }
    }

    #[test]
    fn hostnames_resolve_when_unique() {
        let nodes = [node("n1", "alpha"), node("n2", "beta"), node("n3", "beta")];
        assert_eq!(resolve_in(&nodes, "n2").unwrap(), "n2");
        assert_eq!(resolve_in(&nodes, "alpha").unwrap(), "n1");
        assert_eq!(resolve_in(&nodes, "gone").unwrap(), "gone");
        let err = resolve_in(&nodes, "beta").unwrap_err().to_string();
        assert_eq!(
            err,
            "hostname \"beta\" is not unique; name the node by id: n2 (up, dmi-uuid:n2), n3 (up, dmi-uuid:n3)"
        );
        // An id wins over another node's hostname.
        let nodes = [node("n1", "n2"), node("n2", "x")];
        assert_eq!(resolve_in(&nodes, "n2").unwrap(), "n2");
    }

    #[test]
    fn label_arguments_as_kubectl_takes_them() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let req = parse_label_args(&args(&["role=db", "zone-", "empty="])).unwrap();
        assert_eq!(
            req.set,
            BTreeMap::from([
                ("role".to_string(), "db".to_string()),
                ("empty".to_string(), String::new())
            ])
        );
        assert_eq!(req.remove, vec!["zone".to_string()]);
        assert!(parse_label_args(&args(&["role"])).is_err());
        assert!(parse_label_args(&args(&["a=1", "a=2"])).is_err());
        assert!(parse_label_args(&args(&[])).is_err());
    }
}

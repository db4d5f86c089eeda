//! `shoalctl controllers list`: the fleet's controllers, the leader, agents per controller, and
//! the etcd cluster's health.

use clap::Subcommand;
use shoal_api::{
    cluster::{ControllersView, CONTROLLERS_PATH},
    AdminClient,
};

use super::{printable::printable, Out};

#[derive(Debug, Subcommand)]
pub enum ControllersCmd {
    /// Every live controller: which leads, where agents reach it, agents connected; then each etcd
    /// endpoint and its health.
    List {},
}

pub fn controllers(client: &AdminClient, cmd: ControllersCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        ControllersCmd::List {} => {
            let view: ControllersView = client.get(CONTROLLERS_PATH)?;
            out.show(&view, || {
                out.table(
                    &[
                        "CONTROLLER",
                        "ROLE",
                        "AGENTS",
                        "AGENT ADDR",
                        "API",
                        "VERSION",
                        "STARTED",
                        "SEEN",
                    ],
                    view.controllers.iter().map(|c| {
                        vec![
                            printable(&c.id).into_owned(),
                            if c.leader { "leader" } else { "follower" }.into(),
                            c.agents.to_string(),
                            printable(&c.agent_addr).into_owned(),
                            printable(&c.api).into_owned(),
                            printable(&c.version).into_owned(),
                            c.started.clone(),
                            format!("{:.1}s ago", c.seen_ms_ago as f64 / 1000.0),
                        ]
                    }),
                );
                if view.etcd.is_empty() {
                    println!("\nstore: embedded (one controller)");
                } else {
                    println!();
                    out.table(
                        &[
                            "ETCD ENDPOINT",
                            "HEALTH",
                            "RAFT LEADER",
                            "VERSION",
                            "DB SIZE",
                            "ERROR",
                        ],
                        view.etcd.iter().map(|e| {
                            vec![
                                printable(&e.endpoint).into_owned(),
                                if e.healthy { "healthy" } else { "unreachable" }.into(),
                                if e.raft_leader { "yes" } else { "-" }.into(),
                                e.version
                                    .as_deref()
                                    .map(|v| printable(v).into_owned())
                                    .unwrap_or("-".into()),
                                e.db_size.map(|b| b.to_string()).unwrap_or("-".into()),
                                e.error
                                    .as_deref()
                                    .map(|v| printable(v).into_owned())
                                    .unwrap_or_default(),
                            ]
                        }),
                    );
                }
            })?;
        }
    }
    Ok(())
}

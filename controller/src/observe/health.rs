//! `/healthz` (the process answers) and `/readyz` (it can do its work: it is serving, its store
//! answers, and on etcd the cluster has a quorum). Plain text, no authentication: on the metrics
//! listener and on the admin API alike.

use axum::{extract::State, http::StatusCode, routing::get, Router};
use tracing::debug;

use crate::http::Ctl;

/// How long readiness waits for the store (and etcd) to answer.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// `/healthz` and `/readyz`, for any router over the controller.
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctl): State<Ctl>) -> (StatusCode, String) {
    match readiness(&ctl).await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => {
            debug!(cause = %why, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
        }
    }
}

/// Why the controller is not ready, if it is not.
pub async fn readiness(ctl: &Ctl) -> Result<(), String> {
    if !ctl.observe.serving() {
        return Err("the controller is not serving (starting or stopping)".into());
    }
    // A read through the store, off the async threads. On etcd the store answers stale reads while
    // quorum is lost, so the quorum is asked for below.
    let c = ctl.clone();
    let read = tokio::task::spawn_blocking(move || c.store.get_meta("observe_readiness_probe"));
    match tokio::time::timeout(READY_TIMEOUT, read).await {
        Err(_) => return Err(format!("the store did not answer within {READY_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("the store read failed: {e}")),
        Ok(Ok(Err(e))) => return Err(format!("the store is unavailable: {e}")),
        Ok(Ok(Ok(_))) => {}
    }
    if let Some(etcd) = &ctl.config.etcd {
        etcd_quorum(etcd).await?;
    }
    Ok(())
}

/// A linearizable read, which only an etcd cluster with a quorum (and a leader) can answer.
async fn etcd_quorum(config: &crate::etcd::EtcdConfig) -> Result<(), String> {
    let ask = async {
        let options = config
            .connect_options()
            .map_err(|e| e.to_string())?
            .with_require_leader(true);
        let mut client = crate::etcd::connect_with(config, options)
            .await
            .map_err(|e| e.to_string())?;
        client
            .get(format!("{}readiness", config.prefix), None)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(READY_TIMEOUT, ask).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("etcd has no quorum: {e}")),
        Err(_) => Err(format!(
            "etcd has no quorum: no answer within {READY_TIMEOUT:?} from {}",
            config.endpoints_text()
        )),
    }
}

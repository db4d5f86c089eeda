//! Maintenance routes of the admin API (behind the same bearer authentication):
//!
//! - `GET/POST /v1/windows`, `DELETE /v1/windows/{name}`;
//! - `GET/POST /v1/budgets`, `DELETE /v1/budgets/{selector}` (the selector as one percent-encoded path segment);
//! - `GET/POST /v1/rollouts`, `GET /v1/rollouts/{id}` (`current`: the newest unfinished one), `POST
//!   /v1/rollouts/{id}/pause|resume|abort`, `POST /v1/rollouts/{id}/retry` (body `{"node": ID}`). A
//!   maintenance run (`shoalctl maintenance run`) is a rollout whose body names an `action`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::{delete, get, post},
    Json, Router,
};
use shoal_proto::NodeId;

use shoal_api::maintenance::{
    BudgetView, CreateWindow, RetryNode, RolloutNodeView, RolloutView, SetBudget, StartRollout,
    WindowView,
};

use super::{MaintError, StartRequest};
use crate::server::Controller;
use shoal_controller_core::rollout::{
    Command, NodePhase, Rollout, RolloutError, RolloutState, SkipReason, Target, Waiting,
};
use shoal_controller_core::selector::{parse_selector, Selector};
use shoal_controller_core::time::rfc3339_ms as rfc3339;
use shoal_controller_core::windows::{Window, WindowError};

type Ctl = Arc<Controller>;

use crate::http::{blocking, HttpError as Failure};

impl From<MaintError> for Failure {
    fn from(e: MaintError) -> Self {
        use MaintError as E;
        let status = match &e {
            E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::UnknownWindow(_) | E::UnknownBudget(_) | E::UnknownRollout(_) => {
                StatusCode::NOT_FOUND
            }
            E::Rollout(RolloutError::UnknownNode(_)) => StatusCode::NOT_FOUND,
            E::WindowExists(_) | E::WindowInUse { .. } | E::Overlap { .. } | E::NoUpgrader(_) => {
                StatusCode::CONFLICT
            }
            E::Rollout(RolloutError::BadState { .. } | RolloutError::NotRetryable { .. }) => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Failure(status, e.to_string())
    }
}

impl From<WindowError> for Failure {
    fn from(e: WindowError) -> Self {
        MaintError::from(e).into()
    }
}

/// The routes; the caller adds authentication and state.
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/v1/windows", get(list_windows).post(create_window))
        .route("/v1/windows/{name}", delete(delete_window))
        .route("/v1/budgets", get(list_budgets).post(set_budget))
        .route("/v1/budgets/{selector}", delete(delete_budget))
        .route("/v1/rollouts", get(list_rollouts).post(start_rollout))
        .route("/v1/rollouts/{id}", get(show_rollout))
        .route("/v1/rollouts/{id}/pause", post(pause))
        .route("/v1/rollouts/{id}/resume", post(resume))
        .route("/v1/rollouts/{id}/abort", post(abort))
        .route("/v1/rollouts/{id}/retry", post(retry))
}

fn window_view(ctl: &Controller, w: &Window) -> WindowView {
    let now = ctl.maint.clock().now();
    let r = w.record();
    let open = w.is_open(now).is_some();
    let span = w.current_or_next(now);
    WindowView {
        name: r.name.clone(),
        schedule: r.schedule.clone(),
        duration_secs: r.duration_secs,
        tz: r.tz.clone(),
        selector: w.selector_text(),
        open,
        opens_at: span.map(|(a, _)| rfc3339(a.0)),
        closes_at: span.map(|(_, b)| rfc3339(b.0)),
    }
}

async fn list_windows(State(ctl): State<Ctl>) -> Result<Json<Vec<WindowView>>, Failure> {
    blocking(move || {
        Ok(Json(
            ctl.maint
                .windows()?
                .iter()
                .map(|w| window_view(&ctl, w))
                .collect(),
        ))
    })
    .await
}

async fn create_window(
    State(ctl): State<Ctl>,
    Json(req): Json<CreateWindow>,
) -> Result<Json<WindowView>, Failure> {
    blocking(move || {
        let w = Window::new(
            &req.name,
            &req.schedule,
            Duration::from_secs(req.duration_secs),
            req.tz.as_deref(),
            req.selector.as_deref(),
        )?;
        ctl.maint.create_window(&w, ctl.maint.clock().now())?;
        Ok(Json(window_view(&ctl, &w)))
    })
    .await
}

async fn delete_window(
    State(ctl): State<Ctl>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    blocking(move || {
        ctl.maint.delete_window(&name, ctl.maint.clock().now())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

fn budget_views(ctl: &Controller) -> Result<Vec<BudgetView>, Failure> {
    let nodes = ctl.store.nodes()?;
    Ok(ctl
        .maint
        .budgets()?
        .iter()
        .map(|b| BudgetView {
            selector: b.selector.to_string(),
            max_unavailable: b.max_unavailable,
            nodes: nodes
                .iter()
                .filter(|n| b.selector.matches(&n.labels))
                .count(),
        })
        .collect())
}

async fn list_budgets(State(ctl): State<Ctl>) -> Result<Json<Vec<BudgetView>>, Failure> {
    blocking(move || Ok(Json(budget_views(&ctl)?))).await
}

async fn set_budget(
    State(ctl): State<Ctl>,
    Json(req): Json<SetBudget>,
) -> Result<Json<BudgetView>, Failure> {
    blocking(move || {
        let b =
            ctl.maint
                .set_budget(&req.selector, req.max_unavailable, ctl.maint.clock().now())?;
        let key = b.selector.to_string();
        budget_views(&ctl)?
            .into_iter()
            .find(|v| v.selector == key)
            .map(Json)
            .ok_or_else(|| Failure(StatusCode::INTERNAL_SERVER_ERROR, "budget vanished".into()))
    })
    .await
}

async fn delete_budget(
    State(ctl): State<Ctl>,
    Path(selector): Path<String>,
) -> Result<StatusCode, Failure> {
    blocking(move || {
        ctl.maint
            .delete_budget(&selector, ctl.maint.clock().now())?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// One line per reason the rollout is waiting.
pub fn waiting_text(w: &Waiting) -> String {
    match w {
        Waiting::WindowClosed => "window closed".into(),
        Waiting::WindowClosing { closes_at } => format!(
            "window closes at {}, too soon to start a node",
            rfc3339(closes_at.0)
        ),
        Waiting::MaxUnavailable { unavailable } => {
            format!("{unavailable} node(s) unavailable: at max-unavailable")
        }
        Waiting::Budget {
            selector,
            unavailable,
            max,
        } => format!("budget {selector}: {unavailable} of at most {max} unavailable"),
        Waiting::NodesUnavailable { nodes } => {
            format!(
                "pending nodes down or busy: {}",
                nodes
                    .iter()
                    .map(|n| n.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

/// The API's view of a rollout.
pub fn rollout_view(r: &Rollout, hostnames: &BTreeMap<NodeId, String>) -> RolloutView {
    let spec = r.spec();
    let state = r.state().as_str();
    let reason = match r.state() {
        RolloutState::Paused { reason, .. } => Some(reason.to_string()),
        _ => None,
    };
    let nodes = r
        .nodes()
        .iter()
        .map(|(n, p)| {
            let (since, deadline, detail) = match p {
                NodePhase::Pending => (None, None, None),
                NodePhase::Upgrading {
                    since,
                    deadline,
                    from,
                    acknowledged,
                } => (
                    Some(*since),
                    Some(*deadline),
                    Some(format!(
                        "from {}{}",
                        from.as_deref().unwrap_or("unknown"),
                        if *acknowledged {
                            ""
                        } else {
                            ", not acknowledged"
                        }
                    )),
                ),
                NodePhase::Succeeded { at, already } => (
                    Some(*at),
                    None,
                    already.then(|| "already on the target".to_owned()),
                ),
                NodePhase::RollingBack {
                    since,
                    deadline,
                    to,
                    failure,
                } => (
                    Some(*since),
                    Some(*deadline),
                    Some(format!(
                        "{failure}; back to {}",
                        to.as_deref().unwrap_or("previous version")
                    )),
                ),
                NodePhase::Failed {
                    at,
                    failure,
                    rolled_back,
                } => (
                    Some(*at),
                    None,
                    Some(format!(
                        "{failure}{}",
                        if *rolled_back {
                            "; rolled back"
                        } else {
                            "; NOT rolled back: needs an operator"
                        }
                    )),
                ),
                NodePhase::Skipped { reason } => (
                    None,
                    None,
                    Some(match reason {
                        SkipReason::FailedBefore => {
                            "this version failed here before: upgrade retry NODE".to_owned()
                        }
                        SkipReason::Removed => "left the fleet".to_owned(),
                        #[allow(unreachable_patterns)]
                        other => format!("{other:?}"),
                    }),
                ),
                #[allow(unreachable_patterns)]
                _ => (None, None, None),
            };
            RolloutNodeView {
                node: n.0.clone(),
                hostname: hostnames.get(n).cloned(),
                phase: p.as_str().to_owned(),
                since: since.map(|t| rfc3339(t.0)),
                deadline: deadline.map(|t| rfc3339(t.0)),
                detail,
                step: None,
                output: None,
            }
        })
        .collect();
    RolloutView {
        id: r.id().to_owned(),
        target: spec.target.to_string(),
        state: state.to_owned(),
        reason,
        finished: r.is_finished(),
        created_at: rfc3339(r.created_at().0),
        selector: spec.selector.as_ref().map(Selector::to_string),
        window: spec.window.clone(),
        max_unavailable: spec.max_unavailable,
        max_failures: spec.max_failures,
        allow_downgrade: r.allow_downgrade(),
        progress: r.progress(),
        waiting: r.waiting().iter().map(waiting_text).collect(),
        nodes,
    }
}

/// [`rollout_view`] with the maintenance sub-phase of every node of an action run.
pub fn full_view(
    ctl: &Controller,
    r: &Rollout,
    hostnames: &BTreeMap<NodeId, String>,
) -> Result<RolloutView, crate::store::StoreError> {
    let mut view = rollout_view(r, hostnames);
    if matches!(r.spec().target, Target::Action(_)) {
        let steps = ctl.step_records(r.id())?;
        for n in view.nodes.iter_mut() {
            if let Some(rec) = steps.iter().find(|s| s.node.0 == n.node) {
                n.step = Some(rec.sub_phase().to_owned());
                n.output = Some(rec.detail.clone()).filter(|d| !d.is_empty());
            }
        }
    }
    Ok(view)
}

fn hostnames(ctl: &Controller) -> Result<BTreeMap<NodeId, String>, Failure> {
    Ok(ctl
        .store
        .nodes()?
        .into_iter()
        .map(|n| (n.id, n.hostname))
        .collect())
}

pub(crate) async fn list_rollouts(
    State(ctl): State<Ctl>,
) -> Result<Json<Vec<RolloutView>>, Failure> {
    blocking(move || {
        let names = hostnames(&ctl)?;
        Ok(Json(
            ctl.maint
                .rollouts()?
                .iter()
                .map(|r| full_view(&ctl, r, &names))
                .collect::<Result<_, _>>()?,
        ))
    })
    .await
}

async fn show_rollout(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, Failure> {
    blocking(move || {
        let r = ctl.maint.rollout(&id)?;
        Ok(Json(full_view(&ctl, &r, &hostnames(&ctl)?)?))
    })
    .await
}

async fn start_rollout(
    State(ctl): State<Ctl>,
    Json(req): Json<StartRollout>,
) -> Result<Json<RolloutView>, Failure> {
    blocking(move || {
        let target = match (req.agent, req.image, req.action) {
            (Some(v), None, None) if !v.trim().is_empty() => Target::Agent(v.trim().to_owned()),
            (None, Some(v), None) if !v.trim().is_empty() => Target::Image(v.trim().to_owned()),
            (None, None, Some(a)) => Target::Action(a),
            _ => return Err(MaintError::Target.into()),
        };
        let selector = req
            .selector
            .map(|s| parse_selector(&s).map_err(MaintError::from))
            .transpose()?;
        let r = ctl.start_rollout(StartRequest {
            target,
            selector,
            max_unavailable: req.max_unavailable.unwrap_or(1),
            max_failures: req.max_failures.unwrap_or(1),
            window: req.window,
            upgrade_deadline: req.deadline_secs.map(Duration::from_secs),
            allow_downgrade: req.allow_downgrade,
        })?;
        Ok(Json(full_view(&ctl, &r, &hostnames(&ctl)?)?))
    })
    .await
}

async fn command(ctl: Ctl, id: String, c: Command) -> Result<Json<RolloutView>, Failure> {
    blocking(move || {
        let r = ctl.rollout_command(&id, c)?;
        Ok(Json(full_view(&ctl, &r, &hostnames(&ctl)?)?))
    })
    .await
}

async fn pause(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, Failure> {
    command(ctl, id, Command::Pause).await
}

async fn resume(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, Failure> {
    command(ctl, id, Command::Resume).await
}

async fn abort(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, Failure> {
    command(ctl, id, Command::Abort).await
}

async fn retry(
    State(ctl): State<Ctl>,
    Path(id): Path<String>,
    Json(req): Json<RetryNode>,
) -> Result<Json<RolloutView>, Failure> {
    command(ctl, id, Command::Retry(NodeId(req.node))).await
}

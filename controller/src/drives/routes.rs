//! The admin API's routes for drives, drive commands and drive policies.

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use shoal_proto::NodeId;

use crate::{
    drives::hub::{DriveRequest, PolicyError},
    server::now_ms,
};
use shoal_api::drives::DriveCommandView;
use shoal_api::drives::DrivePolicies;
use shoal_api::drives::DrivePolicyView;
use shoal_api::drives::DriveView;
use shoal_api::drives::EffectivePolicyView;
use shoal_api::drives::SelfTestRequest;
use shoal_api::drives::SetDrivePolicy;
use shoal_api::networks::MemberSpec;
use shoal_controller_core::drives::fleet::{CommandError, PrepareRequest};
use shoal_controller_core::drives::policy::{PolicyRecord, PolicyTarget};
use shoal_controller_core::selector::parse_selector;
use shoal_controller_core::time::rfc3339_ms as rfc3339;

use crate::http::{blocking, Ctl, HttpError};

/// This domain's admin routes (the router adds authentication).
pub fn routes() -> Router<Ctl> {
    Router::new()
        .route("/v1/drives", get(list_drives))
        .route(
            "/v1/drives/{node}/{device}/prepare",
            axum::routing::post(prepare_drive),
        )
        .route(
            "/v1/drives/{node}/{device}/self-test",
            axum::routing::post(self_test_drive),
        )
        .route(
            "/v1/drive-policies",
            get(list_drive_policies)
                .post(set_drive_policy)
                .delete(delete_drive_policy),
        )
}

impl From<CommandError> for HttpError {
    fn from(e: CommandError) -> Self {
        use CommandError as E;
        let status = match &e {
            E::UnknownNode(_) | E::UnknownDrive { .. } => StatusCode::NOT_FOUND,
            E::ForceNeedsSerial => StatusCode::BAD_REQUEST,
            E::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            E::Disconnected { .. } | E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Agent { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::CONFLICT,
        };
        HttpError(status, e.to_string())
    }
}

impl From<PolicyError> for HttpError {
    fn from(e: PolicyError) -> Self {
        use PolicyError as E;
        let status = match &e {
            E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::UnknownNode(_) | E::NoPolicy(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        HttpError(status, e.to_string())
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct DriveQuery {
    pub(crate) node: Option<String>,
}

pub(crate) async fn list_drives(
    State(ctl): State<Ctl>,
    Query(q): Query<DriveQuery>,
) -> Result<Json<Vec<DriveView>>, HttpError> {
    blocking(move || {
        let only = q.node.map(NodeId);
        if let Some(node) = &only {
            if ctl.store.node(node)?.is_none() {
                return Err(HttpError::from(CommandError::UnknownNode(node.clone())));
            }
        }
        Ok(Json(ctl.drives.views(only.as_ref())))
    })
    .await
}

/// A device as the operator typed it: `sdb` or `/dev/sdb`.
pub(crate) fn device_name(device: &str) -> String {
    device.strip_prefix("/dev/").unwrap_or(device).to_owned()
}

pub(crate) async fn prepare_drive(
    State(ctl): State<Ctl>,
    Path((node, device)): Path<(String, String)>,
    Json(req): Json<PrepareRequest>,
) -> Result<Json<DriveCommandView>, HttpError> {
    Ok(Json(
        ctl.drive_command(
            NodeId(node),
            device_name(&device),
            DriveRequest::Prepare(req),
        )
        .await?,
    ))
}

pub(crate) async fn self_test_drive(
    State(ctl): State<Ctl>,
    Path((node, device)): Path<(String, String)>,
    Json(req): Json<SelfTestRequest>,
) -> Result<Json<DriveCommandView>, HttpError> {
    let kind = match req.kind.as_str() {
        "short" => shoal_proto::SelfTestKind::Short,
        "long" => shoal_proto::SelfTestKind::Long,
        other => {
            return Err(HttpError(
                StatusCode::BAD_REQUEST,
                format!("unknown self-test {other:?}: short or long"),
            ))
        }
    };
    Ok(Json(
        ctl.drive_command(
            NodeId(node),
            device_name(&device),
            DriveRequest::SelfTest(kind),
        )
        .await?,
    ))
}

pub(crate) fn policy_view(p: &PolicyRecord) -> DrivePolicyView {
    let (node, selector) = match &p.target {
        PolicyTarget::Node(n) => (Some(n.0.clone()), None),
        PolicyTarget::Selector(s) => (None, Some(s.to_string())),
    };
    DrivePolicyView {
        node,
        selector,
        mode: p.policy.mode.to_string(),
        filesystem: p.policy.filesystem.to_string(),
        set_at: rfc3339(p.set_at.0),
    }
}

pub(crate) fn policy_target(
    node: Option<String>,
    selector: Option<String>,
) -> Result<PolicyTarget, PolicyError> {
    match (node, selector) {
        (Some(n), None) => Ok(PolicyTarget::Node(NodeId(n))),
        (None, Some(s)) => Ok(PolicyTarget::Selector(parse_selector(&s)?)),
        _ => Err(PolicyError::Target),
    }
}

pub(crate) async fn list_drive_policies(
    State(ctl): State<Ctl>,
) -> Result<Json<DrivePolicies>, HttpError> {
    blocking(move || {
        let policies = ctl.drives.policies()?;
        let effective = ctl
            .store
            .nodes()?
            .iter()
            .map(|n| {
                let (policy, source) = ctl.effective_drive_policy(n, &policies);
                EffectivePolicyView {
                    node: n.id.0.clone(),
                    hostname: n.hostname.clone(),
                    mode: policy.mode.to_string(),
                    filesystem: policy.filesystem.to_string(),
                    source: source.to_string(),
                }
            })
            .collect();
        Ok(Json(DrivePolicies {
            policies: policies.iter().map(policy_view).collect(),
            effective,
        }))
    })
    .await
}

pub(crate) async fn set_drive_policy(
    State(ctl): State<Ctl>,
    Json(req): Json<SetDrivePolicy>,
) -> Result<Json<DrivePolicyView>, HttpError> {
    blocking(move || {
        let target = policy_target(req.node, req.selector)?;
        let mode = req.mode.parse().map_err(PolicyError::BadMode)?;
        let filesystem = match req.filesystem {
            Some(f) => f.parse().map_err(PolicyError::BadFilesystem)?,
            None => shoal_proto::Filesystem::default(),
        };
        let rec = PolicyRecord {
            target,
            policy: shoal_proto::DrivePolicy { mode, filesystem },
            set_at: now_ms(),
        };
        ctl.drives.set_policy(&rec)?;
        ctl.drive_policies_changed(None);
        Ok(Json(policy_view(&rec)))
    })
    .await
}

pub(crate) async fn delete_drive_policy(
    State(ctl): State<Ctl>,
    Query(spec): Query<MemberSpec>,
) -> Result<Json<DrivePolicyView>, HttpError> {
    blocking(move || {
        let target = policy_target(spec.node, spec.selector)?;
        let old = ctl.drives.delete_policy(&target, now_ms())?;
        ctl.drive_policies_changed(None);
        Ok(Json(policy_view(&old)))
    })
    .await
}

//! `POST /v1/controller/backup`: the encrypted archive of the controller's state, over the
//! authenticated admin connection. The passphrase comes in the JSON body ([`BackupRequest`]); the
//! answer is the archive's bytes.

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::post,
    Json, Router,
};
use shoal_api::dr::{check_passphrase, BackupRequest, BACKUP_PATH};
use tracing::info;

use super::{archive::ArchiveError, snapshot::SnapshotError};
use crate::http::{blocking, Ctl, HttpError};

/// One backup at a time: scrypt takes some 256 MiB while it runs.
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// The route.
pub fn routes() -> Router<Ctl> {
    Router::new().route(BACKUP_PATH, post(backup))
}

impl From<SnapshotError> for HttpError {
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::Archive(ArchiveError::WeakPassphrase(m)) => {
                HttpError(StatusCode::BAD_REQUEST, m)
            }
            SnapshotError::Archive(ArchiveError::TooLarge { .. }) => {
                HttpError(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
            SnapshotError::Store(e) => HttpError::from(e),
            other => HttpError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

async fn backup(
    State(ctl): State<Ctl>,
    Json(req): Json<BackupRequest>,
) -> Result<impl IntoResponse, HttpError> {
    check_passphrase(&req.passphrase).map_err(|m| HttpError(StatusCode::BAD_REQUEST, m))?;
    let _running = RUNNING.try_acquire().map_err(|_| {
        HttpError(
            StatusCode::TOO_MANY_REQUESTS,
            "a backup is already being taken; try again when it is done".into(),
        )
    })?;
    let bytes =
        blocking(move || Ok(super::snapshot::snapshot_archive(&ctl, &req.passphrase)?)).await?;
    info!(bytes = bytes.len(), "controller backup handed out");
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

//! What every admin route shares, whatever its domain: the error it answers with, its state, and
//! running store work off the async threads. A leaf: it knows no domain.

use std::sync::Arc;

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use shoal_api::error::ApiError;
use tracing::warn;

use crate::{server::Controller, store::StoreError};

pub(crate) type Ctl = Arc<Controller>;

/// An API failure with its HTTP status: every admin route module answers with it (each adds `From`
/// impls for its own errors).
#[derive(Debug)]
pub struct HttpError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        warn!(cause = %e, "admin request failed in the store");
        HttpError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

pub(crate) fn not_found(what: &str) -> HttpError {
    HttpError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HttpError> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

//! `/healthz` (the process is up), `/readyz` (the database answers), `/metrics`,
//! `/v1/openapi.json`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::server::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/v1/openapi.json",
            get(|| async { Json(crate::server::openapi::openapi()) }),
        )
}

async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    // The cause goes to the log, not to the caller: this route is open to anyone who
    // can reach the port, and the database's error names its user, host and port.
    state.store.ping().await.map_err(|e| {
        tracing::warn!("readiness: the database does not answer: {e}");
        ApiError::Unavailable("the database does not answer".into())
    })?;
    Ok(Json(json!({ "status": "ready" })))
}

async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = state.store.count_jobs_by_state().await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&counts),
    ))
}

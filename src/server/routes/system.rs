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
        .route("/v1/openapi.json", get(|| async { Json(openapi()) }))
}

async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("database: {e}")))?;
    Ok(Json(json!({ "status": "ready" })))
}

async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = state.store.count_jobs_by_state().await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&counts),
    ))
}

/// A hand-written description of the API; kept next to the routes it describes.
pub fn openapi() -> serde_json::Value {
    let problem = json!({ "description": "problem document", "content": { "application/problem+json": {
        "schema": { "$ref": "#/components/schemas/Problem" } } } });
    let job = json!({ "description": "the job", "content": { "application/json": {
        "schema": { "$ref": "#/components/schemas/Job" } } } });
    let id = json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } }]);
    json!({
        "openapi": "3.1.0",
        "info": { "title": "bdscan", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Finds and removes backdoors in neural networks." },
        "paths": {
            "/v1/blobs": { "post": {
                "summary": "Upload a file (raw body or multipart); stored by sha256, deduplicated",
                "requestBody": { "content": { "application/octet-stream": {}, "multipart/form-data": {} } },
                "responses": { "201": { "description": "stored" }, "200": { "description": "already stored" },
                               "400": problem, "413": problem } } },
            "/v1/blobs/{sha256}": { "get": { "summary": "Blob size", "responses": { "200": { "description": "blob" }, "404": problem } } },
            "/v1/jobs": {
                "post": { "summary": "Queue a scan of uploaded blobs; honours Idempotency-Key",
                          "requestBody": { "content": { "application/json": { "schema": { "$ref": "#/components/schemas/JobRequest" } } } },
                          "responses": { "202": job, "200": job, "400": problem, "409": problem, "422": problem } },
                "get": { "summary": "List jobs, newest first",
                         "parameters": [
                            { "name": "state", "in": "query", "schema": { "type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"] } },
                            { "name": "cursor", "in": "query", "schema": { "type": "string" } },
                            { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 500 } } ],
                         "responses": { "200": { "description": "{jobs, next_cursor}" }, "400": problem } } },
            "/v1/jobs/{id}": {
                "get": { "parameters": id, "responses": { "200": job, "404": problem } },
                "delete": { "summary": "Cancel an active job; delete a finished one and the blobs nothing else uses", "parameters": id, "responses": { "200": job, "202": job, "204": { "description": "deleted" }, "404": problem } } },
            "/v1/jobs/{id}/report": { "get": { "parameters": id, "responses": { "200": { "description": "the scan report (JSON)" }, "409": problem } } },
            "/v1/jobs/{id}/report.html": { "get": { "parameters": id, "responses": { "200": { "description": "the report as a page" }, "409": problem } } },
            "/v1/jobs/{id}/artifact": { "get": { "summary": "The purified TorchScript model; supports Range",
                "parameters": id, "responses": { "200": { "description": "model" }, "206": { "description": "part" }, "409": problem, "416": problem } } },
            "/v1/scans": { "post": { "summary": "One-shot audit: multipart model, clean, test?, poison?, target_label?, config?",
                "parameters": [ { "name": "wait", "in": "query", "schema": { "type": "integer", "maximum": 600 } } ],
                "responses": { "200": job, "202": job, "400": problem, "413": problem, "422": problem } } },
            "/healthz": { "get": { "responses": { "200": { "description": "up" } } } },
            "/readyz": { "get": { "responses": { "200": { "description": "ready" }, "503": problem } } },
            "/metrics": { "get": { "responses": { "200": { "description": "Prometheus text" } } } }
        },
        "components": { "schemas": {
            "Problem": { "type": "object", "required": ["type", "title", "status", "code", "detail"], "properties": {
                "type": { "type": "string" }, "title": { "type": "string" }, "status": { "type": "integer" },
                "code": { "type": "string" }, "detail": { "type": "string" } } },
            "JobRequest": { "type": "object", "required": ["model", "clean"], "properties": {
                "model": { "type": "string" }, "clean": { "type": "string" }, "test": { "type": "string" },
                "poison": { "type": "string" }, "target_label": { "type": "integer" }, "config": { "type": "object" },
                "max_attempts": { "type": "integer" } } },
            "Job": { "type": "object", "properties": {
                "id": { "type": "string" }, "state": { "type": "string" }, "progress": { "type": "object" },
                "error": { "type": ["object", "null"] }, "links": { "type": "object" } } }
        } }
    })
}

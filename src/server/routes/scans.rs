//! `POST /v1/scans`: the one-shot audit. A multipart form with the files themselves
//! (`model`, `clean`, optional `test`, `poison`) and fields `target_label`, `config`;
//! `?wait=N` holds the response up to N seconds for the job to finish.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;

use super::blobs::{
    budgeted_multipart, field_stream, multipart_limit, store_upload, FramingBudget,
};
use super::jobs::{
    check_config, idempotency_key, job_response, refuse_if_queue_full, submit_job, JobRequest,
};
use crate::server::config::ServerConfig;
use crate::server::error::AppQuery;
use crate::server::{ApiError, AppState};
use crate::store::Job;

/// The longest a client may ask to wait.
const MAX_WAIT_SECS: u64 = 600;
const WAIT_POLL: Duration = Duration::from_millis(200);
/// Text fields are small; this bounds what is buffered for them.
const MAX_TEXT_FIELD: usize = 64 * 1024;

pub fn router(config: &ServerConfig) -> Router<AppState> {
    Router::new()
        .route("/v1/scans", post(scan))
        .layer(DefaultBodyLimit::max(multipart_limit(
            config.max_blob_bytes,
            4,
        )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanQuery {
    wait: Option<u64>,
}

async fn scan(
    State(state): State<AppState>,
    AppQuery(query): AppQuery<ScanQuery>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let (mut multipart, framing) = budgeted_multipart(request, &state).await?;
    // Blobs this request stored for the first time: a request that then fails leaves
    // them to no job, so they go with it, unless another client sent the same bytes
    // meanwhile (for a job of its own).
    let mut stored_here = Vec::new();
    let submitted = submit_form(&state, &mut multipart, &framing, key, &mut stored_here).await;
    let mut job = match submitted {
        Ok(job) => job,
        Err(e) => {
            for sha in &stored_here {
                if let Err(free) = state.store.free_blob_unless_resent(sha).await {
                    tracing::warn!(blob = %sha, "freeing an upload of a refused scan: {free}");
                }
            }
            return Err(e);
        }
    };
    let wait = Duration::from_secs(query.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let deadline = tokio::time::Instant::now() + wait;
    // Ends at the deadline, or at once when the service shuts down (a 202 then).
    while !job.state.is_terminal() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(WAIT_POLL) => {}
            _ = state.shutdown.cancelled() => break,
        }
        job = state
            .store
            .job(&job.id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("job {}", job.id)))?;
    }
    let status = if job.state.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(job_response(status, &job))
}

/// Reads the form, storing its files as they stream in (recording in `stored_here` the
/// blobs that were new), and submits the job it describes.
async fn submit_form(
    state: &AppState,
    multipart: &mut Multipart,
    framing: &FramingBudget,
    key: Option<String>,
    stored_here: &mut Vec<String>,
) -> Result<Job, ApiError> {
    // What can be refused without the files is refused before they are received.
    refuse_if_queue_full(state, key.as_deref()).await?;
    let mut files: [Option<String>; 4] = Default::default();
    let mut target_label = None;
    let mut config = None;
    while let Some(mut field) = multipart.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        let slot = ["model", "clean", "test", "poison"]
            .iter()
            .position(|n| *n == name);
        let given_twice =
            || ApiError::bad_request("duplicate_field", format!("`{name}` given twice"));
        if let Some(slot) = slot {
            if files[slot].is_some() {
                return Err(given_twice());
            }
            let blob =
                store_upload(state, field_stream(field, framing), &format!("`{name}`")).await?;
            if blob.created == Some(true) {
                stored_here.push(blob.sha256.clone());
            }
            files[slot] = Some(blob.sha256);
            continue;
        }
        let mut text = Vec::new();
        while let Some(chunk) = field.chunk().await? {
            text.extend_from_slice(&chunk);
            if text.len() > MAX_TEXT_FIELD {
                return Err(ApiError::TooLarge(format!(
                    "`{name}` exceeds {MAX_TEXT_FIELD} bytes"
                )));
            }
        }
        let text = String::from_utf8(text).map_err(|_| {
            ApiError::bad_request("invalid_field", format!("`{name}` is not UTF-8"))
        })?;
        match name.as_str() {
            "target_label" => {
                if target_label.is_some() {
                    return Err(given_twice());
                }
                let label = text.trim().parse::<i64>().map_err(|_| {
                    ApiError::unprocessable("invalid_request", format!("`target_label` must be an integer, got `{}`", text.trim()))
                })?;
                target_label = Some(label);
            }
            "config" => {
                if config.is_some() {
                    return Err(given_twice());
                }
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| ApiError::unprocessable("invalid_config", format!("config is not JSON: {e}")))?;
                check_config(state, &value)?;
                config = Some(value);
            }
            other => {
                return Err(ApiError::bad_request(
                    "unknown_field",
                    format!("unknown form field `{other}` (model, clean, test, poison, target_label, config)"),
                ))
            }
        }
    }
    let [model, clean, test, poison] = files;
    let missing = |name: &str| {
        ApiError::unprocessable("missing_field", format!("the form needs a `{name}` file"))
    };
    let request = JobRequest {
        model: model.ok_or_else(|| missing("model"))?,
        clean: clean.ok_or_else(|| missing("clean"))?,
        test,
        poison,
        target_label,
        config,
        max_attempts: None,
    };
    let (job, _) = submit_job(state, request, key).await?;
    Ok(job)
}

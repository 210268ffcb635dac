//! `/v1/jobs`: submit (idempotent), list, inspect, cancel or delete, and read a finished
//! job's report, report page and purified model.

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::engine::{ScanConfig, ScanReport};
use crate::server::error::{AppJson, AppPath, AppQuery};
use crate::server::view::JobView;
use crate::server::{device_name, html, parse_device, ApiError, AppState};
use crate::store::{CreateOutcome, Job, JobState, NewJob};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", get(list).post(submit))
        .route("/v1/jobs/{id}", get(show).delete(delete_job))
        .route("/v1/jobs/{id}/report", get(report))
        .route("/v1/jobs/{id}/report.html", get(report_page))
        .route("/v1/jobs/{id}/artifact", get(artifact))
}

/// The body of `POST /v1/jobs`: blobs by sha256, plus how to scan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub model: String,
    pub clean: String,
    #[serde(default)]
    pub test: Option<String>,
    #[serde(default)]
    pub poison: Option<String>,
    #[serde(default)]
    pub target_label: Option<i64>,
    /// Any subset of the scan settings; the rest take their defaults.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    #[serde(default)]
    pub max_attempts: Option<i64>,
}

async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(body): AppJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    // serde takes a JSON array for a struct too (fields by position): refuse it.
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object (JobRequest in /v1/openapi.json)",
        ));
    }
    let request: JobRequest = serde_json::from_value(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!("Failed to deserialize the JSON body into the target type: {e}"),
        )
    })?;
    let (job, created) = submit_job(&state, request, key).await?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(job_response(status, &job))
}

pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255);
    key.map(|k| Some(k.to_string())).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible characters",
        )
    })
}

/// Validates a request and queues it. Returns the job and whether it is new (an
/// idempotency key seen before returns the earlier job).
pub async fn submit_job(
    state: &AppState,
    request: JobRequest,
    key: Option<String>,
) -> Result<(Job, bool), ApiError> {
    let config = parse_config(request.config.as_ref())?;
    // A poison bundle without `target_label` is valid when it carries per-sample
    // `targets` (all-to-all); the job checks that once it has read the bundle.
    if request.target_label.is_some() && request.poison.is_none() {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "`target_label` needs a `poison` bundle",
        ));
    }
    let max_attempts = request
        .max_attempts
        .unwrap_or(state.config.worker.default_max_attempts);
    if !(1..=100).contains(&max_attempts) {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "`max_attempts` must lie in 1..=100",
        ));
    }
    let mut blobs = Vec::new();
    for (role, sha) in [
        ("model", Some(&request.model)),
        ("clean", Some(&request.clean)),
        ("test", request.test.as_ref()),
        ("poison", request.poison.as_ref()),
    ] {
        blobs.push(match sha {
            Some(sha) => Some(existing_blob(state, role, sha).await?),
            None => None,
        });
    }
    let device = requested_device(state, request.config.as_ref())?;
    let config_json = serde_json::to_string(&config).map_err(ApiError::internal)?;
    let fingerprint = key.as_ref().map(|_| {
        let mut canonical =
            serde_json::json!([blobs, request.target_label, config_json, max_attempts]);
        // The config always holds a device ("cpu" by default), so whether the client
        // pinned one counts separately; left out when none was, as before it counted.
        if let (Some(device), Some(fields)) = (&device, canonical.as_array_mut()) {
            fields.push(serde_json::json!(device));
        }
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    });
    refuse_if_queue_full(state, key.as_deref()).await?;
    let [model, clean, test, poison] = <[Option<String>; 4]>::try_from(blobs)
        .map_err(|_| ApiError::internal(anyhow::anyhow!("four roles")))?;
    let new = NewJob {
        model_sha256: model.unwrap_or_default(),
        clean_sha256: clean.unwrap_or_default(),
        test_sha256: test,
        poison_sha256: poison,
        target_label: request.target_label,
        config: config_json,
        max_attempts,
        idempotency_key: key,
        idempotency_fingerprint: fingerprint,
        device,
    };
    let outcome = state.store.create_job(&new).await.map_err(|e| {
        if e.is_foreign_key_violation() {
            // A blob checked above was freed by a job deletion in the meantime.
            ApiError::unprocessable(
                "unknown_blob",
                "an input blob was deleted while the job was being created; upload it again",
            )
        } else {
            e.into()
        }
    })?;
    match outcome {
        CreateOutcome::Created(job) => {
            state.metrics.jobs_submitted.fetch_add(1, Ordering::Relaxed);
            if job.device.is_some() {
                // Only some slots may take it: let all idle ones look.
                state.wake.notify_waiters();
            }
            state.wake.notify_one();
            Ok((job, true))
        }
        CreateOutcome::Existing(job) => Ok((job, false)),
        CreateOutcome::KeyReused(job) => Err(ApiError::Conflict {
            code: "idempotency_key_reused",
            message: format!(
                "this Idempotency-Key was used for job {} with a different request",
                job.id
            ),
        }),
    }
}

/// 503 when `max_queued_jobs` jobs wait already, unless `key` names a job created
/// before: a replay finds its job even while the queue is full.
pub async fn refuse_if_queue_full(state: &AppState, key: Option<&str>) -> Result<(), ApiError> {
    let Some(max) = state.config.max_queued_jobs else {
        return Ok(());
    };
    let replay = match key {
        Some(key) => state.store.job_with_idempotency_key(key).await?.is_some(),
        None => false,
    };
    if !replay && state.store.queued_jobs().await? >= max {
        let jobs = if max == 1 { "job is" } else { "jobs are" };
        return Err(ApiError::QueueFull(format!(
            "{max} {jobs} already waiting (max_queued_jobs); try again later"
        )));
    }
    Ok(())
}

/// Refuses a config a job could not run with (as `POST /v1/jobs` would), before any
/// file of a scan request is received.
pub fn check_config(state: &AppState, config: &serde_json::Value) -> Result<(), ApiError> {
    parse_config(Some(config))?;
    requested_device(state, Some(config))?;
    Ok(())
}

/// The device a job's config names explicitly (`None` when it names none: any slot may
/// run it). A server with worker slots refuses a device none of them has; an API-only
/// server cannot know the other replicas' slots and queues the job for them.
fn requested_device(
    state: &AppState,
    config: Option<&serde_json::Value>,
) -> Result<Option<String>, ApiError> {
    let Some(spec) = config.and_then(|c| c.get("device")) else {
        return Ok(None);
    };
    let spec = spec.as_str().ok_or_else(|| {
        ApiError::unprocessable("invalid_config", "config `device` must be a string")
    })?;
    let device = parse_device(spec)
        .map_err(|e| ApiError::unprocessable("invalid_config", format!("config: {e}")))?;
    let slots = state.config.slot_devices();
    if !slots.is_empty() && !slots.contains(&device) {
        let names: Vec<String> = slots.iter().map(|d| device_name(*d)).collect();
        return Err(ApiError::unprocessable(
            "device_unavailable",
            format!(
                "config `device` {}: this server's job slots run on {}; leave `device` out to run on any of them",
                device_name(device),
                names.join(", ")
            ),
        ));
    }
    Ok(Some(device_name(device)))
}

fn parse_config(value: Option<&serde_json::Value>) -> Result<ScanConfig, ApiError> {
    let config: ScanConfig = match value {
        None | Some(serde_json::Value::Null) => ScanConfig::default(),
        // serde would take an array as the settings by position, where `device` (read
        // by `requested_device`) has no name.
        Some(value) if !value.is_object() => {
            return Err(ApiError::unprocessable(
                "invalid_config",
                "config must be a JSON object of scan settings",
            ))
        }
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|e| ApiError::unprocessable("invalid_config", format!("config: {e}")))?,
    };
    config
        .validate()
        .map_err(|e| ApiError::unprocessable("invalid_config", e.to_string()))?;
    // A client may not ask one job to oversubscribe the server's cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if config.threads.is_some_and(|t| t > cores) {
        return Err(ApiError::unprocessable(
            "invalid_config",
            format!("config `threads`: this server has {cores} cores"),
        ));
    }
    Ok(config)
}

async fn existing_blob(state: &AppState, role: &str, sha: &str) -> Result<String, ApiError> {
    let sha = sha.to_ascii_lowercase();
    if !super::blobs::is_sha256_hex(&sha) {
        return Err(ApiError::unprocessable(
            "invalid_blob_id",
            format!("`{role}` must be a sha256 in hex"),
        ));
    }
    match state.store.blob_info(&sha).await? {
        Some(_) => Ok(sha),
        None => Err(ApiError::unprocessable(
            "unknown_blob",
            format!("`{role}`: no blob {sha}; upload it to /v1/blobs first"),
        )),
    }
}

pub fn job_response(status: StatusCode, job: &Job) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    (
        status,
        [(header::LOCATION, location)],
        Json(JobView::new(job)),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    AppQuery(query): AppQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = match query.state.as_deref() {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("unknown state `{s}` (queued, running, succeeded, failed, cancelled)"),
            )
        })?),
    };
    let cursor = match query.cursor.as_deref() {
        None => None,
        Some(c) => {
            let bad = || {
                ApiError::bad_request(
                    "invalid_cursor",
                    "`cursor` must be a value from `next_cursor`",
                )
            };
            let (created, id) = c.split_once('_').ok_or_else(bad)?;
            // A job id is a UUID; anything else (a NUL, which PostgreSQL refuses in
            // text) never reaches the database.
            let id = uuid::Uuid::parse_str(id).map_err(|_| bad())?;
            Some((created.parse::<i64>().map_err(|_| bad())?, id.to_string()))
        }
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`limit` must lie in 1..=500",
        ));
    }
    let page = state.store.list_jobs(filter, cursor, limit).await?;
    let jobs: Vec<JobView> = page.jobs.iter().map(JobView::new).collect();
    Ok(Json(
        serde_json::json!({ "jobs": jobs, "next_cursor": page.next_cursor }),
    ))
}

pub async fn find_job(state: &AppState, id: &str) -> Result<Job, ApiError> {
    // Ids are UUIDs; anything else cannot name a job. Looked up in the form the store
    // holds (lowercase, hyphenated): `A1B2…` or `{a1b2…}` name the same job.
    let Ok(uuid) = uuid::Uuid::parse_str(id) else {
        return Err(ApiError::not_found(format!("job {}", id.escape_debug())));
    };
    state
        .store
        .job(&uuid.to_string())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id}")))
}

async fn show(
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(JobView::new(&find_job(&state, &id).await?)))
}

/// `DELETE /v1/jobs/{id}`: an active job is cancelled (200 when it was still queued and
/// is now cancelled, 202 while a running one stops at its next step); a finished job is
/// deleted with its report and every blob nothing else uses (204).
async fn delete_job(
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Response, ApiError> {
    let job = find_job(&state, &id).await?;
    let id = job.id;
    if job.state.is_terminal() {
        let purged = state
            .store
            .purge_job(&id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("job {id}")))?;
        tracing::info!(job = %id, freed_blobs = purged.freed_blobs.len(), "job deleted");
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let job = state
        .store
        .request_cancel(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id}")))?;
    state.wake.notify_waiters();
    // A running job stops at its next step: 202 until then.
    let status = if job.state == JobState::Running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(job_response(status, &job))
}

/// The stored report and artifact hash of a job that succeeded.
async fn finished_report(state: &AppState, id: &str) -> Result<(String, String), ApiError> {
    let job = find_job(state, id).await?;
    match job.state {
        JobState::Succeeded => {}
        JobState::Queued | JobState::Running => {
            return Err(ApiError::Conflict {
                code: "not_ready",
                message: format!(
                    "job {id} is {}; its report comes when it succeeds",
                    job.state.as_str()
                ),
            })
        }
        JobState::Failed | JobState::Cancelled => {
            return Err(ApiError::Conflict {
                code: "no_report",
                message: format!(
                    "job {id} is {} and has no report; its `error` says why",
                    job.state.as_str()
                ),
            })
        }
    }
    // Gone between the two reads: deleted (a client's DELETE, or retention) just now.
    state
        .store
        .report(&job.id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id}")))
}

async fn report(
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Response, ApiError> {
    let (report, _) = finished_report(&state, &id).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], report).into_response())
}

/// What the report page may do in a browser: show its own inline style and SVG, and
/// nothing else: no script, no fetch, no framing by another site. Every text of the
/// report is escaped; this holds even if an escape were ever missed, and layer names
/// come from the uploaded model.
const REPORT_PAGE_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

async fn report_page(
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (report, _) = finished_report(&state, &id).await?;
    // Reading a report of up to 64 MiB and drawing a bar per neuron is CPU work: off the
    // async threads, which also serve every other request.
    let page = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let report: ScanReport = serde_json::from_str(&report).map_err(ApiError::internal)?;
        Ok(html::report_page(&id, &report))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok((
        [
            (header::CONTENT_SECURITY_POLICY, REPORT_PAGE_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(page),
    ))
}

/// Whether an `If-None-Match` list names `etag` (weak comparison) or is `*`: the
/// client holds this file already.
fn none_match_fails(tags: &str, etag: &str) -> bool {
    tags.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

async fn artifact(
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, sha256) = finished_report(&state, &id).await?;
    // Gone since the report was read: the job was deleted just now.
    let blob = state
        .store
        .blob_info(&sha256)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id}")))?;
    let size = blob.size_bytes;
    let etag = format!("\"{sha256}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| none_match_fails(tags, &etag))
    {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&etag).map_err(ApiError::internal)?,
        );
        return Ok(response);
    }
    // RFC 9110 §13.1.5: with `If-Range`, the range applies only to the file it names
    // (its ETag; no Last-Modified is sent, so a date never matches); else the whole file.
    let range_applies = headers
        .get(header::IF_RANGE)
        .is_none_or(|validator| validator.as_bytes() == etag.as_bytes());
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(spec) if range_applies => parse_range(spec, size)?,
        _ => None,
    };
    let (status, start, end) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end),
        None => (StatusCode::OK, 0, size),
    };
    let mut response = Response::new(Body::from_stream(
        state.store.read_range(&sha256, start, end),
    ));
    *response.status_mut() = status;
    let h = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).map_err(ApiError::internal);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, value((end - start).to_string())?);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, value(etag)?);
    h.insert("x-content-sha256", value(sha256.clone())?);
    h.insert(
        header::CONTENT_DISPOSITION,
        value(format!("attachment; filename=\"purified-{id}.pt\""))?,
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            value(format!("bytes {start}-{}/{size}", end - 1))?,
        );
    }
    Ok(response)
}

/// One `bytes=` range as `start..end` (end exclusive). Several ranges, or a unit other
/// than bytes, are answered with the whole file (`None`), which HTTP allows.
pub fn parse_range(spec: &str, size: u64) -> Result<Option<(u64, u64)>, ApiError> {
    // The unit is case-insensitive (RFC 9110 §14.1).
    let spec = spec.trim();
    let Some(ranges) = spec
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &spec[6..])
    else {
        return Ok(None);
    };
    if ranges.contains(',') {
        return Ok(None);
    }
    let unsatisfiable = || ApiError::RangeNotSatisfiable { size };
    let (first, last) = ranges.trim().split_once('-').ok_or_else(unsatisfiable)?;
    // Digits only (`parse` takes a leading `+`); a number past u64 is as good as
    // "to the end" (RFC 9110 §14.1.1), not unsatisfiable.
    let position = |digits: &str| -> Result<u64, ApiError> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(unsatisfiable());
        }
        Ok(digits.parse().unwrap_or(u64::MAX))
    };
    let (start, end) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n: u64 = position(suffix)?;
            if n == 0 {
                return Err(unsatisfiable());
            }
            (size.saturating_sub(n), size)
        }
        (first, "") => (position(first)?, size),
        (first, last) => {
            let first: u64 = position(first)?;
            let last: u64 = position(last)?;
            if last < first {
                return Err(unsatisfiable());
            }
            (first, last.saturating_add(1).min(size))
        }
    };
    if start >= size {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=95-200", 100).unwrap(), Some((95, 100)));
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=5-2", 100).is_err());
        assert_eq!(parse_range("Bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(
            parse_range("bytes=5-99999999999999999999999", 100).unwrap(),
            Some((5, 100))
        );
        assert_eq!(
            parse_range("bytes=-99999999999999999999999", 100).unwrap(),
            Some((0, 100))
        );
        assert!(parse_range("bytes=+0-+9", 100).is_err());
        assert!(parse_range("bytes=99999999999999999999999-", 100).is_err());
        assert!(parse_range("bytes=x-", 100).is_err());
    }
}

//! `POST /v1/blobs` (raw body or multipart, streamed into the store) and
//! `GET /v1/blobs/{sha256}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::server::config::ServerConfig;
use crate::server::error::AppPath;
use crate::server::slow_clients::CheckedBody;
use crate::server::{ApiError, AppState};
use crate::store::BlobInfo;

pub fn router(config: &ServerConfig) -> Router<AppState> {
    Router::new()
        .route("/v1/blobs", post(upload))
        // Multipart framing adds a little to the file itself.
        .layer(DefaultBodyLimit::max(multipart_limit(
            config.max_blob_bytes,
            1,
        )))
        .route("/v1/blobs/{sha256}", get(info))
}

/// Body limit for a multipart request carrying `files` files of at most `per_file` bytes.
pub fn multipart_limit(per_file: u64, files: u64) -> usize {
    per_file
        .saturating_mul(files)
        .saturating_add(1 << 20)
        .min(usize::MAX as u64) as usize
}

async fn upload(
    State(state): State<AppState>,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_multipart_form);
    let blob = if is_multipart {
        let (mut multipart, framing) = budgeted_multipart(request, &state).await?;
        let field = multipart.next_field().await?.ok_or_else(|| {
            ApiError::unprocessable("missing_field", "the multipart body holds no file")
        })?;
        let blob = store_upload(&state, field_stream(field, &framing), "the upload").await?;
        // One file per upload: a second one was dropped without a word, the client
        // none the wiser. What this request stored first goes with the refusal.
        if let Some(extra) = multipart.next_field().await? {
            let name = extra.name().unwrap_or_default().to_string();
            if blob.created == Some(true) {
                if let Err(e) = state.store.free_blob_unless_resent(&blob.sha256).await {
                    tracing::warn!(blob = %blob.sha256, "freeing a refused upload: {e}");
                }
            }
            return Err(ApiError::bad_request(
                "unknown_field",
                format!(
                    "the form holds a second field `{}` after its file: /v1/blobs takes one \
                     file per request",
                    name.escape_debug()
                ),
            ));
        }
        blob
    } else {
        let stream = request
            .into_body()
            .into_data_stream()
            .map(|r| r.map_err(body_error));
        store_upload(&state, stream, "the upload").await?
    };
    let status = if blob.created == Some(false) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let location = format!("/v1/blobs/{}", blob.sha256);
    Ok((status, [(header::LOCATION, location)], Json(blob)))
}

/// Whether a `Content-Type` value is `multipart/form-data`: media types compare
/// ignoring case (RFC 9110 §8.3.1), and parameters (the boundary) follow a `;`.
fn is_multipart_form(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case("multipart/form-data")
}

/// Whether `id` can name a blob: a sha256 as 64 hex digits (any letter case). Checked
/// before the database sees it: PostgreSQL refuses a NUL in text outright, which would
/// have been a 500 for `GET /v1/blobs/%00`.
pub(crate) fn is_sha256_hex(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn info(
    State(state): State<AppState>,
    AppPath(sha256): AppPath<String>,
) -> Result<Json<BlobInfo>, ApiError> {
    let not_found = || ApiError::not_found(format!("blob {}", sha256.escape_debug()));
    if !is_sha256_hex(&sha256) {
        return Err(not_found());
    }
    let blob = state.store.blob_info(&sha256.to_ascii_lowercase()).await?;
    blob.map(Json).ok_or_else(not_found)
}

fn body_error(err: axum::Error) -> ApiError {
    // A body cut short (client gone, stalled, length limit) is the client's problem,
    // not ours.
    if crate::server::error::body_stalled(&err) {
        return crate::server::error::stalled_body();
    }
    let text = err.to_string();
    if text.contains("length limit") {
        ApiError::TooLarge(text)
    } else {
        ApiError::bad_request(
            "incomplete_body",
            format!("reading the request body: {text}"),
        )
    }
}

/// A multipart field as a stream of byte chunks.
pub fn field_stream<'a>(
    field: axum::extract::multipart::Field<'a>,
    framing: &'a FramingBudget,
) -> impl Stream<Item = Result<Bytes, ApiError>> + 'a {
    futures_util::stream::unfold(field, move |mut field| async move {
        match field.chunk().await {
            Ok(Some(bytes)) => {
                framing.file_data_read();
                Some((Ok(bytes), field))
            }
            Ok(None) => None,
            Err(e) => Some((Err(ApiError::from(e)), field)),
        }
    })
}

/// Most bytes of a multipart body that may arrive while no file's data is read: the
/// preamble, part headers and text fields (up to 64 KiB each). The multipart parser
/// holds them whole until a boundary or a header's end turns up, searching them again
/// at every read, so a body of gigabytes that never sends one was held in memory
/// (up to the body limit, 4 GiB on `/v1/scans`) and cost time quadratic in its size.
pub const MAX_FRAMING_BYTES: u64 = 1 << 20;

/// Bytes of the body that arrived since file data was last read; shared by the body
/// wrapper that counts them and the field stream that resets them.
#[derive(Clone, Default)]
pub struct FramingBudget(Arc<AtomicU64>);

impl FramingBudget {
    fn file_data_read(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// The request's body as a multipart form whose framing is bounded by
/// [`MAX_FRAMING_BYTES`], and the budget its file fields reset.
pub async fn budgeted_multipart(
    request: Request,
    state: &AppState,
) -> Result<(Multipart, FramingBudget), ApiError> {
    let framing = FramingBudget::default();
    let counted = framing.clone();
    let within_budget = move |arrived: Option<u64>| -> Result<(), axum::BoxError> {
        let arrived = arrived.unwrap_or(0);
        if counted.0.fetch_add(arrived, Ordering::Relaxed) + arrived > MAX_FRAMING_BYTES {
            return Err(Box::new(FramingTooLong));
        }
        Ok(())
    };
    let request = request.map(|body| axum::body::Body::new(CheckedBody::new(body, within_budget)));
    let multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| ApiError::bad_request("malformed_multipart", e.body_text()))?;
    Ok((multipart, framing))
}

/// A multipart body with more than [`MAX_FRAMING_BYTES`] between two reads of file data.
#[derive(Debug)]
pub struct FramingTooLong;

impl std::fmt::Display for FramingTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the multipart body sent more than {MAX_FRAMING_BYTES} bytes outside any file \
             (a boundary or a part's headers never ended)"
        )
    }
}

impl std::error::Error for FramingTooLong {}

/// Streams `body` into the blob store, hashing on the way and refusing more than the
/// configured size. `what` names the upload in errors.
pub async fn store_upload<S>(state: &AppState, body: S, what: &str) -> Result<BlobInfo, ApiError>
where
    S: Stream<Item = Result<Bytes, ApiError>>,
{
    let limit = state.config.max_blob_bytes;
    // What the store may still take, as of this upload's start: concurrent uploads can
    // overshoot it together by at most what they bring between their starts.
    let room = match state.config.max_store_bytes {
        Some(max) => Some(max.saturating_sub(state.store.stored_bytes().await?)),
        None => None,
    };
    let store_full = || {
        ApiError::StoreFull(format!(
            "{what} does not fit: the store holds as much as this server allows \
             (max_store_bytes); delete finished jobs to free space"
        ))
    };
    let mut upload = state.store.begin_upload();
    let mut body = std::pin::pin!(body);
    let failure = loop {
        match body.next().await {
            None => break None,
            Some(Err(e)) => break Some(e),
            Some(Ok(bytes)) => {
                if upload.bytes_so_far() + bytes.len() as u64 > limit {
                    break Some(ApiError::TooLarge(format!(
                        "{what} exceeds the limit of {limit} bytes"
                    )));
                }
                if upload.is_staging()
                    && room.is_some_and(|room| upload.bytes_so_far() + bytes.len() as u64 > room)
                {
                    // It does not fit, but it may be a file the store holds (a client
                    // re-sending it to keep it): hash the rest without storing it.
                    if let Err(e) = upload.stop_staging().await {
                        break Some(e.into());
                    }
                }
                if let Err(e) = upload.write(&bytes).await {
                    break Some(e.into());
                }
            }
        }
    };
    if let Some(err) = failure {
        upload.abort().await;
        return Err(err);
    }
    if upload.bytes_so_far() == 0 {
        upload.abort().await;
        return Err(ApiError::bad_request(
            "empty_upload",
            format!("{what} is empty"),
        ));
    }
    let blob = if upload.is_staging() {
        upload.finish().await?
    } else {
        upload.finish_if_stored().await?.ok_or_else(store_full)?
    };
    state
        .metrics
        .blob_bytes_received
        .fetch_add(blob.size_bytes, Ordering::Relaxed);
    Ok(blob)
}

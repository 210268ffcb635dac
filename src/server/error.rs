//! The one error type of the API, rendered as an RFC 9457 problem document with a
//! stable `code`. Client mistakes are 4xx; internal failures are logged with their
//! cause and shown to the client only as `internal`.

use axum::extract::multipart::MultipartError;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what} not found")]
    NotFound { what: String },
    /// No bearer token, or not the server's (`api_token`).
    #[error("{0}")]
    Unauthorized(String),
    /// The request is malformed (syntax, framing, unknown fields).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The request is well formed but cannot be acted on (unknown blob, bad config).
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("this path does not take this method; see /v1/openapi.json")]
    MethodNotAllowed,
    #[error("{0}")]
    TooLarge(String),
    /// The store holds as much as it may (`max_store_bytes`).
    #[error("{0}")]
    StoreFull(String),
    /// As many jobs wait as may (`max_queued_jobs`).
    #[error("{0}")]
    QueueFull(String),
    /// The request body stopped arriving for longer than the idle timeout.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the requested range does not lie within the {size} bytes of the file")]
    RangeNotSatisfiable { size: u64 },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::NotFound { what: what.into() }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            code,
            message: message.into(),
        }
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(err.into())
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::StoreFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::QueueFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable, machine-readable; clients branch on this, not on the message.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::BadRequest { code, .. }
            | ApiError::Unprocessable { code, .. }
            | ApiError::Conflict { code, .. } => code,
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::StoreFull(_) => "store_full",
            ApiError::QueueFull(_) => "queue_full",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        if let ApiError::Internal(cause) = &self {
            tracing::error!("internal error: {cause:#}");
        }
        let body = serde_json::json!({
            "type": format!("https://bdscan.dev/problems/{}", self.code()),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "code": self.code(),
            "detail": self.to_string(),
        });
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        if let ApiError::RangeNotSatisfiable { size } = self {
            if let Ok(value) = format!("bytes */{size}").parse() {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
        }
        if let ApiError::Unauthorized(_) = self {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"bdscan\""),
            );
        }
        if let ApiError::QueueFull(_) = self {
            // Jobs take tens of seconds to minutes each.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("30"));
        }
        response
    }
}

/// SQLite's SQLITE_BUSY (5) or SQLITE_LOCKED (6), primary or extended codes: a write
/// that waited out the busy timeout behind others. Load, not a fault: the client may
/// retry.
fn database_busy(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
        && e.code()
            .and_then(|code| code.parse::<i64>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Database(sqlx::Error::PoolTimedOut) => {
                ApiError::Unavailable("the database is busy".into())
            }
            StoreError::Contended(why) => ApiError::Unavailable(why),
            StoreError::UploadIncomplete(why) => ApiError::RequestTimeout(why),
            StoreError::Database(sqlx::Error::Database(e)) if database_busy(e.as_ref()) => {
                ApiError::Unavailable(
                    "the database stayed locked by other writes for longer than the server \
                     waits (many large uploads at once on SQLite); try again"
                        .into(),
                )
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if body_stalled(&rejection) {
            return stalled_body();
        }
        // A body over the limit is rejected as a failed read; say what it really is.
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::TooLarge(rejection.body_text());
        }
        let code = match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                return ApiError::UnsupportedMediaType(rejection.body_text())
            }
            JsonRejection::JsonDataError(_) => "invalid_request",
            _ => "malformed_json",
        };
        ApiError::bad_request(code, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request("invalid_query", rejection.body_text())
    }
}

/// Whether `err`, or anything that caused it, is a request body that sent nothing for
/// longer than the idle timeout (`ServerConfig::body_idle_timeout`), or arrived slower
/// than the minimum rate (`ServerConfig::min_body_rate`).
pub fn body_stalled(err: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<tower_http::timeout::TimeoutError>(err).is_some()
        || caused_by::<super::slow_clients::BodyTooSlow>(err).is_some()
}

/// `err`, or the first error in its chain of causes, if it is a `T`.
fn caused_by<'e, T: std::error::Error + 'static>(
    err: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cause = e.source();
    }
    None
}

/// The answer to a request whose body stalled.
pub fn stalled_body() -> ApiError {
    ApiError::RequestTimeout(
        "the request body stalled (nothing for longer than the server waits, or too slow \
         on average); send it again"
            .into(),
    )
}

impl From<MultipartError> for ApiError {
    fn from(err: MultipartError) -> Self {
        if body_stalled(&err) {
            return stalled_body();
        }
        if let Some(framing) = caused_by::<super::routes::blobs::FramingTooLong>(&err) {
            return ApiError::bad_request("malformed_multipart", framing.to_string());
        }
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(err.body_text())
        } else {
            ApiError::bad_request("malformed_multipart", err.body_text())
        }
    }
}

/// `Json` whose rejections are problem documents.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", rejection.body_text())
    }
}

/// `Path` whose rejections (bytes that are not UTF-8, say) are problem documents.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct AppPath<T>(pub T);

/// `Query` whose rejections are problem documents.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct AppQuery<T>(pub T);

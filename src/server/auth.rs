//! Bearer-token authentication of the API (`api_token`). Without a token set the
//! API is open, as it always was, for a loopback listener or a proxy that
//! authenticates. With one, every `/v1` resource route wants
//! `Authorization: Bearer <token>`; the health, readiness and metrics endpoints and the
//! OpenAPI document stay open, for probes and for clients finding their way.
//! `api_token` may hold several tokens separated by white space (a token has none), any
//! of which is accepted: to rotate, add the new one, move the clients, drop the old.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Fewest characters a token may have: a token is only as strong as it is long.
pub const MIN_TOKEN_CHARS: usize = 32;

/// Refuses a request without the server's token, before its body is read.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.config.api_token.as_deref() else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match presented {
        Some(token)
            if accepted_tokens(expected).any(|t| same_token(token.as_bytes(), t.as_bytes())) =>
        {
            next.run(request).await
        }
        Some(_) => ApiError::Unauthorized("the bearer token is not one this server accepts".into())
            .into_response(),
        None => ApiError::Unauthorized(
            "this server wants `Authorization: Bearer <token>` on every /v1 request".into(),
        )
        .into_response(),
    }
}

/// The tokens an `api_token` value holds.
fn accepted_tokens(api_token: &str) -> impl Iterator<Item = &str> {
    api_token.split_ascii_whitespace()
}

/// The token of an `Authorization` value in the Bearer scheme (any letter case, as
/// RFC 9110 has schemes).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Compares in time that depends on the lengths only, not on where the first
/// difference lies, so response times do not reveal the token a prefix at a time.
fn same_token(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len()
        && presented
            .iter()
            .zip(expected)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// Why `api_token` cannot serve, if it cannot: no token in it, one too short to be hard
/// to guess, or characters a header value cannot carry. Tokens are counted, never shown.
pub fn token_problem(api_token: &str) -> Option<String> {
    if accepted_tokens(api_token).next().is_none() {
        return Some(format!(
            "api_token holds no token; give one of at least {MIN_TOKEN_CHARS} characters \
             (e.g. `openssl rand -hex 32`), or leave it unset for an open API"
        ));
    }
    let several = accepted_tokens(api_token).nth(1).is_some();
    for (n, token) in accepted_tokens(api_token).enumerate() {
        let which = if several {
            format!(" (token {} of the list)", n + 1)
        } else {
            String::new()
        };
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Some(format!(
                "api_token must be at least {MIN_TOKEN_CHARS} characters{which} (e.g. `openssl rand -hex 32`)"
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Some(format!(
                "api_token must be visible ASCII characters{which}; white space separates tokens"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_are_parsed_as_the_scheme_says() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(same_token(b"secret-token", b"secret-token"));
        assert!(!same_token(b"secret-tokeN", b"secret-token"));
        assert!(!same_token(b"secret", b"secret-token"));
        assert!(!same_token(b"", b"secret-token"));
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused() {
        assert!(token_problem("short").is_some());
        assert!(token_problem("").is_some() && token_problem(" \t ").is_some());
        assert!(token_problem(&format!("{} x", "a".repeat(40))).is_some());
        assert!(token_problem(&format!("{}\u{e9}", "a".repeat(40))).is_some());
        assert!(token_problem(&"a1".repeat(16)).is_none());
        let two = format!("{}  {}\n", "a".repeat(32), "b".repeat(40));
        assert!(token_problem(&two).is_none());
        assert_eq!(accepted_tokens(&two).count(), 2);
        let problem = token_problem(&format!("{} short", "a".repeat(32))).unwrap();
        assert!(problem.contains("token 2 of the list") && !problem.contains("short"));
    }
}

//! Limits on clients that hold a connection without using it: one that stops reading
//! the answers it asked for ([`StalledWriteDeadline`]), and one that sends a body a few
//! bytes at a time, just often enough to dodge the idle timeout
//! ([`enforce_min_body_rate`]); and [`CheckedBody`], which such request-body limits
//! are built on. Each would otherwise keep a slot under the connection
//! cap for as long as it liked, and a few hundred of them, the whole service.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use super::AppState;

/// A connection whose writes stay blocked for `limit` fails with `TimedOut`: a client
/// that stops reading (and pipelines requests it never reads) would hold its connection,
/// and a slot under the connection cap, for ever. hyper has a timeout for reading
/// headers, none for writing. The clock starts when a write finds the socket full and
/// stops at any progress, so a slow reader is served as long as it reads at all.
pub struct StalledWriteDeadline<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StalledWriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        StalledWriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After the inner write's `poll`: progress clears the deadline; `Pending` starts it
    /// (or, once passed, turns into the error that closes the connection).
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        use std::future::Future;
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StalledWriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StalledWriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// Wraps every request body in a minimum-rate check (`min_body_rate` bytes a second,
/// judged once `min_body_rate_after` has passed; 0: no minimum).
pub async fn enforce_min_body_rate(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let (rate, after) = (state.config.min_body_rate, state.config.min_body_rate_after);
    if rate == 0 {
        return next.run(request).await;
    }
    next.run(request.map(|body| Body::new(CheckedBody::new(body, min_rate(rate, after)))))
        .await
}

/// The check of a body that fails once it has arrived at under `rate` bytes a second on
/// average, judged from `after` past its first read on, at each frame: the idle timeout
/// resets at every frame, so a byte every 55 s kept an upload open for days.
fn min_rate(rate: u64, after: Duration) -> impl FnMut(Option<u64>) -> Result<(), axum::BoxError> {
    let mut first_read: Option<Instant> = None;
    let mut received: u64 = 0;
    move |arrived| {
        let first_read = *first_read.get_or_insert_with(Instant::now);
        let Some(bytes) = arrived else {
            return Ok(());
        };
        received += bytes;
        let elapsed = first_read.elapsed();
        if elapsed > after && (received as f64) < rate as f64 * elapsed.as_secs_f64() {
            return Err(Box::new(BodyTooSlow { rate }));
        }
        Ok(())
    }
}

/// A body that arrived slower than the server's minimum rate.
#[derive(Debug)]
pub struct BodyTooSlow {
    pub rate: u64,
}

impl std::fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body arrived at under {} bytes a second",
            self.rate
        )
    }
}

impl std::error::Error for BodyTooSlow {}

/// A request body whose every read is shown to `check`: `Some(bytes)` when a frame
/// arrived (its data's length; 0 for trailers), `None` when the read found none yet. An
/// error from `check` ends the body with it, as a failed read would.
pub struct CheckedBody<F> {
    inner: Body,
    check: F,
}

impl<F> CheckedBody<F> {
    pub fn new(inner: Body, check: F) -> Self {
        CheckedBody { inner, check }
    }
}

impl<F> hyper::body::Body for CheckedBody<F>
where
    F: FnMut(Option<u64>) -> Result<(), axum::BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let arrived = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                Some(frame.data_ref().map_or(0, |data| data.len() as u64))
            }
            _ => None,
        };
        if let Err(e) = (this.check)(arrived) {
            return Poll::Ready(Some(Err(e)));
        }
        polled.map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! The HTTP scanning service: an axum API over the [`crate::store`], workers that run
//! each scan in a child process of this binary, and a reaper for expired leases.
//!
//! - [`routes`]: one router per resource, merged in [`router`];
//! - [`worker`]: claiming jobs and supervising their child process;
//! - [`child`]: the child process itself (`bdscan job --spec FILE`).

pub mod auth;
pub mod child;
pub mod config;
pub mod error;
pub mod html;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod sandbox;
pub mod settings;
pub mod slow_clients;
pub mod view;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

pub use config::{
    device_name, parse_device, ServerConfig, WorkerSettings, DEFAULT_MAX_CONNECTIONS,
};
pub use error::ApiError;
use metrics::Metrics;
pub use settings::ServeSettings;
pub use worker::Worker;

use crate::store::{Backend, Store};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ServerConfig>,
    pub metrics: Arc<Metrics>,
    /// Nudges idle workers when a job is queued.
    pub wake: Arc<Notify>,
    /// Cancelled when the service stops; long waits (`/v1/scans?wait=`) end early on it.
    pub shutdown: CancellationToken,
}

/// The root router: every resource's routes plus a problem-document 404.
pub fn router(state: AppState) -> Router {
    // A route layer: it runs for these routes only, so an unknown path is still 404.
    let resources = Router::new()
        .merge(routes::blobs::router(&state.config))
        .merge(routes::jobs::router())
        .merge(routes::scans::router(&state.config))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .merge(routes::system::router())
        .merge(resources)
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .layer(RequestBodyTimeoutLayer::new(state.config.body_idle_timeout))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            slow_clients::enforce_min_body_rate,
        ))
        .layer(TraceLayer::new_for_http().on_failure(log_failure))
        .with_state(state)
}

/// Server errors at ERROR, except the two a full service answers by design (503
/// `queue_full` or `unavailable`, 507 `store_full`): those are load, logged at WARN, so
/// that alerts on ERROR lines mean something broke.
fn log_failure(
    failure: tower_http::classify::ServerErrorsFailureClass,
    latency: std::time::Duration,
    _span: &tracing::Span,
) {
    use tower_http::classify::ServerErrorsFailureClass::StatusCode as Status;
    match failure {
        Status(status) if status.as_u16() == 503 || status.as_u16() == 507 => {
            tracing::warn!(%status, ?latency, "request refused: the service is full or busy")
        }
        // A download whose blob was deleted as it streamed (`StoreError::BlobNotFound`):
        // the client sees the body end short; nothing is damaged.
        tower_http::classify::ServerErrorsFailureClass::Error(message)
            if message.starts_with("blob ") && message.ends_with(" not found") =>
        {
            tracing::warn!(
                ?latency,
                "download cut short: {message} (deleted while it was sent)"
            )
        }
        other => tracing::error!(classification = %other, ?latency, "response failed"),
    }
}

async fn count_responses(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_latency
        .observe(started.elapsed().as_secs_f64());
    state.metrics.record_response(response.status().as_u16());
    response
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A bound, migrated, ready-to-run service.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
}

impl AppState {
    /// A CPU worker slot sharing this service's store, settings and metrics.
    pub fn worker(&self, id: &str) -> Worker {
        self.worker_on(id, tch::Device::Cpu)
    }

    /// A worker slot whose jobs run on `device`.
    pub fn worker_on(&self, id: &str, device: tch::Device) -> Worker {
        Worker::new(
            self.store.clone(),
            Arc::new(self.config.worker.clone()),
            self.metrics.clone(),
            id,
            device,
        )
    }
}

impl Application {
    /// Connects to the database, applies migrations and binds the listener (port 0 picks one).
    pub async fn build(config: ServerConfig) -> Result<Application, StartError> {
        config.validate().map_err(StartError::Config)?;
        // The data directory is the user's setting: a file in the way or no permission is
        // theirs to fix, said with the path.
        for dir in [&config.data_dir, &config.worker.work_dir] {
            std::fs::create_dir_all(dir).map_err(|e| {
                StartError::Config(format!("data_dir: cannot create {}: {e}", dir.display()))
            })?;
        }
        let store = Store::connect(&config.database_url)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::UnsupportedUrl(_) => StartError::Config(e.to_string()),
                other => StartError::Store(other),
            })?;
        if store.backend() == Backend::Sqlite {
            // A single process owns a SQLite database, so unfinished uploads are orphans.
            store.sweep_staging().await?;
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| StartError::Bind(config.listen, e))?;
        let state = AppState {
            store,
            config: Arc::new(config),
            metrics: Arc::new(Metrics::default()),
            wake: Arc::new(Notify::new()),
            shutdown: CancellationToken::new(),
        };
        Ok(Application {
            listener,
            shutdown: state.shutdown.clone(),
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Cancelling it stops the server, the workers and the reaper.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// A worker sharing this service's store and settings (tests drive it with `run_once`).
    pub fn worker(&self, id: &str) -> Worker {
        self.state.worker(id)
    }

    /// Serves until the shutdown token is cancelled, then waits for workers to hand back their jobs.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let state = self.state.clone();
        let mut tasks = tokio::task::JoinSet::new();
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let slots = state.config.slot_devices();
        for (n, device) in slots.iter().enumerate() {
            let worker = state.worker_on(&format!("{instance}-{n}"), *device);
            tasks.spawn(worker.run(self.shutdown.clone(), state.wake.clone()));
        }
        if state.store.backend() == Backend::Postgres && !slots.is_empty() {
            tasks.spawn(worker::relay_queue_notifications(
                state.config.database_url.clone(),
                state.wake.clone(),
                self.shutdown.clone(),
            ));
        }
        tasks.spawn(worker::run_reaper(
            state.store.clone(),
            Arc::new(state.config.worker.clone()),
            state.metrics.clone(),
            self.shutdown.clone(),
        ));
        serve_http1(
            self.listener,
            router(state.clone()),
            self.shutdown.clone(),
            &state.config,
        )
        .await;
        self.shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        state.store.close().await;
        Ok(())
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown`; then open connections finish their
/// requests (idle ones close at once) for up to `config.shutdown_grace`, and the rest
/// are closed. What `axum::serve` does, plus the limits it cannot set: a header-read
/// timeout, without which a client holds a connection for ever by sending its headers a
/// byte at a time (or never), a bound on how long shutdown waits for connections a
/// client keeps open, and on how many connections are open at once.
async fn serve_http1(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    config: &ServerConfig,
) {
    let (closing, closing_watch) = tokio::sync::watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    loop {
        // At the cap, wait for a connection to end before accepting the next: the ones
        // past it wait in the kernel's backlog rather than each taking a descriptor and
        // a task here.
        if connections.len() >= config.max_connections {
            tokio::select! {
                _ = connections.join_next() => continue,
                () = shutdown.cancelled() => break,
            }
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = slow_clients::StalledWriteDeadline::new(stream, config.write_stall_timeout);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http1.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let mut closing_watch = closing_watch.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = closing_watch.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection ended: {e}");
            }
        });
        // Finished connections' tasks, so the set does not grow with every one served.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(());
    let grace = config.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            open = connections.len(),
            "connections still open after the shutdown grace period; closing them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

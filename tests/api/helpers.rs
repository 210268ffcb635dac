//! Spawning the app, making databases and fixtures, and asserting on problem documents.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bdscan::engine::Monitor;
use bdscan::lab::demo::{self, DemoFiles};
use bdscan::server::{AppState, Application, ServerConfig, Worker};
use bdscan::store::{NewJob, Store};
use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

/// Which database a test runs against.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite,
    /// A fresh database created on this server for the test.
    Postgres(String),
}

/// The Postgres server URL, or `None` with a printed notice (the variant is skipped).
pub fn postgres_url(test: &str) -> Option<String> {
    let url = std::env::var("BDSCAN_TEST_POSTGRES_URL").ok().or_else(|| {
        std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| u.starts_with("postgres"))
    });
    if url.is_none() {
        eprintln!("skipping {test}: set BDSCAN_TEST_POSTGRES_URL (see scripts/start-postgres.sh) to run it");
    }
    url
}

/// Prefix of every database a test creates, followed by the creating process's id.
const TEST_DATABASE_PREFIX: &str = "bdscan_test_";

/// A database created for one test on the test server; dropped with this value (also
/// when the test panics). Databases of test runs that died before dropping theirs are
/// removed when the next run creates its first one.
pub struct TestDatabase {
    pub url: String,
    server_url: String,
    name: String,
}

/// Creates an empty database for one test.
pub async fn fresh_postgres_database(server_url: &str) -> TestDatabase {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| drop_databases_of_dead_runs(server_url))
        .await;
    let name = format!(
        "{TEST_DATABASE_PREFIX}{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let mut conn = sqlx::PgConnection::connect(server_url)
        .await
        .expect("connecting to the test Postgres");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("creating a test database");
    conn.close().await.ok();
    let (base, _) = server_url
        .rsplit_once('/')
        .expect("a postgres URL ends in /database");
    let base = if base.ends_with('/') || base.ends_with(':') {
        server_url.to_string()
    } else {
        base.to_string()
    };
    TestDatabase {
        url: format!("{base}/{name}"),
        server_url: server_url.to_string(),
        name,
    }
}

/// The test databases on this server, as (name, id of the process that made it).
async fn test_databases(conn: &mut sqlx::PgConnection) -> Vec<(String, Option<u32>)> {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)")
            .bind(TEST_DATABASE_PREFIX)
            .fetch_all(conn)
            .await
            .expect("listing test databases");
    names
        .into_iter()
        .map(|name| {
            let pid = name[TEST_DATABASE_PREFIX.len()..]
                .split('_')
                .next()
                .and_then(|pid| pid.parse().ok());
            (name, pid)
        })
        .collect()
}

async fn drop_database(conn: &mut sqlx::PgConnection, name: &str) {
    // FORCE ends connections a pool still holds (the app may be mid-shutdown).
    let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(conn)
        .await;
    if let Err(e) = dropped {
        eprintln!("could not drop test database {name}: {e}");
    }
}

/// Drops the databases whose creating test process is gone (a run that was killed).
pub async fn drop_databases_of_dead_runs(server_url: &str) {
    let mut conn = sqlx::PgConnection::connect(server_url)
        .await
        .expect("connecting to the test Postgres");
    for (name, pid) in test_databases(&mut conn).await {
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists()) {
            drop_database(&mut conn, &name).await;
        }
    }
    conn.close().await.ok();
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be the one dropping us: use a
        // runtime of our own on a thread of our own.
        let (server_url, name) = (self.server_url.clone(), self.name.clone());
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                match sqlx::PgConnection::connect(&server_url).await {
                    Ok(mut conn) => {
                        drop_database(&mut conn, &name).await;
                        conn.close().await.ok();
                    }
                    Err(e) => eprintln!("could not drop test database {name}: {e}"),
                }
            });
        });
        let _ = dropping.join();
    }
}

pub struct Options {
    pub db: Db,
    pub workers: usize,
    pub max_blob_bytes: u64,
    /// The program run for each job (default: the bdscan binary).
    pub exe: Option<PathBuf>,
    pub poll_interval: Duration,
    pub body_idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_store_bytes: Option<u64>,
    pub max_queued_jobs: Option<u64>,
    pub header_read_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub min_body_rate: u64,
    pub min_body_rate_after: Duration,
    pub max_connections: usize,
    pub job_memory_limit: Option<u64>,
    pub job_timeout: Option<Duration>,
    pub api_token: Option<String>,
    pub job_retention: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            db: Db::Sqlite,
            workers: 0,
            max_blob_bytes: 64 << 20,
            exe: None,
            poll_interval: Duration::from_millis(100),
            body_idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(20),
            max_store_bytes: None,
            max_queued_jobs: None,
            header_read_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            min_body_rate_after: Duration::from_secs(60),
            max_connections: bdscan::server::DEFAULT_MAX_CONNECTIONS,
            job_memory_limit: None,
            job_timeout: None,
            api_token: None,
            job_retention: None,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    dir: Option<tempfile::TempDir>,
    database: Option<TestDatabase>,
}

pub async fn spawn_app(options: Options) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = options
        .exe
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bdscan")));
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().expect("address"),
        dir.path().to_path_buf(),
        exe,
    );
    let database = match &options.db {
        Db::Postgres(server_url) => Some(fresh_postgres_database(server_url).await),
        Db::Sqlite => None,
    };
    if let Some(database) = &database {
        config.database_url = database.url.clone();
    }
    config.workers = options.workers;
    config.max_blob_bytes = options.max_blob_bytes;
    config.body_idle_timeout = options.body_idle_timeout;
    config.shutdown_grace = options.shutdown_grace;
    config.max_store_bytes = options.max_store_bytes;
    config.max_queued_jobs = options.max_queued_jobs;
    config.header_read_timeout = options.header_read_timeout;
    config.write_stall_timeout = options.write_stall_timeout;
    config.min_body_rate = options.min_body_rate;
    config.min_body_rate_after = options.min_body_rate_after;
    config.max_connections = options.max_connections;
    config.api_token = options.api_token;
    let w = &mut config.worker;
    w.job_memory_limit = options.job_memory_limit;
    w.job_timeout = options.job_timeout;
    w.job_retention = options.job_retention;
    w.unused_blob_min_age = options.job_retention.unwrap_or_default();
    w.lease = Duration::from_secs(5);
    w.heartbeat = Duration::from_millis(200);
    w.poll_interval = options.poll_interval;
    w.reap_interval = Duration::from_millis(200);
    w.retry_backoff = Duration::ZERO;
    w.cancel_grace = Duration::from_secs(5);
    w.job_threads = Some(1);
    let app = Application::build(config).await.expect("the app starts");
    let base = format!("http://{}", app.local_addr());
    let state = app.state().clone();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        base,
        client: reqwest::Client::new(),
        state,
        shutdown,
        server: Some(server),
        dir: Some(dir),
        database,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A TCP connection to the app that has sent `bytes` (a request, or part of one).
    pub async fn raw_connection(&self, bytes: &[u8]) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut socket = tokio::net::TcpStream::connect(self.base.trim_start_matches("http://"))
            .await
            .expect("connects");
        socket.write_all(bytes).await.expect("sends");
        socket
    }

    /// Posts a multipart `form` to `path`.
    pub async fn post_form(&self, path: &str, form: Form) -> Response {
        self.client
            .post(self.url(path))
            .multipart(form)
            .send()
            .await
            .expect("the server answers")
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// A worker outside the app's pool, for tests that drive jobs one at a time.
    pub fn worker(&self, id: &str) -> Worker {
        self.state.worker(id)
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The `/metrics` exposition as text.
    pub async fn metrics_text(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await;
        response
            .expect("request")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn upload(&self, bytes: Vec<u8>) -> String {
        let response = self
            .client
            .post(self.url("/v1/blobs"))
            .body(bytes)
            .send()
            .await
            .expect("upload");
        assert!(
            response.status().is_success(),
            "upload failed: {}",
            response.status()
        );
        let body: Value = response.json().await.expect("json");
        body["sha256"].as_str().expect("sha256").to_string()
    }

    /// POST /v1/jobs with `body`; the job object the server answered with.
    pub async fn create_job(&self, body: &Value) -> Value {
        let response = self
            .client
            .post(self.url("/v1/jobs"))
            .json(body)
            .send()
            .await
            .expect("create job");
        response.json().await.expect("json")
    }

    /// Polls the job until `done(job)` or the timeout.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, job) = self.get_json(&format!("/v1/jobs/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{job}");
            if done(&job) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting on job {id}; last seen: {job}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the app and waits for it, then drops its PostgreSQL database; the returned
    /// folder still holds its files (and its SQLite database).
    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.stop_timed().await.0
    }

    /// `stop`, and how long the server took to stop (30 s if it did not).
    pub async fn stop_timed(mut self) -> (Option<tempfile::TempDir>, Duration) {
        let started = std::time::Instant::now();
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
        }
        let took = started.elapsed();
        self.database.take();
        (self.dir.take(), took)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Asserts a 4xx problem document with `code` and returns it.
pub async fn assert_problem(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "unexpected status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

/// The demo's backdoored model and bundles, trained once per test run.
pub async fn demo_files() -> DemoFiles {
    static FILES: OnceLock<DemoFiles> = OnceLock::new();
    tokio::task::spawn_blocking(|| {
        FILES
            .get_or_init(|| {
                let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
                remove_dead_runs_fixtures(root);
                let dir = root.join(format!("api-demo-{}", std::process::id()));
                tch::set_num_threads(1);
                let mut quiet = |_: &bdscan::engine::Progress| {};
                demo::prepare(
                    &dir,
                    demo::MNIST_CNN_BN,
                    0,
                    &mut Monitor::new(&mut quiet, None),
                )
                .expect("demo model trains")
            })
            .clone()
    })
    .await
    .expect("fixture task")
}

/// Fixture folders of earlier test runs (their process is gone) are removed.
fn remove_dead_runs_fixtures(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("api-demo-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A scan config small enough for tests.
pub fn quick_config() -> Value {
    // No warm-up: a few epochs must reach the full purification rate to do anything. Three
    // epochs left the demo model at 58% ASR without pattern unlearning and 85% with it
    // (the term slows the first epochs); five, at 62% with it.
    serde_json::json!({ "purify_epochs": 5, "purify_warmup_epochs": 0, "recovery_epochs": 1 })
}

pub fn file_part(path: &Path) -> Part {
    Part::bytes(std::fs::read(path).expect("fixture file"))
        .file_name(path.file_name().unwrap().to_string_lossy().to_string())
}

/// The multipart form of a full audit of the demo model.
pub fn audit_form(files: &DemoFiles, config: &Value) -> Form {
    Form::new()
        .part("model", file_part(&files.backdoored_model))
        .part("clean", file_part(&files.clean))
        .part("test", file_part(&files.test))
        .part("poison", file_part(&files.poison))
        .text("target_label", files.target.to_string())
        .text("config", config.to_string())
}

/// A queued job over throwaway blobs, straight into the store (for queue tests).
pub async fn queue_job(store: &Store, max_attempts: i64) -> String {
    let mut upload = store.begin_upload();
    upload
        .write(b"not a model, never run")
        .await
        .expect("write");
    let blob = upload.finish().await.expect("finish");
    let new = NewJob {
        model_sha256: blob.sha256.clone(),
        clean_sha256: blob.sha256,
        test_sha256: None,
        poison_sha256: None,
        target_label: None,
        config: "{}".into(),
        max_attempts,
        idempotency_key: None,
        idempotency_fingerprint: None,
        device: None,
    };
    match store.create_job(&new).await.expect("create job") {
        bdscan::store::CreateOutcome::Created(job) => job.id,
        other => panic!("unexpected {other:?}"),
    }
}

/// The first bytes the server sends back on `socket`, within 20 s.
pub async fn first_answer(socket: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), socket.read(&mut answer))
        .await
        .expect("the server answers")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).to_string()
}

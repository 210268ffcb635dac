//! Persistence for the scanning service: jobs and their queue, content-addressed blobs
//! (models, bundles, purified artifacts) stored in chunks, and reports.
//!
//! One set of queries serves SQLite and PostgreSQL through sqlx's `Any` driver; they
//! differ only in the queue claim's lock (see [`jobs`]) and in how they read the
//! database's clock ([`Store::clock_sql`]).

pub mod blobs;
pub mod jobs;

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Executor};

pub use blobs::{BlobInfo, BlobUpload, CHUNK_BYTES};
pub use jobs::{Claimed, CreateOutcome, Job, JobPage, JobState, NewJob, Purged, Reaped};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL `{0}` (expected sqlite:// or postgres://)")]
    UnsupportedUrl(String),
    /// The first connection failed: the database's own reason (refused, unknown host,
    /// authentication, no such database), or no answer in time, with the URL redacted.
    #[error("cannot connect to the database at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("blob {0} not found")]
    BlobNotFound(String),
    #[error("blob {0} is damaged: {1}")]
    Corrupt(String, String),
    /// An upload lost staged chunks before it finished: it arrived for so long that
    /// the sweep of abandoned uploads took it for one. Sending it again succeeds.
    #[error("{0}")]
    UploadIncomplete(String),
    /// Concurrent requests kept changing what this one depends on; retrying may succeed.
    #[error("{0}")]
    Contended(String),
}

impl StoreError {
    /// An error of the database itself (connection, lock, constraint), as opposed to a
    /// missing or damaged blob or a file: a step failing this way may succeed again.
    pub fn is_database(&self) -> bool {
        matches!(self, StoreError::Database(_))
    }

    /// A row named a blob (or job) that another transaction had just deleted.
    pub fn is_foreign_key_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(e))
            if e.kind() == sqlx::error::ErrorKind::ForeignKeyViolation)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Whether a failed connection may succeed if tried again: the server is not there yet
/// (an I/O error: refused, reset) or PostgreSQL is starting up (57P03) or full (53300).
fn may_pass(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(e) => matches!(e.code().as_deref(), Some("57P03" | "53300")),
        _ => false,
    }
}

/// How long the first connection at start may be tried for before the start fails.
const FIRST_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects and applies the migrations of the URL's backend.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        let options: AnyConnectOptions = url.parse()?;
        // Plain connections first, retried until FIRST_CONNECT_TIMEOUT (a database that
        // is still starting refuses them for a while): the pool would retry for its 30 s
        // acquire timeout too, but then report only "pool timed out", hiding "connection
        // refused" or "password authentication failed".
        let deadline = tokio::time::Instant::now() + FIRST_CONNECT_TIMEOUT;
        let mut pause = std::time::Duration::from_millis(100);
        let mut last_reason: Option<String> = None;
        loop {
            let attempt =
                tokio::time::timeout_at(deadline, AnyConnection::connect_with(&options)).await;
            let unreachable = |reason: String| StoreError::Unreachable {
                url: redact_url(url),
                reason,
            };
            match attempt {
                Ok(Ok(probe)) => {
                    let _ = probe.close().await;
                    break;
                }
                // A wrong password or an unknown database stays so: said at once.
                Ok(Err(e)) if !may_pass(&e) => return Err(unreachable(e.to_string())),
                Ok(Err(e)) => last_reason = Some(e.to_string()),
                // Cut short by the deadline: an earlier attempt's reason says more.
                Err(_) => {
                    return Err(unreachable(last_reason.unwrap_or_else(|| {
                        format!("no answer within {} s", FIRST_CONNECT_TIMEOUT.as_secs())
                    })))
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(unreachable(last_reason.unwrap_or_default()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(2));
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 10 })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers (status polls, downloads) proceed while a worker writes.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Store { pool, backend })
    }

    /// The SQLite database file in `dir`, created on first use.
    pub fn sqlite_url(dir: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", dir.join("bdscan.sqlite").display())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database's clock now, in milliseconds since the Unix epoch.
    pub async fn clock_ms(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(&format!("SELECT {}", self.clock_sql()))
            .fetch_one(&self.pool)
            .await?;
        Ok(sqlx::Row::try_get(&row, 0)?)
    }

    /// The database's clock, in milliseconds since the Unix epoch, as an SQL expression.
    /// Every job and blob timestamp (creation, leases, backoffs, ends, uploads) is read
    /// from it rather than
    /// from this process's clock: replicas sharing a PostgreSQL queue then agree on when
    /// a lease runs out even when their own clocks disagree, where a replica whose clock
    /// ran a lease's length ahead would re-queue every job the others were running.
    /// Within one statement it reads the same instant everywhere it appears.
    pub fn clock_sql(&self) -> &'static str {
        match self.backend {
            // migrations/postgres/0008_database_clock.sql: the transaction's start time.
            Backend::Postgres => "bdscan_clock_ms()",
            // One host, but the same clock for both backends' statements; SQLite's 'now'
            // is fixed for the length of a statement. Rounded: the day fraction is a double.
            Backend::Sqlite => {
                "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"
            }
        }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Round-trips a trivial query (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch by this process's clock: the unit of every
/// timestamp in the store, though those come from the database's clock
/// ([`Store::clock_sql`], [`Store::clock_ms`]). This process's clock names staged uploads
/// (whose sweep waits a day) and measures what a view shows as still counting.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The URL with any password replaced, for logs and errors: in its user part, and as a
/// `password=` query parameter.
pub fn redact_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return redact_user_password(url);
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{}?{}", redact_user_password(base), query.join("&"))
}

fn redact_user_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=a@b&application_name=x"),
            "postgres://u@h/db?sslmode=require&password=***&application_name=x"
        );
        assert_eq!(
            redact_url("postgres://u:s@h/db?password=p"),
            "postgres://u:***@h/db?password=***"
        );
        assert_eq!(
            redact_url("sqlite://x.db?mode=rwc"),
            "sqlite://x.db?mode=rwc"
        );
    }
}

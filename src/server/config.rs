//! Settings of a running service, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Where jobs' scratch folders live (and the default SQLite database).
    pub data_dir: PathBuf,
    /// Worker tasks in this process; 0 serves the API only (tests drive workers by hand).
    pub workers: usize,
    /// Largest accepted blob (per file of a multipart scan).
    pub max_blob_bytes: u64,
    pub worker: WorkerSettings,
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The program run as each job's child process with `job --spec FILE`: this binary.
    pub exe: PathBuf,
    pub work_dir: PathBuf,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// How often idle workers look for queued jobs when nothing wakes them.
    pub poll_interval: Duration,
    pub reap_interval: Duration,
    /// Delay before a re-queued job runs again, times the attempts it has used.
    pub retry_backoff: Duration,
    /// How long a job's child has to stop after cancellation before it is killed.
    pub cancel_grace: Duration,
    /// libtorch threads per job when the job's config does not say.
    pub job_threads: Option<usize>,
    pub default_max_attempts: i64,
    /// Keep jobs' scratch folders after they finish (debugging).
    pub keep_work_dirs: bool,
}

impl ServerConfig {
    /// Defaults: SQLite in `data_dir`, one worker, 1 GiB blobs.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, exe: PathBuf) -> ServerConfig {
        ServerConfig {
            listen,
            database_url: crate::store::Store::sqlite_url(&data_dir),
            workers: 1,
            max_blob_bytes: 1 << 30,
            worker: WorkerSettings {
                exe,
                work_dir: data_dir.join("work"),
                lease: Duration::from_secs(30),
                heartbeat: Duration::from_secs(5),
                poll_interval: Duration::from_millis(500),
                reap_interval: Duration::from_secs(5),
                retry_backoff: Duration::from_secs(2),
                cancel_grace: Duration::from_secs(5),
                job_threads: None,
                default_max_attempts: 3,
                keep_work_dirs: false,
            },
            data_dir,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let w = &self.worker;
        if w.heartbeat >= w.lease {
            return Err(format!(
                "heartbeat ({:?}) must be shorter than the lease ({:?})",
                w.heartbeat, w.lease
            ));
        }
        if self.max_blob_bytes == 0 {
            return Err("max_blob_bytes must be positive".into());
        }
        if !(1..=100).contains(&w.default_max_attempts) {
            return Err("default_max_attempts must lie in 1..=100".into());
        }
        Ok(())
    }
}

/// The database URL never appears in logs with its password.
impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field(
                "database_url",
                &crate::store::redact_url(&self.database_url),
            )
            .field("data_dir", &self.data_dir)
            .field("workers", &self.workers)
            .field("max_blob_bytes", &self.max_blob_bytes)
            .field("worker", &self.worker)
            .finish()
    }
}

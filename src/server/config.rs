//! Settings of a running service, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tch::Device;

/// Well under the usual 1,024 open files a process may have, which the database
/// connections, job pipes and files also draw on.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Where jobs' scratch folders live (and the default SQLite database).
    pub data_dir: PathBuf,
    /// Worker tasks in this process; 0 serves the API only (tests drive workers by hand).
    /// Ignored when `devices` lists the slots.
    pub workers: usize,
    /// One job slot per entry, each running its jobs on that libtorch device; empty:
    /// `workers` CPU slots.
    pub devices: Vec<Device>,
    /// Largest accepted blob (per file of a multipart scan).
    pub max_blob_bytes: u64,
    /// Most bytes the store may hold (stored blobs and uploads arriving); `None`: no limit.
    pub max_store_bytes: Option<u64>,
    /// Most jobs that may wait in the queue; `None`: no limit.
    pub max_queued_jobs: Option<u64>,
    /// A request body that sends nothing for this long is cut off (a stalled or
    /// deliberately trickling client would otherwise hold its upload open for ever).
    pub body_idle_timeout: Duration,
    /// A connection that has not sent a request's headers this long after it opened
    /// (or after its previous request) is closed: the slow-headers attack, one
    /// connection held open per few bytes.
    pub header_read_timeout: Duration,
    /// A connection whose response makes no progress this long (the client reads
    /// nothing) is closed: otherwise pipelined requests it never reads hold its slot,
    /// and the connection cap, for ever.
    pub write_stall_timeout: Duration,
    /// Fewest bytes a second a request body must average, judged from
    /// `min_body_rate_after` past its first read on (0: no minimum): a body trickling in
    /// just faster than `body_idle_timeout` held its connection for days.
    pub min_body_rate: u64,
    pub min_body_rate_after: Duration,
    /// After shutdown begins, how long open connections (an upload still streaming
    /// in) may take to finish before they are closed.
    pub shutdown_grace: Duration,
    /// Most connections open at once. Past it the server stops accepting until one
    /// closes (new ones wait in the kernel's backlog): uploads, `?wait` requests and
    /// idle keep-alive connections each hold one, and each holds a file descriptor.
    pub max_connections: usize,
    /// The bearer token every `/v1` resource request must carry; `None`: the API is
    /// open (see `auth`).
    pub api_token: Option<String>,
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
    /// Most private writable memory (RLIMIT_DATA) a job's child on a CPU slot may map,
    /// in bytes; `None`: no limit. CUDA slots are not limited (see `Worker::memory_limit`).
    pub job_memory_limit: Option<u64>,
    /// Confine each job's child with Landlock (see `sandbox`); off only where the
    /// sandbox gets in the way of a device's drivers.
    pub job_sandbox: bool,
    /// How long one attempt at a job may run before it is stopped and fails with
    /// `timed_out` (a model that loops for ever would hold its slot for good); `None`:
    /// no limit.
    pub job_timeout: Option<Duration>,
    /// How long a finished job (its report, its purified model, and the inputs no
    /// other job uses) is kept before the reaper deletes it, and an upload no job uses;
    /// `None`: for ever.
    pub job_retention: Option<Duration>,
    /// With a retention set, the youngest an unused upload may be deleted at: a client
    /// uploading a model and then a large bundle must not lose the first before it
    /// names both in a job, however short the retention.
    pub unused_blob_min_age: Duration,
}

impl ServerConfig {
    /// Defaults: SQLite in `data_dir`, one worker, 1 GiB blobs.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, exe: PathBuf) -> ServerConfig {
        ServerConfig {
            listen,
            database_url: crate::store::Store::sqlite_url(&data_dir),
            workers: 1,
            devices: Vec::new(),
            max_blob_bytes: 1 << 30,
            max_store_bytes: None,
            max_queued_jobs: None,
            body_idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            min_body_rate_after: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(20),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            api_token: None,
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
                job_sandbox: true,
                job_memory_limit: None,
                job_timeout: None,
                job_retention: None,
                unused_blob_min_age: Duration::from_secs(24 * 3600),
            },
            data_dir,
        }
    }

    /// The device of every job slot of this process.
    pub fn slot_devices(&self) -> Vec<Device> {
        if self.devices.is_empty() {
            vec![Device::Cpu; self.workers]
        } else {
            self.devices.clone()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let cuda_devices = || tch::Cuda::device_count().max(0) as usize;
        for device in &self.devices {
            if let Device::Cuda(index) = *device {
                let available = cuda_devices();
                if index >= available {
                    return Err(format!(
                        "devices: {} is not available: libtorch sees {available} CUDA device(s) on this machine",
                        device_name(*device)
                    ));
                }
            }
        }
        let w = &self.worker;
        if w.heartbeat >= w.lease {
            return Err(format!(
                "heartbeat ({:?}) must be shorter than the lease ({:?})",
                w.heartbeat, w.lease
            ));
        }
        if let Some(problem) = self
            .api_token
            .as_deref()
            .and_then(super::auth::token_problem)
        {
            return Err(problem);
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_blob_bytes == 0 {
            return Err("max_blob_bytes must be positive".into());
        }
        if !(1..=100).contains(&w.default_max_attempts) {
            // Named as `serve` takes it (`max_attempts`, `--max-attempts`).
            return Err("max_attempts must lie in [1, 100]".into());
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
            .field("devices", &self.devices)
            .field("max_blob_bytes", &self.max_blob_bytes)
            .field("max_store_bytes", &self.max_store_bytes)
            .field("max_queued_jobs", &self.max_queued_jobs)
            .field("body_idle_timeout", &self.body_idle_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("write_stall_timeout", &self.write_stall_timeout)
            .field("min_body_rate", &self.min_body_rate)
            .field("min_body_rate_after", &self.min_body_rate_after)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_connections", &self.max_connections)
            .field("api_token", &self.api_token.as_ref().map(|_| "<set>"))
            .field("worker", &self.worker)
            .finish()
    }
}

/// `cpu` or `cuda:N`: how devices are written in settings, job configs and the store.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}

/// Parses `cpu` or `cuda:N` (bare `cuda` is `cuda:0`).
pub fn parse_device(spec: &str) -> Result<Device, String> {
    crate::engine::config::parse_device(spec.trim()).map_err(|e| e.to_string())
}

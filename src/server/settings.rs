//! The settings of `bdscan serve`, in layers: command-line flags, then environment
//! variables, then a TOML file (`--config`/`BDSCAN_CONFIG`), then defaults. Each layer is
//! a [`ServeSettings`] with every key optional; [`ServeSettings::or`] stacks them and
//! [`ServeSettings::into_config`] fills in the defaults and checks the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::config::{parse_device, ServerConfig};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./.data";
pub const DEFAULT_WORKERS: usize = 1;
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 1 << 30;
pub const DEFAULT_LEASE_SECS: u64 = 30;
/// Longest lease a worker may be configured with (one day).
pub const MAX_LEASE_SECS: u64 = 86_400;
pub const DEFAULT_MAX_ATTEMPTS: i64 = 3;
/// The smallest `job_memory_limit` accepted: libtorch and a small model's scan fit.
pub const MIN_JOB_MEMORY_LIMIT: u64 = 1 << 30;
/// Most job slots one process may have: each is a task and, when busy, a process.
pub const MAX_WORKERS: usize = 1024;
/// Longest `job_timeout_secs` (a year): past about 9·10^18 s a deadline overflows.
pub const MAX_JOB_TIMEOUT_SECS: u64 = 365 * 86_400;
/// Longest `job_retention_secs` (100 years: "for ever" is leaving it unset). Past about
/// 9·10^15 s the cutoff in milliseconds wrapped below zero and deleted everything.
pub const MAX_JOB_RETENTION_SECS: u64 = 100 * 365 * 86_400;

/// One layer of settings. The keys are the flags' names (`data_dir` or `data-dir`).
#[derive(Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    pub listen: Option<SocketAddr>,
    #[serde(alias = "data-dir")]
    pub data_dir: Option<PathBuf>,
    #[serde(alias = "database-url")]
    pub database_url: Option<String>,
    pub workers: Option<usize>,
    /// `cpu`, `cuda:N`: one job slot each.
    pub devices: Option<Vec<String>>,
    #[serde(alias = "max-blob-bytes")]
    pub max_blob_bytes: Option<u64>,
    #[serde(alias = "job-threads")]
    pub job_threads: Option<usize>,
    #[serde(alias = "lease-secs")]
    pub lease_secs: Option<u64>,
    #[serde(alias = "max-attempts")]
    pub max_attempts: Option<i64>,
    /// Most bytes the store may hold in all (stored and arriving files); unset: no limit.
    #[serde(alias = "max-store-bytes")]
    pub max_store_bytes: Option<u64>,
    /// Most jobs that may wait in the queue; unset: no limit.
    #[serde(alias = "max-queued-jobs")]
    pub max_queued_jobs: Option<u64>,
    /// Most connections open at once; unset: `DEFAULT_MAX_CONNECTIONS`.
    #[serde(alias = "max-connections")]
    pub max_connections: Option<usize>,
    /// Most private writable memory a job's process on a CPU slot may map, in bytes;
    /// unset: no limit.
    #[serde(alias = "job-memory-limit")]
    pub job_memory_limit: Option<u64>,
    /// Seconds one attempt at a job may run before it fails with `timed_out`; unset: no
    /// limit.
    #[serde(alias = "job-timeout-secs")]
    pub job_timeout_secs: Option<u64>,
    /// Seconds a finished job is kept before it is deleted, and an upload no job uses
    /// (for at least a day); unset: for ever.
    #[serde(alias = "job-retention-secs")]
    pub job_retention_secs: Option<u64>,
    /// Confine each job's process with Landlock; unset: true.
    #[serde(alias = "job-sandbox")]
    pub job_sandbox: Option<bool>,
    /// The bearer token of the API; unset: no authentication.
    #[serde(alias = "api-token")]
    pub api_token: Option<String>,
}

impl ServeSettings {
    /// Parses a TOML settings file; unknown keys are refused, naming the known ones.
    pub fn from_toml(text: &str) -> Result<ServeSettings, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    pub fn from_file(path: &Path) -> Result<ServeSettings, String> {
        let text = crate::engine::config::read_settings_file(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        ServeSettings::from_toml(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// This layer, with `lower` filling the keys it leaves unset.
    pub fn or(self, lower: ServeSettings) -> ServeSettings {
        ServeSettings {
            listen: self.listen.or(lower.listen),
            data_dir: self.data_dir.or(lower.data_dir),
            database_url: self.database_url.or(lower.database_url),
            workers: self.workers.or(lower.workers),
            devices: self.devices.or(lower.devices),
            max_blob_bytes: self.max_blob_bytes.or(lower.max_blob_bytes),
            job_threads: self.job_threads.or(lower.job_threads),
            lease_secs: self.lease_secs.or(lower.lease_secs),
            max_attempts: self.max_attempts.or(lower.max_attempts),
            max_store_bytes: self.max_store_bytes.or(lower.max_store_bytes),
            max_queued_jobs: self.max_queued_jobs.or(lower.max_queued_jobs),
            max_connections: self.max_connections.or(lower.max_connections),
            job_memory_limit: self.job_memory_limit.or(lower.job_memory_limit),
            job_timeout_secs: self.job_timeout_secs.or(lower.job_timeout_secs),
            job_retention_secs: self.job_retention_secs.or(lower.job_retention_secs),
            job_sandbox: self.job_sandbox.or(lower.job_sandbox),
            api_token: self.api_token.or(lower.api_token),
        }
    }

    /// The service configuration: defaults for unset keys, job slots from `workers` or
    /// `devices`, CPU threads divided between the slots. `exe` runs each job.
    pub fn into_config(self, exe: PathBuf) -> Result<ServerConfig, String> {
        let listen = match self.listen {
            Some(listen) => listen,
            None => DEFAULT_LISTEN.parse().map_err(|e| format!("listen: {e}"))?,
        };
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let mut config = ServerConfig::new(listen, data_dir, exe);
        if let Some(url) = self.database_url.filter(|u| !u.trim().is_empty()) {
            config.database_url = url;
        }
        let devices = self
            .devices
            .unwrap_or_default()
            .iter()
            .filter(|d| !d.trim().is_empty())
            .map(|d| parse_device(d).map_err(|e| format!("devices: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        config.workers = match self.workers {
            Some(n) if !devices.is_empty() && n != devices.len() => {
                return Err(format!(
                    "workers ({n}) and devices ({} listed) disagree: give one of them",
                    devices.len()
                ))
            }
            Some(n) => n,
            None if devices.is_empty() => DEFAULT_WORKERS,
            None => devices.len(),
        };
        if config.workers > MAX_WORKERS {
            return Err(format!("workers must be at most {MAX_WORKERS}"));
        }
        config.devices = devices;
        config.max_blob_bytes = self.max_blob_bytes.unwrap_or(DEFAULT_MAX_BLOB_BYTES);
        // 0 would refuse every upload or job: a server that only says no.
        if self.max_store_bytes == Some(0) || self.max_queued_jobs == Some(0) {
            return Err(
                "max_store_bytes and max_queued_jobs must be at least 1 (unset: no limit)".into(),
            );
        }
        config.max_store_bytes = self.max_store_bytes;
        config.max_queued_jobs = self.max_queued_jobs;
        if let Some(max) = self.max_connections {
            config.max_connections = max;
        }
        // Below a few hundred MiB not even libtorch's own start-up fits: every job
        // would fail, so the server refuses to start instead.
        if let Some(limit) = self.job_memory_limit {
            if limit < MIN_JOB_MEMORY_LIMIT {
                return Err(format!(
                    "job_memory_limit must be at least {MIN_JOB_MEMORY_LIMIT} bytes (1 GiB)"
                ));
            }
        }
        config.worker.job_memory_limit = self.job_memory_limit;
        if self
            .job_timeout_secs
            .is_some_and(|secs| !(1..=MAX_JOB_TIMEOUT_SECS).contains(&secs))
        {
            return Err(format!(
                "job_timeout_secs must lie in [1, {MAX_JOB_TIMEOUT_SECS}] (a year; unset: no limit)"
            ));
        }
        config.worker.job_timeout = self.job_timeout_secs.map(Duration::from_secs);
        config.worker.job_sandbox = self.job_sandbox.unwrap_or(true);
        // Under a minute, a client polling its job could miss the outcome altogether.
        if self
            .job_retention_secs
            .is_some_and(|secs| !(60..=MAX_JOB_RETENTION_SECS).contains(&secs))
        {
            return Err(format!(
                "job_retention_secs must lie in [60, {MAX_JOB_RETENTION_SECS}] (100 years; unset: for ever)"
            ));
        }
        config.worker.job_retention = self.job_retention_secs.map(Duration::from_secs);
        // An empty token (`BDSCAN_API_TOKEN=` in an environment file) is refused like a
        // short one, not taken for "no token": that would open the API without a word.
        config.api_token = self.api_token;
        // Divide the CPU between job slots so concurrent scans do not fight over cores.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slots = config.slot_devices().len();
        let max_threads = crate::engine::config::MAX_THREADS;
        if self
            .job_threads
            .is_some_and(|t| !(1..=max_threads).contains(&t))
        {
            // A count libtorch refuses, or each job's own config check does, would crash
            // or fail every job instead of the server refusing to start.
            return Err(format!("job_threads must lie in [1, {max_threads}]"));
        }
        config.worker.job_threads = self
            .job_threads
            .or_else(|| (slots > 0).then(|| (cores / slots).max(1)));
        let lease_secs = self.lease_secs.unwrap_or(DEFAULT_LEASE_SECS);
        // A lease is renewed every few seconds; a day is far past any sane value, and
        // past about 10^15 seconds the lease deadline would overflow.
        if !(1..=MAX_LEASE_SECS).contains(&lease_secs) {
            return Err(format!("lease_secs must lie in [1, {MAX_LEASE_SECS}]"));
        }
        config.worker.lease = Duration::from_secs(lease_secs);
        // Renew well before the lease runs out, so a few slow beats do not lose it.
        config.worker.heartbeat = config.worker.lease / 6;
        config.worker.default_max_attempts = self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        config.validate()?;
        Ok(config)
    }
}

/// The database URL never appears in logs with its password.
impl std::fmt::Debug for ServeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeSettings")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(crate::store::redact_url),
            )
            .field("workers", &self.workers)
            .field("devices", &self.devices)
            .field("max_blob_bytes", &self.max_blob_bytes)
            .field("job_threads", &self.job_threads)
            .field("lease_secs", &self.lease_secs)
            .field("max_attempts", &self.max_attempts)
            .field("max_store_bytes", &self.max_store_bytes)
            .field("max_queued_jobs", &self.max_queued_jobs)
            .field("max_connections", &self.max_connections)
            .field("job_memory_limit", &self.job_memory_limit)
            .field("job_timeout_secs", &self.job_timeout_secs)
            .field("job_retention_secs", &self.job_retention_secs)
            .field("job_sandbox", &self.job_sandbox)
            .field("api_token", &self.api_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe() -> PathBuf {
        PathBuf::from("/bin/true")
    }

    #[test]
    fn higher_layers_win_key_by_key_and_defaults_fill_the_rest() {
        let flags = ServeSettings {
            workers: Some(3),
            ..Default::default()
        };
        let env = ServeSettings {
            workers: Some(5),
            lease_secs: Some(60),
            ..Default::default()
        };
        let file = ServeSettings::from_toml(
            "workers = 7\nlease_secs = 90\nmax-blob-bytes = 1000\ndata_dir = \"/srv/bdscan\"\n\
             max_store_bytes = 5000\nmax-queued-jobs = 12\nmax_connections = 64\n\
             job-memory-limit = 8589934592\njob_timeout_secs = 3600\n\
             job_retention_secs = 604800\njob-sandbox = false\n",
        )
        .unwrap();
        assert!(
            ServeSettings::default()
                .into_config(exe())
                .unwrap()
                .worker
                .job_sandbox
        );
        let config = flags.or(env).or(file).into_config(exe()).unwrap();
        assert!(!config.worker.job_sandbox);
        assert_eq!(config.max_store_bytes, Some(5000));
        assert_eq!(config.max_queued_jobs, Some(12));
        assert_eq!(config.max_connections, 64);
        assert_eq!(config.worker.job_memory_limit, Some(8 << 30));
        assert_eq!(config.worker.job_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(
            config.worker.job_retention,
            Some(Duration::from_secs(604_800))
        );
        assert_eq!(config.workers, 3, "flag over env over file");
        assert_eq!(
            config.worker.lease,
            Duration::from_secs(60),
            "env over file"
        );
        assert_eq!(config.worker.heartbeat, Duration::from_secs(10));
        assert_eq!(config.max_blob_bytes, 1000, "file over default");
        assert_eq!(config.data_dir, PathBuf::from("/srv/bdscan"));
        assert_eq!(
            config.listen,
            DEFAULT_LISTEN.parse::<SocketAddr>().unwrap(),
            "default"
        );
        assert_eq!(config.worker.default_max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert!(config.database_url.starts_with("sqlite://"));
    }

    #[test]
    fn unknown_and_mistyped_keys_are_refused_with_what_to_fix() {
        let error = ServeSettings::from_toml("workers = 2\ncolour = \"red\"\n").unwrap_err();
        assert!(error.contains("unknown field `colour`"), "{error}");
        assert!(error.contains("data_dir"), "names the known keys: {error}");
        let error = ServeSettings::from_toml("workers = \"two\"\n").unwrap_err();
        assert!(error.contains("workers"), "{error}");
        let error = ServeSettings::from_toml("listen = \"localhost\"\n").unwrap_err();
        assert!(error.contains("listen"), "{error}");
    }

    #[test]
    fn devices_make_one_slot_each_and_threads_are_divided() {
        let file = ServeSettings::from_toml("devices = [\"cpu\", \"cpu\"]\n").unwrap();
        let config = file.into_config(exe()).unwrap();
        assert_eq!(config.slot_devices(), vec![tch::Device::Cpu; 2]);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config.worker.job_threads, Some((cores / 2).max(1)));

        let bad = ServeSettings {
            devices: Some(vec!["cpu".into(), "gpu0".into()]),
            ..Default::default()
        };
        let error = bad.into_config(exe()).unwrap_err();
        assert!(error.contains("gpu0"), "{error}");
        let disagreeing = ServeSettings {
            workers: Some(1),
            devices: Some(vec!["cpu".into(), "cpu".into()]),
            ..Default::default()
        };
        assert!(disagreeing
            .into_config(exe())
            .unwrap_err()
            .contains("disagree"));
    }

    #[test]
    fn lease_lengths_outside_a_day_are_refused() {
        for toml in ["lease_secs = 0\n", "lease_secs = 9223372036854775807\n"] {
            let error = ServeSettings::from_toml(toml)
                .unwrap()
                .into_config(exe())
                .unwrap_err();
            assert!(error.contains("lease_secs"), "{error}");
        }
    }

    #[test]
    fn limits_no_job_or_connection_could_live_under_are_refused_at_startup() {
        for (toml, key) in [
            ("max_connections = 0\n", "max_connections"),
            ("job_memory_limit = 1000000\n", "job_memory_limit"),
            ("job_timeout_secs = 0\n", "job_timeout_secs"),
            ("job_retention_secs = 5\n", "job_retention_secs"),
            // Values past these overflowed: a worker's deadline panicked, and a
            // retention cutoff in the future deleted every finished job.
            (
                "job_timeout_secs = 9223372036854775807\n",
                "job_timeout_secs",
            ),
            (
                "job_retention_secs = 10000000000000000\n",
                "job_retention_secs",
            ),
            ("workers = 100000000\n", "workers must be at most 1024"),
            ("max_store_bytes = 0\n", "max_store_bytes"),
            ("max_queued_jobs = 0\n", "max_queued_jobs"),
            ("max_attempts = 0\n", "max_attempts must lie in [1, 100]"),
        ] {
            let error = ServeSettings::from_toml(toml)
                .unwrap()
                .into_config(exe())
                .unwrap_err();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn job_threads_out_of_range_are_refused_at_startup() {
        for threads in ["0", "1025", "4294967296"] {
            let error = ServeSettings::from_toml(&format!("job_threads = {threads}\n"))
                .unwrap()
                .into_config(exe())
                .unwrap_err();
            assert!(
                error.contains("job_threads must lie in [1, 1024]"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_readme_example_file_parses() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a TOML example") + 8;
        let length = readme[start..].find("```").unwrap();
        let example = ServeSettings::from_toml(&readme[start..start + length]).unwrap();
        assert_eq!(
            example.devices,
            Some(vec!["cpu".to_string(), "cuda:0".to_string()])
        );
        assert_eq!(example.max_attempts, Some(3));
        assert_eq!(example.job_memory_limit, Some(16 << 30));
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let token = "hunter2".repeat(6);
        let settings = ServeSettings {
            database_url: Some("postgres://u:hunter2@db/bdscan".into()),
            api_token: Some(token.clone()),
            ..Default::default()
        };
        assert!(!format!("{settings:?}").contains("hunter2"));
        let config = settings.into_config(exe()).unwrap();
        assert_eq!(config.api_token.as_deref(), Some(token.as_str()));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn a_guessable_or_empty_api_token_is_refused_at_startup() {
        let file = ServeSettings::from_toml(&format!("api_token = \"{}\"\n", "k".repeat(40)));
        for toml in ["api_token = \"letmein\"\n", "api_token = \"\"\n"] {
            let error = ServeSettings::from_toml(toml)
                .unwrap()
                .into_config(exe())
                .unwrap_err();
            assert!(error.contains("at least 32 characters"), "{error}");
        }
        // An empty variable over a file that has a token does not switch it off.
        let empty_env = ServeSettings {
            api_token: Some(String::new()),
            ..Default::default()
        };
        assert!(empty_env.or(file.unwrap()).into_config(exe()).is_err());
    }
}

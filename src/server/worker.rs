//! Workers: claim a job, run its scan in a child process, relay progress and keep the
//! lease alive, then record the outcome. Plus the reaper that re-queues jobs whose
//! worker vanished.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::child::{ChildError, JobSpec, ProgressLine, EXIT_CANCELLED};
use super::config::WorkerSettings;
use super::metrics::Metrics;
use crate::engine::ScanConfig;
use crate::store::{Claimed, JobState, Store, StoreError};

/// How often progress is written to the database at most (phase changes always are).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Lines of the child's stderr kept to explain a crash.
const STDERR_TAIL: usize = 20;

#[derive(Clone)]
pub struct Worker {
    store: Store,
    settings: Arc<WorkerSettings>,
    metrics: Arc<Metrics>,
    id: String,
    /// This slot's libtorch device: every job it claims runs there.
    device: String,
}

/// How one attempt at a job ended.
#[derive(Debug)]
enum Outcome {
    Succeeded {
        report: String,
        artifact: PathBuf,
    },
    Failed {
        code: String,
        message: String,
    },
    Cancelled,
    /// Another worker (after a reap) or the reaper owns the job now.
    LeaseLost,
    /// The service is stopping: the job goes back to the queue.
    ShutDown,
}

impl Worker {
    pub fn new(
        store: Store,
        settings: Arc<WorkerSettings>,
        metrics: Arc<Metrics>,
        id: impl Into<String>,
        device: tch::Device,
    ) -> Worker {
        Worker {
            store,
            settings,
            metrics,
            id: id.into(),
            device: super::config::device_name(device),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// Runs until `shutdown`, waking on `wake` or every poll interval.
    pub async fn run(self, shutdown: CancellationToken, wake: Arc<Notify>) {
        tracing::info!(worker = %self.id, device = %self.device, "worker started");
        while !shutdown.is_cancelled() {
            match self.run_once(&shutdown).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => tracing::error!(worker = %self.id, "worker: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
        tracing::info!(worker = %self.id, "worker stopped");
    }

    /// Claims and runs one job, if one is queued; returns the state it left the job in.
    pub async fn run_once(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<JobState>, StoreError> {
        let lease_ms = self.settings.lease.as_millis() as i64;
        let Some(claimed) = self
            .store
            .claim_job_on(&self.id, lease_ms, &self.device)
            .await?
        else {
            return Ok(None);
        };
        let job_id = claimed.job.id.clone();
        tracing::info!(worker = %self.id, job = %job_id, attempt = claimed.job.attempts, "job started");
        let dir = self
            .settings
            .work_dir
            .join(format!("{}-{}", job_id, claimed.job.attempts));
        let outcome = match self.execute(&claimed, &dir, shutdown).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed {
                code: "internal".into(),
                message: format!("preparing the job: {e}"),
            },
        };
        let state = self.record(&claimed, outcome).await?;
        if !self.settings.keep_work_dirs {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        tracing::info!(worker = %self.id, job = %job_id, ?state, "job ended");
        Ok(Some(state))
    }

    async fn record(&self, claimed: &Claimed, outcome: Outcome) -> Result<JobState, StoreError> {
        let store = &self.store;
        let (state, owned) = match outcome {
            Outcome::Succeeded { report, artifact } => {
                let blob = store.put_file(&artifact).await?;
                (
                    JobState::Succeeded,
                    store
                        .finish_succeeded(claimed, &report, &blob.sha256)
                        .await?,
                )
            }
            Outcome::Failed { code, message } => (
                JobState::Failed,
                store
                    .finish_unsuccessful(claimed, JobState::Failed, &code, &message)
                    .await?,
            ),
            Outcome::Cancelled => (
                JobState::Cancelled,
                store
                    .finish_unsuccessful(
                        claimed,
                        JobState::Cancelled,
                        "cancelled",
                        "cancelled by request",
                    )
                    .await?,
            ),
            Outcome::LeaseLost => return Ok(JobState::Running),
            Outcome::ShutDown => {
                store.release(claimed).await?;
                return Ok(JobState::Queued);
            }
        };
        if owned {
            self.metrics.record_outcome(state);
            if let Some(started) = claimed.job.started_at {
                let seconds = (crate::store::now_ms() - started).max(0) as f64 / 1000.0;
                self.metrics.job_duration.observe(seconds);
            }
        } else {
            tracing::warn!(job = %claimed.job.id, "lost the lease before recording the outcome; discarded");
        }
        Ok(if owned { state } else { JobState::Running })
    }

    async fn execute(
        &self,
        claimed: &Claimed,
        dir: &Path,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, String> {
        let job = &claimed.job;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let fetch = |sha: String, name: &'static str| {
            let path = dir.join(name);
            async move {
                self.store
                    .write_blob_to(&sha, &path)
                    .await
                    .map(|()| path)
                    .map_err(|e| e.to_string())
            }
        };
        let mut config: ScanConfig =
            serde_json::from_str(&job.config).map_err(|e| format!("stored config: {e}"))?;
        if config.threads.is_none() {
            config.threads = self.settings.job_threads;
        }
        // The slot's device wins: a job that asked for a device was only claimable by a
        // slot on it, and one that did not runs wherever it was claimed.
        config.device = self.device.clone();
        let spec = JobSpec {
            model: fetch(job.model_sha256.clone(), "model.pt").await?,
            clean: fetch(job.clean_sha256.clone(), "clean.bundle").await?,
            test: match &job.test_sha256 {
                Some(sha) => Some(fetch(sha.clone(), "test.bundle").await?),
                None => None,
            },
            poison: match &job.poison_sha256 {
                Some(sha) => Some(fetch(sha.clone(), "poison.bundle").await?),
                None => None,
            },
            target_label: job.target_label,
            config,
            artifact: dir.join("purified.pt"),
            report: dir.join("report.json"),
            error: dir.join("error.json"),
        };
        let spec_path = dir.join("spec.json");
        let spec_json = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
        tokio::fs::write(&spec_path, spec_json)
            .await
            .map_err(|e| format!("writing the job spec: {e}"))?;
        self.supervise(claimed, &spec, &spec_path, shutdown).await
    }

    /// Runs the child and watches it: progress, heartbeats, cancellation, exit.
    async fn supervise(
        &self,
        claimed: &Claimed,
        spec: &JobSpec,
        spec_path: &Path,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, String> {
        let mut child = Command::new(&self.settings.exe)
            .arg("job")
            .arg("--spec")
            .arg(spec_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.settings.exe.display()))?;
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_reader = child.stderr.take().map(|stderr| {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            })
        });
        let lease_ms = self.settings.lease.as_millis() as i64;
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat);
        heartbeat.tick().await;
        let mut last_progress: Option<(String, Instant)> = None;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut cancelling = false;

        enum Event {
            Exited(std::io::Result<ExitStatus>),
            Line(Option<String>),
            Heartbeat,
            Shutdown,
            KillNow,
        }
        let status = loop {
            let event = tokio::select! {
                status = child.wait() => Event::Exited(status),
                line = async { stdout.as_mut().expect("guarded").next_line().await }, if stdout.is_some() => {
                    Event::Line(line.ok().flatten())
                }
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = shutdown.cancelled() => Event::Shutdown,
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() => Event::KillNow,
            };
            match event {
                Event::Exited(status) => {
                    break status.map_err(|e| format!("waiting for the scan process: {e}"))?
                }
                Event::Line(None) => stdout = None,
                Event::Line(Some(line)) => {
                    let Ok(progress) = serde_json::from_str::<ProgressLine>(&line) else {
                        continue;
                    };
                    let due = match &last_progress {
                        Some((phase, at)) => {
                            *phase != progress.phase || at.elapsed() >= PROGRESS_EVERY
                        }
                        None => true,
                    };
                    if due {
                        let (step, total) = (progress.step as i64, progress.total as i64);
                        if let Err(e) = self
                            .store
                            .record_progress(claimed, &progress.phase, step, total)
                            .await
                        {
                            tracing::warn!(job = %claimed.job.id, "recording progress: {e}");
                        }
                        last_progress = Some((progress.phase, Instant::now()));
                    }
                }
                Event::Heartbeat => match self.store.heartbeat(claimed, lease_ms).await {
                    Ok(None) => {
                        let _ = child.kill().await;
                        return Ok(Outcome::LeaseLost);
                    }
                    Ok(Some(true)) if !cancelling => {
                        // Closing stdin asks the scan to stop at its next step.
                        cancelling = true;
                        stdin = None;
                        kill_at = Some(tokio::time::Instant::now() + self.settings.cancel_grace);
                    }
                    Ok(Some(_)) => {}
                    // A database hiccup: keep going; the lease outlives a few missed beats.
                    Err(e) => tracing::warn!(job = %claimed.job.id, "heartbeat: {e}"),
                },
                Event::Shutdown => {
                    let _ = child.kill().await;
                    return Ok(Outcome::ShutDown);
                }
                Event::KillNow => {
                    let _ = child.kill().await;
                    return Ok(Outcome::Cancelled);
                }
            }
        };
        drop(stdin);
        if cancelling || status.code() == Some(i32::from(EXIT_CANCELLED)) {
            return Ok(Outcome::Cancelled);
        }
        if status.success() {
            let report = tokio::fs::read_to_string(&spec.report)
                .await
                .map_err(|e| format!("the scan process exited without a report: {e}"))?;
            return Ok(Outcome::Succeeded {
                report,
                artifact: spec.artifact.clone(),
            });
        }
        if status.code().is_some() {
            if let Ok(text) = tokio::fs::read_to_string(&spec.error).await {
                if let Ok(error) = serde_json::from_str::<ChildError>(&text) {
                    return Ok(Outcome::Failed {
                        code: error.code,
                        message: error.message,
                    });
                }
            }
        }
        // The child has exited, so its stderr is at end of file: let the reader take the
        // last lines (a crash message is written just before the signal), but do not wait
        // on a pipe some grandchild may still hold open.
        if let Some(reader) = stderr_reader {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
        let tail = stderr_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Outcome::Failed {
            code: "worker_crashed".into(),
            message: crash_message(status, &tail),
        })
    }
}

fn crash_message(status: ExitStatus, stderr_tail: &str) -> String {
    #[cfg(unix)]
    let how = {
        use std::os::unix::process::ExitStatusExt;
        match (status.signal(), status.code()) {
            (Some(signal), _) => format!("killed by signal {signal}{}", signal_name(signal)),
            (None, Some(code)) => format!("exited with code {code}"),
            (None, None) => "ended abnormally".to_string(),
        }
    };
    #[cfg(not(unix))]
    let how = format!("exited with {status}");
    let mut message = format!("the scan process {how}");
    if !stderr_tail.trim().is_empty() {
        message.push_str("; its last output: ");
        message.push_str(stderr_tail.trim());
    }
    message
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        4 => " (SIGILL)",
        6 => " (SIGABRT)",
        7 => " (SIGBUS)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        _ => "",
    }
}

/// Re-queues jobs whose lease expired, until `shutdown`.
pub async fn run_reaper(
    store: Store,
    settings: Arc<WorkerSettings>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let backoff_ms = settings.retry_backoff.as_millis() as i64;
    loop {
        match store.reap_expired(backoff_ms).await {
            Ok(reaped) => {
                let n = reaped.requeued.len() + reaped.failed.len() + reaped.cancelled.len();
                if n > 0 {
                    tracing::warn!(?reaped, "reaped expired leases");
                    metrics
                        .leases_reaped
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(e) => tracing::error!("reaper: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(settings.reap_interval) => {}
        }
    }
}

/// Wakes this process's idle workers when any instance queues a job (PostgreSQL
/// `LISTEN`); polling remains the fallback when the listener is down.
pub async fn relay_queue_notifications(
    database_url: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        match sqlx::postgres::PgListener::connect(&database_url).await {
            Ok(mut listener) => match listener.listen(crate::store::jobs::JOBS_CHANNEL).await {
                Ok(()) => loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        received = listener.recv() => match received {
                            Ok(_) => wake.notify_waiters(),
                            Err(e) => {
                                tracing::warn!("queue notifications: {e}");
                                break;
                            }
                        },
                    }
                },
                Err(e) => tracing::warn!("queue notifications: LISTEN failed: {e}"),
            },
            Err(e) => tracing::warn!("queue notifications: connecting: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

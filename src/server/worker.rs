//! Workers: claim a job, run its scan in a child process, relay progress and keep the
//! lease alive, then record the outcome. Plus the reaper that re-queues jobs whose
//! worker vanished.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::child::{
    memory_limit_message, out_of_memory_message, ChildError, JobSpec, ProgressLine, EXIT_CANCELLED,
    MEMORY_LIMIT_CODE, OUT_OF_MEMORY_CODE,
};
use super::config::WorkerSettings;
use super::metrics::Metrics;
use super::sandbox::Confinement;
use crate::engine::ScanConfig;
use crate::store::blobs::open_regular_file;
use crate::store::{Claimed, JobState, Store, StoreError};

/// How often progress is written to the database at most (phase changes always are).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Tries of a store step that ends or prepares an attempt (see `Worker::record`), the
/// first wait between them, doubled after each: five tries over 7.5 s of waits, plus
/// each try's own wait for a busy database.
const STORE_TRIES: u32 = 5;
const STORE_RETRY_FIRST_WAIT: Duration = Duration::from_millis(500);
/// Lines of the child's stderr kept to explain a crash.
const STDERR_TAIL: usize = 20;
/// How often the reaper looks for chunks of uploads abandoned by a process that died.
const STAGING_SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// An upload this old and unfinished is abandoned: no upload takes a day.
const STAGING_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Jobs past their retention deleted per reaper round: a backlog (retention just
/// turned on over a year of jobs) drains over rounds without one long pause.
const RETENTION_BATCH: i64 = 100;
/// Longest line read from the child's stdout or stderr; the rest of a longer one is
/// skipped. A hostile model steers that output (TorchScript `print`), and the server
/// holds each line in memory.
const MAX_CHILD_LINE: usize = 64 * 1024;
/// Longest progress phase name stored, in characters.
const MAX_PHASE_CHARS: usize = 64;
/// Longest error message stored, in characters.
const MAX_MESSAGE_CHARS: usize = 4096;

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

    /// The memory limit of this slot's jobs: `job_memory_limit` on a CPU slot, none on a
    /// CUDA one. The CUDA runtime maps host memory of its own (pinned buffers, its
    /// libraries' data) that a limit sized for the scan would cut short, and no CUDA
    /// machine was at hand to find a limit that works there.
    fn memory_limit(&self) -> Option<u64> {
        (self.device == "cpu")
            .then_some(self.settings.job_memory_limit)
            .flatten()
    }

    /// Runs until `shutdown`, waking on `wake` or every poll interval.
    pub async fn run(self, shutdown: CancellationToken, wake: Arc<Notify>) {
        tracing::info!(worker = %self.id, device = %self.device, "worker started");
        if self.settings.job_memory_limit.is_some() && self.memory_limit().is_none() {
            tracing::warn!(worker = %self.id, device = %self.device, "job_memory_limit applies to CPU slots only: jobs on this one are not limited");
        }
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
        // A job handed back while a cancel was pending can carry the request here.
        let outcome = if claimed.job.cancel_requested {
            Outcome::Cancelled
        } else {
            match self.execute(&claimed, &dir, shutdown).await {
                Ok(outcome) => outcome,
                Err(e) => Outcome::Failed {
                    code: "internal".into(),
                    message: format!("preparing the job: {e}"),
                },
            }
        };
        let recorded = self
            .holding_lease(&claimed, self.record(&claimed, &outcome))
            .await;
        // The work folder holds copies of every input: it goes even when the outcome
        // could not be recorded (the lease then runs out and the reaper re-queues).
        if !self.settings.keep_work_dirs {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        let state = recorded?;
        tracing::info!(worker = %self.id, job = %job_id, ?state, "job ended");
        Ok(Some(state))
    }

    /// Records how the attempt ended, trying again after a store error: one failed write
    /// (a busy SQLite, a PostgreSQL failover) would otherwise throw a finished scan away
    /// and leave the job to run again, or to fail as `lease_expired` on its last attempt
    /// with its real outcome lost. Only database errors are tried again (a purified model
    /// the scan did not write stays a failure). Every step can be repeated: storing the
    /// artifact again finds it stored, and the outcome is written only while this worker
    /// owns the job.
    async fn record(&self, claimed: &Claimed, outcome: &Outcome) -> Result<JobState, StoreError> {
        let step = || self.record_once(claimed, outcome);
        retrying(
            &claimed.job.id,
            "recording the outcome",
            StoreError::is_database,
            step,
        )
        .await
    }

    async fn record_once(
        &self,
        claimed: &Claimed,
        outcome: &Outcome,
    ) -> Result<JobState, StoreError> {
        let store = &self.store;
        let (state, owned) = match outcome {
            Outcome::Succeeded { report, artifact } => {
                let blob = store.put_file(artifact).await?;
                let owned = store
                    .finish_succeeded(claimed, report, &blob.sha256)
                    .await?;
                if !owned {
                    // No report names the artifact: it would stay in the store for good.
                    if let Err(e) = store.free_blob_unless_resent(&blob.sha256).await {
                        tracing::warn!(job = %claimed.job.id, "freeing a discarded artifact: {e}");
                    }
                }
                (JobState::Succeeded, owned)
            }
            Outcome::Failed { code, message } => {
                let owned = store
                    .finish_unsuccessful(
                        claimed,
                        JobState::Failed,
                        &storable(code, MAX_PHASE_CHARS),
                        &storable(message, MAX_MESSAGE_CHARS),
                    )
                    .await?;
                if owned {
                    self.metrics.record_failure(code);
                }
                (JobState::Failed, owned)
            }
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
            Outcome::ShutDown => match store.release(claimed).await? {
                // Cancelled: a client asked while it ran, and the release honoured it.
                Some(JobState::Cancelled) => (JobState::Cancelled, true),
                Some(state) => return Ok(state),
                None => return Ok(JobState::Running),
            },
        };
        if owned {
            self.metrics.record_outcome(state);
            // Both ends by the database's clock, as the job stores them: this replica's
            // clock may disagree with it.
            if let Ok(Some(job)) = store.job(&claimed.job.id).await {
                if let (Some(started), Some(finished)) = (job.started_at, job.finished_at) {
                    let seconds = (finished - started).max(0) as f64 / 1000.0;
                    self.metrics.job_duration.observe(seconds);
                }
            }
        } else {
            tracing::warn!(job = %claimed.job.id, "lost the lease before recording the outcome; discarded");
        }
        Ok(if owned { state } else { JobState::Running })
    }

    /// Runs `work` while renewing the job's lease every heartbeat. For the parts of an
    /// attempt outside the child (copying the inputs out of the store, storing the
    /// artifact), which on files of a few GiB can outlast a lease.
    async fn holding_lease<T>(
        &self,
        claimed: &Claimed,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let lease_ms = self.settings.lease.as_millis() as i64;
        let renew = async {
            let mut beat = tokio::time::interval(self.settings.heartbeat);
            beat.tick().await;
            loop {
                beat.tick().await;
                // A lost lease shows at the next step that needs it (the child's first
                // heartbeat, or recording the outcome), which then stops.
                if let Err(e) = self.store.heartbeat(claimed, lease_ms).await {
                    tracing::warn!(job = %claimed.job.id, "heartbeat: {e}");
                }
            }
        };
        tokio::select! {
            out = work => out,
            _ = renew => unreachable!("renewing the lease never ends"),
        }
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
        // A database error while copying an input is tried again rather than failing
        // the job for good; a blob that is missing or damaged is not.
        let fetch = |sha: String, name: &'static str| {
            let path = dir.join(name);
            async move {
                let copy = || self.store.write_blob_to(&sha, &path);
                retrying(&job.id, "copying an input", StoreError::is_database, copy)
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
        let inputs = async {
            let model = fetch(job.model_sha256.clone(), "model.pt").await?;
            let clean = fetch(job.clean_sha256.clone(), "clean.bundle").await?;
            let test = match &job.test_sha256 {
                Some(sha) => Some(fetch(sha.clone(), "test.bundle").await?),
                None => None,
            };
            let poison = match &job.poison_sha256 {
                Some(sha) => Some(fetch(sha.clone(), "poison.bundle").await?),
                None => None,
            };
            Ok::<_, String>((model, clean, test, poison))
        };
        let (model, clean, test, poison) = self.holding_lease(claimed, inputs).await?;
        let spec = JobSpec {
            model,
            clean,
            test,
            poison,
            target_label: job.target_label,
            config,
            memory_limit: self.memory_limit(),
            confinement: self.settings.job_sandbox.then(|| Confinement {
                work_dir: dir.to_path_buf(),
                // See `memory_limit`: what the CUDA runtime reads could not be tested.
                restrict_reads: self.device == "cpu",
            }),
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

    async fn write_progress(&self, claimed: &Claimed, line: ProgressLine) {
        let (step, total) = (line.step as i64, line.total as i64);
        if let Err(e) = self
            .store
            .record_progress(claimed, &line.phase, step, total)
            .await
        {
            tracing::warn!(job = %claimed.job.id, "recording progress: {e}");
        }
    }

    async fn write_held_progress(&self, claimed: &Claimed, progress: &mut ProgressRelay) {
        if let Some(held) = progress.take_held() {
            self.write_progress(claimed, held).await;
        }
    }

    /// Runs the child and watches it: progress, heartbeats, cancellation, exit.
    async fn supervise(
        &self,
        claimed: &Claimed,
        spec: &JobSpec,
        spec_path: &Path,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, String> {
        let mut child = job_command(&self.settings.exe, spec_path, std::env::vars_os())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.settings.exe.display()))?;
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take().map(child_lines);
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_reader = child.stderr.take().map(|stderr| {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = child_lines(stderr);
                while let Some(line) = next_child_line(&mut lines).await {
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
        let mut progress = ProgressRelay::default();
        // When the lease was last renewed (the claim renewed it just before).
        let mut renewed = Instant::now();
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut cancelling = false;
        let time_limit = self.settings.job_timeout;
        // None past the clock's range: a limit that far off is no limit.
        let stop_at = time_limit.and_then(|limit| tokio::time::Instant::now().checked_add(limit));

        enum Event {
            Exited(std::io::Result<ExitStatus>),
            Line(Option<String>),
            Heartbeat,
            /// A progress line held back by the rate limit is due.
            HeldProgress,
            Shutdown,
            KillNow,
            OutOfTime,
        }
        let status = loop {
            let event = tokio::select! {
                status = child.wait() => Event::Exited(status),
                // select! builds every branch's future, disabled or not: the `expect`
                // must wait inside the future, which only runs when `stdout` is there.
                line = async { next_child_line(stdout.as_mut().expect("guarded")).await }, if stdout.is_some() => {
                    Event::Line(line)
                }
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = tokio::time::sleep_until(progress.held_until().unwrap_or_else(tokio::time::Instant::now)), if progress.held_until().is_some() => Event::HeldProgress,
                _ = shutdown.cancelled() => Event::Shutdown,
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() => Event::KillNow,
                _ = tokio::time::sleep_until(stop_at.unwrap_or_else(tokio::time::Instant::now)), if stop_at.is_some() && !cancelling => Event::OutOfTime,
            };
            match event {
                Event::Exited(status) => {
                    break status.map_err(|e| format!("waiting for the scan process: {e}"))?
                }
                Event::Line(None) => stdout = None,
                Event::Line(Some(line)) => {
                    let Ok(mut line) = serde_json::from_str::<ProgressLine>(&line) else {
                        continue;
                    };
                    line.phase = storable(&line.phase, MAX_PHASE_CHARS);
                    if let Some(due) = progress.offer(line) {
                        self.write_progress(claimed, due).await;
                    }
                }
                Event::HeldProgress => self.write_held_progress(claimed, &mut progress).await,
                Event::Heartbeat => match self.store.heartbeat(claimed, lease_ms).await {
                    Ok(None) => {
                        kill_job(&mut child).await;
                        return Ok(Outcome::LeaseLost);
                    }
                    Ok(Some(cancel)) => {
                        renewed = Instant::now();
                        if cancel && !cancelling {
                            // Closing stdin asks the scan to stop at its next step.
                            cancelling = true;
                            stdin = None;
                            kill_at =
                                Some(tokio::time::Instant::now() + self.settings.cancel_grace);
                        }
                    }
                    // Past the lease without renewing it, the job is no longer this
                    // worker's: a reaper (of any replica, once the database answers) puts it
                    // back in the queue, and two copies of a scan must not run at once.
                    Err(e) if renewed.elapsed() >= self.settings.lease => {
                        tracing::error!(job = %claimed.job.id, "heartbeat: {e}; the lease ran out, stopping the scan");
                        kill_job(&mut child).await;
                        return Ok(Outcome::LeaseLost);
                    }
                    // A database hiccup: keep going; the lease outlives a few missed beats.
                    Err(e) => tracing::warn!(job = %claimed.job.id, "heartbeat: {e}"),
                },
                Event::Shutdown => {
                    kill_job(&mut child).await;
                    self.write_held_progress(claimed, &mut progress).await;
                    return Ok(Outcome::ShutDown);
                }
                Event::KillNow => {
                    kill_job(&mut child).await;
                    self.write_held_progress(claimed, &mut progress).await;
                    return Ok(Outcome::Cancelled);
                }
                Event::OutOfTime => {
                    kill_job(&mut child).await;
                    self.write_held_progress(claimed, &mut progress).await;
                    let phase = match progress.phase() {
                        Some(phase) => format!(" during `{phase}`"),
                        None => String::new(),
                    };
                    return Ok(Outcome::Failed {
                        code: "timed_out".into(),
                        message: format!(
                            "the scan ran longer than this server allows a job \
                             (job_timeout_secs = {}) and was stopped{phase}",
                            time_limit.unwrap_or_default().as_secs()
                        ),
                    });
                }
            }
        };
        drop(stdin);
        // The last step the scan reached stays on the job, whatever the outcome.
        self.write_held_progress(claimed, &mut progress).await;
        if cancelling || status.code() == Some(i32::from(EXIT_CANCELLED)) {
            return Ok(Outcome::Cancelled);
        }
        if status.success() {
            let outputs = async {
                let report = read_child_output(&spec.report, MAX_REPORT_BYTES)
                    .await
                    .map_err(|e| format!("its report: {e}"))?;
                // Checked here for a clear failure; storing it checks again on the file
                // it opens.
                open_regular_file(&spec.artifact)
                    .map_err(|e| format!("its purified model: {e}"))?;
                Ok::<_, String>(report)
            };
            let report = match outputs.await {
                Ok(report) => report,
                Err(e) => {
                    return Ok(Outcome::Failed {
                        code: "internal".into(),
                        message: format!("the scan process ended without usable outputs: {e}"),
                    })
                }
            };
            return Ok(Outcome::Succeeded {
                report,
                artifact: spec.artifact.clone(),
            });
        }
        if status.code().is_some() {
            if let Ok(text) = read_child_output(&spec.error, MAX_ERROR_BYTES).await {
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
        let message = crash_message(status, &tail);
        match spec.memory_limit {
            Some(limit) if crash_is_out_of_memory(&tail) => Ok(Outcome::Failed {
                code: MEMORY_LIMIT_CODE.into(),
                message: memory_limit_message(limit, &message),
            }),
            None if crash_is_out_of_memory(&tail) => Ok(Outcome::Failed {
                code: OUT_OF_MEMORY_CODE.into(),
                message: out_of_memory_message(&message),
            }),
            _ => Ok(Outcome::Failed {
                code: "worker_crashed".into(),
                message,
            }),
        }
    }
}

/// The child's stdout or stderr, read line by line with a bound on each line.
struct ChildLines<R> {
    reader: BufReader<R>,
    /// The line being read. Kept here, not in the reading future, so that a read
    /// cancelled by `select!` loses nothing.
    partial: Vec<u8>,
    /// Whether `partial` holds a line's start, even an empty one (`\n` alone).
    started: bool,
}

/// Which of the child's progress lines reach the database: a new phase at once, more of
/// the same phase at most every `PROGRESS_EVERY`. A line held back is written when its
/// turn comes (or when the child exits), so a phase's last step, often followed by a long
/// silent stretch, is not lost.
#[derive(Default)]
struct ProgressRelay {
    /// The phase last written, and when.
    written: Option<(String, tokio::time::Instant)>,
    /// The newest line not written yet.
    held: Option<ProgressLine>,
}

impl ProgressRelay {
    /// The line to write now, if `line` is due; otherwise it is held.
    fn offer(&mut self, line: ProgressLine) -> Option<ProgressLine> {
        let due = match &self.written {
            Some((phase, at)) => *phase != line.phase || at.elapsed() >= PROGRESS_EVERY,
            None => true,
        };
        if !due {
            self.held = Some(line);
            return None;
        }
        self.held = None;
        Some(self.written_now(line))
    }

    /// Records `line` as written now, and returns it for the writing.
    fn written_now(&mut self, line: ProgressLine) -> ProgressLine {
        self.written = Some((line.phase.clone(), tokio::time::Instant::now()));
        line
    }

    /// When the held line is due, if one is held.
    fn held_until(&self) -> Option<tokio::time::Instant> {
        let (_, at) = self.written.as_ref()?;
        self.held.as_ref().map(|_| *at + PROGRESS_EVERY)
    }

    /// The held line, now written.
    fn take_held(&mut self) -> Option<ProgressLine> {
        let line = self.held.take()?;
        Some(self.written_now(line))
    }

    /// The phase the job was last seen in.
    fn phase(&self) -> Option<&str> {
        match &self.held {
            Some(line) => Some(&line.phase),
            None => self.written.as_ref().map(|(phase, _)| phase.as_str()),
        }
    }
}

fn child_lines<R: AsyncRead + Unpin>(output: R) -> ChildLines<R> {
    ChildLines {
        reader: BufReader::new(output),
        partial: Vec::new(),
        started: false,
    }
}

/// The next line without its newline, as lossy UTF-8, cut to [`MAX_CHILD_LINE`] bytes
/// (the rest of a longer line is read and dropped); `None` at the end of the output or
/// on a read error. Safe to cancel.
async fn next_child_line<R: AsyncRead + Unpin>(lines: &mut ChildLines<R>) -> Option<String> {
    loop {
        let available = match lines.reader.fill_buf().await {
            Ok(bytes) => bytes,
            Err(_) => return None,
        };
        if available.is_empty() {
            let last = std::mem::take(&mut lines.partial);
            return std::mem::take(&mut lines.started)
                .then(|| String::from_utf8_lossy(&last).into_owned());
        }
        lines.started = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let content = &available[..newline.unwrap_or(available.len())];
        let room = MAX_CHILD_LINE.saturating_sub(lines.partial.len());
        lines
            .partial
            .extend_from_slice(&content[..content.len().min(room)]);
        let used = newline.map_or(available.len(), |at| at + 1);
        lines.reader.consume(used);
        if newline.is_some() {
            lines.started = false;
            let line = std::mem::take(&mut lines.partial);
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// Largest report a job's process may leave: reports of the default scan are tens of
/// KiB; the limit keeps a process that wrote without end from filling the server's memory.
pub(crate) const MAX_REPORT_BYTES: u64 = 64 << 20;
/// Largest error file, whose message is cut to 4,096 characters anyway.
const MAX_ERROR_BYTES: u64 = 1 << 20;

/// Reads a small output of the job's process (its report or its error): a regular file
/// (not a link the process planted, nor a FIFO: see `open_regular_file`) of at most
/// `limit` bytes.
async fn read_child_output(path: &Path, limit: u64) -> Result<String, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let file = open_regular_file(&path).map_err(|e| e.to_string())?;
        let mut text = String::new();
        file.take(limit + 1)
            .read_to_string(&mut text)
            .map_err(|e| e.to_string())?;
        if text.len() as u64 > limit {
            return Err(format!("{} is larger than {limit} bytes", path.display()));
        }
        Ok(text)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The command that runs a job's child: `exe job --spec SPEC`, with only the variables
/// of `parent_environment` (this process's) that the scan needs, and `TMPDIR`.
fn job_command(
    exe: &Path,
    spec_path: &Path,
    parent_environment: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Command {
    let mut command = Command::new(exe);
    command.arg("job").arg("--spec").arg(spec_path);
    command.env_clear();
    for (name, value) in parent_environment.filter(|(name, _)| passed_to_the_child(name)) {
        command.env(name, value);
    }
    // Scratch files (a purification kept while a second one runs) go in the job's
    // folder: it is the only place a confined child may write, and it is removed after.
    if let Some(dir) = spec_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        command.env("TMPDIR", dir);
    }
    die_with_the_server(&mut command);
    // A group of its own, which `kill_job` ends with the job: a process the scan forked
    // (a model's native code could, where the sandbox is off) would outlive a kill of the
    // child alone. It also keeps a Ctrl-C at the server's terminal from reaching the
    // child before the server hands its job back.
    #[cfg(unix)]
    command.process_group(0);
    command
}

/// Kills a job's process and its group (see `job_command`): anything it forked dies with
/// it (where the sandbox does not refuse forking already). The group is signalled while
/// the process is not yet reaped, so its number cannot belong to anyone else yet.
async fn kill_job(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(leader) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
        // SAFETY: kill takes plain integers.
        unsafe {
            libc::kill(-leader, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}

/// Has the kernel kill the child when the server dies (Linux `PR_SET_PDEATHSIG`). The
/// child stops by itself when its stdin closes, but only between steps: a model stuck in
/// a TorchScript loop would outlive a crashed server, holding its slot (and GPU memory)
/// while the job runs again elsewhere. The signal comes when the *thread* that spawned
/// the child ends; workers spawn from the async runtime's threads, which live as long as
/// the server.
fn die_with_the_server(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let server = std::process::id();
        // SAFETY: between fork and exec the closure makes only async-signal-safe calls
        // (prctl, getppid, _exit) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The server died before the call: no signal would ever come.
                if libc::getppid() as u32 != server {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Whether a job's child keeps the environment variable `name`: where the libraries are
/// and how they run (the loader, libtorch, OpenMP, MKL, oneDNN, CUDA, glibc's allocator),
/// locale and logging. Everything else stays with the server: the database's address
/// and credentials (`DATABASE_URL`, libpq's `PG*`), the API's token, the settings file
/// that may name them, a cloud provider's keys. The child runs a model that is untrusted
/// code, and a confined child can still read its own `/proc/self/environ`.
fn passed_to_the_child(name: &std::ffi::OsStr) -> bool {
    const NAMES: [&str; 13] = [
        "PATH",
        "HOME",
        "LANG",
        "TZ",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",
        "GLIBC_TUNABLES",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "NVIDIA_TF32_OVERRIDE",
    ];
    // `ATEN_CPU_CAPABILITY` picks libtorch's CPU kernels (and so the numbers), `MALLOC_*`
    // tunes glibc's allocator as in `bdscan scan` (see engine::allocator).
    const PREFIXES: [&str; 16] = [
        "LC_",
        "OMP_",
        "KMP_",
        "GOMP_",
        "MKL_",
        "MKLDNN_",
        "DNNL_",
        "ONEDNN_",
        "OPENBLAS_",
        "ATEN_",
        "MALLOC_",
        "CUDA_",
        "CUBLAS",
        "CUDNN_",
        "PYTORCH_",
        "TORCH_",
    ];
    let Some(name) = name.to_str() else {
        return false;
    };
    NAMES.contains(&name) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// Runs `step` up to `STORE_TRIES` times while it fails with an error `worth_retrying`
/// accepts, waiting longer before each try; the last error is returned.
async fn retrying<T, E, Fut>(
    job: &str,
    what: &str,
    worth_retrying: impl Fn(&E) -> bool,
    mut step: impl FnMut() -> Fut,
) -> Result<T, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut wait = STORE_RETRY_FIRST_WAIT;
    for _ in 1..STORE_TRIES {
        match step().await {
            Err(e) if worth_retrying(&e) => {
                tracing::warn!(job, "{what}: {e}; trying again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            done => return done,
        }
    }
    step().await
}

/// Text that came from the scan process (which a hostile model can steer, through a
/// TorchScript `raise` or `print`) made fit to store: NUL, which PostgreSQL's text
/// columns refuse, replaced by U+FFFD, and cut to `max_chars` characters.
fn storable(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max_chars)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect();
    if text.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
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

/// Whether a crashed child's last words say an allocation failed: Rust aborts with
/// "memory allocation of N bytes failed"; a tch call without `f_` panics with
/// libtorch's allocator error (exit 101, no error file); C++ ends on an uncaught
/// `std::bad_alloc`.
fn crash_is_out_of_memory(stderr_tail: &str) -> bool {
    stderr_tail.contains("memory allocation of") || super::child::is_out_of_memory(stderr_tail)
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
    let mut last_staging_sweep: Option<Instant> = None;
    loop {
        if last_staging_sweep.is_none_or(|at| at.elapsed() >= STAGING_SWEEP_EVERY) {
            last_staging_sweep = Some(Instant::now());
            match store
                .sweep_stale_staging(STAGING_MAX_AGE.as_millis() as i64)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::warn!(chunks = n, "removed chunks of abandoned uploads"),
                Err(e) => tracing::error!("sweeping abandoned uploads: {e}"),
            }
            if !settings.keep_work_dirs {
                sweep_work_dirs(&store, &settings.work_dir).await;
            }
        }
        if let Some(retention) = settings.job_retention {
            let expired = delete_expired(&store, &settings, retention, &shutdown).await;
            metrics
                .jobs_expired
                .fetch_add(expired, std::sync::atomic::Ordering::Relaxed);
        }
        match store.reap_expired(backoff_ms).await {
            Ok(reaped) => {
                let n = reaped.requeued.len() + reaped.failed.len() + reaped.cancelled.len();
                if n > 0 {
                    tracing::warn!(?reaped, "reaped expired leases");
                    metrics
                        .leases_reaped
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                // Outcomes the reaper decided count as a worker's would.
                for _ in &reaped.failed {
                    metrics.record_outcome(JobState::Failed);
                    metrics.record_failure("lease_expired");
                }
                for _ in &reaped.cancelled {
                    metrics.record_outcome(JobState::Cancelled);
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

/// Removes the work folders (copies of a job's inputs, `{job id}-{attempt}`) that no
/// attempt still runs in: what a server that crashed, or was killed, left behind. A
/// worker removes its own folder when its attempt ends. A folder whose job is running
/// that very attempt stays, whichever process runs it.
pub async fn sweep_work_dirs(store: &Store, work_dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(work_dir).await else {
        return;
    };
    let mut removed = 0;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A job id is a UUID (hyphens inside), then `-attempt`.
        let Some((id, attempt)) = name.rsplit_once('-') else {
            continue;
        };
        let Ok(attempt) = attempt.parse::<i64>() else {
            continue;
        };
        let in_use = match store.job(id).await {
            Ok(Some(job)) => job.state == JobState::Running && job.attempts == attempt,
            Ok(None) => false,
            // Unknown: leave it for the next sweep.
            Err(_) => true,
        };
        if !in_use && tokio::fs::remove_dir_all(entry.path()).await.is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::warn!(
            folders = removed,
            "removed work folders of attempts that ended without their worker"
        );
    }
}

/// Deletes the finished jobs older than `retention`, as `DELETE /v1/jobs/{id}` would
/// (report, purified model, inputs no other job uses), then the uploads that old (and
/// at least `unused_blob_min_age`) which no job uses, a batch of each per reaper round,
/// stopping early at shutdown. A job another replica deleted first is skipped. Returns
/// how many jobs it deleted.
async fn delete_expired(
    store: &Store,
    settings: &WorkerSettings,
    retention: Duration,
    shutdown: &CancellationToken,
) -> u64 {
    // The database's clock, which stamped `finished_at` and the uploads' times: a
    // replica whose own clock ran ahead would delete what just finished.
    let now = match store.clock_ms().await {
        Ok(now) => now,
        Err(e) => {
            tracing::error!("reading the database's clock for the retention sweep: {e}");
            return 0;
        }
    };
    // Saturating: a retention that wrapped below zero put the cutoff in the future.
    let age_ms = |age: Duration| i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(age_ms(retention));
    let jobs = delete_jobs_finished_before(store, cutoff, shutdown).await;
    let unused_cutoff = now.saturating_sub(age_ms(retention.max(settings.unused_blob_min_age)));
    let unused = match store
        .unused_blobs_before(unused_cutoff, RETENTION_BATCH)
        .await
    {
        Ok(unused) => unused,
        Err(e) => {
            tracing::error!("finding unused uploads past their retention: {e}");
            Vec::new()
        }
    };
    let mut freed = 0;
    for sha in unused {
        if shutdown.is_cancelled() {
            break;
        }
        match store.free_blob_if_unused_since(&sha, unused_cutoff).await {
            Ok(true) => freed += 1,
            // A job named it since, or an upload of the same bytes stored it again.
            Ok(false) => {}
            Err(e) => tracing::warn!(blob = %sha, "deleting an unused upload: {e}"),
        }
    }
    if freed > 0 {
        tracing::info!(
            blobs = freed,
            "deleted uploads no job used past their retention"
        );
    }
    jobs
}

async fn delete_jobs_finished_before(
    store: &Store,
    cutoff: i64,
    shutdown: &CancellationToken,
) -> u64 {
    let ids = match store.finished_before(cutoff, RETENTION_BATCH).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!("finding jobs past their retention: {e}");
            return 0;
        }
    };
    let (mut jobs, mut blobs) = (0, 0);
    for id in ids {
        if shutdown.is_cancelled() {
            break;
        }
        match store.purge_job(&id).await {
            Ok(Some(purged)) => {
                jobs += 1;
                blobs += purged.freed_blobs.len();
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(job = %id, "deleting a job past its retention: {e}"),
        }
    }
    if jobs > 0 {
        tracing::info!(jobs, blobs, "deleted finished jobs past their retention");
    }
    jobs
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether process `pid` is gone or a zombie (killed, not yet reaped).
    fn dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name, which is in parentheses.
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .unwrap_or_default()
                .trim_start()
                .starts_with('Z'),
            Err(_) => true,
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_child_dies_when_the_thread_that_started_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("stuck-bdscan");
        std::fs::write(&exe, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // Stands in for the server: a thread that starts the child and then ends.
        let spawner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let child = job_command(&exe, Path::new("/dev/null"), std::iter::empty())
                    .spawn()
                    .unwrap();
                let pid = child.id().unwrap();
                // Running now, and not only because it has not started yet.
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert!(!dead(pid));
                std::mem::forget(child);
                pid
            })
        });
        let pid = spawner.join().unwrap();
        let started = Instant::now();
        while !dead(pid) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the child outlived its parent"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn the_child_inherits_only_what_the_scan_needs() {
        const DROPPED: [&str; 9] = [
            "DATABASE_URL",
            "PGPASSWORD",
            "PGPASSFILE",
            "BDSCAN_CONFIG",
            "BDSCAN_API_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "SSH_AUTH_SOCK",
            "NVIDIA_API_KEY",
            "BDSCAN_JOB_THREADS",
        ];
        const KEPT: [&str; 8] = [
            "PATH",
            "LD_LIBRARY_PATH",
            "RUST_LOG",
            "OMP_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES",
            "LC_ALL",
            "MALLOC_ARENA_MAX_",
            "ATEN_CPU_CAPABILITY",
        ];
        let value_of = |name: &str| format!("value of {name}");
        let parent = DROPPED
            .iter()
            .chain(&KEPT)
            .map(|name| (name.into(), value_of(name).into()));
        let command = job_command(
            Path::new("/bin/bdscan"),
            Path::new("/tmp/spec.json"),
            parent,
        );
        let std = command.as_std();
        let mut passed: Vec<(String, String)> = std
            .get_envs()
            .map(|(name, value)| {
                let value = value.expect("set, not removed: the environment starts empty");
                (
                    name.to_string_lossy().into_owned(),
                    value.to_string_lossy().into_owned(),
                )
            })
            .collect();
        passed.sort();
        let mut expected: Vec<(String, String)> = KEPT
            .iter()
            .map(|name| (name.to_string(), value_of(name)))
            // Scratch files in the job's folder, the only place a confined child may write.
            .chain([("TMPDIR".to_string(), "/tmp".to_string())])
            .collect();
        expected.sort();
        assert_eq!(passed, expected);
        let args: Vec<_> = std.get_args().collect();
        assert_eq!(args, ["job", "--spec", "/tmp/spec.json"]);
    }

    #[test]
    fn stored_text_has_no_nul_and_a_bounded_length() {
        assert_eq!(storable("a\0b", 10), "a\u{FFFD}b");
        assert_eq!(storable("abcdef", 3), "abc…");
        assert_eq!(storable("abc", 3), "abc");
    }

    #[tokio::test]
    async fn child_lines_are_bounded_and_survive_cancellation() {
        let long = "x".repeat(MAX_CHILD_LINE + 500);
        let output = format!("first\n{long}\n\nlast");
        let mut lines = child_lines(output.as_bytes());
        assert_eq!(next_child_line(&mut lines).await.as_deref(), Some("first"));
        let cut = next_child_line(&mut lines).await.unwrap();
        assert_eq!(cut.len(), MAX_CHILD_LINE);
        assert_eq!(next_child_line(&mut lines).await.as_deref(), Some(""));
        assert_eq!(next_child_line(&mut lines).await.as_deref(), Some("last"));
        assert_eq!(next_child_line(&mut lines).await, None);

        // A read cancelled half-way through a line loses none of it.
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut lines = child_lines(reader);
        tokio::io::AsyncWriteExt::write_all(&mut writer, b"hal")
            .await
            .unwrap();
        let cancelled = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            next_child_line(&mut lines),
        )
        .await;
        assert!(cancelled.is_err());
        tokio::io::AsyncWriteExt::write_all(&mut writer, b"f\n")
            .await
            .unwrap();
        assert_eq!(next_child_line(&mut lines).await.as_deref(), Some("half"));
    }
}

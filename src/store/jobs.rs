//! Jobs and the queue: creation (with idempotency keys), the atomic claim, leases,
//! heartbeats, progress, completion guarded by lease ownership, cancellation and the
//! reaper that re-queues jobs whose worker stopped renewing its lease.

use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use super::{Backend, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One job as stored.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub state: JobState,
    pub model_sha256: String,
    pub clean_sha256: String,
    pub test_sha256: Option<String>,
    pub poison_sha256: Option<String>,
    pub target_label: Option<i64>,
    /// The scan config as JSON text.
    pub config: String,
    pub progress_phase: Option<String>,
    pub progress_step: i64,
    pub progress_total: i64,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub cancel_requested: bool,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub idempotency_key: Option<String>,
    pub idempotency_fingerprint: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The device the client asked for; `None`: any worker slot.
    pub device: Option<String>,
}

/// The PostgreSQL notification channel announcing queued jobs.
pub const JOBS_CHANNEL: &str = "bdscan_jobs_queued";

const JOB_COLUMNS: &str = "id, state, model_sha256, clean_sha256, test_sha256, poison_sha256, target_label, config, \
     progress_phase, progress_step, progress_total, error_code, error, attempts, max_attempts, cancel_requested, \
     lease_owner, lease_until, idempotency_key, idempotency_fingerprint, created_at, started_at, finished_at, device";

impl<'r> FromRow<'r, AnyRow> for Job {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        let state: String = row.try_get("state")?;
        Ok(Job {
            id: row.try_get("id")?,
            state: JobState::parse(&state).ok_or_else(|| {
                sqlx::Error::Decode(format!("unknown job state `{state}`").into())
            })?,
            model_sha256: row.try_get("model_sha256")?,
            clean_sha256: row.try_get("clean_sha256")?,
            test_sha256: row.try_get("test_sha256")?,
            poison_sha256: row.try_get("poison_sha256")?,
            target_label: row.try_get("target_label")?,
            config: row.try_get("config")?,
            progress_phase: row.try_get("progress_phase")?,
            progress_step: row.try_get("progress_step")?,
            progress_total: row.try_get("progress_total")?,
            error_code: row.try_get("error_code")?,
            error: row.try_get("error")?,
            attempts: row.try_get("attempts")?,
            max_attempts: row.try_get("max_attempts")?,
            cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            lease_owner: row.try_get("lease_owner")?,
            lease_until: row.try_get("lease_until")?,
            idempotency_key: row.try_get("idempotency_key")?,
            idempotency_fingerprint: row.try_get("idempotency_fingerprint")?,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            device: row.try_get("device")?,
        })
    }
}

/// What a client asked to run.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub model_sha256: String,
    pub clean_sha256: String,
    pub test_sha256: Option<String>,
    pub poison_sha256: Option<String>,
    pub target_label: Option<i64>,
    pub config: String,
    pub max_attempts: i64,
    pub idempotency_key: Option<String>,
    /// A digest of the request, so a reused key with a different request is refused.
    pub idempotency_fingerprint: Option<String>,
    /// Only a worker slot on this device (`cpu`, `cuda:N`) may run the job; `None`: any.
    pub device: Option<String>,
}

#[derive(Debug)]
pub enum CreateOutcome {
    Created(Job),
    /// The idempotency key was seen before with the same request: the earlier job.
    Existing(Job),
    /// The idempotency key was seen before with a different request.
    KeyReused(Job),
}

/// A job this worker now holds a lease on.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    pub owner: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub requeued: Vec<String>,
    pub failed: Vec<String>,
    pub cancelled: Vec<String>,
}

/// What deleting a finished job removed besides the job and its report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    /// The job's blobs that no other job or report used.
    pub freed_blobs: Vec<String>,
}

pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass back as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Inserts tried before giving up on a key whose job keeps being deleted.
const CREATE_ATTEMPTS: usize = 3;

impl Store {
    pub async fn create_job(&self, new: &NewJob) -> Result<CreateOutcome, StoreError> {
        // The job holding a repeated key can be deleted between the insert that yields to
        // it and the lookup; then the key is free again and the insert is retried.
        for _ in 0..CREATE_ATTEMPTS {
            if let Some(outcome) = self.try_create_job(new).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::Contended(
            "the idempotency key's job kept disappearing; retry the request".into(),
        ))
    }

    /// The job created with this idempotency key, if any.
    pub async fn job_with_idempotency_key(&self, key: &str) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1");
        Ok(sqlx::query_as(&sql)
            .bind(key)
            .fetch_optional(self.pool())
            .await?)
    }

    async fn try_create_job(&self, new: &NewJob) -> Result<Option<CreateOutcome>, StoreError> {
        let clock = self.clock_sql();
        let sql = format!(
            "INSERT INTO jobs (id, state, model_sha256, clean_sha256, test_sha256, poison_sha256, target_label, config, \
             max_attempts, idempotency_key, idempotency_fingerprint, run_after, created_at, device) \
             VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9, $10, {clock}, {clock}, $11) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING {JOB_COLUMNS}"
        );
        // One transaction that writes first (SQLite: no read-then-write upgrade to fail).
        let mut tx = self.pool().begin().await?;
        let inserted: Option<Job> = sqlx::query_as(&sql)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(&new.model_sha256)
            .bind(&new.clean_sha256)
            .bind(&new.test_sha256)
            .bind(&new.poison_sha256)
            .bind(new.target_label)
            .bind(&new.config)
            .bind(new.max_attempts)
            .bind(&new.idempotency_key)
            .bind(&new.idempotency_fingerprint)
            .bind(&new.device)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(job) = inserted {
            mark_named(&mut *tx, &job).await?;
            tx.commit().await?;
            // The job exists: a failed notification must not tell the client otherwise
            // (a retry without an idempotency key would queue it twice). Idle workers
            // elsewhere find it at their next poll.
            if let Err(e) = self.announce_queued().await {
                tracing::warn!(job = %job.id, "announcing a queued job: {e}");
            }
            return Ok(Some(CreateOutcome::Created(job)));
        }
        drop(tx);
        // Only a repeated idempotency key makes the insert a no-op.
        let key = new.idempotency_key.as_deref().unwrap_or_default();
        let Some(earlier) = self.job_with_idempotency_key(key).await? else {
            return Ok(None);
        };
        if earlier.idempotency_fingerprint != new.idempotency_fingerprint {
            return Ok(Some(CreateOutcome::KeyReused(earlier)));
        }
        // A replay names the blobs again: the client re-sent them for this very job.
        mark_named(self.pool(), &earlier).await?;
        Ok(Some(CreateOutcome::Existing(earlier)))
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Newest first. The cursor is the last job's `created_at` and id.
    pub async fn list_jobs(
        &self,
        state: Option<JobState>,
        cursor: Option<(i64, String)>,
        limit: i64,
    ) -> Result<JobPage, StoreError> {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if state.is_some() {
            conditions.push(format!("state = {}", next()));
        }
        if cursor.is_some() {
            let (a, b, c) = (next(), next(), next());
            conditions.push(format!(
                "(created_at < {a} OR (created_at = {b} AND id < {c}))"
            ));
        }
        let limit_param = next();
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql =
            format!("SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY created_at DESC, id DESC LIMIT {limit_param}");
        let mut query = sqlx::query_as::<_, Job>(&sql);
        if let Some(state) = state {
            query = query.bind(state.as_str());
        }
        if let Some((created_at, id)) = cursor {
            query = query.bind(created_at).bind(created_at).bind(id);
        }
        let mut jobs = query.bind(limit + 1).fetch_all(self.pool()).await?;
        let next_cursor = if jobs.len() as i64 > limit {
            jobs.truncate(limit as usize);
            jobs.last().map(|j| format!("{}_{}", j.created_at, j.id))
        } else {
            None
        };
        Ok(JobPage { jobs, next_cursor })
    }

    pub async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                JobState::parse(&r.get::<String, _>(0)).map(|s| (s, r.get::<i64, _>(1)))
            })
            .collect())
    }

    /// [`Store::claim_job_on`] for a CPU slot.
    pub async fn claim_job(
        &self,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Option<Claimed>, StoreError> {
        self.claim_job_on(owner, lease_ms, "cpu").await
    }

    /// Takes the oldest runnable queued job that a slot on `device` may run (one that
    /// asked for no device, or for this one), leasing it to `owner` for `lease_ms`.
    /// One statement, committed at once: two workers can never claim the same job.
    pub async fn claim_job_on(
        &self,
        owner: &str,
        lease_ms: i64,
        device: &str,
    ) -> Result<Option<Claimed>, StoreError> {
        // PostgreSQL: rows another transaction is claiming are skipped rather than waited
        // on. SQLite: writers are serialised, so the same statement without the lock clause.
        let lock = match self.backend() {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let clock = self.clock_sql();
        let sql = format!(
            "UPDATE jobs SET state = 'running', lease_owner = $1, lease_until = {clock} + $2, attempts = attempts + 1, \
             started_at = COALESCE(started_at, {clock}), progress_phase = NULL, progress_step = 0, progress_total = 0 \
             WHERE state = 'queued' AND id = (SELECT id FROM jobs WHERE state = 'queued' AND run_after <= {clock} \
             AND (device IS NULL OR device = $3) ORDER BY created_at, id LIMIT 1 {lock}) RETURNING {JOB_COLUMNS}"
        );
        let job: Option<Job> = sqlx::query_as(&sql)
            .bind(owner)
            .bind(lease_ms)
            .bind(device)
            .fetch_optional(self.pool())
            .await?;
        Ok(job.map(|job| Claimed {
            job,
            owner: owner.to_string(),
        }))
    }

    /// Extends the lease. `Ok(None)`: the lease was lost (reaped, or the job finished);
    /// `Ok(Some(true))`: a client asked to cancel the job.
    pub async fn heartbeat(
        &self,
        claimed: &Claimed,
        lease_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        let sql = format!(
            "UPDATE jobs SET lease_until = {} + $1 WHERE id = $2 AND lease_owner = $3 AND state = 'running' \
             RETURNING cancel_requested",
            self.clock_sql()
        );
        let row = sqlx::query(&sql)
            .bind(lease_ms)
            .bind(&claimed.job.id)
            .bind(&claimed.owner)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.get::<i64, _>(0) != 0))
    }

    pub async fn record_progress(
        &self,
        claimed: &Claimed,
        phase: &str,
        step: i64,
        total: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET progress_phase = $1, progress_step = $2, progress_total = $3 \
             WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(phase)
        .bind(step)
        .bind(total)
        .bind(&claimed.job.id)
        .bind(&claimed.owner)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the job succeeded with its report. `Ok(false)`: this worker no longer owns it.
    pub async fn finish_succeeded(
        &self,
        claimed: &Claimed,
        report_json: &str,
        artifact_sha256: &str,
    ) -> Result<bool, StoreError> {
        let clock = self.clock_sql();
        let mut tx = self.pool().begin().await?;
        let owned = sqlx::query(&format!(
            "UPDATE jobs SET state = 'succeeded', finished_at = {clock}, progress_step = progress_total, lease_owner = NULL, lease_until = NULL, \
             error_code = NULL, error = NULL WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        ))
        .bind(&claimed.job.id)
        .bind(&claimed.owner)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !owned {
            return Ok(false);
        }
        sqlx::query(&format!("INSERT INTO reports (job_id, report, artifact_sha256, created_at) VALUES ($1, $2, $3, {clock})"))
            .bind(&claimed.job.id)
            .bind(report_json)
            .bind(artifact_sha256)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE blobs SET resent = 0 WHERE sha256 = $1")
            .bind(artifact_sha256)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Ends the job as `failed` or `cancelled` with a reason. `Ok(false)`: not owned any more.
    pub async fn finish_unsuccessful(
        &self,
        claimed: &Claimed,
        state: JobState,
        code: &str,
        message: &str,
    ) -> Result<bool, StoreError> {
        debug_assert!(matches!(state, JobState::Failed | JobState::Cancelled));
        let sql = format!(
            "UPDATE jobs SET state = $1, error_code = $2, error = $3, finished_at = {}, lease_owner = NULL, \
             lease_until = NULL WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
            self.clock_sql()
        );
        let done = sqlx::query(&sql)
            .bind(state.as_str())
            .bind(code)
            .bind(message)
            .bind(&claimed.job.id)
            .bind(&claimed.owner)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a job back to the queue without counting the attempt (graceful shutdown),
    /// its progress cleared (the next claim starts over), or ends it `cancelled` if a client asked to cancel it meanwhile: re-queued, that
    /// request would be lost (`request_cancel` cancels only what is queued when it
    /// looks). One statement, so a cancel landing at the same moment is seen by either
    /// this or `request_cancel`. `Ok(None)`: this worker no longer owns the job.
    pub async fn release(&self, claimed: &Claimed) -> Result<Option<JobState>, StoreError> {
        let cancelled = "cancel_requested = 1";
        let clock = self.clock_sql();
        let sql = format!(
            "UPDATE jobs SET state = CASE WHEN {cancelled} THEN 'cancelled' ELSE 'queued' END, \
             attempts = CASE WHEN {cancelled} THEN attempts ELSE attempts - 1 END, \
             finished_at = CASE WHEN {cancelled} THEN {clock} ELSE finished_at END, \
             error_code = CASE WHEN {cancelled} THEN 'cancelled' ELSE error_code END, \
             error = CASE WHEN {cancelled} THEN 'cancelled by request as the service stopped' ELSE error END, \
             progress_phase = CASE WHEN {cancelled} THEN progress_phase ELSE NULL END, \
             progress_step = CASE WHEN {cancelled} THEN progress_step ELSE 0 END, \
             progress_total = CASE WHEN {cancelled} THEN progress_total ELSE 0 END, \
             lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING state"
        );
        let row = sqlx::query(&sql)
            .bind(&claimed.job.id)
            .bind(&claimed.owner)
            .fetch_optional(self.pool())
            .await?;
        let state = row
            .map(|r| {
                let state: String = r.get(0);
                JobState::parse(&state).ok_or_else(|| {
                    StoreError::Database(sqlx::Error::Decode(
                        format!("unknown job state `{state}`").into(),
                    ))
                })
            })
            .transpose()?;
        if state == Some(JobState::Queued) {
            // Another replica still running may take it now rather than at its next poll.
            if let Err(e) = self.announce_queued().await {
                tracing::warn!(job = %claimed.job.id, "announcing a job handed back: {e}");
            }
        }
        Ok(state)
    }

    /// How many jobs wait in the queue.
    pub async fn queued_jobs(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
            .fetch_one(self.pool())
            .await?;
        Ok(row.get::<i64, _>(0).max(0) as u64)
    }

    /// Cancels a queued job at once, or asks the worker of a running one to stop.
    /// Returns the job as it now stands, `None` if there is no such job.
    pub async fn request_cancel(&self, id: &str) -> Result<Option<Job>, StoreError> {
        // Flag first, then cancel what is queued. The other order lost a cancellation
        // when the reaper re-queued the running job between the two statements; in this
        // one such a job is cancelled by the second, and a queued job a worker claims in
        // between carries the flag to that worker.
        sqlx::query(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND state IN ('queued', 'running')",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        sqlx::query(&format!(
            "UPDATE jobs SET state = 'cancelled', error_code = 'cancelled', error = 'cancelled before it started', \
             finished_at = {} WHERE id = $1 AND state = 'queued'",
            self.clock_sql()
        ))
        .bind(id)
        .execute(self.pool())
        .await?;
        self.job(id).await
    }

    /// Re-queues running jobs whose lease expired (their worker died or hung), after a
    /// backoff of `backoff_ms` × attempts; fails those out of attempts; cancels those a
    /// client had asked to cancel. The re-queue and the failure skip a job flagged for
    /// cancelling: a cancel that lands after the first statement leaves the job to the
    /// next round's, instead of re-queuing it with the request pending or failing it as
    /// `lease_expired`.
    pub async fn reap_expired(&self, backoff_ms: i64) -> Result<Reaped, StoreError> {
        let now = self.clock_sql();
        let ids = |rows: Vec<AnyRow>| {
            rows.iter()
                .map(|r| r.get::<String, _>(0))
                .collect::<Vec<_>>()
        };
        let cancelled = sqlx::query(&format!(
            "UPDATE jobs SET state = 'cancelled', error_code = 'cancelled', error = 'cancelled; its worker stopped', \
             finished_at = {now}, lease_owner = NULL, lease_until = NULL \
             WHERE state = 'running' AND lease_until < {now} AND cancel_requested = 1 RETURNING id",
        ))
        .fetch_all(self.pool())
        .await?;
        let requeued = sqlx::query(&format!(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL, run_after = {now} + $1 * attempts, \
             error_code = 'lease_expired', error = 'a worker stopped renewing its lease; re-queued' \
             WHERE state = 'running' AND lease_until < {now} AND attempts < max_attempts AND cancel_requested = 0 \
             RETURNING id",
        ))
        .bind(backoff_ms)
        .fetch_all(self.pool())
        .await?;
        let failed = sqlx::query(&format!(
            "UPDATE jobs SET state = 'failed', error_code = 'lease_expired', \
             error = 'its worker stopped renewing the lease on the last allowed attempt', \
             finished_at = {now}, lease_owner = NULL, lease_until = NULL \
             WHERE state = 'running' AND lease_until < {now} AND attempts >= max_attempts AND cancel_requested = 0 \
             RETURNING id",
        ))
        .fetch_all(self.pool())
        .await?;
        if !requeued.is_empty() {
            self.announce_queued().await?;
        }
        Ok(Reaped {
            requeued: ids(requeued),
            failed: ids(failed),
            cancelled: ids(cancelled),
        })
    }

    /// Tells idle workers of every instance that a job is queued (PostgreSQL
    /// `NOTIFY`; SQLite has a single process, whose workers are woken in memory).
    async fn announce_queued(&self) -> Result<(), StoreError> {
        if self.backend() == Backend::Postgres {
            sqlx::query(&format!("NOTIFY {JOBS_CHANNEL}"))
                .execute(self.pool())
                .await?;
        }
        Ok(())
    }

    /// Deletes a finished job, its report, and then every blob it used (inputs and
    /// artifact) that nothing else references any more and nobody uploaded again since
    /// a job or report last named it. `Ok(None)`: there is no
    /// finished job with this id (none at all, or it is still queued or running).
    pub async fn purge_job(&self, id: &str) -> Result<Option<Purged>, StoreError> {
        // Every statement writes: on SQLite a transaction that reads first and writes
        // later fails at once (SQLITE_BUSY_SNAPSHOT, no busy wait) when another
        // connection commits in between, as heartbeats and uploads constantly do.
        let mut tx = self.pool().begin().await?;
        let artifact: Option<String> = sqlx::query(
            "DELETE FROM reports WHERE job_id = $1 AND EXISTS (SELECT 1 FROM jobs WHERE id = $1 \
             AND state IN ('succeeded', 'failed', 'cancelled')) RETURNING artifact_sha256",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.get(0));
        let sql = format!(
            "DELETE FROM jobs WHERE id = $1 AND state IN ('succeeded', 'failed', 'cancelled') \
             RETURNING {JOB_COLUMNS}"
        );
        let Some(job) = sqlx::query_as::<_, Job>(&sql)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            // No such finished job (or another request purged it first): dropping the
            // transaction rolls back.
            return Ok(None);
        };
        tx.commit().await?;
        let mut candidates = vec![job.model_sha256, job.clean_sha256];
        candidates.extend(job.test_sha256);
        candidates.extend(job.poison_sha256);
        candidates.extend(artifact);
        candidates.sort();
        candidates.dedup();
        let mut freed_blobs = Vec::new();
        for sha in candidates {
            if self.free_blob_unless_resent(&sha).await? {
                freed_blobs.push(sha);
            }
        }
        Ok(Some(Purged { freed_blobs }))
    }

    /// Up to `limit` finished jobs that finished before `cutoff_ms`, oldest first: what
    /// the retention sweep deletes.
    pub async fn finished_before(
        &self,
        cutoff_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < $1 \
             AND state IN ('succeeded', 'failed', 'cancelled') ORDER BY finished_at LIMIT $2",
        )
        .bind(cutoff_ms)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The report JSON and artifact hash of a succeeded job.
    pub async fn report(&self, job_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query("SELECT report, artifact_sha256 FROM reports WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}

/// Records that `job` names its input blobs: an upload of them before this no longer
/// spares them when a job that used them is deleted (`free_blob_unless_resent`).
async fn mark_named<'e, E>(executor: E, job: &Job) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query("UPDATE blobs SET resent = 0 WHERE sha256 IN ($1, $2, $3, $4)")
        .bind(&job.model_sha256)
        .bind(&job.clean_sha256)
        .bind(&job.test_sha256)
        .bind(&job.poison_sha256)
        .execute(executor)
        .await?;
    Ok(())
}

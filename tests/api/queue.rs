//! The queue's guarantees, on SQLite and on PostgreSQL.

use std::collections::HashSet;
use std::time::Duration;

use bdscan::store::{JobState, Store};

use crate::helpers::{fresh_postgres_database, postgres_url, queue_job, TestDatabase};

async fn sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        Store::connect(&Store::sqlite_url(dir.path()))
            .await
            .unwrap(),
        dir,
    )
}

/// A store on a fresh PostgreSQL database, which is dropped with the returned guard.
async fn postgres_store(test: &str) -> Option<(Store, TestDatabase)> {
    let url = postgres_url(test)?;
    let database = fresh_postgres_database(&url).await;
    Some((Store::connect(&database.url).await.unwrap(), database))
}

const JOBS: usize = 40;
const CLAIMERS: usize = 8;

async fn two_workers_never_claim_the_same_job(store: Store) {
    for _ in 0..JOBS {
        queue_job(&store, 3).await;
    }
    let mut claimers = tokio::task::JoinSet::new();
    for n in 0..CLAIMERS {
        let store = store.clone();
        claimers.spawn(async move {
            let mut mine = Vec::new();
            while let Some(claimed) = store
                .claim_job(&format!("worker-{n}"), 60_000)
                .await
                .unwrap()
            {
                assert_eq!(claimed.job.state, JobState::Running);
                assert_eq!(
                    claimed.job.lease_owner.as_deref(),
                    Some(claimed.owner.as_str())
                );
                mine.push(claimed.job.id);
            }
            mine
        });
    }
    let mut all = Vec::new();
    while let Some(mine) = claimers.join_next().await {
        all.extend(mine.unwrap());
    }
    assert_eq!(all.len(), JOBS, "every job claimed exactly once");
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        JOBS,
        "a job was claimed twice"
    );
    assert!(store.claim_job("late", 60_000).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_never_claim_the_same_job_sqlite() {
    let (store, _dir) = sqlite_store().await;
    two_workers_never_claim_the_same_job(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_never_claim_the_same_job_postgres() {
    if let Some((store, _database)) =
        postgres_store("two_workers_never_claim_the_same_job_postgres").await
    {
        two_workers_never_claim_the_same_job(store).await;
    }
}

async fn expired_lease_is_requeued_and_its_old_owner_is_fenced_off(store: Store) {
    let id = queue_job(&store, 3).await;
    let dead = store
        .claim_job("dead-worker", 1)
        .await
        .unwrap()
        .expect("claims");
    assert_eq!(dead.job.id, id);
    assert_eq!(dead.job.attempts, 1);
    // The lease is still running for a live worker: the reaper leaves it alone.
    let other = queue_job(&store, 3).await;
    let live = store
        .claim_job("live-worker", 60_000)
        .await
        .unwrap()
        .expect("claims");
    assert_eq!(live.job.id, other);
    tokio::time::sleep(Duration::from_millis(20)).await;

    let reaped = store.reap_expired(0).await.unwrap();
    assert_eq!(reaped.requeued, vec![id.clone()]);
    assert!(reaped.failed.is_empty() && reaped.cancelled.is_empty());
    assert_eq!(
        store.job(&id).await.unwrap().unwrap().state,
        JobState::Queued
    );

    let second = store
        .claim_job("second-worker", 60_000)
        .await
        .unwrap()
        .expect("re-claims");
    assert_eq!(second.job.id, id);
    assert_eq!(second.job.attempts, 2);
    // The first worker wakes up: it can neither renew nor finish what is no longer its job.
    assert_eq!(store.heartbeat(&dead, 60_000).await.unwrap(), None);
    assert!(!store.record_progress(&dead, "purify", 1, 2).await.unwrap());
    assert!(!store
        .finish_unsuccessful(&dead, JobState::Failed, "internal", "stale")
        .await
        .unwrap());
    assert_eq!(store.heartbeat(&second, 60_000).await.unwrap(), Some(false));
    assert!(store
        .finish_unsuccessful(&second, JobState::Failed, "internal", "done")
        .await
        .unwrap());
    let job = store.job(&id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.error.as_deref()),
        (JobState::Failed, Some("done"))
    );
}

#[tokio::test]
async fn expired_lease_is_requeued_and_its_old_owner_is_fenced_off_sqlite() {
    let (store, _dir) = sqlite_store().await;
    expired_lease_is_requeued_and_its_old_owner_is_fenced_off(store).await;
}

#[tokio::test]
async fn expired_lease_is_requeued_and_its_old_owner_is_fenced_off_postgres() {
    if let Some((store, _database)) =
        postgres_store("expired_lease_is_requeued_and_its_old_owner_is_fenced_off_postgres").await
    {
        expired_lease_is_requeued_and_its_old_owner_is_fenced_off(store).await;
    }
}

async fn last_attempt_failing_its_lease_fails_the_job(store: Store) {
    let id = queue_job(&store, 1).await;
    let cancel_me = queue_job(&store, 1).await;
    store
        .claim_job("dead-worker", 1)
        .await
        .unwrap()
        .expect("claims");
    store
        .claim_job("dead-worker", 1)
        .await
        .unwrap()
        .expect("claims");
    store.request_cancel(&cancel_me).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reaped = store.reap_expired(0).await.unwrap();
    assert_eq!(reaped.failed, vec![id.clone()]);
    assert_eq!(reaped.cancelled, vec![cancel_me.clone()]);
    assert!(reaped.requeued.is_empty());
    let job = store.job(&id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error_code.as_deref(), Some("lease_expired"));
    assert!(job.finished_at.is_some() && job.lease_owner.is_none());
    assert_eq!(
        store.job(&cancel_me).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert!(store.claim_job("anyone", 1000).await.unwrap().is_none());
}

#[tokio::test]
async fn last_attempt_failing_its_lease_fails_the_job_sqlite() {
    let (store, _dir) = sqlite_store().await;
    last_attempt_failing_its_lease_fails_the_job(store).await;
}

#[tokio::test]
async fn last_attempt_failing_its_lease_fails_the_job_postgres() {
    if let Some((store, _database)) =
        postgres_store("last_attempt_failing_its_lease_fails_the_job_postgres").await
    {
        last_attempt_failing_its_lease_fails_the_job(store).await;
    }
}

async fn backoff_delays_a_requeued_job(store: Store) {
    let id = queue_job(&store, 3).await;
    store
        .claim_job("dead-worker", 1)
        .await
        .unwrap()
        .expect("claims");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.reap_expired(60_000).await.unwrap().requeued, vec![id]);
    assert!(
        store.claim_job("eager", 1000).await.unwrap().is_none(),
        "the job waits out its backoff"
    );
}

#[tokio::test]
async fn backoff_delays_a_requeued_job_sqlite() {
    let (store, _dir) = sqlite_store().await;
    backoff_delays_a_requeued_job(store).await;
}

#[tokio::test]
async fn backoff_delays_a_requeued_job_postgres() {
    if let Some((store, _database)) = postgres_store("backoff_delays_a_requeued_job_postgres").await
    {
        backoff_delays_a_requeued_job(store).await;
    }
}

/// Both backends' clocks read milliseconds since the Unix epoch, as the process's does
/// (the API renders them as dates), and a lease is its length past the claim.
async fn job_times_are_unix_milliseconds(store: Store) {
    let before = bdscan::store::now_ms();
    let id = queue_job(&store, 1).await;
    let claimed = store.claim_job("worker", 30_000).await.unwrap().unwrap();
    let after = bdscan::store::now_ms();
    assert_eq!(claimed.job.id, id);
    // One host: the clocks agree to within a clock tick either side.
    let created = claimed.job.created_at;
    assert!(
        (before - 20..=after + 20).contains(&created),
        "{before} <= {created} <= {after}"
    );
    let started = claimed.job.started_at.unwrap();
    assert!((created..=after + 20).contains(&started));
    assert!((started + 30_000..=after + 30_020).contains(&claimed.job.lease_until.unwrap()));
}

#[tokio::test]
async fn job_times_are_unix_milliseconds_sqlite() {
    let (store, _dir) = sqlite_store().await;
    job_times_are_unix_milliseconds(store).await;
}

#[tokio::test]
async fn job_times_are_unix_milliseconds_postgres() {
    if let Some((store, _database)) =
        postgres_store("job_times_are_unix_milliseconds_postgres").await
    {
        job_times_are_unix_milliseconds(store).await;
    }
}

/// Sets the clock the queue reads (migrations/postgres/0008_database_clock.sql) to the
/// database's own plus `offset_ms`.
async fn set_database_clock(url: &str, offset_ms: i64) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(&format!(
        "CREATE OR REPLACE FUNCTION bdscan_clock_ms() RETURNS BIGINT LANGUAGE sql STABLE \
         AS $$ SELECT CAST(FLOOR(EXTRACT(EPOCH FROM now()) * 1000) AS BIGINT) + ({offset_ms}) $$"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
}

/// Replicas whose clocks disagree must agree on when a lease runs out. The queue keeps
/// every job time by the database's clock, so this process's clock (standing for a
/// replica's) decides nothing: with the database's clock an hour behind it, times are
/// written an hour back, and a lease this process's clock has long passed runs out only
/// when the database's clock passes it. Taking times from the process instead fails it.
#[tokio::test]
async fn leases_run_on_the_database_clock_postgres() {
    let Some((store, database)) = postgres_store("leases_run_on_the_database_clock_postgres").await
    else {
        return;
    };
    const HOUR_MS: i64 = 3_600_000;
    const LEASE_MS: i64 = 30_000;
    // Generous against a slow machine; far below the hour it tells apart.
    let near = |value: i64, expected: i64| (value - expected).abs() < 10_000;
    set_database_clock(&database.url, -HOUR_MS).await;

    let id = queue_job(&store, 3).await;
    let job = store.job(&id).await.unwrap().unwrap();
    let process_now = bdscan::store::now_ms();
    assert!(
        near(job.created_at, process_now - HOUR_MS),
        "created_at {} is not the database's clock ({}); this process's reads {process_now}",
        job.created_at,
        process_now - HOUR_MS
    );
    // The upload's time too (the retention sweep compares it), and the clock the sweep reads.
    let blob_created: i64 = sqlx::query_scalar("SELECT created_at FROM blobs")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(near(blob_created, process_now - HOUR_MS));
    assert!(near(store.clock_ms().await.unwrap(), process_now - HOUR_MS));
    let claimed = store
        .claim_job("replica-a", LEASE_MS)
        .await
        .unwrap()
        .expect("claims the job the database's clock made runnable");
    let lease_until = claimed.job.lease_until.unwrap();
    assert!(near(lease_until, process_now - HOUR_MS + LEASE_MS));
    assert!(near(claimed.job.started_at.unwrap(), process_now - HOUR_MS));
    assert!(
        lease_until < bdscan::store::now_ms(),
        "by this process's clock the lease ran out long ago"
    );
    let reaped = store.reap_expired(0).await.unwrap();
    assert_eq!(
        reaped,
        bdscan::store::Reaped::default(),
        "the lease is still running"
    );
    assert_eq!(
        store.heartbeat(&claimed, LEASE_MS).await.unwrap(),
        Some(false)
    );

    // The database's clock passes the lease: now it has run out.
    set_database_clock(&database.url, LEASE_MS + 1_000).await;
    let reaped = store.reap_expired(0).await.unwrap();
    assert_eq!(reaped.requeued, vec![id.clone()]);
    assert_eq!(store.heartbeat(&claimed, LEASE_MS).await.unwrap(), None);
    let second = store
        .claim_job("replica-b", LEASE_MS)
        .await
        .unwrap()
        .expect("re-claims");
    assert!(near(
        second.job.lease_until.unwrap(),
        bdscan::store::now_ms() + 2 * LEASE_MS + 1_000
    ));
    assert!(store
        .finish_unsuccessful(&second, JobState::Failed, "internal", "done")
        .await
        .unwrap());
    let finished = store.job(&id).await.unwrap().unwrap();
    assert!(near(
        finished.finished_at.unwrap(),
        bdscan::store::now_ms() + LEASE_MS + 1_000
    ));
}

async fn database_exists(server_url: &str, name: &str) -> bool {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(server_url).await.unwrap();
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
    found.is_some()
}

#[tokio::test]
async fn test_databases_are_dropped_after_their_test_and_after_dead_runs() {
    use sqlx::Connection;
    let Some(server_url) =
        postgres_url("test_databases_are_dropped_after_their_test_and_after_dead_runs")
    else {
        return;
    };
    let database = fresh_postgres_database(&server_url).await;
    let name = database.url.rsplit('/').next().unwrap().to_string();
    let store = Store::connect(&database.url).await.unwrap();
    queue_job(&store, 1).await;
    assert!(database_exists(&server_url, &name).await);

    // A database left by a run that was killed (pid 0 is never a test process).
    let orphan = format!("bdscan_test_0_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&server_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {orphan}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    crate::helpers::drop_databases_of_dead_runs(&server_url).await;
    assert!(
        !database_exists(&server_url, &orphan).await,
        "the dead run's database is gone"
    );
    assert!(
        database_exists(&server_url, &name).await,
        "a live run's database stays"
    );

    // Dropping the guard drops the database, even with the store's connections open.
    drop(database);
    assert!(!database_exists(&server_url, &name).await);
    drop(store);
}

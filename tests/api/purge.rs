//! Deleting a finished job removes it, its report and the blobs nothing else uses.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Row;

use crate::helpers::{
    assert_problem, demo_files, postgres_url, quick_config, spawn_app, Db, Options, TestApp,
};

async fn count_rows(app: &TestApp, table: &str) -> i64 {
    sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(app.store().pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

async fn blob_status(app: &TestApp, sha: &str) -> StatusCode {
    app.get_json(&format!("/v1/blobs/{sha}")).await.0
}

async fn delete(app: &TestApp, id: &str) -> reqwest::Response {
    app.client
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap()
}

async fn run_job(app: &TestApp, model: &str, clean: &str) -> (String, String) {
    let job = app
        .create_job(&json!({ "model": model, "clean": clean, "config": quick_config() }))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let job = app
        .wait_for(&id, Duration::from_secs(240), |j| {
            j["state"] != "queued" && j["state"] != "running"
        })
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, report) = app.get_json(&format!("/v1/jobs/{id}/report")).await;
    assert_eq!(status, StatusCode::OK);
    let artifact = report["artifact"]["sha256"].as_str().unwrap().to_string();
    (id, artifact)
}

async fn deleting_jobs_frees_blobs_nothing_else_uses(db: Db) {
    let files = demo_files().await;
    let app = spawn_app(Options {
        db,
        workers: 1,
        ..Options::default()
    })
    .await;
    let read = |path: &std::path::Path| std::fs::read(path).unwrap();
    let model = app.upload(read(&files.backdoored_model)).await;
    let clean_a = app.upload(read(&files.clean)).await;
    let clean_b = app.upload(read(&files.test)).await;
    // Uploaded but never used by a job: no job deletion touches it.
    let unrelated = app.upload(vec![7u8; 3 << 20]).await;
    let (job_a, artifact_a) = run_job(&app, &model, &clean_a).await;
    let (job_b, artifact_b) = run_job(&app, &model, &clean_b).await;
    assert_ne!(artifact_a, artifact_b);
    assert_eq!(count_rows(&app, "blobs").await, 6);

    // Delete A: its own clean bundle and artifact go, the shared model stays.
    let response = delete(&app, &job_a).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_problem(
        delete(&app, &job_a).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let (status, _) = app.get_json(&format!("/v1/jobs/{job_a}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for gone in [&clean_a, &artifact_a] {
        assert_eq!(
            blob_status(&app, gone).await,
            StatusCode::NOT_FOUND,
            "{gone}"
        );
    }
    for kept in [&model, &clean_b, &artifact_b, &unrelated] {
        assert_eq!(blob_status(&app, kept).await, StatusCode::OK, "{kept}");
    }
    // B is whole: its report and its purified model, byte for byte.
    let (status, _) = app.get_json(&format!("/v1/jobs/{job_b}/report")).await;
    assert_eq!(status, StatusCode::OK);
    let download = app
        .client
        .get(app.url(&format!("/v1/jobs/{job_b}/artifact")))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    let bytes = download.bytes().await.unwrap();
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        artifact_b
    );

    // Delete B: now the model goes too; only the unrelated upload and its chunks remain.
    let response = delete(&app, &job_b).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    for gone in [&model, &clean_b, &artifact_b] {
        assert_eq!(
            blob_status(&app, gone).await,
            StatusCode::NOT_FOUND,
            "{gone}"
        );
    }
    assert_eq!(blob_status(&app, &unrelated).await, StatusCode::OK);
    assert_eq!(count_rows(&app, "jobs").await, 0);
    assert_eq!(count_rows(&app, "reports").await, 0);
    assert_eq!(count_rows(&app, "blobs").await, 1);
    let chunks = sqlx::query("SELECT COUNT(*) FROM blob_chunks WHERE blob_key = $1")
        .bind(&unrelated)
        .fetch_one(app.store().pool())
        .await
        .unwrap()
        .get::<i64, _>(0);
    assert_eq!(chunks, 3, "the unrelated 3 MiB upload keeps its chunks");
    assert_eq!(
        count_rows(&app, "blob_chunks").await,
        3,
        "no other chunk is left"
    );

    // A job may still be created over the surviving blob; a freed one is unknown.
    let again = app
        .client
        .post(app.url("/v1/jobs"))
        .json(&json!({ "model": model, "clean": unrelated }))
        .send()
        .await
        .unwrap();
    let problem: Value =
        assert_problem(again, StatusCode::UNPROCESSABLE_ENTITY, "unknown_blob").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("model"),
        "{problem}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_jobs_frees_blobs_nothing_else_uses_sqlite() {
    deleting_jobs_frees_blobs_nothing_else_uses(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_jobs_frees_blobs_nothing_else_uses_postgres() {
    if let Some(url) = postgres_url("deleting_jobs_frees_blobs_nothing_else_uses_postgres") {
        deleting_jobs_frees_blobs_nothing_else_uses(Db::Postgres(url)).await;
    }
}

/// `job_retention`: the reaper deletes finished jobs that old as `DELETE` would, and
/// leaves unfinished ones and blobs they use alone.
async fn finished_jobs_past_their_retention_are_deleted_with_their_own_blobs(db: Db) {
    let app = spawn_app(Options {
        db,
        job_retention: Some(Duration::from_secs(2)),
        ..Options::default()
    })
    .await;
    let shared = app.upload(b"a model two jobs use".to_vec()).await;
    let own = app
        .upload(b"the finished job's clean bundle".to_vec())
        .await;
    let waiting_clean = app.upload(b"the queued job's clean bundle".to_vec()).await;
    let never_used = app.upload(b"uploaded, never used".to_vec()).await;
    let mut ids = Vec::new();
    for clean in [&own, &waiting_clean] {
        let job = app
            .create_job(&json!({ "model": shared, "clean": clean }))
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
        // Jobs run in order of creation, to the millisecond: the first must run first.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (finished, waiting) = (&ids[0], &ids[1]);
    // The older job; not TorchScript, so it fails at once, which finishes it as well
    // as success would.
    let state = app
        .worker("w")
        .run_once(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(state, Some(bdscan::store::JobState::Failed));
    let (status, _) = app.get_json(&format!("/v1/jobs/{finished}")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "kept until its retention has passed"
    );

    // Until the round that deleted the job has freed its blobs and counted it too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.get_json(&format!("/v1/jobs/{finished}")).await.0 != StatusCode::NOT_FOUND
        || blob_status(&app, &never_used).await != StatusCode::NOT_FOUND
        || blob_status(&app, &own).await != StatusCode::NOT_FOUND
        || !app
            .metrics_text()
            .await
            .contains("bdscan_jobs_expired_total 1\n")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the finished job, its clean bundle or the unused upload outlived its \
             retention by 18 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for kept in [&shared, &waiting_clean] {
        assert_eq!(blob_status(&app, kept).await, StatusCode::OK, "{kept}");
    }
    let (status, job) = app.get_json(&format!("/v1/jobs/{waiting}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["state"], "queued", "unfinished jobs are never expired");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_past_their_retention_are_deleted_with_their_own_blobs_sqlite() {
    finished_jobs_past_their_retention_are_deleted_with_their_own_blobs(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_past_their_retention_are_deleted_with_their_own_blobs_postgres() {
    if let Some(url) =
        postgres_url("finished_jobs_past_their_retention_are_deleted_with_their_own_blobs_postgres")
    {
        finished_jobs_past_their_retention_are_deleted_with_their_own_blobs(Db::Postgres(url))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_finished_jobs_while_other_writes_commit_never_fails() {
    // On SQLite a transaction that read before it wrote failed at once (500) whenever
    // another connection committed in between; a running service commits heartbeats,
    // progress and upload chunks all the time.
    let app = spawn_app(Options::default()).await;
    let store = app.store().clone();
    let mut ids = Vec::new();
    for _ in 0..40 {
        let id = crate::helpers::queue_job(&store, 1).await;
        let claimed = store.claim_job("w", 60_000).await.unwrap().expect("claims");
        assert!(store
            .finish_unsuccessful(&claimed, bdscan::store::JobState::Failed, "internal", "x")
            .await
            .unwrap());
        ids.push(id);
    }
    // Another writer, committing as fast as it can: a job of its own kept running.
    let busy_id = crate::helpers::queue_job(&store, 1).await;
    let busy = store
        .claim_job("busy", 60_000)
        .await
        .unwrap()
        .expect("claims");
    assert_eq!(busy.job.id, busy_id);
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let (store, stop) = (store.clone(), stop.clone());
        async move {
            let mut step = 0;
            while !stop.is_cancelled() {
                step += 1;
                store
                    .record_progress(&busy, "busy", step, 1_000_000)
                    .await
                    .unwrap();
            }
        }
    });
    let deletes = ids.iter().map(|id| delete(&app, id));
    for response in futures_util::future::join_all(deletes).await {
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    stop.cancel();
    writer.await.unwrap();
    assert_eq!(count_rows(&app, "jobs").await, 1);
    app.stop().await;
}

/// A client re-sends a file (the server answers "already stored") to name it in a new
/// job; meanwhile an old job that used it is deleted. The file stays for the new job;
/// once a job has named it, deleting that job frees it as usual.
async fn a_file_sent_again_outlives_the_deletion_of_an_old_job_that_used_it(db: Db) {
    let app = spawn_app(Options {
        db,
        ..Options::default()
    })
    .await;
    let model = app.upload(b"model bytes".to_vec()).await;
    let clean = app.upload(b"clean bytes".to_vec()).await;
    let finish = |id: String| {
        let store = app.store().clone();
        async move {
            let claimed = store.claim_job("w", 60_000).await.unwrap().unwrap();
            assert_eq!(claimed.job.id, id);
            let failed = bdscan::store::JobState::Failed;
            assert!(store
                .finish_unsuccessful(&claimed, failed, "invalid_input", "test")
                .await
                .unwrap());
        }
    };
    let old = app
        .create_job(&json!({ "model": model, "clean": clean }))
        .await;
    let old = old["id"].as_str().unwrap().to_string();
    finish(old.clone()).await;
    assert_eq!(app.upload(b"model bytes".to_vec()).await, model);

    assert_eq!(delete(&app, &old).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(blob_status(&app, &model).await, StatusCode::OK);
    assert_eq!(blob_status(&app, &clean).await, StatusCode::NOT_FOUND);

    // The new job, its answer lost: the client re-sends both files and the request, and
    // gets the same job; the files are named again by it.
    let clean = app.upload(b"clean bytes".to_vec()).await;
    let submit = || {
        app.client
            .post(app.url("/v1/jobs"))
            .header("Idempotency-Key", "nightly-scan")
            .json(&json!({ "model": model, "clean": clean }))
            .send()
    };
    assert_eq!(submit().await.unwrap().status(), StatusCode::ACCEPTED);
    app.upload(b"model bytes".to_vec()).await;
    app.upload(b"clean bytes".to_vec()).await;
    let replay = submit().await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let new: Value = replay.json().await.unwrap();
    let new = new["id"].as_str().unwrap().to_string();
    finish(new.clone()).await;
    assert_eq!(delete(&app, &new).await.status(), StatusCode::NO_CONTENT);
    for gone in [&model, &clean] {
        assert_eq!(blob_status(&app, gone).await, StatusCode::NOT_FOUND);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_again_outlives_the_deletion_of_an_old_job_that_used_it_sqlite() {
    a_file_sent_again_outlives_the_deletion_of_an_old_job_that_used_it(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_again_outlives_the_deletion_of_an_old_job_that_used_it_postgres() {
    if let Some(url) =
        postgres_url("a_file_sent_again_outlives_the_deletion_of_an_old_job_that_used_it_postgres")
    {
        a_file_sent_again_outlives_the_deletion_of_an_old_job_that_used_it(Db::Postgres(url)).await;
    }
}

//! Workers with real child processes: cancellation, crashes, and re-running a job
//! whose worker died.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bdscan::store::JobState;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    audit_form, demo_files, postgres_url, quick_config, spawn_app, Db, Options, TestApp,
};

/// An executable shell `script` at `dir/name`, run in place of the bdscan binary as each
/// job's child (`job --spec SPEC`).
fn fake_child(dir: &std::path::Path, name: &str, script: &str) -> std::path::PathBuf {
    let exe = dir.join(name);
    std::fs::write(&exe, script).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    exe
}

async fn submit_demo_job(app: &TestApp, config: &Value) -> String {
    let files = demo_files().await;
    let response = app
        .client
        .post(app.url("/v1/scans"))
        .multipart(audit_form(&files, config))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

/// Queues a job whose model and clean bundle are one small upload: for scan processes
/// that never read their inputs. Returns its id.
async fn queue_job_over_one_file(app: &TestApp) -> String {
    let blob = app.upload(b"model".to_vec()).await;
    let job: Value = app
        .create_job(&json!({ "model": blob, "clean": blob }))
        .await;
    job["id"].as_str().unwrap().to_string()
}

/// Runs the next queued job in a worker called `worker`: how it ended, and job `id` as
/// the API then shows it.
async fn run_next_job(app: &TestApp, worker: &str, id: &str) -> (Option<JobState>, Value) {
    let state = app
        .worker(worker)
        .run_once(&CancellationToken::new())
        .await
        .unwrap();
    let (_, job) = app.get_json(&format!("/v1/jobs/{id}")).await;
    (state, job)
}

/// Uploads `model` and `clean`, makes a job of them and runs it in worker `w`: how it
/// ended, and the job as the API then shows it.
async fn run_job_of(app: &TestApp, model: &[u8], clean: &[u8]) -> (Option<JobState>, Value) {
    let model = app.upload(model.to_vec()).await;
    let clean = app.upload(clean.to_vec()).await;
    let job: Value = app
        .create_job(&json!({ "model": model, "clean": clean }))
        .await;
    run_next_job(app, "w", job["id"].as_str().unwrap()).await
}

/// `run_job_of` with `bytes` as both files: for scan processes that fail before reading
/// their inputs, or ought to.
async fn run_job_over(app: &TestApp, bytes: &[u8]) -> (Option<JobState>, Value) {
    run_job_of(app, bytes, bytes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_its_process() {
    let app = spawn_app(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    // Long enough that it cannot finish before the cancellation lands.
    let id = submit_demo_job(&app, &json!({ "purify_epochs": 500 })).await;
    app.wait_for(&id, Duration::from_secs(120), |j| {
        j["state"] == "running" && !j["progress"]["phase"].is_null()
    })
    .await;

    let response = app
        .client
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["cancel_requested"], true);

    let job = app
        .wait_for(&id, Duration::from_secs(60), |j| j["state"] != "running")
        .await;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["error"]["code"], "cancelled");
    let response = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/report")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_scan_process_fails_its_job_and_the_server_keeps_serving() {
    // Stands in for libtorch dying inside the child: the process ends by SIGSEGV.
    let dir = tempfile::tempdir().unwrap();
    let exe = fake_child(
        dir.path(),
        "segfaulting-bdscan",
        "#!/bin/sh\necho 'about to crash' >&2\nkill -SEGV $$\n",
    );
    let app = spawn_app(Options {
        workers: 1,
        exe: Some(exe),
        ..Options::default()
    })
    .await;

    let blob = app.upload(b"model".to_vec()).await;
    let body = json!({ "model": blob, "clean": blob });
    let job: Value = app.create_job(&body).await;
    let id = job["id"].as_str().unwrap();
    let job = app
        .wait_for(id, Duration::from_secs(30), |j| {
            j["state"] != "queued" && j["state"] != "running"
        })
        .await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "worker_crashed");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("signal 11") && message.contains("about to crash"),
        "{message}"
    );

    assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
    // The worker survived too: it picks up the next job.
    let body = json!({ "model": blob, "clean": blob, "config": { "seed": 1 } });
    let next: Value = app.create_job(&body).await;
    let next = app
        .wait_for(next["id"].as_str().unwrap(), Duration::from_secs(30), |j| {
            j["state"] == "failed"
        })
        .await;
    assert_eq!(next["error"]["code"], "worker_crashed");
    app.stop().await;
}

/// A scan process whose output a hostile model steered: an over-long stdout line, a
/// progress phase and an error message with NUL in them (a safetensors tensor can be
/// named so, and the error names what it found), which PostgreSQL's text columns refuse.
async fn hostile_child_output_is_stored_safely(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let exe = fake_child(
        dir.path(),
        "hostile-bdscan",
        r#"#!/bin/sh
work=$(dirname "$3")
head -c 300000 /dev/zero | tr '\0' 'x'
echo
printf '{"phase":"load\\u0000ing","step":1,"total":2}\n'
sleep 0.5
printf '{"code":"invalid_input","message":"no images tensor; found [\\"a\\u0000b\\"]"}' > "$work/error.json"
exit 2
"#,
    );
    let app = spawn_app(Options {
        db,
        exe: Some(exe),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    let (state, job) = run_next_job(&app, "w", &id).await;
    assert_eq!(state, Some(JobState::Failed), "{job}");
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "invalid_input", "{job}");
    assert_eq!(
        job["error"]["message"], "no images tensor; found [\"a\u{FFFD}b\"]",
        "{job}"
    );
    assert_eq!(job["progress"]["phase"], "load\u{FFFD}ing", "{job}");
    // The work folder with the job's input copies is gone.
    let left: Vec<_> = std::fs::read_dir(&app.state.config.worker.work_dir)
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_child_output_is_stored_safely_sqlite() {
    hostile_child_output_is_stored_safely(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_child_output_is_stored_safely_postgres() {
    if let Some(url) = postgres_url("hostile_child_output_is_stored_safely_postgres") {
        hostile_child_output_is_stored_safely(Db::Postgres(url)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_files_fail_the_job_as_invalid_input() {
    let app = spawn_app(Options::default()).await;
    let (state, job) = run_job_over(&app, b"this is not TorchScript").await;
    assert_eq!(state, Some(JobState::Failed));
    assert_eq!(job["error"]["code"], "invalid_input", "{job}");
    app.stop().await;
}

/// A model whose `forward` takes `bytes` of memory first.
fn memory_hog(dir: &std::path::Path, bytes: &str) -> std::path::PathBuf {
    crate::common::scripted_model(
        dir,
        "hog",
        &format!(
            r#"
import sys, torch
from torch import nn
class Hog(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(784, 16)
        self.out = nn.Linear(16, 10)
    def forward(self, x):
        hoard = torch.ones({bytes}, dtype=torch.uint8)
        logits = self.out(torch.relu(self.hidden(x.to(torch.float32).flatten(1))))
        return logits + hoard[0].to(torch.float32)
torch.jit.script(Hog()).save(sys.argv[1])
"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_allocates_past_the_job_memory_limit_fails_its_job_as_memory_limit() {
    // 6 GiB in `forward`: without the limit this machine would hand it over (or a
    // smaller one would reach for its OOM killer); under a 2 GiB limit libtorch's
    // allocator is refused and the scan reports it.
    let dir = tempfile::tempdir().unwrap();
    let hog = memory_hog(dir.path(), "6 << 30");
    let limit = 2u64 << 30;
    let app = spawn_app(Options {
        job_memory_limit: Some(limit),
        ..Options::default()
    })
    .await;
    let clean = std::fs::read(demo_files().await.clean).unwrap();
    let (state, job) = run_job_of(&app, &std::fs::read(&hog).unwrap(), &clean).await;
    assert_eq!(state, Some(JobState::Failed));
    assert_eq!(job["error"]["code"], "memory_limit", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("job_memory_limit = {limit} bytes"))
            && message.contains("can't allocate memory"),
        "{message}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_refused_memory_without_a_limit_fails_its_job_as_out_of_memory() {
    // 2^60 bytes: more than any x86-64 address space maps, so refused on every
    // machine, overcommit or not. Without a job_memory_limit this was `internal`.
    let dir = tempfile::tempdir().unwrap();
    let hog = memory_hog(dir.path(), "1 << 60");
    let app = spawn_app(Options::default()).await;
    let clean = std::fs::read(demo_files().await.clean).unwrap();
    let (state, job) = run_job_of(&app, &std::fs::read(&hog).unwrap(), &clean).await;
    assert_eq!(state, Some(JobState::Failed));
    assert_eq!(job["error"]["code"], "out_of_memory", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("ran out of memory") && message.contains("can't allocate memory"),
        "{message}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_inflates_past_the_job_memory_limit_fails_its_job_as_memory_limit() {
    // 1.25 GB of float32 zeros in a 1.3 MB upload, under a 1 GiB limit: the bundle's
    // read is refused memory, and the job says so rather than calling the file malformed.
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("zeros.npz");
    crate::common::write_zeros_npz(&bundle, 400_000, [1, 28, 28]);
    let model = crate::common::fixture("models/mnist_cnn_bn.pt");
    let app = spawn_app(Options {
        job_memory_limit: Some(1 << 30),
        ..Options::default()
    })
    .await;
    let (model, clean) = (
        std::fs::read(model).unwrap(),
        std::fs::read(&bundle).unwrap(),
    );
    let (state, job) = run_job_of(&app, &model, &clean).await;
    assert_eq!(state, Some(JobState::Failed));
    assert_eq!(job["error"]["code"], "memory_limit", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("job_memory_limit = 1073741824 bytes")
            && message.contains("not enough memory to read npz entry `images`"),
        "{message}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_dies_of_a_failed_allocation_is_memory_limit_or_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    // Under a job_memory_limit the limit is named; without one the machine ran out
    // (`worker_crashed` before, which told the caller nothing to do).
    // Rust's own allocation failure (a bundle buffer, say) aborts the process; a tch
    // call without `f_` panics on libtorch's allocator error and exits with 101.
    let children = [
        (
            fake_child(
                dir.path(),
                "aborting-bdscan",
                "#!/bin/sh\necho 'memory allocation of 3221225472 bytes failed' >&2\nkill -ABRT $$\n",
            ),
            "signal 6",
        ),
        (
            fake_child(
                dir.path(),
                "panicking-bdscan",
                "#!/bin/sh\n\
                 echo \"thread 'main' panicked at src/engine/data.rs:21:5:\" >&2\n\
                 echo \"called Result::unwrap() on an Err value: Torch(DefaultCPUAllocator: \
                 can't allocate memory: you tried to allocate 4096 bytes.)\" >&2\n\
                 exit 101\n",
            ),
            "exited with code 101",
        ),
    ];
    for (exe, how) in &children {
        for (limit, code) in [(Some(4u64 << 30), "memory_limit"), (None, "out_of_memory")] {
            let app = spawn_app(Options {
                exe: Some(exe.clone()),
                job_memory_limit: limit,
                ..Options::default()
            })
            .await;
            let (_, job) = run_job_over(&app, b"model").await;
            assert_eq!(job["error"]["code"], code, "{job}");
            let message = job["error"]["message"].as_str().unwrap();
            assert!(message.contains(how), "{message}");
            app.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_runs_past_the_time_limit_is_stopped_and_fails_as_timed_out() {
    // Stands in for a model whose `forward` loops for ever: it reports one step, then
    // never another.
    let dir = tempfile::tempdir().unwrap();
    let exe = fake_child(
        dir.path(),
        "looping-bdscan",
        "#!/bin/sh\necho '{\"phase\":\"purify\",\"step\":1,\"total\":40}'\nexec sleep 600\n",
    );
    let app = spawn_app(Options {
        exe: Some(exe),
        job_timeout: Some(Duration::from_secs(2)),
        ..Options::default()
    })
    .await;
    let started = std::time::Instant::now();
    let (state, job) = run_job_over(&app, b"model").await;
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(state, Some(JobState::Failed));
    assert_eq!(job["error"]["code"], "timed_out", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("job_timeout_secs = 2") && message.contains("during `purify`"),
        "{message}"
    );
    // Counted by its code, for alerts on hostile or runaway models.
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("bdscan_jobs_failed_total{code=\"timed_out\"} 1\n")
            && metrics.contains("bdscan_jobs_failed_total{code=\"memory_limit\"} 0\n"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_whose_training_diverges_fails_the_job_as_diverged_not_internal() {
    let app = spawn_app(Options::default()).await;
    // At this rate every purification attempt overflows the weights in its first steps.
    let config = json!({ "purify_epochs": 1, "recovery_epochs": 1, "purify_lr": 1e30 });
    let id = submit_demo_job(&app, &config).await;
    let (state, job) = run_next_job(&app, "w", &id).await;
    assert_eq!(state, Some(JobState::Failed));
    assert_eq!(job["error"]["code"], "diverged", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("lower purify_lr or"), "{job}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_hands_running_jobs_back_to_the_queue() {
    let app = spawn_app(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let id = submit_demo_job(&app, &json!({ "purify_epochs": 500 })).await;
    app.wait_for(&id, Duration::from_secs(120), |j| j["state"] == "running")
        .await;
    let database_url = app.state.config.database_url.clone();
    let _data = app.stop().await;

    let store = bdscan::store::Store::connect(&database_url).await.unwrap();
    let job = store.job(&id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued, "{job:?}");
    assert_eq!(job.attempts, 0, "a hand-back does not use up an attempt");
    assert!(job.lease_owner.is_none());
    // Queued again: no progress of the stopped attempt, and no running clock.
    assert!(
        job.progress_phase.is_none() && job.progress_step == 0,
        "{job:?}"
    );
    let view = bdscan::server::view::JobView::new(&job);
    assert!(view.timings.running_ms.is_none() && view.timings.queued_ms.is_some());
}

async fn a_job_whose_worker_died_is_run_again(db: Db) {
    let app = spawn_app(Options {
        db,
        workers: 0,
        ..Options::default()
    })
    .await;
    let id = submit_demo_job(&app, &quick_config()).await;
    // A worker takes the job and dies at once: its 1 ms lease is never renewed.
    let dead = app
        .store()
        .claim_job("dead-worker", 1)
        .await
        .unwrap()
        .expect("claims");
    assert_eq!(dead.job.id, id);

    // The app's reaper puts it back in the queue; another worker runs it to the end.
    app.wait_for(&id, Duration::from_secs(30), |j| j["state"] == "queued")
        .await;
    let (state, job) = run_next_job(&app, "second-worker", &id).await;
    assert_eq!(state, Some(JobState::Succeeded));
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2);
    let (status, report) = app.get_json(&format!("/v1/jobs/{id}/report")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(report["metrics"]["after"]["asr"].as_f64().is_some());
    // The dead worker's late result is refused.
    assert!(!app
        .store()
        .finish_unsuccessful(&dead, JobState::Failed, "internal", "late")
        .await
        .unwrap());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_died_is_run_again_sqlite() {
    a_job_whose_worker_died_is_run_again(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_died_is_run_again_postgres() {
    if let Some(url) = postgres_url("a_job_whose_worker_died_is_run_again_postgres") {
        a_job_whose_worker_died_is_run_again(Db::Postgres(url)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_by_another_instance_wakes_idle_workers_on_postgres() {
    let Some(url) = postgres_url("a_job_queued_by_another_instance_wakes_idle_workers_on_postgres")
    else {
        return;
    };
    // Workers that would not poll again for a minute: only the notification can wake them.
    let app = spawn_app(Options {
        db: Db::Postgres(url),
        workers: 1,
        poll_interval: Duration::from_secs(60),
        ..Options::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other_instance = bdscan::store::Store::connect(&app.state.config.database_url)
        .await
        .unwrap();
    let id = crate::helpers::queue_job(&other_instance, 1).await;
    let job = app
        .wait_for(&id, Duration::from_secs(20), |j| j["state"] != "queued")
        .await;
    assert_ne!(job["state"], "queued");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_scan_request_returns_when_the_service_stops() {
    use reqwest::multipart::{Form, Part};
    let app = spawn_app(Options::default()).await;
    let (client, url) = (app.client.clone(), app.url("/v1/scans?wait=300"));
    let form = Form::new()
        .part(
            "model",
            Part::bytes(b"model".to_vec()).file_name("model.pt"),
        )
        .part(
            "clean",
            Part::bytes(b"clean".to_vec()).file_name("clean.safetensors"),
        );
    let request = tokio::spawn(async move { client.post(url).multipart(form).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stopping = tokio::spawn(app.stop());
    let response = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the waiting request ends when the service stops")
        .unwrap()
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "no worker ran it: still queued"
    );
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_workers_runs_every_job_exactly_once() {
    // A stand-in scan process that logs which job it ran and writes a token result.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let script = format!(
        "#!/bin/sh\npython3 - \"$3\" <<'PY'\nimport json, os, sys, time\nspec = json.load(open(sys.argv[1]))\n\
         with open({log:?}, 'a') as log: log.write(os.path.basename(os.path.dirname(sys.argv[1])) + '\\n')\n\
         time.sleep(0.2)\nopen(spec['artifact'], 'wb').write(b'artifact')\nopen(spec['report'], 'w').write('{{}}')\nPY\n",
        log = log.display().to_string()
    );
    let exe = fake_child(dir.path(), "logging-bdscan", &script);
    let app = spawn_app(Options {
        workers: 3,
        exe: Some(exe),
        ..Options::default()
    })
    .await;

    let blob = app.upload(b"model".to_vec()).await;
    let mut ids = Vec::new();
    for seed in 0..8 {
        let body = json!({ "model": blob, "clean": blob, "config": { "seed": seed } });
        let job: Value = app.create_job(&body).await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let job = app
            .wait_for(id, Duration::from_secs(60), |j| {
                j["state"] != "queued" && j["state"] != "running"
            })
            .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1);
    }
    let runs = std::fs::read_to_string(&log).unwrap();
    let mut runs: Vec<&str> = runs.lines().collect();
    runs.sort_unstable();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("{id}-1")).collect();
    expected.sort_unstable();
    assert_eq!(runs, expected, "each job ran once, in one process");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phase_s_last_step_reaches_the_job_when_the_scan_then_goes_quiet() {
    // `load 1/1` comes right after `load 0/1`, inside the progress rate limit, and then
    // nothing until the test lets the scan go on (it evaluates, say): the job must not
    // show 0/1 meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let exe = fake_child(
        dir.path(),
        "quiet-bdscan",
        &format!(
            r#"#!/bin/sh
work=$(dirname "$3")
echo '{{"phase":"load","step":0,"total":1}}'
echo '{{"phase":"load","step":1,"total":1}}'
while [ ! -e '{}' ]; do sleep 0.1; done
printf '{{"code":"invalid_input","message":"fake"}}' > "$work/error.json"
exit 2
"#,
            go.display()
        ),
    );
    let app = spawn_app(Options {
        exe: Some(exe),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    let worker = app.worker("w");
    let running = tokio::spawn(async move { worker.run_once(&CancellationToken::new()).await });
    let job = app
        .wait_for(&id, Duration::from_secs(30), |j| j["progress"]["step"] == 1)
        .await;
    assert_eq!(job["state"], "running", "{job}");
    assert_eq!(job["progress"]["phase"], "load", "{job}");
    std::fs::write(&go, b"").unwrap();
    assert_eq!(running.await.unwrap().unwrap(), Some(JobState::Failed));
    let (_, job) = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["progress"]["step"], 1, "{job}");
    app.stop().await;
}

/// The store refuses the outcome of a finished scan for a few seconds (here: its
/// reports table is renamed away, as a failover or a locked database would refuse it):
/// the worker keeps the result and records it when the store takes it again.
async fn an_outcome_the_store_refuses_for_a_moment_is_recorded_later(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let exe = fake_child(
        dir.path(),
        "succeeding-bdscan",
        r#"#!/bin/sh
work=$(dirname "$3")
printf '{"fake": true}' > "$work/report.json"
printf 'purified' > "$work/purified.pt"
sleep 1
exit 0
"#,
    );
    let app = spawn_app(Options {
        db,
        exe: Some(exe),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    let pool = app.store().pool().clone();
    sqlx::query("ALTER TABLE reports RENAME TO reports_away")
        .execute(&pool)
        .await
        .unwrap();
    let worker = app.worker("w");
    let running = tokio::spawn(async move { worker.run_once(&CancellationToken::new()).await });
    // The child exits after a second and the first tries fail; then the table is back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!running.is_finished());
    sqlx::query("ALTER TABLE reports_away RENAME TO reports")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(running.await.unwrap().unwrap(), Some(JobState::Succeeded));
    let (_, job) = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    let (status, report) = app.get_json(&format!("/v1/jobs/{id}/report")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["fake"], true, "{report}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_store_refuses_for_a_moment_is_recorded_later_sqlite() {
    an_outcome_the_store_refuses_for_a_moment_is_recorded_later(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_store_refuses_for_a_moment_is_recorded_later_postgres() {
    if let Some(url) =
        postgres_url("an_outcome_the_store_refuses_for_a_moment_is_recorded_later_postgres")
    {
        an_outcome_the_store_refuses_for_a_moment_is_recorded_later(Db::Postgres(url)).await;
    }
}

/// A child that marks that it ran, then works for a minute.
fn long_child(dir: &std::path::Path) -> std::path::PathBuf {
    let marker = dir.join("ran");
    fake_child(
        dir,
        "long-bdscan",
        &format!(
            "#!/bin/sh\ntouch '{}'\necho '{{\"phase\":\"purify\",\"step\":1,\"total\":9}}'\nexec sleep 60\n",
            marker.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_pending_when_the_service_stops_cancels_the_job_instead_of_requeuing_it() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(Options {
        workers: 1,
        exe: Some(long_child(dir.path())),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    app.wait_for(&id, Duration::from_secs(30), |j| {
        j["progress"]["phase"] == "purify"
    })
    .await;
    let response = app
        .client
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // Stops before the child has had its cancel grace: the worker hands the job back.
    let database_url = app.state.config.database_url.clone();
    let _data = app.stop().await;

    let store = bdscan::store::Store::connect(&database_url).await.unwrap();
    let job = store.job(&id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");
    assert_eq!(job.error_code.as_deref(), Some("cancelled"));
    assert!(job.finished_at.is_some() && job.lease_owner.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_with_a_pending_cancel_is_cancelled_without_running() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(Options {
        exe: Some(long_child(dir.path())),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    // Flagged but still queued: a worker can claim it between `request_cancel`'s flag
    // and its cancelling of queued jobs.
    sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1")
        .bind(&id)
        .execute(app.store().pool())
        .await
        .unwrap();
    let (state, job) = run_next_job(&app, "w", &id).await;
    assert_eq!(state, Some(JobState::Cancelled), "{job}");
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(!dir.path().join("ran").exists(), "the scan process ran");
    // A job that will never have one says so, unlike one still on its way.
    let response = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/report")))
        .send()
        .await
        .unwrap();
    crate::helpers::assert_problem(response, StatusCode::CONFLICT, "no_report").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_died_on_its_last_attempt_fails_and_is_counted() {
    let app = spawn_app(Options::default()).await;
    let id = crate::helpers::queue_job(app.store(), 1).await;
    // Claimed with a 1 ms lease that is never renewed: the app's reaper ends the job.
    app.store()
        .claim_job("dead-worker", 1)
        .await
        .unwrap()
        .unwrap();
    let job = app
        .wait_for(&id, Duration::from_secs(30), |j| j["state"] == "failed")
        .await;
    assert_eq!(job["error"]["code"], "lease_expired", "{job}");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("bdscan_jobs_failed_total{code=\"lease_expired\"} 1\n")
            && metrics.contains("bdscan_jobs_finished_total{outcome=\"failed\"} 1\n"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_stored_by_a_worker_that_lost_its_lease_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let exe = fake_child(
        dir.path(),
        "succeeding-bdscan",
        &format!(
            r#"#!/bin/sh
work=$(dirname "$3")
printf '{{}}' > "$work/report.json"
printf 'a discarded artifact' > "$work/purified.pt"
while [ ! -e '{}' ]; do sleep 0.1; done
exit 0
"#,
            go.display()
        ),
    );
    let app = spawn_app(Options {
        exe: Some(exe),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    // A worker whose heartbeat would come only after the scan: it learns that it lost
    // the lease when it records the outcome, after storing the artifact.
    let mut state = app.state.clone();
    let mut config = (*state.config).clone();
    config.worker.heartbeat = Duration::from_secs(600);
    state.config = std::sync::Arc::new(config);
    let worker = state.worker("w");
    let running = tokio::spawn(async move { worker.run_once(&CancellationToken::new()).await });
    app.wait_for(&id, Duration::from_secs(30), |j| j["state"] == "running")
        .await;
    sqlx::query("UPDATE jobs SET lease_owner = 'another-worker' WHERE id = $1")
        .bind(&id)
        .execute(app.store().pool())
        .await
        .unwrap();
    std::fs::write(&go, b"").unwrap();
    assert_eq!(running.await.unwrap().unwrap(), Some(JobState::Running));
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        b"a discarded artifact",
    ));
    let (status, _) = app.get_json(&format!("/v1/blobs/{sha}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_folders_no_attempt_runs_in_are_swept() {
    let app = spawn_app(Options::default()).await;
    let store = app.store();
    let running = crate::helpers::queue_job(store, 3).await;
    store.claim_job("w", 60_000).await.unwrap().unwrap();
    let finished = crate::helpers::queue_job(store, 3).await;
    let claimed = store.claim_job("w", 60_000).await.unwrap().unwrap();
    store
        .finish_unsuccessful(&claimed, JobState::Failed, "internal", "test")
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let folder = |name: String| {
        let path = work.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("model.pt"), b"copy").unwrap();
        path
    };
    let live = folder(format!("{running}-1"));
    let earlier_attempt = folder(format!("{running}-0"));
    let ended = folder(format!("{finished}-1"));
    let deleted = folder(format!("{}-1", uuid::Uuid::new_v4()));
    let other = folder("not-a-job".into());
    bdscan::server::worker::sweep_work_dirs(store, work.path()).await;
    assert!(live.exists() && other.exists());
    for gone in [&earlier_attempt, &ended, &deleted] {
        assert!(!gone.exists(), "{}", gone.display());
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_renew_its_lease_stops_the_scan_when_the_lease_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(Options {
        exe: Some(long_child(dir.path())),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    let worker = app.worker("w");
    let running = tokio::spawn(async move { worker.run_once(&CancellationToken::new()).await });
    app.wait_for(&id, Duration::from_secs(30), |j| {
        j["progress"]["phase"] == "purify"
    })
    .await;
    // The database stops answering the worker's heartbeats (its jobs table is away).
    let pool = app.store().pool().clone();
    sqlx::query("ALTER TABLE jobs RENAME TO jobs_away")
        .execute(&pool)
        .await
        .unwrap();
    let lease = app.state.config.worker.lease;
    let stopped = tokio::time::timeout(lease + Duration::from_secs(10), running).await;
    sqlx::query("ALTER TABLE jobs_away RENAME TO jobs")
        .execute(&pool)
        .await
        .unwrap();
    let state = stopped.expect("the scan was stopped when the lease ran out");
    assert_eq!(state.unwrap().unwrap(), Some(JobState::Running));
    app.stop().await;
}

/// What the worker hands its child: a spec asking to be confined to the job's folder
/// (reads too, on this CPU slot), inputs inside that folder, and TMPDIR there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_child_is_asked_to_keep_to_its_job_folder() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    std::fs::create_dir(&seen).unwrap();
    let exe = fake_child(
        dir.path(),
        "spec-reading-bdscan",
        &format!(
            "#!/bin/sh\ncp \"$3\" {seen}/spec.json\nprintf '%s' \"$TMPDIR\" > {seen}/tmpdir\nexit 3\n",
            seen = seen.display()
        ),
    );
    let app = spawn_app(Options {
        exe: Some(exe),
        ..Options::default()
    })
    .await;
    let id = queue_job_over_one_file(&app).await;
    let (state, job) = run_next_job(&app, "w", &id).await;
    assert_eq!(state, Some(JobState::Failed), "{job}");
    let spec: Value =
        serde_json::from_slice(&std::fs::read(seen.join("spec.json")).unwrap()).unwrap();
    let folder = std::path::Path::new(spec["confinement"]["work_dir"].as_str().unwrap());
    assert!(
        folder.starts_with(&app.state.config.worker.work_dir),
        "{spec}"
    );
    assert_eq!(spec["confinement"]["restrict_reads"], true, "{spec}");
    for input in ["model", "clean", "artifact", "report", "error"] {
        let path = std::path::Path::new(spec[input].as_str().unwrap());
        assert!(
            path.starts_with(folder),
            "{input} outside {folder:?}: {spec}"
        );
    }
    let tmpdir = std::fs::read_to_string(seen.join("tmpdir")).unwrap();
    assert_eq!(std::path::Path::new(&tmpdir), folder);
    app.stop().await;
}

/// Outputs a job's process planted for the unconfined server to read: a link named as
/// the purified model (symbolic or hard, to a file the server can read and the job
/// could not), a FIFO
/// named as the report (which would block the worker for good); and a process it forked
/// before it was stopped (here by the job timeout). Each job fails with a clear message;
/// nothing the link names is stored; the forked process dies with the job. The fake
/// children are shell scripts, not sandboxed (a sandboxed child cannot fork at all):
/// these are the server's own defences, for a kernel without Landlock or seccomp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_a_job_process_planted_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("settings.toml");
    std::fs::write(&secret, b"api_token = \"not for the model\"").unwrap();
    let forked = dir.path().join("forked.pid");
    let scripts = [
        (
            "link",
            format!(
                "#!/bin/sh\nwork=$(dirname \"$3\")\nln -s {} \"$work/purified.pt\"\n\
                 printf '{{}}' > \"$work/report.json\"\nexit 0\n",
                secret.display()
            ),
        ),
        (
            "hardlink",
            format!(
                "#!/bin/sh\nwork=$(dirname \"$3\")\nln {} \"$work/purified.pt\"\n\
                 printf '{{}}' > \"$work/report.json\"\nexit 0\n",
                secret.display()
            ),
        ),
        (
            "fifo",
            "#!/bin/sh\nwork=$(dirname \"$3\")\nmkfifo \"$work/report.json\"\n\
             printf 'x' > \"$work/purified.pt\"\nexit 0\n"
                .to_string(),
        ),
        (
            "fork",
            format!(
                "#!/bin/sh\nsleep 300 &\necho $! > {}\nsleep 300\n",
                forked.display()
            ),
        ),
    ];
    for (name, script) in scripts {
        let exe = fake_child(dir.path(), &format!("{name}-bdscan"), &script);
        let app = spawn_app(Options {
            exe: Some(exe),
            job_timeout: Some(Duration::from_secs(2)),
            ..Options::default()
        })
        .await;
        let id = queue_job_over_one_file(&app).await;
        let (state, job) =
            tokio::time::timeout(Duration::from_secs(60), run_next_job(&app, "w", &id))
                .await
                .unwrap_or_else(|_| panic!("{name}: the worker hung"));
        assert_eq!(state, Some(JobState::Failed), "{name}: {job}");
        let message = job["error"]["message"].as_str().unwrap();
        match name {
            "link" => {
                assert_eq!(job["error"]["code"], "internal", "{job}");
                assert!(message.contains("its purified model"), "{message}");
                assert!(job["links"]["artifact"].is_null(), "{job}");
            }
            "hardlink" => {
                assert_eq!(job["error"]["code"], "internal", "{job}");
                assert!(message.contains("a file with other names"), "{message}");
                assert!(job["links"]["artifact"].is_null(), "{job}");
            }
            "fifo" => {
                assert!(
                    message.contains("its report: not a regular file"),
                    "{message}"
                );
            }
            _ => {
                assert_eq!(job["error"]["code"], "timed_out", "{job}");
                let pid = std::fs::read_to_string(&forked).unwrap();
                let alive = std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
                    && !std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                        .unwrap_or_default()
                        .contains(") Z ");
                assert!(!alive, "the forked process {} outlived its job", pid.trim());
            }
        }
        app.stop().await;
    }
}

//! Worker slots hold a libtorch device: a job runs on the device of the slot that claims
//! it, a job that names a device waits for a slot on it, and a device the machine lacks
//! is refused at startup. There is no GPU here: the CUDA side is checked through the
//! claim routing and the startup validation.

use std::time::Duration;

use bdscan::server::{Application, ServerConfig, StartError};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{
    assert_problem, demo_files, postgres_url, quick_config, spawn_app, Db, Options,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_their_slot_device_and_a_device_no_slot_has_is_refused() {
    let files = demo_files().await;
    let app = spawn_app(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let read = |path: &std::path::Path| std::fs::read(path).unwrap();
    let model = app.upload(read(&files.backdoored_model)).await;
    let clean = app.upload(read(&files.clean)).await;
    let post = |config: Value| {
        app.client
            .post(app.url("/v1/jobs"))
            .json(&json!({ "model": model, "clean": clean, "config": config }))
            .send()
    };
    let cuda = post(json!({ "device": "cuda:0" })).await.unwrap();
    let problem =
        assert_problem(cuda, StatusCode::UNPROCESSABLE_ENTITY, "device_unavailable").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("run on cpu"),
        "{problem}"
    );
    let nonsense = post(json!({ "device": "tpu" })).await.unwrap();
    assert_problem(nonsense, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config").await;

    let mut config = quick_config();
    config["device"] = json!("cpu");
    let response = post(config).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["device"], "cpu");
    let id = job["id"].as_str().unwrap();
    let job = app
        .wait_for(id, Duration::from_secs(240), |j| {
            j["state"] != "queued" && j["state"] != "running"
        })
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (_, report) = app.get_json(&format!("/v1/jobs/{id}/report")).await;
    assert_eq!(report["config"]["device"], "cpu");

    // No device named: any slot runs it, on the slot's device.
    let job = app
        .create_job(&json!({ "model": model, "clean": clean, "config": quick_config() }))
        .await;
    assert_eq!(job["device"], Value::Null);
    let id = job["id"].as_str().unwrap();
    let job = app
        .wait_for(id, Duration::from_secs(240), |j| {
            j["state"] != "queued" && j["state"] != "running"
        })
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (_, report) = app.get_json(&format!("/v1/jobs/{id}/report")).await;
    assert_eq!(report["config"]["device"], "cpu");
    app.stop().await;
}

async fn a_job_naming_a_device_waits_for_a_slot_on_it(db: Db) {
    // An API-only replica cannot know other replicas' slots: it queues the job.
    let app = spawn_app(Options {
        db,
        ..Options::default()
    })
    .await;
    let blob = app.upload(b"never run".to_vec()).await;
    let job = app
        .create_job(&json!({ "model": blob, "clean": blob, "config": { "device": "cuda" } }))
        .await;
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(job["device"], "cuda:0", "bare `cuda` is cuda:0");
    let id = job["id"].as_str().unwrap();

    let cpu_slot = app.worker("cpu-slot");
    let nothing = cpu_slot
        .run_once(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(nothing, None, "a CPU slot leaves a cuda:0 job alone");
    let store = app.store();
    assert!(store
        .claim_job_on("other-gpu-slot", 60_000, "cuda:1")
        .await
        .unwrap()
        .is_none());
    let claimed = store
        .claim_job_on("gpu-slot", 60_000, "cuda:0")
        .await
        .unwrap()
        .expect("a cuda:0 slot claims it");
    assert_eq!(claimed.job.id, id);
    assert_eq!(claimed.job.device.as_deref(), Some("cuda:0"));
    app.stop().await;
}

#[tokio::test]
async fn a_job_naming_a_device_waits_for_a_slot_on_it_sqlite() {
    a_job_naming_a_device_waits_for_a_slot_on_it(Db::Sqlite).await;
}

#[tokio::test]
async fn a_job_naming_a_device_waits_for_a_slot_on_it_postgres() {
    if let Some(url) = postgres_url("a_job_naming_a_device_waits_for_a_slot_on_it_postgres") {
        a_job_naming_a_device_waits_for_a_slot_on_it(Db::Postgres(url)).await;
    }
}

#[tokio::test]
async fn a_cuda_device_the_machine_lacks_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = tch::Cuda::device_count().max(0) as usize;
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
        env!("CARGO_BIN_EXE_bdscan").into(),
    );
    config.devices = vec![tch::Device::Cpu, tch::Device::Cuda(missing)];
    match Application::build(config).await {
        Err(StartError::Config(message)) => {
            assert!(message.contains(&format!("cuda:{missing}")), "{message}");
            assert!(message.contains("CUDA device"), "{message}");
        }
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("cuda:{missing} does not exist on this machine"),
    }
}

/// With a CUDA build of libtorch (the PyPI wheel is one), `libtorch_cuda` must be loaded:
/// it registers libtorch's CUDA backend. The linker used to drop it (nothing of ours
/// calls into it directly), and then a GPU machine counted zero CUDA devices — measured
/// on an H100, where `serve --devices cuda:0` refused to start. This test binary is
/// linked by the same build script as `bdscan`.
#[test]
fn a_cuda_libtorch_is_loaded_so_gpus_can_be_seen() {
    let lib = std::path::Path::new(env!("BDSCAN_LIBTORCH_LIB"));
    if !lib.join("libtorch_cuda.so").exists() {
        eprintln!("skipped: libtorch at {lib:?} is a CPU-only build");
        return;
    }
    // Any call into libtorch: the library is loaded at start either way.
    assert!(tch::Cuda::device_count() >= 0);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        maps.contains("libtorch_cuda.so"),
        "libtorch_cuda.so from {lib:?} is not mapped into the process"
    );
}

//! The audit a user runs with curl: upload everything in one form, wait, read the
//! report, download the purified model and check it, on SQLite and on PostgreSQL.

use std::path::Path;

use bdscan::engine::bundle::load_bundle;
use bdscan::engine::data::SampleSet;
use bdscan::engine::metrics::PoisonSet;
use bdscan::engine::model::ScanModel;
use bdscan::lab::demo::DemoFiles;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::Device;

use crate::helpers::{audit_form, demo_files, postgres_url, quick_config, spawn_app, Db, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_audit_removes_the_backdoor_end_to_end_on_sqlite() {
    one_shot_audit(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_audit_removes_the_backdoor_end_to_end_on_postgres() {
    if let Some(url) = postgres_url("one_shot_audit_removes_the_backdoor_end_to_end_on_postgres") {
        one_shot_audit(Db::Postgres(url)).await;
    }
}

/// The downloaded model's ASR on the poison bundle, measured here rather than trusted
/// from the report: the file must load as TorchScript and behave as the report says.
async fn measure_downloaded_asr(files: &DemoFiles, model: &[u8]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("downloaded.pt");
    std::fs::write(&path, model).unwrap();
    let (poison, target) = (files.poison.clone(), files.target);
    tokio::task::spawn_blocking(move || {
        let poison = SampleSet::from_bundle(&load_bundle(&poison).unwrap(), Device::Cpu).unwrap();
        let mut model = ScanModel::load(
            Path::new(&path),
            Device::Cpu,
            &poison.images.narrow(0, 0, 2),
        )
        .expect("the downloaded artifact loads as TorchScript");
        let (asr, _) = PoisonSet::new(poison, target)
            .unwrap()
            .measure(&mut model, 256)
            .unwrap();
        drop(dir);
        asr
    })
    .await
    .unwrap()
}

async fn one_shot_audit(db: Db) {
    let files = demo_files().await;
    let app = spawn_app(Options {
        db,
        workers: 1,
        ..Options::default()
    })
    .await;

    let response = app
        .client
        .post(app.url("/v1/scans?wait=240"))
        .multipart(audit_form(&files, &quick_config()))
        .send()
        .await
        .unwrap();
    // `wait` holds the response until the job is done.
    assert_eq!(response.status(), StatusCode::OK);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let job: Value = response.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(job["inputs"]["target_label"], files.target);
    assert_eq!(job["config"]["purify_epochs"], 5);

    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["progress"]["step"], job["progress"]["total"], "{job}");
    assert!(job["timings"]["running_ms"].as_i64().unwrap() > 0);
    assert!(job["finished_at"].is_string());

    // The report: the attack worked before and much less after.
    let (status, report) = app.get_json(job["links"]["report"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let before = report["metrics"]["before"]["asr"].as_f64().unwrap();
    let after = report["metrics"]["after"]["asr"].as_f64().unwrap();
    assert!(before > 0.9, "the demo model is backdoored: ASR {before}");
    assert!(
        after < before - 0.2,
        "purification lowers ASR: {before} -> {after}"
    );
    assert_eq!(report["config"]["purify_epochs"], 5);

    // The purified model: whole, then a range.
    let artifact_path = job["links"]["artifact"].as_str().unwrap();
    let response = app.client.get(app.url(artifact_path)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let header =
        |r: &reqwest::Response, name: &str| r.headers()[name].to_str().unwrap().to_string();
    let digest = header(&response, "x-content-sha256");
    let length: usize = header(&response, "content-length").parse().unwrap();
    assert_eq!(header(&response, "accept-ranges"), "bytes");
    let model = response.bytes().await.unwrap();
    assert_eq!(model.len(), length);
    assert_eq!(hex::encode(Sha256::digest(&model)), digest);
    assert_eq!(report["artifact"]["sha256"], digest.as_str());
    assert_eq!(report["artifact"]["bytes"], length);
    let measured = measure_downloaded_asr(&files, &model).await;
    assert!(
        (measured - after).abs() < 1e-9,
        "the downloaded model's ASR {measured} is the report's {after}"
    );
    assert!(measured < before - 0.2, "{before} -> {measured}");

    let part = app
        .client
        .get(app.url(artifact_path))
        .header("Range", "bytes=100-1099")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&part, "content-range"),
        format!("bytes 100-1099/{length}")
    );
    assert_eq!(part.bytes().await.unwrap(), model.slice(100..1100));
    let tail = app
        .client
        .get(app.url(artifact_path))
        .header("Range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.bytes().await.unwrap(), model.slice(length - 10..));
    let beyond = app
        .client
        .get(app.url(artifact_path))
        .header("Range", format!("bytes={length}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        header(&beyond, "content-range"),
        format!("bytes */{length}")
    );
    // A range resumes only the file the client started (If-Range names its ETag);
    // for another, the whole file; one the client holds already is not sent again.
    let etag = format!("\"{digest}\"");
    let resume = |validator: String| {
        app.client
            .get(app.url(artifact_path))
            .header("Range", "bytes=100-1099")
            .header("If-Range", validator)
            .send()
    };
    let resumed = resume(etag.clone()).await.unwrap();
    assert_eq!(resumed.status(), StatusCode::PARTIAL_CONTENT);
    let other = resume(format!("\"{}\"", "0".repeat(64))).await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(other.bytes().await.unwrap(), model);
    let cached = app
        .client
        .get(app.url(artifact_path))
        .header("If-None-Match", format!("\"abc\", W/{etag}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&cached, "etag"), etag);
    assert!(cached.bytes().await.unwrap().is_empty());

    // The page for people.
    let page = app
        .client
        .get(app.url(job["links"]["report_html"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert!(header(&page, "content-type").starts_with("text/html"));
    // No script may run in it, whatever a model named its layers.
    let policy = header(&page, "content-security-policy");
    assert!(
        policy.contains("default-src 'none'") && !policy.contains("script-src"),
        "{policy}"
    );
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    let page = page.text().await.unwrap();
    assert!(
        page.contains("<svg") && page.contains(&digest),
        "report page lacks the plot or the digest"
    );
    assert!(
        page.contains("suspects zeroed, before fine-tuning"),
        "report page lacks what identification alone did"
    );
    assert!(
        page.contains("Pattern unlearning on: on the clean training split"),
        "report page lacks the pattern probe's decision"
    );
    assert!(page.contains("<h2>Summary</h2>") && page.contains("Shortcut search: "));
    assert!(
        page.contains(&format!(
            "Attack success rate on the poison bundle (target class {}): ",
            files.target
        )),
        "report page lacks the ASR summary"
    );
    for role in ["model", "clean", "test", "poison"] {
        let sha = report["inputs"][role]["sha256"].as_str().unwrap();
        assert!(
            page.contains(sha),
            "report page lacks the {role} input's hash"
        );
    }
    assert!(
        page.contains("&quot;method&quot;: &quot;benign_salience&quot;"),
        "report page lacks the configuration"
    );
    for warning in report["warnings"].as_array().unwrap() {
        let text = bdscan::server::html::escape(warning.as_str().unwrap());
        assert!(page.contains(&text), "report page lacks the warning {text}");
    }

    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("bdscan_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bdscan_jobs_finished_total{outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

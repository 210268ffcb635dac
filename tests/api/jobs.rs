use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, postgres_url, spawn_app, Db, Options};

/// Values PostgreSQL cannot hold (a NUL in text) are refused before they reach the
/// database: they were a 500 on PostgreSQL, and a plain 404 or 400 on SQLite.
async fn a_nul_in_a_path_or_query_is_a_client_error(db: Db) {
    let app = spawn_app(Options {
        db,
        ..Options::default()
    })
    .await;
    let blob_with_nul = format!("/v1/blobs/{}%00", "a".repeat(63));
    for (path, status, code) in [
        ("/v1/blobs/%00", StatusCode::NOT_FOUND, "not_found"),
        (&blob_with_nul, StatusCode::NOT_FOUND, "not_found"),
        (
            "/v1/jobs?cursor=1_%00",
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
        ),
        ("/v1/jobs/%00", StatusCode::NOT_FOUND, "not_found"),
    ] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_problem(response, status, code).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_nul_in_a_path_or_query_is_a_client_error_sqlite() {
    a_nul_in_a_path_or_query_is_a_client_error(Db::Sqlite).await;
}

#[tokio::test]
async fn a_nul_in_a_path_or_query_is_a_client_error_postgres() {
    if let Some(url) = postgres_url("a_nul_in_a_path_or_query_is_a_client_error_postgres") {
        a_nul_in_a_path_or_query_is_a_client_error(Db::Postgres(url)).await;
    }
}

#[tokio::test]
async fn client_mistakes_get_4xx_problem_documents() {
    let app = spawn_app(Options::default()).await;
    let blob = app.upload(b"some bytes".to_vec()).await;
    let post = |body: Value| app.client.post(app.url("/v1/jobs")).json(&body).send();

    let malformed = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{\"model\":")
        .send();
    assert_problem(
        malformed.await.unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    // Over the JSON body limit (2 MB): too large, not malformed.
    let oversized = post(json!({ "model": "a".repeat(3 << 20), "clean": blob }));
    assert_problem(
        oversized.await.unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    // A job id that is not UTF-8 once decoded.
    let bad_path = app.client.get(app.url("/v1/jobs/%FF")).send();
    assert_problem(
        bad_path.await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_path",
    )
    .await;
    let not_json = app.client.post(app.url("/v1/jobs")).body("model=x").send();
    assert_problem(
        not_json.await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let unknown_field = post(json!({ "model": blob, "clean": blob, "colour": "red" }));
    assert_problem(
        unknown_field.await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let bad_id = post(json!({ "model": "abc", "clean": blob }));
    assert_problem(
        bad_id.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_blob_id",
    )
    .await;
    let unknown_blob = post(json!({ "model": blob, "clean": "f".repeat(64) }));
    let problem = assert_problem(
        unknown_blob.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_blob",
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("clean"),
        "{problem}"
    );
    // An array would be taken as the settings by position, device unchecked.
    let positional_config = post(json!({
        "model": blob, "clean": blob, "config": ["benign_salience", 0, "cuda:7"]
    }));
    assert_problem(
        positional_config.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    assert_problem(
        post(json!([blob, blob])).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let unknown_setting =
        post(json!({ "model": blob, "clean": blob, "config": { "learning_rate": 1 } }));
    assert_problem(
        unknown_setting.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    let bad_setting = post(json!({ "model": blob, "clean": blob, "config": { "batch_size": 1 } }));
    let problem = assert_problem(
        bad_setting.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("batch_size"),
        "{problem}"
    );
    let greedy = post(json!({ "model": blob, "clean": blob, "config": { "threads": 100_000 } }));
    assert_problem(
        greedy.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    // Accepted unbounded, this one crashed the scan process inside libtorch (SIGSEGV)
    // once a worker ran the job.
    let crashing =
        post(json!({ "model": blob, "clean": blob, "config": { "augment_shift": i64::MAX } }));
    let problem = assert_problem(
        crashing.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("augment_shift"),
        "{problem}"
    );
    // (A poison bundle alone is accepted: its `targets` may name each sample's target;
    // the engine rejects it if they are missing.)
    let target_alone = post(json!({ "model": blob, "clean": blob, "target_label": 0 }));
    assert_problem(
        target_alone.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    )
    .await;

    let get = |path: String| app.client.get(app.url(&path)).send();
    assert_problem(
        get(format!("/v1/jobs/{}", uuid::Uuid::new_v4()))
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_problem(
        get("/v1/jobs/not-a-uuid".into()).await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_problem(
        get("/v1/jobs?state=sleeping".into()).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    assert_problem(
        get("/v1/jobs?cursor=nonsense".into()).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
    assert_problem(
        get("/v1/jobs?limit=0".into()).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;

    // No worker runs here, so the job stays queued: it has no report or artifact yet.
    let queued: Value = post(json!({ "model": blob, "clean": blob }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = queued["id"].as_str().unwrap();
    // The same UUID in capitals or braces names the same job (it was 404).
    for spelling in [id.to_uppercase(), format!("{{{id}}}")] {
        let (status, same) = app.get_json(&format!("/v1/jobs/{spelling}")).await;
        assert_eq!((status, same["id"].as_str()), (StatusCode::OK, Some(id)));
    }
    assert_eq!(queued["links"]["report"], Value::Null);
    for what in ["report", "report.html", "artifact"] {
        assert_problem(
            get(format!("/v1/jobs/{id}/{what}")).await.unwrap(),
            StatusCode::CONFLICT,
            "not_ready",
        )
        .await;
    }

    let scan_without_model = app
        .client
        .post(app.url("/v1/scans"))
        .multipart(reqwest::multipart::Form::new().text("target_label", "0"))
        .send();
    assert_problem(
        scan_without_model.await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_field",
    )
    .await;
    let scan_unknown_field = app
        .client
        .post(app.url("/v1/scans"))
        .multipart(reqwest::multipart::Form::new().text("weights", "x"))
        .send();
    assert_problem(
        scan_unknown_field.await.unwrap(),
        StatusCode::BAD_REQUEST,
        "unknown_field",
    )
    .await;
    let scan_not_multipart = app.client.post(app.url("/v1/scans")).body("model").send();
    assert_problem(
        scan_not_multipart.await.unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_multipart",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_job_and_refuses_a_different_request() {
    let app = spawn_app(Options::default()).await;
    let blob = app.upload(b"model bytes".to_vec()).await;
    let body = json!({ "model": blob, "clean": blob, "config": { "seed": 3 } });
    let send = |body: Value| {
        app.client
            .post(app.url("/v1/jobs"))
            .header("Idempotency-Key", "audit-42")
            .json(&body)
            .send()
    };

    let first = send(body.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let second = send(body.clone()).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);

    let different = send(json!({ "model": blob, "clean": blob, "config": { "seed": 4 } }))
        .await
        .unwrap();
    assert_problem(different, StatusCode::CONFLICT, "idempotency_key_reused").await;
    // Pinning the job to the device the config names by default is another request: the
    // first may run on any slot.
    let pinned = json!({ "model": blob, "clean": blob, "config": { "seed": 3, "device": "cpu" } });
    assert_problem(
        send(pinned).await.unwrap(),
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    )
    .await;
    let (_, list) = app.get_json("/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn jobs_list_by_state_with_cursor_pagination_and_queued_jobs_cancel_at_once() {
    let app = spawn_app(Options::default()).await;
    let blob = app.upload(b"model bytes".to_vec()).await;
    let mut ids = Vec::new();
    for seed in 0..5 {
        let body = json!({ "model": blob, "clean": blob, "config": { "seed": seed } });
        let job: Value = app.create_job(&body).await;
        assert_eq!(job["state"], "queued");
        ids.push(job["id"].as_str().unwrap().to_string());
        // Distinct creation times make "newest first" a strict order.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    for id in &ids[..2] {
        let response = app
            .client
            .delete(app.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let job: Value = response.json().await.unwrap();
        assert_eq!(job["state"], "cancelled");
        assert_eq!(job["error"]["code"], "cancelled");
    }

    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=2".to_string();
    loop {
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, StatusCode::OK);
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/jobs?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        5,
        "no job twice across pages"
    );
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let (_, cancelled) = app.get_json("/v1/jobs?state=cancelled").await;
    let cancelled: HashSet<String> = cancelled["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cancelled, ids[..2].iter().cloned().collect());
    let (_, queued) = app.get_json("/v1/jobs?state=queued").await;
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 3);

    // A second DELETE of a cancelled job deletes it; the blob stays for the queued ones.
    let response = app
        .client
        .delete(app.url(&format!("/v1/jobs/{}", ids[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, _) = app.get_json(&format!("/v1/jobs/{}", ids[0])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get_json(&format!("/v1/blobs/{blob}")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, all) = app.get_json("/v1/jobs").await;
    assert_eq!(all["jobs"].as_array().unwrap().len(), 4);
    app.stop().await;
}

#[tokio::test]
async fn a_full_queue_refuses_new_jobs_with_503_until_one_leaves_it() {
    let app = spawn_app(Options {
        max_queued_jobs: Some(2),
        ..Options::default()
    })
    .await;
    let blob = app.upload(b"model bytes".to_vec()).await;
    let submit = |seed: u64| {
        app.client
            .post(app.url("/v1/jobs"))
            .json(&json!({ "model": blob, "clean": blob, "config": { "seed": seed } }))
            .send()
    };
    let first: Value = submit(1).await.unwrap().json().await.unwrap();
    let keyed = || {
        app.client
            .post(app.url("/v1/jobs"))
            .header("Idempotency-Key", "nightly-7")
            .json(&json!({ "model": blob, "clean": blob, "config": { "seed": 2 } }))
            .send()
    };
    let second = keyed().await.unwrap();
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    let second: Value = second.json().await.unwrap();
    let refused = submit(3).await.unwrap();
    assert_eq!(refused.headers()["retry-after"], "30");
    assert_problem(refused, StatusCode::SERVICE_UNAVAILABLE, "queue_full").await;
    // A client whose answer was lost learns its job even though the queue is full.
    let replay = keyed().await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], second["id"]);
    // Cancelling a queued job frees its place.
    let cancelled = app
        .client
        .delete(app.url(&format!("/v1/jobs/{}", first["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), StatusCode::OK);
    assert_eq!(submit(3).await.unwrap().status(), StatusCode::ACCEPTED);
    let (_, list) = app.get_json("/v1/jobs?state=queued").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
    app.stop().await;
}

/// Sends a `/v1/scans` request whose body is `head` and then nothing, as a client still
/// uploading a large model would, and reads the answer: one that comes was decided
/// without the files. Raw HTTP/1.1, since an HTTP client answers only once it has sent
/// the whole body. The status and the problem document.
async fn scan_answer_before_the_files(app: &crate::helpers::TestApp, head: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST /v1/scans HTTP/1.1\r\nHost: {address}\r\n\
         Content-Type: multipart/form-data; boundary=XX\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{head}\r\n",
        head.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = async {
        let mut buffer = [0u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await.unwrap();
            answer.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&answer);
            if n == 0 || text.contains("\r\n\r\n{") && text.ends_with('}') {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .expect("answered before the files arrived");
    let text = String::from_utf8(answer).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn a_scan_request_is_refused_before_its_files_when_it_cannot_be_queued() {
    let app = spawn_app(Options {
        max_queued_jobs: Some(1),
        ..Options::default()
    })
    .await;
    let config_part = |config: &str| {
        format!(
            "--XX\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n{config}\r\n\
             --XX\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt\"\r\n\r\nmodel"
        )
    };
    let (status, problem) =
        scan_answer_before_the_files(&app, &config_part(r#"{"batch_size": 1}"#)).await;
    assert_eq!((status, &problem["code"]), (422, &json!("invalid_config")));
    assert!(
        problem["detail"].as_str().unwrap().contains("batch_size"),
        "{problem}"
    );

    let blob = app.upload(b"model bytes".to_vec()).await;
    app.create_job(&json!({ "model": blob, "clean": blob }))
        .await;
    let (status, problem) = scan_answer_before_the_files(&app, &config_part("{}")).await;
    assert_eq!((status, &problem["code"]), (503, &json!("queue_full")));
    assert!(
        problem["detail"].as_str().unwrap().contains("1 job is"),
        "{problem}"
    );
    app.stop().await;
}

use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::helpers::{assert_problem, first_answer, spawn_app, Options};

/// Not a multiple of the chunk size, so the last chunk is short.
fn sample_bytes() -> Vec<u8> {
    (0..(2 * bdscan::store::CHUNK_BYTES + 12_345))
        .map(|i| (i * 7 % 251) as u8)
        .collect()
}

#[tokio::test]
async fn uploads_are_hashed_chunked_and_deduplicated() {
    let app = spawn_app(Options::default()).await;
    let bytes = sample_bytes();
    let expected = hex::encode(Sha256::digest(&bytes));

    let raw = app
        .client
        .post(app.url("/v1/blobs"))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::CREATED);
    assert_eq!(
        raw.headers()["location"],
        format!("/v1/blobs/{expected}").as_str()
    );
    let raw: Value = raw.json().await.unwrap();
    assert_eq!(raw["sha256"], expected.as_str());
    assert_eq!(raw["size_bytes"], bytes.len() as u64);
    assert_eq!(raw["created"], true);

    let form = Form::new().part("file", Part::bytes(bytes.clone()).file_name("model.pt"));
    let again = app.post_form("/v1/blobs", form).await;
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["sha256"], expected.as_str());
    assert_eq!(again["created"], false);

    let (status, info) = app.get_json(&format!("/v1/blobs/{expected}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["size_bytes"], bytes.len() as u64);

    // Stored once, in three chunks, and the staging copy of the duplicate is gone.
    let rows = sqlx::query("SELECT blob_key, LENGTH(data) FROM blob_chunks ORDER BY seq")
        .fetch_all(app.store().pool())
        .await
        .unwrap();
    let keys: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(keys, vec![expected.clone(); 3]);

    // And it reads back byte for byte.
    let dir = tempfile::tempdir().unwrap();
    app.store()
        .write_blob_to(&expected, &dir.path().join("copy"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("copy")).unwrap(), bytes);
    app.stop().await;
}

#[tokio::test]
async fn bad_uploads_get_4xx_problems_and_leave_nothing_behind() {
    let app = spawn_app(Options {
        max_blob_bytes: 100_000,
        ..Options::default()
    })
    .await;

    let too_big = app
        .client
        .post(app.url("/v1/blobs"))
        .body(vec![1u8; 300_000])
        .send()
        .await
        .unwrap();
    assert_problem(too_big, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let form = Form::new().part("file", Part::bytes(vec![1u8; 300_000]).file_name("big.pt"));
    let too_big = app.post_form("/v1/blobs", form).await;
    assert_problem(too_big, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let empty = app
        .client
        .post(app.url("/v1/blobs"))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_problem(empty, StatusCode::BAD_REQUEST, "empty_upload").await;

    let no_file = app
        .client
        .post(app.url("/v1/blobs"))
        .header("content-type", "multipart/form-data; boundary=X")
        .body("--X--\r\n")
        .send()
        .await
        .unwrap();
    assert!(no_file.status().is_client_error(), "{}", no_file.status());

    let missing = app
        .client
        .get(app.url(&format!("/v1/blobs/{}", "0".repeat(64))))
        .send()
        .await
        .unwrap();
    assert_problem(missing, StatusCode::NOT_FOUND, "not_found").await;

    let left: i64 = sqlx::query("SELECT COUNT(*) FROM blob_chunks")
        .fetch_one(app.store().pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "aborted uploads must not leave chunks");
    app.stop().await;
}

/// Chunks staged by uploads that have not finished.
async fn staged_chunks(app: &crate::helpers::TestApp) -> i64 {
    staged_in(app.store()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_dropped_unfinished_removes_its_staged_chunks() {
    // What happens when a client's connection closes mid-upload and the server drops
    // the request's handler: the upload is neither finished nor aborted.
    let app = spawn_app(Options::default()).await;
    let mut upload = app.store().begin_upload();
    upload.write(&sample_bytes()).await.unwrap();
    assert_eq!(staged_chunks(&app).await, 2);
    drop(upload);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while staged_chunks(&app).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "staged chunks left behind"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A finished upload keeps its chunks, under its hash.
    let mut upload = app.store().begin_upload();
    upload.write(&sample_bytes()).await.unwrap();
    let blob = upload.finish().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let kept: i64 = sqlx::query("SELECT COUNT(*) FROM blob_chunks WHERE blob_key = $1")
        .bind(&blob.sha256)
        .fetch_one(app.store().pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 3);
    app.stop().await;
}

async fn staged_in(store: &bdscan::store::Store) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM blob_chunks WHERE blob_key LIKE 'upload:%'")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0)
}

/// A bare store (no server, so no reaper sweeping on its own).
async fn the_stale_staging_sweep_removes_only_abandoned_uploads(store: bdscan::store::Store) {
    // Left by a process that died two days ago; and one without a start time, which an
    // earlier version (during a rolling upgrade, still uploading) writes.
    for key in [
        format!("upload:{}:dead", bdscan::store::now_ms() - 2 * 86_400_000),
        "upload:0b9c6a4e-old-format".to_string(),
    ] {
        sqlx::query(
            "INSERT INTO blob_chunks (blob_key, seq, byte_offset, data) VALUES ($1, 0, 0, $2)",
        )
        .bind(key)
        .bind(vec![1u8; 10])
        .execute(store.pool())
        .await
        .unwrap();
    }
    // One streaming in now.
    let mut live = store.begin_upload();
    live.write(&sample_bytes()).await.unwrap();
    assert_eq!(staged_in(&store).await, 4);
    assert_eq!(store.sweep_stale_staging(86_400_000).await.unwrap(), 1);
    assert_eq!(staged_in(&store).await, 3);
    let blob = live.finish().await.unwrap();
    assert_eq!(blob.size_bytes, sample_bytes().len() as u64);
    assert_eq!(staged_in(&store).await, 1);

    // An upload whose chunks were swept while it still arrived fails when it finishes,
    // rather than storing an incomplete blob under the file's hash.
    let mut slow = store.begin_upload();
    let mut other_bytes = sample_bytes();
    other_bytes.reverse();
    slow.write(&other_bytes).await.unwrap();
    sqlx::query("DELETE FROM blob_chunks WHERE blob_key LIKE 'upload:%' AND blob_key NOT LIKE 'upload:0b9c%' AND seq = 0")
        .execute(store.pool())
        .await
        .unwrap();
    let err = slow.finish().await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("2 of the upload's 3 stored chunks are left"),
        "{message}"
    );
    // The client's to retry, as for a stalled body: 408, not 500.
    let response = axum::response::IntoResponse::into_response(bdscan::server::ApiError::from(err));
    assert_eq!(response.status(), reqwest::StatusCode::REQUEST_TIMEOUT);
    let blobs: i64 = sqlx::query("SELECT COUNT(*) FROM blobs")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(blobs, 1, "only the first upload's blob");
}

#[tokio::test]
async fn the_stale_staging_sweep_removes_only_abandoned_uploads_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = bdscan::store::Store::connect(&bdscan::store::Store::sqlite_url(dir.path()))
        .await
        .unwrap();
    the_stale_staging_sweep_removes_only_abandoned_uploads(store).await;
}

#[tokio::test]
async fn the_stale_staging_sweep_removes_only_abandoned_uploads_postgres() {
    let Some(url) = crate::helpers::postgres_url(
        "the_stale_staging_sweep_removes_only_abandoned_uploads_postgres",
    ) else {
        return;
    };
    let database = crate::helpers::fresh_postgres_database(&url).await;
    let store = bdscan::store::Store::connect(&database.url).await.unwrap();
    the_stale_staging_sweep_removes_only_abandoned_uploads(store.clone()).await;
    store.pool().close().await;
}

/// The retention sweep's delete takes an unused blob only if it was last stored before
/// the cutoff: uploading the same bytes again (which answers with that blob) keeps it.
async fn uploading_a_stored_file_again_keeps_it_from_the_retention_sweep(
    store: bdscan::store::Store,
) {
    let upload = |bytes: &'static [u8]| {
        let store = store.clone();
        async move {
            let mut upload = store.begin_upload();
            upload.write(bytes).await.unwrap();
            upload.finish().await.unwrap().sha256
        }
    };
    let age = |sha: String| {
        let store = store.clone();
        async move {
            sqlx::query("UPDATE blobs SET created_at = created_at - 86400000 WHERE sha256 = $1")
                .bind(sha)
                .execute(store.pool())
                .await
                .unwrap();
        }
    };
    let (again, left) = (upload(b"sent twice").await, upload(b"sent once").await);
    age(again.clone()).await;
    age(left.clone()).await;
    let cutoff = bdscan::store::now_ms() - 3_600_000;
    let mut old = store.unused_blobs_before(cutoff, 10).await.unwrap();
    old.sort();
    let mut expected = vec![again.clone(), left.clone()];
    expected.sort();
    assert_eq!(old, expected);
    // The same bytes again, as a client re-sending its clean bundle for a new job.
    assert_eq!(upload(b"sent twice").await, again);
    assert!(!store
        .free_blob_if_unused_since(&again, cutoff)
        .await
        .unwrap());
    assert!(store
        .free_blob_if_unused_since(&left, cutoff)
        .await
        .unwrap());
    assert!(store.blob_info(&again).await.unwrap().is_some());
    assert!(store.blob_info(&left).await.unwrap().is_none());
}

#[tokio::test]
async fn uploading_a_stored_file_again_keeps_it_from_the_retention_sweep_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = bdscan::store::Store::connect(&bdscan::store::Store::sqlite_url(dir.path()))
        .await
        .unwrap();
    uploading_a_stored_file_again_keeps_it_from_the_retention_sweep(store).await;
}

#[tokio::test]
async fn uploading_a_stored_file_again_keeps_it_from_the_retention_sweep_postgres() {
    let Some(url) = crate::helpers::postgres_url(
        "uploading_a_stored_file_again_keeps_it_from_the_retention_sweep_postgres",
    ) else {
        return;
    };
    let database = crate::helpers::fresh_postgres_database(&url).await;
    let store = bdscan::store::Store::connect(&database.url).await.unwrap();
    uploading_a_stored_file_again_keeps_it_from_the_retention_sweep(store.clone()).await;
    store.pool().close().await;
}

#[tokio::test]
async fn a_refused_scan_form_leaves_none_of_its_uploads_behind() {
    let app = spawn_app(Options::default()).await;
    let blobs = || async {
        sqlx::query("SELECT COUNT(*) FROM blobs")
            .fetch_one(app.store().pool())
            .await
            .unwrap()
            .get::<i64, _>(0)
    };
    // A file that was already stored before the request stays.
    let kept = app.upload(b"stored before".to_vec()).await;
    let form = || {
        Form::new()
            .part(
                "model",
                Part::bytes(b"stored before".to_vec()).file_name("m.pt"),
            )
            .part("clean", Part::bytes(vec![7u8; 3000]).file_name("c.npz"))
    };
    let cases = [
        (
            form().text("colour", "red"),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            form().text("config", "{}").text("config", "{}"),
            StatusCode::BAD_REQUEST,
            "duplicate_field",
        ),
        (
            form().text("target_label", "1").text("target_label", "2"),
            StatusCode::BAD_REQUEST,
            "duplicate_field",
        ),
        (
            form().text("config", "{\"purify_epochs\": -1}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
        ),
    ];
    for (form, status, code) in cases {
        let response = app.post_form("/v1/scans", form).await;
        assert_problem(response, status, code).await;
        assert_eq!(blobs().await, 1, "after a refused `{code}` form");
    }
    assert_eq!(
        app.get_json(&format!("/v1/blobs/{kept}")).await.0,
        StatusCode::OK
    );
    app.stop().await;
}

/// A connection to the app that has sent the headers of a `bytes`-long upload and
/// `sent` bytes of it.
async fn start_upload(
    app: &crate::helpers::TestApp,
    content_type: &str,
    head: &[u8],
    bytes: usize,
) -> tokio::net::TcpStream {
    let headers = format!(
        "POST /v1/blobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
         Content-Length: {bytes}\r\n\r\n"
    );
    app.raw_connection(&[headers.as_bytes(), head].concat())
        .await
}

/// Waits until `want` chunks are staged.
async fn until_staged(app: &crate::helpers::TestApp, want: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while staged_chunks(app).await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "never {want} staged chunks"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_cut_off_with_408_and_leaves_nothing_behind() {
    let app = spawn_app(Options {
        body_idle_timeout: std::time::Duration::from_millis(700),
        ..Options::default()
    })
    .await;
    let first_chunk = vec![5u8; bdscan::store::CHUNK_BYTES + 10];
    let mut multipart_head =
        b"--X\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.pt\"\r\n\r\n".to_vec();
    multipart_head.extend_from_slice(&first_chunk);
    for (content_type, head) in [
        ("application/octet-stream", first_chunk.clone()),
        ("multipart/form-data; boundary=X", multipart_head),
    ] {
        // A fifth of the body arrives, one chunk is staged, then nothing more.
        let mut socket = start_upload(&app, content_type, &head, 5 * head.len()).await;
        until_staged(&app, 1).await;
        let answer = first_answer(&mut socket).await;
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{content_type}: {answer}"
        );
        assert!(answer.contains("request_timeout"), "{answer}");
        until_staged(&app, 0).await;
    }
    // A JSON body that stalls gets the same answer, not `malformed_json`.
    let mut socket = app
        .raw_connection(
            b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"model\": ",
        )
        .await;
    let answer = first_answer(&mut socket).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_uploads_are_refused_early_past_their_framing_and_take_one_file() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app(Options::default()).await;
    // 2 MiB of a body announced at 512 MiB, without a boundary, or with a part whose
    // headers never end. The parser held all of it (up to the body limit, 4 GiB on
    // /v1/scans) waiting for one, and answered only when the body ended.
    let part_head = b"--X\r\nContent-Disposition: form-data; name=\"model\"\r\nX-Pad: ".to_vec();
    for (path, head) in [
        ("/v1/blobs", Vec::new()),
        ("/v1/scans", Vec::new()),
        ("/v1/scans", part_head),
    ] {
        let headers = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: multipart/form-data; boundary=X\r\nContent-Length: {}\r\n\r\n",
            512u64 << 20
        );
        let mut socket = app
            .raw_connection(&[headers.as_bytes(), &head].concat())
            .await;
        // Ignoring failures: the server may close once it has answered.
        let _ = socket.write_all(&vec![b'A'; 2 << 20]).await;
        let answer = first_answer(&mut socket).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("outside any file"), "{path}: {answer}");
    }
    // Two files in one form: the second was dropped without a word. Refused, and the
    // first, which this request stored, goes with it.
    let form = Form::new()
        .part("model", Part::bytes(vec![4u8; 1000]).file_name("m.pt"))
        .part("clean", Part::bytes(vec![6u8; 1000]).file_name("c.npz"));
    let response = app.post_form("/v1/blobs", form).await;
    let problem = assert_problem(response, StatusCode::BAD_REQUEST, "unknown_field").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("`clean`"),
        "{problem}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blobs")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // A file of several MiB in a form is read as before.
    let form = Form::new().part("file", Part::bytes(vec![9u8; 5 << 20]).file_name("m.pt"));
    let response = app.post_form("/v1/blobs", form).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_trickling_in_under_the_minimum_rate_is_cut_off_with_408() {
    use tokio::io::AsyncWriteExt;
    // 10 bytes every 100 ms: never idle for the 60 s the idle timeout waits, so before
    // the minimum rate such an upload held its connection for as long as it liked.
    let app = spawn_app(Options {
        min_body_rate: 100_000,
        min_body_rate_after: std::time::Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let socket = start_upload(&app, "application/octet-stream", b"", 1 << 20).await;
    let (mut read, mut write) = socket.into_split();
    let trickle = tokio::spawn(async move {
        while write.write_all(&[7u8; 10]).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::io::AsyncReadExt::read(&mut read, &mut answer),
    )
    .await
    .expect("the server answers while the upload still trickles")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    trickle.abort();
    until_staged(&app, 0).await;
    // An upload at full speed is untouched.
    let blob = app.upload(vec![3u8; 3 << 20]).await;
    assert_eq!(blob.len(), 64);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_ever_on_an_open_upload() {
    let app = spawn_app(Options {
        shutdown_grace: std::time::Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let head = vec![5u8; bdscan::store::CHUNK_BYTES + 10];
    let _socket = start_upload(&app, "application/octet-stream", &head, 5 * head.len()).await;
    until_staged(&app, 1).await;
    // The upload still has 59 seconds before its body times out.
    let (_, took) = app.stop_timed().await;
    assert!(
        took >= std::time::Duration::from_secs(1) && took < std::time::Duration::from_secs(10),
        "stopped after {took:?}"
    );
}

#[tokio::test]
async fn uploads_past_the_store_limit_get_507_and_leave_nothing_sqlite() {
    uploads_past_the_store_limit_get_507_and_leave_nothing(crate::helpers::Db::Sqlite).await;
}

#[tokio::test]
async fn uploads_past_the_store_limit_get_507_and_leave_nothing_postgres() {
    if let Some(url) =
        crate::helpers::postgres_url("uploads_past_the_store_limit_get_507_and_leave_nothing")
    {
        uploads_past_the_store_limit_get_507_and_leave_nothing(crate::helpers::Db::Postgres(url))
            .await;
    }
}

async fn uploads_past_the_store_limit_get_507_and_leave_nothing(db: crate::helpers::Db) {
    let app = spawn_app(Options {
        db,
        max_store_bytes: Some(3 << 20),
        ..Options::default()
    })
    .await;
    let post = |bytes: Vec<u8>| app.client.post(app.url("/v1/blobs")).body(bytes).send();
    assert_eq!(
        post(vec![1u8; 2 << 20]).await.unwrap().status(),
        StatusCode::CREATED
    );
    // 2 MiB more would make 4 of the 3 allowed: refused part-way, nothing kept.
    assert_problem(
        post(vec![2u8; 2 << 20]).await.unwrap(),
        StatusCode::INSUFFICIENT_STORAGE,
        "store_full",
    )
    .await;
    assert_eq!(staged_chunks(&app).await, 0);
    // What still fits is taken; then nothing more.
    assert_eq!(
        post(vec![3u8; 1 << 20]).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_problem(
        post(vec![4u8; 10]).await.unwrap(),
        StatusCode::INSUFFICIENT_STORAGE,
        "store_full",
    )
    .await;
    let stored: i64 = sqlx::query("SELECT COUNT(*) FROM blobs")
        .fetch_one(app.store().pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 2);
    assert_eq!(app.store().stored_bytes().await.unwrap(), 3 << 20);
    // A file the full store holds already is taken again (it adds nothing), and counts
    // as stored now; as raw body and as multipart.
    let before: i64 = sqlx::query("SELECT created_at FROM blobs WHERE size_bytes = $1")
        .bind(2i64 << 20)
        .fetch_one(app.store().pool())
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let again = post(vec![1u8; 2 << 20]).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["size_bytes"], 2 << 20, "{again}");
    let form = Form::new().part("file", Part::bytes(vec![3u8; 1 << 20]));
    let response = app.post_form("/v1/blobs", form).await;
    assert_eq!(response.status(), StatusCode::OK);
    let after: i64 = sqlx::query("SELECT created_at FROM blobs WHERE size_bytes = $1")
        .bind(2i64 << 20)
        .fetch_one(app.store().pool())
        .await
        .unwrap()
        .get(0);
    assert!(after > before, "{before} -> {after}");
    assert_eq!(staged_chunks(&app).await, 0);
    assert_eq!(app.store().stored_bytes().await.unwrap(), 3 << 20);
    app.stop().await;
}

#[tokio::test]
async fn a_sqlite_write_locked_out_by_others_is_503_not_500() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = bdscan::store::Store::sqlite_url(dir.path());
    // Creates the database and its tables.
    let store = bdscan::store::Store::connect(&url).await.unwrap();
    // One connection holds the write lock; another gives up on it at once, as a write
    // does once the busy timeout has passed under many large uploads.
    let mut holder = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let mut writer = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("PRAGMA busy_timeout = 0")
        .execute(&mut writer)
        .await
        .unwrap();
    let locked = sqlx::query(
        "INSERT INTO blob_chunks (blob_key, seq, byte_offset, data) VALUES ('upload:x', 0, 0, x'00')",
    )
    .execute(&mut writer)
    .await
    .unwrap_err();
    let answer = bdscan::server::ApiError::from(bdscan::store::StoreError::from(locked));
    assert_eq!(
        answer.status_code(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{answer}"
    );
    assert_eq!(answer.code(), "unavailable");
    // Any other database failure is still ours: 500.
    let missing = sqlx::query("SELECT * FROM no_such_table")
        .execute(&mut writer)
        .await
        .unwrap_err();
    let answer = bdscan::server::ApiError::from(bdscan::store::StoreError::from(missing));
    assert_eq!(answer.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
    drop(holder);
    store.close().await;
}

#[tokio::test]
async fn a_multipart_content_type_in_any_case_stores_the_file_not_the_envelope() {
    let app = spawn_app(Options::default()).await;
    let body = "--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.pt\"\r\n\r\nhello\n\r\n--XX--\r\n";
    for content_type in [
        "multipart/form-data; boundary=XX",
        "Multipart/Form-Data; boundary=XX",
        "MULTIPART/FORM-DATA;boundary=XX",
    ] {
        let response = app
            .client
            .post(app.url("/v1/blobs"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{content_type}");
        let blob: Value = response.json().await.unwrap();
        assert_eq!(blob["size_bytes"], 6, "{content_type}: {blob}");
        assert_eq!(blob["sha256"], hex::encode(Sha256::digest(b"hello\n")));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_blob_deleted_while_it_is_read_ends_the_read_as_not_found_not_damaged() {
    use futures_util::StreamExt;
    let app = spawn_app(Options::default()).await;
    let store = app.store();
    let bytes: Vec<u8> = (0..(5 * bdscan::store::CHUNK_BYTES / 2))
        .map(|i| (i % 251) as u8)
        .collect();
    let mut upload = store.begin_upload();
    upload.write(&bytes).await.unwrap();
    let blob = upload.finish().await.unwrap();
    let mut read = std::pin::pin!(store.read_range(&blob.sha256, 0, bytes.len() as u64));
    let first = read.next().await.unwrap().unwrap();
    assert_eq!(&first[..], &bytes[..first.len()]);
    assert!(store.free_blob_if_unreferenced(&blob.sha256).await.unwrap());
    // Before: "blob … is damaged: no chunk holds byte 1048576", logged as an ERROR.
    let cut = read.next().await.unwrap().unwrap_err();
    assert!(
        matches!(cut, bdscan::store::StoreError::BlobNotFound(ref sha) if *sha == blob.sha256),
        "{cut}"
    );
    app.stop().await;
}

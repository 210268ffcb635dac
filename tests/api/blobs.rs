use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::helpers::{assert_problem, spawn_app, Options};

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
    let again = app
        .client
        .post(app.url("/v1/blobs"))
        .multipart(form)
        .send()
        .await
        .unwrap();
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
    let too_big = app
        .client
        .post(app.url("/v1/blobs"))
        .multipart(form)
        .send()
        .await
        .unwrap();
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

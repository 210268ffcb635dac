use reqwest::StatusCode;

use crate::helpers::{assert_problem, spawn_app, Options};

#[tokio::test]
async fn health_readiness_metrics_and_openapi_answer() {
    let app = spawn_app(Options::default()).await;
    assert_eq!(
        app.get_json("/healthz").await,
        (StatusCode::OK, serde_json::json!({ "status": "ok" }))
    );
    assert_eq!(
        app.get_json("/readyz").await,
        (StatusCode::OK, serde_json::json!({ "status": "ready" }))
    );

    let missing = app
        .client
        .get(app.url("/v1/jobs/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    assert!(text.contains("# TYPE bdscan_jobs gauge"), "{text}");
    assert!(text.contains("bdscan_jobs{state=\"queued\"} 0"), "{text}");
    // healthz and readyz succeeded; the unknown job did not.
    assert!(
        text.contains("bdscan_http_responses_total{class=\"2xx\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("bdscan_http_responses_total{class=\"4xx\"} 1"),
        "{text}"
    );
    // The three earlier requests are in the latency histogram (the /metrics request
    // itself is recorded after its body is rendered).
    assert!(
        text.contains("bdscan_http_request_duration_seconds_count 3\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE bdscan_job_duration_seconds histogram"),
        "{text}"
    );

    let (status, spec) = app.get_json("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/blobs",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/artifact",
        "/v1/scans",
    ] {
        assert!(spec["paths"][path].is_object(), "openapi lacks {path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_get_a_problem_document() {
    let app = spawn_app(Options::default()).await;
    let response = app.client.get(app.url("/v2/nothing")).send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    app.stop().await;
}

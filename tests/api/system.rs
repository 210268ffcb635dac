use std::collections::BTreeSet;
use std::path::Path;

use bdscan::server::openapi::METHODS;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, first_answer, spawn_app, Options};

#[tokio::test]
async fn readiness_without_a_database_says_so_without_its_error() {
    // /readyz is open to anyone who reaches the port: the database's own error (its
    // user, host, port) goes to the log, not into the answer.
    let app = spawn_app(Options::default()).await;
    app.store().close().await;
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    let problem = assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert_eq!(
        problem["detail"], "service unavailable: the database does not answer",
        "{problem}"
    );
    assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
    app.stop().await;
}

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

/// Whether `value` is of the JSON Schema `kind` (a type name, or a list of them).
fn of_schema_type(kind: &Value, value: &Value) -> bool {
    match kind {
        Value::Array(kinds) => kinds.iter().any(|k| of_schema_type(k, value)),
        Value::String(kind) => match kind.as_str() {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "number" => value.is_number(),
            "integer" => value.is_i64() || value.is_u64(),
            "null" => value.is_null(),
            other => panic!("unknown schema type {other}"),
        },
        other => panic!("schema type {other}"),
    }
}

#[tokio::test]
async fn every_scan_setting_s_default_fits_its_documented_type_and_is_accepted() {
    let app = spawn_app(Options::default()).await;
    let (_, spec) = app.get_json("/v1/openapi.json").await;
    let settings = spec["components"]["schemas"]["ScanConfig"]["properties"]
        .as_object()
        .unwrap();
    let blob = app.upload(b"model".to_vec()).await;
    for (name, schema) in settings {
        let Some(default) = schema.get("default") else {
            continue;
        };
        assert!(of_schema_type(&schema["type"], default), "{name}: {schema}");
        if let (Some(items), Some(values)) = (schema.get("items"), default.as_array()) {
            for value in values {
                assert!(of_schema_type(&items["type"], value), "{name}: {schema}");
            }
        }
        // A client that sends the documented default is understood.
        let body = json!({ "model": blob, "clean": blob, "config": { name: default } });
        let response = app
            .client
            .post(app.url("/v1/jobs"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{name}: {default}");
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

/// The paths the routers register, read from their source: `.route("PATH", …)`.
fn registered_paths() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server/routes");
    let mut paths = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for piece in source.split(".route(").skip(1) {
            let literal = piece.trim_start();
            assert!(
                literal.starts_with('"'),
                "routes take their path as a literal so this test can see them: {}",
                &literal[..literal.len().min(60)]
            );
            let path = literal[1..].split('"').next().unwrap();
            paths.insert(path.to_string());
        }
    }
    paths
}

fn resolve_refs(node: &Value, document: &Value) {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                let pointer = target.strip_prefix('#').expect("local $ref");
                assert!(
                    document.pointer(pointer).is_some(),
                    "dangling $ref {target}"
                );
            }
            map.values().for_each(|v| resolve_refs(v, document));
        }
        Value::Array(items) => items.iter().for_each(|v| resolve_refs(v, document)),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_documents_every_route_with_exactly_its_methods() {
    let app = spawn_app(Options::default()).await;
    let (status, spec) = app.get_json("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    resolve_refs(&spec, &spec);
    let documented: BTreeSet<String> = spec["paths"].as_object().unwrap().keys().cloned().collect();
    let registered = registered_paths();
    assert!(registered.len() >= 11, "found only {registered:?}");
    assert_eq!(
        documented, registered,
        "documented paths vs registered ones"
    );

    for (path, item) in spec["paths"].as_object().unwrap() {
        let url = path
            .replace("{id}", &uuid::Uuid::new_v4().to_string())
            .replace("{sha256}", &"ab".repeat(32));
        for method in METHODS {
            let operation = &item[method];
            let response = app
                .client
                .request(method.to_uppercase().parse().unwrap(), app.url(&url))
                .send()
                .await
                .unwrap();
            let status = response.status();
            if operation.is_object() {
                assert!(
                    operation["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{method} {path} has no summary"
                );
                let responses = operation["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{method} {path} documents no success"
                );
                if let Some(parameters) = path.contains('{').then(|| &operation["parameters"]) {
                    assert!(
                        parameters.is_array(),
                        "{method} {path} lacks its path parameter"
                    );
                }
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is documented but not routed"
                );
                let body: Value = response.json().await.unwrap_or(Value::Null);
                assert_ne!(
                    body["detail"], "route not found",
                    "{method} {path} is documented but not routed"
                );
                if status.is_client_error() || status.is_server_error() {
                    assert!(
                        responses.contains_key(status.as_str()),
                        "{method} {path} answered {status}, which it does not document: {body}"
                    );
                    if let Some(codes) = responses[status.as_str()].pointer(
                        "/content/application~1problem+json/schema/allOf/1/properties/code/enum",
                    ) {
                        assert!(
                            codes.as_array().unwrap().contains(&body["code"]),
                            "{method} {path} answered code {}, which it does not document",
                            body["code"]
                        );
                    }
                }
            } else {
                let allowed: BTreeSet<String> = response.headers()["allow"]
                    .to_str()
                    .unwrap()
                    .split(',')
                    .map(|m| m.trim().to_lowercase())
                    .filter(|m| m != "head")
                    .collect();
                let documented: BTreeSet<String> = METHODS
                    .iter()
                    .filter(|m| item[**m].is_object())
                    .map(|m| m.to_string())
                    .collect();
                assert_eq!(
                    allowed, documented,
                    "Allow of {path} vs its documented methods"
                );
                let problem = assert_problem(
                    response,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                )
                .await;
                assert!(
                    problem["detail"].as_str().unwrap().contains("openapi"),
                    "{problem}"
                );
            }
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_client_reads_nothing_is_closed() {
    use tokio::io::AsyncReadExt;
    let app = spawn_app(Options {
        write_stall_timeout: std::time::Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    // 2,000 pipelined requests for the OpenAPI document (open without a token), whose
    // answers are far more than the sockets' buffers hold, and nothing read: the
    // server's writes stall. Without a deadline the connection, and its slot under the
    // connection cap, stayed open for as long as the client liked.
    const REQUESTS: usize = 2_000;
    let one = b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut idle = app.raw_connection(&one.repeat(REQUESTS)).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut received = Vec::new();
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        idle.read_to_end(&mut received),
    )
    .await;
    assert!(
        ended.is_ok(),
        "the connection was still open 20 s after the client began to read"
    );
    let answers = received
        .windows(15)
        .filter(|w| w == b"HTTP/1.1 200 OK")
        .count();
    assert!(
        answers < REQUESTS,
        "all {answers} answers arrived: the server never gave up on the client"
    );
    // A client that reads is served as before.
    assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    use tokio::io::AsyncReadExt;
    let app = spawn_app(Options {
        header_read_timeout: std::time::Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    // Half a request line, then nothing: held open for ever without the timeout.
    let mut slow = app
        .raw_connection(b"GET /healthz HTTP/1.1\r\nHost: 1")
        .await;
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match slow.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was still open after 10 s");
    // A client that sends its request in time is served as before.
    assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_waits_until_one_closes() {
    use tokio::io::AsyncReadExt;
    let app = spawn_app(Options {
        max_connections: 2,
        ..Options::default()
    })
    .await;
    // Two connections that send nothing (the header timeout is 30 s) fill the server.
    let first = app.raw_connection(b"").await;
    let _second = app.raw_connection(b"").await;
    let mut third = app
        .raw_connection(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buffer = [0u8; 256];
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(700),
        third.read(&mut buffer),
    )
    .await;
    assert!(
        early.is_err(),
        "a third connection was served while two were open: {early:?}"
    );
    // One closes; the waiting connection is accepted and answered.
    drop(first);
    let answer = first_answer(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn every_token_of_a_list_is_accepted_so_tokens_can_be_rotated() {
    let (old, new) = ("0123456789abcdef".repeat(4), "fedcba9876543210".repeat(4));
    let app = spawn_app(Options {
        api_token: Some(format!("{old}\n  {new} ")),
        ..Options::default()
    })
    .await;
    let list = |token: &str| {
        app.client
            .get(app.url("/v1/jobs"))
            .header("authorization", format!("Bearer {token}"))
            .send()
    };
    for token in [&old, &new] {
        assert_eq!(list(token).await.unwrap().status(), StatusCode::OK);
    }
    let both = format!("{old} {new}");
    for refused in [&"f".repeat(64), &both, &old[..32].to_string()] {
        let response = list(refused).await.unwrap();
        assert_problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    app.stop().await;
}

#[tokio::test]
async fn with_an_api_token_every_v1_resource_wants_it_and_probes_stay_open() {
    let token = "0123456789abcdef".repeat(4);
    let app = spawn_app(Options {
        api_token: Some(token.clone()),
        ..Options::default()
    })
    .await;
    let bearer = format!("Bearer {token}");
    let basic = format!("Basic {token}");
    let wrong = format!("Bearer {}", "f".repeat(64));
    for authorization in [None, Some(wrong.as_str()), Some(basic.as_str())] {
        let mut upload = app.client.post(app.url("/v1/blobs")).body(vec![7u8; 1000]);
        let mut list = app.client.get(app.url("/v1/jobs"));
        if let Some(value) = authorization {
            upload = upload.header("authorization", value);
            list = list.header("authorization", value);
        }
        for request in [upload, list] {
            let response = request.send().await.unwrap();
            assert_eq!(
                response
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_string()),
                Some("Bearer realm=\"bdscan\"".to_string())
            );
            assert_problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blobs")
        .fetch_one(app.store().pool())
        .await
        .unwrap();
    assert_eq!(stored, 0, "a refused upload stores nothing");

    let response = app
        .client
        .post(app.url("/v1/blobs"))
        .header("authorization", &bearer)
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = app
        .client
        .get(app.url("/v1/jobs"))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "the scheme in any case");
    // Probes and the API's description need no token; an unknown path is still 404.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let response = app.client.get(app.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

//! The OpenAPI 3.1 description served at `/v1/openapi.json`, written by hand next to the
//! routes. `tests/api/system.rs` checks that every route the routers register appears
//! here with exactly its methods, so the two cannot drift apart silently.

use serde_json::{json, Map, Value};

/// Every HTTP method a route of this API may use, in the document's lower case.
pub const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// A response whose body is a problem document, listing the `code`s it may carry.
fn problem(description: &str, codes: &[&str]) -> Value {
    json!({
        "description": format!("{description} (code: {})", codes.join(", ")),
        "content": { "application/problem+json": { "schema": {
            "allOf": [
                { "$ref": "#/components/schemas/Problem" },
                { "properties": { "code": { "enum": codes } } }
            ] } } }
    })
}

fn json_body(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
    })
}

fn job(description: &str) -> Value {
    let mut response = json_body(description, "Job");
    response["headers"] = json!({ "Location": { "$ref": "#/components/headers/JobLocation" } });
    response
}

pub fn openapi() -> Value {
    let job_id = json!({ "$ref": "#/components/parameters/JobId" });
    let idempotency_key = json!({ "$ref": "#/components/parameters/IdempotencyKey" });
    let not_found = problem("no such job", &["not_found"]);
    let bad_path = problem(
        "the path is not valid UTF-8 once percent-decoded",
        &["invalid_path"],
    );
    let not_ready = problem(
        "the job has not succeeded: `not_ready` while it is queued or running, `no_report` once it failed or was cancelled (reports and artifacts exist only for succeeded jobs)",
        &["not_ready", "no_report"],
    );
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "bdscan",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Finds and removes backdoors in neural networks: upload a TorchScript model and clean samples, queue a scan, read its salience report and download the purified model. Every error is a problem document (RFC 9457) with a stable `code`; client mistakes are 4xx."
        },
        "paths": {
            "/healthz": { "get": {
                "summary": "Liveness: the process answers",
                "responses": { "200": { "description": "up", "content": { "application/json": { "schema": {
                    "type": "object", "properties": { "status": { "const": "ok" } } } } } } } } },
            "/readyz": { "get": {
                "summary": "Readiness: the database answers",
                "responses": {
                    "200": { "description": "ready", "content": { "application/json": { "schema": {
                        "type": "object", "properties": { "status": { "const": "ready" } } } } } },
                    "503": problem("the database does not answer", &["unavailable"]) } } },
            "/metrics": { "get": {
                "summary": "Prometheus metrics: jobs by state, queue depth, job durations, upload bytes, HTTP latencies and responses",
                "responses": { "200": { "description": "Prometheus text exposition format 0.0.4",
                    "content": { "text/plain": { "schema": { "type": "string" } } } } } } },
            "/v1/openapi.json": { "get": {
                "summary": "This document",
                "responses": { "200": { "description": "OpenAPI 3.1", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/v1/blobs": { "post": {
                "summary": "Upload a file (model or sample bundle), streamed to the store in chunks, hashed on the way, deduplicated by sha256",
                "requestBody": { "required": true, "content": {
                    "application/octet-stream": { "schema": { "type": "string", "format": "binary" } },
                    "multipart/form-data": { "schema": { "type": "object",
                        "description": "one field, the file; its name does not matter (a second field is refused)",
                        "properties": { "file": { "type": "string", "format": "binary" } } } } } },
                "responses": {
                    "201": blob_created("stored"),
                    "200": blob_created("an identical blob was already stored; this upload was dropped"),
                    "400": problem("the body is empty, cut short or not valid multipart, or the form holds more than one field",
                        &["empty_upload", "incomplete_body", "malformed_multipart", "unknown_field"]),
                    "408": problem("the body sent nothing for longer than the server waits, or arrived too slowly", &["request_timeout"]),
                    "413": problem("the file exceeds the server's size limit", &["payload_too_large"]),
                    "422": problem("the multipart body holds no file", &["missing_field"]),
                    "507": problem("the store holds as much as the server allows (max_store_bytes)", &["store_full"]) } } },
            "/v1/blobs/{sha256}": { "get": {
                "summary": "A stored blob's size",
                "parameters": [ { "name": "sha256", "in": "path", "required": true,
                    "schema": { "type": "string", "pattern": "^[0-9a-fA-F]{64}$" } } ],
                "responses": {
                    "200": json_body("the blob", "Blob"),
                    "400": bad_path,
                    "404": problem("no such blob (never uploaded, or freed when the last job using it was deleted)", &["not_found"]) } } },
            "/v1/jobs": {
                "post": {
                    "summary": "Queue a scan of uploaded blobs",
                    "parameters": [ idempotency_key ],
                    "requestBody": { "required": true, "content": { "application/json": {
                        "schema": { "$ref": "#/components/schemas/JobRequest" } } } },
                    "responses": {
                        "202": job("queued"),
                        "200": job("this Idempotency-Key was used before with the same request: that job"),
                        "400": problem("malformed JSON, unknown or mistyped fields, or a bad Idempotency-Key",
                            &["malformed_json", "invalid_request", "invalid_idempotency_key"]),
                        "408": problem("the body sent nothing for longer than the server waits, or arrived too slowly", &["request_timeout"]),
                        "409": problem("this Idempotency-Key was used before with a different request", &["idempotency_key_reused"]),
                        "413": problem("the body exceeds the 2 MB JSON limit", &["payload_too_large"]),
                        "415": problem("the body is not declared as JSON", &["unsupported_media_type"]),
                        "422": problem("the request cannot be run as given",
                            &["invalid_blob_id", "unknown_blob", "invalid_config", "invalid_request", "device_unavailable"]),
                        "503": problem("as many jobs wait as the server allows (max_queued_jobs); Retry-After says when to try again", &["queue_full"]) } },
                "get": {
                    "summary": "List jobs, newest first, with cursor pagination",
                    "parameters": [
                        { "name": "state", "in": "query", "schema": { "$ref": "#/components/schemas/JobState" } },
                        { "name": "cursor", "in": "query", "description": "`next_cursor` of the previous page", "schema": { "type": "string" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 500, "default": 50 } } ],
                    "responses": {
                        "200": json_body("a page of jobs", "JobList"),
                        "400": problem("an unknown state, a bad cursor or limit, or an unknown parameter",
                            &["invalid_query", "invalid_cursor"]) } } },
            "/v1/jobs/{id}": {
                "get": {
                    "summary": "A job: state, progress, timings, error, links",
                    "parameters": [ job_id ],
                    "responses": { "200": json_body("the job", "Job"), "400": bad_path, "404": not_found } },
                "delete": {
                    "summary": "Cancel an active job; delete a finished one",
                    "description": "A queued job is cancelled at once (200). A running job is asked to stop and does so at its worker's next step (202; poll until `cancelled`). A finished job (succeeded, failed, cancelled) is deleted with its report, its purified model and every input blob no other job uses (204).",
                    "parameters": [ job_id ],
                    "responses": {
                        "200": job("cancelled (it was queued), or it finished meanwhile"),
                        "202": job("running; it stops at its next step"),
                        "204": { "description": "deleted, with the blobs nothing else uses" },
                        "400": bad_path, "404": not_found } } },
            "/v1/jobs/{id}/report": { "get": {
                "summary": "The scan report (JSON, schema_version 1)",
                "parameters": [ job_id ],
                "responses": { "200": json_body("the report", "Report"), "400": bad_path, "404": not_found, "409": not_ready } } },
            "/v1/jobs/{id}/report.html": { "get": {
                "summary": "The report as a page: summary (method, shortcut search, ASR and clean accuracy before and after), warnings, metrics, inputs with hashes, configuration, per-layer salience plots (inline SVG)",
                "parameters": [ job_id ],
                "responses": {
                    "200": { "description": "the page", "content": { "text/html": { "schema": { "type": "string" } } } },
                    "400": bad_path, "404": not_found, "409": not_ready } } },
            "/v1/jobs/{id}/artifact": { "get": {
                "summary": "The purified TorchScript model, streamed; one byte range may be asked for",
                "parameters": [ job_id, { "name": "Range", "in": "header", "description": "one range, `bytes=START-END`, `bytes=START-` or `bytes=-SUFFIX`; several ranges get the whole file",
                    "schema": { "type": "string" } } ],
                "responses": {
                    "200": { "description": "the model", "headers": artifact_headers(false),
                        "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
                    "206": { "description": "the requested range", "headers": artifact_headers(true),
                        "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
                    "400": bad_path, "404": not_found, "409": not_ready,
                    "416": { "description": "the range lies outside the file (code: range_not_satisfiable)",
                        "headers": { "Content-Range": { "description": "`bytes */SIZE`", "schema": { "type": "string" } } },
                        "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } } } } } },
            "/v1/scans": { "post": {
                "summary": "The one-request audit: upload the files and queue the scan at once",
                "description": "`curl -F model=@m.pt -F clean=@c.safetensors 'http://host/v1/scans?wait=600'` is the whole audit.",
                "parameters": [
                    { "name": "wait", "in": "query", "description": "seconds to hold the response for the job to finish (at most 600)",
                      "schema": { "type": "integer", "minimum": 0, "maximum": 600, "default": 0 } },
                    idempotency_key ],
                "requestBody": { "required": true, "content": { "multipart/form-data": { "schema": {
                    "type": "object", "required": ["model", "clean"],
                    "properties": {
                        "model": { "type": "string", "format": "binary", "description": "TorchScript archive" },
                        "clean": { "type": "string", "format": "binary", "description": "clean samples (.safetensors or .npz with `images`, `labels`)" },
                        "test": { "type": "string", "format": "binary", "description": "clean test samples for accuracy" },
                        "poison": { "type": "string", "format": "binary", "description": "triggered samples with their true labels (with target_label)" },
                        "target_label": { "type": "integer", "description": "the attack's target class (with poison)" },
                        "config": { "type": "string", "contentMediaType": "application/json", "description": "scan settings as JSON, as in JobRequest.config" } } } } } },
                "responses": {
                    "200": job("the job finished within `wait`"),
                    "202": job("queued or running"),
                    "400": problem("not multipart, an unknown, repeated or non-UTF-8 field, an empty file, a bad query or Idempotency-Key",
                        &["malformed_multipart", "unknown_field", "duplicate_field", "invalid_field", "empty_upload",
                          "incomplete_body", "invalid_query", "invalid_idempotency_key"]),
                    "409": problem("this Idempotency-Key was used before with a different request", &["idempotency_key_reused"]),
                    "408": problem("the body sent nothing for longer than the server waits, or arrived too slowly", &["request_timeout"]),
                    "413": problem("a file exceeds the server's size limit", &["payload_too_large"]),
                    "422": problem("a missing file, a bad target label or config, or a device no slot has",
                        &["missing_field", "invalid_request", "invalid_config", "unknown_blob", "device_unavailable"]),
                    "503": problem("as many jobs wait as the server allows (max_queued_jobs); Retry-After says when to try again", &["queue_full"]),
                    "507": problem("the store holds as much as the server allows (max_store_bytes)", &["store_full"]) } } }
        },
        "components": {
            "parameters": {
                "JobId": { "name": "id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } },
                "IdempotencyKey": { "name": "Idempotency-Key", "in": "header",
                    "description": "1 to 255 visible characters; the same key with the same request returns the first job, with a different request 409",
                    "schema": { "type": "string", "minLength": 1, "maxLength": 255 } }
            },
            "headers": {
                "JobLocation": { "description": "the job's URL, `/v1/jobs/{id}`", "schema": { "type": "string" } }
            },
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer",
                    "description": "the server's `api_token`, when it has one; then every /v1 route but this document wants it" }
            },
            "responses": {
                "Unauthorized": problem("no `Authorization: Bearer` token, or not the server's (only when the server has an api_token)", &["unauthorized"]),
                "MethodNotAllowed": problem("the path exists but not with this method", &["method_not_allowed"]),
                "Unavailable": problem("the database is busy or unreachable; retry", &["unavailable"]),
                "Internal": problem("a failure on the server's side, logged there", &["internal"])
            },
            "schemas": schemas()
        }
    });
    add_common_responses(&mut document);
    document
}

fn blob_created(description: &str) -> Value {
    let mut response = json_body(description, "Blob");
    response["headers"] = json!({ "Location": { "description": "`/v1/blobs/{sha256}`", "schema": { "type": "string" } } });
    response
}

fn artifact_headers(partial: bool) -> Value {
    let mut headers = json!({
        "Content-Length": { "schema": { "type": "integer" } },
        "X-Content-Sha256": { "description": "sha256 of the whole file", "schema": { "type": "string" } },
        "ETag": { "description": "the quoted sha256", "schema": { "type": "string" } },
        "Accept-Ranges": { "schema": { "const": "bytes" } },
        "Content-Disposition": { "schema": { "type": "string" } }
    });
    if partial {
        headers["Content-Range"] =
            json!({ "description": "`bytes START-END/SIZE`", "schema": { "type": "string" } });
    }
    headers
}

/// Every operation may also answer 405 (wrong method), 503 (database busy) and 500;
/// every `/v1` resource operation 401 too, when the server has an `api_token`.
fn add_common_responses(document: &mut Value) {
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        let guarded = path.starts_with("/v1/") && path != "/v1/openapi.json";
        for operation in operations.values_mut() {
            if guarded {
                // `{}`: no token needed, for a server that has none.
                operation["security"] = json!([{}, { "bearer": [] }]);
            }
            let responses = operation["responses"]
                .as_object_mut()
                .expect("every operation has responses");
            if guarded {
                responses.insert(
                    "401".into(),
                    json!({ "$ref": "#/components/responses/Unauthorized" }),
                );
            }
            for (status, name) in [
                ("405", "MethodNotAllowed"),
                ("500", "Internal"),
                ("503", "Unavailable"),
            ] {
                responses
                    .entry(status)
                    .or_insert_with(|| json!({ "$ref": format!("#/components/responses/{name}") }));
            }
        }
    }
}

fn schemas() -> Value {
    let sha256 = json!({ "type": "string", "pattern": "^[0-9a-f]{64}$" });
    let nullable_sha256 = json!({ "type": ["string", "null"], "pattern": "^[0-9a-f]{64}$" });
    let timestamp = json!({ "type": "string", "format": "date-time" });
    let nullable_timestamp = json!({ "type": ["string", "null"], "format": "date-time" });
    let nullable_link = json!({ "type": ["string", "null"], "description": "root-relative URL; null until the job succeeded" });
    let mut schemas = Map::new();
    schemas.insert("Problem".into(), json!({
        "type": "object", "required": ["type", "title", "status", "code", "detail"],
        "properties": {
            "type": { "type": "string", "description": "`https://bdscan.dev/problems/{code}`" },
            "title": { "type": "string", "description": "the HTTP status's reason phrase" },
            "status": { "type": "integer" },
            "code": { "type": "string", "description": "stable and machine-readable: branch on this" },
            "detail": { "type": "string", "description": "what went wrong and what to fix" } } }));
    schemas.insert("Blob".into(), json!({
        "type": "object", "required": ["sha256", "size_bytes"],
        "properties": {
            "sha256": sha256,
            "size_bytes": { "type": "integer", "minimum": 1 },
            "created": { "type": "boolean", "description": "upload responses only: false when an identical blob was already stored" } } }));
    schemas.insert(
        "JobState".into(),
        json!({
        "type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"] }),
    );
    schemas.insert("JobRequest".into(), json!({
        "type": "object", "required": ["model", "clean"], "additionalProperties": false,
        "properties": {
            "model": { "description": "sha256 of an uploaded TorchScript model", "type": "string", "pattern": "^[0-9a-fA-F]{64}$" },
            "clean": { "description": "sha256 of an uploaded clean bundle", "type": "string", "pattern": "^[0-9a-fA-F]{64}$" },
            "test": { "description": "sha256 of a clean test bundle", "type": ["string", "null"] },
            "poison": { "description": "sha256 of a triggered bundle with true labels; needs target_label", "type": ["string", "null"] },
            "target_label": { "type": ["integer", "null"], "description": "the attack's target class; needs poison" },
            "config": { "$ref": "#/components/schemas/ScanConfig" },
            "max_attempts": { "type": ["integer", "null"], "minimum": 1, "maximum": 100,
                "description": "runs before a lost lease fails the job (default: the server's)" } } }));
    schemas.insert("ScanConfig".into(), scan_config_schema());
    schemas.insert("Job".into(), json!({
        "type": "object",
        "required": ["id", "state", "progress", "inputs", "config", "device", "attempts", "max_attempts",
                     "cancel_requested", "error", "created_at", "started_at", "finished_at", "timings", "links"],
        "properties": {
            "id": { "type": "string", "format": "uuid" },
            "state": { "$ref": "#/components/schemas/JobState" },
            "progress": { "type": "object", "required": ["phase", "step", "total"], "properties": {
                "phase": { "type": ["string", "null"] },
                "step": { "type": "integer" },
                "total": { "type": "integer" } } },
            "inputs": { "type": "object", "required": ["model", "clean", "test", "poison", "target_label"], "properties": {
                "model": sha256, "clean": sha256, "test": nullable_sha256, "poison": nullable_sha256,
                "target_label": { "type": ["integer", "null"] } } },
            "config": { "type": "object", "description": "the full scan config, defaults filled in" },
            "device": { "type": ["string", "null"], "description": "the device the client asked for; null: any slot" },
            "attempts": { "type": "integer" },
            "max_attempts": { "type": "integer" },
            "cancel_requested": { "type": "boolean" },
            "error": { "type": ["object", "null"], "required": ["code", "message"], "properties": {
                "code": { "type": "string", "description": "e.g. invalid_input, diverged, memory_limit, out_of_memory, timed_out, worker_crashed, lease_expired, cancelled, internal" },
                "message": { "type": "string" } } },
            "created_at": timestamp,
            "started_at": nullable_timestamp,
            "finished_at": nullable_timestamp,
            "timings": { "type": "object", "properties": {
                "queued_ms": { "type": ["integer", "null"] },
                "running_ms": { "type": ["integer", "null"] } } },
            "links": { "type": "object", "required": ["self", "report", "report_html", "artifact"], "properties": {
                "self": { "type": "string" },
                "report": nullable_link, "report_html": nullable_link, "artifact": nullable_link } } } }));
    schemas.insert("JobList".into(), json!({
        "type": "object", "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": { "type": "array", "items": { "$ref": "#/components/schemas/Job" } },
            "next_cursor": { "type": ["string", "null"], "description": "pass as `cursor` for the next page; null on the last" } } }));
    schemas.insert("Report".into(), json!({
        "type": "object",
        "description": "The engine's report (src/engine/report.rs).",
        "required": ["schema_version", "tool", "inputs", "config", "seed", "model", "split", "selection", "layers",
                     "flagged_count", "pruned_neuron_count", "suspect_weight_count", "pruned_weight_count",
                     "metrics", "der", "trace", "artifact", "warnings", "timings_ms"],
        "properties": {
            "schema_version": { "const": 1 },
            "tool": { "type": "object", "properties": { "bdscan_version": { "type": "string" }, "libtorch_version": { "type": "string" } } },
            "inputs": { "type": "object", "description": "sha256, size and shape of the model and bundles; target_label" },
            "config": { "$ref": "#/components/schemas/ScanConfig" },
            "seed": { "type": "integer" },
            "model": { "type": "object" },
            "split": { "type": "object", "description": "the train / held-out split of the clean bundle" },
            "selection": { "type": "object", "description": "every suspect fraction tried and its held-out accuracy" },
            "layers": { "type": "array", "items": { "type": "object",
                "description": "per layer: benign salience, normalised salience, norms before/after of every neuron, flagged and pruned neurons, suspect and pruned weights" } },
            "flagged_count": { "type": "integer" },
            "pruned_neuron_count": { "type": "integer" },
            "suspect_weight_count": { "type": "integer" },
            "pruned_weight_count": { "type": "integer" },
            "metrics": { "type": "object", "properties": {
                "before": { "$ref": "#/components/schemas/Metrics" },
                "after": { "$ref": "#/components/schemas/Metrics" } } },
            "der": { "type": ["number", "null"], "description": "defense effectiveness rating, with a poison bundle" },
            "trace": { "type": "array", "items": { "type": "object" } },
            "artifact": { "type": "object", "properties": {
                "sha256": sha256, "bytes": { "type": "integer" }, "parameters_sha256": sha256 } },
            "warnings": { "type": "array", "items": { "type": "string" } },
            "timings_ms": { "type": "object", "additionalProperties": { "type": "integer" } } } }));
    schemas.insert("Metrics".into(), json!({
        "type": "object", "required": ["clean_acc", "clean_acc_on", "asr", "ra"],
        "properties": {
            "clean_acc": { "type": "number" },
            "clean_acc_on": { "type": "string", "enum": ["test", "held_out"] },
            "asr": { "type": ["number", "null"], "description": "attack success rate, with a poison bundle" },
            "ra": { "type": ["number", "null"], "description": "robust accuracy, with a poison bundle" } } }));
    Value::Object(schemas)
}

/// The scan settings, generated from the defaults so that the document lists exactly the
/// fields the engine accepts, each with its default.
fn scan_config_schema() -> Value {
    let defaults = serde_json::to_value(crate::engine::ScanConfig::default())
        .expect("the scan config serialises");
    let mut properties = Map::new();
    for (key, default) in defaults.as_object().into_iter().flatten() {
        let kind = match default {
            Value::Number(n) if n.is_f64() => json!("number"),
            Value::Number(_) => json!("integer"),
            Value::String(_) => json!("string"),
            Value::Bool(_) => json!("boolean"),
            // A baseline's settings (`ft`, `anp`, …): any subset of the default's fields.
            Value::Object(_) => json!("object"),
            // A list of numbers (`unlearn_radii`).
            Value::Array(_) => json!("array"),
            // `None` by default: an optional count.
            Value::Null => json!(["integer", "null"]),
        };
        let mut schema = json!({ "type": kind, "default": default });
        if default.is_array() {
            schema["items"] = json!({ "type": "number" });
        }
        properties.insert(key.clone(), schema);
    }
    properties.insert("device".into(), json!({ "type": "string", "default": "cpu",
        "description": "`cpu` or `cuda:N`. Named: only a worker slot on that device runs the job (422 device_unavailable when this server's slots have none). Left out: the claiming slot's device." }));
    properties.insert(
        "threads".into(),
        json!({ "type": ["integer", "null"], "minimum": 1,
        "description": "libtorch threads; at most the server's cores (default: cores / slots)" }),
    );
    properties.insert(
        "aggregation".into(),
        json!({ "type": "string", "enum": ["rms", "mean_abs"], "default": "rms" }),
    );
    properties.insert(
        "regularizer".into(),
        json!({ "type": "string", "enum": ["ar", "l1", "l2", "none"], "default": "ar" }),
    );
    json!({
        "type": ["object", "null"], "additionalProperties": false,
        "description": "any subset of the scan settings (the report's `config`, src/engine/config.rs); the rest take their defaults. Unknown keys are refused (422 invalid_config).",
        "properties": properties
    })
}

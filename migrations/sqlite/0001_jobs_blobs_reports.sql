-- Times are Unix milliseconds (BIGINT) and JSON is TEXT so that one set of queries,
-- through sqlx's `Any` driver, serves both SQLite and PostgreSQL.

CREATE TABLE blobs (
    sha256      TEXT PRIMARY KEY,
    size_bytes  BIGINT NOT NULL,
    chunk_count BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- `blob_key` is the blob's sha256 once the upload is complete, `upload:<uuid>` while it streams in.
CREATE TABLE blob_chunks (
    blob_key    TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    byte_offset BIGINT NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (blob_key, seq)
);

CREATE TABLE jobs (
    id                      TEXT PRIMARY KEY,
    state                   TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model_sha256            TEXT NOT NULL REFERENCES blobs (sha256),
    clean_sha256            TEXT NOT NULL REFERENCES blobs (sha256),
    test_sha256             TEXT REFERENCES blobs (sha256),
    poison_sha256           TEXT REFERENCES blobs (sha256),
    target_label            BIGINT,
    config                  TEXT NOT NULL,
    progress_phase          TEXT,
    progress_step           BIGINT NOT NULL DEFAULT 0,
    progress_total          BIGINT NOT NULL DEFAULT 0,
    error_code              TEXT,
    error                   TEXT,
    attempts                BIGINT NOT NULL DEFAULT 0,
    max_attempts            BIGINT NOT NULL,
    cancel_requested        BIGINT NOT NULL DEFAULT 0,
    lease_owner             TEXT,
    lease_until             BIGINT,
    run_after               BIGINT NOT NULL,
    idempotency_key         TEXT UNIQUE,
    idempotency_fingerprint TEXT,
    created_at              BIGINT NOT NULL,
    started_at              BIGINT,
    finished_at             BIGINT
);

CREATE INDEX jobs_claimable ON jobs (state, run_after, created_at);
CREATE INDEX jobs_listing ON jobs (created_at, id);

CREATE TABLE reports (
    job_id          TEXT PRIMARY KEY REFERENCES jobs (id),
    report          TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL REFERENCES blobs (sha256),
    created_at      BIGINT NOT NULL
);

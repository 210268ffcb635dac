-- Freeing a blob asks whether any job or report still names it, and the foreign keys
-- ask the same on every blob deletion: index the referencing columns.
CREATE INDEX jobs_by_model ON jobs (model_sha256);
CREATE INDEX jobs_by_clean ON jobs (clean_sha256);
CREATE INDEX jobs_by_test ON jobs (test_sha256);
CREATE INDEX jobs_by_poison ON jobs (poison_sha256);
CREATE INDEX reports_by_artifact ON reports (artifact_sha256);

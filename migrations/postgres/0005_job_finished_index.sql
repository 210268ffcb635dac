-- The retention sweep deletes finished jobs oldest first (`job_retention_secs`).
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;

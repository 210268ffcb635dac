-- When a job (as an input) or a report (as its artifact) last named the blob. Deleting a
-- job frees a blob it used only if nobody stored it again since: such an upload is a
-- client's, about to be named in a new job.
ALTER TABLE blobs ADD COLUMN named_at BIGINT;

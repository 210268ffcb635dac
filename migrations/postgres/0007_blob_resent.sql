-- 1 while the blob was uploaded again since a job (as an input) or a report (as its
-- artifact) last named it. Deleting a job frees a blob it used only at 0: a re-sent
-- file is a client's, about to be named in a new job.
ALTER TABLE blobs ADD COLUMN resent BIGINT NOT NULL DEFAULT 0;

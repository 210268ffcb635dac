-- The retention sweep looks for unused blobs by when they were last stored.
CREATE INDEX blobs_created_at ON blobs (created_at);

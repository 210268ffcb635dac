-- Range reads look chunks up by offset.
CREATE INDEX blob_chunks_by_offset ON blob_chunks (blob_key, byte_offset);

-- The clock every job timestamp is read from, in milliseconds since the Unix epoch:
-- the database's, so that replicas whose own clocks disagree still agree on when a
-- lease runs out or a backoff ends. One function, so that every statement reads the
-- same clock (and a test can set it apart from the process's).
CREATE FUNCTION bdscan_clock_ms() RETURNS BIGINT LANGUAGE sql STABLE
AS $$ SELECT CAST(FLOOR(EXTRACT(EPOCH FROM now()) * 1000) AS BIGINT) $$;

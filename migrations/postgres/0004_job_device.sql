-- The device a client asked for (`cpu`, `cuda:N`); NULL: any worker slot may run the job.
ALTER TABLE jobs ADD COLUMN device TEXT;

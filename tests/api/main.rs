//! The scanning service over real HTTP on 127.0.0.1, with a real client, against SQLite
//! and (when `BDSCAN_TEST_POSTGRES_URL` or a postgres `DATABASE_URL` is set) PostgreSQL.

mod audit;
mod blobs;
#[path = "../common/mod.rs"]
mod common;
mod devices;
mod helpers;
mod jobs;
mod purge;
mod queue;
mod serve;
mod system;
mod workers;

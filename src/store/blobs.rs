//! Content-addressed blobs, stored as fixed-size chunks in the database.
//!
//! An upload streams into chunks under a staging key while its sha256 is computed; on
//! completion it either becomes the blob named by that hash or, when the hash is
//! already stored, is dropped in favour of the existing copy (deduplication).

use std::path::Path;

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{now_ms, Store, StoreError};

/// Size of every stored chunk but the last.
pub const CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobInfo {
    pub sha256: String,
    pub size_bytes: u64,
    /// False when an identical blob was already stored and this upload was dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
}

/// An upload in progress. Call [`BlobUpload::finish`] or [`BlobUpload::abort`]. One
/// dropped without either (its request's connection closed, so the server dropped the
/// handler mid-upload) removes its staging chunks in a background task; chunks of a
/// process that died mid-upload are what [`Store::sweep_staging`] removes.
pub struct BlobUpload {
    store: Store,
    staging_key: String,
    hasher: Sha256,
    pending: Vec<u8>,
    next_seq: i64,
    stored_bytes: u64,
    /// False once `stop_staging` was called: what arrives is only hashed and counted.
    staging: bool,
    unstaged_bytes: u64,
    /// Finished or aborted: nothing left for `drop` to clean up.
    settled: bool,
}

/// Which unreferenced blobs a delete leaves alone.
#[derive(Clone, Copy)]
enum Spare {
    Nothing,
    /// Those last stored at or after this time (ms).
    StoredSince(i64),
    /// Those uploaded again since a job or report last named them (`resent`).
    Resent,
}

/// The SQL condition that no job names the blob `sha256` (an SQL expression: a
/// parameter or a column) as an input and no report as its artifact: what freeing a
/// blob and finding unused ones both ask.
fn unreferenced(sha256: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM jobs WHERE model_sha256 = {sha256} OR clean_sha256 = {sha256} \
         OR test_sha256 = {sha256} OR poison_sha256 = {sha256}) \
         AND NOT EXISTS (SELECT 1 FROM reports WHERE artifact_sha256 = {sha256})"
    )
}

impl Store {
    pub fn begin_upload(&self) -> BlobUpload {
        BlobUpload {
            store: self.clone(),
            // The start time in the key lets any replica tell an abandoned upload from
            // one still streaming in (`sweep_stale_staging`).
            staging_key: format!("upload:{}:{}", now_ms(), uuid::Uuid::new_v4()),
            hasher: Sha256::new(),
            pending: Vec::with_capacity(CHUNK_BYTES),
            next_seq: 0,
            stored_bytes: 0,
            staging: true,
            unstaged_bytes: 0,
            settled: false,
        }
    }

    /// Stores a file (a purified artifact) as a blob: the regular file at `path`, which an
    /// untrusted process may have written (see [`open_regular_file`]).
    pub async fn put_file(&self, path: &Path) -> Result<BlobInfo, StoreError> {
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::from_std(open_regular_file(path).map_err(io)?);
        let mut upload = self.begin_upload();
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = file.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            if let Err(e) = upload.write(&buf[..n]).await {
                upload.abort().await;
                return Err(e);
            }
        }
        upload.finish().await
    }

    pub async fn blob_info(&self, sha256: &str) -> Result<Option<BlobInfo>, StoreError> {
        let row = sqlx::query("SELECT size_bytes FROM blobs WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| BlobInfo {
            sha256: sha256.to_string(),
            size_bytes: r.get::<i64, _>(0) as u64,
            created: None,
        }))
    }

    /// Bytes `start..end` of a blob, one stored chunk at a time.
    pub fn read_range(
        &self,
        sha256: &str,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        let store = self.clone();
        let key = sha256.to_string();
        futures_util::stream::try_unfold(start, move |position| {
            let store = store.clone();
            let key = key.clone();
            async move {
                if position >= end {
                    return Ok(None);
                }
                let row = sqlx::query(
                    "SELECT byte_offset, data FROM blob_chunks WHERE blob_key = $1 AND byte_offset <= $2 \
                     ORDER BY byte_offset DESC LIMIT 1",
                )
                .bind(&key)
                .bind(position as i64)
                .fetch_optional(store.pool())
                .await?;
                let Some(row) = row else {
                    // Deleted while it was read (a job's DELETE, retention): a race a
                    // download loses, not damage.
                    if store.blob_info(&key).await?.is_none() {
                        return Err(StoreError::BlobNotFound(key.clone()));
                    }
                    return Err(StoreError::Corrupt(
                        key.clone(),
                        format!("no chunk holds byte {position}"),
                    ));
                };
                let offset = row.get::<i64, _>(0) as u64;
                let data: Vec<u8> = row.get(1);
                let from = (position - offset) as usize;
                let to = (end - offset).min(data.len() as u64) as usize;
                if from >= to {
                    return Err(StoreError::Corrupt(
                        key.clone(),
                        format!("chunk at {offset} is short"),
                    ));
                }
                let piece = Bytes::copy_from_slice(&data[from..to]);
                Ok(Some((piece, offset + to as u64)))
            }
        })
    }

    /// Writes a whole blob to `path` (the inputs of a job's child process).
    pub async fn write_blob_to(&self, sha256: &str, path: &Path) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        let info = self
            .blob_info(sha256)
            .await?
            .ok_or_else(|| StoreError::BlobNotFound(sha256.to_string()))?;
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut chunks = std::pin::pin!(self.read_range(sha256, 0, info.size_bytes));
        while let Some(piece) = chunks.try_next().await? {
            file.write_all(&piece).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        Ok(())
    }

    /// Deletes a blob and its chunks if no job names it as an input and no report as its
    /// artifact; returns whether it was deleted. A job created at the same moment wins:
    /// its foreign key makes the deletion fail, and the blob stays.
    pub async fn free_blob_if_unreferenced(&self, sha256: &str) -> Result<bool, StoreError> {
        self.free_blob(sha256, Spare::Nothing).await
    }

    /// [`Store::free_blob_if_unreferenced`], for a blob last stored before `cutoff_ms`
    /// only: the retention sweep's delete, which an upload of the same bytes since (it
    /// refreshes `created_at`) keeps from taking the blob that upload answered with.
    pub async fn free_blob_if_unused_since(
        &self,
        sha256: &str,
        cutoff_ms: i64,
    ) -> Result<bool, StoreError> {
        self.free_blob(sha256, Spare::StoredSince(cutoff_ms)).await
    }

    /// [`Store::free_blob_if_unreferenced`], unless the blob was uploaded again since a
    /// job or report last named it: deleting a job frees its blobs this way, so a client
    /// that has just re-sent a file to name it in a new job (the upload answered
    /// "already stored") does not lose it to the deletion of an old job that used it.
    /// Such a blob is left like any upload not yet used, to its retention.
    pub async fn free_blob_unless_resent(&self, sha256: &str) -> Result<bool, StoreError> {
        self.free_blob(sha256, Spare::Resent).await
    }

    async fn free_blob(&self, sha256: &str, spare: Spare) -> Result<bool, StoreError> {
        let delete = format!(
            "DELETE FROM blobs WHERE sha256 = $1 AND {}",
            unreferenced("$1")
        );
        let sql = match spare {
            Spare::Nothing => delete,
            Spare::StoredSince(_) => format!("{delete} AND created_at < $2"),
            Spare::Resent => format!("{delete} AND resent = 0"),
        };
        let attempt = async {
            let mut tx = self.pool().begin().await?;
            let mut delete = sqlx::query(&sql).bind(sha256);
            if let Spare::StoredSince(cutoff) = spare {
                delete = delete.bind(cutoff);
            }
            let deleted = delete.execute(&mut *tx).await?.rows_affected() == 1;
            if deleted {
                // Chunks belong to exactly one blob (deduplication is per whole blob), so
                // the blob's own chunks are free once its row is gone.
                sqlx::query("DELETE FROM blob_chunks WHERE blob_key = $1")
                    .bind(sha256)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<bool, StoreError>(deleted)
        };
        match attempt.await {
            Err(e) if e.is_foreign_key_violation() => Ok(false),
            other => other,
        }
    }

    /// Up to `limit` blobs stored before `cutoff_ms` that no job or report names,
    /// oldest first: uploads never used, for the retention sweep. Each is freed with
    /// [`Store::free_blob_if_unused_since`], which checks again as it deletes.
    pub async fn unused_blobs_before(
        &self,
        cutoff_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let sql = format!(
            "SELECT sha256 FROM blobs b WHERE created_at < $1 AND {} \
             ORDER BY created_at LIMIT $2",
            unreferenced("b.sha256")
        );
        let rows = sqlx::query(&sql)
            .bind(cutoff_ms)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Bytes the store holds: every stored blob, and the chunks of uploads arriving.
    pub async fn stored_bytes(&self) -> Result<u64, StoreError> {
        // CAST: PostgreSQL sums BIGINTs as NUMERIC, which the `Any` driver cannot read.
        let row = sqlx::query(
            "SELECT CAST(COALESCE((SELECT SUM(size_bytes) FROM blobs), 0) AS BIGINT), \
             CAST(COALESCE((SELECT SUM(LENGTH(data)) FROM blob_chunks \
             WHERE blob_key LIKE 'upload:%'), 0) AS BIGINT)",
        )
        .fetch_one(self.pool())
        .await?;
        let (stored, arriving): (i64, i64) = (row.get(0), row.get(1));
        Ok((stored.max(0) + arriving.max(0)) as u64)
    }

    /// Removes chunks of uploads that started more than `max_age_ms` ago and never
    /// finished: what a process that died mid-upload left behind. Safe while other
    /// replicas upload (PostgreSQL): an upload still arriving after that long loses its
    /// chunks and fails when it finishes, and keys without a start time (written by
    /// earlier versions, which a rolling upgrade may still run) are left alone. Returns
    /// the chunks removed.
    pub async fn sweep_stale_staging(&self, max_age_ms: i64) -> Result<u64, StoreError> {
        let keys: Vec<String> =
            sqlx::query("SELECT DISTINCT blob_key FROM blob_chunks WHERE blob_key LIKE 'upload:%'")
                .fetch_all(self.pool())
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
        let cutoff = now_ms() - max_age_ms;
        let mut removed = 0;
        for key in keys {
            let started = key
                .strip_prefix("upload:")
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(ms, _)| ms.parse::<i64>().ok());
            if started.is_some_and(|ms| ms < cutoff) {
                removed += sqlx::query("DELETE FROM blob_chunks WHERE blob_key = $1")
                    .bind(&key)
                    .execute(self.pool())
                    .await?
                    .rows_affected();
            }
        }
        Ok(removed)
    }

    /// Removes chunks of uploads that never finished (a dropped connection, a crash).
    pub async fn sweep_staging(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM blob_chunks WHERE blob_key LIKE 'upload:%'")
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}

impl BlobUpload {
    pub fn bytes_so_far(&self) -> u64 {
        self.stored_bytes + self.pending.len() as u64 + self.unstaged_bytes
    }

    /// Whether what arrives is still stored (`stop_staging` not called).
    pub fn is_staging(&self) -> bool {
        self.staging
    }

    /// Drops what was staged and only hashes the rest: for an upload past the store's
    /// room, which may still be a file the store holds (see `finish_if_stored`).
    /// On an error nothing changed: `abort` (or drop) still removes what was staged.
    pub async fn stop_staging(&mut self) -> Result<(), StoreError> {
        delete_staging(&self.store, &self.staging_key).await?;
        self.unstaged_bytes = self.bytes_so_far();
        self.staging = false;
        self.pending.clear();
        self.stored_bytes = 0;
        self.next_seq = 0;
        Ok(())
    }

    /// Ends an upload after `stop_staging`: if the store holds a file with this hash,
    /// it counts as stored again now (as `finish` does for a duplicate) and is returned.
    pub async fn finish_if_stored(mut self) -> Result<Option<BlobInfo>, StoreError> {
        self.settled = true;
        let sha256 = hex::encode(self.hasher.clone().finalize());
        let clock = self.store.clock_sql();
        let stored = mark_stored_again(self.store.pool(), &sha256, clock).await?;
        Ok(stored.map(|size_bytes| BlobInfo {
            sha256,
            size_bytes,
            created: Some(false),
        }))
    }

    pub async fn write(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(bytes);
        if !self.staging {
            self.unstaged_bytes += bytes.len() as u64;
            return Ok(());
        }
        while !bytes.is_empty() {
            let room = CHUNK_BYTES - self.pending.len();
            let take = room.min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == CHUNK_BYTES {
                self.flush_chunk().await?;
            }
        }
        Ok(())
    }

    async fn flush_chunk(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let len = self.pending.len() as u64;
        sqlx::query(
            "INSERT INTO blob_chunks (blob_key, seq, byte_offset, data) VALUES ($1, $2, $3, $4)",
        )
        .bind(&self.staging_key)
        .bind(self.next_seq)
        .bind(self.stored_bytes as i64)
        .bind(std::mem::take(&mut self.pending))
        .execute(self.store.pool())
        .await?;
        self.pending.reserve(CHUNK_BYTES);
        self.next_seq += 1;
        self.stored_bytes += len;
        Ok(())
    }

    /// Completes the upload (one still staging; see `finish_if_stored` otherwise); the
    /// result names the stored blob.
    pub async fn finish(mut self) -> Result<BlobInfo, StoreError> {
        debug_assert!(self.staging, "finish after stop_staging");
        self.flush_chunk().await?;
        let size = self.stored_bytes;
        let sha256 = hex::encode(self.hasher.clone().finalize());
        // The database's clock, as for jobs: the retention sweep compares with it.
        let clock = self.store.clock_sql();
        let mut tx = self.store.pool().begin().await?;
        // Write first so the transaction takes the write lock at once (SQLite). The same
        // bytes already stored: they count as stored now, so the retention sweep (which
        // deletes unused blobs by `created_at`) does not take the blob this upload
        // answers with, and as re-sent, so deleting a job that used them does not either
        // (`free_blob_unless_resent`); the update also locks the row against a sweep deleting it now
        // (PostgreSQL). Not stored: insert, and a concurrent upload of the same bytes
        // waits on the primary key; if it got there first, its row is refreshed instead.
        let mut stored = None;
        for _ in 0..3 {
            let refreshed = mark_stored_again(&mut *tx, &sha256, clock).await?.is_some();
            if refreshed {
                stored = Some(false);
                break;
            }
            let inserted = sqlx::query(&format!(
                "INSERT INTO blobs (sha256, size_bytes, chunk_count, created_at) \
                 VALUES ($1, $2, $3, {clock}) ON CONFLICT (sha256) DO NOTHING",
            ))
            .bind(&sha256)
            .bind(size as i64)
            .bind(self.next_seq)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if inserted {
                stored = Some(true);
                break;
            }
        }
        // Deleted and re-stored by others three times over while this ran.
        let Some(inserted) = stored else {
            return Err(StoreError::Contended(
                "the same file was being stored and deleted concurrently; try again".into(),
            ));
        };
        if inserted {
            let moved = sqlx::query("UPDATE blob_chunks SET blob_key = $1 WHERE blob_key = $2")
                .bind(&sha256)
                .bind(&self.staging_key)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // Chunks can go missing (an upload swept as abandoned while it still trickled
            // in): a blob stored without them would sit under the file's true hash and
            // be what every later upload of the same bytes deduplicates to. Dropping the
            // transaction rolls the blob back; the staged chunks go with the upload.
            if moved != self.next_seq as u64 {
                return Err(StoreError::UploadIncomplete(format!(
                    "{moved} of the upload's {} stored chunks are left (an upload still \
                     arriving a day after it started is removed as abandoned); send it again",
                    self.next_seq
                )));
            }
        } else {
            sqlx::query("DELETE FROM blob_chunks WHERE blob_key = $1")
                .bind(&self.staging_key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.settled = true;
        Ok(BlobInfo {
            sha256,
            size_bytes: size,
            created: Some(inserted),
        })
    }

    /// Drops what was stored so far.
    pub async fn abort(mut self) {
        self.settled = true;
        remove_staging(&self.store, &self.staging_key).await;
    }
}

impl Drop for BlobUpload {
    fn drop(&mut self) {
        if self.settled || self.next_seq == 0 {
            return;
        }
        // Outside a runtime (nothing here drops one there) the chunks wait for a sweep.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let key = std::mem::take(&mut self.staging_key);
            runtime.spawn(async move { remove_staging(&store, &key).await });
        }
    }
}

async fn delete_staging(store: &Store, staging_key: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM blob_chunks WHERE blob_key = $1")
        .bind(staging_key)
        .execute(store.pool())
        .await?;
    Ok(())
}

/// [`delete_staging`] where nobody waits for the answer: a failure is logged, and the
/// chunks wait for the sweep of abandoned uploads.
async fn remove_staging(store: &Store, staging_key: &str) {
    if let Err(e) = delete_staging(store, staging_key).await {
        tracing::warn!(key = %staging_key, "could not remove an unfinished upload: {e}");
    }
}

/// Marks the stored blob `sha256`, if there is one, as stored again now by an upload
/// (`created_at`, which the retention sweep reads, and `resent`, which a job's deletion
/// reads); its size, or `None` when no such blob is stored. `clock` is the store's
/// [`Store::clock_sql`].
async fn mark_stored_again<'e, E>(
    executor: E,
    sha256: &str,
    clock: &str,
) -> Result<Option<u64>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query(&format!(
        "UPDATE blobs SET created_at = {clock}, resent = 1 WHERE sha256 = $1 RETURNING size_bytes",
    ))
    .bind(sha256)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|r| r.get::<i64, _>(0) as u64))
}

/// Opens `path` for reading only if it is a regular file itself with no other name: not
/// a symbolic link or a hard link (which a job's process could point at the database,
/// the settings file or another job's files, for the server to store as its output),
/// nor a FIFO or device (which would block or never end). The check is on the opened file, so swapping the path
/// after it cannot fool it.
pub fn open_regular_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    // A hard link to another file of the server's user (its database, say) is a regular
    // file too; a file the process wrote itself has no other name.
    if std::os::unix::fs::MetadataExt::nlink(&metadata) != 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a file with other names (a hard link)",
        ));
    }
    Ok(file)
}

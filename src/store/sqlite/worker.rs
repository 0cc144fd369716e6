//! The threads that own SQLite connections: one writer that commits concurrent jobs together
//! (group commit), and a few readers. Async callers send closures and await the answer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::store::StoreError;

/// The most jobs committed together; bounds the latency one batch adds to its first job.
const MAX_BATCH: usize = 512;

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type WriteJob = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The single writer. Every job runs inside its own savepoint of a shared transaction; the
/// transaction is committed (one fsync) before any job of the batch is answered.
pub struct Writer {
    jobs: Sender<WriteJob>,
    counts: Arc<BatchCounts>,
}

/// How long the checkpointer waits after a checkpoint before the next: frames written
/// meanwhile are copied together, and a page written by many batches is copied once.
const CHECKPOINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// How many batches the writer committed and how many jobs they held (their ratio is the
/// mean batch size: how much group commit is saving).
#[derive(Default)]
pub struct BatchCounts {
    pub batches: AtomicU64,
    pub jobs: AtomicU64,
}

impl Writer {
    /// Starts the writer thread on `connection`, and with `checkpoints` a checkpointer thread
    /// that copies committed WAL frames into the database file beside it.
    ///
    /// Copying the WAL (and fsyncing the database file) on the writer stalls every write
    /// queued behind it; the checkpointer does most of that work in the background. The
    /// writer still checkpoints when the WAL reaches its connection's `wal_autocheckpoint`:
    /// by then little is left to copy, and only a checkpoint made between two of its own
    /// transactions lets SQLite start the WAL over, which bounds its size.
    pub fn start(connection: Connection, checkpoints: Option<Connection>) -> (Writer, JoinHandle<()>) {
        let (jobs, queue) = crossbeam_channel::unbounded::<WriteJob>();
        let counts = Arc::new(BatchCounts::default());
        let loop_counts = counts.clone();
        let (committed, commits) = crossbeam_channel::bounded::<()>(1);
        if let Some(checkpoints) = checkpoints {
            std::thread::Builder::new()
                .name("sqlite-checkpoint".to_owned())
                .spawn(move || {
                    // Ends when the writer does (its sender is dropped).
                    while commits.recv().is_ok() {
                        let result = checkpoints.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                        if let Err(error) = result {
                            tracing::warn!(%error, "background checkpoint failed; the writer will checkpoint");
                        }
                        std::thread::sleep(CHECKPOINT_PAUSE);
                    }
                })
                .expect("the checkpointer thread starts");
        }
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || write_loop(connection, queue, &loop_counts, &committed))
            .expect("the writer thread starts");
        (Writer { jobs, counts }, thread)
    }

    /// The batches committed so far and the jobs in them.
    pub fn counts(&self) -> (u64, u64) {
        (self.counts.batches.load(Ordering::Relaxed), self.counts.jobs.load(Ordering::Relaxed))
    }

    /// Runs `job` in the next batch and answers once that batch is durable. A job that
    /// fails is rolled back alone; its batch-mates still commit.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.run_undoable(move |connection| job(connection).map(|result| (result, true))).await
    }

    /// Like `run`, for a job that can also end by undoing its changes and answering
    /// (`Ok((answer, false))`): its savepoint is rolled back, and `answer` is sent once its
    /// batch is durable.
    pub async fn run_undoable<R: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> Result<(R, bool), StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (answer, answered) = oneshot::channel();
        let job: WriteJob = Box::new(move |connection| {
            let (result, ok) = match job(connection) {
                Ok((result, keep)) => (Ok(result), keep),
                Err(error) => (Err(error), false),
            };
            let reply: Reply = Box::new(move |committed| {
                let _ = answer.send(committed.and(result));
            });
            (ok, reply)
        });
        self.jobs.send(job).map_err(|_| shutting_down())?;
        answered.await.map_err(|_| StoreError::Internal("a write job panicked".to_owned()))?
    }
}

fn write_loop(connection: Connection, queue: Receiver<WriteJob>, counts: &BatchCounts, committed: &Sender<()>) {
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        counts.batches.fetch_add(1, Ordering::Relaxed);
        counts.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let replies = run_batch(&connection, batch);
        let result = run(&connection, "COMMIT");
        if result.is_err() {
            let _ = run(&connection, "ROLLBACK");
        }
        for reply in replies {
            reply(result.clone());
        }
        // Wakes the checkpointer unless it is already due to run.
        let _ = committed.try_send(());
    }
}

fn run_batch(connection: &Connection, batch: Vec<WriteJob>) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(batch.len());
    if let Err(error) = run(connection, "BEGIN IMMEDIATE") {
        // Nothing ran; the jobs are dropped and their callers see the failure.
        tracing::error!(%error, "could not begin a write transaction");
        return replies;
    }
    for job in batch {
        if run(connection, "SAVEPOINT job").is_err() {
            continue;
        }
        match catch_unwind(AssertUnwindSafe(|| job(connection))) {
            Ok((true, reply)) => {
                let _ = run(connection, "RELEASE job");
                replies.push(reply);
            }
            Ok((false, reply)) => {
                let _ = run(connection, "ROLLBACK TO job").and_then(|()| run(connection, "RELEASE job"));
                replies.push(reply);
            }
            Err(_) => {
                // The job's answer channel was dropped with it; its caller sees an error.
                tracing::error!("a write job panicked; its changes were rolled back");
                let _ = run(connection, "ROLLBACK TO job").and_then(|()| run(connection, "RELEASE job"));
            }
        }
    }
    replies
}

/// Runs one statement of the batch protocol from the statement cache (`execute_batch` would
/// parse it again for every job).
fn run(connection: &Connection, sql: &str) -> Result<(), StoreError> {
    connection.prepare_cached(sql).and_then(|mut statement| statement.execute([])).map(drop).map_err(|e| internal(&e))
}

/// Reader threads, each with its own connection, sharing one queue.
pub struct Readers {
    jobs: Sender<ReadJob>,
}

impl Readers {
    /// Starts one thread per connection.
    pub fn start(connections: Vec<Connection>) -> (Readers, Vec<JoinHandle<()>>) {
        let (jobs, queue) = crossbeam_channel::unbounded::<ReadJob>();
        let threads = connections
            .into_iter()
            .enumerate()
            .map(|(n, connection)| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("sqlite-reader-{n}"))
                    .spawn(move || {
                        while let Ok(job) = queue.recv() {
                            let _ = catch_unwind(AssertUnwindSafe(|| job(&connection)));
                        }
                    })
                    .expect("a reader thread starts")
            })
            .collect();
        (Readers { jobs }, threads)
    }

    /// Runs `job` on a reader connection.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        ask(&self.jobs, job).await
    }
}

/// Reads the most frequent request makes, answered in batches by one thread: the reads
/// waiting when the thread looks share one read transaction, whose locks cost more than the
/// reads. Only reads queued before the transaction began join it, so every read sees every
/// write acknowledged before it was asked for.
pub struct BatchedReads {
    jobs: Sender<ReadJob>,
}

/// The most reads answered in one transaction.
const MAX_READ_BATCH: usize = 256;

impl BatchedReads {
    /// Starts the thread on `connection`.
    pub fn start(connection: Connection) -> (BatchedReads, JoinHandle<()>) {
        let (jobs, queue) = crossbeam_channel::unbounded::<ReadJob>();
        let thread = std::thread::Builder::new()
            .name("sqlite-batched-reads".to_owned())
            .spawn(move || {
                let mut batch = Vec::with_capacity(MAX_READ_BATCH);
                while let Ok(first) = queue.recv() {
                    batch.push(first);
                    batch.extend(queue.try_iter().take(MAX_READ_BATCH - 1));
                    // A transaction left open would pin every later read to its snapshot.
                    if !connection.is_autocommit() {
                        let _ = run(&connection, "ROLLBACK");
                    }
                    let began = run(&connection, "BEGIN").is_ok();
                    for job in batch.drain(..) {
                        let _ = catch_unwind(AssertUnwindSafe(|| job(&connection)));
                    }
                    if began && run(&connection, "COMMIT").is_err() {
                        let _ = run(&connection, "ROLLBACK");
                    }
                }
            })
            .expect("the batched-reads thread starts");
        (BatchedReads { jobs }, thread)
    }

    /// Runs `job` in the next batch.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        ask(&self.jobs, job).await
    }
}

/// Queues a read job and awaits its answer.
async fn ask<R: Send + 'static>(
    jobs: &Sender<ReadJob>,
    job: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    let (answer, answered) = oneshot::channel();
    let job: ReadJob = Box::new(move |connection| {
        let _ = answer.send(job(connection));
    });
    jobs.send(job).map_err(|_| shutting_down())?;
    answered.await.map_err(|_| StoreError::Internal("a read job panicked".to_owned()))?
}

fn shutting_down() -> StoreError {
    StoreError::Unavailable("the database is shutting down".to_owned())
}

/// Maps a SQLite error: a locked or busy database is temporary, anything else internal.
pub fn internal(error: &rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match error.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | CannotOpen | SystemIoFailure | DiskFull) => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> (Writer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let connection = Connection::open(dir.path().join("w.db")).unwrap();
        connection.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (n INTEGER PRIMARY KEY)").unwrap();
        (Writer::start(connection, None).0, dir)
    }

    fn insert(n: i64) -> impl FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static {
        move |c| c.execute("INSERT INTO t (n) VALUES (?1)", [n]).map(drop).map_err(|e| internal(&e))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_is_rolled_back_alone_and_its_batch_mates_commit() {
        let (writer, dir) = writer();
        let writer = std::sync::Arc::new(writer);
        // Many concurrent jobs share batches; every tenth one fails after writing a row.
        let jobs: Vec<_> = (0..200)
            .map(|n| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    writer
                        .run(move |c| {
                            insert(n)(c)?;
                            if n % 10 == 0 {
                                return Err(StoreError::Internal("this job fails".to_owned()));
                            }
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        let mut failed = 0;
        for job in jobs {
            if job.await.unwrap().is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 20);
        let check = Connection::open(dir.path().join("w.db")).unwrap();
        let rows: i64 = check.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        let failed_rows: i64 = check.query_row("SELECT count(*) FROM t WHERE n % 10 = 0", [], |r| r.get(0)).unwrap();
        assert_eq!((rows, failed_rows), (180, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_is_an_error_for_its_caller_only() {
        let (writer, dir) = writer();
        let panicked = writer.run(|_| -> Result<(), StoreError> { panic!("boom") }).await;
        assert!(panicked.is_err());
        writer.run(insert(1)).await.unwrap();
        let check = Connection::open(dir.path().join("w.db")).unwrap();
        let rows: i64 = check.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answered_write_is_in_the_database_file() {
        // Acknowledged means committed: a fresh connection (another process would be the
        // same) sees every row whose job was answered, without the writer closing anything.
        let (writer, dir) = writer();
        for n in 0..50 {
            writer.run(insert(n)).await.unwrap();
        }
        let check = Connection::open(dir.path().join("w.db")).unwrap();
        let rows: i64 = check.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 50);
    }

    fn exists(n: i64) -> impl FnOnce(&Connection) -> Result<bool, StoreError> + Send + 'static {
        move |c| c.query_row("SELECT count(*) FROM t WHERE n = ?1", [n], |r| r.get(0)).map_err(|e| internal(&e))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batched_read_sees_every_write_answered_before_it_was_asked() {
        let (writer, dir) = writer();
        let writer = Arc::new(writer);
        let reads = Arc::new(BatchedReads::start(Connection::open(dir.path().join("w.db")).unwrap()).0);
        // Writes and reads interleave from many tasks, so reads share batches (and their
        // snapshot) with reads asked before and after other tasks' writes were answered.
        let tasks: Vec<_> = (0..300)
            .map(|n| {
                let (writer, reads) = (writer.clone(), reads.clone());
                tokio::spawn(async move {
                    writer.run(insert(n)).await.unwrap();
                    reads.run(exists(n)).await.unwrap()
                })
            })
            .collect();
        for (n, task) in tasks.into_iter().enumerate() {
            assert!(task.await.unwrap(), "row {n} was answered as written but a later read missed it");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_read_is_an_error_for_its_caller_only() {
        let (writer, dir) = writer();
        writer.run(insert(7)).await.unwrap();
        let reads = BatchedReads::start(Connection::open(dir.path().join("w.db")).unwrap()).0;
        let panicked = reads.run(|_| -> Result<(), StoreError> { panic!("boom") }).await;
        assert!(panicked.is_err());
        assert!(reads.run(exists(7)).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_the_checkpointer_the_wal_starts_over_and_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let connection = Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 100;
                 CREATE TABLE pages (n INTEGER PRIMARY KEY, filler BLOB)",
            )
            .unwrap();
        let writer = Arc::new(Writer::start(connection, Some(Connection::open(&path).unwrap())).0);
        // About one 4 KiB page per row, 3,000 rows in concurrent batches: without the WAL
        // starting over, its file would grow past 3,000 pages.
        for round in 0..30 {
            let jobs: Vec<_> = (0..100)
                .map(|i| {
                    let writer = writer.clone();
                    tokio::spawn(async move {
                        let row = round * 100 + i;
                        writer
                            .run(move |c| {
                                c.execute("INSERT INTO pages VALUES (?1, zeroblob(3500))", [row])
                                    .map(drop)
                                    .map_err(|e| internal(&e))
                            })
                            .await
                    })
                })
                .collect();
            for job in jobs {
                job.await.unwrap().unwrap();
            }
        }
        let wal_pages = std::fs::metadata(dir.path().join("w.db-wal")).unwrap().len() / 4096;
        assert!(wal_pages < 1_500, "the WAL grew to {wal_pages} pages");
        let rows: i64 =
            Connection::open(&path).unwrap().query_row("SELECT count(*) FROM pages", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 3_000);
    }
}

//! A story's output on its way to the run log: lines are batched and appended with
//! [`run_domain::LogBatch`], so a chatty command costs one short transaction per batch instead
//! of one per line.
//!
//! A batch is written when it reaches [`LogSink::BATCH_LINES`] lines, when its oldest line has
//! waited [`LogSink::BATCH_DELAY`], on [`LogSink::flush`], and when the last handle is dropped.
//!
//! Handles made with [`LogSink::with_prefix`] share one writer: the executor gives every story
//! its own prefix on one writer per run, so that lines and flushes of all its workers go in
//! together (group commit): flushes that arrive while a batch is being written are served by
//! the next one, whatever their number.
//!
//! Each batch gets its id once, before its first try, and is tried again through transient
//! failures (a lock-wait timeout included) for up to [`LogSink::RETRY_BUDGET`] and at least 14
//! times, so a batch survives a server restart and a writer stalled while holding the log, and
//! a try that committed with its answer lost is not written twice.

use run_domain::retry::{Schedule, backoff, retry_when};
use run_domain::run_log::APPEND_TRIES;
use run_domain::{LogBatch, Retryable};
use sea_orm::DatabaseConnection;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

/// How many lines may wait in the channel before writers wait for the database.
const CHANNEL_LINES: usize = 1000;

/// Some lines could not be appended to the run log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{lines} line(s) could not be appended to the log of run {run_id}: {reason}")]
pub struct LogSinkError {
    /// The run.
    pub run_id: Uuid,
    /// How many lines were dropped.
    pub lines: usize,
    /// The last error.
    pub reason: String,
}

enum Message {
    Line(String),
    Flush(oneshot::Sender<Result<(), LogSinkError>>),
}

/// A handle that appends lines to one run's log in batches. Clones share one batch; the
/// background task that writes them ends when the last clone is dropped, after writing what
/// is left.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<Message>,
    prefix: Arc<str>,
    run_id: Uuid,
    /// Lines queued through this handle and its clones (not other prefixes).
    queued: Arc<AtomicU64>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Line(l) => f.debug_tuple("Line").field(l).finish(),
            Message::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl LogSink {
    /// A batch is written once it holds this many lines.
    pub const BATCH_LINES: usize = 100;
    /// At most this many lines go in one transaction when lines queued up while the last batch
    /// was being written.
    pub const MAX_GROUP_LINES: usize = 1000;
    /// A batch is written once its oldest line has waited this long.
    pub const BATCH_DELAY: Duration = Duration::from_millis(200);
    /// How long a batch is tried again through transient database failures before its lines
    /// are reported dropped (by default; see [`LogSink::start_with_retry`]).
    pub const RETRY_BUDGET: Duration = Duration::from_secs(30);

    /// Starts a sink for `run_id`'s log; every line gets `prefix` in front (may be empty).
    /// Must be called within a tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo(db: sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::LogSinkError> {
    /// let log = run_engine::LogSink::start(db, run_id, "[build/compile] ");
    /// log.line("compiling").await;
    /// log.flush().await?;
    /// # Ok(()) }
    /// ```
    pub fn start(db: DatabaseConnection, run_id: Uuid, prefix: impl Into<String>) -> LogSink {
        LogSink::start_with_retry(db, run_id, prefix, Some(LogSink::RETRY_BUDGET))
    }

    /// Like [`LogSink::start`], trying a batch again through transient database failures for up
    /// to `retry` and at least 14 times (`None`: never).
    pub fn start_with_retry(
        db: DatabaseConnection,
        run_id: Uuid,
        prefix: impl Into<String>,
        retry: Option<Duration>,
    ) -> LogSink {
        let (tx, rx) = mpsc::channel(CHANNEL_LINES);
        tokio::spawn(write_batches(db, run_id, rx, retry));
        LogSink {
            tx,
            prefix: Arc::from(prefix.into()),
            run_id,
            queued: Arc::default(),
        }
    }

    /// Another handle on the same writer (and the same batches) whose lines get `prefix`
    /// instead.
    ///
    /// ```no_run
    /// # async fn demo(db: sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::LogSinkError> {
    /// let run_log = run_engine::LogSink::start(db, run_id, "");
    /// let build = run_log.with_prefix("[build] ");
    /// let test = run_log.with_prefix("[test] ");
    /// build.line("compiling").await;
    /// test.line("waiting for build").await;
    /// run_log.flush().await?; // both lines, in one transaction
    /// # Ok(()) }
    /// ```
    pub fn with_prefix(&self, prefix: impl Into<String>) -> LogSink {
        LogSink {
            tx: self.tx.clone(),
            prefix: Arc::from(prefix.into()),
            run_id: self.run_id,
            queued: Arc::default(),
        }
    }

    /// The run whose log this is.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// How many lines were queued through this handle and its clones (a handle made with
    /// [`LogSink::with_prefix`] counts its own): whoever must wait for some lines to be
    /// written, and only if there are any, compares this before and after.
    pub fn lines_queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues one line (the prefix is added). Waits only when the writer is far behind.
    pub async fn line(&self, message: impl AsRef<str>) {
        let line = format!("{}{}", self.prefix, message.as_ref());
        self.queued.fetch_add(1, Ordering::Relaxed);
        // The writer only stops when every handle is gone, and this is one: cannot fail.
        let _ = self.tx.send(Message::Line(line)).await;
    }

    /// Queues one line without waiting, for callers that cannot wait (a `tracing` layer): sent
    /// at once when the writer has room, else by a task of its own (then it may land after
    /// lines queued later).
    pub fn line_now(&self, message: impl AsRef<str>) {
        let line = format!("{}{}", self.prefix, message.as_ref());
        self.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Message::Line(line)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let tx = self.tx.clone();
                    runtime.spawn(async move {
                        let _ = tx.send(message).await;
                    });
                }
            }
        }
    }

    /// Writes every line queued so far, through any handle, and waits until they are in the
    /// database. Reports lines that had to be dropped: once any were, every later flush
    /// reports them (the lines of whoever flushes may have been among them).
    pub async fn flush(&self) -> Result<(), LogSinkError> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Message::Flush(reply)).await.is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}

async fn write_batches(
    db: DatabaseConnection,
    run_id: Uuid,
    mut rx: mpsc::Receiver<Message>,
    retry: Option<Duration>,
) {
    let mut batch: Vec<String> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut dropped: Option<LogSinkError> = None;
    let mut waiting: Vec<oneshot::Sender<Result<(), LogSinkError>>> = Vec::new();
    loop {
        let message = match oldest {
            Some(since) => {
                tokio::select! {
                    m = rx.recv() => m,
                    _ = tokio::time::sleep_until(since + LogSink::BATCH_DELAY) => {
                        write_batch(&db, run_id, &mut batch, &mut dropped, retry).await;
                        oldest = None;
                        continue;
                    }
                }
            }
            None => rx.recv().await,
        };
        let Some(message) = message else {
            write_batch(&db, run_id, &mut batch, &mut dropped, retry).await;
            return;
        };
        // Group commit: take everything that queued up meanwhile (while the last batch was
        // being written) into this batch, and answer every flush among it after one write.
        let mut next = Some(message);
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => {
                    batch.push(line);
                    oldest.get_or_insert_with(Instant::now);
                }
                Message::Flush(reply) => waiting.push(reply),
            }
            if batch.len() < LogSink::MAX_GROUP_LINES {
                next = rx.try_recv().ok();
            }
        }
        if !waiting.is_empty() || batch.len() >= LogSink::BATCH_LINES {
            write_batch(&db, run_id, &mut batch, &mut dropped, retry).await;
            oldest = None;
            // Sticky: once lines were dropped, every later flush reports it, since the lines
            // of whoever flushes next may have been in the batch that failed (group commit).
            let report = dropped.clone().map_or(Ok(()), Err);
            for reply in waiting.drain(..) {
                let _ = reply.send(report.clone());
            }
        }
    }
}

async fn write_batch(
    db: &DatabaseConnection,
    run_id: Uuid,
    batch: &mut Vec<String>,
    dropped: &mut Option<LogSinkError>,
    retry: Option<Duration>,
) {
    if batch.is_empty() {
        return;
    }
    // SAFETY(idempotency): one batch for every try, here and inside the append, so a try that
    // committed but whose answer was lost is found and not written twice.
    let batch = LogBatch::new(run_id, std::mem::take(batch));
    let (result, _) = retry_when(
        &SinkRetry { budget: retry },
        |_| batch.append_once(db),
        |e: &run_domain::LogError| e.is_transient(),
    )
    .await;
    if result.is_ok() {
        metrics::counter!(crate::metrics::LOG_BATCHES).increment(1);
        metrics::counter!(crate::metrics::LOG_LINES)
            .increment(u64::try_from(batch.messages().len()).unwrap_or(u64::MAX));
    }
    if let Err(e) = result {
        let lost = dropped.get_or_insert(LogSinkError {
            run_id,
            lines: 0,
            reason: String::new(),
        });
        lost.lines += batch.messages().len();
        lost.reason = e.to_string();
    }
}

/// How a batch is tried again: for the sink's budget, and at least as often as an append
/// retries on its own ([`APPEND_TRIES`]), so that a try that
/// spent the whole budget waiting for a lock (MariaDB waits 50 s by default) is still tried
/// again. With no budget, never.
struct SinkRetry {
    budget: Option<Duration>,
}

impl Schedule for SinkRetry {
    fn allows(&self, failures: u32, elapsed: Duration) -> bool {
        self.budget
            .is_some_and(|budget| elapsed < budget || failures < APPEND_TRIES)
    }

    fn wait(&self, failures: u32, _elapsed: Duration) -> Duration {
        backoff(failures)
    }
}

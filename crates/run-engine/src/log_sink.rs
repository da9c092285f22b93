//! A story's output on its way to the run log: lines are batched and appended with
//! [`run_domain::append_run_logs_idempotent`], so a chatty command costs one short transaction
//! per batch instead of one per line.
//!
//! A batch is written when it reaches [`LogSink::BATCH_LINES`] lines, when its oldest line has
//! waited [`LogSink::BATCH_DELAY`], on [`LogSink::flush`], and when the last handle is dropped.
//!
//! Each batch gets its id once, before its first try: the append retries transient failures
//! itself, and the sink tries the same batch id again for up to [`LogSink::RETRY_BUDGET`] after
//! that, so a batch survives a server restart, and a try that committed with its answer lost is
//! not written twice.

use crate::retry::retry_transient;
use run_domain::append_run_logs_idempotent;
use sea_orm::DatabaseConnection;
use std::sync::Arc;
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
    /// to `retry` (`None`: only the append's own retries).
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
        }
    }

    /// The run whose log this is.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// Queues one line (the prefix is added). Waits only when the writer is far behind.
    pub async fn line(&self, message: impl AsRef<str>) {
        let line = format!("{}{}", self.prefix, message.as_ref());
        // The writer only stops when every handle is gone, and this is one: cannot fail.
        let _ = self.tx.send(Message::Line(line)).await;
    }

    /// Writes every line queued so far, through any handle, and waits until they are in the
    /// database. Reports lines that had to be dropped since the last flush.
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
        match message {
            None => {
                write_batch(&db, run_id, &mut batch, &mut dropped, retry).await;
                return;
            }
            Some(Message::Line(line)) => {
                batch.push(line);
                oldest.get_or_insert_with(Instant::now);
                if batch.len() >= LogSink::BATCH_LINES {
                    write_batch(&db, run_id, &mut batch, &mut dropped, retry).await;
                    oldest = None;
                }
            }
            Some(Message::Flush(reply)) => {
                write_batch(&db, run_id, &mut batch, &mut dropped, retry).await;
                oldest = None;
                let _ = reply.send(dropped.take().map_or(Ok(()), Err));
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
    let lines = std::mem::take(batch);
    // SAFETY(idempotency): one batch id for every try, here and inside the append, so a try
    // that committed but whose answer was lost is found and not written twice.
    let batch_id = Uuid::new_v4();
    let (result, _) = retry_transient(
        retry,
        || append_run_logs_idempotent(db, run_id, batch_id, &lines),
        |_| {},
    )
    .await;
    if let Err(e) = result {
        let lost = dropped.get_or_insert(LogSinkError {
            run_id,
            lines: 0,
            reason: String::new(),
        });
        lost.lines += lines.len();
        lost.reason = e.to_string();
    }
}

//! The run log: atomic, ordered, append-only lines per run.
//!
//! Each line is a row of `run_log`; an append is one short transaction whatever the size of the
//! log already there. Lines are numbered per run by `seq`, gap-free and in commit order:
//!
//! 1. the appender bumps `run_log_head.last_seq` by the batch's length, which row-locks the
//!    run's head until commit, and takes the numbers it freed;
//! 2. it inserts the batch's lines with those numbers and one timestamp;
//! 3. it commits, releasing the head for the next appender.
//!
//! Since the next appender cannot take numbers before the previous one commits, a follower that
//! has seen line `n` has seen every line before it, and reading `seq > cursor` never skips a line
//! that commits later. (A plain auto-increment id would not do: PostgreSQL hands sequence values
//! out before commit, so rows commit out of id order.) The run row itself is never touched, so
//! an append never changes the run's version nor fails anyone's compare-and-swap on it.
//!
//! Messages are stored as bytes: NUL, control characters and any other byte of a `&str` read back
//! exactly on every backend (PostgreSQL's `text` would reject NUL).

mod append;
mod read;

pub use append::{
    APPEND_TRIES, LogBatch, append_run_log, append_run_logs, append_run_logs_idempotent,
};
use chrono::{DateTime, SecondsFormat, Utc};
use entity::run_log;
pub use read::{read_run_log, read_run_log_after, write_run_log};
use uuid::Uuid;

/// One line of a run's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the run's log, from 1, gap-free.
    pub seq: i64,
    /// The batch it was appended in.
    pub batch_id: Uuid,
    /// Its index within the batch, from 0.
    pub line_no: i32,
    /// The batch's timestamp.
    pub logged_at: DateTime<Utc>,
    /// The message, exactly as appended.
    pub message: String,
}

impl LogEntry {
    /// The line as text: `[<ISO-8601 UTC with ms>] <message>`.
    ///
    /// ```
    /// use run_domain::LogEntry;
    /// let e = LogEntry {
    ///     seq: 1,
    ///     batch_id: uuid::Uuid::nil(),
    ///     line_no: 0,
    ///     logged_at: "2026-11-28T12:00:00.5Z".parse().unwrap(),
    ///     message: "hello".into(),
    /// };
    /// assert_eq!(e.to_line(), "[2026-11-28T12:00:00.500Z] hello");
    /// ```
    pub fn to_line(&self) -> String {
        format!(
            "[{}] {}",
            self.logged_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            self.message
        )
    }

    fn from_model(m: run_log::Model) -> Self {
        LogEntry {
            seq: m.seq,
            batch_id: m.batch_id,
            line_no: m.line_no,
            logged_at: m.logged_at,
            // Only `&str` is ever stored, so this is valid UTF-8 unless something else wrote
            // the row; then show the bytes rather than fail the whole read.
            message: match String::from_utf8(m.message) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            },
        }
    }
}

/// Where a follower is in a run's log: the `seq` of the last line it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogCursor(pub i64);

impl LogCursor {
    /// Before the first line.
    pub const START: LogCursor = LogCursor(0);
}

/// What an append wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendReceipt {
    /// The batch's id.
    pub batch_id: Uuid,
    /// The `seq` of its first line (0 for an empty batch).
    pub first_seq: i64,
    /// The `seq` of its last line (0 for an empty batch).
    pub last_seq: i64,
    /// The batch's timestamp.
    pub logged_at: DateTime<Utc>,
    /// False when the batch id had already been appended and nothing was written again.
    pub written: bool,
}

/// A page of lines after a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    /// The lines, in order.
    pub entries: Vec<LogEntry>,
    /// The cursor to ask from next time (unchanged when `entries` is empty).
    pub next: LogCursor,
}

//! run-engine's domain crate: what executors call to change state safely when many of them run
//! at once, on one machine or many.
//!
//! - [`versioned`]: compare-and-swap updates and deletes ([`VersionedUpdate`]) with typed
//!   conflicts ([`ConcurrencyError`]); the only way this crate changes a versioned row.
//! - [`retry`]: re-read, re-apply, try again, with bounded jittered backoff.
//! - [`lifecycle`]: run, epic and story statuses, their legal transitions, and [`transition`].
//! - [`reopen`]: a failed or cancelled run back to pending, to be executed again ([`reopen_run`]).
//! - [`run_log`]: atomic, ordered, append-only run logs and cursor reads for followers.
//! - [`create`]: new runs, epics and stories, at version 1.
//! - [`schedule`]: retry delays and pausing: when a story may start.
//! - [`limits`]: concurrency limits shared by every process.
//! - [`batch`]: many stories per statement: batched starts and completions.
//! - [`connection`]: [`connect`] with the right defaults per backend.
//! - [`reach`]: probing the server first, and one sentence for why a connection failed ([`describe`]).

#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
compile_error!(
    "run-domain needs at least one backend: the cargo feature sqlite, postgres or mysql"
);

pub mod batch;
pub mod connection;
pub mod create;
pub mod error;
pub mod lifecycle;
pub mod limits;
pub mod needs;
pub mod reach;
pub mod reopen;
pub mod retry;
pub mod run_log;
pub mod schedule;
pub mod versioned;

pub use connection::{
    ConnectError, DEFAULT_DATABASE_URL, SQLITE_BUSY_TIMEOUT, begin_write, connect, is_transient,
    redact_text, redact_url,
};
pub use create::{NewEpic, NewRun, NewStory, create_epic, create_run, create_stories};
pub use error::{ConcurrencyError, CreateError, LimitError, LogError, TransitionError};
pub use lifecycle::{
    EpicStatus, HasStatus, Lifecycle, RunStatus, StoryStatus, UnknownStatus, transition,
    transition_with,
};
pub use limits::{
    LimitUse, check_capacity, check_limit_name, define_limit, find_limit, limit_keys_column,
    limit_keys_of, limits_named, list_limits, set_limit,
};
pub use needs::{
    EpicNeed, StoryNeed, create_needs, let_go, mark_met, satisfy_epic, satisfy_run, satisfy_story,
};
pub use reach::describe;
pub use reopen::{ReopenError, Reopened, reopen_run};
pub use retry::{RetryPolicy, Retryable, retry, update_with_retry};
pub use run_log::{
    AppendReceipt, LogBatch, LogCursor, LogEntry, LogPage, append_run_log, append_run_logs,
    append_run_logs_idempotent, read_run_log, read_run_log_after, write_run_log,
};
pub use schedule::{Backoff, RetryDelay, now_ms, run_not_paused};
pub use versioned::{Changes, Versioned, VersionedUpdate};

#[doc(hidden)]
pub use sea_orm;
#[doc(hidden)]
pub use uuid;

/// The README's examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

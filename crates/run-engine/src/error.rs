//! The executor's error type: what went wrong, and with which run.

use run_domain::{ConcurrencyError, CreateError, LimitError, LogError, Retryable, TransitionError};
use sea_orm::DbErr;
use uuid::Uuid;

/// Why an executor, a cancellation or a status query failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No run has this id.
    #[error("run {0} not found")]
    RunNotFound(Uuid),
    /// The run already finished; it cannot be cancelled any more.
    #[error("run {run_id} already finished with status {status}")]
    RunFinished {
        /// The run.
        run_id: Uuid,
        /// Its terminal status.
        status: String,
    },
    /// A row holds a status this crate does not know (written by something else).
    #[error("{entity} {id} has unknown status {found:?}")]
    UnknownStatus {
        /// Which kind of row.
        entity: &'static str,
        /// The row's id.
        id: Uuid,
        /// The status text found.
        found: String,
    },
    /// A compare-and-swap failed in a way retrying did not fix.
    #[error(transparent)]
    Concurrency(#[from] ConcurrencyError),
    /// A status change failed in a way retrying did not fix.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Appending to or reading the run log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Lines could not be written to the run log even after retrying (the database stayed
    /// unreachable, or kept refusing them): the stories they belong to were given back, not
    /// recorded, and the execution stopped.
    #[error("the run log lost lines, so the execution stopped: {0}")]
    LogLost(crate::log_sink::LogSinkError),
    /// Creating the run from a plan failed.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// Defining, changing or reading a concurrency limit failed.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// No story of the run has this key (`epic.story`).
    #[error("run {run_id} has no story {story}")]
    StoryNotFound {
        /// The run.
        run_id: Uuid,
        /// The key asked for.
        story: String,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    /// A worker task ended abnormally (its code panicked).
    #[error("worker {worker} ended abnormally: {reason}")]
    WorkerAborted {
        /// The worker's id.
        worker: String,
        /// What the runtime said.
        reason: String,
    },
    /// A worker met database errors over and over and stopped.
    #[error("worker {worker} stopped after {failures} consecutive errors; the last: {last}")]
    WorkerGaveUp {
        /// The worker's id.
        worker: String,
        /// How many errors in a row.
        failures: u32,
        /// The last one.
        last: Box<EngineError>,
    },
}

impl EngineError {
    /// True for a database failure worth retrying as is, however deeply wrapped
    /// ([`run_domain::retry::is_transient`]: a dropped or killed connection, a restarting
    /// server, no pooled connection in time, a lock not granted in time, a deadlock victim). A
    /// conflict is not (see [`EngineError::is_conflict`]); a missing run, an unknown status, or
    /// a database error such as a constraint violation is not either: trying again would fail
    /// the same way.
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Concurrency(c) => Retryable::is_transient(c),
            EngineError::Transition(t) => Retryable::is_transient(t),
            EngineError::Log(l) => Retryable::is_transient(l),
            EngineError::Create(CreateError::Database(e))
            | EngineError::Limit(LimitError::Database(e))
            | EngineError::Database(e) => run_domain::retry::is_transient(e),
            EngineError::Limit(LimitError::Concurrency(c)) => Retryable::is_transient(c),
            EngineError::WorkerGaveUp { last, .. } => last.is_transient(),
            _ => false,
        }
    }

    /// True for a version conflict: re-read and try again.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            EngineError::Concurrency(ConcurrencyError::Conflict { .. })
                | EngineError::Transition(TransitionError::Concurrency(
                    ConcurrencyError::Conflict { .. }
                ))
        )
    }

    /// The same as [`EngineError::is_transient`] (its earlier name).
    pub fn is_transient_db(&self) -> bool {
        self.is_transient()
    }
}

impl Retryable for EngineError {
    fn is_conflict(&self) -> bool {
        EngineError::is_conflict(self)
    }

    fn is_transient(&self) -> bool {
        EngineError::is_transient(self)
    }
}

/// The earlier name of [`run_domain::Retryable`], the one trait that says whether an error is
/// worth trying again (a conflict, or a transient database failure).
pub use run_domain::Retryable as TransientDb;

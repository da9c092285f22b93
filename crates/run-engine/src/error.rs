//! The executor's error type: what went wrong, and with which run.

use run_domain::{ConcurrencyError, CreateError, LogError, TransitionError};
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
    /// Creating the run from a plan failed.
    #[error(transparent)]
    Create(#[from] CreateError),
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
    /// True when a fresh attempt could succeed (a version conflict or a database error, as
    /// opposed to a missing run or an unknown status).
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Concurrency(c) => {
                matches!(
                    c,
                    ConcurrencyError::Conflict { .. } | ConcurrencyError::Database(_)
                )
            }
            EngineError::Transition(TransitionError::Concurrency(c)) => {
                matches!(
                    c,
                    ConcurrencyError::Conflict { .. } | ConcurrencyError::Database(_)
                )
            }
            EngineError::Log(LogError::Database(_)) => true,
            EngineError::Create(CreateError::Database(_)) => true,
            EngineError::Database(_) => true,
            _ => false,
        }
    }
}

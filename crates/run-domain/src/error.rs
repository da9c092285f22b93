//! The crate's error types: each carries what a caller needs to act on it.

use sea_orm::DbErr;
use uuid::Uuid;

/// A compare-and-swap update or delete did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ConcurrencyError {
    /// The row exists, but its version is no longer the one the caller read: someone else
    /// changed it first. Re-read and try again (see [`crate::retry`]).
    #[error(
        "{entity} {id} was changed by someone else: expected version {expected}, found {actual}"
    )]
    Conflict {
        /// Which kind of row (`run`, `run_epic`, `run_story`, ...).
        entity: &'static str,
        /// The row's id.
        id: Uuid,
        /// The version the caller read.
        expected: i32,
        /// The row's version now.
        actual: i32,
    },
    /// No row has this id.
    #[error("{entity} {id} not found")]
    NotFound {
        /// Which kind of row.
        entity: &'static str,
        /// The id asked for.
        id: Uuid,
    },
    /// The change names a column that only this crate may set (the id, the version, the
    /// update time, or the status, which changes only through [`crate::transition`]).
    #[error("{entity}.{column} cannot be set directly: {reason}")]
    ReservedColumn {
        /// Which kind of row.
        entity: &'static str,
        /// The column named.
        column: String,
        /// Why it is reserved, and what to use instead.
        reason: &'static str,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] DbErr),
}

impl ConcurrencyError {
    /// True for [`ConcurrencyError::Conflict`]: the only outcome worth retrying after a re-read.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ConcurrencyError::Conflict { .. })
    }
}

/// A status change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    /// The lifecycle does not allow this change; nothing was sent to the database.
    #[error("{entity} {id} cannot go from {from} to {to}")]
    Illegal {
        /// Which kind of row.
        entity: &'static str,
        /// The row's id.
        id: Uuid,
        /// Its status as read.
        from: String,
        /// The status asked for.
        to: String,
    },
    /// The row holds a status this crate does not know (written by something else).
    #[error("{entity} {id} has unknown status {found:?}")]
    UnknownStatus {
        /// Which kind of row.
        entity: &'static str,
        /// The row's id.
        id: Uuid,
        /// The status text found.
        found: String,
    },
    /// A story cannot start yet: some story it needs (directly or through its epic) has not
    /// completed. Nothing was sent to the database.
    #[error("{entity} {id} cannot start yet: a story it needs has not completed")]
    Waiting {
        /// Which kind of row.
        entity: &'static str,
        /// The row's id.
        id: Uuid,
        /// How many of its needs had not completed in the model given (0 when the model said
        /// none but the row in the database disagreed).
        unmet: i32,
    },
    /// A story cannot start now although its version matched: a need has not completed, its
    /// retry delay has not passed, or its run is paused (the conditions the start's statement
    /// carries). Nothing changed.
    #[error(
        "{entity} {id} cannot start now: it waits for a need or its retry delay, or its run is paused"
    )]
    NotReady {
        /// Which kind of row.
        entity: &'static str,
        /// The row's id.
        id: Uuid,
    },
    /// A story cannot start now: every slot of a limit it holds is taken. Nothing changed
    /// (no slot of any of its limits is held).
    #[error("{entity} {id} cannot start now: limit {limit:?} is full")]
    LimitFull {
        /// Which kind of row.
        entity: &'static str,
        /// The row's id.
        id: Uuid,
        /// The limit that was full.
        limit: String,
    },
    /// The compare-and-swap failed (stale version, missing row, database error).
    #[error(transparent)]
    Concurrency(#[from] ConcurrencyError),
}

impl TransitionError {
    /// True when the underlying compare-and-swap met a newer version.
    pub fn is_conflict(&self) -> bool {
        matches!(self, TransitionError::Concurrency(c) if c.is_conflict())
    }
}

/// A run-log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// No run has this id.
    #[error("run {run_id} not found")]
    RunNotFound {
        /// The id asked for.
        run_id: Uuid,
    },
    /// A batch id was appended again with a different batch: another run, another number of
    /// lines, or other bytes in any line (checked against a digest stored with the first try).
    /// Nothing was written.
    #[error("batch {batch_id} was already appended with different content")]
    BatchMismatch {
        /// The batch id.
        batch_id: Uuid,
    },
    /// The database failed; nothing of the batch was written.
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// Creating rows failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The parent row does not exist.
    #[error("{entity} {id} not found")]
    ParentNotFound {
        /// Which kind of parent.
        entity: &'static str,
        /// Its id.
        id: Uuid,
    },
    /// A story names a limit that does not exist ([`crate::define_limit`] it first).
    #[error("limit {name:?} does not exist")]
    LimitNotFound {
        /// The limit's name.
        name: String,
    },
    /// The database refused (for example a duplicate key within a parent).
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// Defining, changing or reading a concurrency limit failed.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The name is not a valid limit name.
    #[error("{name:?} is not a valid limit name: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The capacity is out of range.
    #[error("{capacity} is not a valid capacity: it must be between 0 and 10000")]
    InvalidCapacity {
        /// The capacity given.
        capacity: i64,
    },
    /// No limit has this name.
    #[error("limit {name:?} does not exist")]
    NotFound {
        /// The name given.
        name: String,
    },
    /// The compare-and-swap kept meeting newer versions, or the row vanished.
    #[error(transparent)]
    Concurrency(#[from] ConcurrencyError),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] DbErr),
}

//! Reopening a failed or cancelled run so that it can be executed again (`run-engine retry`).
//!
//! A finished status has no way out in the lifecycles (that is what makes it final for every
//! executor), so reopening is not a [`crate::transition`]: it is one transaction of its own that
//! an operator asks for, refused while anything of the run still executes.
//!
//! In that transaction:
//! 1. the run is read, and refused unless it is failed or cancelled and none of its stories is
//!    running (a cancelled run's workers may still be stopping theirs);
//! 2. the run goes back to pending by compare-and-swap on the version it was read at (a run
//!    changed meanwhile is a [`ConcurrencyError::Conflict`] and nothing is written), its
//!    `retries` counted up, its start, end and error cleared;
//! 3. its failed and cancelled epics go back to pending, `retries` counted up, version moved on;
//! 4. its failed, cancelled and skipped stories go back to pending with no attempt made, no
//!    error, no lease and no retry delay, version moved on; completed stories stay completed
//!    and are not run again;
//! 5. a line `run <key> retried: N stories back to pending` goes into the run log.
//!
//! What a story waits for stays right without being counted again: a need counts down only when
//! what it needs completes, completed stories and epics stay completed, and nothing else
//! changes the counts.
//!
//! The lines that say an epic or a run finished are written once per verdict under batch ids
//! derived from the row's id and its `retries`, so the reopened run, once it finishes again,
//! closes its log again.

use crate::error::ConcurrencyError;
use crate::lifecycle::{EpicStatus, Lifecycle, RunStatus, StoryStatus};
use crate::versioned::{Changes, VersionedUpdate, compare_and_swap};
use chrono::Utc;
use entity::{run, run_epic, run_story};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, QueryFilter,
    TransactionSession, TransactionTrait,
};
use uuid::Uuid;

/// What [`reopen_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reopened {
    /// The run as it is now: pending, its `retries` one more than before.
    pub run: run::Model,
    /// What it was before: failed or cancelled.
    pub was: RunStatus,
    /// Stories that went back to pending (failed, cancelled and skipped ones).
    pub stories: u64,
    /// Epics that went back to pending (failed and cancelled ones).
    pub epics: u64,
}

/// Why a run could not be reopened. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ReopenError {
    /// No run has this id.
    #[error("run {run_id} not found")]
    RunNotFound {
        /// The id asked for.
        run_id: Uuid,
    },
    /// The run is not failed or cancelled.
    #[error("run {run_id} is {status}: {reason}")]
    NotRetryable {
        /// The run.
        run_id: Uuid,
        /// Its status.
        status: String,
        /// Why that status cannot be retried, and what to do instead.
        reason: String,
    },
    /// The run was cancelled but some of its stories still run (their workers stop them within
    /// a third of their lease).
    #[error(
        "run {run_id} is cancelled but {running} of its stories are still running (their workers \
         are stopping them): retry once they have stopped"
    )]
    StillRunning {
        /// The run.
        run_id: Uuid,
        /// Its stories still running.
        running: u64,
    },
    /// The run changed between the read and the write (someone else retried or changed it).
    #[error(transparent)]
    Concurrency(#[from] ConcurrencyError),
    /// The line saying so could not be written to the run log.
    #[error(transparent)]
    Log(#[from] crate::error::LogError),
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[from] DbErr),
}

/// Reopens the failed or cancelled run `run_id` (see the [module](self) for what changes), all
/// or nothing, and writes a line saying so to its log. Refused with a [`ReopenError`] that says
/// why for a run that is pending, running or completed, or that still has running stories.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_domain::ReopenError> {
/// let reopened = run_domain::reopen_run(db, run_id).await?;
/// println!("{} stories back to pending", reopened.stories);
/// # Ok(()) }
/// ```
pub async fn reopen_run<C>(db: &C, run_id: Uuid) -> Result<Reopened, ReopenError>
where
    C: ConnectionTrait + TransactionTrait,
{
    // SQLite: take the write lock at BEGIN, so that no other writer slips in between the
    // checks and the writes.
    let tx = crate::begin_write(db).await?;
    let now = match run::Entity::find_versioned(&tx, run_id).await {
        Ok(run) => run,
        Err(ConcurrencyError::NotFound { .. }) => return Err(ReopenError::RunNotFound { run_id }),
        Err(e) => return Err(e.into()),
    };
    let was = match RunStatus::parse(&now.status) {
        Some(s @ (RunStatus::Failed | RunStatus::Cancelled)) => s,
        other => {
            let reason = match other {
                Some(RunStatus::Completed) => "every story completed: nothing to retry".to_owned(),
                Some(RunStatus::Pending) => {
                    format!("it has not run yet: `run-engine exec {run_id}` executes it")
                }
                Some(RunStatus::Running) => format!(
                    "it cannot be retried while it executes (wait for it to end, or \
                     `run-engine cancel {run_id}` first)"
                ),
                _ => "only a failed or cancelled run can be retried".to_owned(),
            };
            return Err(ReopenError::NotRetryable {
                run_id,
                status: now.status,
                reason,
            });
        }
    };
    // Running stories of a finished run only ever finish, so a count read now can only be
    // too high (a refusal the caller may try again), never too low.
    let running = run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.eq(StoryStatus::Running.as_str()))
        .count(&tx)
        .await?;
    if running > 0 {
        return Err(ReopenError::StillRunning { run_id, running });
    }
    let at = Utc::now();
    let reopened = compare_and_swap::<run::Entity, _>(
        &tx,
        run_id,
        now.version,
        Changes::new()
            .set(run::Column::Status, RunStatus::Pending.as_str())
            .set(run::Column::StartedAt, None::<chrono::DateTime<Utc>>)
            .set(run::Column::FinishedAt, None::<chrono::DateTime<Utc>>)
            .set(run::Column::Error, None::<String>)
            .set_expr(run::Column::Retries, Expr::col(run::Column::Retries).add(1)),
    )
    .await?;
    let epics = run_epic::Entity::update_many()
        .col_expr(
            run_epic::Column::Status,
            Expr::val(EpicStatus::Pending.as_str()),
        )
        .col_expr(
            run_epic::Column::StartedAt,
            Expr::val(None::<chrono::DateTime<Utc>>),
        )
        .col_expr(
            run_epic::Column::FinishedAt,
            Expr::val(None::<chrono::DateTime<Utc>>),
        )
        .col_expr(run_epic::Column::Error, Expr::val(None::<String>))
        .col_expr(
            run_epic::Column::Retries,
            Expr::col(run_epic::Column::Retries).add(1),
        )
        .col_expr(
            run_epic::Column::Version,
            Expr::col(run_epic::Column::Version).add(1),
        )
        .col_expr(run_epic::Column::UpdatedAt, Expr::val(at))
        .filter(run_epic::Column::RunId.eq(run_id))
        .filter(
            run_epic::Column::Status
                .is_in([EpicStatus::Failed.as_str(), EpicStatus::Cancelled.as_str()]),
        )
        .exec(&tx)
        .await?
        .rows_affected;
    let stories = run_story::Entity::update_many()
        .col_expr(
            run_story::Column::Status,
            Expr::val(StoryStatus::Pending.as_str()),
        )
        .col_expr(run_story::Column::Attempts, Expr::val(0))
        .col_expr(run_story::Column::Error, Expr::val(None::<String>))
        .col_expr(
            run_story::Column::StartedAt,
            Expr::val(None::<chrono::DateTime<Utc>>),
        )
        .col_expr(
            run_story::Column::FinishedAt,
            Expr::val(None::<chrono::DateTime<Utc>>),
        )
        .col_expr(run_story::Column::LeaseOwner, Expr::val(None::<String>))
        .col_expr(
            run_story::Column::LeaseExpiresAt,
            Expr::val(None::<chrono::DateTime<Utc>>),
        )
        .col_expr(run_story::Column::NotBeforeMs, Expr::val(None::<i64>))
        .col_expr(
            run_story::Column::Version,
            Expr::col(run_story::Column::Version).add(1),
        )
        .col_expr(run_story::Column::UpdatedAt, Expr::val(at))
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.is_in([
            StoryStatus::Failed.as_str(),
            StoryStatus::Cancelled.as_str(),
            StoryStatus::Skipped.as_str(),
        ]))
        .exec(&tx)
        .await?
        .rows_affected;
    let plural = if stories == 1 { "story" } else { "stories" };
    crate::run_log::append_run_logs(
        &tx,
        run_id,
        [format!(
            "run {} retried (was {was}): {stories} {plural} back to pending",
            reopened.key
        )],
    )
    .await?;
    tx.commit().await?;
    Ok(Reopened {
        run: reopened,
        was,
        stories,
        epics,
    })
}

//! Retention: deleting finished runs with their epics, stories and log lines, in bounded
//! batches (each its own short statement, never one long transaction), while executors work on
//! other runs.
//!
//! Only a run whose status is terminal (completed, failed, cancelled) and that finished before
//! the cutoff is pruned; nothing of a running run is ever touched. For each such run: its log
//! lines go first, a batch of sequence numbers at a time; then its stories, a batch at a time
//! (their needs and limit rows go with them); last the run itself by compare-and-swap on the
//! version read (its epics and log head go with it), so a run changed meanwhile is left alone.

use crate::error::EngineError;
use crate::queries::unfinished;
use chrono::{DateTime, Utc};
use entity::{run, run_epic, run_log, run_log_head, run_story};
use run_domain::{ConcurrencyError, Lifecycle, RunStatus, VersionedUpdate};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use uuid::Uuid;

/// Rows deleted per statement.
pub const PRUNE_BATCH: u64 = 1_000;

/// What [`prune_finished`] removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Runs.
    pub runs: u64,
    /// Their epics.
    pub epics: u64,
    /// Their stories.
    pub stories: u64,
    /// Their log lines.
    pub log_lines: u64,
    /// Nothing was deleted: these are the rows that would be.
    pub dry_run: bool,
}

fn terminal() -> [&'static str; 3] {
    [
        RunStatus::Completed.as_str(),
        RunStatus::Failed.as_str(),
        RunStatus::Cancelled.as_str(),
    ]
}

/// Deletes every run that finished before `cutoff`, with its epics, stories and log lines,
/// in batches of [`PRUNE_BATCH`] rows; with `dry_run`, only counts them.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), run_engine::EngineError> {
/// let month_ago = chrono::Utc::now() - chrono::Duration::days(30);
/// let report = run_engine::prune_finished(db, month_ago, false).await?;
/// println!("{} runs and {} log lines removed", report.runs, report.log_lines);
/// # Ok(()) }
/// ```
pub async fn prune_finished<C>(
    db: &C,
    cutoff: DateTime<Utc>,
    dry_run: bool,
) -> Result<PruneReport, EngineError>
where
    C: ConnectionTrait,
{
    let mut report = PruneReport {
        dry_run,
        ..PruneReport::default()
    };
    // A run pruned by this call is not read again: finished runs only grow older.
    let runs = run::Entity::find()
        .filter(run::Column::Status.is_in(terminal()))
        .filter(run::Column::FinishedAt.lt(cutoff))
        .order_by_asc(run::Column::FinishedAt)
        .all(db)
        .await?;
    for r in runs {
        let epics = run_epic::Entity::find()
            .filter(run_epic::Column::RunId.eq(r.id))
            .count(db)
            .await?;
        let stories = run_story::Entity::find()
            .filter(run_story::Column::RunId.eq(r.id))
            .count(db)
            .await?;
        let lines = run_log::Entity::find()
            .filter(run_log::Column::RunId.eq(r.id))
            .count(db)
            .await?;
        if !dry_run && !prune_run(db, &r).await? {
            continue;
        }
        report.runs += 1;
        report.epics += epics;
        report.stories += stories;
        report.log_lines += lines;
    }
    Ok(report)
}

/// Deletes one finished run in batches; false when it changed meanwhile and was left alone.
async fn prune_run<C: ConnectionTrait>(db: &C, r: &run::Model) -> Result<bool, EngineError> {
    let last_seq = run_log_head::Entity::find_by_id(r.id)
        .one(db)
        .await?
        .map_or(0, |h| h.last_seq);
    let batch = i64::try_from(PRUNE_BATCH).unwrap_or(1_000);
    let mut from = 0i64;
    while from < last_seq {
        // SAFETY(retention): only lines of a run read as finished; a finished run gets no new
        // line (its closing line is its last).
        run_log::Entity::delete_many()
            .filter(run_log::Column::RunId.eq(r.id))
            .filter(run_log::Column::Seq.gt(from))
            .filter(run_log::Column::Seq.lte(from + batch))
            .exec(db)
            .await?;
        from += batch;
    }
    if run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(r.id))
        .filter(unfinished())
        .count(db)
        .await?
        > 0
    {
        // A cancelled run whose last stories are still being stopped: next time.
        return Ok(false);
    }
    loop {
        let ids: Vec<Uuid> = run_story::Entity::find()
            .select_only()
            .column(run_story::Column::Id)
            .filter(run_story::Column::RunId.eq(r.id))
            .limit(PRUNE_BATCH)
            .into_tuple()
            .all(db)
            .await?;
        if ids.is_empty() {
            break;
        }
        run_story::Entity::delete_many()
            .filter(run_story::Column::Id.is_in(ids))
            .exec(db)
            .await?;
    }
    match run::Entity::delete_versioned(db, r.id, r.version).await {
        Ok(()) => Ok(true),
        Err(ConcurrencyError::Conflict { .. } | ConcurrencyError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

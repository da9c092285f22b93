//! Starting and finishing epics and runs as their stories start and finish.
//!
//! An epic starts (pending to running) with its first claimed story and finishes once every
//! story of it is terminal: failed if any story failed, else cancelled if any was cancelled, else
//! completed. A run does the same over its epics. Several workers may race to do either: each
//! re-reads and decides again on a conflict, and one that finds the work already done is
//! content.

use crate::error::EngineError;
use crate::status::StoryCounts;
use entity::{run, run_epic, run_story};
use run_domain::{
    Changes, ConcurrencyError, EpicStatus, Lifecycle, RetryPolicy, RunStatus, StoryStatus,
    TransitionError, VersionedUpdate, retry, transition, transition_with,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use uuid::Uuid;

fn unknown(entity: &'static str, id: Uuid, found: &str) -> TransitionError {
    TransitionError::UnknownStatus {
        entity,
        id,
        found: found.to_owned(),
    }
}

/// What a finished set of stories (or epics) adds up to: failed if any failed, else cancelled
/// if any was cancelled, else completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Completed,
    Failed,
    Cancelled,
}

impl Verdict {
    fn of(failed: u64, cancelled: u64) -> Verdict {
        if failed > 0 {
            Verdict::Failed
        } else if cancelled > 0 {
            Verdict::Cancelled
        } else {
            Verdict::Completed
        }
    }

    fn epic(self) -> EpicStatus {
        match self {
            Verdict::Completed => EpicStatus::Completed,
            Verdict::Failed => EpicStatus::Failed,
            Verdict::Cancelled => EpicStatus::Cancelled,
        }
    }

    fn run(self) -> RunStatus {
        match self {
            Verdict::Completed => RunStatus::Completed,
            Verdict::Failed => RunStatus::Failed,
            Verdict::Cancelled => RunStatus::Cancelled,
        }
    }
}

/// Moves the epic to running if it is still pending; returns it as it is now.
pub async fn start_epic<C>(db: &C, epic_id: Uuid) -> Result<run_epic::Model, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let result = retry(&policy, |_| async {
        let epic = run_epic::Entity::find_versioned(db, epic_id).await?;
        if epic.status != EpicStatus::Pending.as_str() {
            return Ok(epic);
        }
        transition::<run_epic::Entity, _>(db, &epic, EpicStatus::Running).await
    })
    .await;
    match result {
        Ok(epic) => Ok(epic),
        // Someone moved it on between the read and the change: fine, report what it is.
        Err(TransitionError::Illegal { .. }) => {
            Ok(run_epic::Entity::find_versioned(db, epic_id).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Moves the run to running if it is still pending; returns it as it is now (a caller that
/// finds it cancelled should not start work).
pub async fn start_run<C>(db: &C, run_id: Uuid) -> Result<run::Model, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let result = retry(&policy, |_| async {
        let run = run::Entity::find_versioned(db, run_id).await?;
        if run.status != RunStatus::Pending.as_str() {
            return Ok(run);
        }
        transition::<run::Entity, _>(db, &run, RunStatus::Running).await
    })
    .await;
    match result {
        Ok(run) => Ok(run),
        Err(TransitionError::Illegal { .. }) => Ok(run::Entity::find_versioned(db, run_id).await?),
        Err(TransitionError::Concurrency(ConcurrencyError::NotFound { .. })) => {
            Err(EngineError::RunNotFound(run_id))
        }
        Err(e) => Err(e.into()),
    }
}

/// Finishes the epic if every story of it is terminal and it is not finished yet. Returns the
/// epic when this call finished it, `None` when there was nothing to do (stories left, or
/// someone else finished it).
pub async fn finish_epic_if_done<C>(
    db: &C,
    epic_id: Uuid,
) -> Result<Option<run_epic::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let result = retry(&policy, |_| async {
        let epic = run_epic::Entity::find_versioned(db, epic_id).await?;
        let status = EpicStatus::parse(&epic.status)
            .ok_or_else(|| unknown("run_epic", epic.id, &epic.status))?;
        if status.is_terminal() {
            return Ok(None);
        }
        // SAFETY(visibility): read after the caller's story transition committed, in a
        // statement of its own, so of two workers finishing the last two stories at least
        // the later one sees both terminal (every backend reads committed rows per statement
        // outside a transaction).
        let counts = StoryCounts::of_epic(db, epic_id)
            .await
            .map_err(ConcurrencyError::Database)?;
        if counts.unfinished() > 0 {
            return Ok(None);
        }
        let verdict = Verdict::of(counts.failed, counts.cancelled);
        let changes = if verdict == Verdict::Failed {
            Changes::new().set(
                run_epic::Column::Error,
                Some(format!(
                    "{} of {} stories failed",
                    counts.failed,
                    counts.total()
                )),
            )
        } else {
            Changes::new()
        };
        transition_with::<run_epic::Entity, _>(db, &epic, verdict.epic(), changes)
            .await
            .map(Some)
    })
    .await;
    match result {
        Ok(done) => Ok(done),
        Err(TransitionError::Illegal { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether a story of the epic is still pending or running: one look through the
/// `(epic_id, status)` index, however many stories the epic has, so that the worker that
/// finishes each story can ask it cheaply.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, epic_id: uuid::Uuid) -> Result<(), sea_orm::DbErr> {
/// if !run_engine::epic_has_unfinished(db, epic_id).await? {
///     println!("every story of the epic is finished");
/// }
/// # Ok(()) }
/// ```
pub async fn epic_has_unfinished<C: ConnectionTrait>(db: &C, epic_id: Uuid) -> Result<bool, DbErr> {
    let one = run_story::Entity::find()
        .select_only()
        .column(run_story::Column::Id)
        .filter(run_story::Column::EpicId.eq(epic_id))
        .filter(
            run_story::Column::Status
                .is_in([StoryStatus::Pending.as_str(), StoryStatus::Running.as_str()]),
        )
        .limit(1)
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// Finishes the run if every epic of it is terminal and it is not finished yet (a cancelled
/// run is already finished). Returns the run when this call finished it.
pub async fn finish_run_if_done<C>(db: &C, run_id: Uuid) -> Result<Option<run::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let result = retry(&policy, |_| async {
        let run = run::Entity::find_versioned(db, run_id).await?;
        let status =
            RunStatus::parse(&run.status).ok_or_else(|| unknown("run", run.id, &run.status))?;
        if status.is_terminal() {
            return Ok(None);
        }
        let epics = run_epic::Entity::find()
            .filter(run_epic::Column::RunId.eq(run_id))
            .all(db)
            .await
            .map_err(ConcurrencyError::Database)?;
        let mut failed = 0u64;
        let mut cancelled = 0u64;
        for epic in &epics {
            match EpicStatus::parse(&epic.status) {
                Some(EpicStatus::Failed) => failed += 1,
                Some(EpicStatus::Cancelled) => cancelled += 1,
                Some(EpicStatus::Completed) => {}
                _ => return Ok(None),
            }
        }
        let verdict = Verdict::of(failed, cancelled);
        let changes = if verdict == Verdict::Failed {
            let counts = StoryCounts::of_run(db, run_id)
                .await
                .map_err(ConcurrencyError::Database)?;
            Changes::new().set(
                run::Column::Error,
                Some(format!(
                    "{} of {} stories failed",
                    counts.failed,
                    counts.total()
                )),
            )
        } else {
            Changes::new()
        };
        transition_with::<run::Entity, _>(db, &run, verdict.run(), changes)
            .await
            .map(Some)
    })
    .await;
    match result {
        Ok(done) => Ok(done),
        Err(TransitionError::Illegal { .. }) => Ok(None),
        Err(TransitionError::Concurrency(ConcurrencyError::NotFound { .. })) => {
            Err(EngineError::RunNotFound(run_id))
        }
        Err(e) => Err(e.into()),
    }
}

/// Finishes every epic of the run whose stories are all terminal, then the run if its epics
/// all are; returns the run as it is now. Safe to call any time, from anywhere: it only
/// finishes what is done (a worker that died between its last story and the epic leaves work
/// for this).
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let run = run_engine::settle_run(db, run_id).await?;
/// println!("run is {}", run.status);
/// # Ok(()) }
/// ```
pub async fn settle_run<C>(db: &C, run_id: Uuid) -> Result<run::Model, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let epics = run_epic::Entity::find()
        .filter(run_epic::Column::RunId.eq(run_id))
        .order_by_asc(run_epic::Column::Position)
        .all(db)
        .await?;
    for epic in epics {
        let terminal = EpicStatus::parse(&epic.status).is_some_and(|s| s.is_terminal());
        if !terminal {
            finish_epic_if_done(db, epic.id).await?;
        }
    }
    finish_run_if_done(db, run_id).await?;
    run::Entity::find_versioned(db, run_id)
        .await
        .map_err(|e| match e {
            ConcurrencyError::NotFound { .. } => EngineError::RunNotFound(run_id),
            e => e.into(),
        })
}

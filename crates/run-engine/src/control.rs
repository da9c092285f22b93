//! Pausing and resuming a run, and cancelling one story: what `run-engine pause`, `resume` and
//! `cancel --story` do, for every process working on the run.
//!
//! - **Pause** sets `run.paused_at` by compare-and-swap. Every statement that starts a story
//!   carries "its run is not paused" ([`run_domain::run_not_paused`]), so once the pause has
//!   committed no story of the run starts in any process, whatever that process has seen;
//!   running stories finish. Executors notice within half a second and stop trying.
//! - **Resume** clears it; idle workers notice within half a second.
//! - **Cancel one story**: a pending story is cancelled at once; a running one is cancelled in
//!   the database, which fences its worker off (its next renewal conflicts, within a third of
//!   its lease) and stops its handler; its limit slots come back with the cancellation. Either
//!   way the stories that need it are skipped.

use crate::cancel::transition_while;
use crate::error::EngineError;
use crate::finish::settle_run;
use crate::skip::skip_dependents;
use chrono::{DateTime, Utc};
use entity::{run, run_epic, run_story};
use run_domain::{
    Changes, ConcurrencyError, Lifecycle, RetryPolicy, RunStatus, StoryStatus, VersionedUpdate,
    retry,
};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait};
use uuid::Uuid;

/// What [`pause_run`] or [`resume_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseReport {
    /// The run as it is now.
    pub run: run::Model,
    /// False when it already was as asked (paused, or not paused).
    pub changed: bool,
}

/// Pauses the run: no story of it starts, in any process, until [`resume_run`]; running
/// stories finish. Pausing a paused run changes nothing; a finished run is refused with
/// [`EngineError::RunFinished`].
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let report = run_engine::pause_run(db, run_id).await?;
/// assert!(report.run.paused_at.is_some());
/// run_engine::resume_run(db, run_id).await?;
/// # Ok(()) }
/// ```
pub async fn pause_run<C>(db: &C, run_id: Uuid) -> Result<PauseReport, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    set_paused(db, run_id, Some(Utc::now())).await
}

/// Resumes a paused run: its stories may start again. Resuming a run that is not paused
/// changes nothing; a finished run is refused with [`EngineError::RunFinished`].
pub async fn resume_run<C>(db: &C, run_id: Uuid) -> Result<PauseReport, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    set_paused(db, run_id, None).await
}

async fn set_paused<C>(
    db: &C,
    run_id: Uuid,
    paused_at: Option<DateTime<Utc>>,
) -> Result<PauseReport, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let outcome = retry(&policy, |_| async {
        let now = run::Entity::find_versioned(db, run_id).await?;
        let finished = RunStatus::parse(&now.status).is_some_and(|s| s.is_terminal());
        if finished || now.paused_at.is_some() == paused_at.is_some() {
            return Ok((now, false));
        }
        run::Entity::update_versioned(
            db,
            run_id,
            now.version,
            Changes::new().set(run::Column::PausedAt, paused_at),
        )
        .await
        .map(|r| (r, true))
    })
    .await;
    let (run, changed) = match outcome {
        Ok(v) => v,
        Err(ConcurrencyError::NotFound { .. }) => return Err(EngineError::RunNotFound(run_id)),
        Err(e) => return Err(e.into()),
    };
    if !changed && RunStatus::parse(&run.status).is_some_and(|s| s.is_terminal()) {
        return Err(EngineError::RunFinished {
            run_id,
            status: run.status,
        });
    }
    Ok(PauseReport { run, changed })
}

/// What [`cancel_story`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelStoryReport {
    /// The story as it is now.
    pub story: run_story::Model,
    /// Its status before: pending or running when this call cancelled it; a finished status
    /// when it had already finished (then nothing changed).
    pub was: String,
    /// The stories skipped because they need it (directly or not), by this call.
    pub skipped: Vec<run_story::Model>,
}

impl CancelStoryReport {
    /// True when this call cancelled the story.
    pub fn cancelled(&self) -> bool {
        self.story.status == StoryStatus::Cancelled.as_str() && self.was != self.story.status
    }
}

/// Cancels story `name` (`epic.story`) of the run: pending or running, it becomes cancelled,
/// and the stories that need it are skipped. A running story's worker is fenced off at its
/// next renewal and stops it. A story that already finished is left as it is.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let report = run_engine::cancel_story(db, run_id, "test.unit").await?;
/// println!("{} was {}; {} skipped", report.story.key, report.was, report.skipped.len());
/// # Ok(()) }
/// ```
pub async fn cancel_story<C>(
    db: &C,
    run_id: Uuid,
    name: &str,
) -> Result<CancelStoryReport, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let story = find_story(db, run_id, name).await?;
    let was = story.status.clone();
    let moved = transition_while(
        db,
        story.clone(),
        |current| {
            current.status == StoryStatus::Pending.as_str()
                || current.status == StoryStatus::Running.as_str()
        },
        StoryStatus::Cancelled,
        || {
            Changes::new()
                .set(run_story::Column::LeaseExpiresAt, None::<DateTime<Utc>>)
                .set(
                    run_story::Column::Error,
                    Some("cancelled by `run-engine cancel --story`".to_owned()),
                )
        },
    )
    .await?;
    let Some(cancelled) = moved else {
        let now = run_story::Entity::find_by_id(story.id)
            .one(db)
            .await?
            .unwrap_or(story);
        return Ok(CancelStoryReport {
            was: now.status.clone(),
            story: now,
            skipped: Vec::new(),
        });
    };
    let was_running = was == StoryStatus::Running.as_str();
    run_domain::append_run_log(
        db,
        run_id,
        &format!("[{name}] cancelled (run-engine cancel --story)"),
    )
    .await?;
    let skipped = skip_dependents(db, vec![cancelled.clone()]).await?;
    // A running story's worker may still be writing its output: the executors finish its
    // epic once it has stopped. A pending one had no worker: finish what is done now.
    if !was_running {
        settle_run(db, run_id).await?;
    }
    Ok(CancelStoryReport {
        story: cancelled,
        was,
        skipped,
    })
}

/// Story `name` of the run: `epic.story`, split at the first `.` from the left that names an
/// epic of the run and a story of it.
async fn find_story<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    name: &str,
) -> Result<run_story::Model, EngineError> {
    if run::Entity::find_by_id(run_id).one(db).await?.is_none() {
        return Err(EngineError::RunNotFound(run_id));
    }
    let epics = run_epic::Entity::find()
        .filter(run_epic::Column::RunId.eq(run_id))
        .all(db)
        .await?;
    for (i, _) in name.match_indices('.') {
        let (epic_key, story_key) = (&name[..i], &name[i + 1..]);
        let Some(epic) = epics.iter().find(|e| e.key == epic_key) else {
            continue;
        };
        if let Some(story) = run_story::Entity::find()
            .filter(run_story::Column::EpicId.eq(epic.id))
            .filter(run_story::Column::Key.eq(story_key))
            .one(db)
            .await?
        {
            return Ok(story);
        }
    }
    Err(EngineError::StoryNotFound {
        run_id,
        story: name.to_owned(),
    })
}

//! Failure propagation: when a story ends without completing (failed for good, cancelled, or
//! skipped itself), every pending story that needs it, directly or through its epic, and
//! transitively, is skipped, with an error naming what it waited on (`needs build.compile,
//! which failed`). Stories that do not depend on it run on.
//!
//! Each skip is a compare-and-swap from pending, so any number of processes may propagate the
//! same failure at once: each story is skipped once. A process that dies half-way leaves the
//! rest to [`skip_blocked`], which any idle executor runs when a run has stories waiting and
//! nothing running.

use crate::cancel::transition_while;
use crate::error::EngineError;
use entity::{run_epic, run_epic_need, run_story, run_story_need};
use run_domain::{Changes, Lifecycle, StoryStatus};
use sea_orm::sea_query::{Query, SimpleExpr};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait};
use std::collections::{HashMap, HashSet, VecDeque};
use uuid::Uuid;

/// What a story that ended without completing did, as its dependents' errors say it.
fn what_happened(status: &str) -> &'static str {
    match StoryStatus::parse(status) {
        Some(StoryStatus::Failed) => "failed",
        Some(StoryStatus::Cancelled) => "was cancelled",
        Some(StoryStatus::Skipped) => "was skipped",
        _ => "did not complete",
    }
}

/// True for the statuses whose dependents can never start.
pub fn blocks_dependents(status: &str) -> bool {
    matches!(
        StoryStatus::parse(status),
        Some(StoryStatus::Failed | StoryStatus::Cancelled | StoryStatus::Skipped)
    )
}

/// Skips every pending story that needs one of `roots` (stories that failed for good, were
/// cancelled or were skipped), directly or through its epic, and then every pending story that
/// needs one of those, and so on. Returns the stories this call skipped, in the order it
/// skipped them.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, failed: entity::run_story::Model) -> Result<(), run_engine::EngineError> {
/// for story in run_engine::skip_dependents(db, vec![failed]).await? {
///     println!("{} skipped: {}", story.key, story.error.unwrap_or_default());
/// }
/// # Ok(()) }
/// ```
pub async fn skip_dependents<C>(
    db: &C,
    roots: Vec<run_story::Model>,
) -> Result<Vec<run_story::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let Some(run_id) = roots.first().map(|r| r.run_id) else {
        return Ok(Vec::new());
    };
    let epics: HashMap<Uuid, run_epic::Model> = run_epic::Entity::find()
        .filter(run_epic::Column::RunId.eq(run_id))
        .all(db)
        .await?
        .into_iter()
        .map(|e| (e.id, e))
        .collect();
    let epic_key = |id: Uuid| epics.get(&id).map_or("?", |e| e.key.as_str()).to_owned();
    let mut queue: VecDeque<run_story::Model> = roots
        .into_iter()
        .filter(|r| blocks_dependents(&r.status))
        .collect();
    let mut epics_done: HashSet<Uuid> = HashSet::new();
    let mut skipped = Vec::new();
    while let Some(story) = queue.pop_front() {
        let name = format!("{}.{}", epic_key(story.epic_id), story.key);
        let what = what_happened(&story.status);
        let mut waiting: Vec<(run_story::Model, String)> = Vec::new();
        if story.needed_by > 0 {
            let direct = Query::select()
                .column(run_story_need::Column::StoryId)
                .from(run_story_need::Entity)
                .and_where(run_story_need::Column::NeedsStoryId.eq(story.id))
                .to_owned();
            let error = format!("needs {name}, which {what}");
            for d in pending_where(db, run_story::Column::Id.in_subquery(direct)).await? {
                waiting.push((d, error.clone()));
            }
        }
        let epic_needed = epics.get(&story.epic_id).is_some_and(|e| e.needed_by > 0);
        if epic_needed && epics_done.insert(story.epic_id) {
            let through_epic = Query::select()
                .column(run_epic_need::Column::EpicId)
                .from(run_epic_need::Entity)
                .and_where(run_epic_need::Column::NeedsEpicId.eq(story.epic_id))
                .to_owned();
            let error = format!("needs {}, where {name} {what}", epic_key(story.epic_id));
            for d in pending_where(db, run_story::Column::EpicId.in_subquery(through_epic)).await? {
                waiting.push((d, error.clone()));
            }
        }
        for (dependent, error) in waiting {
            if let Some(done) = skip_one(db, dependent, error).await? {
                skipped.push(done.clone());
                queue.push_back(done);
            }
        }
    }
    Ok(skipped)
}

/// Skips what a process that died half-way through [`skip_dependents`] left waiting: the
/// dependents of every story of the run that failed, was cancelled or was skipped. Costs a look
/// per such story; executors run it only when a run has stories waiting and none running.
pub async fn skip_blocked<C>(db: &C, run_id: Uuid) -> Result<Vec<run_story::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let roots = run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.is_in([
            StoryStatus::Failed.as_str(),
            StoryStatus::Cancelled.as_str(),
            StoryStatus::Skipped.as_str(),
        ]))
        .all(db)
        .await?;
    skip_dependents(db, roots).await
}

async fn pending_where<C: ConnectionTrait>(
    db: &C,
    which: SimpleExpr,
) -> Result<Vec<run_story::Model>, EngineError> {
    Ok(run_story::Entity::find()
        .filter(which)
        .filter(run_story::Column::Status.eq(StoryStatus::Pending.as_str()))
        .all(db)
        .await?)
}

/// Skips `story` if it is still pending (re-reading on a conflict); `None` when someone else
/// moved it on first.
async fn skip_one<C>(
    db: &C,
    story: run_story::Model,
    error: String,
) -> Result<Option<run_story::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    transition_while(
        db,
        story,
        |current| current.status == StoryStatus::Pending.as_str(),
        StoryStatus::Skipped,
        || Changes::new().set(run_story::Column::Error, Some(error.clone())),
    )
    .await
}

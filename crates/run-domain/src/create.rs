//! Creating runs, epics and stories. Every new row starts at version 1 and its lifecycle's
//! initial status; from then on it changes only by compare-and-swap.

use crate::error::CreateError;
use crate::lifecycle::{EpicStatus, Lifecycle, RunStatus, StoryStatus};
use chrono::Utc;
use entity::{run, run_epic, run_limit, run_log_head, run_story, run_story_limit};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionSession,
    TransactionTrait,
};
use std::collections::HashMap;
use uuid::Uuid;

/// A run to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    /// Caller's key (for example the plan's name).
    pub key: String,
    /// Human title.
    pub title: String,
    /// Cancel the rest of the run when a story fails for good.
    pub fail_fast: bool,
}

/// An epic to create within a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEpic {
    /// Key, unique within the run.
    pub key: String,
    /// Human title.
    pub title: String,
    /// Position within the run.
    pub position: i32,
}

/// A story to create within an epic. Fields other than the key, title and position have
/// defaults (`..Default::default()`): no command, one attempt, no timeout, no retry delay,
/// priority 0, no limits, no environment, directory or payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewStory {
    /// Key, unique within the epic.
    pub key: String,
    /// Human title.
    pub title: String,
    /// Position within the epic.
    pub position: i32,
    /// Command (or other payload) its handler runs.
    pub command: Option<String>,
    /// Most attempts allowed (at least 1).
    pub max_attempts: i32,
    /// How long one attempt may run (none: unbounded); stored in milliseconds.
    pub timeout: Option<std::time::Duration>,
    /// How long to wait after a failed attempt before the next (none: at once).
    pub retry_delay: Option<crate::RetryDelay>,
    /// Higher is claimed first among ready stories.
    pub priority: i32,
    /// The names of the limits it holds while it runs (each must exist: [`crate::define_limit`]).
    pub limits: Vec<String>,
    /// Environment variables for its command (stored as a JSON object; none when empty).
    pub env: std::collections::BTreeMap<String, String>,
    /// The directory its command runs in (none: the executor's).
    pub dir: Option<String>,
    /// Free-form input for its handler, stored as JSON text as given.
    pub payload: Option<serde_json::Value>,
}

/// Creates a run (status pending, version 1) and its empty log.
///
/// ```no_run
/// use run_domain::{NewRun, create_run};
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), run_domain::CreateError> {
/// let run = create_run(db, NewRun {
///     key: "nightly".into(),
///     title: "Nightly build".into(),
///     fail_fast: false,
/// }).await?;
/// assert_eq!(run.version, 1);
/// # Ok(()) }
/// ```
pub async fn create_run<C>(db: &C, new: NewRun) -> Result<run::Model, CreateError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let now = Utc::now();
    let id = Uuid::new_v4();
    let tx = db.begin().await?;
    run::Entity::insert(run::ActiveModel {
        id: Set(id),
        key: Set(new.key),
        title: Set(new.title),
        status: Set(RunStatus::INITIAL.as_str().to_owned()),
        version: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
        started_at: Set(None),
        finished_at: Set(None),
        error: Set(None),
        fail_fast: Set(new.fail_fast),
        paused_at: Set(None),
        retries: Set(0),
    })
    .exec_without_returning(&tx)
    .await?;
    run_log_head::Entity::insert(run_log_head::ActiveModel {
        run_id: Set(id),
        last_seq: Set(0),
    })
    .exec_without_returning(&tx)
    .await?;
    let created = run::Entity::find_by_id(id).one(&tx).await?;
    tx.commit().await?;
    created.ok_or(CreateError::ParentNotFound { entity: "run", id })
}

/// Creates an epic of `run_id` (status pending, version 1).
pub async fn create_epic<C>(
    db: &C,
    run_id: Uuid,
    new: NewEpic,
) -> Result<run_epic::Model, CreateError>
where
    C: ConnectionTrait + TransactionTrait,
{
    if run::Entity::find_by_id(run_id).one(db).await?.is_none() {
        return Err(CreateError::ParentNotFound {
            entity: "run",
            id: run_id,
        });
    }
    let now = Utc::now();
    let id = Uuid::new_v4();
    run_epic::Entity::insert(run_epic::ActiveModel {
        id: Set(id),
        run_id: Set(run_id),
        key: Set(new.key),
        title: Set(new.title),
        position: Set(new.position),
        status: Set(EpicStatus::INITIAL.as_str().to_owned()),
        version: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
        started_at: Set(None),
        finished_at: Set(None),
        error: Set(None),
        needed_by: Set(0),
        retries: Set(0),
    })
    .exec_without_returning(db)
    .await?;
    run_epic::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or(CreateError::ParentNotFound {
            entity: "run_epic",
            id,
        })
}

/// Creates `stories` in `epic` (status pending, version 1), all or none, in chunks that stay
/// within every backend's limit on bound parameters. Returns their ids in order.
pub async fn create_stories<C>(
    db: &C,
    epic: &run_epic::Model,
    stories: Vec<NewStory>,
) -> Result<Vec<Uuid>, CreateError>
where
    C: ConnectionTrait + TransactionTrait,
{
    const CHUNK: usize = 500;
    let now = Utc::now();
    let limit_ids = resolve_limits(db, &stories).await?;
    let tx = db.begin().await?;
    let mut ids = Vec::with_capacity(stories.len());
    let mut rows = Vec::with_capacity(CHUNK);
    let mut holds = Vec::new();
    for story in stories {
        let id = Uuid::new_v4();
        ids.push(id);
        let limit_keys = crate::limits::limit_keys_column(&story.limits);
        for key in crate::limits::limit_keys_of(limit_keys.as_deref()) {
            if let Some(&limit_id) = limit_ids.get(&key) {
                holds.push(run_story_limit::ActiveModel {
                    story_id: Set(id),
                    limit_id: Set(limit_id),
                });
            }
        }
        rows.push(run_story::ActiveModel {
            id: Set(id),
            run_id: Set(epic.run_id),
            epic_id: Set(epic.id),
            key: Set(story.key),
            title: Set(story.title),
            position: Set(story.position),
            status: Set(StoryStatus::INITIAL.as_str().to_owned()),
            attempts: Set(0),
            created_at: Set(now),
            updated_at: Set(now),
            started_at: Set(None),
            finished_at: Set(None),
            error: Set(None),
            version: Set(1),
            command: Set(story.command),
            max_attempts: Set(story.max_attempts.max(1)),
            lease_owner: Set(None),
            lease_expires_at: Set(None),
            unmet_needs: Set(0),
            needed_by: Set(0),
            waits_on_stories: Set(false),
            timeout_ms: Set(story
                .timeout
                .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX).max(1))),
            not_before_ms: Set(None),
            retry_delay: Set(story.retry_delay.map(|r| r.to_column())),
            priority: Set(story.priority),
            limit_keys: Set(limit_keys),
            env: Set((!story.env.is_empty())
                .then(|| serde_json::to_string(&story.env).unwrap_or_default())),
            work_dir: Set(story.dir),
            payload: Set(story.payload.map(|p| p.to_string())),
        });
        if rows.len() == CHUNK {
            run_story::Entity::insert_many(std::mem::take(&mut rows))
                .exec_without_returning(&tx)
                .await?;
        }
    }
    if !rows.is_empty() {
        run_story::Entity::insert_many(rows)
            .exec_without_returning(&tx)
            .await?;
    }
    for chunk in holds.chunks(CHUNK) {
        run_story_limit::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(&tx)
            .await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// The ids of the limits `stories` name, by name; a name that is no limit is an error.
async fn resolve_limits<C: ConnectionTrait>(
    db: &C,
    stories: &[NewStory],
) -> Result<HashMap<String, Uuid>, CreateError> {
    let mut names: Vec<&str> = stories
        .iter()
        .flat_map(|s| s.limits.iter().map(String::as_str))
        .collect();
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    names.sort_unstable();
    names.dedup();
    let found: HashMap<String, Uuid> = run_limit::Entity::find()
        .filter(run_limit::Column::Name.is_in(names.iter().copied()))
        .all(db)
        .await?
        .into_iter()
        .map(|l| (l.name, l.id))
        .collect();
    match names.iter().find(|n| !found.contains_key(**n)) {
        Some(missing) => Err(CreateError::LimitNotFound {
            name: (*missing).to_owned(),
        }),
        None => Ok(found),
    }
}

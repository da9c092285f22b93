//! What the engine asks of the database, each question written once: story counts, the
//! candidates a worker may claim, expired leases, and whether stories are left unfinished.
//! (Writes live beside their rules: claims and releases in [`crate::lease`], epic and run
//! completion in [`crate::finish`], cancellation in [`crate::cancel`].)

use crate::error::EngineError;
use crate::lease::lease_expired;
use chrono::{DateTime, Utc};
use entity::{run_limit, run_limit_slot, run_story, run_story_limit};
use run_domain::{Lifecycle, StoryStatus};
use sea_orm::sea_query::SimpleExpr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Serialize;
use uuid::Uuid;

/// The filter "the story is pending or running": not finished yet.
pub(crate) fn unfinished() -> SimpleExpr {
    run_story::Column::Status.is_in([StoryStatus::Pending.as_str(), StoryStatus::Running.as_str()])
}

/// How many stories are in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoryCounts {
    /// Waiting to be claimed.
    pub pending: u64,
    /// Held by a worker.
    pub running: u64,
    /// Succeeded.
    pub completed: u64,
    /// Failed their last attempt.
    pub failed: u64,
    /// Cancelled with their run.
    pub cancelled: u64,
    /// Never started: a story they need failed, was cancelled or was skipped.
    pub skipped: u64,
    /// In a status this crate does not know (counted as unfinished).
    pub unknown: u64,
}

impl StoryCounts {
    /// Every story.
    pub fn total(&self) -> u64 {
        self.pending + self.running + self.finished() + self.unknown
    }

    /// Stories in a terminal status.
    pub fn finished(&self) -> u64 {
        self.completed + self.failed + self.cancelled + self.skipped
    }

    /// Stories not in a terminal status.
    pub fn unfinished(&self) -> u64 {
        self.total() - self.finished()
    }

    /// Finished stories as a percentage of all (100 for none).
    pub fn percent(&self) -> u64 {
        match self.total() {
            0 => 100,
            total => self.finished() * 100 / total,
        }
    }

    pub(crate) fn add(&mut self, status: &str, n: u64) {
        match StoryStatus::parse(status) {
            Some(StoryStatus::Pending) => self.pending += n,
            Some(StoryStatus::Running) => self.running += n,
            Some(StoryStatus::Completed) => self.completed += n,
            Some(StoryStatus::Failed) => self.failed += n,
            Some(StoryStatus::Cancelled) => self.cancelled += n,
            Some(StoryStatus::Skipped) => self.skipped += n,
            None => self.unknown += n,
        }
    }

    pub(crate) fn of_stories<'a>(
        stories: impl IntoIterator<Item = &'a run_story::Model>,
    ) -> StoryCounts {
        let mut counts = StoryCounts::default();
        for s in stories {
            counts.add(&s.status, 1);
        }
        counts
    }

    /// Counts the stories of a run, in one grouped query.
    pub async fn of_run<C: ConnectionTrait>(db: &C, run_id: Uuid) -> Result<StoryCounts, DbErr> {
        Self::grouped(db, run_story::Column::RunId.eq(run_id)).await
    }

    /// Counts the stories of an epic, in one grouped query.
    pub async fn of_epic<C: ConnectionTrait>(db: &C, epic_id: Uuid) -> Result<StoryCounts, DbErr> {
        Self::grouped(db, run_story::Column::EpicId.eq(epic_id)).await
    }

    async fn grouped<C: ConnectionTrait>(
        db: &C,
        filter: sea_orm::sea_query::SimpleExpr,
    ) -> Result<StoryCounts, DbErr> {
        use sea_orm::sea_query::{Expr, ExprTrait};
        let rows: Vec<(String, i64)> = run_story::Entity::find()
            .select_only()
            .column(run_story::Column::Status)
            .column_as(Expr::col(run_story::Column::Id).count(), "n")
            .filter(filter)
            .group_by(run_story::Column::Status)
            .into_tuple()
            .all(db)
            .await?;
        let mut counts = StoryCounts::default();
        for (status, n) in rows {
            counts.add(&status, u64::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }
}

/// Up to `limit` pending stories of `run_id` that may start now: their needs all completed,
/// their retry delay (if any) passed, and no limit they hold full; highest priority first,
/// then in position order. One look through the `(run_id, status, unmet_needs, priority DESC,
/// position, id)` index, in its order, reading only about the rows it returns, however many
/// stories still wait.
pub async fn pending_candidates<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    limit: u64,
) -> Result<Vec<run_story::Model>, EngineError> {
    Ok(run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.eq(StoryStatus::Pending.as_str()))
        .filter(run_story::Column::UnmetNeeds.eq(0))
        .filter(run_domain::schedule::delay_passed(run_domain::now_ms()))
        .filter(no_full_limit())
        .order_by_desc(run_story::Column::Priority)
        .order_by_asc(run_story::Column::Position)
        .order_by_asc(run_story::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// "No limit the story holds is full": a probe of `run_story_limit`'s key per row (so a story
/// without limits costs one index miss), and for each limit it holds, one probe for a free
/// slot below its capacity.
fn no_full_limit() -> SimpleExpr {
    use sea_orm::sea_query::{Expr, ExprTrait, Query};
    let free_slot = Query::select()
        .expr(Expr::val(1))
        .from(run_limit_slot::Entity)
        .and_where(
            Expr::col((run_limit_slot::Entity, run_limit_slot::Column::LimitId))
                .equals((run_story_limit::Entity, run_story_limit::Column::LimitId)),
        )
        .and_where(Expr::col((run_limit_slot::Entity, run_limit_slot::Column::StoryId)).is_null())
        .and_where(
            Expr::col((run_limit_slot::Entity, run_limit_slot::Column::SlotNo))
                .lt(Expr::col((run_limit::Entity, run_limit::Column::Capacity))),
        )
        .to_owned();
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(run_story_limit::Entity)
            .inner_join(
                run_limit::Entity,
                Expr::col((run_limit::Entity, run_limit::Column::Id))
                    .equals((run_story_limit::Entity, run_story_limit::Column::LimitId)),
            )
            .and_where(
                Expr::col((run_story_limit::Entity, run_story_limit::Column::StoryId))
                    .equals((run_story::Entity, run_story::Column::Id)),
            )
            .and_where(Expr::exists(free_slot).not())
            .to_owned(),
    )
    .not()
}

/// The earliest time (Unix milliseconds) after `now_ms` at which a pending story of `run_id`
/// whose needs have completed comes out of its retry delay: when an idle worker should look
/// again, rather than poll.
pub async fn next_retry_at<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    now_ms: i64,
) -> Result<Option<i64>, DbErr> {
    use sea_orm::sea_query::{Expr, ExprTrait};
    let next: Option<Option<i64>> = run_story::Entity::find()
        .select_only()
        .column_as(Expr::col(run_story::Column::NotBeforeMs).min(), "next")
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.eq(StoryStatus::Pending.as_str()))
        .filter(run_story::Column::UnmetNeeds.eq(0))
        .filter(run_story::Column::NotBeforeMs.gt(now_ms))
        .into_tuple()
        .one(db)
        .await?;
    Ok(next.flatten())
}

/// Up to `limit` running stories of `run_id` whose lease ran out before `now`.
///
/// The expiry is compared here rather than in SQL, so that each backend's way of storing a
/// timestamp does not matter; running stories are few (about one per live worker).
pub async fn expired_leases<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    now: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<run_story::Model>, EngineError> {
    let running = run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.eq(StoryStatus::Running.as_str()))
        .order_by_asc(run_story::Column::LeaseExpiresAt)
        .all(db)
        .await?;
    Ok(running
        .into_iter()
        .filter(|s| lease_expired(s, now))
        .take(limit)
        .collect())
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
        .filter(unfinished())
        .limit(1)
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// Whether some story of the run is in `status`: one look through the `(run_id, status)` index.
pub async fn run_has_story_in<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    status: StoryStatus,
) -> Result<bool, DbErr> {
    let one = run_story::Entity::find()
        .select_only()
        .column(run_story::Column::Id)
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.eq(status.as_str()))
        .limit(1)
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// Whether some story of the run holds a limit: one look at the run's stories (`limit_keys` is
/// fixed at creation, so the answer holds for the run's life).
pub async fn run_has_limited_stories<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
) -> Result<bool, DbErr> {
    let one = run_story::Entity::find()
        .select_only()
        .column(run_story::Column::Id)
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::LimitKeys.is_not_null())
        .limit(1)
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// Whether any story of the run is still pending or running.
pub async fn run_has_unfinished<C: ConnectionTrait>(db: &C, run_id: Uuid) -> Result<bool, DbErr> {
    let n = run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(unfinished())
        .count(db)
        .await?;
    Ok(n > 0)
}

/// The stories of the run that are still pending or running.
pub async fn unfinished_stories<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
) -> Result<Vec<run_story::Model>, DbErr> {
    run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(unfinished())
        .all(db)
        .await
}

/// The stories that completing `story` (and, when given, its epic) made claimable: pending,
/// with no unmet need left, among those that need it. Read after the completion committed, so
/// a worker can hand them to its own process's workers without waiting for the next poll.
pub async fn unblocked_by<C: ConnectionTrait>(
    db: &C,
    story_id: Uuid,
    epic_id: Option<Uuid>,
) -> Result<Vec<run_story::Model>, DbErr> {
    use entity::{run_epic_need, run_story_need};
    use sea_orm::sea_query::{Condition, Query};
    let direct = Query::select()
        .column(run_story_need::Column::StoryId)
        .from(run_story_need::Entity)
        .and_where(run_story_need::Column::NeedsStoryId.eq(story_id))
        .to_owned();
    let mut which = Condition::any().add(run_story::Column::Id.in_subquery(direct));
    if let Some(epic_id) = epic_id {
        let through_epic = Query::select()
            .column(run_epic_need::Column::EpicId)
            .from(run_epic_need::Entity)
            .and_where(run_epic_need::Column::NeedsEpicId.eq(epic_id))
            .to_owned();
        which = which.add(run_story::Column::EpicId.in_subquery(through_epic));
    }
    run_story::Entity::find()
        .filter(which)
        .filter(run_story::Column::Status.eq(StoryStatus::Pending.as_str()))
        .filter(run_story::Column::UnmetNeeds.eq(0))
        .all(db)
        .await
}

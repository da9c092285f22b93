//! Needs: which stories must complete before a story may start.
//!
//! A story needs other stories directly (`run_story_need`, one row per need) and, through its
//! epic, every story of the epics its epic needs (`run_epic_need`, one row per epic-level need,
//! however many stories either epic has). Each story counts the needs that have not completed yet
//! in `unmet_needs`, set when the needs are created; [`crate::transition`] refuses to start a
//! story whose count is above 0 ([`crate::TransitionError::Waiting`]), so the rule holds on every
//! claim path, the reference executor's or a sibling's.
//!
//! The counts go down in exactly one place each, inside the transaction that makes a need
//! complete: [`satisfy_story`] with the story's move to completed, [`satisfy_epic`] with the
//! epic's. A compare-and-swap succeeds once, so each need is counted down once, whatever the
//! interleaving of workers, retries and lost answers; a transaction that does not commit counts
//! nothing down. Every count-down moves the story's version on, so a model read before it can
//! no longer be written from.

use crate::error::CreateError;
use chrono::Utc;
use entity::{run_epic, run_epic_need, run_story, run_story_need};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query, SimpleExpr, SubQueryStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter,
    TransactionSession, TransactionTrait,
};
use uuid::Uuid;

/// Story `story` needs story `needs` (both of the same run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoryNeed {
    /// The story that waits.
    pub story: Uuid,
    /// The story it waits for.
    pub needs: Uuid,
}

/// Every story of epic `epic` needs every story of epic `needs` (both of the same run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpicNeed {
    /// The epic that waits.
    pub epic: Uuid,
    /// The epic it waits for.
    pub needs: Uuid,
}

/// Rows per INSERT: three parameters each, well within every backend's limit.
const CHUNK: usize = 1000;

/// Stores the needs of `run_id`'s stories and epics and counts each story's unmet needs, all or
/// none. Call it in the transaction that created the stories (as the plan's creation does), so
/// that no executor sees a story before its needs: a story stored without them is claimable.
/// The needs must form no cycle (the plan's validation checks; a story on a cycle would wait
/// forever).
///
/// ```no_run
/// use run_domain::{StoryNeed, create_needs};
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid, build: uuid::Uuid, test: uuid::Uuid) -> Result<(), run_domain::CreateError> {
/// // `test` starts once `build` has completed.
/// create_needs(db, run_id, &[StoryNeed { story: test, needs: build }], &[]).await?;
/// # Ok(()) }
/// ```
pub async fn create_needs<C>(
    db: &C,
    run_id: Uuid,
    story_needs: &[StoryNeed],
    epic_needs: &[EpicNeed],
) -> Result<(), CreateError>
where
    C: ConnectionTrait + TransactionTrait,
{
    if story_needs.is_empty() && epic_needs.is_empty() {
        return Ok(());
    }
    let tx = db.begin().await?;
    for chunk in story_needs.chunks(CHUNK) {
        run_story_need::Entity::insert_many(chunk.iter().map(|n| run_story_need::ActiveModel {
            run_id: Set(run_id),
            story_id: Set(n.story),
            needs_story_id: Set(n.needs),
        }))
        .exec_without_returning(&tx)
        .await?;
    }
    for chunk in epic_needs.chunks(CHUNK) {
        run_epic_need::Entity::insert_many(chunk.iter().map(|n| run_epic_need::ActiveModel {
            run_id: Set(run_id),
            epic_id: Set(n.epic),
            needs_epic_id: Set(n.needs),
        }))
        .exec_without_returning(&tx)
        .await?;
    }
    // The counts, from the rows just stored: one statement per table, each row's count read
    // through an index (the primary keys start with the waiting side; the `_needs` indexes
    // with the needed side).
    let story = Alias::new("run_story");
    let count = |table: &str, column: &str, outer: SimpleExpr| -> SimpleExpr {
        SimpleExpr::SubQuery(
            None,
            Box::new(SubQueryStatement::SelectStatement(
                Query::select()
                    .expr(Expr::cust("COUNT(*)"))
                    .from(Alias::new(table))
                    .and_where(Expr::col((Alias::new(table), Alias::new(column))).eq(outer))
                    .to_owned(),
            )),
        )
    };
    let story_id = || Expr::col((story.clone(), Alias::new("id")));
    let epic_id = || Expr::col((story.clone(), Alias::new("epic_id")));
    let update = Query::update()
        .table(story.clone())
        .value(
            run_story::Column::UnmetNeeds,
            count("run_story_need", "story_id", story_id()).add(count(
                "run_epic_need",
                "epic_id",
                epic_id(),
            )),
        )
        .value(
            run_story::Column::NeededBy,
            count("run_story_need", "needs_story_id", story_id()),
        )
        .and_where(Expr::col((story.clone(), Alias::new("run_id"))).eq(run_id))
        .to_owned();
    tx.execute(&update).await?;
    let epic = Alias::new("run_epic");
    let update = Query::update()
        .table(epic.clone())
        .value(
            run_epic::Column::NeededBy,
            count(
                "run_epic_need",
                "needs_epic_id",
                Expr::col((epic.clone(), Alias::new("id"))),
            ),
        )
        .and_where(Expr::col((epic, Alias::new("run_id"))).eq(run_id))
        .to_owned();
    tx.execute(&update).await?;
    tx.commit().await?;
    Ok(())
}

/// Counts down the stories that need `story_id` directly: call it in the transaction that
/// moves that story to completed, and only there. Returns how many stories it counted down.
pub async fn satisfy_story<C: ConnectionTrait>(db: &C, story_id: Uuid) -> Result<u64, DbErr> {
    let waiting = Query::select()
        .column(run_story_need::Column::StoryId)
        .from(run_story_need::Entity)
        .and_where(run_story_need::Column::NeedsStoryId.eq(story_id))
        .to_owned();
    count_down(db, run_story::Column::Id.in_subquery(waiting)).await
}

/// Counts down every story of the epics that need `epic_id`: call it in the transaction that
/// moves that epic to completed, and only there. Returns how many stories it counted down.
pub async fn satisfy_epic<C: ConnectionTrait>(db: &C, epic_id: Uuid) -> Result<u64, DbErr> {
    let waiting = Query::select()
        .column(run_epic_need::Column::EpicId)
        .from(run_epic_need::Entity)
        .and_where(run_epic_need::Column::NeedsEpicId.eq(epic_id))
        .to_owned();
    count_down(db, run_story::Column::EpicId.in_subquery(waiting)).await
}

async fn count_down<C: ConnectionTrait>(db: &C, which: SimpleExpr) -> Result<u64, DbErr> {
    let result = run_story::Entity::update_many()
        .col_expr(
            run_story::Column::UnmetNeeds,
            Expr::col(run_story::Column::UnmetNeeds).sub(1),
        )
        .col_expr(
            run_story::Column::Version,
            Expr::col(run_story::Column::Version).add(1),
        )
        .col_expr(run_story::Column::UpdatedAt, Expr::val(Utc::now()))
        .filter(which)
        .filter(run_story::Column::UnmetNeeds.gt(0))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

//! Needs: which stories must complete before a story may start.
//!
//! A story needs other stories directly (`run_story_need`, one row per need) and, through its
//! epic, every story of the epics its epic needs (`run_epic_need`, one row per epic-level need,
//! however many stories either epic has). Each story counts what it still waits for in
//! `unmet_needs`: one per needed epic that has not completed, plus one while
//! `waits_on_stories` (some row of `run_story_need` for it is not `met`). [`crate::transition`]
//! refuses to start a story whose count is above 0 ([`crate::TransitionError::Waiting`]), and
//! the start's compare-and-swap carries `unmet_needs = 0`, so the rule holds on every claim path,
//! the reference executor's or a sibling's.
//!
//! The count goes down in two ways, each at most once per need:
//! - **An epic need**: [`satisfy_epic`], inside the transaction that moves the needed epic to
//!   completed (a compare-and-swap succeeds once, and a transaction that does not commit counts
//!   nothing down).
//! - **Story needs**: [`satisfy_story`], any time after the needed story's completion
//!   committed, by anyone, any number of times: it marks the rows met (only if that story is
//!   completed), then clears `waits_on_stories` (and counts one down) for each story that needs
//!   it and has no unmet row left, in a statement of its own. Of two needs completing at once,
//!   the later to mark sees both marks, so no story is left waiting; the flag is cleared once.
//!   No row is written by more than one completion, so a story needed by 10,000 others, or
//!   needing 10,000, is no hot spot. A process that dies before calling it leaves the work to
//!   [`satisfy_run`], which idle executors call.
//!
//! Every count-down moves the story's version on, so a model read before it can no longer be
//! written from.

use crate::error::CreateError;
use crate::lifecycle::{Lifecycle, StoryStatus};
use chrono::Utc;
use entity::{run_epic, run_epic_need, run_story, run_story_need};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query, SimpleExpr, SubQueryStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter,
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

/// Rows per INSERT: four parameters each, well within every backend's limit.
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
            met: Set(false),
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
    // The counts, from the rows just stored: each row's count read through an index (the
    // primary keys start with the waiting side; the `_needs` indexes with the needed side).
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
    let has_story_needs = SimpleExpr::SubQuery(
        Some(sea_orm::sea_query::SubQueryOper::Exists),
        Box::new(SubQueryStatement::SelectStatement(
            Query::select()
                .expr(Expr::val(1))
                .from(run_story_need::Entity)
                .and_where(
                    Expr::col((run_story_need::Entity, run_story_need::Column::StoryId))
                        .eq(story_id()),
                )
                .to_owned(),
        )),
    );
    let update = Query::update()
        .table(story.clone())
        .value(run_story::Column::WaitsOnStories, has_story_needs)
        .value(
            run_story::Column::NeededBy,
            count("run_story_need", "needs_story_id", story_id()),
        )
        .and_where(Expr::col((story.clone(), Alias::new("run_id"))).eq(run_id))
        .to_owned();
    tx.execute(&update).await?;
    let update = Query::update()
        .table(story.clone())
        .value(
            run_story::Column::UnmetNeeds,
            count("run_epic_need", "epic_id", epic_id())
                .add(Expr::cust("CASE WHEN waits_on_stories THEN 1 ELSE 0 END")),
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

/// Marks the needs on `story_id` met, if that story is completed, and counts down every story
/// that needs it and has no unmet story need left. Safe to call by anyone, any time, any number
/// of times (it changes nothing before the story completed); call it after the completion
/// committed (or [`mark_met`] inside that transaction and [`let_go`] after it). Returns how
/// many stories it counted down (those may now be claimable).
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, completed: uuid::Uuid) -> Result<(), sea_orm::DbErr> {
/// if run_domain::satisfy_story(db, completed).await? > 0 {
///     println!("some stories that needed it may start now");
/// }
/// # Ok(()) }
/// ```
pub async fn satisfy_story<C: ConnectionTrait>(db: &C, story_id: Uuid) -> Result<u64, DbErr> {
    mark_met(db, story_id).await?;
    Ok(let_go(db, story_id).await?.len() as u64)
}

/// Marks the rows of the stories that need `story_id` met, if that story is completed (its
/// half of [`satisfy_story`]; run it in the transaction that completes the story, then
/// [`let_go`] after the commit).
pub async fn mark_met<C: ConnectionTrait>(db: &C, story_id: Uuid) -> Result<u64, DbErr> {
    let completed = Query::select()
        .column(run_story::Column::Id)
        .from(run_story::Entity)
        .and_where(run_story::Column::Id.eq(story_id))
        .and_where(run_story::Column::Status.eq(StoryStatus::Completed.as_str()))
        .to_owned();
    Ok(run_story_need::Entity::update_many()
        .col_expr(run_story_need::Column::Met, Expr::val(true))
        .filter(run_story_need::Column::NeedsStoryId.eq(story_id))
        .filter(run_story_need::Column::Met.eq(false))
        .filter(run_story_need::Column::NeedsStoryId.in_subquery(completed))
        .exec(db)
        .await?
        .rows_affected)
}

/// Counts down the stories that need `story_id` and have no unmet story need left (the other
/// half of [`satisfy_story`]): in a statement that runs after the marks committed, so that of
/// two needs completing at once the later sees both. Returns the stories it counted down that
/// are now claimable (pending, nothing unmet), as written.
pub async fn let_go<C: ConnectionTrait>(
    db: &C,
    story_id: Uuid,
) -> Result<Vec<run_story::Model>, DbErr> {
    let waiting = Query::select()
        .column(run_story_need::Column::StoryId)
        .from(run_story_need::Entity)
        .and_where(run_story_need::Column::NeedsStoryId.eq(story_id))
        .to_owned();
    release_story_waits(db, run_story::Column::Id.in_subquery(waiting)).await
}

/// Does what [`satisfy_story`] does for every completed story of the run at once: for a run
/// whose executor died between a completion and its `satisfy_story`. Costs a scan of the run's
/// waiting stories; executors call it only when a run has stories waiting and none running.
pub async fn satisfy_run<C: ConnectionTrait>(db: &C, run_id: Uuid) -> Result<u64, DbErr> {
    let completed = Query::select()
        .column(run_story::Column::Id)
        .from(run_story::Entity)
        .and_where(run_story::Column::RunId.eq(run_id))
        .and_where(run_story::Column::Status.eq(StoryStatus::Completed.as_str()))
        .to_owned();
    run_story_need::Entity::update_many()
        .col_expr(run_story_need::Column::Met, Expr::val(true))
        .filter(run_story_need::Column::RunId.eq(run_id))
        .filter(run_story_need::Column::Met.eq(false))
        .filter(run_story_need::Column::NeedsStoryId.in_subquery(completed))
        .exec(db)
        .await?;
    let released = release_story_waits(
        db,
        run_story::Column::RunId
            .eq(run_id)
            .and(run_story::Column::Status.eq(StoryStatus::Pending.as_str())),
    )
    .await?;
    Ok(released.len() as u64)
}

/// Clears `waits_on_stories` (counting one down) on the stories `which` that wait on stories
/// and have no unmet row left. SAFETY(order): a row is met only once its needed story is
/// completed, which is terminal; so a statement that sees none unmet is right, whenever it
/// runs, and the flag makes the count-down happen once.
async fn release_story_waits<C: ConnectionTrait>(
    db: &C,
    which: SimpleExpr,
) -> Result<Vec<run_story::Model>, DbErr> {
    let open = SimpleExpr::SubQuery(
        Some(sea_orm::sea_query::SubQueryOper::Exists),
        Box::new(SubQueryStatement::SelectStatement(
            Query::select()
                .expr(Expr::val(1))
                .from(run_story_need::Entity)
                .and_where(
                    Expr::col((run_story_need::Entity, run_story_need::Column::StoryId))
                        .eq(Expr::col((run_story::Entity, run_story::Column::Id))),
                )
                .and_where(
                    Expr::col((run_story_need::Entity, run_story_need::Column::Met)).eq(false),
                )
                .to_owned(),
        )),
    );
    let result = count_down_where(which.clone())
        .col_expr(run_story::Column::WaitsOnStories, Expr::val(false))
        .filter(run_story::Column::WaitsOnStories.eq(true))
        .filter(open.not());
    let claimable =
        |s: &run_story::Model| s.unmet_needs == 0 && s.status == StoryStatus::Pending.as_str();
    match db.get_database_backend() {
        // No UPDATE ... RETURNING: read the ones now free (a story another caller let go in
        // the same instant may be among them, which is as true).
        DbBackend::MySql => {
            if result.exec(db).await?.rows_affected == 0 {
                return Ok(Vec::new());
            }
            Ok(run_story::Entity::find()
                .filter(which)
                .filter(run_story::Column::WaitsOnStories.eq(false))
                .filter(run_story::Column::UnmetNeeds.eq(0))
                .filter(run_story::Column::Status.eq(StoryStatus::Pending.as_str()))
                .all(db)
                .await?)
        }
        _ => Ok(result
            .exec_with_returning(db)
            .await?
            .into_iter()
            .filter(claimable)
            .collect()),
    }
}

/// Counts down every story of the epics that need `epic_id`: call it in the transaction that
/// moves that epic to completed, and only there (unlike [`satisfy_story`], it is not safe to
/// repeat). Returns how many stories it counted down.
pub async fn satisfy_epic<C: ConnectionTrait>(db: &C, epic_id: Uuid) -> Result<u64, DbErr> {
    let waiting = Query::select()
        .column(run_epic_need::Column::EpicId)
        .from(run_epic_need::Entity)
        .and_where(run_epic_need::Column::NeedsEpicId.eq(epic_id))
        .to_owned();
    count_down(db, run_story::Column::EpicId.in_subquery(waiting)).await
}

/// The one count-down: `unmet_needs - 1`, the version moved on, on the stories `which` that
/// still wait for something.
fn count_down_where(which: SimpleExpr) -> sea_orm::UpdateMany<run_story::Entity> {
    run_story::Entity::update_many()
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
}

async fn count_down<C: ConnectionTrait>(db: &C, which: SimpleExpr) -> Result<u64, DbErr> {
    let result = count_down_where(which).exec(db).await?;
    Ok(result.rows_affected)
}

//! Scheduling: retry delays, priorities, pausing, and concurrency limits shared by every
//! process.
//!
//! - `run_story.not_before_ms` (Unix milliseconds, none when NULL): a story that failed an
//!   attempt with a retry delay is not claimed before then. Milliseconds rather than a timestamp
//!   column, so that the candidate query compares integers the same way on every backend.
//! - `run_story.retry_delay`: the story's retry delay (JSON: delay, backoff, most delay,
//!   jitter), none when NULL (retried at once, as before).
//! - `run_story.priority`: higher is claimed first among ready stories (default 0).
//! - `run_story.limit_keys`: the names of the limits the story holds while it runs, sorted,
//!   separated by commas (none when NULL).
//! - `run.paused_at`: while set, no story of the run starts.
//! - `run_limit` (one row per named limit: its capacity, version), `run_limit_slot` (one row
//!   per slot of a limit, holding the running story that took it, if any: claims of one limit
//!   take different rows side by side instead of queueing on one counter) and
//!   `run_story_limit` (one row per story and limit it holds, for the candidate query to pass
//!   over stories whose limit is full). A limit cannot be dropped while a story names it.
//! - `ix_run_story_ready` becomes (run, status, unmet needs, priority descending, position,
//!   id): the candidate query's order to the last column, so it stops after the rows it returns.
//!
//! The down step drops the tables and columns and puts the former ready index back; every
//! other row stays.

use crate::idens::{Run, RunLimit, RunLimitSlot, RunStory, RunStoryLimit};
use crate::schema_types::{big_integer, timestamp, uuid, uuid_pk};
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

const READY_INDEX: &str = "ix_run_story_ready";
const LIMIT_NAME_INDEX: &str = "ux_run_limit_name";
const STORY_LIMIT_INDEX: &str = "ix_run_story_limit_limit";

#[derive(DeriveMigrationName)]
pub struct Migration;

fn ready_index(with_scheduling: bool) -> IndexCreateStatement {
    let mut index = Index::create();
    index
        .name(READY_INDEX)
        .table(RunStory::Table)
        .col(RunStory::RunId)
        .col(RunStory::Status)
        .col(RunStory::UnmetNeeds);
    if with_scheduling {
        // In the candidate query's order, to the last column, so that it reads only the rows
        // it returns (64) instead of sorting every pending story.
        index
            .col((RunStory::Priority, IndexOrder::Desc))
            .col(RunStory::Position)
            .col(RunStory::Id);
    } else {
        index.col(RunStory::Position);
    }
    index.to_owned()
}

fn drop_ready_index() -> IndexDropStatement {
    Index::drop()
        .name(READY_INDEX)
        .table(RunStory::Table)
        .to_owned()
}

/// Runs `steps` in one transaction where the backend has transactional DDL. On SQLite that also
/// keeps every statement on one connection: a connection whose cached schema still holds the
/// ready index (dropped through another) would refuse to create it again.
async fn in_transaction<F>(manager: &SchemaManager<'_>, steps: F) -> Result<(), DbErr>
where
    F: for<'m> FnOnce(
        &'m SchemaManager<'m>,
    )
        -> std::pin::Pin<Box<dyn Future<Output = Result<(), DbErr>> + Send + 'm>>,
{
    if manager.get_database_backend() == DbBackend::MySql {
        return steps(manager).await;
    }
    let tx = manager.begin().await?;
    steps(&tx).await?;
    tx.commit().await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        in_transaction(manager, |m| Box::pin(up(m))).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        in_transaction(manager, |m| Box::pin(down(m))).await
    }
}

async fn up(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let b = manager.get_database_backend();
    manager
        .alter_table(
            Table::alter()
                .table(Run::Table)
                .add_column(timestamp(b, Run::PausedAt).null().to_owned())
                .to_owned(),
        )
        .await?;
    // One column per statement: SQLite's ALTER TABLE adds one at a time.
    for column in [
        big_integer(b, RunStory::NotBeforeMs).null().to_owned(),
        ColumnDef::new(RunStory::RetryDelay)
            .text()
            .null()
            .to_owned(),
        ColumnDef::new(RunStory::Priority)
            .integer()
            .not_null()
            .default(0)
            .to_owned(),
        ColumnDef::new(RunStory::LimitKeys).text().null().to_owned(),
    ] {
        manager
            .alter_table(
                Table::alter()
                    .table(RunStory::Table)
                    .add_column(column)
                    .to_owned(),
            )
            .await?;
    }
    manager.drop_index(drop_ready_index()).await?;
    manager.create_index(ready_index(true)).await?;
    manager
        .create_table(
            Table::create()
                .table(RunLimit::Table)
                .col(uuid_pk(RunLimit::Id))
                .col(ColumnDef::new(RunLimit::Name).string_len(255).not_null())
                .col(ColumnDef::new(RunLimit::Capacity).integer().not_null())
                .col(
                    ColumnDef::new(RunLimit::Version)
                        .integer()
                        .not_null()
                        .default(1),
                )
                .col(timestamp(b, RunLimit::CreatedAt).not_null())
                .col(timestamp(b, RunLimit::UpdatedAt).not_null())
                .to_owned(),
        )
        .await?;
    manager
        .create_index(
            Index::create()
                .name(LIMIT_NAME_INDEX)
                .table(RunLimit::Table)
                .col(RunLimit::Name)
                .unique()
                .to_owned(),
        )
        .await?;
    manager
        .create_table(
            Table::create()
                .table(RunStoryLimit::Table)
                .col(uuid(RunStoryLimit::StoryId).not_null())
                .col(uuid(RunStoryLimit::LimitId).not_null())
                .primary_key(
                    Index::create()
                        .col(RunStoryLimit::StoryId)
                        .col(RunStoryLimit::LimitId),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_run_story_limit_story")
                        .from(RunStoryLimit::Table, RunStoryLimit::StoryId)
                        .to(RunStory::Table, RunStory::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_run_story_limit_limit")
                        .from(RunStoryLimit::Table, RunStoryLimit::LimitId)
                        .to(RunLimit::Table, RunLimit::Id)
                        .on_delete(ForeignKeyAction::Restrict),
                )
                .to_owned(),
        )
        .await?;
    manager
        .create_table(
            Table::create()
                .table(RunLimitSlot::Table)
                .col(uuid(RunLimitSlot::LimitId).not_null())
                .col(big_integer(b, RunLimitSlot::SlotNo).not_null())
                .col(uuid(RunLimitSlot::StoryId).null())
                .primary_key(
                    Index::create()
                        .col(RunLimitSlot::LimitId)
                        .col(RunLimitSlot::SlotNo),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_run_limit_slot_limit")
                        .from(RunLimitSlot::Table, RunLimitSlot::LimitId)
                        .to(RunLimit::Table, RunLimit::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_run_limit_slot_story")
                        .from(RunLimitSlot::Table, RunLimitSlot::StoryId)
                        .to(RunStory::Table, RunStory::Id)
                        .on_delete(ForeignKeyAction::SetNull),
                )
                .to_owned(),
        )
        .await?;
    // No index on `story_id`: every claim and result of a limited story rewrites it, and on
    // PostgreSQL an indexed column makes each of those updates leave a dead index entry that
    // later probes wade through (thousands per limit over a large run); unindexed, they stay
    // heap-only and are pruned in place. A limit's slots are found by the key's first column.
    manager
        .create_index(
            Index::create()
                .name(STORY_LIMIT_INDEX)
                .table(RunStoryLimit::Table)
                .col(RunStoryLimit::LimitId)
                .to_owned(),
        )
        .await
}

async fn down(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    manager
        .drop_table(Table::drop().table(RunStoryLimit::Table).to_owned())
        .await?;
    manager
        .drop_table(Table::drop().table(RunLimitSlot::Table).to_owned())
        .await?;
    manager
        .drop_table(Table::drop().table(RunLimit::Table).to_owned())
        .await?;
    manager.drop_index(drop_ready_index()).await?;
    manager.create_index(ready_index(false)).await?;
    for column in [
        RunStory::LimitKeys,
        RunStory::Priority,
        RunStory::RetryDelay,
        RunStory::NotBeforeMs,
    ] {
        manager
            .alter_table(
                Table::alter()
                    .table(RunStory::Table)
                    .drop_column(column)
                    .to_owned(),
            )
            .await?;
    }
    manager
        .alter_table(
            Table::alter()
                .table(Run::Table)
                .drop_column(Run::PausedAt)
                .to_owned(),
        )
        .await
}

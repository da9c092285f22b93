//! Drops `ix_run_story_run_status` (run, status, position). Every query it served is served as
//! well by the prefix of `ix_run_story_ready` (run, status, unmet needs, priority, position,
//! id): a look for a run's stories in a status, their counts, the expired leases of a run. It
//! cost a write on every change of a story's status, which is two per story executed (its
//! claim and its result): on PostgreSQL about a fifth of each of those writes.
//!
//! The down step creates it again.

use crate::idens::RunStory;
use sea_orm_migration::prelude::*;

const NAME: &str = "ix_run_story_run_status";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(Index::drop().name(NAME).table(RunStory::Table).to_owned())
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(NAME)
                    .table(RunStory::Table)
                    .col(RunStory::RunId)
                    .col(RunStory::Status)
                    .col(RunStory::Position)
                    .to_owned(),
            )
            .await
    }
}

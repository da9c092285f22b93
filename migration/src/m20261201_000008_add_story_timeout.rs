//! Time bounds: how long one attempt of a story may run (`run_story.timeout_ms`, none when
//! NULL). At the deadline the executor stops the handler and records the attempt failed.
//!
//! The down step drops the column; every other row and column stays.

use crate::idens::RunStory;
use crate::schema_types::big_integer;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();
        manager
            .alter_table(
                Table::alter()
                    .table(RunStory::Table)
                    .add_column(big_integer(b, RunStory::TimeoutMs).null().to_owned())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RunStory::Table)
                    .drop_column(RunStory::TimeoutMs)
                    .to_owned(),
            )
            .await
    }
}

//! What an executor needs on a story: the command it runs, its attempt budget, and its lease.
//!
//! A lease is who holds the story and until when; a worker that loses its lease is fenced off by
//! the story's version, not by the lease fields themselves.

use crate::idens::RunStory;
use crate::schema_types::timestamp;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();
        // SQLite takes one ALTER operation per statement.
        let columns = [
            ColumnDef::new(RunStory::Command).text().null().to_owned(),
            ColumnDef::new(RunStory::MaxAttempts)
                .integer()
                .not_null()
                .default(1)
                .to_owned(),
            ColumnDef::new(RunStory::LeaseOwner)
                .string_len(255)
                .null()
                .to_owned(),
            timestamp(b, RunStory::LeaseExpiresAt).null().to_owned(),
        ];
        for column in columns {
            manager
                .alter_table(
                    Table::alter()
                        .table(RunStory::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            RunStory::LeaseExpiresAt,
            RunStory::LeaseOwner,
            RunStory::MaxAttempts,
            RunStory::Command,
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
        Ok(())
    }
}

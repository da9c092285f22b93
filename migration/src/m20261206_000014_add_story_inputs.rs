//! What a story's handler is given besides its command:
//!
//! - `run_story.env`: environment variables for the shell handler's command, a JSON object of
//!   strings (the plan's `env`, over its `[defaults] env`), none when NULL;
//! - `run_story.work_dir`: the directory the command runs in (the plan's `dir`), none when NULL;
//! - `run_story.payload`: free-form input for a Rust handler, JSON text stored as given, none
//!   when NULL.
//!
//! The down step drops the three columns; every other row and column stays.

use crate::idens::RunStory;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite adds one at a time.
        for column in [RunStory::Env, RunStory::WorkDir, RunStory::Payload] {
            manager
                .alter_table(
                    Table::alter()
                        .table(RunStory::Table)
                        .add_column(ColumnDef::new(column).text().null().to_owned())
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [RunStory::Payload, RunStory::WorkDir, RunStory::Env] {
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

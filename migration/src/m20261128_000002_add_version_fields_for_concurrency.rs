//! Adds the optimistic-concurrency `version` to every state row.
//!
//! `NOT NULL DEFAULT 1` fills every existing row with 1 in the same statement. SQLite takes one
//! ALTER operation per statement, so each table gets its own.

use crate::idens::{Run, RunEpic, RunStory};
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn tables() -> [(DynIden, DynIden); 3] {
    [
        (Run::Table.into_iden(), Run::Version.into_iden()),
        (RunEpic::Table.into_iden(), RunEpic::Version.into_iden()),
        (RunStory::Table.into_iden(), RunStory::Version.into_iden()),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (table, column) in tables() {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(ColumnDef::new(column).integer().not_null().default(1))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (table, column) in tables() {
            manager
                .alter_table(Table::alter().table(table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}

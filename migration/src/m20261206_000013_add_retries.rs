//! Retrying a failed or cancelled run (`run-engine retry`).
//!
//! - `run.retries` and `run_epic.retries` (default 0): how many times the run, or the epic
//!   with it, was reopened. The lines that say an epic or a run finished are written once per
//!   verdict under a batch id derived from the row's id; the count goes into that id, so the
//!   run that finishes again after a retry gets its closing line again (0 keeps the ids every
//!   earlier run was written with).
//! - `ix_run_created_at` on `run (created_at)`: `run-engine runs` lists the newest runs without
//!   sorting every run.
//!
//! The down step drops the index and the two columns; every other row and column stays.

use crate::idens::{Run, RunEpic};
use sea_orm_migration::prelude::*;

const CREATED_INDEX: &str = "ix_run_created_at";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite adds one at a time.
        let retries = |column: DynIden| {
            ColumnDef::new(column)
                .integer()
                .not_null()
                .default(0)
                .to_owned()
        };
        for alter in [
            Table::alter()
                .table(Run::Table)
                .add_column(retries(Run::Retries.into_iden()))
                .to_owned(),
            Table::alter()
                .table(RunEpic::Table)
                .add_column(retries(RunEpic::Retries.into_iden()))
                .to_owned(),
        ] {
            manager.alter_table(alter).await?;
        }
        manager
            .create_index(
                Index::create()
                    .name(CREATED_INDEX)
                    .table(Run::Table)
                    .col(Run::CreatedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(CREATED_INDEX)
                    .table(Run::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(RunEpic::Table)
                    .drop_column(RunEpic::Retries)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Run::Table)
                    .drop_column(Run::Retries)
                    .to_owned(),
            )
            .await
    }
}

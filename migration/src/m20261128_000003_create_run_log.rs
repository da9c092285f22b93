//! The run log: an append-only table of lines, and a per-run head row.
//!
//! Each line is its own row, so an append costs one INSERT whatever the log's size. `seq` numbers
//! a run's lines gap-free in commit order: appenders take them from `run_log_head` under its row
//! lock, so a follower reading `seq > cursor` never skips a line that commits later. Messages are
//! bytes, so NUL and any other byte survive on PostgreSQL, whose `text` rejects NUL.

use crate::idens::{Run, RunLog, RunLogHead};
use crate::schema_types::{big_integer, bytes, timestamp, uuid};
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();
        manager
            .create_table(
                Table::create()
                    .table(RunLogHead::Table)
                    .col(uuid(RunLogHead::RunId).not_null().primary_key())
                    .col(big_integer(b, RunLogHead::LastSeq).not_null().default(0))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_log_head_run")
                            .from(RunLogHead::Table, RunLogHead::RunId)
                            .to(Run::Table, Run::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunLog::Table)
                    .col(
                        ColumnDef::new(RunLog::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(uuid(RunLog::RunId).not_null())
                    .col(big_integer(b, RunLog::Seq).not_null())
                    .col(uuid(RunLog::BatchId).not_null())
                    .col(ColumnDef::new(RunLog::LineNo).integer().not_null())
                    .col(timestamp(b, RunLog::LoggedAt).not_null())
                    .col(bytes(b, RunLog::Message).not_null())
                    // Lines reference the head row, not the run row: an append then locks only
                    // the head (already held), never the run an executor is updating.
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_log_head")
                            .from(RunLog::Table, RunLog::RunId)
                            .to(RunLogHead::Table, RunLogHead::RunId)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_run_log_run_seq")
                    .table(RunLog::Table)
                    .col(RunLog::RunId)
                    .col(RunLog::Seq)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // A retried batch finds its first try here and is not written twice.
        manager
            .create_index(
                Index::create()
                    .name("ux_run_log_batch_line")
                    .table(RunLog::Table)
                    .col(RunLog::BatchId)
                    .col(RunLog::LineNo)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RunLog::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(RunLogHead::Table).to_owned())
            .await
    }
}

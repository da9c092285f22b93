//! A digest of each log batch, so that a batch id appended again can be checked against its
//! first try without reading the first try's lines back.
//!
//! The first line of a batch (`line_no` 0) carries the SHA-256 of the batch's line count and
//! lines; the other lines and the batches written before this migration carry none (a replay of
//! those is checked against the lines themselves).

use crate::idens::RunLog;
use crate::schema_types::bytes;
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
                    .table(RunLog::Table)
                    .add_column(bytes(b, RunLog::BatchDigest).null().to_owned())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RunLog::Table)
                    .drop_column(RunLog::BatchDigest)
                    .to_owned(),
            )
            .await
    }
}

//! SQLite only: the run's log head follows the lines inserted (a trigger), so that an append is
//! one statement there, as it is on PostgreSQL.
//!
//! `run_log_head.last_seq` is the highest `seq` handed out for a run. The general append bumps
//! it first (`UPDATE ... RETURNING`) and inserts the lines after, in one transaction; SQLite's
//! one-statement append inserts lines numbered from the head and lets this trigger move the
//! head to each line's `seq` (a no-op for the general path's lines, which the head already
//! covers). SQLite runs one write statement at a time, so nobody reads the head between the
//! statement's read and its write. PostgreSQL does the same in one statement with a
//! data-modifying CTE, and MariaDB keeps the transaction: this migration does nothing there.
//!
//! The down step drops the trigger.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = "CREATE TRIGGER IF NOT EXISTS run_log_head_follows AFTER INSERT ON run_log \
    BEGIN \
        UPDATE run_log_head SET last_seq = NEW.seq \
        WHERE run_id = NEW.run_id AND last_seq < NEW.seq; \
    END";

const DOWN: &str = "DROP TRIGGER IF EXISTS run_log_head_follows";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_on(manager, DbBackend::Sqlite, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_on(manager, DbBackend::Sqlite, DOWN).await
    }
}

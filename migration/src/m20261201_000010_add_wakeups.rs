//! Wake-ups (PostgreSQL only): whatever makes a story claimable notifies channel
//! `run_engine`, so idle workers in every process wake at once instead of at their next poll.
//!
//! - `run_story`: a story that becomes pending with no unmet need (created, given back, failed
//!   for a retry, its last need completed) notifies with its run's id; a story holding limits
//!   that stops running (its slots freed) notifies `limits` (any run's story may use them).
//! - `run`: a run resumed (`paused_at` cleared) notifies with its id.
//! - `run_limit`: a capacity raised notifies `limits`.
//!
//! Notifications are sent at commit, and PostgreSQL folds the same one sent many times in one
//! transaction (a run of 10,000 stories created is one notification). SQLite and MariaDB have
//! nothing of the kind: this migration does nothing there (their executors poll, and wake the
//! workers of their own process).
//!
//! The down step drops the triggers and their functions.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The channel every notification goes to.
pub const CHANNEL: &str = "run_engine";

const UP: &str = r#"
CREATE OR REPLACE FUNCTION run_engine_notify_story() RETURNS trigger AS $$
BEGIN
    IF NEW.status = 'pending' AND NEW.unmet_needs = 0
       AND (TG_OP = 'INSERT' OR OLD.status <> 'pending' OR OLD.unmet_needs <> 0) THEN
        PERFORM pg_notify('run_engine', NEW.run_id::text);
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'running' AND NEW.status <> 'running'
       AND NEW.limit_keys IS NOT NULL THEN
        PERFORM pg_notify('run_engine', 'limits');
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER run_story_notify
    AFTER INSERT OR UPDATE OF status, unmet_needs ON run_story
    FOR EACH ROW EXECUTE FUNCTION run_engine_notify_story();

CREATE OR REPLACE FUNCTION run_engine_notify_run() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('run_engine', NEW.id::text);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER run_notify
    AFTER UPDATE OF paused_at ON run
    FOR EACH ROW WHEN (OLD.paused_at IS NOT NULL AND NEW.paused_at IS NULL)
    EXECUTE FUNCTION run_engine_notify_run();

CREATE OR REPLACE FUNCTION run_engine_notify_limit() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('run_engine', 'limits');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER run_limit_notify
    AFTER UPDATE OF capacity ON run_limit
    FOR EACH ROW WHEN (NEW.capacity > OLD.capacity)
    EXECUTE FUNCTION run_engine_notify_limit();
"#;

const DOWN: &str = r#"
DROP TRIGGER IF EXISTS run_limit_notify ON run_limit;
DROP FUNCTION IF EXISTS run_engine_notify_limit();
DROP TRIGGER IF EXISTS run_notify ON run;
DROP FUNCTION IF EXISTS run_engine_notify_run();
DROP TRIGGER IF EXISTS run_story_notify ON run_story;
DROP FUNCTION IF EXISTS run_engine_notify_story();
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_on(manager, DbBackend::Postgres, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_on(manager, DbBackend::Postgres, DOWN).await
    }
}

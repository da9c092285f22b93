//! PostgreSQL only: the story wake-up trigger of `add_wakeups` tests its condition in the
//! trigger's `WHEN` clause, so that the changes that notify nobody (a claim, a renewal, a
//! completion of a story without limits: nearly every write of a run) no longer call a
//! PL/pgSQL function for each row. Same notifications as before: one trigger for inserts and
//! one for updates, as `WHEN` cannot name `OLD` on an insert.
//!
//! The down step puts the single trigger of `add_wakeups` back.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
DROP TRIGGER IF EXISTS run_story_notify ON run_story;

CREATE TRIGGER run_story_notify_insert
    AFTER INSERT ON run_story
    FOR EACH ROW WHEN (NEW.status = 'pending' AND NEW.unmet_needs = 0)
    EXECUTE FUNCTION run_engine_notify_story();

CREATE TRIGGER run_story_notify_update
    AFTER UPDATE OF status, unmet_needs ON run_story
    FOR EACH ROW WHEN (
        (NEW.status = 'pending' AND NEW.unmet_needs = 0
            AND (OLD.status <> 'pending' OR OLD.unmet_needs <> 0))
        OR (OLD.status = 'running' AND NEW.status <> 'running' AND NEW.limit_keys IS NOT NULL))
    EXECUTE FUNCTION run_engine_notify_story();
"#;

const DOWN: &str = r#"
DROP TRIGGER IF EXISTS run_story_notify_update ON run_story;
DROP TRIGGER IF EXISTS run_story_notify_insert ON run_story;

CREATE TRIGGER run_story_notify
    AFTER INSERT OR UPDATE OF status, unmet_needs ON run_story
    FOR EACH ROW EXECUTE FUNCTION run_engine_notify_story();
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

//! run-engine's schema history.
//!
//! One migration per file, oldest first; the list in [`Migrator`] is the order they run in.
//! Every migration runs up and down on SQLite, PostgreSQL and MariaDB. Column types that differ
//! between backends are decided in one place, [`schema_types`].
//!
//! Apply migrations with [`apply`], which takes a cross-process lock on PostgreSQL and MariaDB so
//! that several processes migrating one database at once apply each migration exactly once.

pub use sea_orm_migration::prelude::*;

mod lock;
mod m20261128_000001_create_run_tables;
mod m20261128_000002_add_version_fields_for_concurrency;
mod m20261128_000003_create_run_log;
mod m20261128_000004_add_story_execution_fields;
mod m20261129_000005_index_run_story_epic_status;
mod m20261201_000006_add_run_log_batch_digest;
mod m20261201_000007_add_needs;
mod m20261201_000008_add_story_timeout;
mod m20261201_000009_add_scheduling;
mod m20261201_000010_add_wakeups;
mod m20261201_000011_sqlite_log_head_follows;
mod m20261201_000012_wakeup_triggers_when;
mod m20261206_000013_add_retries;
mod m20261206_000014_add_story_inputs;
mod m20261207_000015_drop_run_status_index;
pub mod schema_types;

pub use lock::{MigrationLockError, apply, fresh, rollback, status, with_migration_lock};
/// The PostgreSQL channel that stories made claimable are notified on (see the `add_wakeups`
/// migration).
pub use m20261201_000010_add_wakeups::CHANNEL as WAKE_CHANNEL;

/// The ordered list of run-engine's migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_run_tables::Migration),
            Box::new(m20261128_000002_add_version_fields_for_concurrency::Migration),
            Box::new(m20261128_000003_create_run_log::Migration),
            Box::new(m20261128_000004_add_story_execution_fields::Migration),
            Box::new(m20261129_000005_index_run_story_epic_status::Migration),
            Box::new(m20261201_000006_add_run_log_batch_digest::Migration),
            Box::new(m20261201_000007_add_needs::Migration),
            Box::new(m20261201_000008_add_story_timeout::Migration),
            Box::new(m20261201_000009_add_scheduling::Migration),
            Box::new(m20261201_000010_add_wakeups::Migration),
            Box::new(m20261201_000011_sqlite_log_head_follows::Migration),
            Box::new(m20261201_000012_wakeup_triggers_when::Migration),
            Box::new(m20261206_000013_add_retries::Migration),
            Box::new(m20261206_000014_add_story_inputs::Migration),
            Box::new(m20261207_000015_drop_run_status_index::Migration),
        ]
    }
}

/// Runs `sql` (raw, several statements allowed) when the database is `backend`; nothing
/// elsewhere. For migrations that only one backend needs (triggers).
pub(crate) async fn execute_on(
    manager: &SchemaManager<'_>,
    backend: sea_orm_migration::sea_orm::DbBackend,
    sql: &str,
) -> Result<(), DbErr> {
    if manager.get_database_backend() == backend {
        manager.get_connection().execute_unprepared(sql).await?;
    }
    Ok(())
}

/// Names of every migration, oldest first.
pub fn migration_names() -> Vec<String> {
    Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

/// Table and column names shared by the migrations, as `DeriveIden` enums.
pub mod idens {
    use sea_orm_migration::prelude::*;

    /// The `run` table.
    #[derive(DeriveIden)]
    pub enum Run {
        /// Table name.
        Table,
        /// Primary key (UUID).
        Id,
        /// Caller-chosen key.
        Key,
        /// Human title.
        Title,
        /// Status name.
        Status,
        /// Optimistic-concurrency version.
        Version,
        /// Creation time.
        CreatedAt,
        /// Last change time.
        UpdatedAt,
        /// When it started running.
        StartedAt,
        /// When it finished.
        FinishedAt,
        /// Error text of a failed run.
        Error,
        /// Cancel the rest of the run on the first story that fails for good.
        FailFast,
        /// While set, no story of the run starts.
        PausedAt,
        /// How many times the run was retried (`run-engine retry`).
        Retries,
    }

    /// The `run_epic` table.
    #[derive(DeriveIden)]
    pub enum RunEpic {
        /// Table name.
        Table,
        /// Primary key (UUID).
        Id,
        /// Owning run.
        RunId,
        /// Key, unique within the run.
        Key,
        /// Human title.
        Title,
        /// Position within the run.
        Position,
        /// Status name.
        Status,
        /// Optimistic-concurrency version.
        Version,
        /// Creation time.
        CreatedAt,
        /// Last change time.
        UpdatedAt,
        /// When it started running.
        StartedAt,
        /// When it finished.
        FinishedAt,
        /// Error text.
        Error,
        /// How many epics need this one (epic-level needs).
        NeededBy,
        /// How many times the epic was reopened by a retry of its run.
        Retries,
    }

    /// The `run_story` table.
    #[derive(DeriveIden)]
    pub enum RunStory {
        /// Table name.
        Table,
        /// Primary key (UUID).
        Id,
        /// Owning run (denormalised for direct queries).
        RunId,
        /// Owning epic.
        EpicId,
        /// Key, unique within the epic.
        Key,
        /// Human title.
        Title,
        /// Position within the epic.
        Position,
        /// Status name.
        Status,
        /// Attempts made so far.
        Attempts,
        /// Optimistic-concurrency version.
        Version,
        /// Creation time.
        CreatedAt,
        /// Last change time.
        UpdatedAt,
        /// When it started running.
        StartedAt,
        /// When it finished.
        FinishedAt,
        /// Error text.
        Error,
        /// Shell command (or other payload) the story runs.
        Command,
        /// Most attempts allowed.
        MaxAttempts,
        /// Worker holding the lease.
        LeaseOwner,
        /// When the lease runs out.
        LeaseExpiresAt,
        /// How many of its needs (stories, and epics through its epic) have not completed yet.
        UnmetNeeds,
        /// How many stories need this one directly.
        NeededBy,
        /// True while some story this one needs directly has not been seen completed.
        WaitsOnStories,
        /// How long one attempt may run, in milliseconds (none when NULL).
        TimeoutMs,
        /// Not claimed before this time (Unix milliseconds; none when NULL).
        NotBeforeMs,
        /// The retry delay after a failed attempt (JSON; none when NULL).
        RetryDelay,
        /// Higher is claimed first among ready stories.
        Priority,
        /// The limits it holds while it runs: names, sorted, comma-separated.
        LimitKeys,
        /// Environment variables for the story's command (JSON object), none when NULL.
        Env,
        /// The story's working directory, none when NULL.
        WorkDir,
        /// Free-form input for the story's handler (JSON), none when NULL.
        Payload,
    }

    /// The `run_limit` table: a named limit on how many stories holding it run at once,
    /// across every process.
    #[derive(DeriveIden)]
    pub enum RunLimit {
        /// Table name.
        Table,
        /// Primary key (UUID).
        Id,
        /// The limit's name, unique.
        Name,
        /// How many stories holding it may run at once.
        Capacity,
        /// Optimistic-concurrency version.
        Version,
        /// Creation time.
        CreatedAt,
        /// Last change time.
        UpdatedAt,
    }

    /// The `run_limit_slot` table: one slot of a limit, held by at most one running story.
    #[derive(DeriveIden)]
    pub enum RunLimitSlot {
        /// Table name.
        Table,
        /// The limit.
        LimitId,
        /// The slot's number, from 0; slots at or past the capacity are not taken.
        SlotNo,
        /// The running story holding it (none: free).
        StoryId,
    }

    /// The `run_story_limit` table: a story holds a limit while it runs.
    #[derive(DeriveIden)]
    pub enum RunStoryLimit {
        /// Table name.
        Table,
        /// The story.
        StoryId,
        /// The limit.
        LimitId,
    }

    /// The `run_story_need` table: a story needs another story.
    #[derive(DeriveIden)]
    pub enum RunStoryNeed {
        /// Table name.
        Table,
        /// The run both stories belong to.
        RunId,
        /// The story that waits.
        StoryId,
        /// The story it waits for.
        NeedsStoryId,
        /// True once the story it waits for has completed.
        Met,
    }

    /// The `run_epic_need` table: every story of an epic needs every story of another epic,
    /// stored as one row.
    #[derive(DeriveIden)]
    pub enum RunEpicNeed {
        /// Table name.
        Table,
        /// The run both epics belong to.
        RunId,
        /// The epic that waits.
        EpicId,
        /// The epic it waits for.
        NeedsEpicId,
    }

    /// The append-only `run_log` table.
    #[derive(DeriveIden)]
    pub enum RunLog {
        /// Table name.
        Table,
        /// Surrogate key.
        Id,
        /// Owning run.
        RunId,
        /// Position within the run's log, gap-free and in commit order.
        Seq,
        /// Batch the line was appended in.
        BatchId,
        /// Line number within its batch.
        LineNo,
        /// Time of the batch.
        LoggedAt,
        /// The line's bytes.
        Message,
        /// SHA-256 of the batch (its line count and lines), on the batch's first line only.
        BatchDigest,
    }

    /// The per-run log head: the last sequence number handed out.
    #[derive(DeriveIden)]
    pub enum RunLogHead {
        /// Table name.
        Table,
        /// The run.
        RunId,
        /// Last sequence number used.
        LastSeq,
    }
}

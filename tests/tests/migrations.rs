//! Every migration on every backend: up, down and up again, and existing rows survive both ways.
//!
//! Each test runs on SQLite, PostgreSQL and MariaDB (see `run_engine_tests` for the servers'
//! environment variables), each in a fresh, EMPTY database, so that the test itself chooses how
//! far to migrate.

use chrono::{DateTime, Utc};
use migration::idens::{
    Run, RunEpic, RunEpicNeed, RunLimit, RunLimitSlot, RunLog, RunLogHead, RunStory, RunStoryLimit,
    RunStoryNeed,
};
use migration::{Migrator, MigratorTrait};
use run_engine_tests::{TestDb, each_backend};
use sea_orm::{ActiveModelTrait, ConnectionTrait, DatabaseConnection, EntityTrait, Set};
use sea_orm_migration::SchemaManager;
use sea_orm_migration::sea_query::{Iden, IntoIden, Query, SimpleExpr};
use std::collections::BTreeSet;

/// The number of migrations in [`Migrator`].
const MIGRATIONS: usize = 15;

/// The name an iden stands for, e.g. `run_epic`.
fn name(iden: impl Iden) -> String {
    Iden::to_string(&iden)
}

/// The tables each migration creates and the columns it adds to a table that already exists.
/// Index `k` describes migration `k + 1`; [`indexes_added_by`] its indexes on existing tables.
fn added_by(k: usize) -> (Vec<String>, Vec<(String, String)>) {
    match k {
        0 => (
            vec![
                name(Run::Table),
                name(RunEpic::Table),
                name(RunStory::Table),
            ],
            vec![],
        ),
        1 => (
            vec![],
            vec![
                (name(Run::Table), name(Run::Version)),
                (name(RunEpic::Table), name(RunEpic::Version)),
                (name(RunStory::Table), name(RunStory::Version)),
            ],
        ),
        2 => (vec![name(RunLogHead::Table), name(RunLog::Table)], vec![]),
        3 => (
            vec![],
            [
                RunStory::Command,
                RunStory::MaxAttempts,
                RunStory::LeaseOwner,
                RunStory::LeaseExpiresAt,
            ]
            .into_iter()
            .map(|c| (name(RunStory::Table), name(c)))
            .collect(),
        ),
        4 => (vec![], vec![]),
        5 => (
            vec![],
            vec![(name(RunLog::Table), name(RunLog::BatchDigest))],
        ),
        6 => (
            vec![name(RunStoryNeed::Table), name(RunEpicNeed::Table)],
            vec![
                (name(Run::Table), name(Run::FailFast)),
                (name(RunEpic::Table), name(RunEpic::NeededBy)),
                (name(RunStory::Table), name(RunStory::UnmetNeeds)),
                (name(RunStory::Table), name(RunStory::NeededBy)),
                (name(RunStory::Table), name(RunStory::WaitsOnStories)),
            ],
        ),
        7 => (
            vec![],
            vec![(name(RunStory::Table), name(RunStory::TimeoutMs))],
        ),
        8 => (
            vec![
                name(RunLimit::Table),
                name(RunLimitSlot::Table),
                name(RunStoryLimit::Table),
            ],
            vec![
                (name(Run::Table), name(Run::PausedAt)),
                (name(RunStory::Table), name(RunStory::NotBeforeMs)),
                (name(RunStory::Table), name(RunStory::RetryDelay)),
                (name(RunStory::Table), name(RunStory::Priority)),
                (name(RunStory::Table), name(RunStory::LimitKeys)),
            ],
        ),
        // Triggers only (PostgreSQL).
        9 => (vec![], vec![]),
        // A trigger only (SQLite).
        10 => (vec![], vec![]),
        // Triggers only (PostgreSQL).
        11 => (vec![], vec![]),
        12 => (
            vec![],
            vec![
                (name(Run::Table), name(Run::Retries)),
                (name(RunEpic::Table), name(RunEpic::Retries)),
            ],
        ),
        13 => (
            vec![],
            [RunStory::Env, RunStory::WorkDir, RunStory::Payload]
                .into_iter()
                .map(|c| (name(RunStory::Table), name(c)))
                .collect(),
        ),
        // drop_run_status_index: an index only (see `indexes_dropped_by`).
        14 => (vec![], vec![]),
        _ => unreachable!("there are {MIGRATIONS} migrations"),
    }
}

/// The indexes (table, index, k of the migration that made it) migration `k + 1` drops.
fn indexes_dropped_by(k: usize) -> Vec<(String, String, usize)> {
    match k {
        14 => vec![(
            name(RunStory::Table),
            "ix_run_story_run_status".to_owned(),
            0,
        )],
        _ => vec![],
    }
}

/// The indexes (table, index) migration `k + 1` adds to a table made by an earlier one.
fn indexes_added_by(k: usize) -> Vec<(String, String)> {
    match k {
        4 => vec![(name(RunStory::Table), "ix_run_story_epic_status".to_owned())],
        6 => vec![(name(RunStory::Table), "ix_run_story_ready".to_owned())],
        12 => vec![(name(Run::Table), "ix_run_created_at".to_owned())],
        _ => vec![],
    }
}

/// Asserts that exactly the first `applied` migrations are recorded as applied, and that every
/// table and column they create exists and every one the later ones create does not.
async fn assert_schema_at(t: &TestDb, applied: usize, step: &str) {
    let backend = t.backend;
    let names = migration::migration_names();
    assert_eq!(names.len(), MIGRATIONS, "the migration list changed");
    let recorded: Vec<String> = Migrator::get_applied_migrations(&t.db)
        .await
        .unwrap_or_else(|e| panic!("{backend:?} {step}: reading applied migrations: {e}"))
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    assert_eq!(
        recorded,
        names[..applied].to_vec(),
        "{backend:?} {step}: applied migrations"
    );
    let manager = SchemaManager::new(&t.db);
    for (k, by) in names.iter().enumerate() {
        let expected = k < applied;
        let (tables, columns) = added_by(k);
        for table in tables {
            let found = manager
                .has_table(&table)
                .await
                .unwrap_or_else(|e| panic!("{backend:?} {step}: has_table({table}): {e}"));
            assert_eq!(
                found, expected,
                "{backend:?} {step}: table {table} (created by {by}) exists: {found}"
            );
        }
        for (table, index) in indexes_added_by(k) {
            let found = manager
                .has_index(&table, &index)
                .await
                .unwrap_or_else(|e| panic!("{backend:?} {step}: has_index({table}, {index}): {e}"));
            assert_eq!(
                found, expected,
                "{backend:?} {step}: index {table}.{index} (added by {by}) exists: {found}"
            );
        }
        for (table, index, made_by) in indexes_dropped_by(k) {
            let found = manager
                .has_index(&table, &index)
                .await
                .unwrap_or_else(|e| panic!("{backend:?} {step}: has_index({table}, {index}): {e}"));
            let present = made_by < applied && !expected;
            assert_eq!(
                found, present,
                "{backend:?} {step}: index {table}.{index} (dropped by {by}) exists: {found}"
            );
        }
        for (table, column) in columns {
            let found = manager
                .has_column(&table, &column)
                .await
                .unwrap_or_else(|e| {
                    panic!("{backend:?} {step}: has_column({table}, {column}): {e}")
                });
            assert_eq!(
                found, expected,
                "{backend:?} {step}: column {table}.{column} (added by {by}) exists: {found}"
            );
        }
    }
}

/// Applies the next `n` migrations (all pending ones when `None`) and checks which ran.
async fn up(t: &TestDb, n: Option<u32>, expect: &[String], step: &str) {
    let applied = migration::apply(&t.db, n)
        .await
        .unwrap_or_else(|e| panic!("{:?} {step}: migrating up failed: {e}", t.backend));
    assert_eq!(
        applied, expect,
        "{:?} {step}: migrations applied",
        t.backend
    );
}

/// Rolls back the last `n` migrations (all when `None`) and checks which were rolled back.
async fn down(t: &TestDb, n: Option<u32>, expect: &[String], step: &str) {
    let rolled = migration::rollback(&t.db, n)
        .await
        .unwrap_or_else(|e| panic!("{:?} {step}: migrating down failed: {e}", t.backend));
    assert_eq!(
        rolled, expect,
        "{:?} {step}: migrations rolled back",
        t.backend
    );
}

/// The row counts of run, run_epic and run_story.
async fn counts(db: &DatabaseConnection) -> [i64; 3] {
    [
        run_engine_tests::count_rows(db, &name(Run::Table)).await,
        run_engine_tests::count_rows(db, &name(RunEpic::Table)).await,
        run_engine_tests::count_rows(db, &name(RunStory::Table)).await,
    ]
}

/// A fixed time with whole microseconds, which every backend stores exactly.
fn at(seconds: i64, micros: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(1_795_000_000 + seconds, micros * 1_000).expect("a valid time")
}

/// The rows written by [`fill_at_first_migration`], to compare with what is read back.
struct Seeded {
    runs: BTreeSet<(uuid::Uuid, String, String)>,
    epics: BTreeSet<(uuid::Uuid, uuid::Uuid, String, i32)>,
    stories: BTreeSet<(uuid::Uuid, uuid::Uuid, uuid::Uuid, String, i32, i32)>,
}

const RUNS: usize = 3;
const EPICS_PER_RUN: usize = 2;
const STORIES_PER_EPIC: usize = 3;

/// Inserts one row with raw SQL built from the migrations' idens.
async fn insert(
    db: &DatabaseConnection,
    table: impl IntoIden,
    row: Vec<(impl IntoIden, SimpleExpr)>,
) {
    let backend = db.get_database_backend();
    let (columns, values): (Vec<_>, Vec<_>) = row.into_iter().unzip();
    let stmt = Query::insert()
        .into_table(table)
        .columns(columns)
        .values(values)
        .expect("as many values as columns")
        .to_owned();
    db.execute(&stmt)
        .await
        .unwrap_or_else(|e| panic!("{backend:?}: insert failed: {e}"));
}

/// Fills runs, epics and stories with only the columns of the first migration.
async fn fill_at_first_migration(db: &DatabaseConnection) -> Seeded {
    let mut seeded = Seeded {
        runs: BTreeSet::new(),
        epics: BTreeSet::new(),
        stories: BTreeSet::new(),
    };
    for r in 0..RUNS {
        let run_id = uuid::Uuid::new_v4();
        let (key, title) = (format!("run-{r}"), format!("Run number {r}"));
        let finished = (r == 0).then(|| at(60, 250));
        insert(
            db,
            Run::Table,
            vec![
                (Run::Id, uuid_value(run_id)),
                (Run::Key, key.clone().into()),
                (Run::Title, title.clone().into()),
                (
                    Run::Status,
                    if r == 0 { "failed" } else { "pending" }.into(),
                ),
                (Run::CreatedAt, at(r as i64, 123_456).into()),
                (Run::UpdatedAt, at(r as i64, 654_321).into()),
                (Run::StartedAt, finished.map(|_| at(30, 1)).into()),
                (Run::FinishedAt, finished.into()),
                (Run::Error, (r == 0).then(|| "boom".to_owned()).into()),
            ],
        )
        .await;
        seeded.runs.insert((run_id, key, title));
        for e in 0..EPICS_PER_RUN {
            let epic_id = uuid::Uuid::new_v4();
            let key = format!("epic-{e}");
            let position = e as i32;
            insert(
                db,
                RunEpic::Table,
                vec![
                    (RunEpic::Id, uuid_value(epic_id)),
                    (RunEpic::RunId, uuid_value(run_id)),
                    (RunEpic::Key, key.clone().into()),
                    (RunEpic::Title, format!("Epic {e} of run {r}").into()),
                    (RunEpic::Position, position.into()),
                    (RunEpic::Status, "pending".into()),
                    (RunEpic::CreatedAt, at(100, 0).into()),
                    (RunEpic::UpdatedAt, at(100, 0).into()),
                ],
            )
            .await;
            seeded.epics.insert((epic_id, run_id, key, position));
            for s in 0..STORIES_PER_EPIC {
                let story_id = uuid::Uuid::new_v4();
                let key = format!("story-{s}");
                let position = s as i32;
                let mut row = vec![
                    (RunStory::Id, uuid_value(story_id)),
                    (RunStory::RunId, uuid_value(run_id)),
                    (RunStory::EpicId, uuid_value(epic_id)),
                    (RunStory::Key, key.clone().into()),
                    (RunStory::Title, format!("Story {s}").into()),
                    (RunStory::Position, position.into()),
                    (RunStory::Status, "pending".into()),
                    (RunStory::CreatedAt, at(200, 999_999).into()),
                    (RunStory::UpdatedAt, at(200, 999_999).into()),
                ];
                // Half the stories take the column default for attempts, half set it.
                let attempts = if s % 2 == 0 {
                    0
                } else {
                    row.push((RunStory::Attempts, 2.into()));
                    2
                };
                insert(db, RunStory::Table, row).await;
                seeded
                    .stories
                    .insert((story_id, run_id, epic_id, key, position, attempts));
            }
        }
    }
    assert_eq!(
        counts(db).await,
        [
            RUNS as i64,
            (RUNS * EPICS_PER_RUN) as i64,
            (RUNS * EPICS_PER_RUN * STORIES_PER_EPIC) as i64
        ],
        "rows inserted at the first migration"
    );
    seeded
}

/// A UUID as an insert value (bound as `uuid::Uuid`, so each backend stores its own way).
fn uuid_value(id: uuid::Uuid) -> SimpleExpr {
    id.into()
}

each_backend!(
    empty: /// Each migration goes up, down and up again, one at a time; then all of them go down at
    /// once and up at once. After every step exactly the expected tables and columns exist.
    async fn every_migration_goes_up_down_and_up_again(t) {
        let names = migration::migration_names();
        assert_schema_at(&t, 0, "empty").await;
        for (k, step) in names.iter().enumerate() {
            let this = std::slice::from_ref(step);
            up(&t, Some(1), this, &format!("up {step}")).await;
            assert_schema_at(&t, k + 1, &format!("after up {step}")).await;
            down(&t, Some(1), this, &format!("down {step}")).await;
            assert_schema_at(&t, k, &format!("after down {step}")).await;
            up(&t, Some(1), this, &format!("up again {step}")).await;
            assert_schema_at(&t, k + 1, &format!("after up again {step}")).await;
        }
        up(&t, None, &[], "up with nothing pending").await;
        assert_schema_at(&t, MIGRATIONS, "after up with nothing pending").await;

        let newest_first: Vec<String> = names.iter().rev().cloned().collect();
        down(&t, None, &newest_first, "down all").await;
        assert_schema_at(&t, 0, "after down all").await;
        up(&t, None, &names, "up all").await;
        assert_schema_at(&t, MIGRATIONS, "after up all").await;
    }
);

each_backend!(
    empty: /// Rows written when only the first migration existed survive migrating to the latest
    /// schema (every one with version 1 and the new columns' defaults) and rolling back to the
    /// first migration again (every row still there, the version columns gone).
    async fn rows_from_the_first_migration_survive_migrating_to_latest_and_back(t) {
        let backend = t.backend;
        let names = migration::migration_names();
        up(&t, Some(1), &names[..1], "up to the first migration").await;
        assert_schema_at(&t, 1, "at the first migration").await;
        let seeded = fill_at_first_migration(&t.db).await;
        let before = counts(&t.db).await;

        up(&t, None, &names[1..], "up to latest").await;
        assert_schema_at(&t, MIGRATIONS, "at latest").await;

        let runs = entity::run::Entity::find()
            .all(&t.db)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: reading runs at latest: {e}"));
        assert!(
            runs.iter().all(|r| r.version == 1),
            "{backend:?}: every run has version 1: {runs:?}"
        );
        let found: BTreeSet<_> = runs
            .iter()
            .map(|r| (r.id, r.key.clone(), r.title.clone()))
            .collect();
        assert_eq!(found, seeded.runs, "{backend:?}: runs kept");
        let failed = runs
            .iter()
            .find(|r| r.key == "run-0")
            .expect("run-0 was inserted");
        assert_eq!(failed.status, "failed");
        assert_eq!(failed.error.as_deref(), Some("boom"));
        assert_eq!(failed.created_at, at(0, 123_456), "{backend:?}: created_at kept");
        assert_eq!(failed.updated_at, at(0, 654_321), "{backend:?}: updated_at kept");
        assert_eq!(failed.started_at, Some(at(30, 1)), "{backend:?}: started_at kept");
        assert_eq!(failed.finished_at, Some(at(60, 250)), "{backend:?}: finished_at kept");
        assert!(
            runs.iter()
                .filter(|r| r.key != "run-0")
                .all(|r| r.error.is_none() && r.started_at.is_none() && r.finished_at.is_none()),
            "{backend:?}: NULLs kept: {runs:?}"
        );

        let epics = entity::run_epic::Entity::find()
            .all(&t.db)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: reading epics at latest: {e}"));
        assert!(
            epics.iter().all(|e| e.version == 1),
            "{backend:?}: every epic has version 1: {epics:?}"
        );
        let found: BTreeSet<_> = epics
            .iter()
            .map(|e| (e.id, e.run_id, e.key.clone(), e.position))
            .collect();
        assert_eq!(found, seeded.epics, "{backend:?}: epics kept");

        let stories = entity::run_story::Entity::find()
            .all(&t.db)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: reading stories at latest: {e}"));
        assert!(
            stories.iter().all(|s| s.version == 1
                && s.max_attempts == 1
                && s.command.is_none()
                && s.lease_owner.is_none()
                && s.lease_expires_at.is_none()),
            "{backend:?}: every story has version 1 and the new columns' defaults: {stories:?}"
        );
        let found: BTreeSet<_> = stories
            .iter()
            .map(|s| (s.id, s.run_id, s.epic_id, s.key.clone(), s.position, s.attempts))
            .collect();
        assert_eq!(found, seeded.stories, "{backend:?}: stories kept");
        assert_eq!(counts(&t.db).await, before, "{backend:?}: row counts at latest");

        let newest_first: Vec<String> = names[1..].iter().rev().cloned().collect();
        let all_but_first = u32::try_from(MIGRATIONS - 1).expect("few migrations");
        down(&t, Some(all_but_first), &newest_first, "down to the first migration").await;
        assert_schema_at(&t, 1, "back at the first migration").await;
        assert_eq!(
            counts(&t.db).await,
            before,
            "{backend:?}: row counts back at the first migration"
        );
        let manager = SchemaManager::new(&t.db);
        for table in [name(Run::Table), name(RunEpic::Table), name(RunStory::Table)] {
            let has = manager
                .has_column(&table, "version")
                .await
                .expect("has_column");
            assert!(!has, "{backend:?}: {table}.version is gone");
        }
    }
);

each_backend!(
    empty: /// Rolling back `add_version_fields_for_concurrency` removes the three version columns and
    /// keeps every row, including rows written by the entities at the latest schema.
    async fn migrating_down_add_version_fields_for_concurrency_removes_the_version_columns_and_keeps_every_row(
        t
    ) {
        let backend = t.backend;
        let names = migration::migration_names();
        let version_migration = &names[1];
        assert!(
            version_migration.ends_with("add_version_fields_for_concurrency"),
            "the second migration is {version_migration}"
        );
        up(&t, None, &names, "up to latest").await;

        // Rows written through the entities at the latest schema, with versions other than 1.
        let now = at(0, 0);
        for r in 0..2 {
            let run_id = uuid::Uuid::new_v4();
            entity::run::ActiveModel {
                id: Set(run_id),
                key: Set(format!("run-{r}")),
                title: Set(format!("Run {r}")),
                status: Set("running".into()),
                version: Set(7),
                created_at: Set(now),
                updated_at: Set(now),
                started_at: Set(Some(now)),
                finished_at: Set(None),
                error: Set(None),
                fail_fast: Set(false),
                paused_at: Set(None),
                retries: Set(1),
            }
            .insert(&t.db)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: inserting a run: {e}"));
            let epic_id = uuid::Uuid::new_v4();
            entity::run_epic::ActiveModel {
                id: Set(epic_id),
                run_id: Set(run_id),
                key: Set("epic".into()),
                title: Set("Epic".into()),
                position: Set(0),
                status: Set("running".into()),
                version: Set(3),
                created_at: Set(now),
                updated_at: Set(now),
                started_at: Set(None),
                finished_at: Set(None),
                error: Set(None),
                needed_by: Set(0),
                retries: Set(1),
            }
            .insert(&t.db)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: inserting an epic: {e}"));
            for s in 0..3 {
                entity::run_story::ActiveModel {
                    id: Set(uuid::Uuid::new_v4()),
                    run_id: Set(run_id),
                    epic_id: Set(epic_id),
                    key: Set(format!("story-{s}")),
                    title: Set(format!("Story {s}")),
                    position: Set(s),
                    status: Set("leased".into()),
                    attempts: Set(1),
                    version: Set(s + 2),
                    created_at: Set(now),
                    updated_at: Set(now),
                    started_at: Set(Some(now)),
                    finished_at: Set(None),
                    error: Set(None),
                    command: Set(Some("echo hi".into())),
                    max_attempts: Set(3),
                    lease_owner: Set(Some("worker-1".into())),
                    lease_expires_at: Set(Some(now)),
                    unmet_needs: Set(0),
                    needed_by: Set(0),
                    waits_on_stories: Set(false),
                    timeout_ms: Set(None),
                    not_before_ms: Set(None),
                    retry_delay: Set(None),
                    priority: Set(0),
                    limit_keys: Set(None),
                    env: Set(Some("{\"A\":\"1\"}".into())),
                    work_dir: Set(Some("build".into())),
                    payload: Set(Some("[1,2]".into())),
                }
                .insert(&t.db)
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: inserting a story: {e}"));
            }
        }
        let before = counts(&t.db).await;
        assert_eq!(before, [2, 2, 6], "{backend:?}: rows inserted");

        let newest_first: Vec<String> = names[2..].iter().rev().cloned().collect();
        let above = u32::try_from(MIGRATIONS - 2).expect("few migrations");
        down(&t, Some(above), &newest_first, "down to add_version_fields_for_concurrency").await;
        assert_schema_at(&t, 2, "at add_version_fields_for_concurrency").await;
        assert_eq!(counts(&t.db).await, before, "{backend:?}: rows kept down to it");

        down(
            &t,
            Some(1),
            std::slice::from_ref(version_migration),
            "down add_version_fields_for_concurrency",
        )
        .await;
        assert_schema_at(&t, 1, "below add_version_fields_for_concurrency").await;
        let manager = SchemaManager::new(&t.db);
        for (table, column) in added_by(1).1 {
            let has = manager
                .has_column(&table, &column)
                .await
                .expect("has_column");
            assert!(!has, "{backend:?}: {table}.{column} is gone");
        }
        assert_eq!(
            counts(&t.db).await,
            before,
            "{backend:?}: rows kept by rolling back add_version_fields_for_concurrency"
        );
    }
);

each_backend!(
    empty: /// Rolling back `add_needs` removes the dependency tables, the index and the counters,
    /// and keeps every run, epic and story, including those that had needs.
    async fn migrating_down_add_needs_removes_the_dependencies_and_keeps_every_other_row(t) {
        let backend = t.backend;
        let names = migration::migration_names();
        let needs_at = names
            .iter()
            .position(|n| n.ends_with("add_needs"))
            .expect("an add_needs migration");
        let above: Vec<String> = names[needs_at..].iter().rev().cloned().collect();
        up(&t, None, &names, "up to latest").await;
        let run = run_engine_tests::RunFactory::new().epics(2).stories(3).create(&t.db).await;
        let stories = &run.stories;
        run_domain::create_needs(
            &t.db,
            run.id(),
            &[run_domain::StoryNeed { story: stories[1], needs: stories[0] }],
            &[run_domain::EpicNeed { epic: run.epics[1].id, needs: run.epics[0].id }],
        )
        .await
        .unwrap_or_else(|e| panic!("{backend:?}: creating needs: {e}"));
        let story = |id| {
            let db = &t.db;
            async move {
                entity::run_story::Entity::find_by_id(id)
                    .one(db)
                    .await
                    .expect("read")
                    .expect("story")
            }
        };
        assert_eq!(story(stories[1]).await.unmet_needs, 1, "{backend:?}: one story need");
        assert_eq!(story(stories[0]).await.needed_by, 1, "{backend:?}: needed once");
        assert_eq!(story(stories[4]).await.unmet_needs, 1, "{backend:?}: one epic need");
        let before = counts(&t.db).await;
        let n = u32::try_from(above.len()).expect("few migrations");
        down(&t, Some(n), &above, "down through add_needs").await;
        assert_schema_at(&t, needs_at, "below add_needs").await;
        assert_eq!(counts(&t.db).await, before, "{backend:?}: rows kept by rolling back add_needs");
        let again: Vec<String> = names[needs_at..].to_vec();
        up(&t, None, &again, "up add_needs again").await;
        assert_eq!(story(stories[1]).await.unmet_needs, 0, "{backend:?}: counters start at 0");
    }
);

//! `cargo xtask migrate` as a process: several at once against one database apply each
//! migration exactly once and never print a password; `migrate status` tells pending from
//! applied by its exit code.
//!
//! PostgreSQL and MariaDB come from `RUN_ENGINE_TEST_POSTGRES_URL` and
//! `RUN_ENGINE_TEST_MYSQL_URL` (see `run_engine_tests`).

use run_engine_tests::{Backend, TestDb};
use sea_orm::{ConnectionTrait, Statement};
use std::process::Output;
use tokio::process::Command;

/// How many `cargo xtask migrate` processes race each other.
const PROCESSES: usize = 4;

/// A dummy password: trust authentication on the test PostgreSQL server ignores it, and no
/// output may ever contain it.
const PASSWORD: &str = "hunter2";

/// `xtask` with `args`, in a scratch working directory (so no `.env` file is read) and without
/// `DATABASE_URL`.
fn xtask(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("DATABASE_URL")
        .kill_on_drop(true);
    cmd
}

/// Runs `xtask` with `args` to completion.
async fn run(args: &[&str]) -> Output {
    xtask(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run xtask {args:?}: {e}"))
}

/// Everything a process printed, for assertions and failure messages.
fn printed(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts [`PROCESSES`] `xtask migrate up` processes at once against `url`, waits for all of
/// them, and returns what each printed. Each must exit 0.
async fn migrate_concurrently(backend: Backend, url: &str) -> Vec<String> {
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            xtask(&["migrate", "up", "--database-url", url])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{backend:?}: cannot start xtask process {i}: {e}"))
        })
        .collect();
    let mut outputs = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child
            .wait_with_output()
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: waiting for xtask process {i}: {e}"));
        let text = printed(&out);
        assert!(
            out.status.success(),
            "{backend:?}: xtask migrate process {i} of {PROCESSES} failed:\n{text}"
        );
        outputs.push(text);
    }
    outputs
}

/// Asserts that `seaql_migrations` lists every migration exactly once.
async fn assert_each_migration_recorded_once(t: &TestDb) {
    let backend = t.backend;
    let rows =
        t.db.query_all_raw(Statement::from_string(
            t.db_backend(),
            "SELECT version FROM seaql_migrations ORDER BY version",
        ))
        .await
        .unwrap_or_else(|e| panic!("{backend:?}: reading seaql_migrations: {e}"));
    let recorded: Vec<String> = rows
        .iter()
        .map(|row| {
            row.try_get("", "version")
                .unwrap_or_else(|e| panic!("{backend:?}: reading a version: {e}"))
        })
        .collect();
    assert_eq!(
        recorded,
        migration::migration_names(),
        "{backend:?}: each migration recorded exactly once"
    );
}

/// Each process applied some migrations (possibly none) and together they applied each one
/// exactly once.
fn assert_each_migration_applied_by_one_process(backend: Backend, outputs: &[String]) {
    for name in migration::migration_names() {
        // `applied  <name>` at the start of a line; the status table indents its lines.
        let line = format!("applied  {name}");
        let by = outputs
            .iter()
            .flat_map(|o| o.lines())
            .filter(|l| *l == line)
            .count();
        assert_eq!(
            by,
            1,
            "{backend:?}: {name} applied by {by} processes, not one:\n{}",
            outputs.join("\n")
        );
    }
    for out in outputs {
        assert!(
            out.contains(&format!(
                "{} applied, 0 pending",
                migration::migration_names().len()
            )),
            "{backend:?}: a process ended with migrations still pending:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_migrates_on_postgres_apply_each_migration_once_and_never_print_the_password()
 {
    let Some(t) = TestDb::empty(Backend::Postgres).await else {
        return;
    };
    let mut url = url::Url::parse(&t.url).expect("the test database URL parses");
    url.set_password(Some(PASSWORD))
        .expect("a PostgreSQL URL can hold a password");
    let url = url.to_string();
    assert!(
        url.contains(&format!(":{PASSWORD}@")),
        "{url} has the password"
    );

    let outputs = migrate_concurrently(Backend::Postgres, &url).await;
    assert_each_migration_recorded_once(&t).await;
    assert_each_migration_applied_by_one_process(Backend::Postgres, &outputs);
    for out in &outputs {
        assert!(
            !out.contains(PASSWORD),
            "Postgres: xtask migrate printed the password:\n{out}"
        );
        assert!(
            out.contains(":***@"),
            "Postgres: xtask migrate did not show the redacted URL:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_migrates_on_a_new_sqlite_file_apply_each_migration_once() {
    // Two commands started at once on a database file that does not exist yet (`run` in one
    // terminal, `serve` in another) both migrate it.
    let Some(t) = TestDb::empty(Backend::Sqlite).await else {
        return;
    };
    let outputs = migrate_concurrently(Backend::Sqlite, &t.url).await;
    assert_each_migration_recorded_once(&t).await;
    assert_each_migration_applied_by_one_process(Backend::Sqlite, &outputs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_migrates_on_mariadb_apply_each_migration_once() {
    let Some(t) = TestDb::empty(Backend::MySql).await else {
        return;
    };
    let outputs = migrate_concurrently(Backend::MySql, &t.url).await;
    assert_each_migration_recorded_once(&t).await;
    assert_each_migration_applied_by_one_process(Backend::MySql, &outputs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_status_exits_non_zero_while_migrations_are_pending_and_zero_once_applied() {
    let Some(t) = TestDb::empty(Backend::Sqlite).await else {
        return;
    };
    let names = migration::migration_names();
    let total = names.len();
    assert!(total >= 4, "the migration list lost entries: {names:?}");

    let before = run(&["migrate", "status", "--database-url", &t.url]).await;
    let text = printed(&before);
    assert!(
        !before.status.success(),
        "status on a fresh database exits non-zero:\n{text}"
    );
    assert!(
        text.contains(&format!("0 applied, {total} pending")),
        "{text}"
    );
    for name in &names {
        assert!(
            text.contains(&format!("pending  {name}")),
            "{name}:\n{text}"
        );
    }
    assert!(
        text.contains(&format!(
            "{total} migration(s) pending: run `cargo xtask migrate`"
        )),
        "{text}"
    );

    let up = run(&["migrate", "--database-url", &t.url]).await;
    let text = printed(&up);
    assert!(up.status.success(), "migrate exits 0:\n{text}");
    assert!(
        text.contains(&format!("{total} applied, 0 pending")),
        "{text}"
    );

    let after = run(&["migrate", "status", "--database-url", &t.url]).await;
    let text = printed(&after);
    assert!(
        after.status.success(),
        "status once migrated exits 0:\n{text}"
    );
    assert!(
        text.contains(&format!("{total} applied, 0 pending")),
        "{text}"
    );
    for name in &names {
        assert!(
            text.contains(&format!("applied  {name}")),
            "{name}:\n{text}"
        );
    }
}

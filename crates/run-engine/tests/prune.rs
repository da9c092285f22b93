//! Retention on every backend: `run-engine prune --finished-before` deletes a finished run of
//! 10,000 log lines, every row of it, while another run executes untouched; `--dry-run`
//! deletes nothing.

mod common;

use common::{ExecProcess, cli, create, wait_for};
use run_engine_tests::each_backend;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use std::time::Duration;
use uuid::Uuid;

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write plan");
    path
}

/// How many rows of each table belong to the run.
async fn rows_of(db: &DatabaseConnection, run_id: Uuid) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for (table, column) in [
        ("run", "id"),
        ("run_epic", "run_id"),
        ("run_story", "run_id"),
        ("run_log", "run_id"),
        ("run_log_head", "run_id"),
        ("run_story_need", "run_id"),
    ] {
        let select = Query::select()
            .expr(Expr::cust("COUNT(*)"))
            .from(Alias::new(table))
            .and_where(Expr::col(Alias::new(column)).eq(run_id))
            .to_owned();
        let row = db.query_one(&select).await.expect("count").expect("row");
        out.push((table, row.try_get_by_index::<i64>(0).expect("n")));
    }
    out
}

each_backend! {
    async fn prune_removes_a_finished_run_while_another_executes(t) {
        let dir = tempfile::tempdir().expect("dir");
        let noisy = write(
            dir.path(),
            "noisy.toml",
            "name = \"noisy\"\n[[epics]]\nkey = \"e\"\n\
             [[epics.stories]]\nkey = \"a\"\ncommand = \"seq 1 5000\"\n\
             [[epics.stories]]\nkey = \"b\"\ncommand = \"seq 1 5000\"\nneeds = [\"a\"]\n",
        );
        let (status, _, stderr) = cli(&t.url, &["run", noisy.to_str().expect("path"), "-w", "2"]);
        assert!(status.success(), "{stderr}");
        let noisy_id: Uuid = stderr
            .lines()
            .find_map(|l| l.strip_prefix("created run "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .expect("the run id");
        let before = rows_of(&t.db, noisy_id).await;
        assert!(before.iter().any(|&(table, n)| table == "run_log" && n > 10_000), "{before:?}");

        // Another run executes meanwhile.
        let other_plan = write(
            dir.path(),
            "other.toml",
            "name = \"other\"\n[[epics]]\nkey = \"e\"\n\
             [[epics.stories]]\nkey = \"slow\"\ncommand = \"echo one; sleep 2; echo two\"\n\
             [[epics.stories]]\nkey = \"quick\"\ncommand = \"echo quick\"\n",
        );
        let other = create(&t.url, &other_plan);
        let mut exec = ExecProcess::start(&t.url, other, 2, 30, dir.path());
        let db = t.db.clone();
        wait_for("the other run to be running", Duration::from_secs(30), || {
            let db = db.clone();
            async move { common::count_status(&db, other, "running").await >= 1 }
        })
        .await;

        let (status, stdout, stderr) =
            cli(&t.url, &["prune", "--finished-before", "0s", "--dry-run"]);
        assert!(status.success(), "{stderr}");
        assert!(stdout.starts_with("would prune 1 run (1 epic, 2 stories, "), "{stdout}");
        assert_eq!(rows_of(&t.db, noisy_id).await, before, "--dry-run deleted nothing");

        let (status, stdout, stderr) = cli(&t.url, &["prune", "--finished-before", "0s"]);
        assert!(status.success(), "{stderr}");
        assert!(stdout.starts_with("pruned 1 run (1 epic, 2 stories, "), "{stdout}");
        assert!(
            rows_of(&t.db, noisy_id).await.iter().all(|&(_, n)| n == 0),
            "every row of the pruned run is gone: {:?}",
            rows_of(&t.db, noisy_id).await
        );
        let (status, stdout, _) = cli(&t.url, &["prune", "--finished-before", "30d"]);
        assert!(status.success() && stdout.starts_with("pruned 0 runs"), "{stdout}");

        let status = exec.wait(Duration::from_secs(60)).await;
        assert!(status.success(), "{}", exec.stderr_text());
        assert_eq!(common::count_status(&t.db, other, "completed").await, 2);
        let log = common::log_text(&t.db, other).await;
        assert!(log.contains("[e/slow] two") && log.contains("run other completed"), "{log}");
    }
}

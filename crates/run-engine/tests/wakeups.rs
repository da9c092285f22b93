//! Wake-ups on PostgreSQL: idle workers in other processes, polling only once a minute, start
//! a story within seconds of it becoming claimable (a notification wakes them); without
//! listening they do not. A listener whose connection is killed listens again, and a story made
//! claimable meanwhile still runs (by the poll).

mod common;

use common::{ExecProcess, cli, create, wait_for};
use run_engine_tests::{Backend, TestDb};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A run of `n` stories that each hold limit `gate` (capacity 0: none may start) and sleep.
fn gated(dir: &Path, gate: &str, n: usize) -> std::path::PathBuf {
    let mut text = format!("name = \"gated\"\n[limits]\n{gate} = 0\n[[epics]]\nkey = \"e\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[epics.stories]]\nkey = \"s{i}\"\ncommand = \"sleep 60\"\nlimits = [\"{gate}\"]\n"
        ));
    }
    let path = dir.join(format!("{gate}.toml"));
    std::fs::write(&path, text).expect("write plan");
    path
}

/// The listening connections on this test's database, by backend pid.
async fn listeners(db: &DatabaseConnection) -> Vec<i32> {
    db.query_all_raw(Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND query ILIKE 'LISTEN%' ORDER BY pid",
    ))
    .await
    .expect("read pg_stat_activity")
    .iter()
    .map(|r| r.try_get_by_index::<i32>(0).expect("pid"))
    .collect()
}

async fn running(db: &DatabaseConnection, run_id: Uuid) -> usize {
    common::count_status(db, run_id, "running").await
}

fn set(url: &str, gate: &str, capacity: usize) {
    let (status, _, stderr) = cli(url, &["limits", "set", gate, &capacity.to_string()]);
    assert!(status.success(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_workers_in_other_processes_wake_within_seconds() {
    let Some(t) = TestDb::migrated(Backend::Postgres).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    // Control: a process that does not listen, polling once a minute, misses it. Its one
    // worker has looked and found the gate shut once it has completed the warm-up story.
    let plan = gated(dir.path(), "deaf", 1);
    let text = std::fs::read_to_string(&plan).expect("read plan")
        + "[[epics.stories]]\nkey = \"warm\"\ncommand = \"true\"\n";
    std::fs::write(&plan, text).expect("write plan");
    let control = create(&t.url, &plan);
    // Already running, so that its run watch sees no change to wake the worker.
    run_engine::start_run(&t.db, control)
        .await
        .expect("start run");
    let mut deaf = [ExecProcess::start_with(
        &t.url,
        control,
        1,
        30,
        dir.path(),
        &["--poll", "60s", "--no-listen"],
    )];
    let db = t.db.clone();
    wait_for("the warm-up story", Duration::from_secs(30), || {
        let db = db.clone();
        async move { common::count_status(&db, control, "completed").await == 1 }
    })
    .await;
    set(&t.url, "deaf", 1);
    let opened = Instant::now();
    while opened.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            running(&t.db, control).await,
            0,
            "control: a deaf process started it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let run_id = create(&t.url, &gated(dir.path(), "gate", 10));
    let mut procs: Vec<ExecProcess> = (0..2)
        .map(|_| ExecProcess::start_with(&t.url, run_id, 6, 30, dir.path(), &["--poll", "60s"]))
        .collect();
    wait_for("both processes to listen", Duration::from_secs(30), || {
        let db = db.clone();
        async move { listeners(&db).await.len() >= 2 }
    })
    .await;
    for i in 1..=10 {
        set(&t.url, "gate", i);
        let opened = Instant::now();
        wait_for(
            &format!("story {i} to start within 5 s of its slot opening"),
            Duration::from_secs(5),
            || {
                let db = db.clone();
                async move { running(&db, run_id).await >= i }
            },
        )
        .await;
        assert!(opened.elapsed() < Duration::from_secs(5));
    }
    for run in [run_id, control] {
        let (status, _, stderr) = cli(&t.url, &["cancel", &run.to_string()]);
        assert!(status.success(), "{stderr}");
    }
    for p in procs.iter_mut().chain(deaf.iter_mut()) {
        p.wait(Duration::from_secs(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_listener_listens_again_and_the_poll_covers_the_gap() {
    let Some(t) = TestDb::migrated(Backend::Postgres).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let run_id = create(&t.url, &gated(dir.path(), "kill", 2));
    let mut exec = ExecProcess::start_with(&t.url, run_id, 2, 30, dir.path(), &["--poll", "2s"]);
    let db = t.db.clone();
    wait_for("the process to listen", Duration::from_secs(30), || {
        let db = db.clone();
        async move { listeners(&db).await.len() == 1 }
    })
    .await;
    let before = listeners(&t.db).await;
    let killed: bool =
        t.db.query_one_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT pg_terminate_backend({})", before[0]),
        ))
        .await
        .expect("terminate")
        .expect("row")
        .try_get_by_index(0)
        .expect("bool");
    assert!(killed);
    // Made claimable while the listener may be down: the poll finds it.
    set(&t.url, "kill", 1);
    wait_for(
        "the story to start by the poll",
        Duration::from_secs(15),
        || {
            let db = db.clone();
            async move { running(&db, run_id).await == 1 }
        },
    )
    .await;
    wait_for(
        "the process to listen again",
        Duration::from_secs(30),
        || {
            let db = db.clone();
            let before = before.clone();
            async move {
                let now = listeners(&db).await;
                now.len() == 1 && now != before
            }
        },
    )
    .await;
    let (status, _, stderr) = cli(&t.url, &["cancel", &run_id.to_string()]);
    assert!(status.success(), "{stderr}");
    exec.wait(Duration::from_secs(60)).await;
    assert!(
        exec.stderr_text().contains("listening for wake-ups failed"),
        "{}",
        exec.stderr_text()
    );
}

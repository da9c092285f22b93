//! The executor in-process, on every backend: retries and failures, stories of dead workers
//! (taken over, or failed when out of attempts), fencing of a worker whose lease was taken
//! over, and the shell handler's output and clean-up.

use async_trait::async_trait;
use entity::{run, run_epic, run_story};
use run_domain::VersionedUpdate;
use run_engine::{
    Executor, ExecutorConfig, ExecutorEvent, Lease, Release, ShellHandler, StoryContext,
    StoryHandler, StoryOutcome, TryClaim, release, try_claim,
};
use run_engine_tests::{RunFactory, each_backend};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

/// A run `r` with one epic `e` of the given stories (key, command, max attempts).
async fn run_with(db: &DatabaseConnection, stories: &[(&str, &str, i32)]) -> Uuid {
    let mut run = RunFactory::new().key("r").epic("e");
    for (key, command, max_attempts) in stories {
        run = run.story(key, command, *max_attempts);
    }
    run.create(db).await.id()
}

async fn story(db: &DatabaseConnection, run_id: Uuid, key: &str) -> run_story::Model {
    run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Key.eq(key))
        .one(db)
        .await
        .expect("read")
        .expect("story")
}

async fn run_row(db: &DatabaseConnection, run_id: Uuid) -> run::Model {
    run::Entity::find_versioned(db, run_id).await.expect("run")
}

fn quick() -> ExecutorConfig {
    ExecutorConfig::default()
        .workers(2)
        .poll_interval(Duration::from_millis(50))
}

/// Fails every attempt of a story whose command is "fail", and the first attempt of one whose
/// command is "flaky".
struct Scripted;

#[async_trait]
impl StoryHandler for Scripted {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        ctx.log.line(format!("attempt {}", ctx.attempt)).await;
        match ctx.story.command.as_deref() {
            Some("fail") => StoryOutcome::Failed {
                error: format!("failed on attempt {}", ctx.attempt),
            },
            Some("flaky") if ctx.attempt == 1 => StoryOutcome::Failed {
                error: "flaked".into(),
            },
            _ => StoryOutcome::Completed,
        }
    }
}

each_backend! {
    /// A failed attempt goes back to pending while attempts remain; a story out of attempts
    /// fails, and with it its epic and the run.
    async fn failed_attempts_are_retried_until_attempts_run_out_then_fail_epic_and_run(t) {
        let run_id = run_with(&t.db, &[("ok", "ok", 1), ("flaky", "flaky", 2), ("bad", "fail", 3)]).await;
        let summary = Executor::new(t.db.clone(), Scripted, quick()).execute(run_id).await.expect("execute");
        assert_eq!(summary.run_status, "failed", "{summary}");
        assert_eq!((summary.counts.completed, summary.counts.failed), (2, 1));
        assert_eq!(summary.recorded, 1 + 2 + 3, "every attempt was recorded");

        let flaky = story(&t.db, run_id, "flaky").await;
        assert_eq!((flaky.status.as_str(), flaky.attempts, flaky.error.as_deref()), ("completed", 2, None));
        let bad = story(&t.db, run_id, "bad").await;
        assert_eq!((bad.status.as_str(), bad.attempts), ("failed", 3));
        assert_eq!(bad.error.as_deref(), Some("failed on attempt 3"));
        let epic = run_epic::Entity::find().filter(run_epic::Column::RunId.eq(run_id))
            .one(&t.db).await.expect("read").expect("epic");
        assert_eq!((epic.status.as_str(), epic.error.as_deref()), ("failed", Some("1 of 3 stories failed")));
        let run = run_row(&t.db, run_id).await;
        assert_eq!((run.status.as_str(), run.error.as_deref()), ("failed", Some("1 of 3 stories failed")));
        let log = run_domain::read_run_log(&t.db, run_id).await.expect("log");
        assert!(log.contains("[e/flaky] attempt 1 of 2 failed after"), "{log}");
        assert!(log.contains("flaked; will retry"), "{log}");
        assert!(log.contains("[e/bad] failed after"), "{log}");
        assert!(log.contains("run r failed: 1 of 3 stories failed"), "{log}");
    }
}

each_backend! {
    /// A story left running by a dead worker: taken over when attempts remain, failed when not.
    async fn a_dead_workers_story_is_taken_over_or_failed_when_out_of_attempts(t) {
        let run_id = run_with(&t.db, &[("last", "ok", 1), ("again", "ok", 2)]).await;
        // A worker claims both with a lease that is over at once, then "dies".
        let dead = Lease::new("dead-worker", Duration::ZERO);
        for key in ["last", "again"] {
            let s = story(&t.db, run_id, key).await;
            assert!(matches!(
                try_claim(&t.db, &s, &dead, chrono::Utc::now()).await.expect("claim"),
                TryClaim::Claimed(_)
            ));
        }
        let summary = Executor::new(t.db.clone(), Scripted, quick()).execute(run_id).await.expect("execute");
        assert_eq!(summary.run_status, "failed", "{summary}");

        let last = story(&t.db, run_id, "last").await;
        assert_eq!((last.status.as_str(), last.attempts), ("failed", 1));
        assert_eq!(
            last.error.as_deref(),
            Some("the lease of dead-worker expired during attempt 1 of 1; no attempts left")
        );
        let again = story(&t.db, run_id, "again").await;
        assert_eq!((again.status.as_str(), again.attempts), ("completed", 2));
        assert_ne!(again.lease_owner.as_deref(), Some("dead-worker"));
        let log = run_domain::read_run_log(&t.db, run_id).await.expect("log");
        assert!(log.contains("[e/again] took over from the expired lease of dead-worker: attempt 2 of 2"), "{log}");
    }
}

/// Waits to be told to finish, then says it completed.
struct Blocking(std::sync::Arc<Notify>);

#[async_trait]
impl StoryHandler for Blocking {
    async fn run(&self, _ctx: StoryContext) -> StoryOutcome {
        self.0.notified().await;
        StoryOutcome::Completed
    }
}

each_backend! {
    /// A worker whose lease ran out (it did not renew in time) and was taken over cannot
    /// record its result: it is fenced off, and the taker's result stands.
    async fn a_worker_whose_lease_was_taken_over_records_nothing(t) {
        let run_id = run_with(&t.db, &[("s", "ok", 3)]).await;
        let release_handler = std::sync::Arc::new(Notify::new());
        let mut config = quick().workers(1).lease(Duration::from_millis(300));
        // Renew far too late, as a stalled process would.
        config.renew_every = Duration::from_secs(3600);
        let executor = Executor::new(t.db.clone(), Blocking(release_handler.clone()), config);
        let mut events = executor.subscribe();
        let task = tokio::spawn({
            let executor = executor.clone();
            async move { executor.execute(run_id).await }
        });

        // Wait until the worker runs the story and its lease has run out, then take it over.
        let thief = Lease::new("thief", Duration::from_secs(60));
        let taken = loop {
            let s = story(&t.db, run_id, "s").await;
            if run_engine::lease::lease_expired(&s, chrono::Utc::now())
                && let TryClaim::Claimed(c) =
                    try_claim(&t.db, &s, &thief, chrono::Utc::now()).await.expect("claim")
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(taken.taken_over_from.as_deref().map(|o| o.ends_with("-0")), Some(true));
        release_handler.notify_one();
        loop {
            match events.recv().await.expect("event") {
                ExecutorEvent::Fenced { .. } => break,
                ExecutorEvent::Finished { .. } => panic!("the fenced worker recorded a result"),
                _ => {}
            }
        }
        let unchanged = story(&t.db, run_id, "s").await;
        assert_eq!(unchanged, taken.story, "the fenced worker changed nothing");
        release(&t.db, &taken.story, Release::Completed).await.expect("the taker records");

        let summary = tokio::time::timeout(Duration::from_secs(30), task)
            .await.expect("executor ends").expect("task").expect("execute");
        assert_eq!((summary.fenced, summary.recorded), (1, 0), "{summary}");
        assert_eq!(summary.run_status, "completed");
        let done = story(&t.db, run_id, "s").await;
        assert_eq!((done.status.as_str(), done.lease_owner.as_deref(), done.attempts), ("completed", Some("thief"), 2));
    }
}

each_backend! {
    /// The shell handler: output and standard error reach the log, a failure quotes the exit
    /// status and standard error, and a command that leaves a process behind holding its
    /// output still finishes.
    async fn shell_stories_log_their_output_and_finish_despite_leftover_processes(t) {
        let run_id = run_with(&t.db, &[
            ("hello", "echo \"hello from $RUN_ENGINE_EPIC/$RUN_ENGINE_STORY attempt $RUN_ENGINE_ATTEMPT\"", 1),
            ("broken", "echo oops >&2; exit 7", 1),
            ("leftover", "sleep 60 & echo started", 1),
        ]).await;
        let started = std::time::Instant::now();
        let summary = Executor::new(t.db.clone(), ShellHandler::default(), quick().workers(3))
            .execute(run_id).await.expect("execute");
        assert!(started.elapsed() < Duration::from_secs(20), "the leftover sleep was ended");
        assert_eq!((summary.counts.completed, summary.counts.failed), (2, 1), "{summary}");
        let broken = story(&t.db, run_id, "broken").await;
        assert_eq!(broken.error.as_deref(), Some("exit status 7: oops"));
        let log = run_domain::read_run_log(&t.db, run_id).await.expect("log");
        assert!(log.contains("[e/hello] hello from e/hello attempt 1"), "{log}");
        assert!(log.contains("[e/broken] stderr: oops"), "{log}");
        assert!(log.contains("[e/leftover] started"), "{log}");
        assert_eq!(story(&t.db, run_id, "leftover").await.status, "completed");
    }
}

/// 32 story handles on one run's log each queue 5 lines and flush at once: with one shared
/// writer ([`LogSink::with_prefix`]) the flushes are served together, in a few transactions;
/// with a writer per story (what the executor did before) each flush is a transaction of its
/// own. Either way every line is there once, each story's lines in order.
async fn flushes_are_served_together(t: run_engine_tests::TestDb) {
    const STORIES: usize = 32;
    const LINES: usize = 5;
    let run_id = run_with(&t.db, &[("s", "ok", 1)]).await;
    let root = run_engine::LogSink::start(t.db.clone(), run_id, "");
    let mut batches_seen = Vec::new();
    for shared in [true, false] {
        let mut tasks = tokio::task::JoinSet::new();
        for s in 0..STORIES {
            let prefix = format!("[{shared}/{s}] ");
            let sink = if shared {
                root.with_prefix(prefix)
            } else {
                run_engine::LogSink::start(t.db.clone(), run_id, prefix)
            };
            tasks.spawn(async move {
                for n in 0..LINES {
                    sink.line(format!("line {n}")).await;
                }
                sink.flush().await
            });
        }
        while let Some(flushed) = tasks.join_next().await {
            flushed.expect("task").expect("flush");
        }
        let entries =
            run_domain::read_run_log_after(&t.db, run_id, run_domain::LogCursor::START, 100_000)
                .await
                .expect("read")
                .entries;
        let ours: Vec<_> = entries
            .iter()
            .filter(|e| e.message.starts_with(&format!("[{shared}/")))
            .collect();
        assert_eq!(ours.len(), STORIES * LINES, "every line once");
        for s in 0..STORIES {
            let lines: Vec<&str> = ours
                .iter()
                .filter_map(|e| e.message.strip_prefix(&format!("[{shared}/{s}] ")))
                .collect();
            let expected: Vec<String> = (0..LINES).map(|n| format!("line {n}")).collect();
            assert_eq!(lines, expected, "story {s}'s lines, in order");
        }
        let batches: std::collections::HashSet<Uuid> = ours.iter().map(|e| e.batch_id).collect();
        batches_seen.push(batches.len());
    }
    let (shared, separate) = (batches_seen[0], batches_seen[1]);
    assert_eq!(
        separate, STORIES,
        "a writer per story: a transaction per flush"
    );
    assert!(
        shared <= STORIES / 8,
        "one shared writer: {shared} transactions for {STORIES} flushes"
    );
}

// One thread: the 32 tasks queue their lines and flushes before the writer runs, so how many
// are served together does not depend on thread timing.
#[tokio::test]
async fn flushes_are_served_together_sqlite() {
    if let Some(t) = run_engine_tests::TestDb::migrated(run_engine_tests::Backend::Sqlite).await {
        flushes_are_served_together(t).await;
    }
}

#[tokio::test]
async fn flushes_are_served_together_postgres() {
    if let Some(t) = run_engine_tests::TestDb::migrated(run_engine_tests::Backend::Postgres).await {
        flushes_are_served_together(t).await;
    }
}

#[tokio::test]
async fn flushes_are_served_together_mysql() {
    if let Some(t) = run_engine_tests::TestDb::migrated(run_engine_tests::Backend::MySql).await {
        flushes_are_served_together(t).await;
    }
}

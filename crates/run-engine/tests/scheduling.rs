//! Scheduling on every backend: retry delays (spaced attempts, no claim statement while a
//! story waits), priorities (claimed highest first), concurrency limits shared by every
//! process (never more running than the limit, all keys or none, slots of a killed process
//! come back), pausing in one process seen by another, and cancelling one story.

mod common;

use common::{ExecProcess, cli, create, log_text, wait_for};
use entity::run_story;
use run_domain::{LogEntry, StoryStatus, TransitionError, transition_with};
use run_engine::{
    Executor, ExecutorConfig, Lease, Plan, ShellHandler, TryClaim, create_run_from_plan, try_claim,
};
use run_engine_tests::each_backend;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The run's log lines in commit order.
async fn entries(db: &DatabaseConnection, run_id: Uuid) -> Vec<LogEntry> {
    let mut all = Vec::new();
    let mut cursor = run_domain::LogCursor::START;
    loop {
        let page = run_domain::read_run_log_after(db, run_id, cursor, 1000)
            .await
            .expect("read log");
        if page.entries.is_empty() {
            return all;
        }
        cursor = page.next;
        all.extend(page.entries);
    }
}

async fn story(db: &DatabaseConnection, run_id: Uuid, key: &str) -> run_story::Model {
    run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Key.eq(key))
        .one(db)
        .await
        .expect("read story")
        .expect("story exists")
}

async fn limit(db: &DatabaseConnection, name: &str) -> run_domain::LimitUse {
    run_domain::find_limit(db, name)
        .await
        .expect("read limit")
        .expect("limit exists")
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write plan");
    path
}

/// When each attempt of `key` started: the batch times of its `start N` lines.
fn starts(log: &[LogEntry], key: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    log.iter()
        .filter(|e| e.message.starts_with(&format!("[e/{key}] start ")))
        .map(|e| e.logged_at)
        .collect()
}

each_backend! {
    /// A story failing 3 times with `delay = "1s"`, exponential: its attempts start at least
    /// 1 s and then 2 s apart (from the log's order and timestamps), and while it waits the
    /// executor sends no claim statement for it (at most one per attempt, plus a small bound).
    /// Control: the same story without a delay is tried again at once.
    async fn failed_attempts_wait_their_retry_delay_without_claims_in_between(t) {
        let text = |retry: &str| {
            format!(
                "name = \"flaky\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\nkey = \"s\"\n\
                 max_attempts = 3\n{retry}command = \"echo start $RUN_ENGINE_ATTEMPT; exit 1\"\n"
            )
        };
        let config = ExecutorConfig::default()
            .workers(2)
            .poll_interval(Duration::from_millis(50));
        let delayed = Plan::parse(
            &text("retry = { delay = \"1s\", backoff = \"exponential\", jitter = false }\n"),
            "flaky.toml",
        )
        .expect("plan");
        let run = create_run_from_plan(&t.db, &delayed).await.expect("create");
        let summary = Executor::new(t.db.clone(), ShellHandler::default(), config.clone())
            .execute(run.id)
            .await
            .expect("execute");
        assert_eq!(summary.run_status, "failed", "{summary}");
        let log = entries(&t.db, run.id).await;
        let at = starts(&log, "s");
        assert_eq!(at.len(), 3, "three attempts: {log:?}");
        let gaps: Vec<i64> = at.windows(2).map(|w| (w[1] - w[0]).num_milliseconds()).collect();
        assert!(gaps[0] >= 1000 && gaps[1] >= 2000, "attempt gaps {gaps:?} ms");
        let text_log: Vec<&str> = log.iter().map(|e| e.message.as_str()).collect();
        assert!(
            text_log.iter().any(|l| l.contains("failed after") && l.contains("will retry at")),
            "{text_log:?}"
        );
        // Two workers idle for 3 s at a 50 ms poll would send ~120 claims without the filter,
        // and read ~120 times: they sleep until the delay passes instead (each failure, and
        // on PostgreSQL its notification, wakes them for a look or two).
        assert!(summary.claims_tried <= 3 + 3, "{} claim statements", summary.claims_tried);
        assert!(summary.looks <= 60, "{} looks for work", summary.looks);

        let at_once = Plan::parse(&text(""), "flaky.toml").expect("plan");
        let run = create_run_from_plan(&t.db, &at_once).await.expect("create");
        Executor::new(t.db.clone(), ShellHandler::default(), config)
            .execute(run.id)
            .await
            .expect("execute");
        let at = starts(&entries(&t.db, run.id).await, "s");
        assert_eq!(at.len(), 3);
        assert!(
            (at[2] - at[0]).num_milliseconds() < 1000,
            "control: without a delay the attempts follow at once: {at:?}"
        );
    }
}

each_backend! {
    /// One worker, ready stories of mixed priorities (on the story, or from its epic): claimed
    /// highest first, ties in plan order. Control: plan order alone would differ.
    async fn one_worker_claims_in_priority_order(t) {
        let dir = tempfile::tempdir().expect("dir");
        let plan = write(
            dir.path(),
            "p.toml",
            "name = \"prio\"\n\
             [[epics]]\nkey = \"a\"\npriority = 4\n\
             [[epics.stories]]\nkey = \"s1\"\ncommand = \"true\"\n\
             [[epics.stories]]\nkey = \"s2\"\ncommand = \"true\"\npriority = 9\n\
             [[epics.stories]]\nkey = \"s3\"\ncommand = \"true\"\npriority = -1\n\
             [[epics]]\nkey = \"b\"\n\
             [[epics.stories]]\nkey = \"s4\"\ncommand = \"true\"\n\
             [[epics.stories]]\nkey = \"s5\"\ncommand = \"true\"\npriority = 4\n\
             [[epics.stories]]\nkey = \"s6\"\ncommand = \"true\"\npriority = 7\n",
        );
        let (status, _, stderr) = cli(&t.url, &["run", plan.to_str().expect("path"), "-w", "1"]);
        assert!(status.success(), "{stderr}");
        let mut all = run_story::Entity::find()
            .order_by_asc(run_story::Column::StartedAt)
            .all(&t.db)
            .await
            .expect("read");
        all.sort_by_key(|s| s.started_at);
        let order: Vec<(String, i32)> = all.iter().map(|s| (s.key.clone(), s.priority)).collect();
        let priorities: Vec<i32> = order.iter().map(|(_, p)| *p).collect();
        let mut sorted = priorities.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(priorities, sorted, "claimed in priority order: {order:?}");
        assert_eq!(priorities, [9, 7, 4, 4, 0, -1], "{order:?}");
        // Plan order would have been s1..s6 (priorities 4, 9, -1, 0, 4, 7): not sorted.
        assert_ne!(vec![4, 9, -1, 0, 4, 7], sorted);
    }
}

/// The most stories running at once by the log's `start`/`end` marks, read in commit order.
fn most_at_once(log: &[LogEntry]) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in log {
        if e.message.ends_with("] start") {
            now += 1;
            most = most.max(now);
        } else if e.message.ends_with("] end") {
            now = now.saturating_sub(1);
        }
    }
    most
}

fn limited_plan(stories: usize, limit: Option<u32>) -> String {
    let mut text = String::from("name = \"limited\"\n");
    if let Some(n) = limit {
        text.push_str(&format!("[limits]\nllm = {n}\n"));
    }
    text.push_str("[[epics]]\nkey = \"e\"\n");
    for i in 0..stories {
        text.push_str(&format!(
            "[[epics.stories]]\nkey = \"s{i}\"\ncommand = \"echo start; sleep 0.2; echo end\"\n"
        ));
        if limit.is_some() {
            text.push_str("limits = [\"llm\"]\n");
        }
    }
    text
}

each_backend! {
    /// Three processes with eight workers each on 60 stories of ~200 ms sharing `llm = 3`:
    /// from the `start`/`end` marks in the log (commit order: a start is written after its
    /// claim committed, an end before its result, so overlapping marks mean overlapping
    /// holds), never more than 3 run at once, and 3 do. Control: the same run without the
    /// limit has more than 3 running at once. `limits` shows the slots all back at the end.
    async fn a_limit_holds_across_three_processes(t) {
        let dir = tempfile::tempdir().expect("dir");
        for (limit, name) in [(Some(3), "limited.toml"), (None, "free.toml")] {
            let plan = write(dir.path(), name, &limited_plan(60, limit));
            let run_id = create(&t.url, &plan);
            let mut procs: Vec<ExecProcess> =
                (0..3).map(|_| ExecProcess::start(&t.url, run_id, 8, 30, dir.path())).collect();
            for p in &mut procs {
                let status = p.wait(Duration::from_secs(120)).await;
                assert!(status.success(), "exec failed:\n{}", p.stderr_text());
            }
            let most = most_at_once(&entries(&t.db, run_id).await);
            match limit {
                Some(n) => {
                    assert_eq!(most, n as usize, "most running at once under llm = {n}");
                    assert_eq!(limit_in_use(&t.db).await, 0, "every slot came back");
                }
                None => assert!(most > 3, "control: without the limit {most} ran at once"),
            }
        }
        let (status, stdout, stderr) = cli(&t.url, &["limits"]);
        assert!(status.success(), "{stderr}");
        assert!(stdout.contains("llm") && stdout.contains("0 of 3 in use"), "{stdout}");
    }
}

async fn limit_in_use(db: &DatabaseConnection) -> i32 {
    limit(db, "llm").await.in_use
}

each_backend! {
    /// A process killed with SIGKILL while its stories hold slots: the slots return after
    /// their leases expire (the stories are taken over and finish), and the run completes.
    async fn slots_held_by_a_killed_process_come_back(t) {
        let dir = tempfile::tempdir().expect("dir");
        let mut text = limited_plan(12, Some(2));
        text = text
            .replace("sleep 0.2", "sleep 1")
            .replace("command =", "max_attempts = 2\ncommand =");
        let plan = write(dir.path(), "killed.toml", &text);
        let run_id = create(&t.url, &plan);
        let mut victim = ExecProcess::start(&t.url, run_id, 4, 2, dir.path());
        let db = t.db.clone();
        wait_for("the victim holds both slots", Duration::from_secs(30), || {
            let db = db.clone();
            async move {
                limit_in_use(&db).await == 2
                    && run_story::Entity::find()
                        .filter(run_story::Column::RunId.eq(run_id))
                        .filter(run_story::Column::Status.eq("running"))
                        .all(&db)
                        .await
                        .expect("read")
                        .len()
                        == 2
            }
        })
        .await;
        victim.signal("KILL");
        let _ = victim.wait(Duration::from_secs(10)).await;
        assert_eq!(limit_in_use(&t.db).await, 2, "the dead process's slots are still held");
        let mut heir = ExecProcess::start(&t.url, run_id, 4, 2, dir.path());
        let status = heir.wait(Duration::from_secs(120)).await;
        assert!(status.success(), "{}", heir.stderr_text());
        assert_eq!(limit_in_use(&t.db).await, 0, "every slot came back");
        let all = common::stories(&t.db, run_id).await;
        assert!(all.iter().all(|s| s.status == "completed"), "{all:?}");
        assert!(all.iter().any(|s| s.attempts == 2), "some story was taken over");
    }
}

each_backend! {
    /// A story holding two limits takes both or neither: with `b` full, starting it fails
    /// with `LimitFull` and leaves `a` untouched; once `b` frees, it takes both.
    async fn a_story_takes_every_limit_or_none(t) {
        let plan = Plan::parse(
            "name = \"keys\"\n[limits]\na = 1\nb = 1\n[[epics]]\nkey = \"e\"\n\
             [[epics.stories]]\nkey = \"both\"\ncommand = \"true\"\nlimits = [\"b\", \"a\"]\n\
             [[epics.stories]]\nkey = \"only_b\"\ncommand = \"true\"\nlimits = [\"b\"]\n",
            "keys.toml",
        )
        .expect("plan");
        let run = create_run_from_plan(&t.db, &plan).await.expect("create");
        let lease = Lease::new("w", Duration::from_secs(30));
        let only_b = story(&t.db, run.id, "only_b").await;
        let TryClaim::Claimed(held) = try_claim(&t.db, &only_b, &lease, chrono::Utc::now())
            .await
            .expect("claim")
        else {
            panic!("only_b is claimable");
        };
        let both = story(&t.db, run.id, "both").await;
        let err = transition_with::<run_story::Entity, _>(
            &t.db,
            &both,
            StoryStatus::Running,
            run_domain::Changes::new(),
        )
        .await
        .expect_err("b is full");
        assert!(matches!(&err, TransitionError::LimitFull { limit, .. } if limit == "b"), "{err:?}");
        assert_eq!((limit(&t.db, "a").await.in_use, limit(&t.db, "b").await.in_use), (0, 1));
        assert_eq!(story(&t.db, run.id, "both").await.status, "pending");
        run_engine::release(&t.db, &held.story, run_engine::Release::Completed)
            .await
            .expect("release");
        let both = story(&t.db, run.id, "both").await;
        transition_with::<run_story::Entity, _>(
            &t.db,
            &both,
            StoryStatus::Running,
            run_domain::Changes::new(),
        )
        .await
        .expect("both free now");
        assert_eq!((limit(&t.db, "a").await.in_use, limit(&t.db, "b").await.in_use), (1, 1));
    }
}

each_backend! {
    /// `pause` in one terminal, seen by an executor in another process: once it returns no
    /// story starts until `resume` (running ones finish); then the run completes. Control: over
    /// the same window, an executor that is not paused keeps starting stories.
    async fn a_pause_from_another_process_stops_new_claims_until_resume(t) {
        let dir = tempfile::tempdir().expect("dir");
        let mut text = limited_plan(30, None);
        text = text.replace("sleep 0.2", "sleep 0.3");
        let plan = write(dir.path(), "paused.toml", &text);
        let run_id = create(&t.url, &plan);
        let id = run_id.to_string();
        let mut exec = ExecProcess::start(&t.url, run_id, 2, 30, dir.path());
        let db = t.db.clone();
        let started = move |db: DatabaseConnection| async move {
            common::stories(&db, run_id)
                .await
                .iter()
                .filter(|s| s.started_at.is_some())
                .count()
        };
        wait_for("some stories started", Duration::from_secs(30), || {
            let db = db.clone();
            async move { started(db).await >= 2 }
        })
        .await;
        // Control: unpaused, stories keep starting over a second.
        let before = started(t.db.clone()).await;
        let window = Instant::now();
        wait_for("the control window", Duration::from_secs(10), || async {
            window.elapsed() >= Duration::from_millis(1500)
        })
        .await;
        assert!(started(t.db.clone()).await > before, "control: claims go on when not paused");

        let (status, stdout, stderr) = cli(&t.url, &["pause", &id]);
        assert!(status.success(), "{stderr}");
        assert!(stdout.contains("paused"), "{stdout}");
        let paused_at = chrono::Utc::now();
        wait_for("the running stories to finish", Duration::from_secs(30), || {
            let db = db.clone();
            async move { common::count_status(&db, run_id, "running").await == 0 }
        })
        .await;
        let window = Instant::now();
        wait_for("the paused window", Duration::from_secs(10), || async {
            window.elapsed() >= Duration::from_millis(1500)
        })
        .await;
        let all = common::stories(&t.db, run_id).await;
        let late: Vec<&str> = all
            .iter()
            .filter(|s| s.started_at.is_some_and(|at| at > paused_at))
            .map(|s| s.key.as_str())
            .collect();
        assert!(late.is_empty(), "started after the pause: {late:?}");
        assert!(all.iter().any(|s| s.status == "pending"), "some stories still wait");
        let (_, status_text, _) = cli(&t.url, &["status", &id]);
        assert!(status_text.contains("(paused)"), "{status_text}");

        let (status, stdout, stderr) = cli(&t.url, &["resume", &id]);
        assert!(status.success() && stdout.contains("resumed"), "{stdout}{stderr}");
        let status = exec.wait(Duration::from_secs(120)).await;
        assert!(status.success(), "{}", exec.stderr_text());
        assert!(exec.stderr_text().contains("is paused"), "{}", exec.stderr_text());
        assert_eq!(common::count_status(&t.db, run_id, "completed").await, 30);
    }
}

each_backend! {
    /// `cancel <run> --story e.slow` on a running story: it ends cancelled (its worker stops
    /// it), the story that needs it is skipped, the others complete, and the run ends
    /// cancelled. A pending story cancelled the same way is cancelled at once.
    async fn cancelling_one_story_skips_its_dependents(t) {
        let dir = tempfile::tempdir().expect("dir");
        let plan = write(
            dir.path(),
            "one.toml",
            "name = \"one\"\n[[epics]]\nkey = \"e\"\n\
             [[epics.stories]]\nkey = \"slow\"\ncommand = \"echo started; sleep 600\"\n\
             [[epics.stories]]\nkey = \"after\"\ncommand = \"true\"\nneeds = [\"slow\"]\n\
             [[epics.stories]]\nkey = \"other\"\ncommand = \"true\"\n\
             [[epics.stories]]\nkey = \"later\"\ncommand = \"true\"\nneeds = [\"after\"]\n",
        );
        let run_id = create(&t.url, &plan);
        let id = run_id.to_string();
        let (status, stdout, stderr) = cli(&t.url, &["cancel", &id, "--story", "e.nope"]);
        assert!(!status.success() && stderr.contains("has no story e.nope"), "{stdout}{stderr}");
        let mut exec = ExecProcess::start(&t.url, run_id, 2, 3, dir.path());
        let db = t.db.clone();
        wait_for("slow to run", Duration::from_secs(30), || {
            let db = db.clone();
            async move { log_text(&db, run_id).await.contains("[e/slow] started") }
        })
        .await;
        let (status, stdout, stderr) = cli(&t.url, &["cancel", &id, "--story", "e.slow"]);
        assert!(status.success(), "{stderr}");
        assert!(stdout.contains("story e.slow cancelled"), "{stdout}");
        // The dependents are skipped by whoever gets there first: this command, or the worker
        // that finds its story cancelled (on a loaded machine it may win); checked below.
        let status = exec.wait(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(1), "the run did not complete: {}", exec.stderr_text());
        let by_key = |key: &'static str| {
            let db = t.db.clone();
            async move { story(&db, run_id, key).await.status }
        };
        assert_eq!(by_key("slow").await, "cancelled");
        assert_eq!(by_key("after").await, "skipped");
        assert_eq!(by_key("later").await, "skipped");
        assert_eq!(by_key("other").await, "completed");
        let run = entity::run::Entity::find_by_id(run_id)
            .one(&t.db)
            .await
            .expect("read")
            .expect("run");
        assert_eq!(run.status, "cancelled");
        let log = log_text(&t.db, run_id).await;
        assert!(log.contains("[e.slow] cancelled (run-engine cancel --story)"), "{log}");

        let pending = create(&t.url, &plan);
        let (status, stdout, stderr) =
            cli(&t.url, &["cancel", &pending.to_string(), "--story", "e.after"]);
        assert!(status.success() && stdout.contains("story e.after cancelled"), "{stdout}{stderr}");
        assert_eq!(story(&t.db, pending, "after").await.status, "cancelled");
        assert_eq!(story(&t.db, pending, "later").await.status, "skipped");
        assert_eq!(story(&t.db, pending, "slow").await.status, "pending");
    }
}

each_backend! {
    /// `examples/scheduling.toml` as a user runs it: the hung story times out and fails, the
    /// flaky one waits its backoff (`status` shows `retry at`) and passes on its third attempt,
    /// the three `llm` stories run one at a time, and `status` and `limits` show the limit.
    async fn the_scheduling_example_behaves_as_documented(t) {
        let dir = tempfile::tempdir().expect("dir");
        let example = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/scheduling.toml");
        let run_id = create(&t.url, &example);
        let id = run_id.to_string();
        let mut exec = ExecProcess::start(&t.url, run_id, 4, 30, dir.path());
        let url = t.url.clone();
        wait_for("status to show flaky's retry time", Duration::from_secs(30), || {
            let url = url.clone();
            let id = id.clone();
            async move {
                let (_, out, _) = cli(&url, &["status", &id]);
                out.lines().any(|l| l.contains("flaky: pending") && l.contains("retry at"))
            }
        })
        .await;
        let status = exec.wait(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(1), "the run fails (hung): {}", exec.stderr_text());
        let by_key = |key: &'static str| {
            let db = t.db.clone();
            async move { story(&db, run_id, key).await }
        };
        let hung = by_key("hung").await;
        assert_eq!((hung.status.as_str(), hung.attempts), ("failed", 2));
        assert_eq!(hung.error.as_deref(), Some("timed out after 2s"));
        let flaky = by_key("flaky").await;
        assert_eq!((flaky.status.as_str(), flaky.attempts), ("completed", 3));
        let log = entries(&t.db, run_id).await;
        let at = attempt_marks(&log, "[work/flaky] attempt ");
        assert_eq!(at.len(), 3, "{log:?}");
        assert!((at[1] - at[0]).num_milliseconds() >= 1000, "{at:?}");
        assert!((at[2] - at[1]).num_milliseconds() >= 2000, "{at:?}");
        // The llm stories, in log order: one at a time, summarise first.
        let mut order = Vec::new();
        let mut open = 0;
        let marks = [
            ("summarise", "summarising", "summarised"),
            ("translate", "translating", "translated"),
            ("classify", "classifying", "classified"),
        ];
        for e in &log {
            for (key, begin, end) in marks {
                if e.message == format!("[work/{key}] {begin}") {
                    open += 1;
                    assert_eq!(open, 1, "two llm stories at once: {log:?}");
                    order.push(key);
                } else if e.message == format!("[work/{key}] {end}") {
                    open -= 1;
                }
            }
        }
        // With four workers the three are tried at once, highest priority first; which one
        // takes the slot is a race (priority order itself is the one-worker test's).
        assert_eq!(order.len(), 3, "{order:?}");
        let (_, status_text, _) = cli(&t.url, &["status", &id]);
        assert!(status_text.contains("limits in use: llm 0/1"), "{status_text}");
        assert!(status_text.contains("priority 10, limits llm"), "{status_text}");
        let (_, limits, _) = cli(&t.url, &["limits"]);
        assert!(limits.contains("llm") && limits.contains("0 of 1 in use"), "{limits}");
        let text = log_text(&t.db, run_id).await;
        assert!(text.contains("timed out after 2s; will retry at"), "{text}");
    }
}

/// The batch times of the lines `<prefix><number>` (the command's own `attempt N` lines).
fn attempt_marks(log: &[LogEntry], prefix: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    log.iter()
        .filter(|e| {
            e.message
                .strip_prefix(prefix)
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|e| e.logged_at)
        .collect()
}

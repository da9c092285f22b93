//! Several `run-engine exec` processes on one run, on every backend: they share the work
//! without running a story twice, a killed process's stories are taken over, and a process
//! that stalls past its lease is fenced off.

mod common;

use common::{
    ExecProcess, count_status, counted, create, executions, lines_with, log_text, stories, wait_for,
};
use entity::run;
use run_engine_tests::{RunFactory, each_backend};
use sea_orm::EntityTrait;
use std::collections::HashSet;
use std::time::Duration;

async fn run_status(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> String {
    run::Entity::find_by_id(run_id)
        .one(db)
        .await
        .expect("read run")
        .expect("run exists")
        .status
}

each_backend! {
    /// Four processes with four workers each on 400 stories: every story runs exactly once,
    /// every story's output is in the run log, and the run completes.
    async fn four_processes_with_four_workers_run_every_story_exactly_once(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(4).stories(100)
            .command(counted(""))
            .write_plan(dir.path());
        let run_id = create(&t.url, &plan);

        let mut procs: Vec<ExecProcess> =
            (0..4).map(|_| ExecProcess::start(&t.url, run_id, 4, 30, dir.path())).collect();
        for p in &mut procs {
            let status = p.wait(Duration::from_secs(90)).await;
            assert!(status.success(), "exec failed ({status}):\n{}", p.stderr_text());
        }

        assert_eq!(run_status(&t.db, run_id).await, "completed");
        let all = stories(&t.db, run_id).await;
        assert_eq!(all.len(), 400);
        let runs = executions(dir.path());
        for s in &all {
            assert_eq!((s.status.as_str(), s.attempts), ("completed", 1), "{}", s.key);
            assert_eq!(runs.get(&s.key), Some(&1), "{} ran {:?} times", s.key, runs.get(&s.key));
        }
        assert_eq!(runs.len(), 400, "no execution of anything else");

        let log = log_text(&t.db, run_id).await;
        for s in &all {
            let epic = &s.key[..2];
            let marker = format!("[{epic}/{}] ran {}", s.key, s.key);
            assert_eq!(lines_with(&log, &marker), 1, "output of {} in the log", s.key);
            assert_eq!(
                lines_with(&log, &format!("[{epic}/{}] completed in ", s.key)),
                1,
                "completion of {} logged once",
                s.key
            );
        }
        let pids: HashSet<String> = all
            .iter()
            .filter_map(|s| s.lease_owner.as_deref())
            .filter_map(|o| o.rsplit('-').nth(1).map(str::to_owned))
            .collect();
        assert!(pids.len() >= 2, "the work was shared between processes: {pids:?}");
    }
}

each_backend! {
    /// A process killed with SIGKILL in the middle of a run, then another started: every
    /// story completes once; only the stories the dead process held may have started twice.
    async fn a_process_killed_mid_run_is_taken_over_and_nothing_completes_twice(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(2).stories(30)
            .command(counted("sleep 0.3 && "))
            .max_attempts(3)
            .write_plan(dir.path());
        let run_id = create(&t.url, &plan);

        let mut first = ExecProcess::start(&t.url, run_id, 4, 2, dir.path());
        // Kill while stories are under way (a 0.3 s command each), not between two claims.
        wait_for("ten stories completed and two running", Duration::from_secs(30), || async {
            count_status(&t.db, run_id, "completed").await >= 10
                && count_status(&t.db, run_id, "running").await >= 2
        })
        .await;
        first.child.kill().expect("SIGKILL");
        let _ = first.child.wait();
        let held_by_dead: HashSet<String> = stories(&t.db, run_id)
            .await
            .into_iter()
            .filter(|s| s.status == "running")
            .map(|s| s.key)
            .collect();
        assert!(!held_by_dead.is_empty(), "the kill should catch some stories running");

        let mut second = ExecProcess::start(&t.url, run_id, 4, 2, dir.path());
        let status = second.wait(Duration::from_secs(60)).await;
        assert!(status.success(), "second exec failed ({status}):\n{}", second.stderr_text());

        assert_eq!(run_status(&t.db, run_id).await, "completed");
        let runs = executions(dir.path());
        let log = log_text(&t.db, run_id).await;
        let dead = format!("-{}-", first.pid());
        let mut taken_over = HashSet::new();
        for s in stories(&t.db, run_id).await {
            let epic = &s.key[..2];
            assert_eq!(s.status, "completed", "{}", s.key);
            let completions = lines_with(&log, &format!("[{epic}/{}] completed in ", s.key));
            // A statement the dead process had sent may still commit after the kill (the
            // server finishes it); the log line after it was never written. Never two.
            assert!(completions <= 1, "{} recorded completed {completions} times", s.key);
            if completions == 0 {
                assert!(s.lease_owner.as_deref().is_some_and(|o| o.contains(&dead)), "{}", s.key);
            }
            let took_over = lines_with(&log, &format!("[{epic}/{}] took over from the expired lease", s.key));
            let n = runs.get(&s.key).copied().unwrap_or(0);
            match s.attempts {
                2 => {
                    taken_over.insert(s.key.clone());
                    assert_eq!(took_over, 1, "{} was taken over once", s.key);
                    assert!((1..=2).contains(&n), "{} ran {n} times", s.key);
                }
                1 => assert_eq!((took_over, n), (0, 1), "{} untouched by the kill", s.key),
                other => panic!("{} made {other} attempts", s.key),
            }
        }
        assert!(
            held_by_dead.is_subset(&taken_over),
            "every story the dead process held was taken over: {held_by_dead:?} vs {taken_over:?}"
        );
        assert!(taken_over.len() <= 4, "at most one story per worker of the dead process: {taken_over:?}");
    }
}

each_backend! {
    /// A worker stopped (SIGSTOP) in the middle of a story until its lease expired and another
    /// process took the story over and completed it: once resumed (SIGCONT), it cannot record
    /// its result.
    async fn a_worker_stopped_past_its_lease_is_fenced_off_when_it_resumes(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(1).stories(1).max_attempts(3)
            .command("echo \"begin $RUN_ENGINE_WORKER\"; sleep 3; echo \"end $RUN_ENGINE_WORKER\"")
            .write_plan(dir.path());
        let run_id = create(&t.url, &plan);

        let mut stalled = ExecProcess::start(&t.url, run_id, 1, 2, dir.path());
        let stalled_worker = format!("-{}-0", stalled.pid());
        wait_for("the first worker to be mid-story", Duration::from_secs(30), || async {
            let log = log_text(&t.db, run_id).await;
            log.lines().any(|l| l.contains("] begin ") && l.ends_with(&stalled_worker))
        })
        .await;
        stalled.signal("STOP");

        wait_for("the stalled worker's lease to expire", Duration::from_secs(30), || async {
            let s = &stories(&t.db, run_id).await[0];
            s.lease_expires_at.is_some_and(|t| t < chrono::Utc::now())
        })
        .await;
        let mut taker = ExecProcess::start(&t.url, run_id, 1, 2, dir.path());
        let taker_worker = format!("-{}-0", taker.pid());
        let status = taker.wait(Duration::from_secs(45)).await;
        assert!(status.success(), "taker failed ({status}):\n{}", taker.stderr_text());
        let story = &stories(&t.db, run_id).await[0];
        assert_eq!(story.status, "completed");
        assert!(
            story.lease_owner.as_deref().is_some_and(|o| o.ends_with(&taker_worker)),
            "completed by the taker, lease owner {:?}",
            story.lease_owner
        );

        stalled.signal("CONT");
        let status = stalled.wait(Duration::from_secs(30)).await;
        assert!(status.success(), "the fenced process still ends well:\n{}", stalled.stderr_text());

        let after = &stories(&t.db, run_id).await[0];
        assert_eq!(after, story, "the fenced worker changed nothing");
        assert_eq!(after.attempts, 2);
        let log = log_text(&t.db, run_id).await;
        let fenced: Vec<&str> = log.lines().filter(|l| l.contains("fenced off: ")).collect();
        assert_eq!(fenced.len(), 1, "one fencing in the log:\n{log}");
        assert!(fenced[0].contains(&format!("{stalled_worker} lost its lease")), "{}", fenced[0]);
        assert_eq!(lines_with(&log, "completed in "), 1, "{log}");
        assert!(
            log.lines().any(|l| l.contains("completed in ") && l.ends_with(&taker_worker)),
            "{log}"
        );
        assert!(
            stalled.stderr_text().contains("fenced"),
            "the fenced process says so: {}",
            stalled.stderr_text()
        );
    }
}

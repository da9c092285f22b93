//! Time bounds on every backend: a hung shell command is stopped at its story's `timeout`, its
//! whole process group killed, the attempt recorded failed and retried while attempts remain;
//! a Rust handler that ignores its cancellation is stopped all the same.

mod common;

use async_trait::async_trait;
use common::{ExecProcess, create, log_text, wait_for};
use entity::run_story;
use run_engine::{
    Executor, ExecutorConfig, Plan, StoryContext, StoryHandler, StoryOutcome, create_run_from_plan,
};
use run_engine_tests::each_backend;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use std::time::{Duration, Instant};

each_backend! {
    /// `sleep 600` with `timeout = "1s"` and two attempts: both attempts are stopped after about
    /// a second, recorded `timed out after 1s`, the story ends failed, and no process of either
    /// attempt's group is left.
    async fn a_hung_command_times_out_is_killed_with_its_group_and_retried(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = dir.path().join("hung.toml");
        std::fs::write(
            &plan,
            "name = \"hung\"\n[defaults]\ntimeout = \"1s\"\n[[epics]]\nkey = \"e\"\n\
             [[epics.stories]]\nkey = \"hang\"\nmax_attempts = 2\n\
             command = \"echo $$ > \\\"$MARKER_DIR/pgid-$RUN_ENGINE_ATTEMPT\\\"; sleep 600 & sleep 600\"\n\
             [[epics.stories]]\nkey = \"quick\"\ncommand = \"echo fine\"\ntimeout = \"1h\"\n",
        )
        .expect("write plan");
        let run_id = create(&t.url, &plan);
        let started = Instant::now();
        let mut exec = ExecProcess::start(&t.url, run_id, 2, 30, dir.path());
        let status = exec.wait(Duration::from_secs(60)).await;
        let took = started.elapsed();
        assert_eq!(status.code(), Some(1), "the run failed:\n{}", exec.stderr_text());
        assert!(took < Duration::from_secs(30), "two 1 s attempts took {took:?}");
        let hang = run_story::Entity::find()
            .filter(run_story::Column::RunId.eq(run_id))
            .filter(run_story::Column::Key.eq("hang"))
            .one(&t.db)
            .await
            .expect("read")
            .expect("story");
        assert_eq!((hang.status.as_str(), hang.attempts), ("failed", 2));
        assert_eq!(hang.error.as_deref(), Some("timed out after 1s"));
        let log = log_text(&t.db, run_id).await;
        assert!(
            log.contains("[e/hang] attempt 1 of 2 failed after ") && log.contains("timed out after 1s; will retry"),
            "{log}"
        );
        assert!(log.contains("[e/quick] completed in"), "{log}");
        for attempt in 1..=2 {
            let pgid: i32 = std::fs::read_to_string(dir.path().join(format!("pgid-{attempt}")))
                .expect("the command wrote its process group")
                .trim()
                .parse()
                .expect("a pid");
            // SIGKILL is delivered, and the dead reaped, a moment after it is sent.
            wait_for(
                &format!("attempt {attempt}'s process group {pgid} gone (kill -0)"),
                Duration::from_secs(5),
                || async move {
                    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None)
                        == Err(nix::errno::Errno::ESRCH)
                },
            )
            .await;
        }
    }
}

/// Ignores its cancellation and never returns.
struct Stubborn;

#[async_trait]
impl StoryHandler for Stubborn {
    async fn run(&self, _ctx: StoryContext) -> StoryOutcome {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

/// Sees its deadline, and completes well before it.
struct Punctual;

#[async_trait]
impl StoryHandler for Punctual {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        match ctx.deadline {
            Some(deadline) if deadline > tokio::time::Instant::now() => StoryOutcome::Completed,
            other => StoryOutcome::Failed {
                error: format!("no deadline ahead: {other:?}"),
            },
        }
    }
}

each_backend! {
    /// The executor enforces the timeout for any handler: one that ignores its cancellation
    /// is dropped after the grace period and the attempt recorded failed; a handler sees its
    /// deadline in its context.
    async fn a_handler_that_ignores_cancellation_still_times_out(t) {
        let plan = Plan::parse(
            "name = \"t\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\nkey = \"s\"\n\
             command = \"x\"\ntimeout = \"300ms\"\n",
            "t.toml",
        )
        .expect("plan");
        let run = create_run_from_plan(&t.db, &plan).await.expect("create");
        let config = ExecutorConfig::default()
            .workers(1)
            .poll_interval(Duration::from_millis(20))
            .cancel_grace(Duration::from_millis(200));
        let started = Instant::now();
        let summary = Executor::new(t.db.clone(), Stubborn, config.clone())
            .execute(run.id)
            .await
            .expect("execute");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(summary.run_status, "failed", "{summary}");
        let story = run_story::Entity::find()
            .filter(run_story::Column::RunId.eq(run.id))
            .one(&t.db)
            .await
            .expect("read")
            .expect("story");
        assert_eq!(story.error.as_deref(), Some("timed out after 300ms"));

        let run = create_run_from_plan(&t.db, &plan).await.expect("create");
        let summary = Executor::new(t.db.clone(), Punctual, config)
            .execute(run.id)
            .await
            .expect("execute");
        assert_eq!(summary.run_status, "completed", "{summary}");
    }
}

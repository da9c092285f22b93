//! A Rust handler's own `tracing` events, emitted inside its story's span, go into the run's
//! log through `StoryLogLayer` and show up in `run-engine logs` as lines of the story; the
//! executor's own events do not.

mod common;

use async_trait::async_trait;
use common::cli;
use run_engine::{
    Executor, ExecutorConfig, Plan, StoryContext, StoryHandler, StoryLogLayer, StoryOutcome,
    create_run_from_plan,
};
use run_engine_tests::each_backend;
use tracing_subscriber::layer::SubscriberExt;

/// Emits an event of its own, with a field, then completes.
struct Chatty;

#[async_trait]
impl StoryHandler for Chatty {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        tracing::info!(x = 1, story = %ctx.story.key, "hello");
        tracing::debug!("details");
        StoryOutcome::Completed
    }
}

fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(StoryLogLayer::new());
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
}

each_backend! {
    async fn a_handlers_tracing_events_become_lines_of_its_story(t) {
        install();
        let plan = Plan::parse(
            "name = \"chatty\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\nkey = \"s\"\ncommand = \"x\"\n",
            "chatty.toml",
        )
        .expect("plan");
        let run = create_run_from_plan(&t.db, &plan).await.expect("create");
        let summary = Executor::new(t.db.clone(), Chatty, ExecutorConfig::default().workers(1))
            .execute(run.id)
            .await
            .expect("execute");
        assert!(summary.is_completed(), "{summary}");
        let (status, stdout, stderr) = cli(&t.url, &["logs", &run.id.to_string()]);
        assert!(status.success(), "{stderr}");
        let line = stdout
            .lines()
            .find(|l| l.contains("[e/s] INFO hello"))
            .unwrap_or_else(|| panic!("no line of the story's event:\n{stdout}"));
        assert!(line.ends_with("[e/s] INFO hello x=1 story=s"), "{line}");
        assert!(stdout.contains("[e/s] DEBUG details"), "{stdout}");
        // The executor's own events (claimed, recorded) are not the story's output.
        assert!(!stdout.contains("claimed"), "{stdout}");
    }
}

//! A sibling executor's starting point: a story handler written in Rust, a run created through
//! the API in one transaction, executed by four workers, and its log printed.
//!
//! ```sh
//! cargo run -p run-engine --example rust_handler                      # a scratch SQLite file
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run -p run-engine --example rust_handler                  # or any database
//! ```
//!
//! Each story carries a free-form JSON payload (`{"width": 640}`) that the handler reads from
//! its [`StoryContext`]; what the handler writes to `ctx.log` goes to the run's log, prefixed
//! with `[epic/story]`. The stories of the second epic need the first's (`EpicNeed`).

use async_trait::async_trait;
use run_domain::{
    EpicNeed, NewEpic, NewRun, NewStory, create_epic, create_needs, create_run, create_stories,
    read_run_log,
};
use run_engine::{Executor, ExecutorConfig, StoryContext, StoryHandler, StoryOutcome};
use sea_orm::TransactionTrait;

/// Resizes an image, in pretence: reads the width from the payload, logs what it does.
struct Resize;

/// What each story of this example is given.
#[derive(serde::Deserialize)]
struct Input {
    /// The width to resize to, in pixels.
    width: u32,
}

#[async_trait]
impl StoryHandler for Resize {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        let input: Input = match ctx.payload_as() {
            Ok(Some(input)) => input,
            Ok(None) => {
                return StoryOutcome::Failed {
                    error: "no payload".into(),
                };
            }
            Err(e) => {
                return StoryOutcome::Failed {
                    error: format!("bad payload: {e}"),
                };
            }
        };
        if ctx.cancel.is_cancelled() {
            return StoryOutcome::Cancelled;
        }
        ctx.log
            .line(format!(
                "resized {} to {} px (attempt {})",
                ctx.story.key, input.width, ctx.attempt
            ))
            .await;
        StoryOutcome::Completed
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A scratch SQLite file unless DATABASE_URL names a database; removed at the end.
    let scratch = std::env::temp_dir().join(format!("rust-handler-{}.db", std::process::id()));
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}?mode=rwc", scratch.display()));
    println!("database: {}", run_domain::redact_url(&url));
    let db = run_domain::connect(&url).await?;
    migration::apply(&db, None).await?;

    // The run, its epics, their stories and the need between them: all or nothing.
    let tx = db.begin().await?;
    let run = create_run(
        &tx,
        NewRun {
            key: "thumbnails".into(),
            title: "Thumbnails for the gallery".into(),
            fail_fast: false,
        },
    )
    .await?;
    let mut epics = Vec::new();
    for (position, (key, widths)) in [("small", [64, 128]), ("large", [640, 1280])]
        .into_iter()
        .enumerate()
    {
        let epic = create_epic(
            &tx,
            run.id,
            NewEpic {
                key: key.into(),
                title: format!("{key} thumbnails"),
                position: position as i32,
            },
        )
        .await?;
        let stories = widths
            .iter()
            .enumerate()
            .map(|(i, width)| NewStory {
                key: format!("w{width}"),
                title: format!("{width} px wide"),
                position: i as i32,
                payload: Some(serde_json::json!({ "width": width })),
                ..Default::default()
            })
            .collect();
        create_stories(&tx, &epic, stories).await?;
        epics.push(epic);
    }
    create_needs(
        &tx,
        run.id,
        &[],
        &[EpicNeed {
            epic: epics[1].id,
            needs: epics[0].id,
        }],
    )
    .await?;
    tx.commit().await?;
    println!("created run {}", run.id);

    let executor = Executor::new(db.clone(), Resize, ExecutorConfig::default().workers(4));
    let summary = executor.execute(run.id).await?;
    println!("{summary}");
    print!("{}", read_run_log(&db, run.id).await?);
    db.close().await?;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", scratch.display()));
    }
    if summary.run_status != "completed" {
        return Err(format!("the run ended {}", summary.run_status).into());
    }
    Ok(())
}

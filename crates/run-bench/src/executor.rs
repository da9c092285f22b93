//! Executor throughput on PostgreSQL, against a `FOR UPDATE SKIP LOCKED` claim loop.
//!
//! **Ours**: `run_engine::Executor` with an in-process no-op handler, 1, 4 and 16 workers, on a
//! run of no-op stories: every story is claimed with a lease by compare-and-swap, its lease is
//! held while the (empty) handler runs, and its result recorded by compare-and-swap, then the
//! epic and run are completed. **Baseline**: the job-queue idiom (Oban, River, pg-boss), in plain
//! SQL on one connection per worker: claim with `WITH c AS (SELECT ... FOR UPDATE SKIP LOCKED
//! LIMIT 1) UPDATE ... RETURNING`, then complete with a second UPDATE — two statements a story.
//! Both run on a fresh run of the same size in the same bench database, taking turns.

use crate::bench_db::{Backend, BenchDb, Servers, close_all};
use crate::measure::{Profile, median};
use crate::report::{Bound, Goal, Section, Table, fmt_rate};
use async_trait::async_trait;
use run_engine::{Executor, ExecutorConfig, StoryContext, StoryHandler, StoryOutcome};
use run_engine_tests::RunFactory;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Worker counts measured.
pub const WORKERS: [usize; 3] = [1, 4, 16];

/// What the report says when PostgreSQL is not available.
pub const PENDING: &str = "executor throughput: PostgreSQL not available";

/// A story handler that returns [`StoryOutcome::Completed`] at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoOp;

#[async_trait]
impl StoryHandler for NoOp {
    async fn run(&self, _ctx: StoryContext) -> StoryOutcome {
        StoryOutcome::Completed
    }
}

/// One cell: stories per second, ours and baseline, median over the repeats.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Workers.
    pub workers: usize,
    /// Ours, stories/s per repeat.
    pub ours: Vec<f64>,
    /// Baseline, stories/s per repeat.
    pub baseline: Vec<f64>,
}

/// The result of the scenario.
pub struct ExecutorResult {
    cells: Result<Vec<Cell>, String>,
    stories: usize,
}

/// Creates a run of one epic with `stories` no-op stories (no command, one attempt each);
/// returns its id.
pub async fn new_run(db: &DatabaseConnection, stories: usize) -> anyhow::Result<Uuid> {
    let run = RunFactory::new()
        .key("bench")
        .title("executor bench")
        .stories(stories)
        .try_create(db)
        .await?;
    Ok(run.id())
}

async fn ours(bench: &BenchDb, workers: usize, stories: usize) -> anyhow::Result<f64> {
    let run_id = new_run(&bench.db, stories).await?;
    let executor = Executor::new(
        bench.db.clone(),
        NoOp,
        ExecutorConfig::default().workers(workers),
    );
    let started = Instant::now();
    let summary = executor.execute(run_id).await?;
    let took = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        summary.run_status == "completed",
        "run did not complete: {summary}"
    );
    Ok(stories as f64 / took)
}

const CLAIM: &str = "WITH c AS (SELECT id FROM run_story WHERE run_id = $1 AND status = 'pending' \
     ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED) \
     UPDATE run_story s SET status = 'running', version = s.version + 1, attempts = s.attempts + 1, \
     lease_owner = $2, lease_expires_at = now() + interval '30 seconds', started_at = now(), \
     updated_at = now() FROM c WHERE s.id = c.id RETURNING s.id";
const COMPLETE: &str = "UPDATE run_story SET status = 'completed', version = version + 1, \
     finished_at = now(), updated_at = now(), lease_owner = NULL, lease_expires_at = NULL \
     WHERE id = $1";

async fn baseline(bench: &BenchDb, workers: usize, stories: usize) -> anyhow::Result<f64> {
    let run_id = new_run(&bench.db, stories).await?;
    let pools = bench.connect_many(workers).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, db) in pools.iter().cloned().enumerate() {
        tasks.push(tokio::spawn(async move {
            let owner = format!("skip-locked-{w}");
            let mut done = 0usize;
            loop {
                let claimed = db
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        CLAIM,
                        [run_id.into(), owner.clone().into()],
                    ))
                    .await?;
                let Some(row) = claimed else {
                    return anyhow::Ok(done);
                };
                let id: Uuid = row.try_get("", "id")?;
                db.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    COMPLETE,
                    [id.into()],
                ))
                .await?;
                done += 1;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let took = started.elapsed().as_secs_f64();
    close_all(pools).await;
    anyhow::ensure!(total == stories, "baseline finished {total} of {stories}");
    Ok(stories as f64 / took)
}

/// Runs the scenario on PostgreSQL.
pub async fn run(servers: &Servers, profile: &Profile) -> ExecutorResult {
    let stories = if profile.quick { 400 } else { 2000 };
    let repeats = if profile.quick { 1 } else { 3 };
    let measured = servers
        .measure(Backend::Postgres, async |bench: &BenchDb| {
            let mut cells = Vec::new();
            for workers in WORKERS {
                let mut cell = Cell {
                    workers,
                    ours: Vec::new(),
                    baseline: Vec::new(),
                };
                for _ in 0..repeats {
                    cell.baseline.push(baseline(bench, workers, stories).await?);
                    cell.ours.push(ours(bench, workers, stories).await?);
                    // Let the server settle between the two (autovacuum, checkpoints).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                cells.push(cell);
            }
            Ok(cells)
        })
        .await;
    let cells = match (measured.done(), measured.missing()) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(why)) => Err(why),
        (None, None) => Err(PENDING.to_owned()),
    };
    ExecutorResult { cells, stories }
}

impl ExecutorResult {
    /// The goals: ours at least 0.8 of the SKIP LOCKED loop.
    pub fn goals(&self) -> Vec<Goal> {
        let Ok(cells) = &self.cells else {
            return Vec::new();
        };
        cells
            .iter()
            .map(|c| Goal {
                what: "executor throughput: ours / SKIP LOCKED loop".into(),
                context: format!("PostgreSQL, {} worker(s)", c.workers),
                measured: median(&c.ours) / median(&c.baseline).max(f64::MIN_POSITIVE),
                bound: Bound::AtLeast(0.8),
            })
            .collect()
    }

    /// The report section.
    pub fn section(&self) -> Section {
        let mut body = format!(
            "No-op stories, {} per run, on PostgreSQL. **Ours**: `run_engine::Executor` with an \
             in-process handler that returns at once (claim with a lease by compare-and-swap, \
             record by compare-and-swap, epic and run completion, a \"started\" and a \
             \"completed\" log line for each story). \
             **Baseline**: a claim loop in plain SQL, one connection per worker: \
             `WITH c AS (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) UPDATE ... RETURNING`, then \
             an UPDATE to complete — two statements a story. Stories finished per second, median \
             of the repeats.\n\n",
            self.stories
        );
        match &self.cells {
            Err(why) => body.push_str(&format!("Not measured: {why}\n")),
            Ok(cells) => {
                let mut table =
                    Table::new(&["workers", "ours", "SKIP LOCKED loop", "ours / baseline"]);
                for c in cells {
                    let (o, b) = (median(&c.ours), median(&c.baseline));
                    table.row(vec![
                        c.workers.to_string(),
                        fmt_rate(o),
                        fmt_rate(b),
                        format!("{:.2}×", o / b.max(f64::MIN_POSITIVE)),
                    ]);
                }
                body.push_str(&table.to_markdown());
                body.push('\n');
                body.push_str(&gap_and_cause(cells));
            }
        }
        Section {
            title: "5. Executor throughput".into(),
            body,
        }
    }
}

/// Where the gap to the baseline comes from, with the measured figures.
fn gap_and_cause(cells: &[Cell]) -> String {
    let ratio = |c: &Cell| median(&c.ours) / median(&c.baseline).max(f64::MIN_POSITIVE);
    let (Some(first), Some(last)) = (cells.first(), cells.last()) else {
        return String::new();
    };
    format!(
        "Where the gap comes from: a story costs the executor three statements against the \
         baseline's two: the claim and the result (each a compare-and-swap that returns the \
         row), and one indexed look whether the story's epic has stories left, which is \
         skipped while another worker of the process holds a story of that epic. Its log \
         lines cost no wait: the workers share one writer that appends them in batches \
         (group commit), and a story without output does not wait for them; the candidates \
         are read 64 at a time into a queue the workers share. With {} worker(s) every \
         statement waits for the one before and the epic look is never skipped, and ours \
         reaches {:.2} of the baseline; with {} workers the looks are mostly skipped and the \
         statements of different workers overlap, and ours reaches {:.2}. What is left is \
         the cost of each statement in the client (sea-orm builds it and decodes the \
         returned row). The baseline also buys its speed with safety: it completes by id \
         alone, so a worker whose story was taken over after its lease ran out still \
         records a result (it is not fenced off).\n",
        first.workers,
        ratio(first),
        last.workers,
        ratio(last),
    )
}

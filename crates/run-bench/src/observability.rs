//! Observability: how fast idle workers wake, what `tracing` costs, how fast retention prunes.
//!
//! - **Wake-up latency** (every backend): an executor with two idle workers (default 250 ms
//!   poll) on a run whose stories each hold a limit of capacity 0; from another connection one
//!   limit at a time is opened, 20 times; from that commit to the story's `started_at`. PostgreSQL is
//!   woken by a notification; SQLite and MariaDB find it at their next poll. Against the poll
//!   interval.
//! - **Tracing** (PostgreSQL, 16 workers, no-op stories): executor throughput with a `tracing`
//!   subscriber at the CLI's default level (warnings, formatted to a sink) against the same
//!   subscriber turned off, taking turns.
//! - **Prune** (PostgreSQL): rows deleted per second pruning finished runs of 10,000 log lines.

use crate::bench_db::{Backend, BenchDb, Servers};
use crate::executor::{NoOp, new_run};
use crate::measure::{Profile, median};
use crate::report::{Bound, Goal, Section, Table, fmt_rate};
use run_engine::{Executor, ExecutorConfig, Plan, create_run_from_plan, prune_finished};
use std::time::{Duration, Instant};
use tracing_subscriber::layer::SubscriberExt;

/// Samples of the wake-up latency per backend.
const WAKES: usize = 20;

async fn wake_latency(bench: &BenchDb) -> anyhow::Result<Vec<f64>> {
    // Story i holds limit `<gate>-i`, shut until the bench opens it: one story at a time
    // becomes claimable, and completes at once, so the same two workers are idle each time.
    let gate = format!("wake-{}", fastrand::u32(..));
    let mut text = String::from("name = \"wake\"\n[limits]\n");
    for i in 0..WAKES {
        text.push_str(&format!("\"{gate}-{i}\" = 0\n"));
    }
    text.push_str("[[epics]]\nkey = \"e\"\n");
    for i in 0..WAKES {
        text.push_str(&format!(
            "[[epics.stories]]\nkey = \"s{i}\"\ncommand = \"x\"\nlimits = [\"{gate}-{i}\"]\n"
        ));
    }
    let plan = Plan::parse(&text, "wake.toml")?;
    let run = create_run_from_plan(&bench.db, &plan).await?;
    let executor = Executor::new(bench.db.clone(), NoOp, ExecutorConfig::default().workers(2));
    let run_id = run.id;
    let task = tokio::spawn(async move { executor.execute(run_id).await });
    // Let it start, listen and go idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut latencies = Vec::with_capacity(WAKES);
    for i in 1..=WAKES {
        let opened = chrono::Utc::now();
        run_domain::set_limit(&bench.db, &format!("{gate}-{}", i - 1), 1).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let started: Vec<chrono::DateTime<chrono::Utc>> = {
                use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
                entity::run_story::Entity::find()
                    .filter(entity::run_story::Column::RunId.eq(run_id))
                    .filter(entity::run_story::Column::StartedAt.is_not_null())
                    .all(&bench.db)
                    .await?
                    .into_iter()
                    .filter_map(|s| s.started_at)
                    .collect()
            };
            if started.len() >= i {
                let last = started.iter().max().copied().unwrap_or(opened);
                latencies.push((last - opened).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "story {i} did not start in 10 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let summary = task.await??;
    anyhow::ensure!(summary.is_completed(), "run did not complete: {summary}");
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

fn p95(sorted: &[f64]) -> f64 {
    let i = ((sorted.len() as f64) * 0.95).ceil() as usize;
    sorted.get(i.saturating_sub(1)).copied().unwrap_or(f64::NAN)
}

async fn executor_rate(bench: &BenchDb, stories: usize) -> anyhow::Result<f64> {
    let run_id = new_run(&bench.db, stories).await?;
    let executor = Executor::new(
        bench.db.clone(),
        NoOp,
        ExecutorConfig::default().workers(16),
    );
    let started = Instant::now();
    let summary = executor.execute(run_id).await?;
    anyhow::ensure!(summary.is_completed(), "run did not complete: {summary}");
    Ok(stories as f64 / started.elapsed().as_secs_f64())
}

/// (off, at the default level) stories/s per repeat.
async fn tracing_cost(
    bench: &BenchDb,
    stories: usize,
    repeats: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    use tracing_subscriber::{EnvFilter, reload};
    let (filter, handle) = reload::Layer::new(EnvFilter::new("off"));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink));
    // One global subscriber for the process; its filter is switched between runs.
    let _ = tracing::subscriber::set_global_default(subscriber);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        handle.reload(EnvFilter::new("off"))?;
        off.push(executor_rate(bench, stories).await?);
        handle.reload(EnvFilter::new("warn"))?;
        on.push(executor_rate(bench, stories).await?);
    }
    handle.reload(EnvFilter::new("off"))?;
    Ok((off, on))
}

/// Rows deleted per second pruning `runs` finished runs of 10,000 log lines each.
async fn prune_rate(bench: &BenchDb, runs: usize) -> anyhow::Result<(f64, u64)> {
    let text = "name = \"noisy\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\nkey = \"s\"\ncommand = \"x\"\n";
    let plan = Plan::parse(text, "noisy.toml")?;
    for _ in 0..runs {
        let run = create_run_from_plan(&bench.db, &plan).await?;
        let lines: Vec<String> = (0..10_000).map(|i| format!("line {i}")).collect();
        for chunk in lines.chunks(1_000) {
            run_domain::append_run_logs(&bench.db, run.id, chunk.iter().map(String::as_str))
                .await?;
        }
        let summary = Executor::new(bench.db.clone(), NoOp, ExecutorConfig::default().workers(1))
            .execute(run.id)
            .await?;
        anyhow::ensure!(summary.is_completed(), "run did not complete: {summary}");
    }
    let started = Instant::now();
    let report = prune_finished(&bench.db, chrono::Utc::now(), false).await?;
    let rows = report.runs + report.epics + report.stories + report.log_lines;
    Ok((rows as f64 / started.elapsed().as_secs_f64(), rows))
}

/// The result of the scenario.
pub struct ObservabilityResult {
    wake: Vec<(Backend, Result<Vec<f64>, String>)>,
    tracing: Result<(Vec<f64>, Vec<f64>), String>,
    prune: Result<(f64, u64), String>,
    stories: usize,
}

fn outcome<T: Clone>(m: &crate::bench_db::Measured<T>) -> Result<T, String> {
    match (m.done(), m.missing()) {
        (Some(v), _) => Ok(v.clone()),
        (None, Some(why)) => Err(why),
        (None, None) => Err("not measured".into()),
    }
}

/// Runs the scenario.
pub async fn run(servers: &Servers, profile: &Profile) -> ObservabilityResult {
    let stories = if profile.quick { 2_000 } else { 10_000 };
    let repeats = if profile.quick { 1 } else { 2 };
    let mut wake = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let m = servers
            .measure(backend, async |bench: &BenchDb| wake_latency(bench).await)
            .await;
        wake.push((backend, outcome(&m)));
    }
    let m = servers
        .measure(Backend::Postgres, async |bench: &BenchDb| {
            tracing_cost(bench, stories, repeats).await
        })
        .await;
    let tracing = outcome(&m);
    let runs = if profile.quick { 2 } else { 5 };
    let m = servers
        .measure(Backend::Postgres, async |bench: &BenchDb| {
            prune_rate(bench, runs).await
        })
        .await;
    let prune = outcome(&m);
    ObservabilityResult {
        wake,
        tracing,
        prune,
        stories,
    }
}

impl ObservabilityResult {
    /// The goals: tracing at the default level keeps at least 0.95 of the throughput without;
    /// a wake-up on PostgreSQL takes at most a tenth of the poll interval (median).
    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        if let Ok((off, on)) = &self.tracing {
            goals.push(Goal {
                what: "executor with tracing at the default level / tracing off".into(),
                context: format!("PostgreSQL, 16 workers, {} no-op stories", self.stories),
                measured: median(on) / median(off).max(f64::MIN_POSITIVE),
                bound: Bound::AtLeast(0.95),
            });
        }
        for (backend, r) in &self.wake {
            if let (Backend::Postgres, Ok(l)) = (backend, r) {
                goals.push(Goal {
                    what: "wake-up: claimable to started, median / poll interval".into(),
                    context: "PostgreSQL, another connection raises a limit, 250 ms poll".into(),
                    measured: median(l) / 250.0,
                    bound: Bound::AtMost(0.1),
                });
            }
        }
        goals
    }

    /// The report section.
    pub fn section(&self) -> Section {
        let mut body = String::from(
            "Wake-ups: an executor's two workers idle (250 ms poll, jittered between 125 and \
             375 ms); another connection opens a limit (capacity 0 to 1), 20 times, each letting \
             one more no-op story start; from before that commit to the story's `started_at` \
             (the same machine's clock). On PostgreSQL the `run_limit` trigger notifies `run_engine` \
             and the executor's listening connection wakes its workers; SQLite and MariaDB have \
             no notifications, so their workers find it at their next poll.\n\n",
        );
        let mut table = Table::new(&["backend", "median (ms)", "p95 (ms)", "median / poll"]);
        for (backend, r) in &self.wake {
            match r {
                Ok(l) => table.row(vec![
                    backend.name().to_owned(),
                    format!("{:.1}", median(l)),
                    format!("{:.1}", p95(l)),
                    format!("{:.2}×", median(l) / 250.0),
                ]),
                Err(why) => table.row(vec![
                    backend.name().to_owned(),
                    why.clone(),
                    String::new(),
                    String::new(),
                ]),
            }
        }
        body.push_str(&table.to_markdown());
        body.push('\n');
        match &self.tracing {
            Ok((off, on)) => {
                body.push_str(&format!(
                    "Tracing: {} no-op stories, 16 workers, PostgreSQL; a global subscriber \
                     (`fmt` to a sink) whose filter is `off`, then `warn` (the CLI's default), \
                     taking turns: {} against {} ({:.2}×). Claims and records are `debug` \
                     events, so at `warn` each costs one disabled-callsite check.\n\n",
                    self.stories,
                    fmt_rate(median(on)),
                    fmt_rate(median(off)),
                    median(on) / median(off).max(f64::MIN_POSITIVE)
                ));
            }
            Err(why) => body.push_str(&format!("Tracing: not measured: {why}\n\n")),
        }
        match &self.prune {
            Ok((rate, rows)) => body.push_str(&format!(
                "Prune: finished runs of 10,000 log lines each on PostgreSQL, {rows} rows in \
                 all (runs, epics, stories, log lines), a thousand rows a statement: \
                 {} rows deleted.\n\n",
                fmt_rate(*rate)
            )),
            Err(why) => body.push_str(&format!("Prune: not measured: {why}\n\n")),
        }
        Section {
            title: "9. Observability: wake-ups, tracing, retention".into(),
            body,
        }
    }
}

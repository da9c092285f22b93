//! Ordered plans: what needs cost.
//!
//! - **Shapes** (PostgreSQL, 16 workers, no-op stories): the same number of stories as (a) a flat
//!   plan, (b) 100 chains, (c) fan-out and fan-in (1 -> n-2 -> 1), (d) epic B needing epic A
//!   (half the stories each: one row), (e) a random acyclic graph of three needs a story.
//!   Stories per second, each shape against (a) measured in the same run, taking turns; and the
//!   time to create each plan and the rows stored, against (a).
//! - **Chain latency** (every backend): a chain of 200 no-op stories; from one story's
//!   completion (`finished_at`) to its successor's start (`started_at`), median and p95, with
//!   the default poll interval.

use crate::bench_db::{Backend, BenchDb, Servers};
use crate::executor::NoOp;
use crate::measure::{Profile, median};
use crate::report::{Bound, Goal, Section, Table, fmt_rate};
use entity::run_story;
use run_engine::{
    Executor, ExecutorConfig, Plan, PlanEpic, PlanStory, PlanStoryRef, create_run_from_plan,
};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use std::time::Instant;
use uuid::Uuid;

/// Workers for the shapes.
const WORKERS: usize = 16;

/// Links of the latency chain.
const CHAIN: usize = 200;

/// The plan shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Flat,
    Chains,
    FanOutIn,
    EpicNeedsEpic,
    Random,
}

impl Shape {
    const ALL: [Shape; 5] = [
        Shape::Flat,
        Shape::Chains,
        Shape::FanOutIn,
        Shape::EpicNeedsEpic,
        Shape::Random,
    ];

    fn describe(self, n: usize) -> String {
        match self {
            Shape::Flat => "(a) flat".into(),
            Shape::Chains => format!("(b) 100 chains of {}", n / 100),
            Shape::FanOutIn => format!("(c) 1 -> {} -> 1", n - 2),
            Shape::EpicNeedsEpic => format!("(d) epic B ({}) needs epic A ({})", n / 2, n / 2),
            Shape::Random => format!("(e) random acyclic, {} needs", 3 * n - 6),
        }
    }
}

fn story(key: String, needs: Vec<PlanStoryRef>) -> PlanStory {
    PlanStory {
        title: key.clone(),
        key,
        command: "true".into(),
        max_attempts: 1,
        needs,
        timeout: None,
        retry: None,
        priority: 0,
        limits: Vec::new(),
        env: Default::default(),
        dir: None,
        payload: None,
    }
}

fn epic(key: &str, needs: Vec<String>, stories: Vec<PlanStory>) -> PlanEpic {
    PlanEpic {
        key: key.into(),
        title: key.into(),
        needs,
        priority: 0,
        stories,
    }
}

fn need(epic: &str, story: String) -> PlanStoryRef {
    PlanStoryRef {
        epic: epic.into(),
        story,
    }
}

/// `n` stories in the given shape.
fn plan(shape: Shape, n: usize) -> Plan {
    let key = |i: usize| format!("s{i}");
    let epics = match shape {
        Shape::Flat => vec![epic(
            "a",
            vec![],
            (0..n).map(|i| story(key(i), vec![])).collect(),
        )],
        Shape::Chains => vec![epic(
            "a",
            vec![],
            (0..n)
                .map(|i| {
                    let needs = if i % (n / 100).max(1) == 0 {
                        vec![]
                    } else {
                        vec![need("a", key(i - 1))]
                    };
                    story(key(i), needs)
                })
                .collect(),
        )],
        Shape::FanOutIn => {
            let mut stories = vec![story(key(0), vec![])];
            for i in 1..n - 1 {
                stories.push(story(key(i), vec![need("a", key(0))]));
            }
            stories.push(story(
                key(n - 1),
                (1..n - 1).map(|i| need("a", key(i))).collect(),
            ));
            vec![epic("a", vec![], stories)]
        }
        Shape::EpicNeedsEpic => vec![
            epic(
                "a",
                vec![],
                (0..n / 2).map(|i| story(key(i), vec![])).collect(),
            ),
            epic(
                "b",
                vec!["a".into()],
                (n / 2..n).map(|i| story(key(i), vec![])).collect(),
            ),
        ],
        Shape::Random => {
            let mut rng = fastrand::Rng::with_seed(11);
            let stories = (0..n)
                .map(|i| {
                    let mut needs: Vec<usize> = (0..3.min(i)).map(|_| rng.usize(0..i)).collect();
                    needs.sort_unstable();
                    needs.dedup();
                    // Three distinct needs where there are three to pick from.
                    while needs.len() < 3.min(i) {
                        let k = rng.usize(0..i);
                        if !needs.contains(&k) {
                            needs.push(k);
                        }
                    }
                    story(
                        key(i),
                        needs.into_iter().map(|k| need("a", key(k))).collect(),
                    )
                })
                .collect();
            vec![epic("a", vec![], stories)]
        }
    };
    Plan {
        name: "ordered".into(),
        title: "ordered bench".into(),
        fail_fast: false,
        limits: Default::default(),
        epics,
    }
}

/// One shape's figures.
#[derive(Debug, Clone)]
struct ShapeCell {
    shape: Shape,
    /// Stories per second, per repeat.
    rates: Vec<f64>,
    /// Seconds to create the plan, per repeat.
    create: Vec<f64>,
    /// Rows stored in run_story_need + run_epic_need.
    need_rows: i64,
}

/// Chain latency on one backend, milliseconds.
#[derive(Debug, Clone)]
struct Latency {
    backend: Backend,
    result: Result<(f64, f64), String>,
}

/// The result of the scenario.
pub struct OrderedResult {
    stories: usize,
    shapes: Result<Vec<ShapeCell>, String>,
    latency: Vec<Latency>,
}

async fn need_rows(bench: &BenchDb, run_id: Uuid) -> anyhow::Result<i64> {
    use sea_orm::PaginatorTrait;
    let s = entity::run_story_need::Entity::find()
        .filter(entity::run_story_need::Column::RunId.eq(run_id))
        .count(&bench.db)
        .await?;
    let e = entity::run_epic_need::Entity::find()
        .filter(entity::run_epic_need::Column::RunId.eq(run_id))
        .count(&bench.db)
        .await?;
    Ok(i64::try_from(s + e).unwrap_or(i64::MAX))
}

/// Creates and executes one plan; (stories/s, creation seconds, need rows).
async fn execute(bench: &BenchDb, plan: &Plan, workers: usize) -> anyhow::Result<(f64, f64, i64)> {
    let started = Instant::now();
    let run = create_run_from_plan(&bench.db, plan).await?;
    let create = started.elapsed().as_secs_f64();
    let rows = need_rows(bench, run.id).await?;
    let executor = Executor::new(
        bench.db.clone(),
        NoOp,
        ExecutorConfig::default().workers(workers),
    );
    let started = Instant::now();
    let summary = executor.execute(run.id).await?;
    let took = started.elapsed().as_secs_f64();
    anyhow::ensure!(summary.is_completed(), "run did not complete: {summary}");
    Ok((plan.story_count() as f64 / took, create, rows))
}

async fn chain_latency(bench: &BenchDb) -> anyhow::Result<(f64, f64)> {
    let stories = (0..CHAIN)
        .map(|i| {
            let needs = if i == 0 {
                vec![]
            } else {
                vec![need("a", format!("s{}", i - 1))]
            };
            story(format!("s{i}"), needs)
        })
        .collect();
    let plan = Plan {
        name: "chain".into(),
        title: "chain".into(),
        fail_fast: false,
        limits: Default::default(),
        epics: vec![epic("a", vec![], stories)],
    };
    let run = create_run_from_plan(&bench.db, &plan).await?;
    let executor = Executor::new(bench.db.clone(), NoOp, ExecutorConfig::default().workers(4));
    let summary = executor.execute(run.id).await?;
    anyhow::ensure!(summary.is_completed(), "chain did not complete: {summary}");
    let rows = run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run.id))
        .order_by_asc(run_story::Column::Position)
        .all(&bench.db)
        .await?;
    let mut gaps: Vec<f64> = rows
        .windows(2)
        .filter_map(|w| {
            let done = w[0].finished_at?;
            let next = w[1].started_at?;
            Some((next - done).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    anyhow::ensure!(gaps.len() == CHAIN - 1, "missing timestamps");
    gaps.sort_by(f64::total_cmp);
    let p95 = gaps[((gaps.len() as f64) * 0.95) as usize - 1];
    Ok((median(&gaps), p95))
}

/// Runs the scenario: shapes on PostgreSQL, chain latency on every backend.
pub async fn run(servers: &Servers, profile: &Profile) -> OrderedResult {
    let stories = if profile.quick { 2_000 } else { 10_000 };
    let repeats = if profile.quick { 1 } else { 2 };
    let measured = servers
        .measure(Backend::Postgres, async |bench: &BenchDb| {
            let plans: Vec<(Shape, Plan)> =
                Shape::ALL.iter().map(|&s| (s, plan(s, stories))).collect();
            let mut cells: Vec<ShapeCell> = plans
                .iter()
                .map(|(shape, _)| ShapeCell {
                    shape: *shape,
                    rates: Vec::new(),
                    create: Vec::new(),
                    need_rows: 0,
                })
                .collect();
            for _ in 0..repeats {
                for (cell, (_, plan)) in cells.iter_mut().zip(&plans) {
                    let (rate, create, rows) = execute(bench, plan, WORKERS).await?;
                    cell.rates.push(rate);
                    cell.create.push(create);
                    cell.need_rows = rows;
                }
            }
            Ok(cells)
        })
        .await;
    let shapes = match (measured.done(), measured.missing()) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(why)) => Err(why),
        (None, None) => Err("not measured".into()),
    };
    let mut latency = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let m = servers
            .measure(backend, async |bench: &BenchDb| chain_latency(bench).await)
            .await;
        let result = match (m.done(), m.missing()) {
            (Some(v), _) => Ok(*v),
            (None, Some(why)) => Err(why),
            (None, None) => Err("not measured".into()),
        };
        latency.push(Latency { backend, result });
    }
    OrderedResult {
        stories,
        shapes,
        latency,
    }
}

impl OrderedResult {
    fn flat(&self) -> Option<(f64, f64)> {
        let cells = self.shapes.as_ref().ok()?;
        let flat = cells.iter().find(|c| c.shape == Shape::Flat)?;
        Some((median(&flat.rates), median(&flat.create)))
    }

    /// The goals: every shape at least 0.8 of the flat plan; a chain's link at most 5 ms
    /// (median, PostgreSQL).
    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        if let (Ok(cells), Some((flat, _))) = (&self.shapes, self.flat()) {
            for c in cells.iter().filter(|c| c.shape != Shape::Flat) {
                goals.push(Goal {
                    what: "ordered plan throughput: shape / flat plan".into(),
                    context: format!(
                        "PostgreSQL, {WORKERS} workers, {}",
                        c.shape.describe(self.stories)
                    ),
                    measured: median(&c.rates) / flat.max(f64::MIN_POSITIVE),
                    bound: Bound::AtLeast(0.8),
                });
            }
        }
        for l in &self.latency {
            if let (Backend::Postgres, Ok((median, _))) = (l.backend, &l.result) {
                goals.push(Goal {
                    what: "chain: completion to successor's start, median ms".into(),
                    context: format!("PostgreSQL, chain of {CHAIN}, default poll"),
                    measured: *median,
                    bound: Bound::AtMost(5.0),
                });
            }
        }
        goals
    }

    /// The report section.
    pub fn section(&self) -> Section {
        let mut body = format!(
            "No-op stories, {} per plan, on PostgreSQL with {WORKERS} workers in one process, \
             each shape created and executed in turn (median of the repeats). The rule (a story \
             starts only after every story it needs completed) is enforced in the claim's \
             compare-and-swap; the candidate query reads only stories with no unmet need \
             through the `(run_id, status, unmet_needs, priority, position, id)` index; a completion counts \
             down its dependents in its own transaction and hands those it unblocked to its \
             process's workers.\n\n",
            self.stories
        );
        match (&self.shapes, self.flat()) {
            (Ok(cells), Some((flat, flat_create))) => {
                let mut table = Table::new(&[
                    "shape",
                    "stories/s",
                    "/ flat",
                    "create (s)",
                    "create / flat",
                    "need rows",
                ]);
                for c in cells {
                    let (rate, create) = (median(&c.rates), median(&c.create));
                    table.row(vec![
                        c.shape.describe(self.stories),
                        fmt_rate(rate),
                        format!("{:.2}×", rate / flat.max(f64::MIN_POSITIVE)),
                        format!("{create:.2}"),
                        format!("{:.2}×", create / flat_create.max(f64::MIN_POSITIVE)),
                        c.need_rows.to_string(),
                    ]);
                }
                body.push_str(&table.to_markdown());
                body.push('\n');
                body.push_str(&gap_and_cause(cells, flat));
            }
            (Err(why), _) => body.push_str(&format!("Not measured: {why}\n\n")),
            _ => body.push_str("Not measured.\n\n"),
        }
        body.push_str(&format!(
            "A chain of {CHAIN} no-op stories, 4 workers, default poll interval: from one \
             story's `finished_at` to its successor's `started_at` (both written by the \
             executor's clock).\n\n"
        ));
        let mut table = Table::new(&["backend", "median (ms)", "p95 (ms)"]);
        for l in &self.latency {
            let (m, p) = match &l.result {
                Ok((m, p)) => (format!("{m:.2}"), format!("{p:.2}")),
                Err(why) => (why.clone(), String::new()),
            };
            table.row(vec![l.backend.name().to_owned(), m, p]);
        }
        body.push_str(&table.to_markdown());
        body.push('\n');
        Section {
            title: "7. Ordered plans".into(),
            body,
        }
    }
}

/// Where the shapes' gaps to the flat plan come from, with the measured figures.
fn gap_and_cause(cells: &[ShapeCell], flat: f64) -> String {
    let ratio = |shape: Shape| {
        cells
            .iter()
            .find(|c| c.shape == shape)
            .map_or(0.0, |c| median(&c.rates) / flat.max(f64::MIN_POSITIVE))
    };
    format!(
        "Where the gaps come from: a flat story's result is one statement (its \
         compare-and-swap). A story that others need completes in a transaction: BEGIN, the \
         result's compare-and-swap, the marks on its need rows, the let-go of the stories it was \
         the last need of (which returns them, so they are handed to this process's workers \
         without a read), COMMIT; and, when one of its dependents may still wait on a need that \
         completed in the same instant, one more look after the commit. On this two-core \
         machine PostgreSQL shares the cores with the executor, so statements are what a story \
         costs: (b) reaches {:.2} of the flat plan, (c) {:.2} (each of its middle stories also \
         looks again after its commit, as the last story waits on all of them), (e) {:.2} (three \
         needs and about three dependents a story). (d) stores one row and counts its stories \
         down in the transaction that completes epic A, and costs about what the flat plan \
         costs ({:.2}). No shape has a hot row: each need row is written by the one completion \
         it waits for, and whether a story still waits is one probe of `(story_id, met)`, \
         however many needs it has. Closing the gap takes fewer statements per story: results \
         and their marks recorded many to a transaction (batched completions). Creation writes \
         the need rows and counts each story's needs in two statements per run, which is what \
         the creation column shows against a flat plan.\n\n",
        ratio(Shape::Chains),
        ratio(Shape::FanOutIn),
        ratio(Shape::Random),
        ratio(Shape::EpicNeedsEpic),
    )
}

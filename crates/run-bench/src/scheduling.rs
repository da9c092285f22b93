//! Scheduling: what concurrency limits and retry delays cost.
//!
//! - **Limits** (PostgreSQL, 16 workers, no-op stories): the same run (a) without limits,
//!   (b) every story holding one limit of 16, (c) each story holding one of 8 limits of 2
//!   (story `i` holds limit `i mod 8`). Stories per second, (b) and (c) against (a) measured in
//!   the same run, taking turns. A limit's slot is taken in the claim's transaction and given
//!   back in the result's, by conditional updates of its row.
//! - **A retry delay pending** (PostgreSQL, 16 workers): the same no-op run with one more story
//!   that fails its first attempt and waits 2 s before its second. Claim statements and reads
//!   for work per story, against the run without it: the idle workers sleep until the delay
//!   passes instead of polling.

use crate::bench_db::{Backend, BenchDb, Servers};
use crate::executor::NoOp;
use crate::measure::{Profile, median};
use crate::report::{Bound, Goal, Section, Table, fmt_rate};
use async_trait::async_trait;
use run_domain::{Backoff, RetryDelay};
use run_engine::{
    Executor, ExecutorConfig, Plan, PlanEpic, PlanStory, StoryContext, StoryHandler, StoryOutcome,
    Summary, create_run_from_plan,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Workers.
const WORKERS: usize = 16;

/// The delay of the failing story.
const DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limits {
    None,
    One16,
    Eight2,
}

impl Limits {
    const ALL: [Limits; 3] = [Limits::None, Limits::One16, Limits::Eight2];

    fn describe(self) -> &'static str {
        match self {
            Limits::None => "(a) no limits",
            Limits::One16 => "(b) one limit of 16, held by every story",
            Limits::Eight2 => "(c) 8 limits of 2, one per story",
        }
    }
}

fn story(i: usize, limits: Vec<String>, retry: Option<RetryDelay>) -> PlanStory {
    PlanStory {
        key: format!("s{i}"),
        title: format!("s{i}"),
        command: "true".into(),
        max_attempts: 2,
        timeout: None,
        needs: Vec::new(),
        retry,
        priority: 0,
        limits,
        env: Default::default(),
        dir: None,
        payload: None,
    }
}

fn plan(n: usize, limits: Limits, flaky: bool) -> Plan {
    let mut declared = BTreeMap::new();
    match limits {
        Limits::None => {}
        Limits::One16 => {
            declared.insert("bench16".to_owned(), 16);
        }
        Limits::Eight2 => {
            for k in 0..8 {
                declared.insert(format!("bench2-{k}"), 2);
            }
        }
    }
    let mut stories: Vec<PlanStory> = (0..n)
        .map(|i| {
            let held = match limits {
                Limits::None => vec![],
                Limits::One16 => vec!["bench16".to_owned()],
                Limits::Eight2 => vec![format!("bench2-{}", i % 8)],
            };
            story(i, held, None)
        })
        .collect();
    if flaky {
        let mut s = story(n, vec![], None);
        s.key = "flaky".into();
        s.retry = Some(RetryDelay {
            delay: DELAY,
            backoff: Backoff::Constant,
            max_delay: None,
            jitter: false,
        });
        stories.push(s);
    }
    Plan {
        name: "scheduling".into(),
        title: "scheduling bench".into(),
        fail_fast: false,
        limits: declared,
        epics: vec![PlanEpic {
            key: "a".into(),
            title: "a".into(),
            needs: Vec::new(),
            priority: 0,
            stories,
        }],
    }
}

/// Completes every story, except `flaky`'s first attempt.
struct FailFlakyOnce;

#[async_trait]
impl StoryHandler for FailFlakyOnce {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        if ctx.story.key == "flaky" && ctx.attempt == 1 {
            StoryOutcome::Failed {
                error: "first attempt fails".into(),
            }
        } else {
            StoryOutcome::Completed
        }
    }
}

async fn execute(
    bench: &BenchDb,
    plan: &Plan,
    handler: impl StoryHandler + 'static,
) -> anyhow::Result<(f64, Summary)> {
    let run = create_run_from_plan(&bench.db, plan).await?;
    let executor = Executor::new(
        bench.db.clone(),
        handler,
        ExecutorConfig::default().workers(WORKERS),
    );
    let started = Instant::now();
    let summary = executor.execute(run.id).await?;
    let took = started.elapsed().as_secs_f64();
    anyhow::ensure!(summary.is_completed(), "run did not complete: {summary}");
    Ok((plan.story_count() as f64 / took, summary))
}

#[derive(Debug, Clone)]
struct Delayed {
    /// Claim statements and reads for work per story: without, with the delay pending.
    per_story: [f64; 2],
    /// Reads for work beyond the plain run's, in the whole run with the delay.
    extra_looks: f64,
    /// Seconds the delayed run took.
    took: f64,
}

/// The result of the scenario.
pub struct SchedulingResult {
    stories: usize,
    limits: Result<Vec<(Limits, Vec<f64>)>, String>,
    delayed: Result<Delayed, String>,
}

/// Runs the scenario on PostgreSQL.
pub async fn run(servers: &Servers, profile: &Profile) -> SchedulingResult {
    let stories = if profile.quick { 2_000 } else { 10_000 };
    let repeats = if profile.quick { 1 } else { 2 };
    let measured = servers
        .measure(Backend::Postgres, async |bench: &BenchDb| {
            let plans: Vec<(Limits, Plan)> = Limits::ALL
                .iter()
                .map(|&l| (l, plan(stories, l, false)))
                .collect();
            let mut cells: Vec<(Limits, Vec<f64>)> =
                Limits::ALL.iter().map(|&l| (l, Vec::new())).collect();
            for _ in 0..repeats {
                for (cell, (_, plan)) in cells.iter_mut().zip(&plans) {
                    cell.1.push(execute(bench, plan, NoOp).await?.0);
                }
            }
            Ok(cells)
        })
        .await;
    let limits = match (measured.done(), measured.missing()) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(why)) => Err(why),
        (None, None) => Err("not measured".into()),
    };
    let n = if profile.quick { 1_000 } else { 2_000 };
    let measured = servers
        .measure(Backend::Postgres, async |bench: &BenchDb| {
            let (_, plain) = execute(bench, &plan(n, Limits::None, false), NoOp).await?;
            let started = Instant::now();
            let (_, delayed) = execute(bench, &plan(n, Limits::None, true), FailFlakyOnce).await?;
            let took = started.elapsed().as_secs_f64();
            let per =
                |s: &Summary, stories: usize| (s.claims_tried + s.looks) as f64 / stories as f64;
            Ok(Delayed {
                per_story: [per(&plain, n), per(&delayed, n + 1)],
                extra_looks: delayed.looks as f64 - plain.looks as f64,
                took,
            })
        })
        .await;
    let delayed = match (measured.done(), measured.missing()) {
        (Some(d), _) => Ok(d.clone()),
        (None, Some(why)) => Err(why),
        (None, None) => Err("not measured".into()),
    };
    SchedulingResult {
        stories,
        limits,
        delayed,
    }
}

impl SchedulingResult {
    fn rate(&self, which: Limits) -> Option<f64> {
        let cells = self.limits.as_ref().ok()?;
        cells.iter().find(|c| c.0 == which).map(|c| median(&c.1))
    }

    /// The goals: (b) and (c) at least 0.8 of (a); with a delay pending, at most six reads for
    /// work per idle worker beyond the plain run, however long the delay (polling at the
    /// default 250 ms would read about 16 over the 2 s).
    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        if let Some(none) = self.rate(Limits::None) {
            for l in [Limits::One16, Limits::Eight2] {
                if let Some(rate) = self.rate(l) {
                    goals.push(Goal {
                        what: "limits: stories/s against no limits".into(),
                        context: format!("PostgreSQL, {WORKERS} workers, {}", l.describe()),
                        measured: rate / none.max(f64::MIN_POSITIVE),
                        bound: Bound::AtLeast(0.8),
                    });
                }
            }
        }
        if let Ok(d) = &self.delayed {
            goals.push(Goal {
                what: "retry delay pending: extra reads for work per idle worker".into(),
                context: format!("PostgreSQL, {WORKERS} workers, one story waiting 2 s"),
                measured: d.extra_looks / WORKERS as f64,
                bound: Bound::AtMost(6.0),
            });
        }
        goals
    }

    /// The report section.
    pub fn section(&self) -> Section {
        let mut body = format!(
            "No-op stories, {} per run, on PostgreSQL with {WORKERS} workers in one process, \
             each case created and executed in turn (median of the repeats). A story holding \
             limits takes a free slot row of each in the statement that claims it (picked with \
             `FOR UPDATE SKIP LOCKED`, all or none; the story's compare-and-swap requires them) \
             and frees them in the statement that records its result; the candidate query \
             passes over stories whose limit has no free slot.\n\n",
            self.stories
        );
        match (&self.limits, self.rate(Limits::None)) {
            (Ok(cells), Some(none)) => {
                let mut table = Table::new(&["limits", "stories/s", "/ no limits"]);
                for (l, rates) in cells {
                    let rate = median(rates);
                    table.row(vec![
                        l.describe().to_owned(),
                        fmt_rate(rate),
                        format!("{:.2}×", rate / none.max(f64::MIN_POSITIVE)),
                    ]);
                }
                body.push_str(&table.to_markdown());
                body.push('\n');
                body.push_str(
                    "Where the gap comes from: a limited story's claim and result each write \
                     one row more (its slot) in the same statement, and the candidate query \
                     probes `run_story_limit` and a free slot for each row it reads; on this \
                     two-core machine, where PostgreSQL and the executor share the cores, the \
                     extra writes and probes are what (b) costs. (c) has 16 slots for 16 \
                     workers split over 8 limits: a worker that frees a slot of limit k can use \
                     it only with a story holding k, while every other limit is full, so \
                     claims meet full limits (a claim that finds no free slot writes nothing, \
                     and its process passes over that limit for 20 ms or until one of its own \
                     stories frees a slot) and workers wait between tries. Batched claims (the \
                     next issue) would take a batch of slots with one statement.\n\n",
                );
            }
            (Err(why), _) => body.push_str(&format!("Not measured: {why}\n\n")),
            _ => body.push_str("Not measured.\n\n"),
        }
        match &self.delayed {
            Ok(d) => {
                body.push_str(&format!(
                    "A retry delay pending: the same run with one story more that fails its \
                     first attempt and waits {} s, so for about that long every worker is idle \
                     (the run took {:.1} s). Claim statements plus reads for work (candidate \
                     queries, idle looks), per story:\n\n",
                    DELAY.as_secs(),
                    d.took
                ));
                let mut table = Table::new(&["run", "statements per story"]);
                table.row(vec![
                    "without the delayed story".into(),
                    format!("{:.3}", d.per_story[0]),
                ]);
                table.row(vec![
                    "with it, delay pending".into(),
                    format!("{:.3}", d.per_story[1]),
                ]);
                body.push_str(&table.to_markdown());
                body.push_str(&format!(
                    "\n{:.0} reads for work more in all ({:.1} per worker): each idle worker \
                     reads the candidates and looks once, sees that nothing runs and when the \
                     delay passes, and sleeps until then; after it, a read and a look more. \
                     That does not grow with the delay: polling at the default 250 ms (a \
                     candidate read and a look each time) would read about 16 per worker over \
                     these 2 s. No claim statement is sent for the waiting story.\n\n",
                    d.extra_looks,
                    d.extra_looks / WORKERS as f64
                ));
            }
            Err(why) => body.push_str(&format!("Retry delay: not measured: {why}\n\n")),
        }
        Section {
            title: "8. Scheduling: limits and retry delays".into(),
            body,
        }
    }
}

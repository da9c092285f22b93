//! Executor throughput on PostgreSQL, against a `FOR UPDATE SKIP LOCKED` claim loop and, with
//! `--peers`, real job queues (graphile-worker, pgqueuer) on the same server in the same run.
//!
//! **Ours**: `run_engine::Executor` with an in-process no-op handler, 1, 4 and 16 workers, on a
//! run of no-op stories: stories are claimed with a lease in batches (one statement for the
//! idle workers of the process), their leases held while the (empty) handlers run, their
//! results recorded in batches (each row on its own version), then the epic and run are
//! completed; and the same executor claiming and recording one story per statement
//! (`claim_batch(1)`), as it did before batching. **Processes**: 1, 2 and 4 processes of 4
//! workers each on one run (each a child process of this binary). **Baseline**: the job-queue
//! idiom (Oban, River, pg-boss), in plain SQL on one connection per worker: claim with `WITH c
//! AS (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) UPDATE ... RETURNING`, then complete with a
//! second UPDATE: two statements a story. **Peers**: graphile-worker with its perf test's
//! settings (a local queue of 500, batched completion) and with its defaults, and pgqueuer,
//! each draining the same number of no-op jobs made before the clock starts, each on a fresh
//! database. Everything runs on fresh runs of the same size, taking turns.

use crate::bench_db::{Availability, Backend, BenchDb, Servers, close_all};
use crate::measure::{Profile, Summary, median};
use crate::memory::spawn_executor;
use crate::peers::{Peer, Peers};
use crate::plot::{Chart, Scale, Series};
use crate::report::{Bound, Goal, Section, Table, fmt_count, fmt_rate};
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

/// Processes (of [`WORKERS_PER_PROCESS`] workers each) measured.
pub const PROCESSES: [usize; 3] = [1, 2, 4];

/// Workers in each process of the processes cells.
pub const WORKERS_PER_PROCESS: usize = 4;

/// One workers cell: stories (or jobs) per second per repeat.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Workers.
    pub workers: usize,
    /// Ours, batched claims and completions.
    pub ours: Vec<f64>,
    /// Ours, one story per statement (`claim_batch(1)`).
    pub one_by_one: Vec<f64>,
    /// The SKIP LOCKED loop.
    pub baseline: Vec<f64>,
    /// Claim statements per story, ours (batched).
    pub claims_per_story: Vec<f64>,
    /// CPU time of ours' process per story (µs), batched.
    pub cpu_us: Vec<f64>,
    /// PostgreSQL's CPU time per story under ours (µs), batched.
    pub pg_cpu_us: Vec<f64>,
    /// PostgreSQL's CPU time per job under the SKIP LOCKED loop (µs).
    pub baseline_pg_cpu_us: Vec<f64>,
    /// Each peer measured, with its rates (empty when skipped).
    pub peers: Vec<(Peer, Vec<f64>)>,
}

/// One processes cell.
#[derive(Debug, Clone)]
pub struct ProcCell {
    /// Processes of [`WORKERS_PER_PROCESS`] workers.
    pub processes: usize,
    /// Ours, stories/s per repeat (first child start to last child exit).
    pub ours: Vec<f64>,
    /// The SKIP LOCKED loop with as many connections as ours has workers, stories/s.
    pub baseline: Vec<f64>,
    /// Claims another process won first, per story, ours.
    pub conflicts_per_story: Vec<f64>,
    /// PostgreSQL's CPU time over the wall time of ours, as a share of the machine's cores.
    pub db_cpu_share: Vec<f64>,
    /// CPU time of ours' processes per story (µs), all processes together.
    pub cpu_us: Vec<f64>,
}

/// The result of the scenario.
pub struct ExecutorResult {
    measured: Result<(Vec<Cell>, Vec<ProcCell>), String>,
    stories: usize,
    peers_note: Option<String>,
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

/// For `run-bench profile-executor`: migrates `url`, creates a run of `stories` no-op stories,
/// executes it with `workers` workers (claiming up to `batch` at a time) in this process and
/// prints the rate and the CPU per story (with `create_only`, prints the run's id instead).
pub async fn profile(
    url: &str,
    stories: usize,
    workers: usize,
    batch: Option<usize>,
    create_only: bool,
) -> anyhow::Result<()> {
    let db = run_domain::connect(url).await?;
    migration::apply(&db, None).await?;
    let run_id = new_run(&db, stories).await?;
    if create_only {
        println!("{run_id}");
        return Ok(());
    }
    let mut config = ExecutorConfig::default().workers(workers);
    if let Some(batch) = batch {
        config = config.claim_batch(batch);
    }
    let run = execute_measured(&db, run_id, stories, config).await?;
    println!(
        "{stories} stories, {workers} workers: {:.0} stories/s, CPU per story {:.0} µs here, \
         {:.0} µs in postgres processes, {:.0} claims",
        run.rate,
        run.cpu_us,
        run.pg_cpu_us,
        run.claims_per_story * stories as f64
    );
    Ok(())
}

/// What one run of ours in this process measured.
struct OursRun {
    rate: f64,
    claims_per_story: f64,
    /// This process's CPU time per story (µs).
    cpu_us: f64,
    /// PostgreSQL's CPU time per story (µs).
    pg_cpu_us: f64,
}

/// Ours in this process: stories/s, claim statements per story, and CPU per story here and in
/// PostgreSQL.
async fn ours(
    bench: &BenchDb,
    workers: usize,
    stories: usize,
    batch: usize,
) -> anyhow::Result<OursRun> {
    let run_id = new_run(&bench.db, stories).await?;
    let config = ExecutorConfig::default()
        .workers(workers)
        .claim_batch(batch);
    execute_measured(&bench.db, run_id, stories, config).await
}

/// Executes `run_id` (of `stories` no-op stories) in this process with `config`, timing it and
/// the CPU used here and by PostgreSQL.
async fn execute_measured(
    db: &DatabaseConnection,
    run_id: Uuid,
    stories: usize,
    config: ExecutorConfig,
) -> anyhow::Result<OursRun> {
    let executor = Executor::new(db.clone(), NoOp, config);
    let pg = PgCpu::start();
    let cpu = own_cpu_seconds();
    let started = Instant::now();
    let summary = executor.execute(run_id).await?;
    let took = started.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds() - cpu;
    let pg = pg.stop().await;
    anyhow::ensure!(
        summary.run_status == "completed",
        "run did not complete: {summary}"
    );
    let n = stories as f64;
    Ok(OursRun {
        rate: n / took,
        claims_per_story: summary.claims_tried as f64 / n,
        cpu_us: 1e6 * cpu / n,
        pg_cpu_us: 1e6 * pg / n,
    })
}

/// What one run of ours in child processes measured.
struct ProcRun {
    rate: f64,
    conflicts_per_story: f64,
    db_cpu_share: f64,
    /// The children's CPU time per story (µs).
    cpu_us: f64,
}

/// Ours in `processes` child processes of [`WORKERS_PER_PROCESS`] workers on one run:
/// stories/s, conflicts per story, PostgreSQL's share of the machine's CPU meanwhile, and the
/// children's CPU per story.
async fn ours_in_processes(
    bench: &BenchDb,
    processes: usize,
    stories: usize,
) -> anyhow::Result<ProcRun> {
    let run_id = new_run(&bench.db, stories).await?;
    let cpu = PgCpu::start();
    let started = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|_| {
            let url = bench.url.clone();
            tokio::spawn(async move { spawn_executor(&url, run_id, WORKERS_PER_PROCESS).await })
        })
        .collect();
    let mut recorded = 0;
    let mut conflicts = 0;
    let mut child_cpu = 0.0;
    for child in children {
        let probe = child.await??;
        recorded += probe.stories;
        conflicts += probe.conflicts;
        child_cpu += probe.cpu_secs;
    }
    let took = started.elapsed().as_secs_f64();
    let cpu = cpu.stop().await;
    anyhow::ensure!(
        recorded == stories as u64,
        "{processes} processes recorded {recorded} of {stories} stories"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let n = stories as f64;
    Ok(ProcRun {
        rate: n / took,
        conflicts_per_story: conflicts as f64 / n,
        db_cpu_share: cpu / (took * cores),
        cpu_us: 1e6 * child_cpu / n,
    })
}

/// Samples the CPU time of this machine's `postgres` processes while a measurement runs:
/// every 50 ms, so that the backends of connections opened and closed meanwhile count too (up
/// to their last sample).
struct PgCpu {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<f64>,
}

impl PgCpu {
    fn start() -> PgCpu {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let first = postgres_ticks();
            let mut last = first.clone();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                last.extend(postgres_ticks());
            }
            last.extend(postgres_ticks());
            let ticks: u64 = last
                .iter()
                .map(|(pid, t)| t.saturating_sub(first.get(pid).copied().unwrap_or(0)))
                .sum();
            // Linux reports in USER_HZ, 100 on every common configuration.
            ticks as f64 / 100.0
        });
        PgCpu { stop, task }
    }

    /// CPU seconds the `postgres` processes used since [`PgCpu::start`].
    async fn stop(self) -> f64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0.0)
    }
}

/// CPU ticks (user and system) used so far by each of this machine's `postgres` processes
/// (none where `/proc` cannot tell).
fn postgres_ticks() -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(("postgres", ticks)) = stat_ticks(&stat) {
            out.insert(pid, ticks);
        }
    }
    out
}

/// A process's name and its CPU ticks (user and system) from its `/proc/<pid>/stat` text.
fn stat_ticks(stat: &str) -> Option<(&str, u64)> {
    // pid (comm) state ...: utime and stime are fields 14 and 15; comm may hold spaces.
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((comm, field(11) + field(12)))
}

/// CPU seconds this process has used (0 where `/proc` cannot tell).
pub fn own_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| stat_ticks(&stat).map(|(_, ticks)| ticks as f64 / 100.0))
        .unwrap_or(0.0)
}

const CLAIM: &str = "WITH c AS (SELECT id FROM run_story WHERE run_id = $1 AND status = 'pending' \
     ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED) \
     UPDATE run_story s SET status = 'running', version = s.version + 1, attempts = s.attempts + 1, \
     lease_owner = $2, lease_expires_at = now() + interval '30 seconds', started_at = now(), \
     updated_at = now() FROM c WHERE s.id = c.id RETURNING s.id";
const COMPLETE: &str = "UPDATE run_story SET status = 'completed', version = version + 1, \
     finished_at = now(), updated_at = now(), lease_owner = NULL, lease_expires_at = NULL \
     WHERE id = $1";

/// The SKIP LOCKED loop: jobs/s and PostgreSQL's CPU time per job (µs).
async fn baseline(bench: &BenchDb, workers: usize, stories: usize) -> anyhow::Result<(f64, f64)> {
    let run_id = new_run(&bench.db, stories).await?;
    let pools = bench.connect_many(workers).await?;
    let pg = PgCpu::start();
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
    let pg = pg.stop().await;
    close_all(pools).await;
    anyhow::ensure!(total == stories, "baseline finished {total} of {stories}");
    Ok((stories as f64 / took, 1e6 * pg / stories as f64))
}

/// A peer draining `jobs` at `workers` on a fresh database of its own.
async fn peer(
    servers: &Servers,
    peers: &Peers,
    peer: Peer,
    workers: usize,
    jobs: usize,
) -> anyhow::Result<f64> {
    let Availability::Ready { admin_url, .. } = servers.availability(Backend::Postgres) else {
        anyhow::bail!("PostgreSQL not available");
    };
    let fresh = BenchDb::create(Backend::Postgres, admin_url).await?;
    let rate = peers.drain(peer, &fresh.url, workers, jobs).await;
    fresh.destroy().await;
    rate
}

/// Runs the scenario on PostgreSQL; `peers`: the installed peers, for `--peers`.
pub async fn run(servers: &Servers, profile: &Profile, peers: Option<&Peers>) -> ExecutorResult {
    let stories = if profile.quick { 2_000 } else { 10_000 };
    // One story per statement is slow at one worker: fewer stories (a rate is a rate).
    let one_by_one_stories = stories / 5;
    let repeats = if profile.quick { 1 } else { 2 };
    let peers_note = peers.map(|p| {
        Peer::ALL
            .iter()
            .filter_map(|&peer| p.available(peer).err())
            .collect::<Vec<_>>()
            .join("; ")
    });
    let measured = servers
        .measure(Backend::Postgres, async |bench: &BenchDb| {
            let mut cells = Vec::new();
            for workers in WORKERS {
                let mut cell = Cell {
                    workers,
                    ours: Vec::new(),
                    one_by_one: Vec::new(),
                    baseline: Vec::new(),
                    claims_per_story: Vec::new(),
                    cpu_us: Vec::new(),
                    pg_cpu_us: Vec::new(),
                    baseline_pg_cpu_us: Vec::new(),
                    peers: Vec::new(),
                };
                let available: Vec<Peer> = peers
                    .map(|p| {
                        Peer::ALL
                            .into_iter()
                            .filter(|&peer| p.available(peer).is_ok())
                            .collect()
                    })
                    .unwrap_or_default();
                for _ in 0..repeats {
                    let (rate, pg) = baseline(bench, workers, stories).await?;
                    cell.baseline.push(rate);
                    cell.baseline_pg_cpu_us.push(pg);
                    let batch = ExecutorConfig::default().claim_batch;
                    let run = ours(bench, workers, stories, batch).await?;
                    cell.ours.push(run.rate);
                    cell.claims_per_story.push(run.claims_per_story);
                    cell.cpu_us.push(run.cpu_us);
                    cell.pg_cpu_us.push(run.pg_cpu_us);
                    let run = ours(bench, workers, one_by_one_stories, 1).await?;
                    cell.one_by_one.push(run.rate);
                    if let Some(p) = peers {
                        for &which in &available {
                            let rate = peer(servers, p, which, workers, stories).await?;
                            match cell.peers.iter_mut().find(|(q, _)| *q == which) {
                                Some((_, rates)) => rates.push(rate),
                                None => cell.peers.push((which, vec![rate])),
                            }
                        }
                    }
                    // Let the server settle between the two (autovacuum, checkpoints).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                cells.push(cell);
            }
            let mut procs = Vec::new();
            for processes in PROCESSES {
                let mut cell = ProcCell {
                    processes,
                    ours: Vec::new(),
                    baseline: Vec::new(),
                    conflicts_per_story: Vec::new(),
                    db_cpu_share: Vec::new(),
                    cpu_us: Vec::new(),
                };
                for _ in 0..repeats {
                    let total = processes * WORKERS_PER_PROCESS;
                    cell.baseline.push(baseline(bench, total, stories).await?.0);
                    let run = ours_in_processes(bench, processes, stories).await?;
                    cell.ours.push(run.rate);
                    cell.conflicts_per_story.push(run.conflicts_per_story);
                    cell.db_cpu_share.push(run.db_cpu_share);
                    cell.cpu_us.push(run.cpu_us);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                procs.push(cell);
            }
            Ok((cells, procs))
        })
        .await;
    let measured = match (measured.done(), measured.missing()) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(why)) => Err(why),
        (None, None) => Err(PENDING.to_owned()),
    };
    ExecutorResult {
        measured,
        stories,
        peers_note,
    }
}

fn ratio(a: &[f64], b: &[f64]) -> f64 {
    median(a) / median(b).max(f64::MIN_POSITIVE)
}

impl Cell {
    fn peer(&self, peer: Peer) -> Option<&[f64]> {
        self.peers
            .iter()
            .find(|(p, _)| *p == peer)
            .map(|(_, r)| r.as_slice())
    }
}

impl ExecutorResult {
    /// The goals: ours at least graphile-worker with batching (when measured) at every worker
    /// count, at least 3 times the SKIP LOCKED loop at 16 workers, 2 and 4 processes at least
    /// 1.6 and 2.5 times 1, and claim conflicts under 0.1 per story.
    pub fn goals(&self) -> Vec<Goal> {
        let Ok((cells, procs)) = &self.measured else {
            return Vec::new();
        };
        let mut goals = Vec::new();
        for c in cells {
            if let Some(g) = c.peer(Peer::GraphileBatched) {
                goals.push(Goal {
                    what: "executor throughput: ours / graphile-worker (batched)".into(),
                    context: format!("PostgreSQL, {} worker(s)", c.workers),
                    measured: ratio(&c.ours, g),
                    bound: Bound::AtLeast(1.0),
                });
            }
        }
        if let Some(c) = cells.iter().find(|c| c.workers == 16) {
            goals.push(Goal {
                what: "executor throughput: ours / SKIP LOCKED loop".into(),
                context: "PostgreSQL, 16 workers".into(),
                measured: ratio(&c.ours, &c.baseline),
                bound: Bound::AtLeast(3.0),
            });
        }
        if let Some(one) = procs.iter().find(|p| p.processes == 1) {
            for (n, want) in [(2, 1.6), (4, 2.5)] {
                if let Some(p) = procs.iter().find(|p| p.processes == n) {
                    goals.push(Goal {
                        what: format!("executor: {n} processes / 1 process"),
                        context: format!("PostgreSQL, {WORKERS_PER_PROCESS} workers each"),
                        measured: ratio(&p.ours, &one.ours),
                        bound: Bound::AtLeast(want),
                    });
                }
            }
        }
        for p in procs {
            goals.push(Goal {
                what: "executor: claim conflicts per story".into(),
                context: format!("PostgreSQL, {} process(es)", p.processes),
                measured: median(&p.conflicts_per_story),
                bound: Bound::AtMost(0.1),
            });
        }
        goals
    }

    /// The chart of stories (jobs) per second against workers.
    pub fn chart(&self) -> Option<Chart> {
        let (cells, _) = self.measured.as_ref().ok()?;
        let points = |f: &dyn Fn(&Cell) -> Option<Vec<f64>>| -> Vec<Option<Summary>> {
            cells
                .iter()
                .map(|c| f(c).filter(|v| !v.is_empty()).map(|v| Summary::of(&v)))
                .collect()
        };
        let mut series = vec![
            Series {
                name: "ours (batched)".into(),
                color: "#d62728",
                dashed: false,
                points: points(&|c| Some(c.ours.clone())),
            },
            Series {
                name: "ours, one story per statement".into(),
                color: "#ff9896",
                dashed: false,
                points: points(&|c| Some(c.one_by_one.clone())),
            },
            Series {
                name: "SKIP LOCKED loop".into(),
                color: "#7f7f7f",
                dashed: true,
                points: points(&|c| Some(c.baseline.clone())),
            },
        ];
        for (peer, color) in [
            (Peer::GraphileBatched, "#1f77b4"),
            (Peer::GraphileDefault, "#aec7e8"),
            (Peer::Pgqueuer, "#2ca02c"),
        ] {
            if cells.iter().any(|c| c.peer(peer).is_some()) {
                series.push(Series {
                    name: peer.name().into(),
                    color,
                    dashed: true,
                    points: points(&|c| c.peer(peer).map(<[f64]>::to_vec)),
                });
            }
        }
        Some(Chart {
            title: "PostgreSQL, no-op stories (jobs)".into(),
            x_label: "workers".into(),
            y_label: "finished per second".into(),
            categories: cells.iter().map(|c| c.workers.to_string()).collect(),
            scale: Scale::Linear,
            format_y: fmt_count,
            series,
        })
    }

    /// The report section.
    pub fn section(&self) -> Section {
        let mut body = format!(
            "No-op stories (jobs), {} per run, on PostgreSQL, median of the repeats (range in \
             brackets where it matters). **Ours**: `run_engine::Executor` with an in-process \
             handler that returns at once: a worker that finds nothing to run claims, in one \
             statement (`UPDATE ... FROM (SELECT id, version ... LIMIT n FOR UPDATE SKIP LOCKED) \
             ... RETURNING`), up to 256 stories, one for itself, the others handed to the idle \
             workers of its process or queued there; results finishing at once are recorded in \
             one statement (`UPDATE ... FROM unnest(ids, versions, ...)`), each row on its own \
             version; the epic and run are completed; a \"started\" and a \"completed\" log \
             line for each story. **One story per statement**: the same executor with `claim_batch(1)` ({} \
             stories per run). **SKIP LOCKED loop**: plain SQL, one connection per worker: \
             `WITH c AS (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) UPDATE ... RETURNING`, then \
             an UPDATE by id: two statements a job, no fencing.\n\n",
            self.stories,
            self.stories / 5,
        );
        match &self.peers_note {
            None => body.push_str(
                "Peers (graphile-worker, pgqueuer) not measured: run with `--peers`.\n\n",
            ),
            Some(note) if !note.is_empty() => {
                body.push_str(&format!("Peers skipped: {note}.\n\n"));
            }
            Some(_) => body.push_str(&format!(
                "**Peers**, installed by `--peers` into a scratch folder, each on a fresh \
                 database, the jobs made before the clock starts: graphile-worker {} with its \
                 perf test's settings (`localQueue` of 500, completions batched with no delay) \
                 and with its defaults; pgqueuer {} (asyncpg). Workers are their concurrency \
                 setting.\n\n",
                crate::peers::GRAPHILE_WORKER_VERSION,
                crate::peers::PGQUEUER_VERSION,
            )),
        }
        let (cells, procs) = match &self.measured {
            Err(why) => {
                body.push_str(&format!("Not measured: {why}\n"));
                return Section {
                    title: "5. Executor throughput".into(),
                    body,
                };
            }
            Ok(m) => m,
        };
        let mut header = vec![
            "workers",
            "ours",
            "one per statement",
            "SKIP LOCKED loop",
            "ours / loop",
            "claims per story",
            "CPU µs per story: ours / its PostgreSQL (loop's PostgreSQL)",
        ];
        let measured_peers: Vec<Peer> = Peer::ALL
            .into_iter()
            .filter(|p| cells.iter().any(|c| c.peer(*p).is_some()))
            .collect();
        for p in &measured_peers {
            header.push(p.name());
        }
        if measured_peers.contains(&Peer::GraphileBatched) {
            header.push("ours / graphile (batched)");
        }
        let mut table = Table::new(&header);
        for c in cells {
            let mut row = vec![
                c.workers.to_string(),
                fmt_rate(median(&c.ours)),
                fmt_rate(median(&c.one_by_one)),
                fmt_rate(median(&c.baseline)),
                format!("{:.2}×", ratio(&c.ours, &c.baseline)),
                format!("{:.3}", median(&c.claims_per_story)),
                format!(
                    "{:.0} / {:.0} ({:.0})",
                    median(&c.cpu_us),
                    median(&c.pg_cpu_us),
                    median(&c.baseline_pg_cpu_us)
                ),
            ];
            for p in &measured_peers {
                row.push(c.peer(*p).map_or("n/a".into(), |r| fmt_rate(median(r))));
            }
            if measured_peers.contains(&Peer::GraphileBatched) {
                row.push(
                    c.peer(Peer::GraphileBatched)
                        .map_or("n/a".into(), |g| format!("{:.2}×", ratio(&c.ours, g))),
                );
            }
            table.row(row);
        }
        body.push_str(&table.to_markdown());
        body.push_str(&format!(
            "\n**Processes**: 1, 2 and 4 processes of {WORKERS_PER_PROCESS} workers each on one \
             run of {} stories, each a child process of this binary (from the first start to \
             the last exit, so each process's start-up and connection count); the SKIP LOCKED \
             loop with as many connections as ours has workers. PostgreSQL's CPU share: its \
             processes' CPU time over the wall time, as a share of this machine's cores.\n\n",
            self.stories
        ));
        let mut table = Table::new(&[
            "processes × workers",
            "ours",
            "vs 1 process",
            "SKIP LOCKED loop",
            "conflicts per story",
            "PostgreSQL CPU share",
            "our CPU µs per story",
        ]);
        let one = procs
            .iter()
            .find(|p| p.processes == 1)
            .map(|p| p.ours.clone());
        for p in procs {
            table.row(vec![
                format!("{} × {WORKERS_PER_PROCESS}", p.processes),
                fmt_rate(median(&p.ours)),
                one.as_ref()
                    .map_or("n/a".into(), |o| format!("{:.2}×", ratio(&p.ours, o))),
                fmt_rate(median(&p.baseline)),
                format!("{:.3}", median(&p.conflicts_per_story)),
                format!("{:.0}%", 100.0 * median(&p.db_cpu_share)),
                format!("{:.0}", median(&p.cpu_us)),
            ]);
        }
        body.push_str(&table.to_markdown());
        body.push('\n');
        body.push_str(&gap_and_cause(cells, procs));
        Section {
            title: "5. Executor throughput".into(),
            body,
        }
    }
}

/// Where the gaps to the goals come from, with the measured figures.
fn gap_and_cause(cells: &[Cell], procs: &[ProcCell]) -> String {
    let mut out = String::from("Where the gaps come from (CPU times measured in the same runs): ");
    if let (Some(first), Some(last)) = (cells.first(), cells.last()) {
        out.push_str(&format!(
            "claims are no longer the cost: {:.3} claim statements per story at {} worker(s), \
             {:.3} at {}, and no claim conflicts. What a story costs now is CPU: the executor's \
             own process spends {:.0} µs of CPU per story at {} worker(s) and {:.0} µs at {} \
             (spans and events, two log lines through the shared writer, the record's \
             bookkeeping, a task per background record), and PostgreSQL {:.0} µs and {:.0} µs \
             per story (the batched claim and result statements, the two log lines' INSERTs), \
             against {:.0} µs per job for the SKIP LOCKED loop's two statements. On two cores \
             shared by both, {:.0} + {:.0} µs per story bounds ours near {} stories/s. ",
            median(&first.claims_per_story),
            first.workers,
            median(&last.claims_per_story),
            last.workers,
            median(&first.cpu_us),
            first.workers,
            median(&last.cpu_us),
            last.workers,
            median(&first.pg_cpu_us),
            median(&last.pg_cpu_us),
            median(&last.baseline_pg_cpu_us),
            median(&last.cpu_us),
            median(&last.pg_cpu_us),
            fmt_count(2e6 / (median(&last.cpu_us) + median(&last.pg_cpu_us)).max(1.0)),
        ));
        if let Some(g) = first.peer(Peer::GraphileBatched) {
            out.push_str(&format!(
                "graphile-worker with its local queue fetches 500 jobs per statement and \
                 completes them in batches, and writes no log line per job: {} jobs/s at {} \
                 worker(s), {:.1}× ours. To reach it ours would need {:.1}× less CPU per story, \
                 in its process and in PostgreSQL; the log lines (two rows per story, which \
                 graphile-worker does not write) and the per-story tracing and events are the \
                 largest parts left. ",
                fmt_count(median(g)),
                first.workers,
                ratio(g, &first.ours),
                ratio(g, &first.ours),
            ));
        }
    }
    if let (Some(one), Some(last)) = (procs.first(), procs.last()) {
        out.push_str(&format!(
            "Processes: {} process(es) reached {:.2}× one, with PostgreSQL at {:.0}% of the \
             machine's CPU and the executors spending {:.0} µs of CPU per story between them \
             (one: {:.0} µs); each process adds its own runtime, pool and log writer on the same \
             two cores, so on this machine a second process adds CPU demand, not capacity. \
             Conflicts stay at zero because each claim skips rows others are claiming.",
            last.processes,
            ratio(&last.ours, &one.ours),
            100.0 * median(&last.db_cpu_share),
            median(&last.cpu_us),
            median(&one.cpu_us),
        ));
    }
    out.push('\n');
    out
}

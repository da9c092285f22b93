//! `run-bench`: runs the benchmark suite and writes `BENCHMARKS.md` and its plots.
//!
//! ```text
//! cargo run --release -p run-bench -- [--quick] [--out BENCHMARKS.md] [--only contention,...] [--peers]
//! ```
//!
//! Servers: `RUN_ENGINE_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and `RUN_ENGINE_BENCH_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`); SQLite uses a
//! temporary file. A server that cannot be reached is reported as skipped.

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use run_bench::memory::{
    self, EXECUTOR_PROBE_SUBCOMMAND, PEAK_SUBCOMMAND, PROBE_SUBCOMMAND, Reader,
};
use run_bench::report::{self, Report, Section};
use run_bench::{
    Profile, Servers, append_throughput, contention, executor, log_append, observability, ordered,
    plot, scheduling, versioned_update,
};
use std::path::{Path, PathBuf};
use std::time::Instant;
use uuid::Uuid;

/// The plot of append cost against log size, relative to the report's folder.
const SIZE_PLOT: &str = "docs/bench-append-vs-size.svg";
/// The plot of executor throughput against workers, relative to the report's folder.
const EXECUTOR_PLOT: &str = "docs/bench-executor-vs-workers.svg";
/// The plot of append throughput against writers, relative to the report's folder.
const WRITERS_PLOT: &str = "docs/bench-append-vs-writers.svg";

/// run-engine's benchmark suite: run-log appends, compare-and-swap, contention and memory, each
/// against its baseline in the same run.
#[derive(Debug, Parser)]
#[command(name = "run-bench", version)]
struct Cli {
    /// Fewer repeats, shorter cells, a 10 MiB log and runs of 1,000 and 2,000 stories for
    /// memory: under 2 minutes.
    #[arg(long)]
    quick: bool,
    /// Where to write the report; the plots go to `docs/` beside it.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Run only these scenarios (comma-separated); the report then holds only them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Also measure graphile-worker (npm) and pgqueuer (PyPI) beside the executor, installed
    /// into `target/run-bench-peers` (each skipped, with the reason, when its installer is
    /// missing or fails).
    #[arg(long)]
    peers: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The scenarios that can be picked with `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// 1: one append against the existing log's size.
    LogAppend,
    /// 2: `update_versioned` vs hand-written sqlx.
    VersionedUpdate,
    /// 3: CAS, retry and row locks under contention.
    Contention,
    /// 4: concurrent appends vs a plain INSERT.
    AppendThroughput,
    /// 5: the executor against a SKIP LOCKED claim loop.
    Executor,
    /// 6: peak memory of streaming vs building the log, of `logs --follow`, of the executor.
    Memory,
    /// 7: ordered plans: shapes of needs against a flat plan, and a chain's latency.
    Ordered,
    /// 8: scheduling: limits against none, statements with a retry delay pending.
    Scheduling,
    /// 9: observability: wake-up latency, tracing's cost, prune rate.
    Observability,
    /// 10: the web view: a 10,000-story page, 50 open pages, 10 log followers.
    Web,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: read a log in this fresh process and report its peak memory.
    #[command(name = PROBE_SUBCOMMAND, hide = true)]
    ReadProbe {
        /// The database.
        #[arg(long)]
        url: String,
        /// The run whose log to read.
        #[arg(long)]
        run_id: Uuid,
        /// `stream` or `string`.
        #[arg(long)]
        reader: String,
    },
    /// Internal: execute a run with no-op stories in this fresh process and report its peak
    /// memory.
    #[command(name = EXECUTOR_PROBE_SUBCOMMAND, hide = true)]
    ExecutorProbe {
        /// The database.
        #[arg(long)]
        url: String,
        /// The run to execute.
        #[arg(long)]
        run_id: Uuid,
        /// Executor workers.
        #[arg(long)]
        workers: usize,
    },
    /// Internal, for profiling: migrate the database, create a run of `stories` no-op stories
    /// and execute it in this process with `workers` workers; prints stories/s and CPU per
    /// story.
    #[command(name = "profile-executor", hide = true)]
    ProfileExecutor {
        /// The database.
        #[arg(long)]
        url: String,
        /// Stories in the run.
        #[arg(long, default_value_t = 10_000)]
        stories: usize,
        /// Executor workers.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// The most stories one claim takes (the executor's default when not given).
        #[arg(long)]
        batch: Option<usize>,
        /// Only create the run and print its id (for executing it in several processes with
        /// the hidden executor probe).
        #[arg(long)]
        create_only: bool,
    },
    /// Internal: run one command (after `--`) and report its peak memory.
    #[command(name = PEAK_SUBCOMMAND, hide = true)]
    Peak {
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::ReadProbe {
            url,
            run_id,
            reader,
        }) => {
            let reader =
                Reader::from_arg(reader).ok_or_else(|| anyhow!("unknown reader {reader:?}"))?;
            let probe = memory::probe(url, *run_id, reader).await?;
            println!("{}", probe.to_line());
            Ok(())
        }
        Some(Command::ExecutorProbe {
            url,
            run_id,
            workers,
        }) => {
            let probe = memory::executor_probe(url, *run_id, *workers).await?;
            println!("{}", probe.to_line());
            Ok(())
        }
        Some(Command::ProfileExecutor {
            url,
            stories,
            workers,
            batch,
            create_only,
        }) => executor::profile(url, *stories, *workers, *batch, *create_only).await,
        Some(Command::Peak { command }) => {
            println!("{}", memory::peak_of(command)?.to_line());
            Ok(())
        }
        None => run_suite(&cli).await,
    }
}

async fn run_suite(cli: &Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let profile = if cli.quick {
        Profile::quick()
    } else {
        Profile::full()
    };
    let wanted = |s: Scenario| cli.only.is_empty() || cli.only.contains(&s);
    let command = std::iter::once("cargo run --release -p run-bench --".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("[run-bench] {}", profile.describe());

    let servers = Servers::probe().await;
    let machine = report::describe_machine(&servers);
    for (k, v) in &machine {
        println!("{k}: {v}");
    }
    println!();

    let mut sections = Vec::new();
    let mut goals = Vec::new();
    let mut size_chart = None;
    let mut writer_panels = None;
    let mut executor_chart = None;
    let show = |section: Section, sections: &mut Vec<Section>| {
        println!("## {}\n\n{}", section.title, section.body);
        sections.push(section);
    };

    if wanted(Scenario::LogAppend) {
        let t = Instant::now();
        let r = log_append::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        size_chart = Some(r.chart());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::VersionedUpdate) {
        let t = Instant::now();
        let r = versioned_update::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::Contention) {
        let t = Instant::now();
        let r = contention::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::AppendThroughput) {
        let t = Instant::now();
        let r = append_throughput::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        writer_panels = Some(r.chart_panels());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::Executor) {
        let t = Instant::now();
        let peers = cli.peers.then(|| {
            eprintln!("[run-bench] installing the peers (npm, pip)");
            run_bench::peers::Peers::install(&run_bench::peers::default_dir())
        });
        let r = executor::run(&servers, &profile, peers.as_ref()).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        executor_chart = r.chart();
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::Ordered) {
        let t = Instant::now();
        let r = ordered::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::Scheduling) {
        let t = Instant::now();
        let r = scheduling::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::Observability) {
        let t = Instant::now();
        let r = observability::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::Web) {
        let t = Instant::now();
        let r = run_bench::web::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        goals.extend(r.goals());
        show(r.section(), &mut sections);
    }
    if wanted(Scenario::Memory) {
        let t = Instant::now();
        let r = memory::run(&servers, &profile).await;
        eprintln!("[run-bench] ... took {:.0} s", t.elapsed().as_secs_f64());
        show(r.section(), &mut sections);
    }

    let folder = match cli.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut plots = Vec::new();
    if let Some(chart) = size_chart {
        let svg = plot::render("Run log: append cost vs existing log size", &[chart]);
        write(&folder.join(SIZE_PLOT), &svg)?;
        plots.push((
            SIZE_PLOT.to_owned(),
            "append cost vs existing log size".to_owned(),
        ));
    }
    if let Some(panels) = writer_panels.filter(|p| !p.is_empty()) {
        let svg = plot::render("Run log: append throughput vs concurrent writers", &panels);
        write(&folder.join(WRITERS_PLOT), &svg)?;
        plots.push((
            WRITERS_PLOT.to_owned(),
            "append throughput vs writers".to_owned(),
        ));
    }

    if let Some(chart) = executor_chart {
        let svg = plot::render("Executor throughput vs workers", &[chart]);
        write(&folder.join(EXECUTOR_PLOT), &svg)?;
        plots.push((
            EXECUTOR_PLOT.to_owned(),
            "executor, SKIP LOCKED loop and peers vs workers".to_owned(),
        ));
    }

    let mut machine = machine;
    let at = machine
        .iter()
        .position(|(k, _)| k == "load average at start")
        .map_or(machine.len(), |i| i + 1);
    machine.insert(
        at,
        ("load average at end".to_owned(), report::load_average()),
    );
    let report = Report {
        command,
        date: format!(
            "on {} (took {:.0} s)",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            started.elapsed().as_secs_f64()
        ),
        profile: profile.describe(),
        machine,
        goals,
        plots,
        sections,
    };
    println!("## Goals\n\n{}", report::goals_table(&report.goals));
    write(&cli.out, &report.to_markdown())?;
    eprintln!(
        "[run-bench] wrote {} and its plots in {} s",
        cli.out.display(),
        started.elapsed().as_secs()
    );
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

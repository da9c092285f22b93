//! `run-engine`: create runs from plan files, execute them with parallel workers in any number
//! of processes, and watch, follow, pause or cancel them; list and change concurrency limits.
//!
//! The database is `--database-url`, else `DATABASE_URL` (also read from a `.env` file), else a
//! SQLite file `run-engine.db` in the working directory. Migrations are applied on first use.

mod connect;
mod display;
mod execute;
mod logs;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use connect::load_dotenv;
use connect::open;
use connect::open_existing;
use connect::render_error;
use connect::scrub_password;
use execute::execute;
use logs::logs;
use run_engine::{
    Graph, GraphFormat, Plan, StoryCounts, cancel_run, cancel_story, create_run_from_plan,
    load_run_tree, pause_run, resume_run,
};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use uuid::Uuid;

/// Exit status of an execution stopped by Ctrl-C or SIGTERM before the run finished.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// How often `logs --follow` and the progress bar look at the database.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// Log lines read per query.
pub(crate) const LOG_PAGE: u64 = 1000;

#[derive(Parser)]
#[command(
    name = "run-engine",
    version,
    about = "Create, execute, list, follow, pause, cancel and retry runs of plans; share concurrency limits across processes; prune finished runs",
    after_help = "The database is --database-url, else DATABASE_URL (also from a .env file), \
                  else the SQLite file run-engine.db in the working directory."
)]
struct Cli {
    /// Database URL: sqlite://FILE?mode=rwc, postgres://..., mysql://...
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    database_url: Option<String>,
    /// How diagnostics are printed on standard error: `text`, or `json` (one object a line).
    /// Which are printed: `RUST_LOG` (default `warn`; `run_engine=debug` shows every claim and
    /// record)
    #[arg(long, global = true, default_value = "text", value_name = "FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The format of diagnostics.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object a line, for machines.
    Json,
}

/// Prints `tracing` events on standard error (around the progress bar, if one is shown),
/// filtered by `RUST_LOG` (default: warnings).
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(display::TraceWriter);
    // A second subscriber cannot be set; the first stays.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Subcommand)]
enum Command {
    /// Create a run from a plan file and print its id
    Create {
        /// The plan (TOML)
        plan: PathBuf,
    },
    /// Execute a run's stories until none is pending or running
    Exec {
        /// The run's id
        run_id: Uuid,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Create a run from a plan file and execute it
    Run {
        /// The plan (TOML)
        plan: PathBuf,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Show a run with its epics and stories
    Status {
        /// The run's id
        run_id: Uuid,
        /// Print JSON instead of a tree
        #[arg(long)]
        json: bool,
    },
    /// List recent runs, newest first: status, progress, start and duration
    Runs {
        /// Only runs in this status: pending, running, completed, failed or cancelled
        #[arg(long, value_parser = parse_run_status, value_name = "STATUS")]
        status: Option<run_domain::RunStatus>,
        /// The most runs to list
        #[arg(long, short = 'n', default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
        /// Print JSON (an array of runs) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Print a run's log
    Logs {
        /// The run's id
        run_id: Uuid,
        /// Keep printing new lines until the run has finished
        #[arg(long, short)]
        follow: bool,
        /// Write story output as stored, control characters included, even to a terminal
        /// (on a terminal they are otherwise shown escaped, `\x07`, with colours kept)
        #[arg(long)]
        raw: bool,
    },
    /// Cancel a run (nothing new starts, running stories are stopped), or one story of it
    Cancel {
        /// The run's id
        run_id: Uuid,
        /// Cancel only this story, `epic.story`: pending, it is cancelled at once; running, its
        /// worker stops it within a third of its lease. The stories that need it are skipped
        #[arg(long, value_name = "EPIC.STORY")]
        story: Option<String>,
    },
    /// Retry a failed or cancelled run (then `exec` it)
    ///
    /// Its failed, cancelled and skipped stories go back to pending with no attempt made, so
    /// that `exec` runs them again; completed stories stay done. Refused while the run executes
    /// or while a story of it still runs
    Retry {
        /// The run's id
        run_id: Uuid,
    },
    /// Pause a run: no story of it starts in any process until `resume`; running ones finish
    Pause {
        /// The run's id
        run_id: Uuid,
    },
    /// Resume a paused run
    Resume {
        /// The run's id
        run_id: Uuid,
    },
    /// Delete finished runs (completed, failed, cancelled) with their epics, stories and log
    /// lines, in small batches, while executors work on other runs
    Prune {
        /// Only runs that finished longer ago than this (humantime: 30d, 12h, 0s for all)
        #[arg(long, value_parser = parse_age, value_name = "AGE")]
        finished_before: Duration,
        /// Count what would be deleted, and delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// List the concurrency limits with their use now, or change one (`limits set llm 5`)
    Limits {
        #[command(subcommand)]
        action: Option<LimitsAction>,
    },
    /// Serve a live web view of the runs: their stories, graph and log, with cancel, pause and
    /// resume. Binds loopback unless given a token, which every request must then carry
    Serve {
        /// The address to listen on; anything but loopback (127.0.0.1, [::1]) needs --token
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// A secret (16 characters or more) every request must carry: `Authorization: Bearer
        /// <token>`, or open any page once with `?token=<token>` (which sets a cookie)
        #[arg(
            long,
            env = "RUN_ENGINE_WEB_TOKEN",
            hide_env_values = true,
            value_name = "TOKEN"
        )]
        token: Option<String>,
    },
    /// Print the graph of what needs what: of a plan file, or of a run with each story's status
    Graph {
        /// A plan file (TOML), or a run's id
        source: String,
        /// Output format: `dot` (Graphviz: `| dot -Tsvg > graph.svg`) or `mermaid`
        #[arg(long, default_value = "dot")]
        format: GraphFormat,
    },
}

#[derive(Subcommand)]
enum LimitsAction {
    /// Set a limit's capacity (creating it if new); every process obeys it at once
    Set {
        /// The limit's name (letters, digits, `_`, `-`, `.`)
        name: String,
        /// How many stories holding it may run at once, across every process (0 to 1000000)
        capacity: i64,
    },
}

#[derive(Args)]
struct ExecArgs {
    /// Worker tasks in this process
    #[arg(long, short, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,
    /// Seconds a claim holds a story before another worker may take it over (renewed every
    /// third of it while the story runs)
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_secs: u64,
    /// How long an idle worker waits before looking for work again (humantime: 250ms, 5s,
    /// 1m). On PostgreSQL a notification wakes idle workers at once; the poll is the fallback
    #[arg(long, default_value = "250ms", value_parser = parse_poll, value_name = "DURATION")]
    poll: Duration,
    /// The most stories one claim statement takes, for the idle workers of this process and,
    /// when stories are short, the next ones ahead (1: one story per statement, the results
    /// recorded one by one). Runs whose stories hold limits claim one at a time
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=1024), value_name = "N")]
    claim_batch: u16,
    /// On PostgreSQL, do not listen for notifications (behind a pooler that does not pass them
    /// on, such as PgBouncer in transaction mode): idle workers only poll
    #[arg(long)]
    no_listen: bool,
    /// Serve this process's metrics in the Prometheus text format on this address while it
    /// runs (for example 127.0.0.1:9464; any path)
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// An age: a humantime duration (`0s` for every finished run).
fn parse_age(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write it like \"30d\" or \"12h\""))
}

/// A run status by name.
fn parse_run_status(text: &str) -> Result<run_domain::RunStatus, String> {
    use run_domain::Lifecycle;
    run_domain::RunStatus::parse(text.trim()).ok_or_else(|| {
        let names: Vec<&str> = run_domain::RunStatus::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        format!(
            "{text:?} is not a run status: use one of {}",
            names.join(", ")
        )
    })
}

/// A poll interval: a humantime duration from 10 ms to an hour.
fn parse_poll(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write it like \"250ms\" or \"5s\"")
    })?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("{text:?} is out of range: from 10ms to 1h"));
    }
    Ok(d)
}

#[tokio::main]
async fn main() -> ExitCode {
    let dotenv = load_dotenv();
    let cli = Cli::parse();
    if let Err(e) = dotenv {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    init_tracing(cli.log_format);
    let url = cli
        .database_url
        .clone()
        .unwrap_or_else(|| run_domain::DEFAULT_DATABASE_URL.to_owned());
    match run(cli.command, &url).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", scrub_password(&render_error(&e), &url));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, url: &str) -> Result<ExitCode> {
    match command {
        Command::Create { plan } => {
            let plan = load_plan(&plan)?;
            let db = open(url).await?;
            note_limits(&db, &plan).await?;
            let run = create_run_from_plan(&db, &plan)
                .await
                .context("creating the run")?;
            println!("{}", run.id);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { plan: path, exec } => {
            let plan = load_plan(&path)?;
            let db = open(url).await?;
            note_limits(&db, &plan).await?;
            let run = create_run_from_plan(&db, &plan)
                .await
                .context("creating the run")?;
            eprintln!(
                "created run {} from {} ({} epics, {} stories)",
                run.id,
                path.display(),
                plan.epics.len(),
                plan.story_count()
            );
            execute(db, run.id, &exec).await
        }
        Command::Exec { run_id, exec } => {
            let db = open(url).await?;
            execute(db, run_id, &exec).await
        }
        Command::Status { run_id, json } => {
            let db = open_existing(url).await?;
            let tree = load_run_tree(&db, run_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tree)?);
            } else {
                print!("{}", tree.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs {
            status,
            limit,
            json,
        } => {
            let db = open_existing(url).await?;
            let runs = run_engine::list_runs(&db, status, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                print!("{}", run_engine::render_runs(&runs));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            run_id,
            follow,
            raw,
        } => {
            let db = open_existing(url).await?;
            logs(&db, run_id, follow, raw).await
        }
        Command::Serve { listen, token } => {
            let config = run_engine::web::ServeConfig { listen, token };
            // Refused before touching the database: a public address without a token.
            run_engine::web::auth::check_config(&config)?;
            let db = open(url).await?;
            let listener = run_engine::web::bind(&config).await?;
            let addr = listener.local_addr().context("reading the bound address")?;
            eprintln!("serving runs at http://{addr}/ (Ctrl-C to stop)");
            tokio::select! {
                served = run_engine::web::serve_on(listener, db, &config) => {
                    served.with_context(|| format!("serving on {addr}"))?;
                }
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph { source, format } => {
            let graph = match Uuid::parse_str(&source) {
                Ok(run_id) if !std::path::Path::new(&source).exists() => {
                    let db = open_existing(url).await?;
                    Graph::from_run_tree(&load_run_tree(&db, run_id).await?)
                }
                _ => Graph::from_plan(&load_plan(std::path::Path::new(&source))?),
            };
            print!("{}", graph.render(format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel {
            run_id,
            story: Some(story),
        } => {
            let db = open(url).await?;
            let report = cancel_story(&db, run_id, &story).await?;
            if report.cancelled() {
                let stop = if report.was == "running" {
                    " (its worker stops it)"
                } else {
                    ""
                };
                println!("story {story} cancelled{stop}");
            } else {
                println!(
                    "story {story} was already {}: nothing to cancel",
                    report.story.status
                );
            }
            for s in &report.skipped {
                println!("  skipped {}", s.key);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel {
            run_id,
            story: None,
        } => {
            let db = open(url).await?;
            let report = cancel_run(&db, run_id).await?;
            println!(
                "run {} {}: {} stories cancelled now, {} still running (their workers stop them)",
                report.run.id,
                if report.newly_cancelled {
                    "cancelled"
                } else {
                    "was already cancelled"
                },
                report.stories_cancelled,
                report.still_running
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { run_id } => {
            let db = open(url).await?;
            let r = run_domain::reopen_run(&db, run_id).await?;
            println!(
                "run {run_id} retried (was {}): {} {} back to pending; `run-engine exec {run_id}` runs {}",
                r.was,
                r.stories,
                if r.stories == 1 { "story" } else { "stories" },
                if r.stories == 1 { "it" } else { "them" },
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { run_id } => {
            let db = open(url).await?;
            let report = pause_run(&db, run_id).await?;
            let running = StoryCounts::of_run(&db, run_id).await?.running;
            println!(
                "run {run_id} {}: nothing new starts until `run-engine resume {run_id}`; {running} running (they finish)",
                if report.changed {
                    "paused"
                } else {
                    "was already paused"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { run_id } => {
            let db = open(url).await?;
            let report = resume_run(&db, run_id).await?;
            println!(
                "run {run_id} {}",
                if report.changed {
                    "resumed"
                } else {
                    "was not paused"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune {
            finished_before,
            dry_run,
        } => {
            let db = open(url).await?;
            let age = chrono::Duration::from_std(finished_before)
                .map_err(|_| anyhow::anyhow!("--finished-before is too long"))?;
            let cutoff = chrono::Utc::now()
                .checked_sub_signed(age)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            let report = run_engine::prune_finished(&db, cutoff, dry_run).await?;
            let plural =
                |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
            println!(
                "{} {} ({}, {}, {}) finished before {}",
                if dry_run { "would prune" } else { "pruned" },
                plural(report.runs, "run", "runs"),
                plural(report.epics, "epic", "epics"),
                plural(report.stories, "story", "stories"),
                plural(report.log_lines, "log line", "log lines"),
                cutoff.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Limits { action } => {
            // Listing only reads; setting creates what it needs.
            let db = match action {
                Some(_) => open(url).await?,
                None => open_existing(url).await?,
            };
            if let Some(LimitsAction::Set { name, capacity }) = action {
                let limit = run_domain::set_limit(&db, &name, capacity).await?;
                println!(
                    "limit {} set to {} ({} in use now)",
                    limit.name, limit.capacity, limit.in_use
                );
                return Ok(ExitCode::SUCCESS);
            }
            let limits = run_domain::list_limits(&db).await?;
            if limits.is_empty() {
                println!(
                    "no limits (declare them in a plan's [limits], or `run-engine limits set NAME N`)"
                );
            }
            let width = limits.iter().map(|l| l.name.len()).max().unwrap_or(0);
            for l in limits {
                println!("{:width$}  {} of {} in use", l.name, l.in_use, l.capacity);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Tells of each limit of `plan` that already existed with another capacity: it keeps the one
/// it has (changed live with `limits set`).
async fn note_limits(db: &sea_orm::DatabaseConnection, plan: &Plan) -> Result<()> {
    if plan.limits.is_empty() {
        return Ok(());
    }
    for l in run_domain::list_limits(db).await? {
        if let Some(&wanted) = plan.limits.get(&l.name)
            && wanted != l.capacity
        {
            eprintln!(
                "note: limit {} already exists with capacity {} (the plan says {wanted}); it keeps {}: `run-engine limits set {} {wanted}` changes it",
                l.name, l.capacity, l.capacity, l.name
            );
        }
    }
    Ok(())
}

fn load_plan(path: &std::path::Path) -> Result<Plan> {
    // The error names the file, line and field itself.
    Ok(Plan::load(path)?)
}

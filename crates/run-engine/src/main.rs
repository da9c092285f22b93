//! `run-engine`: create runs from plan files, execute them with parallel workers in any number
//! of processes, and watch, follow or cancel them.
//!
//! The database is `--database-url`, else `DATABASE_URL` (also read from a `.env` file), else a
//! SQLite file `run-engine.db` in the working directory. Migrations are applied on first use.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use run_domain::{Lifecycle, LogCursor, RunStatus, read_run_log_after, redact_text, redact_url};
use run_engine::{
    Executor, ExecutorConfig, ExecutorEvent, Plan, ShellHandler, Shutdown, StoryCounts, Summary,
    cancel_run, closing_line_batch, create_run_from_plan, load_run_tree, settle_run,
};
use sea_orm::{DatabaseConnection, EntityTrait};
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Exit status of an execution stopped by Ctrl-C or SIGTERM before the run finished.
const EXIT_INTERRUPTED: u8 = 130;
/// How often `logs --follow` and the progress bar look at the database.
const POLL: Duration = Duration::from_millis(250);
/// Log lines read per query.
const LOG_PAGE: u64 = 1000;
/// How long the database server may take to accept one TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused connection is tried again (a server starting up).
const PROBE_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "run-engine",
    version,
    about = "Create, execute, follow and cancel runs of plans",
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
    #[command(subcommand)]
    command: Command,
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
    /// Print a run's log
    Logs {
        /// The run's id
        run_id: Uuid,
        /// Keep printing new lines until the run has finished
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a run: nothing new starts, running stories are stopped
    Cancel {
        /// The run's id
        run_id: Uuid,
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
}

#[tokio::main]
async fn main() -> ExitCode {
    load_dotenv();
    let cli = Cli::parse();
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

/// `text` with every password blanked out by structure: `url` itself is shown redacted, and
/// the userinfo password of any other URL the driver quoted (an unparseable URL comes back whole
/// in its error) and any `password` field are replaced (see [`run_domain::redact_text`]). The
/// password's text is never searched for, so a short password garbles nothing.
fn scrub_password(text: &str, url: &str) -> String {
    redact_text(&text.replace(url, &redact_url(url)))
}

/// The error and its causes, `outer: inner`, leaving out a cause whose text an outer error
/// already quotes (several errors print their source in their own message).
fn render_error(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Reads `.env` if there is one. Its content is never printed: it may hold a password.
fn load_dotenv() {
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(dotenvy::Error::LineParse(_, at)) => {
            eprintln!("warning: .env ignored: syntax error at position {at}");
        }
        Err(dotenvy::Error::Io(e)) => eprintln!("warning: .env ignored: {e}"),
        Err(_) => eprintln!("warning: .env ignored: it holds an invalid value"),
    }
}

async fn run(command: Command, url: &str) -> Result<ExitCode> {
    match command {
        Command::Create { plan } => {
            let plan = load_plan(&plan)?;
            let db = open(url).await?;
            let run = create_run_from_plan(&db, &plan)
                .await
                .context("creating the run")?;
            println!("{}", run.id);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { plan: path, exec } => {
            let plan = load_plan(&path)?;
            let db = open(url).await?;
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
            let db = open(url).await?;
            let tree = load_run_tree(&db, run_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tree)?);
            } else {
                print!("{}", tree.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { run_id, follow } => {
            let db = open(url).await?;
            logs(&db, run_id, follow).await
        }
        Command::Cancel { run_id } => {
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
    }
}

fn load_plan(path: &std::path::Path) -> Result<Plan> {
    // The error names the file, line and field itself.
    Ok(Plan::load(path)?)
}

/// Connects and applies any pending migration. Errors show the URL without its password.
async fn open(url: &str) -> Result<DatabaseConnection> {
    probe_server(url).await?;
    let db = run_domain::connect(url).await?;
    migration::apply(&db, None)
        .await
        .with_context(|| format!("applying migrations to {}", redact_url(url)))?;
    Ok(db)
}

/// For a PostgreSQL or MariaDB URL naming a host, checks that the server there accepts
/// connections before the pool tries: the pool would wait out its whole acquire timeout (30 s)
/// on a refused connection and then say only that it timed out. A server that is just starting
/// gets a few seconds. Anything else is left to [`run_domain::connect`] to report.
async fn probe_server(url: &str) -> Result<()> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let default_port = match parsed.scheme().to_ascii_lowercase().as_str() {
        "postgres" | "postgresql" => 5432,
        "mysql" => 3306,
        _ => return Ok(()),
    };
    // A Unix socket (empty host, or a `host`/`socket` parameter) is not probed.
    let socket = parsed
        .query_pairs()
        .any(|(k, _)| k == "host" || k == "socket");
    let host = match parsed.host_str() {
        Some(h) if !h.is_empty() && !socket => h.trim_start_matches('[').trim_end_matches(']'),
        _ => return Ok(()),
    };
    let (host, port) = (host.to_owned(), parsed.port().unwrap_or(default_port));
    let started = std::time::Instant::now();
    let unreachable = loop {
        let (h, p) = (host.clone(), port);
        let attempt = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::net::ToSocketAddrs;
            let mut last = None;
            for addr in (h.as_str(), p).to_socket_addrs()? {
                match std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("the host name has no address")))
        })
        .await
        .context("probing the database server")?;
        match attempt {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && started.elapsed() < PROBE_PATIENCE =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => break e,
        }
    };
    let why = match unreachable.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            format!("connection refused (is the server running and listening on port {port}?)")
        }
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            format!("no answer within {} s", PROBE_TIMEOUT.as_secs())
        }
        _ => unreachable.to_string(),
    };
    let server = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    anyhow::bail!(
        "cannot connect to {}: the server {server} cannot be reached: {why}",
        redact_url(url)
    )
}

/// Executes a run with a progress display and signal handling; the exit code says how it
/// ended.
async fn execute(db: DatabaseConnection, run_id: Uuid, args: &ExecArgs) -> Result<ExitCode> {
    let config = ExecutorConfig::default()
        .workers(usize::from(args.workers))
        .lease(Duration::from_secs(args.lease_secs));
    let executor = Executor::new(db.clone(), ShellHandler::default(), config);
    let shutdown = Shutdown::new();
    let total = StoryCounts::of_run(&db, run_id).await?.total();
    let display = Arc::new(Display::new(total));
    let signals = tokio::spawn(handle_signals(shutdown.clone(), display.clone()));
    let events = tokio::spawn(show_events(executor.subscribe(), display.clone()));
    let progress = tokio::spawn(show_progress(db.clone(), run_id, display.clone()));

    let result = executor.execute_until(run_id, &shutdown).await;
    signals.abort();
    progress.abort();
    // Let the last events through before the bar goes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    events.abort();
    display.finish();

    let summary: Summary = result.with_context(|| format!("executing run {run_id}"))?;
    println!("{summary}");
    Ok(if summary.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if summary.is_completed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// First Ctrl-C: claim nothing new and let running stories finish. Second Ctrl-C or SIGTERM:
/// stop running stories and give their leases back.
async fn handle_signals(shutdown: Shutdown, display: Arc<Display>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut interrupts = 0;
    loop {
        let terminate = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                if r.is_err() {
                    return;
                }
                interrupts += 1;
                if interrupts == 1 {
                    display.line(
                        "interrupted: no new stories start; running ones finish \
                         (Ctrl-C again to stop them and give their leases back)",
                    );
                    shutdown.drain();
                } else {
                    display.line("interrupted again: stopping running stories, giving them back");
                    shutdown.give_back();
                }
            }
            _ = terminate => {
                display.line("terminated: stopping running stories, giving them back");
                shutdown.give_back();
            }
        }
    }
}

/// A progress bar on a terminal, plain lines otherwise.
struct Display {
    bar: Option<ProgressBar>,
    running: Mutex<BTreeSet<String>>,
}

impl Display {
    fn new(total: u64) -> Display {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Display {
            bar,
            running: Mutex::new(BTreeSet::new()),
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn counts(&self, counts: &StoryCounts) {
        if let Some(bar) = &self.bar {
            bar.set_length(counts.total());
            bar.set_position(counts.finished());
            let running = self
                .running
                .lock()
                .map(|r| r.iter().cloned().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            let mut msg = format!("{} running", counts.running);
            if counts.failed > 0 {
                msg.push_str(&format!(", {} failed", counts.failed));
            }
            if !running.is_empty() {
                msg.push_str(&format!(" | here: {running}"));
            }
            bar.set_message(msg);
        }
    }

    fn started(&self, story: String) {
        if let Ok(mut r) = self.running.lock() {
            r.insert(story);
        }
    }

    fn stopped(&self, story: &str) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(story);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn show_events(
    mut events: tokio::sync::broadcast::Receiver<ExecutorEvent>,
    display: Arc<Display>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                display.line(&format!("({n} events not shown)"));
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        match event {
            ExecutorEvent::Started {
                story,
                attempt,
                max_attempts,
                worker,
                taken_over_from,
            } => {
                let name = story.to_string();
                if display.bar.is_none() {
                    let from = taken_over_from
                        .map(|p| format!(", taken over from {p}"))
                        .unwrap_or_default();
                    display.line(&format!(
                        "started   {name} (attempt {attempt}/{max_attempts} on {worker}{from})"
                    ));
                }
                display.started(name);
            }
            ExecutorEvent::Finished {
                story,
                status,
                attempt,
                max_attempts,
                elapsed,
                error,
                ..
            } => {
                let name = story.to_string();
                display.stopped(&name);
                let error = error.map(|e| format!(": {e}")).unwrap_or_default();
                let text = match status {
                    run_domain::StoryStatus::Pending => {
                        format!("retrying  {name} (attempt {attempt}/{max_attempts} failed{error})")
                    }
                    run_domain::StoryStatus::Completed => {
                        format!("completed {name} in {:.2}s", elapsed.as_secs_f64())
                    }
                    other => format!("{other:<9} {name}{error}"),
                };
                display.line(&text);
            }
            ExecutorEvent::Fenced { story, worker } => {
                let name = story.to_string();
                display.stopped(&name);
                display.line(&format!(
                    "fenced    {name}: {worker} lost its lease to another worker; result dropped"
                ));
            }
            ExecutorEvent::GaveBack { story, .. } => {
                let name = story.to_string();
                display.stopped(&name);
                display.line(&format!("gave back {name}"));
            }
            ExecutorEvent::EpicFinished { key, status } => {
                display.line(&format!("epic {key} {status}"));
            }
            ExecutorEvent::RunFinished { status } => display.line(&format!("run {status}")),
            ExecutorEvent::Warning { message } => display.line(&format!("warning: {message}")),
        }
    }
}

async fn show_progress(db: DatabaseConnection, run_id: Uuid, display: Arc<Display>) {
    if display.bar.is_none() {
        return;
    }
    loop {
        if let Ok(counts) = StoryCounts::of_run(&db, run_id).await {
            display.counts(&counts);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Prints the run's log; with `follow`, keeps polling until the run is finished and its
/// closing line (`run <key> <status>`, the last line of every finished run's log) has been
/// printed.
async fn logs(db: &DatabaseConnection, run_id: Uuid, follow: bool) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut cursor = LogCursor::START;
    // Batch ids of lines read so far that close the run in some status.
    let closers =
        [RunStatus::Completed, RunStatus::Cancelled].map(|s| closing_line_batch(run_id, s));
    let mut closed_with: Vec<Uuid> = Vec::new();
    let mut settled = false;
    loop {
        let finished = if follow {
            let run = entity::run::Entity::find_by_id(run_id)
                .one(db)
                .await?
                .with_context(|| format!("run {run_id} not found"))?;
            RunStatus::parse(&run.status).filter(|s| s.is_terminal())
        } else {
            None
        };
        loop {
            let page = read_run_log_after(db, run_id, cursor, LOG_PAGE).await?;
            let mut out = stdout.lock();
            for entry in &page.entries {
                if let Err(e) = writeln!(out, "{}", entry.to_line()) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(ExitCode::SUCCESS);
                    }
                    return Err(e).context("writing the log");
                }
                if closers.contains(&entry.batch_id) {
                    closed_with.push(entry.batch_id);
                }
            }
            let _ = out.flush();
            cursor = page.next;
            if (page.entries.len() as u64) < LOG_PAGE {
                break;
            }
        }
        let Some(status) = finished else {
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(POLL).await;
            continue;
        };
        // SAFETY(log order): the closing line is written once every line of the run is in
        // (see `run_engine::finish`), and the status was read before this pass of reading, so
        // having read the closing line of that status means having read the whole log. (A
        // cancelled run written by an earlier version closed under the completed run's id.)
        let closing = closing_line_batch(run_id, status);
        if closed_with.contains(&closing)
            || (status == RunStatus::Cancelled && closed_with.contains(&closers[0]))
        {
            return Ok(ExitCode::SUCCESS);
        }
        // A cancelled run whose stories all stopped but whose last worker stopped before closing
        // its log (or a run finished by an earlier version): settling writes what is missing.
        if StoryCounts::of_run(db, run_id).await?.unfinished() == 0 {
            if settled {
                // Settled, read again, and still no closing line: a run an earlier version
                // finished without one. Its log has been read to the end.
                eprintln!("warning: run {run_id} is {status} but its log has no closing line");
                return Ok(ExitCode::SUCCESS);
            }
            settle_run(db, run_id).await?;
            settled = true;
            continue;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::scrub_password;

    #[test]
    fn passwords_are_scrubbed_from_error_text_even_in_unparseable_urls() {
        let url = "postgres://app:s3cret@[db/runs";
        let text = format!("cannot connect: the connection string '{url}' cannot be parsed");
        let scrubbed = scrub_password(&text, url);
        assert!(!scrubbed.contains("s3cret"), "{scrubbed}");

        let url = "mysql://app:p%40ss@db:3306/runs";
        let scrubbed = scrub_password(&format!("error at {url}"), url);
        assert_eq!(scrubbed, "error at mysql://app:***@db:3306/runs");

        let url = "sqlite://run-engine.db?mode=rwc";
        assert_eq!(scrub_password("no such table", url), "no such table");

        // A short password that occurs inside other words garbles nothing.
        let url = "postgres://postgres:o@[db/runs";
        let text = format!("Connection Error: the string '{url}' cannot be parsed: not found");
        assert_eq!(
            scrub_password(&text, url),
            "Connection Error: the string 'postgres:<unparseable URL>' cannot be parsed: not found"
        );
    }
}

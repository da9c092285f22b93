//! The fault suite, on PostgreSQL and MariaDB, each on a private server of its own that the
//! suite may kill connections of and restart:
//!
//! 1. **Database faults.** 8 workers execute 200 stories (each logs three lines through its
//!    log sink) while every connection to the database is killed every 1-2 s and the server is
//!    restarted once at about 40 % progress, staying down for 3 s. The run completes; every
//!    story is completed exactly once, in the database and by its handler; every line is in the
//!    log exactly once, with gap-free sequence numbers. Story writes are slowed to 5 ms (a
//!    loaded server) and each kill waits for one to be in flight, so that the kills cut
//!    claims, renewals and results mid-statement rather than only idle pooled connections.
//! 2. **The same faults without retries** (`retry_transient: false`): errors surface (the
//!    execution is stopped at the first), so the faults do hit the paths the retries protect.
//! 3. **Bad input** through the command line and the engine API, on the database of part 1:
//!    broken plan files, a 10,000-story plan, SQL injection strings, odd bytes in output, bad
//!    database URLs, unknown run ids, stale and absurd versions, illegal status changes. Each
//!    gets a clear error naming the problem and a non-zero exit, no password is ever shown, and
//!    the run of part 1 is left exactly as it was.
//!
//! Besides, on every backend: a write whose reply was lost (a claim, a renewal, a release) is
//! told apart from another worker's take-over.
//!
//! Each backend's fault test ends by printing a table (faults injected, faults survived, inputs
//! tried, lines lost, stories completed twice) and writing it to
//! `target/fault-suite-<backend>.md`. A backend whose server variable
//! (`RUN_ENGINE_TEST_POSTGRES_URL`, `RUN_ENGINE_TEST_MYSQL_URL`) is unset is skipped outside CI,
//! with a note on standard error, and fails in CI, as everywhere in the workspace.

mod common;

use async_trait::async_trait;
use common::cli;
use entity::{run, run_epic, run_story};
use run_domain::{
    ConcurrencyError, LogCursor, LogEntry, TransitionError, VersionedUpdate, read_run_log_after,
};
use run_engine::{
    EngineError, Executor, ExecutorConfig, ExecutorEvent, Lease, LogSink, Release, Shutdown,
    ShutdownLevel, StoryContext, StoryCounts, StoryHandler, StoryOutcome, Summary, TryClaim,
    cancel_run, claimed_by, give_back, load_run_tree, release, released_by, renew_lease,
    still_held, try_claim,
};
use run_engine_tests::private_server::{PrivateServer, database_name, kill_connections};
use run_engine_tests::{Backend, RunFactory, TestDb, each_backend, table_counts};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    Statement,
};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const STORIES: usize = 200;
const EPICS: usize = 4;
const WORKERS: usize = 8;
/// Lines each story logs, `story <key> line <n>`.
const LINES: usize = 3;
/// The pause after each line: a story takes about `LINES * STEP`.
const STEP: Duration = Duration::from_millis(200);
/// How long every write to a story takes (see [`slow_story_writes`]).
const SLOW_WRITE_SECS: &str = "0.005";
/// Progress (finished stories) at which the server is restarted.
const RESTART_AT: u64 = (STORIES as u64) * 40 / 100;
/// How long the server stays down in the restart (as a failover or a slow restart would).
const DOWN_FOR: Duration = Duration::from_secs(3);
/// A password that must never be shown.
const SECRET: &str = "s3cr3t-Pw";

// ---------------------------------------------------------------------------------------------
// The story handler: logs its lines, sleeps, and counts what it did.

/// What the handlers did, per story key.
#[derive(Default)]
struct Tally {
    started: HashMap<String, u32>,
    completed: HashMap<String, u32>,
    interrupted: HashMap<String, u32>,
}

#[derive(Clone, Default)]
struct Recorder {
    tally: Arc<Mutex<Tally>>,
}

impl Recorder {
    fn count(&self, f: impl FnOnce(&mut Tally)) {
        let mut tally = self.tally.lock().expect("tally");
        f(&mut tally);
    }
}

#[async_trait]
impl StoryHandler for Recorder {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        let key = ctx.story.key.clone();
        self.count(|t| *t.started.entry(key.clone()).or_default() += 1);
        for n in 0..LINES {
            ctx.log.line(format!("story {key} line {n}")).await;
            tokio::select! {
                _ = tokio::time::sleep(STEP) => {}
                _ = ctx.cancel.cancelled() => {
                    self.count(|t| *t.interrupted.entry(key.clone()).or_default() += 1);
                    return StoryOutcome::Cancelled;
                }
            }
        }
        self.count(|t| *t.completed.entry(key.clone()).or_default() += 1);
        StoryOutcome::Completed
    }
}

// ---------------------------------------------------------------------------------------------
// Faults.

/// Makes every write to a story take a few milliseconds, as on a loaded server: a trigger that
/// sleeps. A local server answers in well under a millisecond, so a kill would otherwise almost
/// always find the executor's connections idle in the pool (which replaces them unnoticed).
async fn slow_story_writes(db: &DatabaseConnection) {
    let statements = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => vec![
            format!(
                "CREATE FUNCTION fault_suite_slow() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN PERFORM pg_sleep({SLOW_WRITE_SECS}); RETURN NEW; END $$"
            ),
            "CREATE TRIGGER fault_suite_slow BEFORE UPDATE ON run_story \
             FOR EACH ROW EXECUTE FUNCTION fault_suite_slow()"
                .to_owned(),
        ],
        _ => vec![format!(
            "CREATE TRIGGER fault_suite_slow BEFORE UPDATE ON run_story \
             FOR EACH ROW SET @fault_suite_slept = SLEEP({SLOW_WRITE_SECS})"
        )],
    };
    for sql in statements {
        db.execute_unprepared(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// How many connections to `db_name` are in the middle of writing a story right now.
async fn story_writes_in_flight(admin: &DatabaseConnection, db_name: &str) -> i64 {
    let backend = admin.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = $1 \
             AND state = 'active' AND query LIKE 'UPDATE \"run_story\"%'"
        }
        _ => {
            "SELECT COUNT(*) AS n FROM information_schema.processlist WHERE db = ? \
             AND info LIKE 'UPDATE `run_story`%'"
        }
    };
    admin
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [db_name.into()],
        ))
        .await
        .ok()
        .flatten()
        .and_then(|row| row.try_get::<i64>("", "n").ok())
        .unwrap_or(0)
}

/// Kills every connection to the test's database every 1-2 s until stopped. Each round waits
/// (up to half a second) for a moment when a story is being written, so that it cuts a
/// statement in flight (a claim, a renewal, a result) and not only idle pooled connections.
struct Killer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU32>,
    killed: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Killer {
    fn start(admin_url: String, db_name: String) -> Killer {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU32::new(0));
        let killed = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let (stop, rounds, killed) = (stop.clone(), rounds.clone(), killed.clone());
            async move {
                while !stop.load(Ordering::SeqCst) {
                    // Fault cadence, not synchronisation.
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1000..=2000))).await;
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // During the restart there is nobody to kill: that round is skipped.
                    if let Ok(admin) = run_domain::connect(&admin_url).await {
                        let busy_until = Instant::now() + Duration::from_millis(500);
                        while story_writes_in_flight(&admin, &db_name).await == 0
                            && Instant::now() < busy_until
                        {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        let n = kill_connections(&admin, &db_name).await;
                        if n > 0 {
                            rounds.fetch_add(1, Ordering::SeqCst);
                            killed.fetch_add(n, Ordering::SeqCst);
                        }
                        admin.close().await.ok();
                    }
                }
            }
        });
        Killer {
            stop,
            rounds,
            killed,
            task,
        }
    }

    /// Stops; returns (rounds that killed something, connections killed).
    async fn stop(self) -> (u32, u32) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("killer task");
        (
            self.rounds.load(Ordering::SeqCst),
            self.killed.load(Ordering::SeqCst),
        )
    }
}

/// What one execution under faults did.
struct FaultedRun {
    run_id: Uuid,
    /// What the execution returned (interrupted when the test asked it to stop once an error
    /// surfaced).
    result: Result<Summary, EngineError>,
    kill_rounds: u32,
    connections_killed: u32,
    restarts: u32,
    restart_took: Duration,
    elapsed: Duration,
    warnings: Vec<String>,
    recorder: Recorder,
}

impl FaultedRun {
    fn faults(&self) -> u32 {
        self.kill_rounds + self.restarts
    }
}

/// A run of `STORIES` stories in `EPICS` epics, keys unique across the run.
async fn create_suite_run(db: &DatabaseConnection, key: &str) -> Uuid {
    RunFactory::new()
        .key(key)
        .epics(EPICS)
        .stories(STORIES / EPICS)
        .create(db)
        .await
        .id()
}

/// Leases of 20 s renewed every 250 ms (several times per story, so renewals meet the faults
/// too): a restart (a few seconds) expires no lease.
fn suite_config(backend: Backend, retry: bool) -> ExecutorConfig {
    ExecutorConfig::default()
        .workers(WORKERS)
        .lease(Duration::from_secs(20))
        .renew_every(Duration::from_millis(250))
        .poll_interval(Duration::from_millis(100))
        .cancel_grace(Duration::from_secs(5))
        .retry_transient(retry)
        .worker_prefix(format!("{}-{}", backend_name(backend), std::process::id()))
}

/// Executes a fresh 200-story run while connections are killed every 1-2 s, restarting the
/// server once at about 40 % progress (down for [`DOWN_FOR`]). With `stop_on_error`, asks the
/// executor to give its stories back as soon as an error surfaced (the variant without
/// retries would otherwise wait for its stuck leases) and waits for it to return.
async fn execute_under_faults(
    server: &mut Option<PrivateServer>,
    t: &TestDb,
    observer: &DatabaseConnection,
    run_key: &str,
    config: ExecutorConfig,
    stop_on_error: bool,
) -> FaultedRun {
    let backend = t.backend;
    let run_id = create_suite_run(&t.db, run_key).await;
    let admin_url = server.as_ref().expect("server").url();
    let recorder = Recorder::default();
    let executor = Executor::new(t.db.clone(), recorder.clone(), config);
    let warnings = Arc::new(Mutex::new(Vec::<String>::new()));
    let surfaced = Arc::new(AtomicBool::new(false));
    let listener = tokio::spawn({
        let mut events = executor.subscribe();
        let (warnings, surfaced) = (warnings.clone(), surfaced.clone());
        async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(ExecutorEvent::Warning { message }) => {
                        if message.contains("could not") {
                            surfaced.store(true, Ordering::SeqCst);
                        }
                        warnings.lock().expect("warnings").push(message);
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        }
    });

    let started = Instant::now();
    let shutdown = Shutdown::new();
    let execution = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { executor.execute_until(run_id, &shutdown).await }
    });
    let killer = Killer::start(admin_url, database_name(&t.url));
    let mut restarts = 0;
    let mut restart_took = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(150);
    let result = loop {
        if execution.is_finished() {
            break execution.await.expect("executor task");
        }
        // Stopped the way a user stops it (Ctrl-C): the executor returns only once its workers
        // have given their stories back and flushed their logs, so nothing of this run is still
        // being written when the caller goes on. (Aborting the task instead would leave log
        // sinks writing their last lines in the background.)
        if stop_on_error && surfaced.load(Ordering::SeqCst) {
            shutdown.give_back();
        }
        assert!(
            Instant::now() < deadline,
            "{backend:?}: the execution did not end within 150 s"
        );
        if restarts == 0
            && shutdown.level() == ShutdownLevel::Running
            && let Ok(counts) = StoryCounts::of_run(observer, run_id).await
            && counts.finished() >= RESTART_AT
        {
            let mut s = server.take().expect("server");
            let began = Instant::now();
            let s = tokio::task::spawn_blocking(move || {
                s.stop()?;
                std::thread::sleep(DOWN_FOR);
                s.start().map(|()| s)
            })
            .await
            .expect("restart task")
            .unwrap_or_else(|e| panic!("{backend:?}: restart failed: {e}"));
            restart_took = began.elapsed();
            *server = Some(s);
            restarts = 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = started.elapsed();
    let (kill_rounds, connections_killed) = killer.stop().await;
    listener.abort();
    let warnings = warnings.lock().expect("warnings").clone();
    FaultedRun {
        run_id,
        result,
        kill_rounds,
        connections_killed,
        restarts,
        restart_took,
        elapsed,
        warnings,
        recorder,
    }
}

/// Every log line of a run, in order.
async fn log_entries(db: &DatabaseConnection, run_id: Uuid) -> Vec<LogEntry> {
    let mut out = Vec::new();
    let mut cursor = LogCursor::START;
    loop {
        let page = read_run_log_after(db, run_id, cursor, 10_000)
            .await
            .expect("read log");
        if page.entries.is_empty() {
            return out;
        }
        cursor = page.next;
        out.extend(page.entries);
    }
}

async fn stories_of(db: &DatabaseConnection, run_id: Uuid) -> Vec<run_story::Model> {
    run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .order_by_asc(run_story::Column::Key)
        .all(db)
        .await
        .expect("read stories")
}

async fn epics_of(db: &DatabaseConnection, run_id: Uuid) -> Vec<run_epic::Model> {
    run_epic::Entity::find()
        .filter(run_epic::Column::RunId.eq(run_id))
        .order_by_asc(run_epic::Column::Position)
        .all(db)
        .await
        .expect("read epics")
}

async fn run_of(db: &DatabaseConnection, run_id: Uuid) -> run::Model {
    run::Entity::find_by_id(run_id)
        .one(db)
        .await
        .expect("read run")
        .expect("run exists")
}

/// What the database and the handlers say about a faulted run.
struct Verdict {
    lines_lost: usize,
    lines_twice: usize,
    stories_completed_twice: usize,
    stories_not_completed: usize,
    second_attempts: usize,
    interrupted: usize,
    log_lines: usize,
}

async fn verify(db: &DatabaseConnection, f: &FaultedRun) -> Verdict {
    let stories = stories_of(db, f.run_id).await;
    let epics = epics_of(db, f.run_id).await;
    let run = run_of(db, f.run_id).await;
    let epic_key: HashMap<Uuid, &str> = epics.iter().map(|e| (e.id, e.key.as_str())).collect();
    let entries = log_entries(db, f.run_id).await;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1, "sequence numbers are gap-free");
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for e in &entries {
        *seen.entry(e.message.as_str()).or_default() += 1;
    }
    let lines_twice = seen.values().filter(|&&n| n > 1).count();
    let with_prefix = |prefix: &str| {
        entries
            .iter()
            .filter(|e| e.message.starts_with(prefix))
            .count()
    };

    let tally = f.recorder.tally.lock().expect("tally");
    let mut lines_lost = 0;
    let mut stories_completed_twice = 0;
    for s in &stories {
        let epic = epic_key.get(&s.epic_id).copied().unwrap_or("?");
        for n in 0..LINES {
            let line = format!("[{epic}/{}] story {} line {n}", s.key, s.key);
            if !seen.contains_key(line.as_str()) {
                lines_lost += 1;
            }
        }
        let recorded = with_prefix(&format!("[{epic}/{}] completed in ", s.key));
        if recorded == 0 && s.status == "completed" {
            lines_lost += 1;
        }
        let ran = tally.completed.get(&s.key).copied().unwrap_or(0);
        if recorded > 1 || ran > 1 {
            stories_completed_twice += 1;
        }
    }
    for e in &epics {
        if e.status == "completed"
            && !seen.contains_key(format!("epic {} completed", e.key).as_str())
        {
            lines_lost += 1;
        }
    }
    if run.status == "completed"
        && !seen.contains_key(format!("run {} completed", run.key).as_str())
    {
        lines_lost += 1;
    }
    Verdict {
        lines_lost,
        lines_twice,
        stories_completed_twice,
        stories_not_completed: stories.iter().filter(|s| s.status != "completed").count(),
        second_attempts: stories.iter().filter(|s| s.attempts > 1).count(),
        interrupted: tally.interrupted.values().map(|&n| n as usize).sum(),
        log_lines: entries.len(),
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input.

/// Counts the bad inputs tried, by kind.
#[derive(Default)]
struct Inputs {
    kinds: Vec<(&'static str, u32)>,
}

impl Inputs {
    fn tried(&mut self, kind: &'static str) {
        match self.kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.kinds.push((kind, 1)),
        }
    }

    fn total(&self) -> u32 {
        self.kinds.iter().map(|(_, n)| n).sum()
    }
}

/// A snapshot of everything stored for a run, to prove bad input harmed none of it.
async fn snapshot(
    db: &DatabaseConnection,
    run_id: Uuid,
) -> (
    run::Model,
    Vec<run_epic::Model>,
    Vec<run_story::Model>,
    Vec<LogEntry>,
) {
    (
        run_of(db, run_id).await,
        epics_of(db, run_id).await,
        stories_of(db, run_id).await,
        log_entries(db, run_id).await,
    )
}

const INJECTIONS: &[&str] = &[
    "'; DROP TABLE run; --",
    "\" OR 1=1 --",
    "x'); DELETE FROM run_story WHERE ('1'='1",
    "$$; DROP TABLE run_log; $$",
    "`; DROP TABLE run_epic; #",
    "\\'; TRUNCATE run_log_head; -- \\",
    "Robert'); DROP TABLE seaql_migrations;--",
];

/// A TOML basic string holding `s` (these strings need only `\` and `"` escaped).
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `run-engine <args>` must fail with `code`, saying each of `needles` on standard error,
/// printing nothing on standard output, never showing the password.
fn refused(url: &str, args: &[&str], code: i32, needles: &[&str]) -> String {
    let (status, stdout, stderr) = cli(url, args);
    assert_eq!(
        status.code(),
        Some(code),
        "run-engine {args:?}: exit {status}\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.is_empty(), "run-engine {args:?} printed: {stdout}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "run-engine {args:?}: {needle:?} missing from:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains(SECRET) && !stdout.contains(SECRET),
        "password shown: {stderr}"
    );
    stderr
}

fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write plan");
    path
}

/// Plan files the command line must refuse, each naming the file, the place and the problem.
fn broken_plans(url: &str, dir: &Path, inputs: &mut Inputs) {
    let story = "[[epics.stories]]\nkey = \"s\"\ncommand = \"true\"\n";
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unterminated.toml",
            "name = \"x\n[[epics]]\nkey = \"e\"\n".into(),
            vec![":1:", "invalid basic string"],
        ),
        (
            "header.toml",
            format!("name = \"x\"\n[[epics]\nkey = \"e\"\n{story}"),
            vec![":2:", "unclosed array table"],
        ),
        (
            "garbage.toml",
            "this is not toml at all\n".into(),
            vec![":1:"],
        ),
        (
            "no-name.toml",
            format!("title = \"t\"\n[[epics]]\nkey = \"e\"\n{story}"),
            vec!["missing field `name`"],
        ),
        (
            "no-epic-key.toml",
            format!("name = \"x\"\n[[epics]]\ntitle = \"e\"\n{story}"),
            vec!["key", "missing field `key`"],
        ),
        (
            "no-story-key.toml",
            "name = \"x\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\ncommand = \"true\"\n".into(),
            vec!["epics[0].stories[0].key", "missing field `key`"],
        ),
        (
            "duplicate-toml-key.toml",
            format!("name = \"a\"\nname = \"b\"\n[[epics]]\nkey = \"e\"\n{story}"),
            vec![":2:1:", "name: duplicate key `name`"],
        ),
        (
            "duplicate-story-field.toml",
            "name = \"a\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\nkey = \"s\"\nkey = \"t\"\ncommand = \"true\"\n".into(),
            vec![":6:1:", "epics[0].stories[0].key: duplicate key `key`"],
        ),
        (
            "empty-epic.toml",
            format!("name = \"x\"\n[[epics]]\nkey = \"lonely\"\n[[epics]]\nkey = \"e\"\n{story}"),
            vec![":3:7:", "epics[0].stories", "epic \"lonely\" has no stories"],
        ),
        (
            "no-epics.toml",
            "name = \"x\"\n".into(),
            vec!["epics: the plan has no epics"],
        ),
        ("empty.toml", String::new(), vec!["missing field `name`"]),
        (
            "huge-attempts.toml",
            format!("name = \"x\"\n[[epics]]\nkey = \"e\"\n{story}max_attempts = 2147483648\n"),
            vec![
                ":7:16:",
                "max_attempts must be between 1 and 100, not 2147483648",
            ],
        ),
        (
            "negative-attempts.toml",
            format!("name = \"x\"\n[[epics]]\nkey = \"e\"\n{story}max_attempts = -1\n"),
            vec!["max_attempts must be between 1 and 100, not -1"],
        ),
        (
            "typo.toml",
            format!("name = \"x\"\n[[epics]]\nkey = \"e\"\n{story}comand = \"true\"\n"),
            vec!["unknown field `comand`"],
        ),
        (
            "nul.toml",
            "name = \"x\"\n[[epics]]\nkey = \"e\\u0000\"\n[[epics.stories]]\nkey = \"s\"\ncommand = \"echo \\u0000\"\n".into(),
            vec![
                "epics[0].key: the epic key contains the control character U+0000 (NUL)",
                "epics[0].stories[0].command: the command contains a NUL character",
            ],
        ),
        (
            "long-key.toml",
            format!(
                "name = \"x\"\n[[epics]]\nkey = \"{}\"\n{story}",
                "k".repeat(300)
            ),
            vec!["epics[0].key: the epic key is longer than 255 bytes"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = write(dir, name, text);
        let file = path.display().to_string();
        let mut needles = needles;
        needles.push(&file);
        refused(url, &["create", &file], 1, &needles);
        inputs.tried("plan files with errors");
    }
    // Not UTF-8, a directory, a missing file.
    let path = write(dir, "latin1.toml", b"name = \"caf\xe9\"\n");
    let file = path.display().to_string();
    refused(url, &["create", &file], 1, &[&file, "valid UTF-8"]);
    inputs.tried("plan files with errors");
    let file = dir.display().to_string();
    refused(url, &["create", &file], 1, &["cannot read plan", &file]);
    inputs.tried("plan files with errors");
    let file = dir.join("missing.toml").display().to_string();
    refused(url, &["create", &file], 1, &["cannot read plan", &file]);
    inputs.tried("plan files with errors");
}

/// A 10,000-story plan: created whole, in reasonable time. Returns the seconds it took.
async fn ten_thousand_stories(
    t: &TestDb,
    observer: &DatabaseConnection,
    dir: &Path,
    inputs: &mut Inputs,
) -> f64 {
    let text = RunFactory::new()
        .key("big")
        .epics(10)
        .stories(1000)
        .command("true")
        .plan_toml();
    let path = write(dir, "ten-thousand.toml", text);
    let started = Instant::now();
    let (status, stdout, stderr) = cli(&t.url, &["create", path.to_str().expect("utf-8")]);
    let took = started.elapsed();
    assert!(status.success(), "the 10,000-story plan: {stderr}");
    let run_id: Uuid = stdout.trim().parse().expect("the run id");
    assert!(
        took < Duration::from_secs(60),
        "creating 10,000 stories took {took:?}"
    );
    let counts = StoryCounts::of_run(observer, run_id).await.expect("counts");
    assert_eq!((counts.total(), counts.pending), (10_000, 10_000));
    inputs.tried("a 10,000-story plan");
    took.as_secs_f64()
}

/// SQL injection strings in every text field of a plan, through the command line: stored
/// verbatim, the schema untouched.
async fn injections_through_the_cli(
    t: &TestDb,
    observer: &DatabaseConnection,
    dir: &Path,
    inputs: &mut Inputs,
) {
    for (i, evil) in INJECTIONS.iter().enumerate() {
        let q = toml_str(evil);
        let text = format!(
            "name = {q}\ntitle = {q}\n[[epics]]\nkey = {q}\ntitle = {q}\n\
             [[epics.stories]]\nkey = {q}\ntitle = {q}\ncommand = {q}\n"
        );
        let path = write(dir, &format!("injection-{i}.toml"), text);
        let (status, stdout, stderr) = cli(&t.url, &["create", path.to_str().expect("utf-8")]);
        assert!(status.success(), "{evil}: {stderr}");
        let run_id: Uuid = stdout.trim().parse().expect("the run id");
        let r = run_of(observer, run_id).await;
        assert_eq!((r.key.as_str(), r.title.as_str()), (*evil, *evil));
        let epics = epics_of(observer, run_id).await;
        assert_eq!(
            (epics[0].key.as_str(), epics[0].title.as_str()),
            (*evil, *evil)
        );
        let stories = stories_of(observer, run_id).await;
        let s = &stories[0];
        assert_eq!((s.key.as_str(), s.title.as_str()), (*evil, *evil));
        assert_eq!(s.command.as_deref(), Some(*evil));
        // And back out through `status --json`, verbatim.
        let (status, json, _) = cli(&t.url, &["status", &run_id.to_string(), "--json"]);
        assert!(status.success());
        let json: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(json["run"]["key"], *evil);
        inputs.tried("SQL injection strings in plan fields");
    }
}

/// A story whose output holds NUL bytes, control characters, invalid UTF-8 and a 100,000-byte
/// line, run through the command line: every byte reaches the log (invalid UTF-8 replaced,
/// the long line split at 8 KiB), and the run completes.
fn odd_output_through_the_cli(url: &str, dir: &Path, inputs: &mut Inputs) {
    let command = "printf 'nul\\000byte\\n'; printf 'ctrl \\033[31mred\\007 bell\\r\\n'; \
                   printf 'bad \\377 utf8\\n'; head -c 100000 /dev/zero | tr '\\000' x; echo";
    let text = format!(
        "name = \"odd\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\nkey = \"s\"\ncommand = {}\n",
        toml_str(command)
    );
    let path = write(dir, "odd-output.toml", text);
    let (status, _, stderr) = cli(url, &["run", path.to_str().expect("utf-8"), "-w", "1"]);
    assert!(status.success(), "{stderr}");
    let run_id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("created run "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the run id")
        .to_owned();
    let (status, logs, _) = cli(url, &["logs", &run_id]);
    assert!(status.success());
    for needle in [
        "[e/s] nul\0byte",
        "[e/s] ctrl \x1b[31mred\x07 bell",
        "[e/s] bad \u{FFFD} utf8",
    ] {
        assert!(logs.contains(needle), "{needle:?} missing from the log");
    }
    let xs: usize = logs
        .lines()
        .filter_map(|l| l.split_once("] [e/s] "))
        .map(|(_, m)| m)
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b == b'x'))
        .map(str::len)
        .sum();
    assert_eq!(xs, 100_000, "every byte of the long line is in the log");
    inputs.tried("NUL, control characters, invalid UTF-8 and long lines in output");
}

/// Database URLs with a wrong scheme, an unreachable host, a wrong password: refused at once,
/// naming the problem, never showing the password.
fn bad_urls(backend: Backend, server_url: &str, inputs: &mut Inputs) {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("redis://app:{SECRET}@127.0.0.1:6379/0"),
            vec!["unsupported database URL scheme \"redis\"".into()],
        ),
        (
            format!("postgresql+psycopg://app:{SECRET}@127.0.0.1/runs"),
            vec!["unsupported database URL scheme".into()],
        ),
        (
            format!("postgres://app:{SECRET}@127.0.0.1:{closed_port}/runs"),
            vec![
                format!("127.0.0.1:{closed_port} cannot be reached"),
                "connection refused".into(),
            ],
        ),
        (
            format!("mysql://app:{SECRET}@db.invalid:3306/runs"),
            vec!["db.invalid:3306 cannot be reached".into()],
        ),
    ];
    let mut wrong = url::Url::parse(server_url).expect("server url");
    match backend {
        // The private MariaDB's root has no password: offering one is refused.
        Backend::MySql => {
            wrong.set_password(Some(SECRET)).expect("password");
            cases.push((wrong.to_string(), vec!["Access denied".into()]));
        }
        // The private PostgreSQL trusts local users whatever their password: a user that
        // does not exist stands in for a wrong password.
        _ => {
            wrong.set_username("nobody_here").expect("user");
            wrong.set_password(Some(SECRET)).expect("password");
            cases.push((wrong.to_string(), vec!["nobody_here".into()]));
        }
    }
    for (url, needles) in &cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let started = Instant::now();
        let stderr = refused(url, &["status", &Uuid::new_v4().to_string()], 1, &needles);
        assert!(
            stderr.contains(":***@"),
            "the URL is shown redacted: {stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{url}: refused only after {:?}",
            started.elapsed()
        );
        inputs.tried("bad database URLs");
    }
}

/// Unknown and malformed run ids on every subcommand that takes one.
fn unknown_runs_through_the_cli(url: &str, inputs: &mut Inputs) {
    let missing = Uuid::new_v4().to_string();
    let not_found = format!("run {missing} not found");
    for args in [
        vec!["status", missing.as_str()],
        vec!["status", missing.as_str(), "--json"],
        vec!["logs", missing.as_str()],
        vec!["logs", "--follow", missing.as_str()],
        vec!["cancel", missing.as_str()],
        vec!["exec", missing.as_str()],
    ] {
        refused(url, &args, 1, &[&not_found]);
        inputs.tried("unknown run ids");
    }
    for bad in ["not-a-uuid", "'; DROP TABLE run; --", ""] {
        refused(url, &["status", bad], 2, &["invalid value"]);
        inputs.tried("unknown run ids");
    }
}

/// Unknown runs, stale and absurd versions, illegal status changes through the engine API, on
/// a story of the faulted run: typed errors, and the story unchanged.
async fn engine_api_bad_input(t: &TestDb, run_id: Uuid, inputs: &mut Inputs) {
    let db = &t.db;
    let missing = Uuid::new_v4();
    assert!(matches!(
        cancel_run(db, missing).await,
        Err(EngineError::RunNotFound(id)) if id == missing
    ));
    assert!(matches!(
        load_run_tree(db, missing).await,
        Err(EngineError::RunNotFound(id)) if id == missing
    ));
    let executor = Executor::new(db.clone(), Recorder::default(), ExecutorConfig::default());
    assert!(matches!(
        executor.execute(missing).await,
        Err(EngineError::RunNotFound(id)) if id == missing
    ));
    for _ in 0..3 {
        inputs.tried("unknown ids (engine API)");
    }

    let story = stories_of(db, run_id).await.remove(0);
    let lease = Lease::new("intruder", Duration::from_secs(30));
    for version in [
        story.version - 1,
        story.version + 1,
        -1,
        0,
        i32::MAX,
        i32::MIN,
    ] {
        let mut stale = story.clone();
        stale.version = version;
        let err = renew_lease(db, &stale, &lease, chrono::Utc::now())
            .await
            .expect_err("a stale version renews nothing");
        assert!(err.is_conflict(), "{version}: {err}");
        assert!(err.to_string().contains("expected version"), "{err}");
        inputs.tried("stale and absurd versions");
    }
    // A completed story can be neither released again, given back, nor claimed.
    for how in [
        Some(Release::Completed),
        Some(Release::Cancelled),
        Some(Release::Failed { error: "x".into() }),
        None,
    ] {
        let err = match how {
            Some(how) => release(db, &story, how).await,
            None => give_back(db, &story).await,
        }
        .expect_err("illegal");
        assert!(
            matches!(err, TransitionError::Illegal { ref from, .. } if from == "completed"),
            "{err}"
        );
        inputs.tried("illegal status changes");
    }
    assert!(matches!(
        try_claim(db, &story, &lease, chrono::Utc::now()).await,
        Ok(TryClaim::Lost)
    ));
    inputs.tried("illegal status changes");
    let after = run_story::Entity::find_by_id(story.id)
        .one(db)
        .await
        .expect("read")
        .expect("story");
    assert_eq!(after, story, "the story is unchanged");
}

/// NUL bytes, control characters and a one-mebibyte line through a story's log sink, on a run
/// of its own: read back exactly.
async fn odd_lines_through_the_sink(db: &DatabaseConnection, inputs: &mut Inputs) {
    let run = RunFactory::new()
        .key("odd-lines")
        .epics(0)
        .create(db)
        .await
        .run;
    let big = "y".repeat(1 << 20);
    let odd = [
        "nul \0 in the middle\0",
        "control \u{1} \u{7} \u{1b}[31m red \r carriage",
        "'; DROP TABLE run_log; --",
        "",
        big.as_str(),
    ];
    let sink = LogSink::start(db.clone(), run.id, "");
    for line in odd {
        sink.line(line).await;
        inputs.tried("odd log lines (log sink)");
    }
    sink.flush().await.expect("flush");
    let back: Vec<String> = log_entries(db, run.id)
        .await
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(back, odd);
}

/// Every bad input; returns the seconds the 10,000-story plan took.
async fn bad_input(
    t: &TestDb,
    observer: &DatabaseConnection,
    server_url: &str,
    faulted_run: Uuid,
    inputs: &mut Inputs,
) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let before = snapshot(observer, faulted_run).await;
    let counts = table_counts(observer).await;

    broken_plans(&t.url, dir.path(), inputs);
    assert_eq!(
        table_counts(observer).await,
        counts,
        "a refused plan writes nothing"
    );
    unknown_runs_through_the_cli(&t.url, inputs);
    bad_urls(t.backend, server_url, inputs);
    engine_api_bad_input(t, faulted_run, inputs).await;
    injections_through_the_cli(t, observer, dir.path(), inputs).await;
    odd_output_through_the_cli(&t.url, dir.path(), inputs);
    odd_lines_through_the_sink(&t.db, inputs).await;
    let took = ten_thousand_stories(t, observer, dir.path(), inputs).await;

    let after = snapshot(observer, faulted_run).await;
    assert!(after == before, "bad input harmed the faulted run's data");
    let migrations = run_engine_tests::count_rows(observer, "seaql_migrations").await;
    assert_eq!(migrations, migration::migration_names().len() as i64);
    took
}

// ---------------------------------------------------------------------------------------------
// The suite.

/// How many runs without retries may be spared by the faults before the suite fails.
const UNSAFE_TRIES: u32 = 3;

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "postgres",
        Backend::MySql => "mariadb",
        Backend::Sqlite => "sqlite",
    }
}

fn target_dir() -> PathBuf {
    // target/<profile>/deps/fault_suite-<hash>
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

fn first_line(e: &EngineError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

async fn fault_suite(backend: Backend) {
    if backend.server_url().is_none() {
        return; // this backend is not under test here (outside CI)
    }
    let started = Instant::now();
    let server = match backend {
        Backend::Postgres => PrivateServer::postgres(),
        _ => PrivateServer::mariadb(),
    }
    .unwrap_or_else(|e| panic!("{backend:?}: cannot start a private server: {e}"));
    let server_url = server.url();
    let t = TestDb::migrated_on(&server).await;
    slow_story_writes(&t.db).await;
    let mut server = Some(server);
    let observer = t.reconnect().await;

    // 1. The faulted run, with retries.
    let safe = execute_under_faults(
        &mut server,
        &t,
        &observer,
        "fault-suite",
        suite_config(backend, true),
        false,
    )
    .await;
    let summary = match &safe.result {
        Ok(summary) => summary.clone(),
        Err(e) => panic!(
            "{backend:?}: the execution failed under faults: {e}\nwarnings:\n{}",
            safe.warnings.join("\n")
        ),
    };
    let verdict = verify(&observer, &safe).await;
    let completed = summary.is_completed();

    // 2. The same faults without retries. Whether a kill cuts a statement in flight is a
    // matter of timing, so a run the faults happened to spare is tried again (up to
    // UNSAFE_TRIES runs); the test fails if none of them surfaces an error.
    let mut tries = 0;
    let (unsafe_run, unsafe_outcome, unsafe_failed) = loop {
        tries += 1;
        let unsafe_run = execute_under_faults(
            &mut server,
            &t,
            &observer,
            &format!("fault-suite-no-retries-{tries}"),
            suite_config(backend, false),
            true,
        )
        .await;
        let surfaced: Vec<String> = unsafe_run
            .warnings
            .iter()
            .filter(|w| w.contains("could not"))
            .cloned()
            .collect();
        let outcome = match &unsafe_run.result {
            Err(e) => format!("the execution failed: {}", first_line(e)),
            Ok(s) if s.interrupted => format!(
                "stopped once errors surfaced: {} error(s), first: {}",
                surfaced.len(),
                surfaced.first().map(String::as_str).unwrap_or("?")
            ),
            Ok(s) => format!("{s}; {} error(s) surfaced", surfaced.len()),
        };
        let outcome = format!("{outcome} (run {tries} of at most {UNSAFE_TRIES})");
        // Errors surfaced (results, renewals, log lines dropped), or the execution failed on a
        // transient error.
        let failed = match &unsafe_run.result {
            Err(e) => e.is_transient_db(),
            Ok(s) => !s.is_completed() || !surfaced.is_empty(),
        };
        if failed || tries == UNSAFE_TRIES {
            break (unsafe_run, outcome, failed);
        }
    };

    // 3. Bad input, on the faulted run's database.
    let mut inputs = Inputs::default();
    let big_plan_secs = bad_input(&t, &observer, &server_url, safe.run_id, &mut inputs).await;

    // The table.
    let name = match backend {
        Backend::Postgres => "PostgreSQL",
        _ => "MariaDB",
    };
    let survived = if completed
        && verdict.stories_not_completed == 0
        && verdict.lines_lost == 0
        && verdict.lines_twice == 0
        && verdict.stories_completed_twice == 0
    {
        safe.faults()
    } else {
        0
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "### Fault suite on {name}\n\n\
         {STORIES} stories in {EPICS} epics, {WORKERS} workers, leases of 20 s renewed every \
         250 ms; every story write slowed to {} ms; every connection killed every 1-2 s (at a \
         moment a story write is in flight), the server restarted once at {}% progress (down for {} s).\n",
        (SLOW_WRITE_SECS.parse::<f64>().unwrap_or(0.0) * 1000.0).round(),
        RESTART_AT * 100 / STORIES as u64,
        DOWN_FOR.as_secs()
    );
    let _ = writeln!(table, "| measure | value |\n|---|---|");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(table, "| {k} | {v} |");
    };
    row(
        "faults injected (kills + restarts)",
        format!(
            "{} ({} kill rounds, {} connections killed; {} restart, {:.1} s down)",
            safe.faults(),
            safe.kill_rounds,
            safe.connections_killed,
            safe.restarts,
            safe.restart_took.as_secs_f64()
        ),
    );
    row("faults survived", survived.to_string());
    row(
        "transient failures ridden out by the executor",
        summary.retried.to_string(),
    );
    row(
        "lost answers recognised (committed writes whose reply was lost)",
        summary.recognised.to_string(),
    );
    row(
        "inputs tried",
        format!(
            "{} ({})",
            inputs.total(),
            inputs
                .kinds
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row("lines lost", verdict.lines_lost.to_string());
    row("lines written twice", verdict.lines_twice.to_string());
    row(
        "stories completed twice",
        verdict.stories_completed_twice.to_string(),
    );
    row(
        "run",
        format!(
            "{} in {:.1} s: {} completed, {} log lines, {} stories needed a second attempt, \
             {} handler runs interrupted",
            summary.run_status,
            safe.elapsed.as_secs_f64(),
            summary.counts.completed,
            verdict.log_lines,
            verdict.second_attempts,
            verdict.interrupted
        ),
    );
    row(
        "same faults without retries",
        format!(
            "{} fault(s) in {:.1} s: {}",
            unsafe_run.faults(),
            unsafe_run.elapsed.as_secs_f64(),
            unsafe_outcome.replace('|', "\\|")
        ),
    );
    row(
        "10,000-story plan",
        format!("created in {big_plan_secs:.1} s"),
    );
    row(
        "test time",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    println!("\n{table}");
    let path = target_dir().join(format!("fault-suite-{}.md", backend_name(backend)));
    if let Err(e) = std::fs::write(&path, &table) {
        eprintln!("could not write {}: {e}", path.display());
    }

    assert!(
        completed,
        "{backend:?}: the run did not complete: {summary}"
    );
    assert_eq!(verdict.stories_not_completed, 0, "every story completed");
    assert_eq!(verdict.lines_lost, 0, "lines lost");
    assert_eq!(verdict.lines_twice, 0, "lines written twice");
    assert_eq!(
        verdict.stories_completed_twice, 0,
        "stories completed twice"
    );
    assert!(
        safe.connections_killed > 0 && safe.restarts == 1,
        "the faults were injected"
    );
    assert!(
        unsafe_failed,
        "{backend:?}: without retries the same faults should surface errors: {unsafe_outcome}"
    );
    drop(observer);
    drop(t);
    drop(server);
}

/// Parts 1 to 3 above on PostgreSQL: under the faults nothing is lost or done twice, without
/// retries the same faults surface errors, and bad input is refused and harms nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_and_a_restart_lose_no_line_and_complete_no_story_twice_on_postgres() {
    fault_suite(Backend::Postgres).await;
}

/// Parts 1 to 3 above on MariaDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_and_a_restart_lose_no_line_and_complete_no_story_twice_on_mariadb() {
    fault_suite(Backend::MySql).await;
}

each_backend! {
    /// The executor's answer to a write whose reply was lost: its own write is told apart from
    /// another worker's. A claim and a release are recognised exactly; a renewal of ours seen
    /// as a conflict (the reply lost, or the renewal dropped in flight) leaves the story held;
    /// a take-over does not.
    async fn a_write_whose_reply_was_lost_is_told_apart_from_a_take_over(t) {
        let db = &t.db;
        let now = chrono::Utc::now;
        // A lease of zero: the story is always expired, so a thief may take it at once.
        let me = Lease::new("me", Duration::ZERO);
        let story = run_engine_tests::new_story(db).await;
        let TryClaim::Claimed(claim) = try_claim(db, &story, &me, now()).await.expect("claim")
        else {
            panic!("the claim should succeed");
        };
        let read = |id| async move {
            run_story::Entity::find_versioned(db, id).await.expect("read")
        };
        assert!(claimed_by(&read(story.id).await, &story, "me"));
        assert!(!claimed_by(&read(story.id).await, &story, "someone-else"));
        let held = claim.story;

        // A renewal commits, but its reply is lost: the worker still holds `held`.
        renew_lease(db, &held, &me, now()).await.expect("renewal");
        let err = renew_lease(db, &held, &me, now()).await.expect_err("stale");
        assert!(matches!(
            err,
            ConcurrencyError::Conflict { expected, actual, .. } if actual == expected + 1
        ));
        let row = read(story.id).await;
        assert!(still_held(&row, &held, "me"), "our own renewal");

        // A thief takes the expired story over: no longer ours, whatever we wrote before.
        let thief = Lease::new("thief", Duration::from_secs(60));
        assert!(matches!(
            try_claim(db, &row, &thief, now()).await.expect("take over"),
            TryClaim::Claimed(_)
        ));
        let taken = read(story.id).await;
        assert!(!still_held(&taken, &held, "me"));
        assert!(!still_held(&taken, &row, "me"));
        assert!(!released_by(&taken, &row, Some(&Release::Completed), "me"));

        // The thief's release commits, its reply lost: recognised as exactly that release.
        let done = release(db, &taken, Release::Completed).await.expect("release");
        assert!(released_by(&done, &taken, Some(&Release::Completed), "thief"));
        assert!(!released_by(&done, &taken, Some(&Release::Completed), "me"));
        assert!(!released_by(&done, &taken, Some(&Release::Cancelled), "thief"));
        assert!(!released_by(&done, &taken, None, "thief"));
    }
}

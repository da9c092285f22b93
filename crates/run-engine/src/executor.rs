//! The executor: N worker tasks in this process that claim a run's stories, run them with a
//! [`StoryHandler`], and record the results; any number of processes may execute one run at
//! once.
//!
//! Each worker loops:
//!
//! 1. stop if the process is shutting down or the run was cancelled;
//! 2. take the next candidate from this process's queue and try to claim it by compare-and-swap
//!    ([`try_claim`]), the next one if someone else took it first. An empty queue is refilled
//!    by one worker while the others wait: up to 64 pending stories of the run in position
//!    order (and, about once a second, the running ones whose lease expired), shuffled. So no
//!    two workers of a process try the same story, and processes that read the same window
//!    spread over it instead of all fighting for the first;
//! 3. nothing to claim: stop if no story of the run is pending or running, else wait a moment
//!    (stories held by other workers may finish, fail back to pending, or lose their lease);
//! 4. run the story's handler while renewing its lease; record the result from the version of
//!    the last renewal; finish the epic and the run when their stories are all done.
//!
//! # What a story costs
//!
//! A story without output costs three statements: the claim, the result (both
//! compare-and-swap), and one indexed look whether its epic has stories left
//! ([`crate::finish::epic_has_unfinished`]), skipped while another worker of this process holds
//! a story of the epic (the last of them to record looks). Its log lines (started, its output,
//! and the line that tells its result) go through one [`LogSink`] writer per execution, shared
//! by every worker: they are written in batches together with every other worker's (group
//! commit), and the worker waits for them before it records the result, so that whoever sees
//! the story finished has every line of it, and the run's closing line, written once every
//! epic is finished ([`crate::finish`]), is the last line of its log. Lines that cannot be
//! written even after retrying are never left behind silently: the story is given back instead
//! of recorded, and the execution stops with [`EngineError::LogLost`].
//!
//! A worker that loses its lease (its renewal or its release conflicts) is fenced off: it stops
//! its handler and records nothing. See [`crate::lease`].
//!
//! # Database faults
//!
//! Every database call a worker makes (candidates, claims, renewals, results, epic and run
//! completion, log lines) rides out transient failures
//! ([`run_domain::connection::is_transient`]: a killed connection, a restarting server): it is
//! tried again with backoff for up to
//! [`ExecutorConfig::retry_budget`] (30 s). Any other failure surfaces as an [`EngineError`].
//!
//! A compare-and-swap whose try failed may still have committed, its answer lost. The worker
//! then meets a conflict against its own write, re-reads the row and recognises it
//! ([`crate::lease::claimed_by`], [`crate::lease::still_held`], [`crate::lease::released_by`]):
//! a claim is kept, a renewal adopted, a result counted as recorded. Lines that say an epic or
//! the run finished carry a batch id derived from its id, so they are written once whoever
//! writes them and however often. A result line whose record is then refused (another worker
//! took the story over) is followed by a `fenced off` line saying it was not recorded.
//!
//! A renewal that fails transiently is tried again sooner than the next one would be; the story
//! keeps running. Only when no renewal got through for (nine tenths of) a whole lease, after
//! which another worker may take the story over, does the worker stop its handler (fencing on
//! time): it then records a completion that the handler finished anyway, or else gives the
//! story back, in both cases by compare-and-swap from the version it holds, so nothing is
//! recorded if someone else took the story over meanwhile.

use crate::cancel::cancel_leftovers;
use crate::error::{EngineError, TransientDb};
use crate::finish::{
    epic_has_unfinished, finish_epic_if_done, finish_run_if_done, settle_run, start_epic, start_run,
};
use crate::handler::{CancelHandle, Cancellation, StoryContext, StoryHandler, StoryOutcome};
use crate::lease::{
    Claim, Lease, Release, TryClaim, claimed_by, expired_leases, give_back, pending_candidates,
    release, released_by, renew_lease, still_held, try_claim,
};
use crate::log_sink::{LogSink, LogSinkError};
use crate::retry::{backoff, retry_transient};
use crate::status::StoryCounts;
use chrono::Utc;
use entity::{run, run_epic, run_story};
use run_domain::{
    ConcurrencyError, EpicStatus, Lifecycle, RunStatus, StoryStatus, TransitionError,
    VersionedUpdate,
};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// How often a worker also looks for expired leases while pending stories remain.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often the run's status is read, to notice a cancellation.
const RUN_WATCH_EVERY: Duration = Duration::from_millis(500);
/// Consecutive conflicts after which a worker stops (transient database failures are bounded by
/// time instead: [`ExecutorConfig::retry_budget`]).
const MAX_CONSECUTIVE_FAILURES: u32 = 10;
/// How often in a row a release may find the story one of our own renewals on.
const MAX_ADOPTIONS: u32 = 3;
/// Events buffered for slow subscribers.
const EVENT_BUFFER: usize = 4096;

/// The `<hostname>-<pid>` part of this process's worker ids.
pub fn default_worker_prefix() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    // lease_owner holds 255 bytes; leave room for the pid and the worker number.
    let host: String = host.chars().take(200).collect();
    format!("{host}-{}", std::process::id())
}

/// How an [`Executor`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// Worker tasks in this process (at least 1).
    pub workers: usize,
    /// How long a claim or renewal holds a story.
    pub lease: Duration,
    /// How often a running story's lease is renewed (a third of the lease by default).
    pub renew_every: Duration,
    /// How long an idle worker waits before looking for work again.
    pub poll_interval: Duration,
    /// How many pending stories are read at a time into this process's queue of candidates,
    /// which its workers take from (each candidate goes to one worker of the process; other
    /// processes read their own, in a shuffled order, and a candidate taken meanwhile only
    /// costs a failed compare-and-swap).
    pub candidate_window: u64,
    /// How long a handler has to stop after it is cancelled before it is dropped.
    pub cancel_grace: Duration,
    /// Worker ids are `<worker_prefix>-<n>`; by default `<hostname>-<pid>`. They must be unique
    /// among the workers of a run (a worker recognises its own writes by its id, after a lost
    /// reply): two executors in one process on one run need prefixes of their own.
    pub worker_prefix: String,
    /// Whether database calls that fail transiently
    /// ([`run_domain::connection::is_transient`]) are tried again, with backoff, for up to
    /// [`ExecutorConfig::retry_budget`]. On by default; off, the
    /// first such failure ends the worker (or drops the result, or the log lines), which is
    /// only good for showing what the retries are for.
    pub retry_transient: bool,
    /// How long one database call is tried again through transient failures before the worker
    /// gives up on it: long enough to ride out a server restart.
    pub retry_budget: Duration,
}

impl Default for ExecutorConfig {
    /// 4 workers, 30 s leases renewed every 10 s, 250 ms polls, 64 candidates, 10 s grace,
    /// transient database failures retried for up to 30 s.
    fn default() -> Self {
        ExecutorConfig {
            workers: 4,
            lease: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            candidate_window: 64,
            cancel_grace: Duration::from_secs(10),
            worker_prefix: default_worker_prefix(),
            retry_transient: true,
            retry_budget: Duration::from_secs(30),
        }
    }
}

impl ExecutorConfig {
    /// Sets the number of workers (at least 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Sets the lease (at least 100 ms), and renews it every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(100));
        self.renew_every = self.lease / 3;
        self
    }

    /// Sets how often a running story's lease is renewed (at least 10 ms); call after
    /// [`ExecutorConfig::lease`], which resets it to a third of the lease. Renew several times
    /// per lease, so that renewals that fail during a database outage have time to get through.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = every.max(Duration::from_millis(10));
        self
    }

    /// Sets whether transient database failures are tried again (see
    /// [`ExecutorConfig::retry_transient`]).
    pub fn retry_transient(mut self, retry: bool) -> Self {
        self.retry_transient = retry;
        self
    }

    /// Sets how long a database call is tried again through transient failures.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// The retry budget, or `None` when transient failures are not retried.
    fn budget(&self) -> Option<Duration> {
        self.retry_transient.then_some(self.retry_budget)
    }

    /// Sets how long an idle worker waits before looking again.
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll_interval = poll;
        self
    }

    /// Sets how long a cancelled handler has to stop.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// Sets the prefix of worker ids.
    pub fn worker_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.worker_prefix = prefix.into();
        self
    }
}

/// How far a shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShutdownLevel {
    /// Working normally.
    Running,
    /// Claim nothing new; let running stories finish.
    Drain,
    /// Claim nothing new; stop running stories and give their leases back (the attempt is not
    /// counted), unless they finish within the grace period.
    GiveBack,
}

/// Asks an executor to stop: cheap to clone, shared with signal handlers.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<ShutdownLevel>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// Not shutting down.
    pub fn new() -> Shutdown {
        let (tx, _) = watch::channel(ShutdownLevel::Running);
        Shutdown { tx: Arc::new(tx) }
    }

    /// Stop claiming; running stories finish.
    pub fn drain(&self) {
        self.raise(ShutdownLevel::Drain);
    }

    /// Stop claiming; running stories are stopped and given back.
    pub fn give_back(&self) {
        self.raise(ShutdownLevel::GiveBack);
    }

    /// The current level.
    pub fn level(&self) -> ShutdownLevel {
        *self.tx.borrow()
    }

    fn raise(&self, to: ShutdownLevel) {
        self.tx.send_if_modified(|level| {
            if to > *level {
                *level = to;
                true
            } else {
                false
            }
        });
    }

    fn subscribe(&self) -> watch::Receiver<ShutdownLevel> {
        self.tx.subscribe()
    }
}

/// A story named for people: `epic/story`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoryRef {
    /// The story's id.
    pub id: Uuid,
    /// Its epic's key.
    pub epic: String,
    /// Its key.
    pub key: String,
}

impl fmt::Display for StoryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.epic, self.key)
    }
}

/// Something an executor did, for progress displays ([`Executor::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorEvent {
    /// A worker claimed a story and started its handler.
    Started {
        /// The story.
        story: StoryRef,
        /// The attempt, from 1.
        attempt: i32,
        /// Attempts allowed.
        max_attempts: i32,
        /// The worker.
        worker: String,
        /// The previous holder, when the story was taken over from an expired lease.
        taken_over_from: Option<String>,
    },
    /// A worker recorded an attempt's result. `status` pending means "failed, will retry".
    Finished {
        /// The story.
        story: StoryRef,
        /// The story's status now.
        status: StoryStatus,
        /// The attempt, from 1.
        attempt: i32,
        /// Attempts allowed.
        max_attempts: i32,
        /// How long the attempt took.
        elapsed: Duration,
        /// The error, for a failed attempt.
        error: Option<String>,
        /// The worker.
        worker: String,
    },
    /// A worker lost its lease to another and dropped its result.
    Fenced {
        /// The story.
        story: StoryRef,
        /// The fenced worker.
        worker: String,
    },
    /// A worker gave a story back on shutdown.
    GaveBack {
        /// The story.
        story: StoryRef,
        /// The worker.
        worker: String,
    },
    /// An epic finished.
    EpicFinished {
        /// Its key.
        key: String,
        /// Its status.
        status: String,
    },
    /// The run finished.
    RunFinished {
        /// Its status.
        status: String,
    },
    /// Something went wrong that the executor worked around.
    Warning {
        /// What.
        message: String,
    },
}

/// What an execution ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The run.
    pub run_id: Uuid,
    /// Its status at the end (pending or running when interrupted).
    pub run_status: String,
    /// Its stories by status at the end.
    pub counts: StoryCounts,
    /// Attempts whose result this executor recorded.
    pub recorded: u64,
    /// Attempts whose result this executor dropped because it had lost the lease.
    pub fenced: u64,
    /// Stories this executor gave back (on shutdown, or when it could not renew their lease).
    pub given_back: u64,
    /// Database calls this executor tried again after a transient failure.
    pub retried: u64,
    /// Writes of this executor whose answer was lost but that had committed (a claim, a
    /// renewal, a result), recognised on re-reading the row.
    pub recognised: u64,
    /// True when a shutdown stopped the executor before the run was finished.
    pub interrupted: bool,
    /// How long the execution took.
    pub elapsed: Duration,
}

impl Summary {
    /// True when the run completed.
    pub fn is_completed(&self) -> bool {
        self.run_status == RunStatus::Completed.as_str()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        write!(
            f,
            "run {} {}{}: {} completed, {} failed, {} cancelled",
            self.run_id,
            self.run_status,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            c.completed,
            c.failed,
            c.cancelled
        )?;
        if c.pending + c.running > 0 {
            write!(f, ", {} pending, {} running", c.pending, c.running)?;
        }
        write!(f, " of {} in {:.1}s", c.total(), self.elapsed.as_secs_f64())?;
        if self.retried > 0 {
            write!(
                f,
                "; rode out {} transient database failure(s)",
                self.retried
            )?;
        }
        Ok(())
    }
}

struct Inner {
    db: DatabaseConnection,
    handler: Arc<dyn StoryHandler>,
    config: ExecutorConfig,
    events: broadcast::Sender<ExecutorEvent>,
}

/// Runs a run's stories with N workers in this process. Cheap to clone.
///
/// ```no_run
/// use run_engine::{Executor, ExecutorConfig, ShellHandler, Shutdown};
/// # async fn demo(db: sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let executor = Executor::new(db, ShellHandler::default(), ExecutorConfig::default().workers(8));
/// let shutdown = Shutdown::new();
/// let on_ctrl_c = shutdown.clone();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     on_ctrl_c.drain();
/// });
/// let summary = executor.execute_until(run_id, &shutdown).await?;
/// println!("{summary}");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Why a worker stopped supervising a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    RunCancelled,
    GiveBack,
    /// No renewal got through for nearly a whole lease: another worker may take the story over.
    LeaseRunOut,
}

enum Ending {
    /// The handler returned (or was dropped after `stop` and the grace period: `None`).
    Done {
        outcome: Option<StoryOutcome>,
        stop: Option<Stop>,
    },
    /// A renewal found the story changed by someone else.
    Fenced { detail: String },
}

enum Step {
    Claimed(Box<Claim>),
    /// Every candidate was taken by someone else first: look again at once.
    Contended,
    /// Nothing claimable right now.
    Idle,
}

/// Aborts a spawned handler when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct Stats {
    recorded: AtomicU64,
    fenced: AtomicU64,
    given_back: AtomicU64,
    retried: AtomicU64,
    recognised: AtomicU64,
}

/// How a renewal went.
enum Renewal {
    /// The lease was pushed on (`recognised`: by an earlier try whose answer was lost).
    Renewed {
        story: Box<run_story::Model>,
        recognised: bool,
    },
    /// Someone else changed the story: fenced off.
    Lost(String),
    /// The database failed; the lease is as it was.
    Failed(ConcurrencyError),
}

type RenewalFuture = Pin<Box<dyn Future<Output = Renewal> + Send>>;

/// One execution of one run by this process.
struct Execution {
    inner: Arc<Inner>,
    run_id: Uuid,
    epic_keys: HashMap<Uuid, String>,
    run_status: watch::Receiver<RunStatus>,
    shutdown: Shutdown,
    started_epics: Mutex<HashSet<Uuid>>,
    run_started: AtomicBool,
    /// Set when a worker stopped on errors: the others claim nothing new.
    worker_failed: AtomicBool,
    /// Set when lines could not be written to the run log: nothing more is claimed, and the
    /// execution returns the error instead of a summary.
    log_lost: Mutex<Option<LogSinkError>>,
    stats: Arc<Stats>,
    /// The run's log: one writer for every worker, each story a prefix of its own.
    log: LogSink,
    /// Stories this process may try to claim, shared by its workers.
    candidates: tokio::sync::Mutex<Candidates>,
    /// How many stories of each epic this process's workers hold (claimed, not yet recorded).
    held_per_epic: Mutex<HashMap<Uuid, usize>>,
}

/// A story of `epic` held by a worker of this process, counted in `held_per_epic` until
/// [`Held::release`] or drop.
struct Held<'a> {
    execution: &'a Execution,
    epic: Uuid,
    counted: bool,
}

impl Held<'_> {
    /// Stops counting this story; true when other workers of this process still hold stories
    /// of its epic. Called after the story's result committed: then the last of them to
    /// release sees every other's result, so only it needs to look whether the epic is done.
    fn release(mut self) -> bool {
        self.uncount()
    }

    fn uncount(&mut self) -> bool {
        if !std::mem::replace(&mut self.counted, false) {
            return false;
        }
        let Ok(mut held) = self.execution.held_per_epic.lock() else {
            return false;
        };
        let left = match held.get_mut(&self.epic) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            held.remove(&self.epic);
        }
        left > 0
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.uncount();
    }
}

/// This process's queue of stories to try to claim.
#[derive(Default)]
struct Candidates {
    queue: VecDeque<run_story::Model>,
    /// When running stories were last looked at for expired leases.
    last_expiry_check: Option<Instant>,
}

impl Executor {
    /// An executor over `db` that runs stories with `handler`.
    pub fn new(
        db: DatabaseConnection,
        handler: impl StoryHandler + 'static,
        config: ExecutorConfig,
    ) -> Executor {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Executor {
            inner: Arc::new(Inner {
                db,
                handler: Arc::new(handler),
                config,
                events,
            }),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &ExecutorConfig {
        &self.inner.config
    }

    /// Events from now on (a subscriber that falls more than 4096 behind misses some).
    pub fn subscribe(&self) -> broadcast::Receiver<ExecutorEvent> {
        self.inner.events.subscribe()
    }

    /// Executes the run until no story of it is pending or running, then finishes its epics
    /// and the run, and returns a summary.
    pub async fn execute(&self, run_id: Uuid) -> Result<Summary, EngineError> {
        self.execute_until(run_id, &Shutdown::new()).await
    }

    /// Like [`Executor::execute`], stopping early as `shutdown` asks.
    pub async fn execute_until(
        &self,
        run_id: Uuid,
        shutdown: &Shutdown,
    ) -> Result<Summary, EngineError> {
        let started = Instant::now();
        let db = &self.inner.db;
        let stats = Arc::new(Stats::default());
        let run = self
            .retrying(&stats, "reading the run", || {
                run::Entity::find_by_id(run_id).one(db)
            })
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        let status = RunStatus::parse(&run.status).ok_or_else(|| EngineError::UnknownStatus {
            entity: "run",
            id: run_id,
            found: run.status.clone(),
        })?;
        let epic_keys = self
            .retrying(&stats, "reading the run's epics", || {
                run_epic::Entity::find()
                    .filter(run_epic::Column::RunId.eq(run_id))
                    .all(db)
            })
            .await?
            .into_iter()
            .map(|e| (e.id, e.key))
            .collect();
        let (status_tx, status_rx) = watch::channel(status);
        let execution = Arc::new(Execution {
            inner: self.inner.clone(),
            run_id,
            epic_keys,
            run_status: status_rx,
            shutdown: shutdown.clone(),
            started_epics: Mutex::new(HashSet::new()),
            run_started: AtomicBool::new(status != RunStatus::Pending),
            worker_failed: AtomicBool::new(false),
            log_lost: Mutex::new(None),
            stats: stats.clone(),
            log: LogSink::start_with_retry(db.clone(), run_id, "", self.inner.config.budget()),
            candidates: tokio::sync::Mutex::new(Candidates::default()),
            held_per_epic: Mutex::new(HashMap::new()),
        });

        let mut first_error = None;
        if !status.is_terminal() {
            let watcher = AbortOnDrop(tokio::spawn(watch_run(db.clone(), run_id, status_tx)));
            // Dropping this future (a caller's timeout) stops the workers and their handlers;
            // the stories they held are taken over once their leases expire.
            let mut workers: Vec<_> = (0..self.inner.config.workers)
                .map(|n| {
                    let execution = execution.clone();
                    AbortOnDrop(tokio::spawn(async move { execution.work(n).await }))
                })
                .collect();
            for (n, worker) in workers.iter_mut().enumerate() {
                let result = match (&mut worker.0).await {
                    Ok(r) => r,
                    Err(e) => Err(EngineError::WorkerAborted {
                        worker: execution.worker_id(n),
                        reason: e.to_string(),
                    }),
                };
                if let Err(e) = result {
                    // The other workers finish what they hold (see `stop_claiming`).
                    execution.worker_failed.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
            drop(watcher);
        }
        // Lines still queued (the last stories' closing lines) go in before the run is settled
        // and before this returns, so nothing of this execution is written after it.
        if let Err(e) = execution.log.flush().await {
            execution.log_lost(e);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // Lines that could not be written fail the execution loudly: the run is not settled
        // by a process whose log lost lines (their stories were given back, not recorded).
        if let Some(lost) = execution.log_lost.lock().ok().and_then(|mut l| l.take()) {
            return Err(EngineError::LogLost(lost));
        }

        let current = self
            .retrying(&stats, "reading the run", || {
                run::Entity::find_by_id(run_id).one(db)
            })
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        if current.status == RunStatus::Cancelled.as_str() {
            self.retrying(&stats, "cancelling what is left of the run", || {
                cancel_leftovers(db, run_id, Utc::now())
            })
            .await?;
        }
        let run = self
            .retrying(&stats, "settling the run", || settle_run(db, run_id))
            .await?;
        let counts = self
            .retrying(&stats, "counting the run's stories", || {
                StoryCounts::of_run(db, run_id)
            })
            .await?;
        Ok(Summary {
            run_id,
            run_status: run.status,
            counts,
            recorded: stats.recorded.load(Ordering::Relaxed),
            fenced: stats.fenced.load(Ordering::Relaxed),
            given_back: stats.given_back.load(Ordering::Relaxed),
            retried: stats.retried.load(Ordering::Relaxed),
            recognised: stats.recognised.load(Ordering::Relaxed),
            interrupted: shutdown.level() != ShutdownLevel::Running && counts.unfinished() > 0,
            elapsed: started.elapsed(),
        })
    }
}

impl Executor {
    /// `op` through transient failures, within the retry budget; each retry counted and warned
    /// about.
    async fn retrying<T, E, F, Fut>(&self, stats: &Stats, what: &str, op: F) -> Result<T, E>
    where
        E: TransientDb + fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        retry_transient(self.inner.config.budget(), op, |e| {
            stats.retried.fetch_add(1, Ordering::Relaxed);
            let _ = self.inner.events.send(ExecutorEvent::Warning {
                message: format!("{what} failed, trying again: {e}"),
            });
        })
        .await
        .0
    }
}

/// Publishes the run's status as read every [`RUN_WATCH_EVERY`], so workers notice a
/// cancellation without asking the database themselves.
async fn watch_run(db: DatabaseConnection, run_id: Uuid, tx: watch::Sender<RunStatus>) {
    let mut tick = tokio::time::interval(RUN_WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A failed read is tried again at the next tick.
        if let Ok(Some(run)) = run::Entity::find_by_id(run_id).one(&db).await
            && let Some(status) = RunStatus::parse(&run.status)
        {
            tx.send_if_modified(|current| {
                let changed = *current != status;
                *current = status;
                changed
            });
        }
    }
}

impl Execution {
    fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    fn config(&self) -> &ExecutorConfig {
        &self.inner.config
    }

    fn worker_id(&self, n: usize) -> String {
        format!("{}-{n}", self.config().worker_prefix)
    }

    fn emit(&self, event: ExecutorEvent) {
        // No subscriber is fine.
        let _ = self.inner.events.send(event);
    }

    fn warn(&self, message: String) {
        self.emit(ExecutorEvent::Warning { message });
    }

    fn story_ref(&self, story: &run_story::Model) -> StoryRef {
        StoryRef {
            id: story.id,
            epic: self
                .epic_keys
                .get(&story.epic_id)
                .cloned()
                .unwrap_or_else(|| story.epic_id.to_string()),
            key: story.key.clone(),
        }
    }

    fn stop_claiming(&self) -> bool {
        self.shutdown.level() != ShutdownLevel::Running
            || self.run_status.borrow().is_terminal()
            || self.worker_failed.load(Ordering::Relaxed)
            || self.log_lost.lock().map_or(true, |lost| lost.is_some())
    }

    /// `op` through transient failures, within the retry budget; each retry counted and warned
    /// about. Returns the result and how many tries failed before it.
    async fn retrying<T, E, F, Fut>(&self, what: &str, op: F) -> (Result<T, E>, u32)
    where
        E: TransientDb + fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        retry_transient(self.config().budget(), op, |e| {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            self.warn(format!("{what} failed, trying again: {e}"));
        })
        .await
    }

    /// Appends one run-level line (not about one story) and waits until it is written.
    async fn log_run_line(&self, line: String) {
        self.log.line(line).await;
        if let Err(e) = self.log.flush().await {
            self.log_lost(e);
        }
    }

    /// One worker's loop; see the module docs.
    async fn work(self: Arc<Self>, n: usize) -> Result<(), EngineError> {
        let lease = Lease::new(self.worker_id(n), self.config().lease);
        let mut failures = 0u32;
        let mut failing_since: Option<Instant> = None;
        let mut shutdown = self.shutdown.subscribe();
        let mut run_status = self.run_status.clone();
        loop {
            if self.stop_claiming() {
                return Ok(());
            }
            let step = match self.claim_next(&lease).await {
                Ok(Step::Idle) => match self.has_unfinished().await {
                    Ok(false) => return Ok(()),
                    Ok(true) => Ok(Step::Idle),
                    Err(e) => Err(e),
                },
                other => other,
            };
            if step.is_ok() {
                failures = 0;
                failing_since = None;
            }
            match step {
                Ok(Step::Claimed(claim)) => {
                    self.run_story(*claim, &lease).await;
                }
                Ok(Step::Contended) => {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=5))).await;
                }
                Ok(Step::Idle) => {
                    // Jitter, so that idle workers of many processes do not poll in step.
                    let poll = self.config().poll_interval;
                    let wait = poll.mul_f64(0.5 + fastrand::f64());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                        _ = run_status.changed() => {}
                    }
                }
                Err(e) => {
                    failures += 1;
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    // Transient database failures: for as long as the budget allows (a server
                    // restart); conflicts: a few times; anything else: not at all.
                    let again = if e.is_transient_db() {
                        self.config()
                            .budget()
                            .is_some_and(|budget| since.elapsed() < budget)
                    } else {
                        e.is_conflict() && failures < MAX_CONSECUTIVE_FAILURES
                    };
                    if !again {
                        self.worker_failed.store(true, Ordering::Relaxed);
                        return Err(EngineError::WorkerGaveUp {
                            worker: lease.owner.clone(),
                            failures,
                            last: Box::new(e),
                        });
                    }
                    if e.is_transient_db() {
                        self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    }
                    self.warn(format!(
                        "worker {} will try again after an error: {e}",
                        lease.owner
                    ));
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    async fn has_unfinished(&self) -> Result<bool, EngineError> {
        let n = run_story::Entity::find()
            .filter(run_story::Column::RunId.eq(self.run_id))
            .filter(
                run_story::Column::Status
                    .is_in([StoryStatus::Pending.as_str(), StoryStatus::Running.as_str()]),
            )
            .count(self.db())
            .await?;
        Ok(n > 0)
    }

    async fn claim_next(&self, lease: &Lease) -> Result<Step, EngineError> {
        let db = self.db();
        let window = self.config().candidate_window.max(1);
        // Bounded, so that a worker meeting only candidates others took first backs off.
        for _ in 0..window {
            if self.stop_claiming() {
                return Ok(Step::Idle);
            }
            let Some(candidate) = self.next_candidate(window).await? else {
                return Ok(Step::Idle);
            };
            match try_claim(db, &candidate, lease, Utc::now()).await {
                Ok(TryClaim::Claimed(claim)) => return Ok(Step::Claimed(Box::new(claim))),
                Ok(TryClaim::Exhausted(story)) => self.on_exhausted(story).await,
                Ok(TryClaim::Lost) => {}
                Err(e) if e.is_transient_db() => {
                    return match self.recognise_claim(&candidate, lease).await {
                        Some(claim) => Ok(Step::Claimed(Box::new(claim))),
                        None => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Step::Contended)
    }

    /// The next story to try, from this process's queue, refilled from the database when
    /// empty (and with expired leases every [`EXPIRY_CHECK_EVERY`]); `None` when nothing is
    /// claimable now. One worker refills while the others wait for it rather than all reading
    /// the same rows.
    async fn next_candidate(&self, window: u64) -> Result<Option<run_story::Model>, EngineError> {
        let db = self.db();
        let mut candidates = self.candidates.lock().await;
        let due = candidates
            .last_expiry_check
            .is_none_or(|t| t.elapsed() >= EXPIRY_CHECK_EVERY);
        if candidates.queue.is_empty() || due {
            let mut fresh = if candidates.queue.is_empty() {
                pending_candidates(db, self.run_id, window).await?
            } else {
                Vec::new()
            };
            if fresh.is_empty() || due {
                candidates.last_expiry_check = Some(Instant::now());
                let limit = usize::try_from(window).unwrap_or(usize::MAX);
                fresh.extend(expired_leases(db, self.run_id, Utc::now(), limit).await?);
            }
            // Shuffled, so that the workers of other processes, reading the same window, do
            // not try the same stories in the same order.
            fastrand::shuffle(&mut fresh);
            candidates.queue.extend(fresh);
        }
        Ok(candidates.queue.pop_front())
    }

    /// A claim of `candidate` failed transiently: it may have committed with its answer lost.
    /// Then the story is ours and nobody else may claim it before the lease runs out; letting it
    /// expire would cost an attempt (and fail a story on its last one). Look.
    async fn recognise_claim(&self, candidate: &run_story::Model, lease: &Lease) -> Option<Claim> {
        let (now, _) = self
            .retrying("re-reading a story after a failed claim", || {
                run_story::Entity::find_versioned(self.db(), candidate.id)
            })
            .await;
        let now = now.ok()?;
        if !claimed_by(&now, candidate, &lease.owner) {
            return None;
        }
        self.stats.recognised.fetch_add(1, Ordering::Relaxed);
        let taken_over_from = if candidate.status == StoryStatus::Running.as_str() {
            candidate.lease_owner.clone()
        } else {
            None
        };
        Some(Claim {
            story: now,
            taken_over_from,
        })
    }

    /// A story whose worker died on its last attempt was marked failed.
    async fn on_exhausted(&self, story: run_story::Model) {
        let sref = self.story_ref(&story);
        let error = story.error.clone().unwrap_or_default();
        self.log_run_line(format!("[{sref}] failed: {error}")).await;
        self.emit(ExecutorEvent::Finished {
            story: sref,
            status: StoryStatus::Failed,
            attempt: story.attempts,
            max_attempts: story.max_attempts,
            elapsed: Duration::ZERO,
            error: story.error.clone(),
            worker: String::new(),
        });
        self.after_story_finished(&story).await;
    }

    /// Moves the run and the story's epic to running; false when the run is cancelled or
    /// already finished, so the story must not run.
    async fn ensure_started(&self, story: &run_story::Model) -> Result<bool, EngineError> {
        if !self.run_started.load(Ordering::Relaxed) {
            // Starting is idempotent (it re-reads, and does nothing to a started run).
            let (run, _) = self
                .retrying("starting the run", || start_run(self.db(), self.run_id))
                .await;
            let run = run?;
            if run.status != RunStatus::Running.as_str() {
                return Ok(false);
            }
            self.run_started.store(true, Ordering::Relaxed);
        } else if self.run_status.borrow().is_terminal() {
            return Ok(false);
        }
        let known = self
            .started_epics
            .lock()
            .map(|s| s.contains(&story.epic_id))
            .unwrap_or(false);
        if !known {
            let (epic, _) = self
                .retrying("starting an epic", || start_epic(self.db(), story.epic_id))
                .await;
            epic?;
            if let Ok(mut s) = self.started_epics.lock() {
                s.insert(story.epic_id);
            }
        }
        Ok(true)
    }

    /// Runs one claimed story to the end and records its result.
    async fn run_story(&self, claim: Claim, lease: &Lease) {
        let story = claim.story;
        let sref = self.story_ref(&story);
        let log = self.log.with_prefix(format!("[{sref}] "));
        let worker = lease.owner.clone();
        let held = self.hold(story.epic_id);

        let may_run = match self.ensure_started(&story).await {
            Ok(may_run) => may_run,
            Err(e) => {
                // The story still runs; settle_run puts the epic and run right later.
                self.warn(format!("could not mark {sref}'s epic and run started: {e}"));
                true
            }
        };
        if !may_run {
            let ending = Ending::Done {
                outcome: None,
                stop: Some(Stop::RunCancelled),
            };
            let finished = self
                .record(&sref, &log, story, lease, ending, Duration::ZERO)
                .await;
            self.after_recorded(finished, held).await;
            return;
        }

        match &claim.taken_over_from {
            Some(previous) => {
                log.line(format!(
                    "took over from the expired lease of {previous}: attempt {} of {} on {worker}",
                    story.attempts, story.max_attempts
                ))
                .await
            }
            None => {
                log.line(format!(
                    "started: attempt {} of {} on {worker}",
                    story.attempts, story.max_attempts
                ))
                .await
            }
        }
        self.emit(ExecutorEvent::Started {
            story: sref.clone(),
            attempt: story.attempts,
            max_attempts: story.max_attempts,
            worker: worker.clone(),
            taken_over_from: claim.taken_over_from.clone(),
        });

        let started = Instant::now();
        let (cancel_handle, cancel) = Cancellation::new();
        let ctx = StoryContext {
            story: story.clone(),
            epic_key: sref.epic.clone(),
            attempt: story.attempts,
            worker_id: worker.clone(),
            log: log.clone(),
            cancel,
        };
        let (ending, last) = self.supervise(ctx, cancel_handle, story, lease).await;
        let elapsed = started.elapsed();
        let finished = self.record(&sref, &log, last, lease, ending, elapsed).await;
        self.after_recorded(finished, held).await;
    }

    /// Counts a story of `epic` as held by this process.
    fn hold(&self, epic: Uuid) -> Held<'_> {
        let counted = match self.held_per_epic.lock() {
            Ok(mut held) => {
                *held.entry(epic).or_default() += 1;
                true
            }
            Err(_) => false,
        };
        Held {
            execution: self,
            epic,
            counted,
        }
    }

    /// A story's result is recorded (`finished`: it reached a terminal status): finish its
    /// epic and the run if they are done, unless another worker of this process still holds a
    /// story of the epic (it looks when it is done).
    async fn after_recorded(&self, finished: Option<run_story::Model>, held: Held<'_>) {
        let others_hold_the_epic = held.release();
        if let Some(story) = finished
            && !others_hold_the_epic
        {
            self.after_story_finished(&story).await;
        }
    }

    /// When this worker must stop the handler if no renewal gets through: a tenth of the lease
    /// before `held`'s lease runs out (by this process's clock, which wrote it), as clocks and
    /// the time a statement takes eat into it.
    fn lease_deadline(&self, held: &run_story::Model, lease: &Lease) -> Instant {
        let left = held
            .lease_expires_at
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        Instant::now() + left.saturating_sub(lease.duration / 10)
    }

    /// Runs the handler while renewing the lease; stops it when the lease is lost (or cannot be
    /// renewed in time), the run is cancelled, or the process gives its leases back. Returns how
    /// it ended and the story as this worker last wrote it.
    async fn supervise(
        &self,
        ctx: StoryContext,
        cancel: CancelHandle,
        mut held: run_story::Model,
        lease: &Lease,
    ) -> (Ending, run_story::Model) {
        let handler = self.inner.handler.clone();
        let mut task = AbortOnDrop(tokio::spawn(async move { handler.run(ctx).await }));
        let renew_every = self.config().renew_every;
        let grace = self.config().cancel_grace;
        let mut next_renewal = Instant::now() + renew_every;
        // A renewal runs beside the handler and the other signals, so that one stuck on a
        // database that is down cannot keep this loop from stopping the handler in time.
        let mut renewal: Option<RenewalFuture> = None;
        let mut renew_failures = 0u32;
        let mut lease_deadline = self.lease_deadline(&held, lease);
        let mut shutdown = self.shutdown.subscribe();
        let mut run_status = self.run_status.clone();
        let mut shutdown_open = true;
        let mut status_open = true;
        let mut stop: Option<Stop> = None;
        let mut fenced: Option<String> = None;
        let mut grace_until: Option<Instant> = None;

        let stop_now = |why: Stop, stop: &mut Option<Stop>, until: &mut Option<Instant>| {
            if stop.is_none() {
                *stop = Some(why);
                *until = Some(Instant::now() + grace);
                cancel.cancel();
            }
        };
        if *self.run_status.borrow() == RunStatus::Cancelled {
            stop_now(Stop::RunCancelled, &mut stop, &mut grace_until);
        }
        if self.shutdown.level() == ShutdownLevel::GiveBack {
            stop_now(Stop::GiveBack, &mut stop, &mut grace_until);
        }

        loop {
            let far = Instant::now() + Duration::from_secs(86_400);
            let renewing = renewal.is_some();
            tokio::select! {
                joined = &mut task.0 => {
                    let outcome = joined.unwrap_or_else(|e| StoryOutcome::Failed {
                        error: format!("the story handler panicked: {e}"),
                    });
                    // A renewal still in flight is dropped: if it commits, the release meets
                    // it as a conflict and recognises it (see `record`).
                    return match fenced {
                        Some(detail) => (Ending::Fenced { detail }, held),
                        None => (Ending::Done { outcome: Some(outcome), stop }, held),
                    };
                }
                _ = tokio::time::sleep_until(next_renewal), if !renewing && fenced.is_none() => {
                    let (db, story, lease) = (self.db().clone(), held.clone(), lease.clone());
                    // Spawned, not merely polled here: a renewal this loop stops waiting for
                    // still runs to its end, so no statement (on MariaDB, no transaction) is
                    // ever cut off halfway and its connection handed back mid-transaction.
                    let task = tokio::spawn(async move { renew(&db, &story, &lease).await });
                    renewal = Some(Box::pin(async move {
                        task.await.unwrap_or_else(|e| {
                            Renewal::Failed(ConcurrencyError::Database(sea_orm::DbErr::Custom(
                                format!("the lease renewal task ended abnormally: {e}"),
                            )))
                        })
                    }));
                }
                renewed = async {
                    match renewal.as_mut() {
                        Some(r) => r.await,
                        None => std::future::pending().await,
                    }
                }, if renewing => {
                    renewal = None;
                    match renewed {
                        Renewal::Renewed { story, recognised } => {
                            held = *story;
                            lease_deadline = self.lease_deadline(&held, lease);
                            renew_failures = 0;
                            next_renewal = if recognised {
                                // The lease written is an earlier try's: push it on at once.
                                self.stats.recognised.fetch_add(1, Ordering::Relaxed);
                                Instant::now()
                            } else {
                                Instant::now() + renew_every
                            };
                        }
                        Renewal::Lost(detail) => {
                            // SAFETY(fencing): someone else changed the story since our last
                            // write (took it over after our lease expired): stop, record
                            // nothing.
                            fenced = Some(detail);
                            grace_until = Some(Instant::now() + grace);
                            cancel.cancel();
                        }
                        Renewal::Failed(e) => {
                            renew_failures += 1;
                            let soon = e.is_transient_db() && self.config().retry_transient;
                            next_renewal = if soon {
                                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                                Instant::now() + backoff(renew_failures).min(renew_every)
                            } else {
                                Instant::now() + renew_every
                            };
                            self.warn(format!(
                                "{} could not renew its lease on {}: {e}",
                                lease.owner, held.key
                            ));
                        }
                    }
                }
                _ = tokio::time::sleep_until(lease_deadline), if stop.is_none() && fenced.is_none() => {
                    // SAFETY(fencing): no renewal got through for nearly a whole lease; once it
                    // runs out another worker may take the story over, and two must never run
                    // it at once. Stop the handler; `record` writes only from the version this
                    // worker holds, so nothing is recorded if someone took the story over.
                    self.warn(format!(
                        "{} could not renew its lease on {} in time; stopping it",
                        lease.owner, held.key
                    ));
                    stop_now(Stop::LeaseRunOut, &mut stop, &mut grace_until);
                }
                changed = run_status.changed(), if status_open && stop.is_none() && fenced.is_none() => {
                    match changed {
                        Err(_) => status_open = false,
                        Ok(()) => if *run_status.borrow_and_update() == RunStatus::Cancelled {
                            stop_now(Stop::RunCancelled, &mut stop, &mut grace_until);
                        }
                    }
                }
                changed = shutdown.changed(), if shutdown_open && stop.is_none() && fenced.is_none() => {
                    match changed {
                        Err(_) => shutdown_open = false,
                        Ok(()) => if *shutdown.borrow_and_update() == ShutdownLevel::GiveBack {
                            stop_now(Stop::GiveBack, &mut stop, &mut grace_until);
                        }
                    }
                }
                _ = tokio::time::sleep_until(grace_until.unwrap_or(far)), if grace_until.is_some() => {
                    // The handler did not stop in time: dropping the task aborts it.
                    return match fenced {
                        Some(detail) => (Ending::Fenced { detail }, held),
                        None => (Ending::Done { outcome: None, stop }, held),
                    };
                }
            }
        }
    }

    /// Records how the attempt ended, from the version of the last renewal. Returns the story
    /// when it reached a terminal status.
    async fn record(
        &self,
        sref: &StoryRef,
        log: &LogSink,
        mut held: run_story::Model,
        lease: &Lease,
        ending: Ending,
        elapsed: Duration,
    ) -> Option<run_story::Model> {
        let worker = &lease.owner;
        let (outcome, stop) = match ending {
            Ending::Fenced { detail } => {
                self.fenced(sref, log, worker, &detail).await;
                return None;
            }
            Ending::Done { outcome, stop } => (outcome, stop),
        };
        let how = match (stop, outcome) {
            // A completion stands even when the lease ran out meanwhile: the release is a
            // compare-and-swap from the version this worker holds, so it is recorded only if
            // nobody took the story over (and so nobody else ran it).
            (_, Some(StoryOutcome::Completed)) => Some(Release::Completed),
            (Some(Stop::GiveBack | Stop::LeaseRunOut), _) => None,
            (Some(Stop::RunCancelled), _) => Some(Release::Cancelled),
            (None, Some(StoryOutcome::Failed { error })) => Some(Release::Failed { error }),
            (None, Some(StoryOutcome::Cancelled)) => Some(Release::Cancelled),
            (None, None) => Some(Release::Failed {
                error: "the story handler did not stop".to_owned(),
            }),
        };
        // SAFETY(log order): the story's output and the line that tells its result go in
        // before the result is recorded, so that whoever sees the story finished (and then
        // writes its epic's or the run's closing line) has every line of it before its own.
        let took = format!("{:.2}s", elapsed.as_secs_f64());
        log.line(result_line(how.as_ref(), stop, &held, worker, &took))
            .await;
        if let Err(e) = log.flush().await {
            // Nothing is recorded without its lines: the story goes back to pending (or, if
            // the database cannot be reached either, its lease expires) and this execution
            // stops with the error.
            self.log_lost(e);
            let _ = give_back(self.db(), &held).await;
            return None;
        }
        let started = Instant::now();
        let mut failures = 0u32;
        let mut adoptions = 0u32;
        let result = loop {
            let result = match &how {
                Some(how) => release(self.db(), &held, how.clone()).await,
                None => give_back(self.db(), &held).await,
            };
            match result {
                Err(TransitionError::Concurrency(e))
                    if e.is_transient_db()
                        && self
                            .config()
                            .budget()
                            .is_some_and(|budget| started.elapsed() < budget) =>
                {
                    failures += 1;
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    self.warn(format!("recording {sref} failed, trying again: {e}"));
                    tokio::time::sleep(backoff(failures)).await;
                }
                // SAFETY(lost answer): the version moved on. Either a try before this one
                // committed with its answer lost, or a renewal of ours did (one dropped in
                // flight when the handler ended), or another worker took the story over:
                // re-read and tell which.
                Err(TransitionError::Concurrency(ConcurrencyError::Conflict {
                    entity,
                    id,
                    expected,
                    actual,
                })) => {
                    let (now, _) = self
                        .retrying("re-reading a story after a conflict", || {
                            run_story::Entity::find_versioned(self.db(), held.id)
                        })
                        .await;
                    match now {
                        Ok(now) if released_by(&now, &held, how.as_ref(), worker) => {
                            self.stats.recognised.fetch_add(1, Ordering::Relaxed);
                            break Ok(now);
                        }
                        Ok(now) if adoptions < MAX_ADOPTIONS && still_held(&now, &held, worker) => {
                            self.stats.recognised.fetch_add(1, Ordering::Relaxed);
                            adoptions += 1;
                            held = now;
                        }
                        Ok(_) => {
                            break Err(TransitionError::Concurrency(ConcurrencyError::Conflict {
                                entity,
                                id,
                                expected,
                                actual,
                            }));
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
                other => break other,
            }
        };
        let story = match result {
            Ok(story) => story,
            Err(
                e @ (TransitionError::Illegal { .. }
                | TransitionError::Concurrency(
                    ConcurrencyError::Conflict { .. } | ConcurrencyError::NotFound { .. },
                )),
            ) => {
                self.fenced(sref, log, worker, &e.to_string()).await;
                return None;
            }
            Err(e) => {
                self.warn(format!(
                    "could not record the result of {sref}: {e}; its lease will expire and it will run again"
                ));
                return None;
            }
        };
        let status = StoryStatus::parse(&story.status).unwrap_or(StoryStatus::Pending);
        let attempt = held.attempts;
        if how.is_none() {
            self.stats.given_back.fetch_add(1, Ordering::Relaxed);
            self.emit(ExecutorEvent::GaveBack {
                story: sref.clone(),
                worker: worker.clone(),
            });
        } else {
            self.stats.recorded.fetch_add(1, Ordering::Relaxed);
            self.emit(ExecutorEvent::Finished {
                story: sref.clone(),
                status,
                attempt,
                max_attempts: story.max_attempts,
                elapsed,
                error: story.error.clone(),
                worker: worker.clone(),
            });
        }
        status.is_terminal().then_some(story)
    }

    /// Remembers that lines could not be written: this execution claims nothing more and
    /// returns the error.
    fn log_lost(&self, error: LogSinkError) {
        self.warn(error.to_string());
        if let Ok(mut lost) = self.log_lost.lock() {
            lost.get_or_insert(error);
        }
    }

    async fn fenced(&self, sref: &StoryRef, log: &LogSink, worker: &str, detail: &str) {
        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
        log.line(format!(
            "fenced off: {worker} lost its lease (another worker took the story over: {detail}); its result was not recorded"
        ))
        .await;
        if let Err(e) = log.flush().await {
            self.log_lost(e);
        }
        self.emit(ExecutorEvent::Fenced {
            story: sref.clone(),
            worker: worker.to_owned(),
        });
    }

    /// A story reached a terminal status: finish its epic, then the run, if they are done.
    async fn after_story_finished(&self, story: &run_story::Model) {
        let db = self.db();
        // Most stories leave others of their epic unfinished: one indexed look settles that.
        // SAFETY(visibility): read after this story's result committed, in a statement of its
        // own, as `finish_epic_if_done` reads its counts: of two workers finishing the last two
        // stories, at least the later one sees both finished.
        let (unfinished, _) = self
            .retrying("looking at an epic's stories", || {
                epic_has_unfinished(db, story.epic_id)
            })
            .await;
        if let Ok(true) = unfinished {
            return;
        }
        // The epic may be finishing: the lines of its stories go in before it is.
        if let Err(e) = self.log.flush().await {
            self.warn(e.to_string());
        }
        let (finished, failed_tries) = self
            .retrying("finishing an epic", || {
                finish_epic_if_done(db, story.epic_id)
            })
            .await;
        let epic = match finished {
            Ok(Some(epic)) => epic,
            Ok(None) if failed_tries == 0 => return,
            // A try that failed may have finished the epic, its answer lost: look. (Should
            // another worker have finished it meanwhile, both write its line: it is written
            // once.)
            Ok(None) => {
                let (epic, _) = self
                    .retrying("reading an epic", || {
                        run_epic::Entity::find_versioned(db, story.epic_id)
                    })
                    .await;
                match epic {
                    Ok(epic)
                        if EpicStatus::parse(&epic.status).is_some_and(|s| s.is_terminal()) =>
                    {
                        epic
                    }
                    _ => return,
                }
            }
            Err(e) => {
                self.warn(format!("could not finish the epic of {}: {e}", story.key));
                return;
            }
        };
        self.emit(ExecutorEvent::EpicFinished {
            key: epic.key.clone(),
            status: epic.status.clone(),
        });
        let (finished, failed_tries) = self
            .retrying("finishing the run", || finish_run_if_done(db, self.run_id))
            .await;
        let run = match finished {
            Ok(Some(run)) => run,
            Ok(None) if failed_tries == 0 => return,
            Ok(None) => {
                let (run, _) = self
                    .retrying("reading the run", || {
                        run::Entity::find_versioned(db, self.run_id)
                    })
                    .await;
                match run {
                    Ok(run) if RunStatus::parse(&run.status).is_some_and(|s| s.is_terminal()) => {
                        run
                    }
                    _ => return,
                }
            }
            Err(e) => {
                self.warn(format!("could not finish the run: {e}"));
                return;
            }
        };
        self.emit(ExecutorEvent::RunFinished { status: run.status });
    }
}

/// Pushes the lease of `held` on, recognising a renewal of ours whose answer was lost.
async fn renew(db: &DatabaseConnection, held: &run_story::Model, lease: &Lease) -> Renewal {
    match renew_lease(db, held, lease, Utc::now()).await {
        Ok(story) => Renewal::Renewed {
            story: Box::new(story),
            recognised: false,
        },
        Err(conflict @ ConcurrencyError::Conflict { .. }) => {
            // SAFETY(lost answer): an earlier renewal whose answer was lost may have committed;
            // then the story is still ours, a version on. Anything else: taken over.
            match run_story::Entity::find_versioned(db, held.id).await {
                Ok(now) if still_held(&now, held, &lease.owner) => Renewal::Renewed {
                    story: Box::new(now),
                    recognised: true,
                },
                Ok(_) | Err(ConcurrencyError::NotFound { .. }) => {
                    Renewal::Lost(conflict.to_string())
                }
                Err(e) => Renewal::Failed(e),
            }
        }
        Err(e @ ConcurrencyError::NotFound { .. }) => Renewal::Lost(e.to_string()),
        Err(e) => Renewal::Failed(e),
    }
}

/// The line that tells how an attempt ended, written before its result is recorded: `how` is
/// the release (`None`: the lease is given back), `stop` why the handler was stopped, `held` the
/// story as this worker holds it.
fn result_line(
    how: Option<&Release>,
    stop: Option<Stop>,
    held: &run_story::Model,
    worker: &str,
    took: &str,
) -> String {
    let attempt = held.attempts;
    let max = held.max_attempts;
    match how {
        None if stop == Some(Stop::LeaseRunOut) => format!(
            "stopped: {worker} could not renew its lease in time; lease given back, attempt {attempt} not counted"
        ),
        None => format!(
            "stopped on shutdown; lease given back by {worker}, attempt {attempt} not counted"
        ),
        Some(release) => match (release.target(held), release) {
            (StoryStatus::Completed, _) => format!("completed in {took} by {worker}"),
            (StoryStatus::Pending, Release::Failed { error }) => format!(
                "attempt {attempt} of {max} failed after {took} on {worker}: {error}; will retry"
            ),
            (StoryStatus::Failed, Release::Failed { error }) => {
                format!("failed after {took} on {worker}, attempt {attempt} of {max}: {error}")
            }
            (StoryStatus::Cancelled, _) => format!("cancelled on {worker}"),
            (other, _) => format!("{other} on {worker}"),
        },
    }
}

//! The executor: N worker tasks in this process that claim a run's stories, run them with a
//! [`StoryHandler`], and record the results; any number of processes may execute one run at
//! once.
//!
//! Each worker loops:
//!
//! 1. stop if the process is shutting down or the run was cancelled;
//! 2. read up to 64 pending stories of the run in position order (and, about once a second,
//!    the running ones whose lease expired), shuffle them, and try to claim each in turn by
//!    compare-and-swap until one succeeds ([`try_claim`]): workers that read the same stories
//!    spread over them instead of all fighting for the first;
//! 3. nothing to claim: stop if no story of the run is pending or running, else wait a moment
//!    (stories held by other workers may finish, fail back to pending, or lose their lease);
//! 4. run the story's handler while renewing its lease; record the result from the version of
//!    the last renewal; finish the epic and the run when their stories are all done.
//!
//! A worker that loses its lease (its renewal or its release conflicts) is fenced off: it stops
//! its handler and records nothing. See [`crate::lease`].

use crate::cancel::cancel_leftovers;
use crate::error::EngineError;
use crate::finish::{finish_epic_if_done, finish_run_if_done, settle_run, start_epic, start_run};
use crate::handler::{CancelHandle, Cancellation, StoryContext, StoryHandler, StoryOutcome};
use crate::lease::{
    Claim, Lease, Release, TryClaim, expired_leases, give_back, pending_candidates, release,
    renew_lease, try_claim,
};
use crate::log_sink::LogSink;
use crate::status::StoryCounts;
use chrono::Utc;
use entity::{run, run_epic, run_story};
use run_domain::{
    ConcurrencyError, Lifecycle, RunStatus, StoryStatus, TransitionError, VersionedUpdate,
    append_run_logs,
};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use std::collections::{HashMap, HashSet};
use std::fmt;
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
/// Consecutive errors after which a worker stops.
const MAX_CONSECUTIVE_FAILURES: u32 = 10;
/// How often a result is tried after database errors (not conflicts).
const RELEASE_TRIES: u32 = 4;
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
    /// How many pending stories a worker reads to choose from.
    pub candidate_window: u64,
    /// How long a handler has to stop after it is cancelled before it is dropped.
    pub cancel_grace: Duration,
    /// Worker ids are `<worker_prefix>-<n>`; by default `<hostname>-<pid>`.
    pub worker_prefix: String,
}

impl Default for ExecutorConfig {
    /// 4 workers, 30 s leases renewed every 10 s, 250 ms polls, 64 candidates, 10 s grace.
    fn default() -> Self {
        ExecutorConfig {
            workers: 4,
            lease: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            candidate_window: 64,
            cancel_grace: Duration::from_secs(10),
            worker_prefix: default_worker_prefix(),
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
    /// Stories this executor gave back on shutdown.
    pub given_back: u64,
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
        write!(f, " of {} in {:.1}s", c.total(), self.elapsed.as_secs_f64())
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
}

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
    stats: Stats,
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
        let run = run::Entity::find_by_id(run_id)
            .one(db)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        let status = RunStatus::parse(&run.status).ok_or_else(|| EngineError::UnknownStatus {
            entity: "run",
            id: run_id,
            found: run.status.clone(),
        })?;
        let epic_keys = run_epic::Entity::find()
            .filter(run_epic::Column::RunId.eq(run_id))
            .all(db)
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
            stats: Stats::default(),
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
        if let Some(e) = first_error {
            return Err(e);
        }

        let current = run::Entity::find_by_id(run_id)
            .one(db)
            .await?
            .ok_or(EngineError::RunNotFound(run_id))?;
        if current.status == RunStatus::Cancelled.as_str() {
            cancel_leftovers(db, run_id, Utc::now()).await?;
        }
        let run = settle_run(db, run_id).await?;
        let counts = StoryCounts::of_run(db, run_id).await?;
        let stats = &execution.stats;
        Ok(Summary {
            run_id,
            run_status: run.status,
            counts,
            recorded: stats.recorded.load(Ordering::Relaxed),
            fenced: stats.fenced.load(Ordering::Relaxed),
            given_back: stats.given_back.load(Ordering::Relaxed),
            interrupted: shutdown.level() != ShutdownLevel::Running && counts.unfinished() > 0,
            elapsed: started.elapsed(),
        })
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
    }

    /// Appends one run-level line (not about one story).
    async fn log_run_line(&self, line: String) {
        if let Err(e) = append_run_logs(self.db(), self.run_id, [line.as_str()]).await {
            self.warn(format!("could not append to the run log: {e}"));
        }
    }

    /// One worker's loop; see the module docs.
    async fn work(self: Arc<Self>, n: usize) -> Result<(), EngineError> {
        let lease = Lease::new(self.worker_id(n), self.config().lease);
        let mut failures = 0u32;
        let mut last_expiry_check: Option<Instant> = None;
        let mut shutdown = self.shutdown.subscribe();
        let mut run_status = self.run_status.clone();
        loop {
            if self.stop_claiming() {
                return Ok(());
            }
            let step = match self.claim_next(&lease, &mut last_expiry_check).await {
                Ok(Step::Idle) => match self.has_unfinished().await {
                    Ok(false) => return Ok(()),
                    Ok(true) => Ok(Step::Idle),
                    Err(e) => Err(e),
                },
                other => other,
            };
            match step {
                Ok(Step::Claimed(claim)) => {
                    failures = 0;
                    self.run_story(*claim, &lease).await;
                }
                Ok(Step::Contended) => {
                    failures = 0;
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=5))).await;
                }
                Ok(Step::Idle) => {
                    failures = 0;
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
                    if !e.is_transient() || failures >= MAX_CONSECUTIVE_FAILURES {
                        self.worker_failed.store(true, Ordering::Relaxed);
                        return Err(EngineError::WorkerGaveUp {
                            worker: lease.owner.clone(),
                            failures,
                            last: Box::new(e),
                        });
                    }
                    self.warn(format!(
                        "worker {} will try again after an error: {e}",
                        lease.owner
                    ));
                    let backoff = Duration::from_millis(100 * u64::from(failures));
                    tokio::time::sleep(backoff).await;
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

    async fn claim_next(
        &self,
        lease: &Lease,
        last_expiry_check: &mut Option<Instant>,
    ) -> Result<Step, EngineError> {
        let db = self.db();
        let window = self.config().candidate_window.max(1);
        let mut candidates = pending_candidates(db, self.run_id, window).await?;
        let due = last_expiry_check.is_none_or(|t| t.elapsed() >= EXPIRY_CHECK_EVERY);
        if candidates.is_empty() || due {
            *last_expiry_check = Some(Instant::now());
            let limit = usize::try_from(window).unwrap_or(usize::MAX);
            candidates.extend(expired_leases(db, self.run_id, Utc::now(), limit).await?);
        }
        if candidates.is_empty() {
            return Ok(Step::Idle);
        }
        fastrand::shuffle(&mut candidates);
        for candidate in &candidates {
            if self.stop_claiming() {
                return Ok(Step::Idle);
            }
            match try_claim(db, candidate, lease, Utc::now()).await? {
                TryClaim::Claimed(claim) => return Ok(Step::Claimed(Box::new(claim))),
                TryClaim::Exhausted(story) => self.on_exhausted(story).await,
                TryClaim::Lost => {}
            }
        }
        Ok(Step::Contended)
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
            let run = start_run(self.db(), self.run_id).await?;
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
            start_epic(self.db(), story.epic_id).await?;
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
        let log = LogSink::start(self.db().clone(), self.run_id, format!("[{sref}] "));
        let worker = lease.owner.clone();

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
            self.record(&sref, &log, story, lease, ending, Duration::ZERO)
                .await;
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
        let (ending, held) = self.supervise(ctx, cancel_handle, story, lease).await;
        self.record(&sref, &log, held, lease, ending, started.elapsed())
            .await;
    }

    /// Runs the handler while renewing the lease; stops it when the lease is lost, the run is
    /// cancelled, or the process gives its leases back. Returns how it ended and the story as
    /// this worker last wrote it.
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
            tokio::select! {
                joined = &mut task.0 => {
                    let outcome = joined.unwrap_or_else(|e| StoryOutcome::Failed {
                        error: format!("the story handler panicked: {e}"),
                    });
                    return match fenced {
                        Some(detail) => (Ending::Fenced { detail }, held),
                        None => (Ending::Done { outcome: Some(outcome), stop }, held),
                    };
                }
                _ = tokio::time::sleep_until(next_renewal), if fenced.is_none() => {
                    match renew_lease(self.db(), &held, lease, Utc::now()).await {
                        Ok(story) => held = story,
                        Err(e @ (ConcurrencyError::Conflict { .. }
                            | ConcurrencyError::NotFound { .. })) => {
                            // SAFETY(fencing): someone else changed the story since our last
                            // write (took it over after our lease expired): stop, record
                            // nothing.
                            fenced = Some(e.to_string());
                            grace_until = Some(Instant::now() + grace);
                            cancel.cancel();
                        }
                        Err(e) => self.warn(format!(
                            "{} could not renew its lease on {}: {e}",
                            lease.owner, held.key
                        )),
                    }
                    next_renewal = Instant::now() + renew_every;
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

    /// Records how the attempt ended, from the version of the last renewal.
    async fn record(
        &self,
        sref: &StoryRef,
        log: &LogSink,
        held: run_story::Model,
        lease: &Lease,
        ending: Ending,
        elapsed: Duration,
    ) {
        let worker = &lease.owner;
        // The story's output goes in before its result, so that a reader who sees the run
        // finished has seen every line of it.
        if let Err(e) = log.flush().await {
            self.warn(e.to_string());
        }
        let (outcome, stop) = match ending {
            Ending::Fenced { detail } => {
                self.fenced(sref, log, worker, &detail).await;
                return;
            }
            Ending::Done { outcome, stop } => (outcome, stop),
        };
        let how = match (stop, outcome) {
            (_, Some(StoryOutcome::Completed)) => Some(Release::Completed),
            (Some(Stop::GiveBack), _) => None,
            (Some(Stop::RunCancelled), _) => Some(Release::Cancelled),
            (None, Some(StoryOutcome::Failed { error })) => Some(Release::Failed { error }),
            (None, Some(StoryOutcome::Cancelled)) => Some(Release::Cancelled),
            (None, None) => Some(Release::Failed {
                error: "the story handler did not stop".to_owned(),
            }),
        };
        let mut tries = 0;
        let result = loop {
            tries += 1;
            let result = match &how {
                Some(how) => release(self.db(), &held, how.clone()).await,
                None => give_back(self.db(), &held).await,
            };
            match result {
                Err(TransitionError::Concurrency(ConcurrencyError::Database(e)))
                    if tries < RELEASE_TRIES =>
                {
                    self.warn(format!("recording {sref} failed, trying again: {e}"));
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
                }
                // The try before may have committed with its answer lost: then the story is
                // one version on, in the status this worker wrote.
                Err(TransitionError::Concurrency(ConcurrencyError::Conflict {
                    expected,
                    actual,
                    ..
                })) if tries > 1 && actual == expected + 1 => {
                    let target = how
                        .as_ref()
                        .map_or(StoryStatus::Pending, |h| h.target(&held));
                    match run_story::Entity::find_versioned(self.db(), held.id).await {
                        Ok(now) if now.version == actual && now.status == target.as_str() => {
                            break Ok(now);
                        }
                        _ => {
                            break Err(TransitionError::Concurrency(ConcurrencyError::Conflict {
                                entity: "run_story",
                                id: held.id,
                                expected,
                                actual,
                            }));
                        }
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
                return;
            }
            Err(e) => {
                self.warn(format!(
                    "could not record the result of {sref}: {e}; its lease will expire and it will run again"
                ));
                return;
            }
        };
        let status = StoryStatus::parse(&story.status).unwrap_or(StoryStatus::Pending);
        let attempt = held.attempts;
        if how.is_none() {
            self.stats.given_back.fetch_add(1, Ordering::Relaxed);
            log.line(format!(
                "stopped on shutdown; lease given back by {worker}, attempt {attempt} not counted"
            ))
            .await;
            self.emit(ExecutorEvent::GaveBack {
                story: sref.clone(),
                worker: worker.clone(),
            });
        } else {
            self.stats.recorded.fetch_add(1, Ordering::Relaxed);
            let took = format!("{:.2}s", elapsed.as_secs_f64());
            let line = match (status, &story.error) {
                (StoryStatus::Completed, _) => format!("completed in {took} by {worker}"),
                (StoryStatus::Pending, Some(error)) => format!(
                    "attempt {attempt} of {} failed after {took} on {worker}: {error}; will retry",
                    story.max_attempts
                ),
                (StoryStatus::Failed, Some(error)) => format!(
                    "failed after {took} on {worker}, attempt {attempt} of {}: {error}",
                    story.max_attempts
                ),
                (StoryStatus::Cancelled, _) => format!("cancelled on {worker}"),
                (other, _) => format!("{other} on {worker}"),
            };
            log.line(line).await;
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
        if let Err(e) = log.flush().await {
            self.warn(e.to_string());
        }
        if status.is_terminal() {
            self.after_story_finished(&story).await;
        }
    }

    async fn fenced(&self, sref: &StoryRef, log: &LogSink, worker: &str, detail: &str) {
        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
        log.line(format!(
            "fenced off: {worker} lost its lease (another worker took the story over: {detail}); result dropped"
        ))
        .await;
        if let Err(e) = log.flush().await {
            self.warn(e.to_string());
        }
        self.emit(ExecutorEvent::Fenced {
            story: sref.clone(),
            worker: worker.to_owned(),
        });
    }

    /// A story reached a terminal status: finish its epic, then the run, if they are done.
    async fn after_story_finished(&self, story: &run_story::Model) {
        let epic = match finish_epic_if_done(self.db(), story.epic_id).await {
            Ok(epic) => epic,
            Err(e) => {
                self.warn(format!("could not finish the epic of {}: {e}", story.key));
                return;
            }
        };
        let Some(epic) = epic else { return };
        self.log_run_line(format!("epic {} {}", epic.key, epic.status))
            .await;
        self.emit(ExecutorEvent::EpicFinished {
            key: epic.key.clone(),
            status: epic.status.clone(),
        });
        match finish_run_if_done(self.db(), self.run_id).await {
            Ok(Some(run)) => {
                let line = match &run.error {
                    Some(error) => format!("run {} {}: {error}", run.key, run.status),
                    None => format!("run {} {}", run.key, run.status),
                };
                self.log_run_line(line).await;
                self.emit(ExecutorEvent::RunFinished { status: run.status });
            }
            Ok(None) => {}
            Err(e) => self.warn(format!("could not finish the run: {e}")),
        }
    }
}

//! The executor: N worker tasks in this process that claim a run's stories, run them with a
//! [`StoryHandler`], and record the results; any number of processes may execute one run at
//! once.
//!
//! Each worker loops:
//!
//! 1. stop if the process is shutting down or the run was cancelled;
//! 2. take the next candidate from this process's queue and try to claim it by compare-and-swap
//!    ([`crate::lease::try_claim`]), the next one if someone else took it first. An empty queue is refilled
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
//! ([`crate::queries::epic_has_unfinished`]), skipped while another worker of this process holds
//! a story of the epic, or one is queued in the process (the last of them to record looks).
//! With short handlers and batching (the default), claims and results are batched (see
//! [`ExecutorConfig::claim_batch`]): a claim of up to 256 stories and a result write per group
//! of stories finishing at once, so a story costs a fraction of a statement of each. Its log lines (started, its output,
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

mod attempt;
mod completer;
mod config;
mod event;
mod execution;
mod finisher;
mod producer;
mod run_watch;
mod shutdown;
mod supervisor;
mod wakeup;

pub use wakeup::WAKE_CHANNEL;

use crate::cancel::cancel_leftovers;
use crate::error::{EngineError, TransientDb};
use crate::finish::settle_run;
use crate::handler::StoryHandler;
use crate::log_sink::LogSink;
use crate::queries::{StoryCounts, run_has_limited_stories};
use chrono::Utc;
use completer::Completions;
pub use config::{ExecutorConfig, default_worker_prefix};
use entity::{run, run_epic};
pub use event::{ExecutorEvent, StoryRef, Summary};
use execution::AbortOnDrop;
use execution::Execution;
use execution::Stats;
use producer::{Candidates, Handoff};
use run_domain::retry::retry_transient;
use run_domain::{Lifecycle, RunStatus};
use run_watch::watch_run;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
pub use shutdown::{Shutdown, ShutdownLevel};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use uuid::Uuid;

/// Handlers that take less than this on average: claims also take stories ahead of the idle
/// workers (one more per worker), queued in the process for the next worker that is free.
pub(super) const SHORT_HANDLER: Duration = Duration::from_millis(20);

/// How often a worker also looks for expired leases while pending stories remain.
pub(super) const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How often the run's status is read, to notice a cancellation.
pub(super) const RUN_WATCH_EVERY: Duration = Duration::from_millis(500);

/// How long a limit a claim found full is passed over (unless a story of this process gives a
/// slot back first): about the time another process takes to finish a short story.
pub(super) const FULL_FOR: Duration = Duration::from_millis(20);

/// Consecutive conflicts after which a worker stops (transient database failures are bounded by
/// time instead: [`ExecutorConfig::retry_budget`]).
pub(super) const MAX_CONSECUTIVE_FAILURES: u32 = 10;

/// How often in a row a release may find the story one of our own renewals on.
pub(super) const MAX_ADOPTIONS: u32 = 3;

/// Events buffered for slow subscribers.
pub(super) const EVENT_BUFFER: usize = 4096;

pub(super) struct Inner {
    pub(super) db: DatabaseConnection,
    pub(super) handler: Arc<dyn StoryHandler>,
    pub(super) config: ExecutorConfig,
    pub(super) events: broadcast::Sender<ExecutorEvent>,
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
        let batching = self.inner.config.claim_batch > 1
            && !self
                .retrying(&stats, "reading the run's limits", || {
                    run_has_limited_stories(db, run_id)
                })
                .await?;
        let (status_tx, status_rx) = watch::channel(status);
        let (paused_tx, paused_rx) = watch::channel(run.paused_at.is_some());
        let execution = Arc::new(Execution {
            inner: self.inner.clone(),
            run_id,
            epic_keys,
            run_status: status_rx,
            paused: paused_rx,
            shutdown: shutdown.clone(),
            started_epics: Mutex::new(HashSet::new()),
            run_started: AtomicBool::new(status != RunStatus::Pending),
            worker_failed: AtomicBool::new(false),
            log_lost: Mutex::new(None),
            stats: stats.clone(),
            log: LogSink::start_with_retry(db.clone(), run_id, "", self.inner.config.budget()),
            candidates: tokio::sync::Mutex::new(Candidates::default()),
            held_per_epic: Mutex::new(HashMap::new()),
            wake: watch::channel(0).0,
            last_sweep: Mutex::new(None),
            fail_fast: run.fail_fast,
            full_limits: Mutex::new(HashMap::new()),
            batching,
            handoff: Mutex::new(Handoff::default()),
            handler_micros: std::sync::atomic::AtomicU64::new(u64::MAX),
            me: std::sync::OnceLock::new(),
            recording: Mutex::new(tokio::task::JoinSet::new()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                4 * self.inner.config.claim_batch.max(1),
            )),
            completions: Completions::default(),
        });

        let _ = execution.me.set(Arc::downgrade(&execution));
        let mut first_error = None;
        if !status.is_terminal() {
            let listener = self
                .inner
                .config
                .listen
                .then(|| AbortOnDrop(tokio::spawn(wakeup::listen(execution.clone()))));
            let watcher = AbortOnDrop(tokio::spawn(watch_run(
                db.clone(),
                run_id,
                status_tx,
                paused_tx,
            )));
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
            // Results still being recorded in the background.
            let mut recording = execution
                .recording
                .lock()
                .map(|mut set| std::mem::take(&mut *set))
                .unwrap_or_default();
            while recording.join_next().await.is_some() {}
            // Stories claimed for workers that stopped first go back at once (their leases
            // would otherwise hold them until they expire).
            execution.give_back_queued(true).await;
            drop(watcher);
            drop(listener);
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
            claims_tried: stats.claims_tried.load(Ordering::Relaxed),
            claim_conflicts: stats.claim_conflicts.load(Ordering::Relaxed),
            looks: stats.looks.load(Ordering::Relaxed),
            wakeups: stats.wakeups.load(Ordering::Relaxed),
            listener_lost: stats.listener_lost.load(Ordering::Relaxed),
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

//! One execution of one run by this process: the state its workers share, and the small
//! services every part of the executor uses (events, warnings, retrying, run-level lines).

use super::Inner;
use super::config::ExecutorConfig;
use super::event::ExecutorEvent;
use super::event::StoryRef;
use super::producer::Candidates;
use super::shutdown::Shutdown;
use super::shutdown::ShutdownLevel;
use crate::error::TransientDb;
use crate::log_sink::{LogSink, LogSinkError};
use entity::run_story;
use run_domain::retry::retry_transient;
use run_domain::{Lifecycle, RunStatus};
use sea_orm::DatabaseConnection;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

impl Execution {
    pub(super) fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }
    pub(super) fn config(&self) -> &ExecutorConfig {
        &self.inner.config
    }
    pub(super) fn worker_id(&self, n: usize) -> String {
        format!("{}-{n}", self.config().worker_prefix)
    }
    pub(super) fn emit(&self, event: ExecutorEvent) {
        trace_event(self.run_id, &event);
        // No subscriber is fine.
        let _ = self.inner.events.send(event);
    }
    pub(super) fn warn(&self, message: String) {
        self.emit(ExecutorEvent::Warning { message });
    }
    pub(super) fn story_ref(&self, story: &run_story::Model) -> StoryRef {
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
    /// Wakes every idle worker of this process: something may be claimable. A worker that was
    /// about to wait sees it too (a generation count, not a one-shot signal).
    pub(super) fn wake_all(&self, cause: &'static str) {
        metrics::counter!(crate::metrics::WAKEUPS, "cause" => cause).increment(1);
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
    /// Forgets every limit a claim found full (a slot was freed somewhere).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn forget_full_limits(&self) {
        if let Ok(mut full) = self.full_limits.lock() {
            full.clear();
        }
    }
    /// Whether `story` holds a limit a claim of this process found full just now.
    pub(super) fn probably_full(&self, story: &run_story::Model) -> bool {
        if story.limit_keys.is_none() {
            return false;
        }
        let Ok(mut full) = self.full_limits.lock() else {
            return false;
        };
        full.retain(|_, at| at.elapsed() < super::FULL_FOR);
        run_domain::limit_keys_of(story.limit_keys.as_deref())
            .iter()
            .any(|k| full.contains_key(k))
    }
    /// Remembers that limit `key` was full.
    pub(super) fn limit_was_full(&self, key: String) {
        if let Ok(mut full) = self.full_limits.lock() {
            full.insert(key, std::time::Instant::now());
        }
    }
    /// `story` stopped running here: its limits have a free slot again.
    pub(super) fn limits_freed(&self, story: &run_story::Model) {
        if story.limit_keys.is_none() {
            return;
        }
        if let Ok(mut full) = self.full_limits.lock() {
            for k in run_domain::limit_keys_of(story.limit_keys.as_deref()) {
                full.remove(&k);
            }
        }
    }
    /// Counts one handler's time into the moving average.
    pub(super) fn handler_took(&self, elapsed: std::time::Duration) {
        let took = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX / 2);
        let _ = self
            .handler_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == u64::MAX {
                    took
                } else {
                    (avg.saturating_mul(7) / 8).saturating_add(took / 8)
                })
            });
    }
    pub(super) fn stop_claiming(&self) -> bool {
        self.shutdown.level() != ShutdownLevel::Running
            || self.run_status.borrow().is_terminal()
            || self.worker_failed.load(Ordering::Relaxed)
            || self.log_lost.lock().map_or(true, |lost| lost.is_some())
    }
    /// `op` through transient failures, within the retry budget; each retry counted and warned
    /// about. Returns the result and how many tries failed before it.
    pub(super) async fn retrying<T, E, F, Fut>(&self, what: &str, op: F) -> (Result<T, E>, u32)
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
    pub(super) async fn log_run_line(&self, line: String) {
        self.log.line(line).await;
        if let Err(e) = self.log.flush().await {
            self.log_lost(e);
        }
    }
    /// Remembers that lines could not be written: this execution claims nothing more and
    /// returns the error.
    pub(super) fn log_lost(&self, error: LogSinkError) {
        self.warn(error.to_string());
        if let Ok(mut lost) = self.log_lost.lock() {
            lost.get_or_insert(error);
        }
    }
}

/// The `tracing` event of an executor event: claims and records at debug, take-overs,
/// fencing, give-backs and finished epics and runs at info, warnings at warn. Run, epic,
/// story, attempt and worker are fields (the story's span carries them too).
fn trace_event(run_id: Uuid, event: &ExecutorEvent) {
    crate::metrics::count_event(event);
    match event {
        ExecutorEvent::Started {
            story,
            attempt,
            max_attempts,
            worker,
            taken_over_from,
        } => match taken_over_from {
            Some(from) => {
                tracing::info!(%run_id, epic = %story.epic, story = %story.key, attempt, max_attempts, worker, from, "took over a story whose lease expired")
            }
            None => {
                tracing::debug!(%run_id, epic = %story.epic, story = %story.key, attempt, max_attempts, worker, "claimed")
            }
        },
        ExecutorEvent::Finished {
            story,
            status,
            attempt,
            elapsed,
            error,
            worker,
            ..
        } => {
            tracing::debug!(%run_id, epic = %story.epic, story = %story.key, attempt, worker, status = status.as_str(), elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX), error = error.as_deref(), "recorded")
        }
        ExecutorEvent::Fenced { story, worker } => {
            tracing::info!(%run_id, epic = %story.epic, story = %story.key, worker, "fenced off: the lease was lost, the result dropped")
        }
        ExecutorEvent::GaveBack { story, worker } => {
            tracing::info!(%run_id, epic = %story.epic, story = %story.key, worker, "gave the story back")
        }
        ExecutorEvent::EpicFinished { key, status } => {
            tracing::info!(%run_id, epic = %key, status, "epic finished")
        }
        ExecutorEvent::RunFinished { status } => tracing::info!(%run_id, status, "run finished"),
        ExecutorEvent::Warning { message } => {
            tracing::warn!(%run_id, "{}", run_domain::redact_text(message));
        }
    }
}

/// Aborts a spawned handler when dropped.
pub(super) struct AbortOnDrop<T>(pub(super) JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
pub(super) struct Stats {
    pub(super) recorded: AtomicU64,
    pub(super) fenced: AtomicU64,
    pub(super) given_back: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) recognised: AtomicU64,
    pub(super) claims_tried: AtomicU64,
    pub(super) claim_conflicts: AtomicU64,
    pub(super) looks: AtomicU64,
    pub(super) wakeups: AtomicU64,
    pub(super) listener_lost: AtomicU64,
}

/// One execution of one run by this process.
pub(super) struct Execution {
    pub(super) inner: Arc<Inner>,
    pub(super) run_id: Uuid,
    pub(super) epic_keys: HashMap<Uuid, String>,
    pub(super) run_status: watch::Receiver<RunStatus>,
    /// Whether the run is paused (nothing new starts until it is resumed).
    pub(super) paused: watch::Receiver<bool>,
    pub(super) shutdown: Shutdown,
    pub(super) started_epics: Mutex<HashSet<Uuid>>,
    pub(super) run_started: AtomicBool,
    /// Set when a worker stopped on errors: the others claim nothing new.
    pub(super) worker_failed: AtomicBool,
    /// Set when lines could not be written to the run log: nothing more is claimed, and the
    /// execution returns the error instead of a summary.
    pub(super) log_lost: Mutex<Option<LogSinkError>>,
    pub(super) stats: Arc<Stats>,
    /// The run's log: one writer for every worker, each story a prefix of its own.
    pub(super) log: LogSink,
    /// Stories this process may try to claim, shared by its workers.
    pub(super) candidates: tokio::sync::Mutex<Candidates>,
    /// How many stories of each epic this process's workers hold (claimed, not yet recorded).
    pub(super) held_per_epic: Mutex<HashMap<Uuid, usize>>,
    /// Wakes idle workers when stories were handed to the queue (a need completed here).
    pub(super) wake: watch::Sender<u64>,
    /// When this process last looked for stories a failure elsewhere left waiting.
    pub(super) last_sweep: Mutex<Option<std::time::Instant>>,
    /// The plan asked to cancel the run on the first story that fails for good.
    pub(super) fail_fast: bool,
    /// Limits a claim of this process found full, and when: candidates holding them wait a
    /// moment (until a story of this process gives one back, or [`super::FULL_FOR`]) instead
    /// of being tried in vain.
    pub(super) full_limits: Mutex<HashMap<String, std::time::Instant>>,
    /// Whether claims and completions are batched ([`super::config::ExecutorConfig::claim_batch`]
    /// above 1, and no story of the run holds a limit).
    pub(super) batching: bool,
    /// Workers waiting for a story, and the stories another worker claimed for them.
    pub(super) handoff: Mutex<super::producer::Handoff>,
    /// A moving average of how long handlers take (microseconds; `u64::MAX` before the first),
    /// which decides whether claims take stories ahead of the idle workers.
    pub(super) handler_micros: AtomicU64,
    /// This execution, for tasks of its own.
    pub(super) me: std::sync::OnceLock<std::sync::Weak<Execution>>,
    /// Results being recorded in the background ([`Execution::run_story`] moved on).
    pub(super) recording: Mutex<tokio::task::JoinSet<()>>,
    /// Bounds the results recorded in the background at once.
    pub(super) in_flight: Arc<tokio::sync::Semaphore>,
    /// Results waiting to be recorded in the next batched write.
    pub(super) completions: super::completer::Completions,
}

/// A story of `epic` held by a worker of this process, counted in `held_per_epic` until
/// [`Held::release`] or drop.
pub(super) struct Held<'a> {
    pub(super) execution: &'a Execution,
    pub(super) epic: Uuid,
    pub(super) counted: bool,
}

impl Held<'_> {
    /// Gives up this handle without uncounting: the epic and whether it was counted, for a
    /// handle made again elsewhere (a background record).
    pub(super) fn hand_over(self) -> (Uuid, bool) {
        let taken = (self.epic, self.counted);
        std::mem::forget(self);
        taken
    }

    /// Stops counting this story; true when other workers of this process still hold stories
    /// of its epic. Called after the story's result committed: then the last of them to
    /// release sees every other's result, so only it needs to look whether the epic is done.
    pub(super) fn release(mut self) -> bool {
        self.uncount()
    }

    pub(super) fn uncount(&mut self) -> bool {
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

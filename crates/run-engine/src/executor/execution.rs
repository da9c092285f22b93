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
    pub(super) looks: AtomicU64,
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
    pub(super) wake: tokio::sync::Notify,
    /// When this process last looked for stories a failure elsewhere left waiting.
    pub(super) last_sweep: Mutex<Option<std::time::Instant>>,
    /// The plan asked to cancel the run on the first story that fails for good.
    pub(super) fail_fast: bool,
}

/// A story of `epic` held by a worker of this process, counted in `held_per_epic` until
/// [`Held::release`] or drop.
pub(super) struct Held<'a> {
    pub(super) execution: &'a Execution,
    pub(super) epic: Uuid,
    pub(super) counted: bool,
}

impl Held<'_> {
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

//! Recording how an attempt ended: its result line first, then the result by compare-and-swap
//! from the version of the last renewal, recognising a try whose answer was lost.

use super::MAX_ADOPTIONS;
use super::event::ExecutorEvent;
use super::event::StoryRef;
use super::execution::Execution;
use super::supervisor::Ending;
use super::supervisor::Stop;
use crate::error::TransientDb;
use crate::handler::StoryOutcome;
use crate::lease::{Lease, Release, give_back, release_letting_go, released_by, still_held};
use crate::log_sink::LogSink;
use chrono::Utc;
use entity::run_story;
use run_domain::retry::{Schedule, TransientPolicy, retry_when};
use run_domain::{ConcurrencyError, Lifecycle, StoryStatus, TransitionError, VersionedUpdate};
use sea_orm::EntityTrait;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

impl Execution {
    /// Records how the attempt ended, from the version of the last renewal. Returns the story
    /// when it reached a terminal status.
    pub(super) async fn record(
        &self,
        sref: &StoryRef,
        log: &LogSink,
        mut held: run_story::Model,
        lease: &Lease,
        end: AttemptEnd,
    ) -> Option<(run_story::Model, Option<Vec<run_story::Model>>)> {
        let AttemptEnd {
            ending,
            elapsed,
            output_from,
        } = end;
        let worker = &lease.owner;
        let (outcome, stop) = match ending {
            Ending::Fenced { detail } => {
                self.fenced(sref, log, worker, &detail).await;
                return None;
            }
            Ending::Done { outcome, stop } => (outcome, stop),
        };
        let how = release_for(stop, outcome);
        if matches!(stop, Some(Stop::TimedOut(_))) {
            metrics::counter!(crate::metrics::TIMED_OUT).increment(1);
        }
        // SAFETY(log order): the story's output goes in before its result is recorded, so that
        // a reader who sees the story finished has seen its output (a story without output
        // does not wait for the log). The line that tells the result follows the record, so
        // that it never claims a result that was not recorded (the process may die, or be
        // fenced off, in between), except for a cancellation: that line goes in first, since
        // a cancelled run's closing line follows its last story's record and must be the
        // log's last line. (A cancellation line written first is true whatever happens next:
        // nobody runs a story of a cancelled run again.) Only while the lease is surely ours:
        // past (nine tenths of) it, a take-over may have happened, and the record goes first.
        let took = format!("{:.2}s", elapsed.as_secs_f64());
        let line = result_line(how.as_ref(), stop, &held, worker, &took);
        let lease_left = held
            .lease_expires_at
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        let line_first = how == Some(Release::Cancelled) && lease_left > lease.duration / 10;
        let output = log.lines_queued() > output_from;
        if (line_first || output)
            && !self
                .write_result_line(log, &held, line_first.then_some(line.as_str()))
                .await
        {
            return None;
        }
        // Batched with the results of other stories finishing at once, when nothing but the
        // story's own row changes; anything the batch did not write (a version that moved on,
        // an error) goes the one-story way below, which tells a fence from a lost answer.
        let batched = if self.batching
            && how == Some(Release::Completed)
            && held.needed_by == 0
            && held.limit_keys.is_none()
        {
            self.completions.complete(self.db(), &held).await
        } else {
            None
        };
        let result = match batched {
            Some(done) => Ok((done, Some(Vec::new()))),
            None => self.record_one(sref, &mut held, how.as_ref(), worker).await,
        };
        self.recorded(
            sref, log, result, &held, how, worker, elapsed, line_first, line,
        )
        .await
    }

    /// Records one story's result by compare-and-swap from `held`, recognising a try whose
    /// answer was lost and adopting a renewal of ours that committed unseen (`held` moves on
    /// to it).
    async fn record_one(
        &self,
        sref: &StoryRef,
        held: &mut run_story::Model,
        how: Option<&Release>,
        worker: &str,
    ) -> Result<(run_story::Model, Option<Vec<run_story::Model>>), TransitionError> {
        // The version to release from: moves on when a renewal of ours turns out to have
        // committed with its answer lost (adopted, at most MAX_ADOPTIONS times).
        let current = Mutex::new(held.clone());
        let adoptions = AtomicU32::new(0);
        let transient = TransientPolicy::within(self.config().budget());
        let started = Instant::now();
        let (result, _) = retry_when(
            &Recorder { transient },
            |_| {
                let (current, adoptions) = (&current, &adoptions);
                async move {
                    let from = current
                        .lock()
                        .map(|h| h.clone())
                        .unwrap_or_else(|p| p.into_inner().clone());
                    let result = match how {
                        Some(how) => release_letting_go(self.db(), &from, how.clone())
                            .await
                            .map(|(story, gone)| (story, Some(gone))),
                        None => give_back(self.db(), &from).await.map(|s| (s, None)),
                    };
                    let conflict = match result {
                        Ok(done) => return Ok(done),
                        Err(
                            e @ TransitionError::Concurrency(ConcurrencyError::Conflict { .. }),
                        ) => e,
                        Err(e) => return Err(Recording::Failed(e)),
                    };
                    // SAFETY(lost answer): the version moved on. Either a try before this one
                    // committed with its answer lost, or a renewal of ours did (one dropped in
                    // flight when the handler ended), or another worker took the story over:
                    // re-read and tell which. (A failed re-read is transient or final like any
                    // other failure; the next try meets the same conflict and reads again.)
                    let now = run_story::Entity::find_versioned(self.db(), from.id)
                        .await
                        .map_err(|e| Recording::Failed(e.into()))?;
                    if released_by(&now, &from, how, worker) {
                        self.stats.recognised.fetch_add(1, Ordering::Relaxed);
                        // How many stories its transaction let go is not known here.
                        return Ok((now, None));
                    }
                    if adoptions.load(Ordering::Relaxed) < MAX_ADOPTIONS
                        && still_held(&now, &from, worker)
                    {
                        self.stats.recognised.fetch_add(1, Ordering::Relaxed);
                        adoptions.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut current) = current.lock() {
                            *current = now;
                        }
                        return Err(Recording::Adopted);
                    }
                    Err(Recording::Failed(conflict))
                }
            },
            |e: &Recording| match e {
                Recording::Adopted => true,
                Recording::Failed(e)
                    if e.is_transient() && transient.allows(0, started.elapsed()) =>
                {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    self.warn(format!("recording {sref} failed, trying again: {e}"));
                    true
                }
                Recording::Failed(_) => false,
            },
        )
        .instrument(tracing::debug_span!(
            "record",
            story = %sref,
            version = held.version,
            result = how.map_or("give back", release_name),
        ))
        .await;
        *held = current.into_inner().unwrap_or_else(|p| p.into_inner());
        result.map_err(|e| match e {
            Recording::Failed(e) => e,
            // Never returned (an adoption is always tried again); should it be, the conflict
            // stands.
            Recording::Adopted => TransitionError::Concurrency(ConcurrencyError::Conflict {
                entity: "run_story",
                id: held.id,
                expected: held.version,
                actual: held.version,
            }),
        })
    }

    /// After a record was tried: the result line, wake-ups, events; the story when it reached
    /// a terminal status.
    #[allow(clippy::too_many_arguments)]
    async fn recorded(
        &self,
        sref: &StoryRef,
        log: &LogSink,
        result: Result<(run_story::Model, Option<Vec<run_story::Model>>), TransitionError>,
        held: &run_story::Model,
        how: Option<Release>,
        worker: &str,
        elapsed: Duration,
        line_first: bool,
        line: String,
    ) -> Option<(run_story::Model, Option<Vec<run_story::Model>>)> {
        let (story, gone) = match result {
            Ok(done) => done,
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
        if !line_first {
            let line = match story.not_before_ms {
                Some(at) if story.status == StoryStatus::Pending.as_str() => {
                    retry_at_line(line, at)
                }
                _ => line,
            };
            // Not waited for: it goes in with the next batch (at the latest before an epic or
            // the run is finished, or before the execution returns).
            log.line(line).await;
        }
        // Its slots are free again: candidates holding its limits are worth trying. A story
        // back to pending, or freed slots, may be claimable by an idle worker of this process.
        self.limits_freed(&story);
        if story.status == StoryStatus::Pending.as_str() || story.limit_keys.is_some() {
            self.wake_all("story released");
        }
        let status = StoryStatus::parse(&story.status).unwrap_or(StoryStatus::Pending);
        let attempt = held.attempts;
        if how.is_none() {
            self.stats.given_back.fetch_add(1, Ordering::Relaxed);
            self.emit(ExecutorEvent::GaveBack {
                story: sref.clone(),
                worker: worker.to_owned(),
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
                worker: worker.to_owned(),
            });
        }
        status.is_terminal().then_some((story, gone))
    }
    /// Writes the story's output (and the result line, if given) and waits for it. Lines that cannot be
    /// written stop the execution: the story is given back (or, if the database cannot be
    /// reached either, its lease expires), so nothing stays recorded without its lines, and
    /// `false` is returned. (A story already recorded stays recorded; its run is not settled by
    /// this execution.)
    async fn write_result_line(
        &self,
        log: &LogSink,
        held: &run_story::Model,
        line: Option<&str>,
    ) -> bool {
        if let Some(line) = line {
            log.line(line).await;
        }
        match log.flush().await {
            Ok(()) => true,
            Err(e) => {
                self.log_lost(e);
                if StoryStatus::parse(&held.status) == Some(StoryStatus::Running) {
                    let _ = give_back(self.db(), held).await;
                }
                false
            }
        }
    }

    pub(super) async fn fenced(&self, sref: &StoryRef, log: &LogSink, worker: &str, detail: &str) {
        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
        // Cancelled on its own (`cancel --story`), or taken over: say which.
        let cancelled = run_story::Entity::find_by_id(sref.id)
            .one(self.db())
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.status == StoryStatus::Cancelled.as_str());
        log.line(if cancelled {
            format!("stopped: the story was cancelled while {worker} ran it; its result was not recorded")
        } else {
            format!(
                "fenced off: {worker} lost its lease (another worker took the story over: {detail}); its result was not recorded"
            )
        })
        .await;
        if let Err(e) = log.flush().await {
            self.log_lost(e);
        }
        self.emit(ExecutorEvent::Fenced {
            story: sref.clone(),
            worker: worker.to_owned(),
        });
    }
}

/// What an attempt that ended this way records: `None` gives the lease back (the attempt is
/// not counted), else the release. `stop` is why the worker stopped the handler, if it did;
/// `outcome` what the handler returned (`None`: it did not stop within the grace period).
pub(super) fn release_for(stop: Option<Stop>, outcome: Option<StoryOutcome>) -> Option<Release> {
    match (stop, outcome) {
        // A completion stands even when the lease ran out meanwhile: the release is a
        // compare-and-swap from the version this worker holds, so it is recorded only if
        // nobody took the story over (and so nobody else ran it).
        (_, Some(StoryOutcome::Completed)) => Some(Release::Completed),
        (Some(Stop::GiveBack | Stop::LeaseRunOut), _) => None,
        (Some(Stop::RunCancelled), _) => Some(Release::Cancelled),
        // Out of time: a failed attempt, whatever the handler said on its way out.
        (Some(Stop::TimedOut(after)), _) => Some(Release::Failed {
            error: format!("timed out after {}", crate::plan::duration::describe(after)),
        }),
        (None, Some(StoryOutcome::Failed { error })) => Some(Release::Failed { error }),
        (None, Some(StoryOutcome::Cancelled)) => Some(Release::Cancelled),
        (None, None) => Some(Release::Failed {
            error: "the story handler did not stop".to_owned(),
        }),
    }
}

/// The line that tells how an attempt ended, written before its result is recorded: `how` is
/// the release (`None`: the lease is given back), `stop` why the handler was stopped, `held` the
/// story as this worker holds it.
pub(super) fn result_line(
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

/// How a release is named in the `record` span.
fn release_name(how: &Release) -> &'static str {
    match how {
        Release::Completed => "completed",
        Release::Failed { .. } => "failed",
        Release::Cancelled => "cancelled",
    }
}

/// `line` ("...; will retry") with when: its retry delay passes at `at_ms` (Unix ms).
pub(super) fn retry_at_line(line: String, at_ms: i64) -> String {
    let wait = Duration::from_millis(u64::try_from(at_ms - run_domain::now_ms()).unwrap_or(0));
    match chrono::DateTime::<Utc>::from_timestamp_millis(at_ms) {
        Some(t) => format!(
            "{line} at {} (in {})",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            crate::plan::duration::describe(wait)
        ),
        None => line,
    }
}

/// How an attempt ended, for [`Execution::record`].
pub(super) struct AttemptEnd {
    /// How the handler ended.
    pub(super) ending: Ending,
    /// How long it ran.
    pub(super) elapsed: Duration,
    /// The count of the story's log handle before the handler ran: lines past it are output.
    pub(super) output_from: u64,
}

/// Results of stories that finished at once, recorded in one write
/// ([`run_domain::batch::complete_running`]): the first to arrive writes every result queued by
/// then, the others wait for their answers (group commit, as the log sink's).
#[derive(Default)]
pub(super) struct Completions {
    /// Results waiting for the next write, each with where its answer goes.
    queue: Mutex<Vec<(run_story::Model, Answer)>>,
    /// Held while a write is in flight.
    writer: tokio::sync::Mutex<()>,
}

/// Where a batched write's answer for one story goes: the story as written, or `None` when it
/// was not (its version moved on, or the write failed).
type Answer = tokio::sync::oneshot::Sender<Option<run_story::Model>>;

impl Completions {
    /// Completes `held` in the next batched write; the story as written, or `None` when the
    /// write did not write it (a version that moved on, or a failed write that may have
    /// committed: the caller tries the one-story way, which tells them apart). Answers only
    /// once the write committed.
    pub(super) async fn complete(
        &self,
        db: &sea_orm::DatabaseConnection,
        held: &run_story::Model,
    ) -> Option<run_story::Model> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue.lock().ok()?.push((held.clone(), tx));
        {
            let _writing = self.writer.lock().await;
            let batch = self
                .queue
                .lock()
                .map(|mut q| std::mem::take(&mut *q))
                .unwrap_or_default();
            if !batch.is_empty() {
                let (stories, answers): (Vec<run_story::Model>, Vec<Answer>) =
                    batch.into_iter().unzip();
                let written = run_domain::batch::complete_running(db, &stories).await;
                if let Err(e) = &written {
                    tracing::debug!(error = %e, stories = stories.len(), "a batched completion failed; each story is recorded on its own");
                }
                let mut written: std::collections::HashMap<uuid::Uuid, run_story::Model> = written
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| (w.id, w))
                    .collect();
                for (story, answer) in stories.iter().zip(answers) {
                    let _ = answer.send(written.remove(&story.id));
                }
            }
        }
        rx.await.ok().flatten()
    }
}

/// Why one try at recording failed.
enum Recording {
    /// The release failed (a conflict not of our own making, or a database failure).
    Failed(TransitionError),
    /// The story had moved on by a renewal of ours: try again from that version.
    Adopted,
}

/// How recording is tried again: transient failures within the transient policy's budget
/// (decided per error, above), adoptions always (bounded by [`MAX_ADOPTIONS`]); waits as the
/// transient policy's.
struct Recorder {
    transient: TransientPolicy,
}

impl Schedule for Recorder {
    fn allows(&self, _failures: u32, _elapsed: Duration) -> bool {
        true
    }

    fn wait(&self, failures: u32, elapsed: Duration) -> Duration {
        match self.transient.budget {
            Some(_) => self.transient.wait(failures, elapsed),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(error: &str) -> Option<StoryOutcome> {
        Some(StoryOutcome::Failed {
            error: error.to_owned(),
        })
    }

    #[test]
    fn what_each_stop_and_outcome_records() {
        use Stop::*;
        let completed = Some(StoryOutcome::Completed);
        let cancelled = Some(StoryOutcome::Cancelled);
        let table = [
            // A completion stands whatever stopped the handler.
            (None, completed.clone(), Some(Release::Completed)),
            (Some(GiveBack), completed.clone(), Some(Release::Completed)),
            (
                Some(LeaseRunOut),
                completed.clone(),
                Some(Release::Completed),
            ),
            (Some(RunCancelled), completed, Some(Release::Completed)),
            // Giving back or running out of lease counts no attempt, whatever the handler said.
            (Some(GiveBack), failed("x"), None),
            (Some(GiveBack), cancelled.clone(), None),
            (Some(GiveBack), None, None),
            (Some(LeaseRunOut), failed("x"), None),
            (Some(LeaseRunOut), None, None),
            // A cancelled run cancels the story, even one that failed on the way out.
            (Some(RunCancelled), failed("x"), Some(Release::Cancelled)),
            (Some(RunCancelled), None, Some(Release::Cancelled)),
            // Out of time: failed, whatever the handler said on its way out.
            (
                Some(TimedOut(Duration::from_secs(90))),
                failed("killed"),
                Some(Release::Failed {
                    error: "timed out after 1m 30s".into(),
                }),
            ),
            (
                Some(TimedOut(Duration::from_millis(500))),
                None,
                Some(Release::Failed {
                    error: "timed out after 500ms".into(),
                }),
            ),
            // Left alone, the handler's word is recorded.
            (
                None,
                failed("boom"),
                Some(Release::Failed {
                    error: "boom".into(),
                }),
            ),
            (None, cancelled, Some(Release::Cancelled)),
            (
                None,
                None,
                Some(Release::Failed {
                    error: "the story handler did not stop".into(),
                }),
            ),
        ];
        for (stop, outcome, expected) in table {
            assert_eq!(
                release_for(stop, outcome.clone()),
                expected,
                "{stop:?} {outcome:?}"
            );
        }
    }

    #[test]
    fn result_lines_say_what_will_be_recorded() {
        let mut held = run_story::Model {
            id: uuid::Uuid::nil(),
            run_id: uuid::Uuid::nil(),
            epic_id: uuid::Uuid::nil(),
            key: "s".into(),
            title: "s".into(),
            status: "running".into(),
            position: 0,
            version: 2,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            error: None,
            command: None,
            attempts: 1,
            max_attempts: 2,
            lease_owner: Some("w".into()),
            lease_expires_at: None,
            unmet_needs: 0,
            needed_by: 0,
            waits_on_stories: false,
            timeout_ms: None,
            not_before_ms: None,
            retry_delay: None,
            priority: 0,
            limit_keys: None,
            env: None,
            work_dir: None,
            payload: None,
        };
        let fail = Release::Failed {
            error: "boom".into(),
        };
        assert_eq!(
            result_line(Some(&fail), None, &held, "w", "1.00s"),
            "attempt 1 of 2 failed after 1.00s on w: boom; will retry"
        );
        held.attempts = 2;
        assert_eq!(
            result_line(Some(&fail), None, &held, "w", "1.00s"),
            "failed after 1.00s on w, attempt 2 of 2: boom"
        );
        assert_eq!(
            result_line(Some(&Release::Completed), None, &held, "w", "0.50s"),
            "completed in 0.50s by w"
        );
        assert_eq!(
            result_line(
                Some(&Release::Cancelled),
                Some(Stop::RunCancelled),
                &held,
                "w",
                "0s"
            ),
            "cancelled on w"
        );
        assert_eq!(
            result_line(None, Some(Stop::GiveBack), &held, "w", "0s"),
            "stopped on shutdown; lease given back by w, attempt 2 not counted"
        );
        assert_eq!(
            result_line(None, Some(Stop::LeaseRunOut), &held, "w", "0s"),
            "stopped: w could not renew its lease in time; lease given back, attempt 2 not counted"
        );
    }
}

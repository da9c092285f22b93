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
use crate::lease::{Lease, Release, give_back, release, released_by, still_held};
use crate::log_sink::LogSink;
use crate::retry::backoff;
use chrono::Utc;
use entity::run_story;
use run_domain::{ConcurrencyError, Lifecycle, StoryStatus, TransitionError, VersionedUpdate};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

impl Execution {
    /// Records how the attempt ended, from the version of the last renewal. Returns the story
    /// when it reached a terminal status.
    pub(super) async fn record(
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
        let how = release_for(stop, outcome);
        // SAFETY(log order): the story's output and the line that tells its result go in
        // before the result is recorded, so that whoever sees the story finished (and then
        // writes its epic's or the run's closing line) has every line of it before its own.
        // Only while the lease is surely ours, though: nobody can have taken over a lease that
        // has not expired, so the result line cannot be a lie. Past (nine tenths of) the lease
        // a take-over may have happened (this process was stopped or cut off): then the result
        // is recorded first and its line written only if the record stands.
        let took = format!("{:.2}s", elapsed.as_secs_f64());
        let line = result_line(how.as_ref(), stop, &held, worker, &took);
        let lease_left = held
            .lease_expires_at
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        let line_first = lease_left > lease.duration / 10;
        if line_first && !self.write_result_line(log, &held, &line).await {
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
        if !line_first && !self.write_result_line(log, &story, &line).await {
            return None;
        }
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
    /// Writes the result line with the story's output and waits for it. Lines that cannot be
    /// written stop the execution: the story is given back (or, if the database cannot be
    /// reached either, its lease expires), so nothing stays recorded without its lines, and
    /// `false` is returned. (A story already recorded stays recorded; its run is not settled by
    /// this execution.)
    async fn write_result_line(&self, log: &LogSink, held: &run_story::Model, line: &str) -> bool {
        log.line(line).await;
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

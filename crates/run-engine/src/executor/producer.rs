//! The fetch loop: each worker claims the next candidate from this process's queue, refilled
//! from the database a window at a time, and backs off when there is nothing to claim.

use super::EXPIRY_CHECK_EVERY;
use super::MAX_CONSECUTIVE_FAILURES;
use super::event::ExecutorEvent;
use super::execution::Execution;
use crate::error::EngineError;
use crate::lease::{Claim, Lease, TryClaim, claimed_by, try_claim};
use crate::queries::{expired_leases, pending_candidates, run_has_story_in};
use chrono::Utc;
use entity::run_story;
use run_domain::retry::{Schedule, TransientPolicy, backoff};
use run_domain::{Lifecycle, StoryStatus, VersionedUpdate};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

impl Execution {
    /// One worker's loop; see the module docs.
    pub(super) async fn work(self: Arc<Self>, n: usize) -> Result<(), EngineError> {
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
                Ok(Step::Idle) => match self.idle_look().await {
                    Ok((false, false)) => return Ok(()),
                    Ok((_, running)) => {
                        if !running {
                            // Stories wait and none runs: a need may have failed in a process
                            // that died before skipping its dependents, or an epic may be done
                            // that nobody finished.
                            self.sweep().await;
                        }
                        Ok(Step::Idle)
                    }
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
                        _ = self.wake.notified() => {}
                    }
                }
                Err(e) => {
                    failures += 1;
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    // Transient database failures: for as long as the budget allows (a server
                    // restart); conflicts: a few times; anything else: not at all.
                    let again = if e.is_transient() {
                        TransientPolicy::within(self.config().budget())
                            .allows(failures, since.elapsed())
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
                    if e.is_transient() {
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
    /// Whether the run has pending stories and running ones: two indexed looks, asked when a
    /// worker found nothing to claim.
    pub(super) async fn idle_look(&self) -> Result<(bool, bool), EngineError> {
        let db = self.db();
        let pending = run_has_story_in(db, self.run_id, StoryStatus::Pending).await?;
        let running = run_has_story_in(db, self.run_id, StoryStatus::Running).await?;
        Ok((pending, running))
    }
    pub(super) async fn claim_next(&self, lease: &Lease) -> Result<Step, EngineError> {
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
                Err(e) if e.is_transient() => {
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
    pub(super) async fn next_candidate(
        &self,
        window: u64,
    ) -> Result<Option<run_story::Model>, EngineError> {
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
    pub(super) async fn recognise_claim(
        &self,
        candidate: &run_story::Model,
        lease: &Lease,
    ) -> Option<Claim> {
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
    pub(super) async fn on_exhausted(&self, story: run_story::Model) {
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
        self.follow_needs(&story, None).await;
        self.after_story_finished(&story).await;
    }
}

pub(super) enum Step {
    Claimed(Box<Claim>),
    /// Every candidate was taken by someone else first: look again at once.
    Contended,
    /// Nothing claimable right now.
    Idle,
}

/// This process's queue of stories to try to claim.
#[derive(Default)]
pub(super) struct Candidates {
    pub(super) queue: VecDeque<run_story::Model>,
    /// When running stories were last looked at for expired leases.
    pub(super) last_expiry_check: Option<Instant>,
}

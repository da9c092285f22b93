//! The fetch loop: each worker claims the next candidate from this process's queue, refilled
//! from the database a window at a time, and backs off when there is nothing to claim.

use super::EXPIRY_CHECK_EVERY;
use super::MAX_CONSECUTIVE_FAILURES;
use super::SHORT_HANDLER;
use super::event::ExecutorEvent;
use super::execution::Execution;
use crate::error::EngineError;
use crate::lease::{Claim, Lease, TryClaim, claimed_by, try_claim};
use crate::queries::{expired_leases, next_retry_at, pending_candidates, run_has_story_in};
use chrono::Utc;
use entity::run_story;
use run_domain::retry::{Schedule, TransientPolicy, backoff};
use run_domain::{Lifecycle, StoryStatus, VersionedUpdate};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

impl Execution {
    /// One worker's loop; see the module docs.
    pub(super) async fn work(self: Arc<Self>, n: usize) -> Result<(), EngineError> {
        let lease = Lease::new(self.worker_id(n), self.config().lease);
        let mut failures = 0u32;
        let mut failing_since: Option<Instant> = None;
        let mut shutdown = self.shutdown.subscribe();
        let mut run_status = self.run_status.clone();
        let mut paused = self.paused.clone();
        let mut told_paused = false;
        let mut woken = self.wake.subscribe();
        loop {
            if self.stop_claiming() {
                return Ok(());
            }
            // Anything that wakes the workers from here on ends this worker's next wait.
            woken.borrow_and_update();
            let step = match self.claim_next(n, &lease).await {
                Ok(Step::Idle) if *self.paused.borrow() => Ok(Step::Paused),
                Ok(Step::Idle) => match self.idle_look().await {
                    Ok(Look {
                        pending: false,
                        running: false,
                        ..
                    }) => return Ok(()),
                    Ok(Look {
                        running,
                        next_retry_ms,
                        ..
                    }) => {
                        if !running && next_retry_ms.is_none() {
                            // Stories wait and none runs: a need may have failed in a process
                            // that died before skipping its dependents, or an epic may be done
                            // that nobody finished.
                            self.sweep().await;
                        }
                        Ok(match next_retry_ms {
                            Some(at) => Step::Until { at, poll: running },
                            None => Step::Idle,
                        })
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
                    // A story another worker of this process claimed for this one is leased in
                    // that worker's name: renewals and the record go under it.
                    let held = match claim.story.lease_owner.as_deref() {
                        Some(owner) if owner != lease.owner => Lease::new(owner, lease.duration),
                        _ => lease.clone(),
                    };
                    self.run_story(*claim, &held).await;
                }
                Ok(Step::Contended) => {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=5))).await;
                }
                Ok(idle @ (Step::Idle | Step::Until { .. } | Step::Paused)) => {
                    // Jitter, so that idle workers of many processes do not poll in step.
                    let poll = self.config().poll_interval;
                    let jittered = poll.mul_f64(0.5 + fastrand::f64());
                    let wait = match idle {
                        // Nothing runs anywhere: nothing can become claimable before the
                        // first retry delay passes (a resume or a cancel is watched), so sleep
                        // until then instead of polling.
                        Step::Until { at, poll: false } => until(at),
                        Step::Until { at, poll: true } => until(at).min(jittered),
                        // The run watch tells when it is resumed.
                        Step::Paused => {
                            if n == 0 && !told_paused {
                                told_paused = true;
                                self.warn(format!(
                                    "run {} is paused: nothing new starts until `run-engine resume {}`",
                                    self.run_id, self.run_id
                                ));
                            }
                            Duration::MAX
                        }
                        _ => jittered,
                    };
                    if !matches!(idle, Step::Paused) {
                        told_paused = false;
                    }
                    tokio::select! {
                        _ = sleep_for(wait) => {}
                        _ = shutdown.changed() => {}
                        _ = run_status.changed() => {}
                        _ = paused.changed() => {}
                        _ = woken.changed() => {}
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
    /// Whether the run has pending stories and running ones, and when the first retry delay
    /// passes: indexed looks, asked when a worker found nothing to claim.
    pub(super) async fn idle_look(&self) -> Result<Look, EngineError> {
        let db = self.db();
        self.stats.looks.fetch_add(1, Ordering::Relaxed);
        let pending = run_has_story_in(db, self.run_id, StoryStatus::Pending).await?;
        let running = run_has_story_in(db, self.run_id, StoryStatus::Running).await?;
        let next_retry_ms = if pending {
            next_retry_at(db, self.run_id, run_domain::now_ms()).await?
        } else {
            None
        };
        Ok(Look {
            pending,
            running,
            next_retry_ms,
        })
    }
    pub(super) async fn claim_next(&self, n: usize, lease: &Lease) -> Result<Step, EngineError> {
        let db = self.db();
        if self.batching {
            match self.batch_claim(n, lease).await? {
                Batch::Claimed(claim) => return Ok(Step::Claimed(claim)),
                Batch::Nothing => return Ok(Step::Idle),
                Batch::OneByOne => {}
            }
        }
        let window = self.config().candidate_window.max(1);
        // Bounded, so that a worker meeting only candidates others took first backs off.
        for _ in 0..window {
            if self.stop_claiming() || *self.paused.borrow() {
                return Ok(Step::Idle);
            }
            let Some(candidate) = self.next_candidate(window).await? else {
                return Ok(Step::Idle);
            };
            if self.probably_full(&candidate) {
                // Behind the others: its limit was full a moment ago.
                self.candidates.lock().await.queue.push_back(candidate);
                continue;
            }
            self.stats.claims_tried.fetch_add(1, Ordering::Relaxed);
            let claim =
                try_claim(db, &candidate, lease, Utc::now()).instrument(tracing::debug_span!(
                    "claim",
                    run_id = %self.run_id,
                    story = %candidate.key,
                    version = candidate.version,
                    worker = %lease.owner,
                ));
            match claim.await {
                Ok(TryClaim::Claimed(claim)) => return Ok(Step::Claimed(Box::new(claim))),
                Ok(TryClaim::Exhausted(story)) => self.on_exhausted(story).await,
                Ok(TryClaim::Lost) => {
                    metrics::counter!(crate::metrics::CLAIM_CONFLICTS).increment(1);
                    self.stats.claim_conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(story = %candidate.key, "claimed first by another worker");
                }
                Ok(TryClaim::LimitFull(limit)) => {
                    tracing::debug!(story = %candidate.key, limit, "limit full");
                    self.limit_was_full(limit);
                }
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
    /// Claims ready stories in one statement (see [`run_domain::batch::start_ready`]): one for
    /// worker `n` and one for each worker of this process waiting for work, handed over to
    /// them; or takes one claimed for `n` by another worker. [`Batch::OneByOne`] when a look
    /// for expired leases (every [`EXPIRY_CHECK_EVERY`]) found some: they are taken over one
    /// at a time.
    async fn batch_claim(&self, n: usize, lease: &Lease) -> Result<Batch, EngineError> {
        // A story queued in the process goes without waiting for a claim in flight.
        let queued = self.with_handoff(|h| h.spare.pop_front()).flatten();
        let claim = match queued {
            Some(claim) => claim,
            None => {
                self.with_handoff(|h| h.idle.push(n));
                // One claimer at a time; the workers waiting here are the idle ones.
                let candidates = self.candidates.lock().await;
                let given = self.with_handoff(|h| {
                    h.idle.retain(|w| *w != n);
                    h.given.remove(&n).or_else(|| h.spare.pop_front())
                });
                match given.flatten() {
                    Some(claim) => claim,
                    None => return self.claim_for(n, lease, candidates).await,
                }
            }
        };
        if self.stop_claiming() || *self.paused.borrow() {
            // Claimed before the pause or the shutdown, not started: back it goes (and so do
            // the others queued ahead).
            self.give_back_unstarted(claim).await;
            self.give_back_queued(false).await;
            return Ok(Batch::Nothing);
        }
        Ok(match self.fresh_enough(claim, lease).await {
            Some(claim) => Batch::Claimed(Box::new(claim)),
            None => Batch::Nothing,
        })
    }
    /// [`Execution::batch_claim`] when nothing is queued for worker `n`: looks for expired
    /// leases when due, then claims a batch, holding the candidates lock.
    async fn claim_for(
        &self,
        n: usize,
        lease: &Lease,
        mut candidates: tokio::sync::MutexGuard<'_, Candidates>,
    ) -> Result<Batch, EngineError> {
        let due = candidates.expiry_check_due();
        if due {
            // Expired leases are taken over one at a time (each its own compare-and-swap).
            candidates.last_expiry_check = Some(Instant::now());
            let limit = usize::try_from(self.config().candidate_window).unwrap_or(usize::MAX);
            let expired = expired_leases(self.db(), self.run_id, Utc::now(), limit).await?;
            candidates.queue.extend(expired);
        }
        if !candidates.queue.is_empty() {
            return Ok(Batch::OneByOne);
        }
        if self.stop_claiming() || *self.paused.borrow() {
            return Ok(Batch::Nothing);
        }
        if candidates.drained {
            // The last claim came back short: look before claiming again, so that idle
            // workers woken for nothing send no claim statement (a look is a plain read).
            self.stats.looks.fetch_add(1, Ordering::Relaxed);
            if pending_candidates(self.db(), self.run_id, 1)
                .await?
                .is_empty()
            {
                return Ok(Batch::Nothing);
            }
            candidates.drained = false;
        }
        let mut idle = self.with_handoff(|h| h.idle.clone()).unwrap_or_default();
        idle.dedup();
        // Short handlers: a whole batch, the stories ahead of the idle workers queued for
        // whichever worker is free first (its lease runs meanwhile; see `fresh_enough`).
        let ahead = if self.short_handlers() {
            self.config().claim_batch
        } else {
            0
        };
        let max = (idle.len() + 1 + ahead).min(self.config().claim_batch);
        let mine = self
            .claim_into_queue(&mut candidates, Some(n), &idle, max, lease)
            .await?;
        drop(candidates);
        Ok(match mine {
            Some(claim) => Batch::Claimed(Box::new(claim)),
            None => Batch::Nothing,
        })
    }
    /// Whether handlers have been taking less than [`SHORT_HANDLER`] on average: then claims
    /// take stories ahead of the idle workers.
    fn short_handlers(&self) -> bool {
        self.handler_micros.load(Ordering::Relaxed)
            < u64::try_from(SHORT_HANDLER.as_micros()).unwrap_or(u64::MAX)
    }
    /// Claims up to `max` ready stories in one statement, leased to `lease`; the first for
    /// worker `n` (if given), the others handed to the `idle` workers, the rest queued in the
    /// process for whichever worker is free first. The caller holds the candidates lock.
    async fn claim_into_queue(
        &self,
        candidates: &mut Candidates,
        n: Option<usize>,
        idle: &[usize],
        max: usize,
        lease: &Lease,
    ) -> Result<Option<Claim>, EngineError> {
        let until = lease.expires_at(Utc::now());
        self.stats.claims_tried.fetch_add(1, Ordering::Relaxed);
        let claimed =
            run_domain::batch::start_ready(self.db(), self.run_id, max, &lease.owner, until)
                .instrument(tracing::debug_span!(
                    "claim",
                    run_id = %self.run_id,
                    batch = max,
                    worker = %lease.owner,
                ))
                .await;
        let stories = match claimed {
            Ok(stories) => stories,
            Err(e) if run_domain::Retryable::is_transient(&e) => {
                // The claim may have committed with its answer lost: what it wrote carries this
                // worker's id and this lease's expiry.
                let (found, _) = self
                    .retrying("looking for a claim whose answer was lost", || {
                        run_domain::batch::started_by(self.db(), self.run_id, &lease.owner, until)
                    })
                    .await;
                match found {
                    Ok(found) if !found.is_empty() => {
                        self.stats
                            .recognised
                            .fetch_add(found.len() as u64, Ordering::Relaxed);
                        found
                    }
                    _ => return Err(EngineError::from(e)),
                }
            }
            Err(e) => return Err(EngineError::from(e)),
        };
        candidates.drained = stories.len() < max;
        // In the order the claim picked them (a statement's answer has no order of its own).
        let mut stories = stories;
        stories.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.position.cmp(&b.position))
                .then(a.id.cmp(&b.id))
        });
        let mut stories = stories.into_iter().map(|story| Claim {
            story,
            taken_over_from: None,
        });
        let mine = if n.is_some() { stories.next() } else { None };
        self.with_handoff(|h| {
            let mut waiting = idle.iter().filter(|w| Some(**w) != n);
            for claim in stories {
                match waiting.next() {
                    Some(w) => {
                        h.idle.retain(|x| x != w);
                        h.given.insert(*w, claim);
                    }
                    None => h.spare.push_back(claim),
                }
            }
        });
        // Idle workers wait on the candidates lock, and take theirs once the caller lets go.
        Ok(mine)
    }
    /// `claim`, taken from the process's queue, if its lease still has half its length to
    /// run; else renewed first (`None` when the renewal finds it taken over or changed).
    async fn fresh_enough(&self, claim: Claim, lease: &Lease) -> Option<Claim> {
        let now = Utc::now();
        let left = claim
            .story
            .lease_expires_at
            .and_then(|t| (t - now).to_std().ok())
            .unwrap_or_default();
        if left >= lease.duration / 2 {
            return Some(claim);
        }
        let owner = claim.story.lease_owner.clone().unwrap_or_default();
        let held = Lease::new(owner, lease.duration);
        match crate::lease::renew_lease(self.db(), &claim.story, &held, now).await {
            Ok(story) => Some(Claim { story, ..claim }),
            Err(e) => {
                tracing::debug!(story = %claim.story.key, error = %e, "a queued claim could not be renewed");
                None
            }
        }
    }
    /// `f` on the hand-over state (`None` if a worker panicked holding it).
    fn with_handoff<T>(&self, f: impl FnOnce(&mut Handoff) -> T) -> Option<T> {
        self.handoff.lock().ok().map(|mut h| f(&mut h))
    }
    /// Gives back a story claimed for a worker that is stopping before it started it.
    async fn give_back_unstarted(&self, claim: Claim) {
        let (given, _) = self
            .retrying("giving back a story not started", || {
                crate::lease::give_back(self.db(), &claim.story)
            })
            .await;
        if given.is_ok() {
            self.stats.given_back.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Gives back the stories queued in the process for the next free worker, and (`all`: once
    /// every worker has returned) those claimed for workers that stopped before taking them.
    pub(super) async fn give_back_queued(&self, all: bool) {
        let left: Vec<Claim> = self
            .with_handoff(|h| {
                let mut left: Vec<Claim> = h.spare.drain(..).collect();
                if all {
                    left.extend(h.given.drain().map(|(_, c)| c));
                }
                left
            })
            .unwrap_or_default();
        for claim in left {
            self.give_back_unstarted(claim).await;
        }
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
        let due = candidates.expiry_check_due();
        if candidates.queue.is_empty() || due {
            let mut fresh = if candidates.queue.is_empty() {
                self.stats.looks.fetch_add(1, Ordering::Relaxed);
                pending_candidates(db, self.run_id, window).await?
            } else {
                Vec::new()
            };
            if fresh.is_empty() || due {
                candidates.last_expiry_check = Some(Instant::now());
                let limit = usize::try_from(window).unwrap_or(usize::MAX);
                fresh.extend(expired_leases(db, self.run_id, Utc::now(), limit).await?);
            }
            // Shuffled within each priority, so that the workers of other processes, reading
            // the same window, do not try the same stories in the same order, while higher
            // priorities still come first.
            shuffle_within_priority(&mut fresh);
            if candidates.queue.is_empty() {
                candidates.queue.extend(fresh);
            } else {
                for story in fresh {
                    candidates.put_last_of_its_priority(story);
                }
            }
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
    /// Nothing claimable before `at` (Unix milliseconds), when a retry delay passes; `poll`:
    /// stories run meanwhile, so look at the usual interval too.
    Until {
        at: i64,
        poll: bool,
    },
    /// The run is paused.
    Paused,
}

/// What an idle worker saw of the run.
pub(super) struct Look {
    pub(super) pending: bool,
    pub(super) running: bool,
    /// When the first retry delay of a story that waits for nothing else passes.
    pub(super) next_retry_ms: Option<i64>,
}

/// How long from now until `at_ms` (Unix milliseconds); zero once passed.
fn until(at_ms: i64) -> Duration {
    let left = at_ms.saturating_sub(run_domain::now_ms());
    Duration::from_millis(u64::try_from(left).unwrap_or(0))
}

/// Sleeps for `d`, or forever for [`Duration::MAX`] (or anything past a year).
async fn sleep_for(d: Duration) {
    match Instant::now().checked_add(d) {
        Some(deadline) if d < Duration::from_secs(365 * 24 * 3600) => {
            tokio::time::sleep_until(deadline).await;
        }
        _ => std::future::pending::<()>().await,
    }
}

/// Orders `stories` by priority, highest first, shuffling those of equal priority.
pub(super) fn shuffle_within_priority(stories: &mut [run_story::Model]) {
    stories.sort_by_key(|s| std::cmp::Reverse(s.priority));
    let mut start = 0;
    while start < stories.len() {
        let p = stories[start].priority;
        let end = stories[start..]
            .iter()
            .position(|s| s.priority != p)
            .map_or(stories.len(), |k| start + k);
        if let Some(group) = stories.get_mut(start..end) {
            fastrand::shuffle(group);
        }
        start = end;
    }
}

/// What a batched claim did for a worker.
enum Batch {
    /// A story for this worker.
    Claimed(Box<Claim>),
    /// Nothing may start now.
    Nothing,
    /// Look the one-at-a-time way (expired leases are due a look, or stories are queued).
    OneByOne,
}

/// Stories one worker claimed for others of its process, and who is waiting for one.
#[derive(Default)]
pub(super) struct Handoff {
    /// Workers waiting for a claimer to finish, in arrival order.
    pub(super) idle: Vec<usize>,
    /// Stories claimed for a waiting worker, by worker.
    pub(super) given: std::collections::HashMap<usize, Claim>,
    /// Stories claimed for a worker that had found one already: the next worker takes it.
    pub(super) spare: VecDeque<Claim>,
}

/// This process's queue of stories to try to claim, highest priority first.
#[derive(Default)]
pub(super) struct Candidates {
    pub(super) queue: VecDeque<run_story::Model>,
    /// When running stories were last looked at for expired leases.
    pub(super) last_expiry_check: Option<Instant>,
    /// The last batched claim took fewer stories than it asked for: the next one looks first.
    pub(super) drained: bool,
}

impl Candidates {
    /// Whether running stories are due a look for expired leases ([`EXPIRY_CHECK_EVERY`]).
    pub(super) fn expiry_check_due(&self) -> bool {
        self.last_expiry_check
            .is_none_or(|t| t.elapsed() >= EXPIRY_CHECK_EVERY)
    }

    /// Queues `story` ahead of every story of lower or equal priority.
    pub(super) fn put_first_of_its_priority(&mut self, story: run_story::Model) {
        let at = self
            .queue
            .iter()
            .position(|s| s.priority <= story.priority)
            .unwrap_or(self.queue.len());
        self.queue.insert(at, story);
    }

    /// Queues `story` behind every story of higher or equal priority.
    pub(super) fn put_last_of_its_priority(&mut self, story: run_story::Model) {
        let at = self
            .queue
            .iter()
            .position(|s| s.priority < story.priority)
            .unwrap_or(self.queue.len());
        self.queue.insert(at, story);
    }
}

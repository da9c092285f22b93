//! One attempt at one claimed story: start its epic and run, run its handler under
//! supervision, record the result, and let the epic finish.

use super::completer::AttemptEnd;
use super::event::ExecutorEvent;
use super::execution::Execution;
use super::execution::Held;
use super::supervisor::Ending;
use super::supervisor::Stop;
use crate::error::EngineError;
use crate::finish::{start_epic, start_run};
use crate::handler::{Cancellation, StoryContext};
use crate::lease::{Claim, Lease};
use crate::story_log_layer::StoryLogToken;
use entity::run_story;
use run_domain::{Lifecycle, RunStatus};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

impl Execution {
    /// Moves the run and the story's epic to running; false when the run is cancelled or
    /// already finished, so the story must not run.
    pub(super) async fn ensure_started(
        &self,
        story: &run_story::Model,
    ) -> Result<bool, EngineError> {
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
    /// Runs one claimed story to the end and records its result, in a span `attempt` with the
    /// run, epic, story, attempt and worker as fields.
    pub(super) async fn run_story(&self, claim: Claim, lease: &Lease) {
        let sref = self.story_ref(&claim.story);
        let log = self.log.with_prefix(format!("[{sref}] "));
        // Events a handler emits in this span go to the story's log (`StoryLogLayer`).
        let token = StoryLogToken::register(&log);
        let span = tracing::info_span!(
            "attempt",
            run_id = %self.run_id,
            epic = %sref.epic,
            story = %claim.story.key,
            attempt = claim.story.attempts,
            worker = %lease.owner,
            story_log = token.0,
        );
        self.run_claimed(claim, lease, log).instrument(span).await;
        drop(token);
    }

    async fn run_claimed(&self, claim: Claim, lease: &Lease, log: crate::log_sink::LogSink) {
        let story = claim.story;
        let sref = self.story_ref(&story);
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
                .record(
                    &sref,
                    &log,
                    story,
                    lease,
                    AttemptEnd {
                        ending,
                        elapsed: Duration::ZERO,
                        output_from: log.lines_queued(),
                    },
                )
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

        let output_from = log.lines_queued();
        let started = Instant::now();
        let started_at = chrono::Utc::now();
        let (cancel_handle, cancel) = Cancellation::new();
        let ctx = StoryContext {
            story: story.clone(),
            epic_key: sref.epic.clone(),
            attempt: story.attempts,
            worker_id: worker.clone(),
            log: log.clone(),
            cancel,
            deadline: story
                .timeout_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| started + Duration::from_millis(ms)),
        };
        let (ending, mut last) = self.supervise(ctx, cancel_handle, story, lease).await;
        // When the handler really started (a story claimed ahead of its worker waited in the
        // process's queue): written with the result.
        last.started_at = Some(started_at);
        let elapsed = started.elapsed();
        self.handler_took(elapsed);
        let end = AttemptEnd {
            ending,
            elapsed,
            output_from,
        };
        // A completion without output that changes nothing but its own row is recorded in the
        // background (batched with the others finishing meanwhile), and this worker moves on;
        // everything after the record (its line, the epic) follows the commit as it would here.
        let (end, held) =
            match self.defer_record(sref.clone(), log.clone(), last.clone(), lease, end, held) {
                Ok(()) => return,
                Err(kept) => *kept,
            };
        let finished = self.record(&sref, &log, last, lease, end).await;
        self.after_recorded(finished, held).await;
    }

    /// Records `end` of `last` in a task of its own when it may be (see
    /// [`Execution::deferrable`]), waited for before the execution returns; otherwise gives
    /// `end` and `held` back to be recorded here.
    #[allow(clippy::result_large_err)]
    fn defer_record<'a>(
        &'a self,
        sref: super::event::StoryRef,
        log: crate::log_sink::LogSink,
        last: run_story::Model,
        lease: &Lease,
        end: AttemptEnd,
        held: Held<'a>,
    ) -> Result<(), Box<(AttemptEnd, Held<'a>)>> {
        if !self.deferrable(&last, &log, &end) {
            return Err(Box::new((end, held)));
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return Err(Box::new((end, held)));
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(Box::new((end, held)));
        };
        // The count of stories of the epic this process holds goes over to the task.
        let (epic, counted) = held.hand_over();
        let lease = lease.clone();
        let task = async move {
            let held = Held {
                execution: &me,
                epic,
                counted,
            };
            // Boxed: the task is spawned once per story, and a spawn moves its whole future
            // (unboxed, the record's state machine made it about 13 KiB, copied on every spawn).
            let finished = Box::pin(me.record(&sref, &log, last, &lease, end)).await;
            Box::pin(me.after_recorded(finished, held)).await;
            drop(permit);
        }
        .instrument(tracing::Span::current());
        match self.recording.lock() {
            Ok(mut set) => {
                // Finished tasks keep their memory until joined: reap them as we go, so the
                // set holds about as many as are in flight, not one per story of the run.
                while set.try_join_next().is_some() {}
                set.spawn(task);
                Ok(())
            }
            // Not reached (the lock is only held to spawn); the task is dropped, and with it
            // the count it holds.
            Err(_) => Ok(()),
        }
    }

    /// Whether the result of this attempt may be recorded in the background: claims and
    /// completions are batched, the handler completed, the story has no output waiting, holds
    /// no limit and is needed by nothing (its record touches its own row only).
    fn deferrable(
        &self,
        last: &run_story::Model,
        log: &crate::log_sink::LogSink,
        end: &AttemptEnd,
    ) -> bool {
        self.batching
            && last.needed_by == 0
            && last.limit_keys.is_none()
            && log.lines_queued() == end.output_from
            && matches!(
                &end.ending,
                Ending::Done {
                    outcome: Some(crate::handler::StoryOutcome::Completed),
                    stop: None,
                }
            )
    }
    /// Whether a story of `epic` is claimed for this process and waiting for a worker.
    fn queued_of_epic(&self, epic: Uuid) -> bool {
        self.handoff
            .lock()
            .map(|h| {
                h.spare
                    .iter()
                    .chain(h.given.values())
                    .any(|c| c.story.epic_id == epic)
            })
            .unwrap_or(false)
    }
    /// Counts a story of `epic` as held by this process.
    pub(super) fn hold(&self, epic: Uuid) -> Held<'_> {
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
    pub(super) async fn after_recorded(
        &self,
        finished: Option<(run_story::Model, Option<Vec<run_story::Model>>)>,
        held: Held<'_>,
    ) {
        let epic = held.epic;
        // A story of the epic claimed for this process and not started yet is running too:
        // its worker looks when it is done.
        let others_hold_the_epic = held.release() || self.queued_of_epic(epic);
        let Some((story, gone)) = finished else {
            return;
        };
        self.follow_needs(&story, gone).await;
        if !others_hold_the_epic {
            self.after_story_finished(&story).await;
        }
    }
}

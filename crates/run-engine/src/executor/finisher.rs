//! After a story reached a terminal status: hand over the stories it unblocked, skip those a
//! failure left waiting, then finish its epic, then the run, if they are done.

use super::event::ExecutorEvent;
use super::execution::Execution;
use crate::cancel::cancel_run;
use crate::finish::{finish_epic_if_done, finish_run_if_done, settle_run};
use crate::queries::{epic_has_unfinished, unblocked_by};
use crate::skip::{skip_blocked, skip_dependents};
use entity::{run, run_epic, run_story};
use run_domain::{EpicStatus, Lifecycle, RunStatus, StoryStatus, VersionedUpdate};
use std::collections::HashMap;
use std::time::Duration;

/// How often, at most, an idle process looks for stories left waiting by a failure elsewhere.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Execution {
    /// A story reached a terminal status: a completed one that others need hands the stories
    /// it unblocked straight to this process's workers (no wait for the next poll); a failed
    /// or cancelled one has its dependents skipped (and, with `fail_fast`, a failure cancels
    /// the run).
    pub(super) async fn follow_needs(
        &self,
        story: &run_story::Model,
        gone: Option<Vec<run_story::Model>>,
    ) {
        let db = self.db();
        match StoryStatus::parse(&story.status) {
            Some(StoryStatus::Completed) if story.needed_by > 0 => {
                // The completing transaction let go the stories it was the only unmet need of;
                // those whose other need completed in the same instant go now.
                let known = gone.is_some();
                let mut ready = gone.unwrap_or_default();
                if !known || ready.len() < usize::try_from(story.needed_by).unwrap_or(0) {
                    let (released, _) = self
                        .retrying("letting go the stories that need a completed one", || {
                            // `release` marked the rows in the completing transaction.
                            run_domain::let_go(db, story.id)
                        })
                        .await;
                    match released {
                        Ok(more) => ready.extend(more),
                        Err(e) => {
                            self.warn(format!("could not let go what needs {}: {e}", story.key));
                            return;
                        }
                    }
                }
                if !known {
                    // Its transaction's answer was lost: read what it let go.
                    let (unblocked, _) = self
                        .retrying("reading the stories a completion unblocked", || {
                            unblocked_by(db, story.id, None)
                        })
                        .await;
                    match unblocked {
                        Ok(more) => ready.extend(more),
                        Err(e) => {
                            self.warn(format!("could not read what {} unblocked: {e}", story.key))
                        }
                    }
                }
                self.hand_over(ready).await;
            }
            Some(status @ (StoryStatus::Failed | StoryStatus::Cancelled)) => {
                if *self.run_status.borrow() == RunStatus::Cancelled {
                    return;
                }
                if status == StoryStatus::Failed && self.fail_fast {
                    let sref = self.story_ref(story);
                    self.log_run_line(format!(
                        "fail_fast: {sref} failed, so the rest of the run is cancelled"
                    ))
                    .await;
                    if let Err(e) = cancel_run(db, self.run_id).await {
                        self.warn(format!("could not cancel the run after {sref} failed: {e}"));
                    }
                    return;
                }
                let roots = vec![story.clone()];
                let (skipped, _) = self
                    .retrying("skipping the stories that need a failed one", || {
                        skip_dependents(db, roots.clone())
                    })
                    .await;
                self.after_skipped(skipped).await;
            }
            _ => {}
        }
    }

    /// Puts `ready` stories in this process's queue, ahead of every story of lower or equal
    /// priority (when claims are batched: tells the next claim they are there), and wakes
    /// idle workers.
    pub(super) async fn hand_over(&self, ready: Vec<run_story::Model>) {
        if ready.is_empty() {
            return;
        }
        let mut candidates = self.candidates.lock().await;
        if self.batching {
            // The next batched claim picks them up (with whatever else is ready), no look first.
            candidates.drained = false;
        } else {
            for story in ready.into_iter().rev() {
                candidates.put_first_of_its_priority(story);
            }
        }
        drop(candidates);
        self.wake_all("need completed");
    }

    /// Tells of each skipped story, then finishes their epics (and the run) if they are done.
    async fn after_skipped(&self, skipped: Result<Vec<run_story::Model>, crate::EngineError>) {
        let skipped = match skipped {
            Ok(skipped) => skipped,
            Err(e) => {
                self.warn(format!(
                    "could not skip the stories a failure left waiting: {e}"
                ));
                return;
            }
        };
        let mut epics: HashMap<uuid::Uuid, run_story::Model> = HashMap::new();
        for story in skipped {
            let sref = self.story_ref(&story);
            let error = story.error.clone().unwrap_or_default();
            self.log.line(format!("[{sref}] skipped: {error}")).await;
            self.emit(ExecutorEvent::Finished {
                story: sref,
                status: StoryStatus::Skipped,
                attempt: story.attempts,
                max_attempts: story.max_attempts,
                elapsed: Duration::ZERO,
                error: story.error.clone(),
                worker: String::new(),
            });
            epics.entry(story.epic_id).or_insert(story);
        }
        for story in epics.values() {
            self.after_story_finished(story).await;
        }
    }

    /// Stories wait and none runs: skips what a failure left waiting (a process may have died
    /// before it skipped them) and finishes epics that are done (one may have died before it
    /// finished them), at most once per [`SWEEP_EVERY`].
    pub(super) async fn sweep(&self) {
        {
            let Ok(mut last) = self.last_sweep.lock() else {
                return;
            };
            if last.is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        if self.run_status.borrow().is_terminal() {
            return;
        }
        let db = self.db();
        let (released, _) = self
            .retrying("letting go stories whose needs completed", || {
                run_domain::satisfy_run(db, self.run_id)
            })
            .await;
        if let Err(e) = released {
            self.warn(format!(
                "could not let go stories whose needs completed: {e}"
            ));
        }
        let (skipped, _) = self
            .retrying("looking for stories a failure left waiting", || {
                skip_blocked(db, self.run_id)
            })
            .await;
        self.after_skipped(skipped).await;
        if let Err(e) = self.log.flush().await {
            self.warn(e.to_string());
        }
        let (settled, _) = self
            .retrying("finishing epics that are done", || {
                settle_run(db, self.run_id)
            })
            .await;
        if let Err(e) = settled {
            self.warn(format!("could not finish the run's epics: {e}"));
        }
    }

    /// A story reached a terminal status: finish its epic, then the run, if they are done.
    pub(super) async fn after_story_finished(&self, story: &run_story::Model) {
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
        if epic.needed_by > 0 && epic.status == EpicStatus::Completed.as_str() {
            let (ready, _) = self
                .retrying("reading the stories an epic unblocked", || {
                    unblocked_by(db, story.id, Some(epic.id))
                })
                .await;
            match ready {
                Ok(ready) => self.hand_over(ready).await,
                Err(e) => self.warn(format!(
                    "could not read what epic {} unblocked: {e}",
                    epic.key
                )),
            }
        }
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

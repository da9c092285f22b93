//! After a story reached a terminal status: finish its epic, then the run, if they are done.

use super::event::ExecutorEvent;
use super::execution::Execution;
use crate::finish::{finish_epic_if_done, finish_run_if_done};
use crate::queries::epic_has_unfinished;
use entity::{run, run_epic, run_story};
use run_domain::{EpicStatus, Lifecycle, RunStatus, VersionedUpdate};

impl Execution {
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

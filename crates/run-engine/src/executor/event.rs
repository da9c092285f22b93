//! What an execution tells its subscribers as it goes, and the summary it ends with.

use crate::queries::StoryCounts;
use run_domain::{Lifecycle, RunStatus, StoryStatus};
use std::fmt;
use std::time::Duration;
use uuid::Uuid;

/// A story named for people: `epic/story`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoryRef {
    /// The story's id.
    pub id: Uuid,
    /// Its epic's key.
    pub epic: String,
    /// Its key.
    pub key: String,
}

impl fmt::Display for StoryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.epic, self.key)
    }
}

/// Something an executor did, for progress displays ([`Executor::subscribe`](super::Executor::subscribe)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorEvent {
    /// A worker claimed a story and started its handler.
    Started {
        /// The story.
        story: StoryRef,
        /// The attempt, from 1.
        attempt: i32,
        /// Attempts allowed.
        max_attempts: i32,
        /// The worker.
        worker: String,
        /// The previous holder, when the story was taken over from an expired lease.
        taken_over_from: Option<String>,
    },
    /// A worker recorded an attempt's result. `status` pending means "failed, will retry".
    Finished {
        /// The story.
        story: StoryRef,
        /// The story's status now.
        status: StoryStatus,
        /// The attempt, from 1.
        attempt: i32,
        /// Attempts allowed.
        max_attempts: i32,
        /// How long the attempt took.
        elapsed: Duration,
        /// The error, for a failed attempt.
        error: Option<String>,
        /// The worker.
        worker: String,
    },
    /// A worker lost its lease to another and dropped its result.
    Fenced {
        /// The story.
        story: StoryRef,
        /// The fenced worker.
        worker: String,
    },
    /// A worker gave a story back on shutdown.
    GaveBack {
        /// The story.
        story: StoryRef,
        /// The worker.
        worker: String,
    },
    /// An epic finished.
    EpicFinished {
        /// Its key.
        key: String,
        /// Its status.
        status: String,
    },
    /// The run finished.
    RunFinished {
        /// Its status.
        status: String,
    },
    /// Something went wrong that the executor worked around.
    Warning {
        /// What.
        message: String,
    },
}

/// What an execution ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The run.
    pub run_id: Uuid,
    /// Its status at the end (pending or running when interrupted).
    pub run_status: String,
    /// Its stories by status at the end.
    pub counts: StoryCounts,
    /// Attempts whose result this executor recorded.
    pub recorded: u64,
    /// Attempts whose result this executor dropped because it had lost the lease.
    pub fenced: u64,
    /// Stories this executor gave back (on shutdown, or when it could not renew their lease).
    pub given_back: u64,
    /// Database calls this executor tried again after a transient failure.
    pub retried: u64,
    /// Writes of this executor whose answer was lost but that had committed (a claim, a
    /// renewal, a result), recognised on re-reading the row.
    pub recognised: u64,
    /// Claim statements this executor sent (a batched claim counts one, however many stories
    /// it took; a story waiting for its retry delay, a paused run or a full limit is not
    /// tried).
    pub claims_tried: u64,
    /// Claims of one story that another worker or process won first (a batched claim skips
    /// what others are claiming, and counts none).
    pub claim_conflicts: u64,
    /// Reads this executor made to find work: candidate queries and idle looks.
    pub looks: u64,
    /// Notifications that woke this executor's idle workers (PostgreSQL).
    pub wakeups: u64,
    /// Times its listening connection failed or was lost (PostgreSQL).
    pub listener_lost: u64,
    /// True when a shutdown stopped the executor before the run was finished.
    pub interrupted: bool,
    /// How long the execution took.
    pub elapsed: Duration,
}

impl Summary {
    /// True when the run completed.
    pub fn is_completed(&self) -> bool {
        self.run_status == RunStatus::Completed.as_str()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        write!(
            f,
            "run {} {}{}: {} completed, {} failed, {} cancelled",
            self.run_id,
            self.run_status,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            c.completed,
            c.failed,
            c.cancelled
        )?;
        if c.skipped > 0 {
            write!(f, ", {} skipped", c.skipped)?;
        }
        if c.pending + c.running > 0 {
            write!(f, ", {} pending, {} running", c.pending, c.running)?;
        }
        write!(f, " of {} in {:.1}s", c.total(), self.elapsed.as_secs_f64())?;
        if self.retried > 0 {
            write!(
                f,
                "; rode out {} transient database failure(s)",
                self.retried
            )?;
        }
        Ok(())
    }
}

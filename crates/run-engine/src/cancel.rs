//! Cancelling a run: no new work is claimed, waiting work is cancelled, and running work is
//! stopped by the workers that hold it.

use crate::error::EngineError;
use crate::finish::settle_run;
use crate::lease::lease_expired;
use crate::queries::{StoryCounts, unfinished_stories};
use chrono::{DateTime, Utc};
use entity::{run, run_story};
use run_domain::{
    Changes, ConcurrencyError, Lifecycle, RetryPolicy, RunStatus, StoryStatus, TransitionError,
    VersionedUpdate, retry, transition, transition_with,
};
use sea_orm::{ConnectionTrait, TransactionTrait};
use uuid::Uuid;

/// What [`cancel_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelReport {
    /// The run as it is now.
    pub run: run::Model,
    /// False when the run was already cancelled.
    pub newly_cancelled: bool,
    /// Stories this call cancelled (pending ones, and running ones whose lease had expired).
    pub stories_cancelled: u64,
    /// Stories still running under a live lease: their workers see the cancellation within a
    /// second or so, stop them, and record them cancelled.
    pub still_running: u64,
}

/// Cancels the run: it becomes cancelled (workers stop claiming its stories), its pending
/// stories and the running ones nobody holds any more (expired lease) are cancelled, and epics
/// left with only finished stories are finished. Cancelling a cancelled run again only sweeps;
/// a completed or failed run is refused with [`EngineError::RunFinished`].
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let report = run_engine::cancel_run(db, run_id).await?;
/// println!("{} stories cancelled, {} still stopping", report.stories_cancelled, report.still_running);
/// # Ok(()) }
/// ```
pub async fn cancel_run<C>(db: &C, run_id: Uuid) -> Result<CancelReport, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let outcome = retry(&policy, |_| async {
        let run = run::Entity::find_versioned(db, run_id).await?;
        match RunStatus::parse(&run.status) {
            Some(RunStatus::Cancelled) => Ok((run, false)),
            Some(s) if s.is_terminal() => Ok((run, false)),
            _ => transition::<run::Entity, _>(db, &run, RunStatus::Cancelled)
                .await
                .map(|r| (r, true)),
        }
    })
    .await;
    let (run, newly_cancelled) = match outcome {
        Ok(v) => v,
        Err(TransitionError::Concurrency(ConcurrencyError::NotFound { .. })) => {
            return Err(EngineError::RunNotFound(run_id));
        }
        Err(e) => return Err(e.into()),
    };
    if run.status != RunStatus::Cancelled.as_str() {
        return Err(EngineError::RunFinished {
            run_id,
            status: run.status,
        });
    }
    let stories_cancelled = cancel_leftovers(db, run_id, Utc::now()).await?;
    let run = settle_run(db, run_id).await?;
    let still_running = StoryCounts::of_run(db, run_id).await?.running;
    Ok(CancelReport {
        run,
        newly_cancelled,
        stories_cancelled,
        still_running,
    })
}

/// Cancels the stories of a cancelled run that no worker will: the pending ones, and the
/// running ones whose lease expired before `now`. Returns how many it cancelled. A story that
/// a worker claims meanwhile is left to that worker.
pub async fn cancel_leftovers<C>(
    db: &C,
    run_id: Uuid,
    now: DateTime<Utc>,
) -> Result<u64, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let stories = unfinished_stories(db, run_id).await?;
    let mut cancelled = 0;
    for story in stories {
        let moved = transition_while(
            db,
            story,
            |current| {
                current.status == StoryStatus::Pending.as_str() || lease_expired(current, now)
            },
            StoryStatus::Cancelled,
            || Changes::new().set(run_story::Column::LeaseExpiresAt, None::<DateTime<Utc>>),
        )
        .await?;
        cancelled += u64::from(moved.is_some());
    }
    Ok(cancelled)
}

/// Moves `story` (as read) to `to` with `changes`, re-reading it on a conflict, for as long as
/// `still` holds of it; `None` when it no longer does (someone else moved it on first, or it is
/// gone). The one way cancellation and failure propagation change stories they did not claim.
pub(crate) async fn transition_while<C>(
    db: &C,
    story: run_story::Model,
    still: impl Fn(&run_story::Model) -> bool,
    to: StoryStatus,
    changes: impl Fn() -> Changes<run_story::Entity>,
) -> Result<Option<run_story::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let id = story.id;
    let policy = RetryPolicy::default();
    let (still, changes) = (&still, &changes);
    let result = retry(&policy, |attempt| {
        let first = (attempt == 1).then(|| story.clone());
        async move {
            let current = match first {
                Some(s) => s,
                None => run_story::Entity::find_versioned(db, id).await?,
            };
            if !still(&current) {
                return Ok(None);
            }
            transition_with::<run_story::Entity, _>(db, &current, to, changes())
                .await
                .map(Some)
        }
    })
    .await;
    match result {
        Ok(done) => Ok(done),
        Err(TransitionError::Illegal { .. })
        | Err(TransitionError::Concurrency(ConcurrencyError::NotFound { .. })) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

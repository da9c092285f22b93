//! Starting and finishing epics and runs as their stories start and finish, and the lines that
//! say so.
//!
//! The line that says an epic or a run finished is written *before* its status changes, under a
//! batch id derived from its id and verdict (written once however many workers race to write
//! it), so that whoever sees an epic finished has its line in the log before any later one. A
//! story's result line goes in before its result is recorded (see the executor), so the run's
//! closing line, written once every epic is finished, is the last line of its log in commit
//! order, on every path: completed, failed, and cancelled (then it is written by whoever
//! finishes the last epic, or by the cancellation itself when nothing was running).
//!
//! An epic starts (pending to running) with its first claimed story and finishes once every
//! story of it is terminal: failed if any story failed or was skipped, else cancelled if any was
//! cancelled, else completed. A run does the same over its epics. Several workers may race to do either: each
//! re-reads and decides again on a conflict, and one that finds the work already done is
//! content.

use crate::error::EngineError;
use crate::queries::StoryCounts;
use entity::{run, run_epic};
use run_domain::{
    Changes, ConcurrencyError, EpicStatus, Lifecycle, LogError, RetryPolicy, RunStatus,
    TransitionError, VersionedUpdate, append_run_logs_idempotent, retry, transition,
    transition_with,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, TransactionSession,
    TransactionTrait,
};
use uuid::Uuid;

fn unknown(entity: &'static str, id: Uuid, found: &str) -> TransitionError {
    TransitionError::UnknownStatus {
        entity,
        id,
        found: found.to_owned(),
    }
}

/// What a finished set of stories (or epics) adds up to: failed if any failed, else cancelled
/// if any was cancelled, else completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Completed,
    Failed,
    Cancelled,
}

impl Verdict {
    fn of(failed: u64, cancelled: u64) -> Verdict {
        if failed > 0 {
            Verdict::Failed
        } else if cancelled > 0 {
            Verdict::Cancelled
        } else {
            Verdict::Completed
        }
    }

    fn epic(self) -> EpicStatus {
        match self {
            Verdict::Completed => EpicStatus::Completed,
            Verdict::Failed => EpicStatus::Failed,
            Verdict::Cancelled => EpicStatus::Cancelled,
        }
    }

    fn run(self) -> RunStatus {
        match self {
            Verdict::Completed => RunStatus::Completed,
            Verdict::Failed => RunStatus::Failed,
            Verdict::Cancelled => RunStatus::Cancelled,
        }
    }
}

/// Moves the epic to running if it is still pending; returns it as it is now.
pub async fn start_epic<C>(db: &C, epic_id: Uuid) -> Result<run_epic::Model, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let result = retry(&policy, |_| async {
        let epic = run_epic::Entity::find_versioned(db, epic_id).await?;
        if epic.status != EpicStatus::Pending.as_str() {
            return Ok(epic);
        }
        transition::<run_epic::Entity, _>(db, &epic, EpicStatus::Running).await
    })
    .await;
    match result {
        Ok(epic) => Ok(epic),
        // Someone moved it on between the read and the change: fine, report what it is.
        Err(TransitionError::Illegal { .. }) => {
            Ok(run_epic::Entity::find_versioned(db, epic_id).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Moves the run to running if it is still pending; returns it as it is now (a caller that
/// finds it cancelled should not start work).
pub async fn start_run<C>(db: &C, run_id: Uuid) -> Result<run::Model, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    let result = retry(&policy, |_| async {
        let run = run::Entity::find_versioned(db, run_id).await?;
        if run.status != RunStatus::Pending.as_str() {
            return Ok(run);
        }
        transition::<run::Entity, _>(db, &run, RunStatus::Running).await
    })
    .await;
    match result {
        Ok(run) => Ok(run),
        Err(TransitionError::Illegal { .. }) => Ok(run::Entity::find_versioned(db, run_id).await?),
        Err(TransitionError::Concurrency(ConcurrencyError::NotFound { .. })) => {
            Err(EngineError::RunNotFound(run_id))
        }
        Err(e) => Err(e.into()),
    }
}

/// Finishes the epic if every story of it is terminal and it is not finished yet. Returns the
/// epic when this call finished it, `None` when there was nothing to do (stories left, or
/// someone else finished it).
pub async fn finish_epic_if_done<C>(
    db: &C,
    epic_id: Uuid,
) -> Result<Option<run_epic::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    retry(&policy, |_| async {
        let epic = run_epic::Entity::find_versioned(db, epic_id).await?;
        let status = EpicStatus::parse(&epic.status)
            .ok_or_else(|| unknown("run_epic", epic.id, &epic.status))?;
        if status.is_terminal() {
            return Ok(None);
        }
        // SAFETY(visibility): read after the caller's story transition committed, in a
        // statement of its own, so of two workers finishing the last two stories at least
        // the later one sees both terminal (every backend reads committed rows per statement
        // outside a transaction).
        let counts = StoryCounts::of_epic(db, epic_id).await?;
        if counts.unfinished() > 0 {
            return Ok(None);
        }
        // Every story is terminal, so the verdict can no longer change: its line may go in
        // before the epic's status, by whichever worker gets here.
        // A skipped story stands for the failure that skipped it, unless a story of the
        // epic was cancelled (then the skips follow from that: `cancel --story`).
        let skips_as_failures = if counts.cancelled == 0 {
            counts.skipped
        } else {
            0
        };
        let verdict = Verdict::of(counts.failed + skips_as_failures, counts.cancelled);
        let changes = if verdict == Verdict::Failed {
            Changes::new().set(run_epic::Column::Error, Some(failure_text(&counts)))
        } else {
            Changes::new()
        };
        append_closing_line(
            db,
            epic.run_id,
            finish_line_batch(epic.id, epic.retries, EPIC_LINE_SALT),
            format!("epic {} {}", epic.key, verdict.epic()),
        )
        .await?;
        match complete_epic(db, &epic, verdict.epic(), changes).await {
            Ok(epic) => Ok(Some(epic)),
            Err(TransitionError::Illegal { .. }) => Ok(None),
            // A conflict: `retry` reads again and decides again.
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// Finishes the run if every epic of it is terminal and it is not finished yet, writing its
/// closing line first. Returns the run when this call finished it. A run cancelled while its
/// stories ran is already terminal: once its last epic is finished, this writes its closing
/// line (and returns `None`).
pub async fn finish_run_if_done<C>(db: &C, run_id: Uuid) -> Result<Option<run::Model>, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let policy = RetryPolicy::default();
    retry(&policy, |_| async {
        let run = match run::Entity::find_versioned(db, run_id).await {
            Ok(run) => run,
            Err(ConcurrencyError::NotFound { .. }) => return Err(EngineError::RunNotFound(run_id)),
            Err(e) => return Err(e.into()),
        };
        let status =
            RunStatus::parse(&run.status).ok_or_else(|| unknown("run", run.id, &run.status))?;
        if status.is_terminal() && status != RunStatus::Cancelled {
            return Ok(None);
        }
        let epics = run_epic::Entity::find()
            .filter(run_epic::Column::RunId.eq(run_id))
            .all(db)
            .await?;
        let mut failed = 0u64;
        let mut cancelled = 0u64;
        for epic in &epics {
            match EpicStatus::parse(&epic.status) {
                Some(EpicStatus::Failed) => failed += 1,
                Some(EpicStatus::Cancelled) => cancelled += 1,
                Some(EpicStatus::Completed) => {}
                _ => return Ok(None),
            }
        }
        if status == RunStatus::Cancelled {
            // Every epic is finished, so every line of the run is in: close its log.
            append_closing_line(
                db,
                run_id,
                closing_line_batch(run_id, run.retries, status),
                closing_line(&run.key, status, run.error.as_deref()),
            )
            .await?;
            return Ok(None);
        }
        let verdict = Verdict::of(failed, cancelled);
        let error = if verdict == Verdict::Failed {
            let counts = StoryCounts::of_run(db, run_id).await?;
            Some(failure_text(&counts))
        } else {
            None
        };
        append_closing_line(
            db,
            run_id,
            closing_line_batch(run_id, run.retries, verdict.run()),
            closing_line(&run.key, verdict.run(), error.as_deref()),
        )
        .await?;
        let changes = match error {
            Some(error) => Changes::new().set(run::Column::Error, Some(error)),
            None => Changes::new(),
        };
        match transition_with::<run::Entity, _>(db, &run, verdict.run(), changes).await {
            Ok(run) => Ok(Some(run)),
            Err(TransitionError::Illegal { .. }) => Ok(None),
            Err(TransitionError::Concurrency(ConcurrencyError::NotFound { .. })) => {
                Err(EngineError::RunNotFound(run_id))
            }
            // A conflict: `retry` reads again and decides again.
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// Why an epic or a run failed: `2 of 9 stories failed`, with `, 3 skipped` when some never
/// started for want of a need.
fn failure_text(counts: &StoryCounts) -> String {
    match (counts.failed, counts.skipped) {
        (0, skipped) => format!("{skipped} of {} stories skipped", counts.total()),
        (failed, 0) => format!("{failed} of {} stories failed", counts.total()),
        (failed, skipped) => format!(
            "{failed} of {} stories failed, {skipped} skipped",
            counts.total()
        ),
    }
}

/// Moves `epic` to its terminal status `to`. An epic that others need and that completed does
/// so in one transaction with the count-down of their stories' unmet needs
/// ([`run_domain::satisfy_epic`]), so they become claimable exactly when it commits.
async fn complete_epic<C>(
    db: &C,
    epic: &run_epic::Model,
    to: EpicStatus,
    changes: Changes<run_epic::Entity>,
) -> Result<run_epic::Model, TransitionError>
where
    C: ConnectionTrait + TransactionTrait,
{
    if to != EpicStatus::Completed || epic.needed_by == 0 {
        return transition_with::<run_epic::Entity, _>(db, epic, to, changes).await;
    }
    let tx = db.begin().await.map_err(ConcurrencyError::from)?;
    let done = transition_with::<run_epic::Entity, _>(&tx, epic, to, changes).await?;
    run_domain::satisfy_epic(&tx, epic.id)
        .await
        .map_err(ConcurrencyError::from)?;
    tx.commit().await.map_err(ConcurrencyError::from)?;
    Ok(done)
}

/// The run's closing line: `run <key> <status>`, with its error when it has one.
fn closing_line(key: &str, status: RunStatus, error: Option<&str>) -> String {
    match error {
        Some(error) => format!("run {key} {status}: {error}"),
        None => format!("run {key} {status}"),
    }
}

/// Appends a line that says an epic or the run finished, under its derived batch id: written
/// once however often and by whomever it is tried.
async fn append_closing_line<C>(
    db: &C,
    run_id: Uuid,
    batch_id: Uuid,
    line: String,
) -> Result<(), EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    match append_run_logs_idempotent(db, run_id, batch_id, [line]).await {
        Ok(_) => Ok(()),
        Err(LogError::RunNotFound { .. }) => Err(EngineError::RunNotFound(run_id)),
        Err(e) => Err(e.into()),
    }
}

/// Salts of the batch ids of the lines that say an epic or a run finished.
const EPIC_LINE_SALT: u128 = 0x5a17_e91c_0000_0000_0000_0000_0000_0001;
const RUN_LINE_SALT: u128 = 0x5a17_7a11_0000_0000_0000_0000_0000_0002;
const CANCELLED_RUN_LINE_SALT: u128 = 0x5a17_7a11_0000_0000_0000_0000_0000_0003;

/// The batch id of the run's closing line for the terminal `status` it closed with: a
/// follower that sees the run in that status has read its whole log once it has read the line
/// with this batch id. (A run that completed or failed closes under one id, which earlier
/// versions used for every status; a cancelled run under its own, since a cancellation may
/// overtake a run whose closing line is already written.)
///
/// `retries` is the run's (`run.retries`): a run retried and finished again closes its log
/// again, under another id.
///
/// ```
/// use run_domain::RunStatus;
/// let run = uuid::Uuid::new_v4();
/// let done = run_engine::closing_line_batch(run, 0, RunStatus::Completed);
/// assert_eq!(done, run_engine::closing_line_batch(run, 0, RunStatus::Completed));
/// assert_ne!(done, run_engine::closing_line_batch(run, 0, RunStatus::Cancelled));
/// assert_ne!(done, run_engine::closing_line_batch(run, 1, RunStatus::Completed));
/// ```
pub fn closing_line_batch(run_id: Uuid, retries: i32, status: RunStatus) -> Uuid {
    match status {
        RunStatus::Cancelled => finish_line_batch(run_id, retries, CANCELLED_RUN_LINE_SALT),
        _ => finish_line_batch(run_id, retries, RUN_LINE_SALT),
    }
}

/// The batch id of the line that says the epic or run `id` finished (after `retries` retries
/// of its run): derived from the id, so that whichever worker writes the line, however often,
/// it is written once per finish. A version-8 (custom) UUID, so it never equals the random
/// (version-4) batch id of any other line. With no retry it is the id every earlier version
/// wrote.
fn finish_line_batch(id: Uuid, retries: i32, salt: u128) -> Uuid {
    // The retry count goes into the top 32 bits, clear of the version and variant bits.
    let generation = u128::from(retries.unsigned_abs()) << 96;
    let bits = id.as_u128() ^ salt ^ generation;
    let version = 0xf_u128 << 76;
    let variant = 0x3_u128 << 62;
    Uuid::from_u128((bits & !version & !variant) | (0x8 << 76) | (0x2 << 62))
}

/// Finishes every epic of the run whose stories are all terminal, then the run if its epics
/// all are; returns the run as it is now. Safe to call any time, from anywhere: it only
/// finishes what is done (a worker that died between its last story and the epic leaves work
/// for this).
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let run = run_engine::settle_run(db, run_id).await?;
/// println!("run is {}", run.status);
/// # Ok(()) }
/// ```
pub async fn settle_run<C>(db: &C, run_id: Uuid) -> Result<run::Model, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let epics = run_epic::Entity::find()
        .filter(run_epic::Column::RunId.eq(run_id))
        .order_by_asc(run_epic::Column::Position)
        .all(db)
        .await?;
    for epic in epics {
        let terminal = EpicStatus::parse(&epic.status).is_some_and(|s| s.is_terminal());
        if !terminal {
            finish_epic_if_done(db, epic.id).await?;
        }
    }
    finish_run_if_done(db, run_id).await?;
    run::Entity::find_versioned(db, run_id)
        .await
        .map_err(|e| match e {
            ConcurrencyError::NotFound { .. } => EngineError::RunNotFound(run_id),
            e => e.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_line_batch_ids_are_stable_distinct_and_never_random_ones() {
        let epic = Uuid::new_v4();
        let a = finish_line_batch(epic, 0, EPIC_LINE_SALT);
        assert_eq!(a, finish_line_batch(epic, 0, EPIC_LINE_SALT));
        assert_ne!(a, finish_line_batch(epic, 0, RUN_LINE_SALT));
        assert_ne!(a, finish_line_batch(Uuid::new_v4(), 0, EPIC_LINE_SALT));
        assert_ne!(a, finish_line_batch(epic, 1, EPIC_LINE_SALT));
        assert_eq!(a.get_version_num(), 8);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        let again = finish_line_batch(epic, 7, EPIC_LINE_SALT);
        assert_eq!(again.get_version_num(), 8);
        assert_eq!(again.get_variant(), uuid::Variant::RFC4122);
        // No retry: the id earlier versions wrote.
        let bits = epic.as_u128() ^ EPIC_LINE_SALT;
        let old = (bits & !(0xf_u128 << 76) & !(0x3_u128 << 62)) | (0x8 << 76) | (0x2 << 62);
        assert_eq!(a, Uuid::from_u128(old));
        let run = Uuid::new_v4();
        assert_ne!(
            closing_line_batch(run, 0, RunStatus::Completed),
            closing_line_batch(run, 0, RunStatus::Cancelled)
        );
        assert_eq!(
            closing_line_batch(run, 0, RunStatus::Completed),
            closing_line_batch(run, 0, RunStatus::Failed)
        );
    }
}

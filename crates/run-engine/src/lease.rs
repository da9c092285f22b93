//! A story's lease, from claim to release.
//!
//! - **Claim**: a pending story becomes running by compare-and-swap on the version the worker
//!   read, with `lease_owner` (the worker's id), `lease_expires_at` (now + the lease) and one
//!   more attempt, in the same statement ([`try_claim`]). Of several workers that read the same
//!   version, exactly one wins; the others get a conflict and move on to another candidate.
//! - **Renew**: while the story runs, its worker pushes `lease_expires_at` forward by
//!   compare-and-swap ([`renew_lease`]), and keeps the version each renewal returns.
//! - **Take over**: a running story whose lease expired (its worker died or stalled) is claimed
//!   again by compare-and-swap, one more attempt counted, unless its attempts are used up, in
//!   which case it fails.
//! - **Release**: the result is recorded by a transition from the version of the worker's last
//!   successful renewal ([`release`], [`give_back`]).
//!
//! - **Lost answers**: a claim, renewal or release whose try failed with a transient database
//!   error may have committed all the same, its answer lost. Its worker re-reads the row and
//!   recognises its own write ([`claimed_by`], [`still_held`], [`released_by`]) instead of
//!   taking a conflict with itself for a take-over.
//!
//! Fencing comes from the version, not from the lease fields: once another worker took the story
//! over, the version moved on, so every renewal and the release of the old holder conflict, and
//! its result is dropped.
//!
//! Lease times come from the workers' clocks: processes on several machines need clocks that
//! agree to well within a lease (NTP does).

use crate::error::EngineError;
use chrono::{DateTime, Utc};
use entity::run_story;
use run_domain::{
    Changes, ConcurrencyError, Lifecycle, StoryStatus, TransitionError, VersionedUpdate,
    transition_with,
};
use sea_orm::{ConnectionTrait, TransactionSession, TransactionTrait};
use std::time::Duration;

/// Who holds a story and for how long at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The worker's id, stored in `lease_owner` (at most 255 bytes).
    pub owner: String,
    /// How long a claim or a renewal holds the story.
    pub duration: Duration,
}

impl Lease {
    /// A lease for `owner` of `duration` at a time.
    pub fn new(owner: impl Into<String>, duration: Duration) -> Lease {
        Lease {
            owner: owner.into(),
            duration,
        }
    }

    /// When a lease taken or renewed at `now` runs out.
    pub fn expires_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let d = chrono::Duration::from_std(self.duration).unwrap_or(chrono::Duration::MAX);
        now.checked_add_signed(d)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// A story this worker now holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The story as written by the claim: running, leased to us, `attempts` counting this one.
    pub story: run_story::Model,
    /// The previous holder, when this claim took over an expired lease.
    pub taken_over_from: Option<String>,
}

/// What one claim attempt on one candidate did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryClaim {
    /// The story is ours.
    Claimed(Claim),
    /// Its lease had expired and its attempts were used up: it was marked failed.
    Exhausted(run_story::Model),
    /// Someone else changed it first, or it is no longer claimable: try another.
    Lost,
    /// Every slot of this limit it holds was taken: try a story that does not hold it.
    LimitFull(String),
}

/// True when a story read at `now` is running on a lease that ran out (or has none).
pub fn lease_expired(story: &run_story::Model, now: DateTime<Utc>) -> bool {
    story.status == StoryStatus::Running.as_str() && story.lease_expires_at.is_none_or(|t| t < now)
}

/// Tries to claim `candidate` (as read) for `lease` at `now`: a pending story is moved to
/// running; a running story whose lease expired is taken over, or failed when its attempts are
/// used up. Anything else, or a conflict, is [`TryClaim::Lost`].
///
/// ```no_run
/// use run_engine::{Lease, TryClaim, pending_candidates, try_claim};
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let lease = Lease::new("host-1234-0", std::time::Duration::from_secs(30));
/// for candidate in pending_candidates(db, run_id, 64).await? {
///     if let TryClaim::Claimed(claim) = try_claim(db, &candidate, &lease, chrono::Utc::now()).await? {
///         println!("claimed {} (attempt {})", claim.story.key, claim.story.attempts);
///         break;
///     }
/// }
/// # Ok(()) }
/// ```
pub async fn try_claim<C>(
    db: &C,
    candidate: &run_story::Model,
    lease: &Lease,
    now: DateTime<Utc>,
) -> Result<TryClaim, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let status = parse_status(candidate)?;
    let lease_changes = || {
        Changes::<run_story::Entity>::new()
            .set(run_story::Column::LeaseOwner, Some(lease.owner.clone()))
            .set(
                run_story::Column::LeaseExpiresAt,
                Some(lease.expires_at(now)),
            )
            .set(run_story::Column::Attempts, candidate.attempts + 1)
    };
    match status {
        StoryStatus::Pending => {
            // SAFETY(claim): one compare-and-swap statement on the version read; of all
            // workers that read this version, only the first to commit matches.
            match transition_with::<run_story::Entity, _>(
                db,
                candidate,
                StoryStatus::Running,
                lease_changes(),
            )
            .await
            {
                Ok(story) => Ok(TryClaim::Claimed(Claim {
                    story,
                    taken_over_from: None,
                })),
                Err(TransitionError::LimitFull { limit, .. }) => Ok(TryClaim::LimitFull(limit)),
                Err(e) if lost_race(&e) => Ok(TryClaim::Lost),
                Err(e) => Err(e.into()),
            }
        }
        StoryStatus::Running if lease_expired(candidate, now) => {
            if candidate.attempts >= candidate.max_attempts {
                let error = format!(
                    "the lease of {} expired during attempt {} of {}; no attempts left",
                    candidate
                        .lease_owner
                        .as_deref()
                        .unwrap_or("an unknown worker"),
                    candidate.attempts,
                    candidate.max_attempts
                );
                return match transition_with::<run_story::Entity, _>(
                    db,
                    candidate,
                    StoryStatus::Failed,
                    Changes::new()
                        .set(run_story::Column::Error, Some(error))
                        .set(run_story::Column::LeaseExpiresAt, None::<DateTime<Utc>>),
                )
                .await
                {
                    Ok(story) => Ok(TryClaim::Exhausted(story)),
                    Err(e) if lost_race(&e) => Ok(TryClaim::Lost),
                    Err(e) => Err(e.into()),
                };
            }
            // SAFETY(fencing): the take-over bumps the version, so the previous holder's next
            // renewal or release, made from the version it knew, conflicts.
            // Not while the run is paused: a take-over starts the story again.
            match run_story::Entity::update_versioned(
                db,
                candidate.id,
                candidate.version,
                lease_changes().guard(run_domain::run_not_paused()),
            )
            .await
            {
                Ok(story) => Ok(TryClaim::Claimed(Claim {
                    story,
                    taken_over_from: candidate.lease_owner.clone(),
                })),
                Err(e) if e.is_conflict() => Ok(TryClaim::Lost),
                Err(ConcurrencyError::NotFound { .. }) => Ok(TryClaim::Lost),
                Err(e) => Err(e.into()),
            }
        }
        _ => Ok(TryClaim::Lost),
    }
}

/// True when `now` (the story as just re-read) is exactly what claiming `candidate` for
/// `owner` writes: the next version, running, leased to `owner`, one more attempt. A claim that
/// failed with a transient error may have committed with its answer lost; this recognises it.
pub fn claimed_by(now: &run_story::Model, candidate: &run_story::Model, owner: &str) -> bool {
    now.id == candidate.id
        && now.version == candidate.version + 1
        && now.status == StoryStatus::Running.as_str()
        && now.lease_owner.as_deref() == Some(owner)
        && now.attempts == candidate.attempts + 1
}

/// True when `now` (the story as just re-read) is still held by the worker `owner` that last
/// wrote it as `held`: running, leased to `owner`, and not claimed since (the same attempt
/// count). Then every write since `held` was that worker's own: a renewal whose answer was
/// lost (a transient error, or a renewal dropped in flight) that committed all the same.
///
/// Why this cannot be someone else's write: a running story changes hands only by a take-over,
/// which writes the taker's id and counts an attempt. From there on the count never drops
/// below `held.attempts + 1` (a give-back takes back only the attempt its own claim counted),
/// and no other worker writes `owner`'s id.
pub fn still_held(now: &run_story::Model, held: &run_story::Model, owner: &str) -> bool {
    now.id == held.id
        && now.version >= held.version
        && now.status == StoryStatus::Running.as_str()
        && now.lease_owner.as_deref() == Some(owner)
        && now.attempts == held.attempts
}

/// True when `now` (the story as just re-read) is exactly what releasing `held` with `how`
/// (`None`: giving it back) writes, one version on: a release whose answer was lost but that
/// committed.
pub fn released_by(
    now: &run_story::Model,
    held: &run_story::Model,
    how: Option<&Release>,
    owner: &str,
) -> bool {
    let (status, attempts, owner_after) = match how {
        Some(how) => {
            let to = how.target(held);
            let owner_after = (to != StoryStatus::Pending).then_some(owner);
            (to, held.attempts, owner_after)
        }
        None => (StoryStatus::Pending, (held.attempts - 1).max(0), None),
    };
    now.id == held.id
        && now.version == held.version + 1
        && now.status == status.as_str()
        && now.attempts == attempts
        && now.lease_owner.as_deref() == owner_after
}

/// Someone else got there first: a conflict, a vanished row, or a status the candidate no
/// longer has; or the candidate cannot start now (a need, its retry delay, a paused run, a
/// full limit).
fn lost_race(e: &TransitionError) -> bool {
    matches!(
        e,
        TransitionError::Illegal { .. }
            | TransitionError::Waiting { .. }
            | TransitionError::NotReady { .. }
            | TransitionError::LimitFull { .. }
            | TransitionError::Concurrency(
                ConcurrencyError::Conflict { .. } | ConcurrencyError::NotFound { .. }
            )
    )
}

fn parse_status(story: &run_story::Model) -> Result<StoryStatus, EngineError> {
    StoryStatus::parse(&story.status).ok_or_else(|| EngineError::UnknownStatus {
        entity: "run_story",
        id: story.id,
        found: story.status.clone(),
    })
}

/// Pushes the lease of `held` (the story as this worker last wrote it) to `now + lease`.
/// Returns the story as written, whose version the worker must keep; a
/// [`ConcurrencyError::Conflict`] means the story was taken over or changed: the worker is
/// fenced off and must stop.
pub async fn renew_lease<C>(
    db: &C,
    held: &run_story::Model,
    lease: &Lease,
    now: DateTime<Utc>,
) -> Result<run_story::Model, ConcurrencyError>
where
    C: ConnectionTrait + TransactionTrait,
{
    run_story::Entity::update_versioned(
        db,
        held.id,
        held.version,
        Changes::new().set(
            run_story::Column::LeaseExpiresAt,
            Some(lease.expires_at(now)),
        ),
    )
    .await
}

/// How a worker lets go of a story it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// The work succeeded: completed.
    Completed,
    /// The work failed: back to pending while attempts remain (not claimed again before its
    /// retry delay, if it has one, has passed), else failed.
    Failed {
        /// Stored in the story's `error`.
        error: String,
    },
    /// The run was cancelled: cancelled.
    Cancelled,
}

impl Release {
    /// The status releasing `held` this way writes: a failure goes back to pending while
    /// `held.attempts < held.max_attempts`.
    pub fn target(&self, held: &run_story::Model) -> StoryStatus {
        match self {
            Release::Completed => StoryStatus::Completed,
            Release::Cancelled => StoryStatus::Cancelled,
            Release::Failed { .. } if held.attempts < held.max_attempts => StoryStatus::Pending,
            Release::Failed { .. } => StoryStatus::Failed,
        }
    }
}

/// Records the result of the attempt on `held` (the story as this worker last wrote it) by a
/// transition from that version, with `held.started_at` as the attempt's start. The lease's
/// expiry is cleared; `lease_owner` stays, naming the
/// worker that recorded the result. A conflict means the worker was fenced off and nothing was
/// recorded. A completed story that others need (`needed_by > 0`) is completed in one
/// transaction with [`run_domain::mark_met`] and [`run_domain::let_go`]; see
/// [`release_letting_go`] for what to call after it.
///
/// ```no_run
/// use run_engine::{Release, release};
/// # async fn demo(db: &sea_orm::DatabaseConnection, held: entity::run_story::Model) -> Result<(), run_domain::TransitionError> {
/// let done = release(db, &held, Release::Failed { error: "exit status 1".into() }).await?;
/// println!("now {}", done.status); // pending again if attempts remain, else failed
/// # Ok(()) }
/// ```
pub async fn release<C>(
    db: &C,
    held: &run_story::Model,
    how: Release,
) -> Result<run_story::Model, TransitionError>
where
    C: ConnectionTrait + TransactionTrait,
{
    Ok(release_letting_go(db, held, how).await?.0)
}

/// Like [`release`]; also returns the stories that need it that a completion let go in its
/// own transaction (those whose only unmet need it was), now claimable. When they are fewer
/// than `held.needed_by`, call [`run_domain::let_go`] after this returns: a story whose other
/// need completed in the same instant is let go then.
pub async fn release_letting_go<C>(
    db: &C,
    held: &run_story::Model,
    how: Release,
) -> Result<(run_story::Model, Vec<run_story::Model>), TransitionError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let no_expiry = Changes::<run_story::Entity>::new()
        .set(run_story::Column::LeaseExpiresAt, None::<DateTime<Utc>>)
        // The attempt's start as its holder knows it (later than the claim for a story that
        // waited in its process's queue).
        .set(run_story::Column::StartedAt, held.started_at);
    let to = how.target(held);
    let changes = match (how, to) {
        (Release::Completed, _) => no_expiry.set(run_story::Column::Error, None::<String>),
        (Release::Cancelled, _) => no_expiry,
        (Release::Failed { error }, StoryStatus::Pending) => no_expiry
            .set(run_story::Column::Error, Some(error))
            .set(run_story::Column::LeaseOwner, None::<String>)
            .set(
                run_story::Column::NotBeforeMs,
                run_domain::RetryDelay::from_column(held.retry_delay.as_deref())
                    .map(|r| r.not_before(held.attempts, run_domain::now_ms())),
            ),
        (Release::Failed { error }, _) => no_expiry.set(run_story::Column::Error, Some(error)),
    };
    if to != StoryStatus::Completed || held.needed_by == 0 {
        let done = transition_with::<run_story::Entity, _>(db, held, to, changes).await?;
        return Ok((done, Vec::new()));
    }
    // One commit for the result, the marks on the rows of the stories that need it, and the
    // stories it was the last need of; the caller lets go after the commit those whose other
    // needs completed in the same instant (`run_domain::let_go`, see `run_domain::needs`).
    let tx = db.begin().await.map_err(ConcurrencyError::from)?;
    let done = transition_with::<run_story::Entity, _>(&tx, held, to, changes).await?;
    run_domain::mark_met(&tx, held.id)
        .await
        .map_err(ConcurrencyError::from)?;
    // Its own marks are visible here: the stories it was the only unmet need of go now.
    let gone = run_domain::let_go(&tx, held.id)
        .await
        .map_err(ConcurrencyError::from)?;
    tx.commit().await.map_err(ConcurrencyError::from)?;
    Ok((done, gone))
}

/// Gives the lease on `held` back without a result: the story returns to pending and the
/// attempt is not counted (for a worker that is shutting down).
pub async fn give_back<C>(
    db: &C,
    held: &run_story::Model,
) -> Result<run_story::Model, TransitionError>
where
    C: ConnectionTrait + TransactionTrait,
{
    transition_with::<run_story::Entity, _>(
        db,
        held,
        StoryStatus::Pending,
        Changes::new()
            .set(run_story::Column::Attempts, (held.attempts - 1).max(0))
            .set(run_story::Column::LeaseOwner, None::<String>)
            .set(run_story::Column::LeaseExpiresAt, None::<DateTime<Utc>>),
    )
    .await
}

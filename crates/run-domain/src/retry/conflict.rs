//! Retrying compare-and-swap after a conflict: re-read, re-apply, try again.
//!
//! Bounded attempts, exponential backoff with full jitter (each wait is uniform in
//! `0..=min(max_delay, base_delay * 2^attempt)`), and on giving up the last conflict is returned.
//!
//! # Where compare-and-swap loses
//! Optimistic updates win when writers rarely meet: spread over many rows, they scale with
//! writers. On one hot row they waste work: measured on this project's machine (PostgreSQL,
//! see `../shared/MEASUREMENTS.md` and `BENCHMARKS.md`), 8 writers on one row saw ~79 % of
//! attempts conflict and finished ~3x fewer updates per second than `SELECT ... FOR UPDATE`
//! followed by an update. When many writers must change one row, serialise them (a row lock,
//! or a queue), or give each writer its own row; keep compare-and-swap for state that is
//! contended only now and then (a story's status, a lease, a run's completion).

use super::{Retryable, Schedule, retry_when};
use crate::error::ConcurrencyError;
use crate::versioned::{Changes, VersionedUpdate, find_current};
use sea_orm::{ConnectionTrait, TransactionTrait};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The wait bound after the first conflict.
    pub base_delay: Duration,
    /// The largest wait bound.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 16 attempts, waits bounded by 1 ms doubling to 100 ms.
    fn default() -> Self {
        Self {
            max_attempts: 16,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// A policy with `max_attempts` attempts and the default delays.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..Self::default()
        }
    }

    /// The jittered wait before attempt `attempt + 1` (after `attempt` failures, from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let bound = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

impl Schedule for RetryPolicy {
    fn allows(&self, failures: u32, _elapsed: Duration) -> bool {
        failures < self.max_attempts.max(1)
    }

    fn wait(&self, failures: u32, _elapsed: Duration) -> Duration {
        self.delay(failures)
    }
}

/// Runs `op` until it succeeds, fails with anything but a conflict, or `policy.max_attempts`
/// runs out, waiting a jittered, growing delay between attempts. `op` gets the attempt number (from
/// 1) and must re-read whatever it depends on.
///
/// ```no_run
/// use entity::run;
/// use run_domain::{RetryPolicy, RunStatus, VersionedUpdate, retry, transition};
/// # async fn demo(db: &sea_orm::DatabaseConnection, id: uuid::Uuid) -> Result<(), run_domain::TransitionError> {
/// let done = retry(&RetryPolicy::default(), |_attempt| async {
///     let current = run::Entity::find_versioned(db, id).await?;
///     transition::<run::Entity, _>(db, &current, RunStatus::Completed).await
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, op: F) -> Result<T, E>
where
    E: Retryable,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry_when(policy, op, |e: &E| e.is_conflict()).await.0
}

/// Reads the row, computes its changes with `change`, and compare-and-swaps them; on a conflict
/// re-reads and re-applies `change` to the fresh row, up to `policy.max_attempts` times.
/// Returns the row as written, or the last conflict.
///
/// Works inside a caller's transaction too: the row is read as committed now (on MariaDB, where
/// a plain read inside a transaction returns the transaction's snapshot, with a locking read,
/// which keeps the row locked until the transaction ends), so a retry sees the version that beat
/// the last try.
///
/// ```no_run
/// use entity::run_story;
/// use run_domain::{Changes, RetryPolicy, update_with_retry};
/// use sea_orm::sea_query::{Expr, ExprTrait};
/// # async fn demo(db: &sea_orm::DatabaseConnection, id: uuid::Uuid) -> Result<(), run_domain::ConcurrencyError> {
/// let story = update_with_retry::<run_story::Entity, _, _>(db, id, &RetryPolicy::default(), |s| {
///     Changes::new().set(run_story::Column::Attempts, s.attempts + 1)
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn update_with_retry<E, C, F>(
    db: &C,
    id: Uuid,
    policy: &RetryPolicy,
    mut change: F,
) -> Result<E::Model, ConcurrencyError>
where
    E: VersionedUpdate,
    E::Model: Sync,
    C: ConnectionTrait + TransactionTrait,
    F: FnMut(&E::Model) -> Changes<E>,
{
    // The loop of `retry_when`, written out because `change` is borrowed mutably by each try.
    let started = Instant::now();
    let mut failures = 0u32;
    loop {
        // SAFETY(snapshot): a current read, so that inside a caller's transaction on MariaDB
        // a retry sees the version that beat it, not its snapshot's (and so can succeed).
        let current = find_current::<E, C>(db, id).await?;
        let changes = change(&current);
        match E::update_versioned(db, id, E::version_of(&current), changes).await {
            Err(e) if e.is_conflict() && policy.allows(failures + 1, started.elapsed()) => {
                failures += 1;
                tokio::time::sleep(policy.wait(failures, started.elapsed())).await;
            }
            result => return result,
        }
    }
}

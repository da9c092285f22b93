//! Trying again: one mechanism for every retry in the workspace.
//!
//! Two kinds of failure are worth another try, each with its policy:
//!
//! - a **version conflict** ([`Retryable::is_conflict`]): someone changed the row first; re-read
//!   and re-apply, a bounded number of times ([`RetryPolicy`], [`retry`], [`update_with_retry`]);
//! - a **transient database failure** ([`Retryable::is_transient`], [`is_transient`]): the call
//!   is tried again as it is, for up to a time budget ([`TransientPolicy`], [`retry_transient`]).
//!
//! Both go through one loop, [`retry_when`]: a [`Schedule`] says how long to keep trying and how
//! long to wait, and the caller says which errors to try again.

mod conflict;
mod transient;

pub use conflict::{RetryPolicy, retry, update_with_retry};
pub use transient::{TransientPolicy, backoff, is_transient};

use crate::error::{ConcurrencyError, LogError, TransitionError};
use sea_orm::DbErr;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// An error that says whether trying again may succeed, and how.
pub trait Retryable {
    /// A version conflict: re-read the row and try again.
    fn is_conflict(&self) -> bool {
        false
    }

    /// A transient database failure ([`is_transient`]): try the same call again.
    fn is_transient(&self) -> bool;
}

impl Retryable for DbErr {
    fn is_transient(&self) -> bool {
        is_transient(self)
    }
}

impl Retryable for ConcurrencyError {
    fn is_conflict(&self) -> bool {
        ConcurrencyError::is_conflict(self)
    }

    fn is_transient(&self) -> bool {
        matches!(self, ConcurrencyError::Database(e) if is_transient(e))
    }
}

impl Retryable for TransitionError {
    fn is_conflict(&self) -> bool {
        TransitionError::is_conflict(self)
    }

    fn is_transient(&self) -> bool {
        matches!(self, TransitionError::Concurrency(c) if Retryable::is_transient(c))
    }
}

impl Retryable for LogError {
    fn is_transient(&self) -> bool {
        matches!(self, LogError::Database(e) if is_transient(e))
    }
}

/// When to stop trying and how long to wait in between.
pub trait Schedule {
    /// Whether another try may follow `failures` failed ones (from 1), `elapsed` after the first.
    fn allows(&self, failures: u32, elapsed: Duration) -> bool;
    /// How long to wait before the next try.
    fn wait(&self, failures: u32, elapsed: Duration) -> Duration;
}

/// The one retry loop: runs `op` (given the attempt number, from 1) until it succeeds, fails
/// with an error `again` refuses, or `schedule` allows no more tries. `again` is asked only when
/// another try is allowed, so it may count or report the retry. Returns the last result and how
/// many tries failed before it (a caller whose write may have committed on a failed try checks
/// when this is not zero).
///
/// ```
/// use run_domain::retry::{TransientPolicy, retry_when};
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut tries = 0;
/// let (result, failed) = retry_when(
///     &TransientPolicy::within(Some(Duration::from_secs(5))),
///     |_attempt| {
///         tries += 1;
///         let fail = tries < 3;
///         async move { if fail { Err("busy") } else { Ok(tries) } }
///     },
///     |e: &&str| *e == "busy",
/// )
/// .await;
/// assert_eq!((result, failed), (Ok(3), 2));
/// # }
/// ```
pub async fn retry_when<T, E, S, F, Fut>(
    schedule: &S,
    mut op: F,
    mut again: impl FnMut(&E) -> bool,
) -> (Result<T, E>, u32)
where
    S: Schedule + ?Sized,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut failures = 0u32;
    loop {
        match op(failures + 1).await {
            Err(e) if schedule.allows(failures + 1, started.elapsed()) && again(&e) => {
                failures += 1;
                tracing::debug!(failures, "trying again");
                tokio::time::sleep(schedule.wait(failures, started.elapsed())).await;
            }
            result => return (result, failures),
        }
    }
}

/// Runs `op` through transient failures for up to `budget` (`None`: never try again);
/// `on_retry` hears of each failure that will be tried again. Returns the result and how many
/// tries failed before it.
pub async fn retry_transient<T, E, F, Fut>(
    budget: Option<Duration>,
    mut op: F,
    mut on_retry: impl FnMut(&E),
) -> (Result<T, E>, u32)
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry_when(
        &TransientPolicy::within(budget),
        |_| op(),
        |e: &E| {
            let transient = e.is_transient();
            if transient {
                on_retry(e);
            }
            transient
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient() -> DbErr {
        DbErr::Conn(sea_orm::RuntimeErr::Internal("connection reset".into()))
    }

    #[test]
    fn backoff_grows_to_its_bound_with_jitter() {
        for failures in 1..40 {
            let d = backoff(failures);
            assert!(d <= Duration::from_secs(2), "{failures}: {d:?}");
            assert!(d >= Duration::from_millis(25), "{failures}: {d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(50));
        assert!(backoff(20) >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn transient_failures_are_retried_within_the_budget_only() {
        let mut tries = 0;
        let (result, failed) = retry_transient(
            Some(Duration::from_secs(30)),
            || {
                tries += 1;
                let fail = tries < 4;
                async move { if fail { Err(transient()) } else { Ok(tries) } }
            },
            |_| {},
        )
        .await;
        assert_eq!((result.ok(), failed), (Some(4), 3));

        let started = Instant::now();
        let (result, failed) = retry_transient::<(), _, _, _>(
            Some(Duration::from_millis(400)),
            || async { Err(transient()) },
            |_| {},
        )
        .await;
        assert!(result.is_err());
        assert!(failed >= 3, "{failed}");
        let spent = started.elapsed();
        assert!(
            spent >= Duration::from_millis(400) && spent < Duration::from_secs(3),
            "{spent:?}"
        );
    }

    #[tokio::test]
    async fn other_failures_and_a_disabled_budget_are_not_retried() {
        let mut tries = 0;
        let (result, failed) = retry_transient::<(), _, _, _>(
            Some(Duration::from_secs(30)),
            || {
                tries += 1;
                async { Err(DbErr::Custom("syntax error".into())) }
            },
            |_| {},
        )
        .await;
        assert!(result.is_err());
        assert_eq!((tries, failed), (1, 0));

        let mut tries = 0;
        let (result, _) = retry_transient::<(), _, _, _>(
            None,
            || {
                tries += 1;
                async { Err(transient()) }
            },
            |_| {},
        )
        .await;
        assert!(result.is_err());
        assert_eq!(tries, 1);
    }

    #[tokio::test]
    async fn conflicts_are_retried_up_to_the_attempts() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_micros(1),
            max_delay: Duration::from_micros(10),
        };
        let mut tries = 0;
        let result: Result<(), ConcurrencyError> = retry(&policy, |_| {
            tries += 1;
            async {
                Err(ConcurrencyError::Conflict {
                    entity: "run",
                    id: uuid::Uuid::nil(),
                    expected: 1,
                    actual: 2,
                })
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(tries, 3);
    }
}

//! Riding out transient database failures: a dropped or killed connection, a server that
//! restarts, a pool with no connection in time, a deadlock victim
//! ([`run_domain::connection::is_transient`]).
//!
//! A call that fails that way is tried again as it is, after a jittered backoff (50 ms doubling
//! to 2 s), until a time budget is spent (30 s by default: a server restart takes a few). Other
//! failures are returned at once: trying them again would fail the same way.
//!
//! Only calls that may be repeated are retried blindly: reads, and writes whose repetition is
//! harmless (appends under one batch id, "finish the epic if it is done"). A compare-and-swap
//! whose answer was lost may have committed; the caller re-reads the row and recognises its
//! own write (see [`crate::lease::still_held`]).

use crate::error::TransientDb;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// The first wait after a transient failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The wait after the `failures`-th failure in a row (from 1): 50 ms doubling to 2 s, each
/// drawn between half and all of that, so that workers that failed together do not retry in
/// step.
pub(crate) fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let bound = FIRST_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF);
    bound.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Runs `op` until it succeeds, fails for good, or `budget` is spent (`None`: never try again);
/// `on_retry` hears of each transient failure that will be tried again. Returns the result and
/// how many tries failed before it (a caller whose write may have committed on a failed try
/// checks when this is not zero).
pub(crate) async fn retry_transient<T, E, F, Fut>(
    budget: Option<Duration>,
    mut op: F,
    mut on_retry: impl FnMut(&E),
) -> (Result<T, E>, u32)
where
    E: TransientDb,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut failures = 0u32;
    loop {
        match op().await {
            Err(e) if e.is_transient_db() && budget.is_some_and(|b| started.elapsed() < b) => {
                failures += 1;
                on_retry(&e);
                let left = budget.unwrap_or_default().saturating_sub(started.elapsed());
                tokio::time::sleep(backoff(failures).min(left)).await;
            }
            result => return (result, failures),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{DbErr, RuntimeErr};

    fn transient() -> DbErr {
        DbErr::Conn(RuntimeErr::Internal("connection reset".into()))
    }

    #[test]
    fn backoff_grows_to_its_bound_with_jitter() {
        for failures in 1..40 {
            let d = backoff(failures);
            assert!(d <= MAX_BACKOFF, "{failures}: {d:?}");
            assert!(d >= FIRST_BACKOFF / 2, "{failures}: {d:?}");
        }
        assert!(backoff(1) <= FIRST_BACKOFF);
        assert!(backoff(20) >= MAX_BACKOFF / 2);
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
}

//! When a story may start: after its retry delay, and not while its run is paused.
//!
//! - **Retry delays**: a story with a [`RetryDelay`] that fails an attempt goes back to pending
//!   with `not_before_ms` set ([`RetryDelay::not_before`]); the candidate query passes over it
//!   until then, and [`crate::transition`] refuses to start it before then (the condition is
//!   part of the compare-and-swap statement, [`story_start_guards`]).
//! - **Pause**: while `run.paused_at` is set, no story of the run starts: the same statement
//!   carries "the run is not paused", so a pause is obeyed by every claim that begins after it
//!   committed, in every process.

use entity::{run, run_story};
use sea_orm::sea_query::{Expr, ExprTrait, Query, SimpleExpr};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the delay grows from one attempt to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// The same delay before every retry.
    Constant,
    /// The delay doubles with each retry: `delay`, `2 × delay`, `4 × delay`, ...
    Exponential,
}

/// How long a story waits after a failed attempt before it may be claimed again.
///
/// ```
/// use run_domain::{Backoff, RetryDelay};
/// use std::time::Duration;
///
/// let retry = RetryDelay {
///     delay: Duration::from_secs(1),
///     backoff: Backoff::Exponential,
///     max_delay: Some(Duration::from_secs(5)),
///     jitter: false,
/// };
/// assert_eq!(retry.after_failed_attempt(1, 0.0), Duration::from_secs(1));
/// assert_eq!(retry.after_failed_attempt(2, 0.0), Duration::from_secs(2));
/// assert_eq!(retry.after_failed_attempt(3, 0.0), Duration::from_secs(4));
/// assert_eq!(retry.after_failed_attempt(4, 0.0), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryDelay {
    /// The delay after the first failed attempt.
    #[serde(rename = "delay_ms", with = "millis")]
    pub delay: Duration,
    /// How it grows after each further failure.
    pub backoff: Backoff,
    /// The most it grows to (none: unbounded, though never past 30 days).
    #[serde(rename = "max_delay_ms", with = "opt_millis", default)]
    pub max_delay: Option<Duration>,
    /// Add up to a quarter more at random, so that stories failing together do not all come
    /// back at once. Never less than the delay.
    pub jitter: bool,
}

/// The longest delay, whatever the settings say (a month).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

impl RetryDelay {
    /// The delay after failed attempt number `attempt` (from 1), with `unit` (in `[0, 1)`) the
    /// random draw for the jitter.
    pub fn after_failed_attempt(&self, attempt: i32, unit: f64) -> Duration {
        let cap = self
            .max_delay
            .unwrap_or(MAX_RETRY_DELAY)
            .min(MAX_RETRY_DELAY);
        let base = match self.backoff {
            Backoff::Constant => self.delay,
            Backoff::Exponential => {
                let doublings =
                    u32::try_from(Ord::clamp(attempt.saturating_sub(1), 0, 40)).unwrap_or(0);
                self.delay.saturating_mul(1u32 << Ord::min(doublings, 31))
            }
        }
        .min(cap);
        if self.jitter {
            base.mul_f64(1.0 + 0.25 * unit.clamp(0.0, 1.0))
                .min(cap.max(base))
        } else {
            base
        }
    }

    /// The `not_before_ms` a story gets when attempt `attempt` failed at `now_ms` (Unix
    /// milliseconds): jittered with a fresh random draw.
    pub fn not_before(&self, attempt: i32, now_ms: i64) -> i64 {
        let wait = self.after_failed_attempt(attempt, fastrand::f64());
        now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
    }

    /// The text stored in `run_story.retry_delay`.
    pub fn to_column(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads `run_story.retry_delay`; `None` when absent or not understood (then a failed
    /// attempt is retried at once, as without a delay).
    pub fn from_column(text: Option<&str>) -> Option<RetryDelay> {
        text.and_then(|t| serde_json::from_str(t).ok())
    }
}

/// The current time in Unix milliseconds, as `not_before_ms` counts.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// "The story's run is not paused", as a condition on a `run_story` row.
pub fn run_not_paused() -> SimpleExpr {
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(run::Entity)
            .and_where(
                Expr::col((run::Entity, run::Column::Id))
                    .equals((run_story::Entity, run_story::Column::RunId)),
            )
            .and_where(Expr::col((run::Entity, run::Column::PausedAt)).is_not_null())
            .to_owned(),
    )
    .not()
}

/// "The story's retry delay, if any, has passed at `now_ms`".
pub fn delay_passed(now_ms: i64) -> SimpleExpr {
    Expr::col((run_story::Entity, run_story::Column::NotBeforeMs))
        .is_null()
        .or(Expr::col((run_story::Entity, run_story::Column::NotBeforeMs)).lte(now_ms))
}

/// Every condition a pending story must meet to start, each checked in the compare-and-swap
/// statement that starts it: no unmet need, its retry delay passed, its run not paused.
pub fn story_start_guards() -> Vec<SimpleExpr> {
    vec![
        Expr::col((run_story::Entity, run_story::Column::UnmetNeeds)).eq(0),
        delay_passed(now_ms()),
        run_not_paused(),
    ]
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_only_adds_and_the_cap_holds() {
        let retry = RetryDelay {
            delay: Duration::from_secs(1),
            backoff: Backoff::Exponential,
            max_delay: Some(Duration::from_secs(10)),
            jitter: true,
        };
        for unit in [0.0, 0.3, 0.999] {
            let first = retry.after_failed_attempt(1, unit);
            assert!(first >= Duration::from_secs(1) && first <= Duration::from_millis(1250));
            assert!(retry.after_failed_attempt(9, unit) <= Duration::from_secs(10));
        }
        // Far past any sensible attempt count: no overflow.
        assert_eq!(
            retry.after_failed_attempt(i32::MAX, 0.5),
            Duration::from_secs(10)
        );
        let column = retry.to_column();
        assert_eq!(RetryDelay::from_column(Some(&column)), Some(retry));
        assert_eq!(RetryDelay::from_column(Some("not json")), None);
    }
}

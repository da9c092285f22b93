//! Transient database failures: what they are, and the policy that rides them out.
//!
//! A call that fails transiently (a dropped or killed connection, a restarting server, a pool
//! with no connection in time, a lock not granted in time, a deadlock victim) is tried again as
//! it is, after a jittered backoff (50 ms doubling to 2 s, each wait drawn between half and all
//! of that, so that workers that failed together do not retry in step), until a time budget is
//! spent. Only calls that may be repeated are retried blindly: reads, and writes whose
//! repetition is harmless (appends under one batch id, "finish the epic if it is done"). A
//! compare-and-swap whose answer was lost may have committed; the caller re-reads the row and
//! recognises its own write.

use super::Schedule;
use sea_orm::DbErr;
use std::time::Duration;

/// The first wait after a transient failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The wait after the `failures`-th transient failure in a row (from 1): 50 ms doubling to
/// 2 s, each drawn between half and all of that.
///
/// ```
/// use std::time::Duration;
/// let wait = run_domain::retry::backoff(3);
/// assert!(wait >= Duration::from_millis(100) && wait <= Duration::from_millis(200));
/// ```
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let bound = FIRST_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF);
    bound.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Riding out transient failures for up to a time budget (`None`: never trying again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransientPolicy {
    /// How long, from the first try, failures are tried again.
    pub budget: Option<Duration>,
}

impl TransientPolicy {
    /// A policy that tries again for up to `budget`.
    pub fn within(budget: Option<Duration>) -> TransientPolicy {
        TransientPolicy { budget }
    }
}

impl Schedule for TransientPolicy {
    fn allows(&self, _failures: u32, elapsed: Duration) -> bool {
        self.budget.is_some_and(|budget| elapsed < budget)
    }

    fn wait(&self, failures: u32, elapsed: Duration) -> Duration {
        let left = self.budget.unwrap_or_default().saturating_sub(elapsed);
        backoff(failures).min(left)
    }
}

/// True when `err` is worth retrying as is: the connection broke or was killed, the server is
/// restarting, the pool had no connection in time, a lock was not granted in time (PostgreSQL
/// `55P03` under `lock_timeout`, MariaDB 1205 under `innodb_lock_wait_timeout`, SQLite busy), or
/// the database chose this transaction as a deadlock or serialisation victim (`40P01`, `40001`,
/// MariaDB 1213). Constraint violations, type errors and the like are not.
///
/// Only idempotent work may be retried blindly: run-log appends carry a batch id for that
/// reason and are retried inside [`crate::append_run_logs`]. A compare-and-swap whose first try
/// may have committed shows up on retry as a conflict with `actual == expected + 1`.
pub fn is_transient(err: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            use sea_orm::sqlx::Error as E;
            match e.as_ref() {
                E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => {
                    true
                }
                E::Database(db) => {
                    // MariaDB reports a lock-wait timeout (1205) under the catch-all SQLSTATE
                    // HY000: only its error number tells it apart.
                    #[cfg(feature = "mysql")]
                    let mysql_number = db
                        .try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>()
                        .map(|e| e.number());
                    #[cfg(not(feature = "mysql"))]
                    let mysql_number: Option<u16> = None;
                    mysql_number.is_some_and(transient_mysql_number)
                        || db.code().is_some_and(|code| transient_code(&code))
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// MariaDB error numbers of a retryable failure: the transaction waited too long for a lock
/// (1205) or was chosen as a deadlock victim (1213); the statement or connection was killed
/// (1927, 1317); the server is shutting down (1053).
fn transient_mysql_number(number: u16) -> bool {
    matches!(number, 1205 | 1213 | 1317 | 1927 | 1053)
}

/// SQLSTATE (PostgreSQL, MariaDB) or result code (SQLite) of a retryable failure.
fn transient_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("57P0") // admin/crash shutdown, cannot connect now
        || matches!(
            code,
            "40001" // serialization failure; MariaDB deadlock (1213)
            | "40P01" // deadlock detected
            | "55P03" // lock not available: lock_timeout ran out
            | "70100" // MariaDB: query/connection killed
            | "5" | "6" | "517" // SQLite BUSY, LOCKED, BUSY_SNAPSHOT
        )
}

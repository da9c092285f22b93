//! Instant wake-ups on PostgreSQL: one `LISTEN run_engine` connection per execution. The
//! database notifies whatever makes a story claimable (the `add_wakeups` migration's
//! triggers: a story pending with no unmet need, a run resumed, a slot freed, a capacity
//! raised), and idle workers of this process wake at once instead of at their next poll. A
//! lost connection is opened again (and listens again); meanwhile the poll finds the work, so
//! a missed notification only delays it.

#[cfg(feature = "postgres")]
use super::event::ExecutorEvent;
use super::execution::Execution;
#[cfg(feature = "postgres")]
use run_domain::retry::backoff;
#[cfg(feature = "postgres")]
use sea_orm::DbBackend;
#[cfg(feature = "postgres")]
use sea_orm::sqlx::postgres::PgListener;
use std::sync::Arc;
#[cfg(feature = "postgres")]
use std::sync::atomic::Ordering;

/// The channel the triggers notify on.
pub const WAKE_CHANNEL: &str = migration::WAKE_CHANNEL;

/// The payload of a notification that a limit's slot is free (any run may use it).
#[cfg(feature = "postgres")]
const LIMITS: &str = "limits";

/// Without the PostgreSQL driver there is nothing to listen to: idle workers poll.
#[cfg(not(feature = "postgres"))]
pub(super) async fn listen(execution: Arc<Execution>) {
    drop(execution);
}

/// Listens until the execution ends (the task is aborted); returns at once off PostgreSQL.
#[cfg(feature = "postgres")]
pub(super) async fn listen(execution: Arc<Execution>) {
    let db = execution.db().clone();
    if db.get_database_backend() != DbBackend::Postgres {
        return;
    }
    let run = execution.run_id.to_string();
    let mut failures = 0u32;
    loop {
        let mut listener = match PgListener::connect_with(db.get_postgres_connection_pool()).await {
            Ok(listener) => listener,
            Err(e) => {
                failures += 1;
                lost(&execution, failures, &e.to_string());
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(WAKE_CHANNEL).await {
            failures += 1;
            lost(&execution, failures, &e.to_string());
            tokio::time::sleep(backoff(failures)).await;
            continue;
        }
        // Whatever was notified while this was not listening: look once now.
        execution.wake_all("listening again");
        loop {
            match listener.try_recv().await {
                Ok(Some(note)) => {
                    failures = 0;
                    let payload = note.payload();
                    if payload == run || payload == LIMITS {
                        if payload == LIMITS {
                            execution.forget_full_limits();
                        }
                        execution.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(run_id = %execution.run_id, payload, "woken by a notification");
                        execution.wake_all("notification");
                    }
                }
                // The connection was lost; the next call connects and listens again.
                Ok(None) => {
                    failures += 1;
                    lost(&execution, failures, "the connection was lost");
                    execution.wake_all("listener lost");
                }
                Err(e) => {
                    failures += 1;
                    lost(&execution, failures, &e.to_string());
                    tokio::time::sleep(backoff(failures)).await;
                    break;
                }
            }
        }
    }
}

/// Tells of a lost listener (the first time in a row only: it is tried again quietly).
#[cfg(feature = "postgres")]
fn lost(execution: &Execution, failures: u32, why: &str) {
    execution
        .stats
        .listener_lost
        .fetch_add(1, Ordering::Relaxed);
    if failures == 1 {
        execution.emit(ExecutorEvent::Warning {
            message: format!(
                "listening for wake-ups failed ({}); polling until it is back",
                run_domain::redact_text(why)
            ),
        });
    }
}

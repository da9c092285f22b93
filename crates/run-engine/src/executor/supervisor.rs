//! Supervising a running handler: renewing its lease, stopping it when the lease is lost or
//! cannot be renewed in time, the run is cancelled, or the process gives its leases back.

use super::execution::AbortOnDrop;
use super::execution::Execution;
use super::shutdown::ShutdownLevel;
use crate::error::TransientDb;
use crate::handler::{CancelHandle, StoryContext, StoryOutcome};
use crate::lease::{Lease, renew_lease, still_held};
use chrono::Utc;
use entity::run_story;
use run_domain::retry::backoff;
use run_domain::{ConcurrencyError, RunStatus, VersionedUpdate};
use sea_orm::DatabaseConnection;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

impl Execution {
    /// When this worker must stop the handler if no renewal gets through: a tenth of the lease
    /// before `held`'s lease runs out (by this process's clock, which wrote it), as clocks and
    /// the time a statement takes eat into it.
    pub(super) fn lease_deadline(&self, held: &run_story::Model, lease: &Lease) -> Instant {
        let left = held
            .lease_expires_at
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        Instant::now() + left.saturating_sub(lease.duration / 10)
    }
    /// Runs the handler while renewing the lease; stops it when the lease is lost (or cannot be
    /// renewed in time), the run is cancelled, or the process gives its leases back. Returns how
    /// it ended and the story as this worker last wrote it.
    pub(super) async fn supervise(
        &self,
        ctx: StoryContext,
        cancel: CancelHandle,
        mut held: run_story::Model,
        lease: &Lease,
    ) -> (Ending, run_story::Model) {
        let handler = self.inner.handler.clone();
        let deadline = ctx.deadline;
        // The handler runs in the story's span, so that its own events carry the story.
        let mut task = AbortOnDrop(tokio::spawn(
            async move { handler.run(ctx).await }.in_current_span(),
        ));
        let renew_every = self.config().renew_every;
        let grace = self.config().cancel_grace;
        let mut next_renewal = Instant::now() + renew_every;
        // A renewal runs beside the handler and the other signals, so that one stuck on a
        // database that is down cannot keep this loop from stopping the handler in time.
        let mut renewal: Option<RenewalFuture> = None;
        let mut renew_failures = 0u32;
        let mut lease_deadline = self.lease_deadline(&held, lease);
        let mut shutdown = self.shutdown.subscribe();
        let mut run_status = self.run_status.clone();
        let mut shutdown_open = true;
        let mut status_open = true;
        let mut stop: Option<Stop> = None;
        let mut fenced: Option<String> = None;
        let mut grace_until: Option<Instant> = None;
        let timeout = held
            .timeout_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        let timeout_at = deadline;

        let stop_now = |why: Stop, stop: &mut Option<Stop>, until: &mut Option<Instant>| {
            if stop.is_none() {
                *stop = Some(why);
                *until = Some(Instant::now() + grace);
                cancel.cancel();
            }
        };
        if *self.run_status.borrow() == RunStatus::Cancelled {
            stop_now(Stop::RunCancelled, &mut stop, &mut grace_until);
        }
        if self.shutdown.level() == ShutdownLevel::GiveBack {
            stop_now(Stop::GiveBack, &mut stop, &mut grace_until);
        }

        loop {
            let far = Instant::now() + Duration::from_secs(86_400);
            let renewing = renewal.is_some();
            tokio::select! {
                joined = &mut task.0 => {
                    let outcome = joined.unwrap_or_else(|e| StoryOutcome::Failed {
                        error: format!("the story handler panicked: {e}"),
                    });
                    // A renewal still in flight is dropped: if it commits, the release meets
                    // it as a conflict and recognises it (see `record`).
                    return match fenced {
                        Some(detail) => (Ending::Fenced { detail }, held),
                        None => (Ending::Done { outcome: Some(outcome), stop }, held),
                    };
                }
                _ = tokio::time::sleep_until(next_renewal), if !renewing && fenced.is_none() => {
                    let (db, story, lease) = (self.db().clone(), held.clone(), lease.clone());
                    // Spawned, not merely polled here: a renewal this loop stops waiting for
                    // still runs to its end, so no statement (on MariaDB, no transaction) is
                    // ever cut off halfway and its connection handed back mid-transaction.
                    let task = tokio::spawn(async move { renew(&db, &story, &lease).await });
                    renewal = Some(Box::pin(async move {
                        task.await.unwrap_or_else(|e| {
                            Renewal::Failed(ConcurrencyError::Database(sea_orm::DbErr::Custom(
                                format!("the lease renewal task ended abnormally: {e}"),
                            )))
                        })
                    }));
                }
                renewed = async {
                    match renewal.as_mut() {
                        Some(r) => r.await,
                        None => std::future::pending().await,
                    }
                }, if renewing => {
                    renewal = None;
                    match renewed {
                        Renewal::Renewed { story, recognised } => {
                            metrics::counter!(crate::metrics::RENEWALS).increment(1);
                            held = *story;
                            lease_deadline = self.lease_deadline(&held, lease);
                            renew_failures = 0;
                            next_renewal = if recognised {
                                // The lease written is an earlier try's: push it on at once.
                                self.stats.recognised.fetch_add(1, Ordering::Relaxed);
                                Instant::now()
                            } else {
                                Instant::now() + renew_every
                            };
                        }
                        Renewal::Lost(detail) => {
                            // SAFETY(fencing): someone else changed the story since our last
                            // write (took it over after our lease expired): stop, record
                            // nothing.
                            fenced = Some(detail);
                            grace_until = Some(Instant::now() + grace);
                            cancel.cancel();
                        }
                        Renewal::Failed(e) => {
                            renew_failures += 1;
                            let soon = e.is_transient() && self.config().retry_transient;
                            next_renewal = if soon {
                                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                                Instant::now() + backoff(renew_failures).min(renew_every)
                            } else {
                                Instant::now() + renew_every
                            };
                            self.warn(format!(
                                "{} could not renew its lease on {}: {e}",
                                lease.owner, held.key
                            ));
                        }
                    }
                }
                _ = tokio::time::sleep_until(timeout_at.unwrap_or(far)), if timeout_at.is_some() && stop.is_none() && fenced.is_none() => {
                    // The story's time is up: stop the handler; after the grace period it is
                    // dropped (the shell handler kills its process group) and the attempt is
                    // recorded failed.
                    stop_now(
                        Stop::TimedOut(timeout.unwrap_or_default()),
                        &mut stop,
                        &mut grace_until,
                    );
                }
                _ = tokio::time::sleep_until(lease_deadline), if stop.is_none() && fenced.is_none() => {
                    // SAFETY(fencing): no renewal got through for nearly a whole lease; once it
                    // runs out another worker may take the story over, and two must never run
                    // it at once. Stop the handler; `record` writes only from the version this
                    // worker holds, so nothing is recorded if someone took the story over.
                    self.warn(format!(
                        "{} could not renew its lease on {} in time; stopping it",
                        lease.owner, held.key
                    ));
                    stop_now(Stop::LeaseRunOut, &mut stop, &mut grace_until);
                }
                changed = run_status.changed(), if status_open && stop.is_none() && fenced.is_none() => {
                    match changed {
                        Err(_) => status_open = false,
                        Ok(()) => if *run_status.borrow_and_update() == RunStatus::Cancelled {
                            stop_now(Stop::RunCancelled, &mut stop, &mut grace_until);
                        }
                    }
                }
                changed = shutdown.changed(), if shutdown_open && stop.is_none() && fenced.is_none() => {
                    match changed {
                        Err(_) => shutdown_open = false,
                        Ok(()) => if *shutdown.borrow_and_update() == ShutdownLevel::GiveBack {
                            stop_now(Stop::GiveBack, &mut stop, &mut grace_until);
                        }
                    }
                }
                _ = tokio::time::sleep_until(grace_until.unwrap_or(far)), if grace_until.is_some() => {
                    // The handler did not stop in time: dropping the task aborts it.
                    return match fenced {
                        Some(detail) => (Ending::Fenced { detail }, held),
                        None => (Ending::Done { outcome: None, stop }, held),
                    };
                }
            }
        }
    }
}

/// Why a worker stopped supervising a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    RunCancelled,
    GiveBack,
    /// No renewal got through for nearly a whole lease: another worker may take the story over.
    LeaseRunOut,
    /// The story's timeout (this long) ran out.
    TimedOut(Duration),
}

pub(super) enum Ending {
    /// The handler returned (or was dropped after `stop` and the grace period: `None`).
    Done {
        outcome: Option<StoryOutcome>,
        stop: Option<Stop>,
    },
    /// A renewal found the story changed by someone else.
    Fenced { detail: String },
}

/// How a renewal went.
pub(super) enum Renewal {
    /// The lease was pushed on (`recognised`: by an earlier try whose answer was lost).
    Renewed {
        story: Box<run_story::Model>,
        recognised: bool,
    },
    /// Someone else changed the story: fenced off.
    Lost(String),
    /// The database failed; the lease is as it was.
    Failed(ConcurrencyError),
}

pub(super) type RenewalFuture = Pin<Box<dyn Future<Output = Renewal> + Send>>;

/// Pushes the lease of `held` on, recognising a renewal of ours whose answer was lost.
pub(super) async fn renew(
    db: &DatabaseConnection,
    held: &run_story::Model,
    lease: &Lease,
) -> Renewal {
    match renew_lease(db, held, lease, Utc::now()).await {
        Ok(story) => Renewal::Renewed {
            story: Box::new(story),
            recognised: false,
        },
        Err(conflict @ ConcurrencyError::Conflict { .. }) => {
            // SAFETY(lost answer): an earlier renewal whose answer was lost may have committed;
            // then the story is still ours, a version on. Anything else: taken over.
            match run_story::Entity::find_versioned(db, held.id).await {
                Ok(now) if still_held(&now, held, &lease.owner) => Renewal::Renewed {
                    story: Box::new(now),
                    recognised: true,
                },
                Ok(_) | Err(ConcurrencyError::NotFound { .. }) => {
                    Renewal::Lost(conflict.to_string())
                }
                Err(e) => Renewal::Failed(e),
            }
        }
        Err(e @ ConcurrencyError::NotFound { .. }) => Renewal::Lost(e.to_string()),
        Err(e) => Renewal::Failed(e),
    }
}

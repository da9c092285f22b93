//! Watching the run's status and pause, so workers notice a cancellation or a pause without
//! asking themselves.

use super::RUN_WATCH_EVERY;
use entity::run;
use run_domain::{Lifecycle, RunStatus};
use sea_orm::{DatabaseConnection, EntityTrait};
use tokio::sync::watch;
use uuid::Uuid;

/// Publishes the run's status, and whether it is paused, as read every [`RUN_WATCH_EVERY`], so
/// workers notice a cancellation or a pause without asking the database themselves.
pub(super) async fn watch_run(
    db: DatabaseConnection,
    run_id: Uuid,
    tx: watch::Sender<RunStatus>,
    paused: watch::Sender<bool>,
) {
    let mut tick = tokio::time::interval(RUN_WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A failed read is tried again at the next tick.
        if let Ok(Some(run)) = run::Entity::find_by_id(run_id).one(&db).await
            && let Some(status) = RunStatus::parse(&run.status)
        {
            tx.send_if_modified(|current| {
                let changed = *current != status;
                *current = status;
                changed
            });
            let now_paused = run.paused_at.is_some();
            paused.send_if_modified(|current| {
                let changed = *current != now_paused;
                *current = now_paused;
                changed
            });
        }
    }
}

//! Metrics, through the `metrics` facade: the executor counts what it does, and a program
//! that installs a recorder sees them (`run-engine exec --metrics 127.0.0.1:9464` serves them
//! in the Prometheus text format, [`serve_prometheus`]). Without a recorder, counting costs
//! next to nothing.
//!
//! | name | kind | what |
//! |---|---|---|
//! | `run_engine_stories_claimed_total` | counter | claims that won (take-overs included) |
//! | `run_engine_take_overs_total` | counter | claims of a story whose lease had expired |
//! | `run_engine_stories_completed_total` | counter | stories recorded completed |
//! | `run_engine_stories_failed_total` | counter | stories recorded failed (no attempt left) |
//! | `run_engine_attempts_retried_total` | counter | failed attempts with attempts left |
//! | `run_engine_stories_skipped_total` | counter | stories skipped (a need failed) |
//! | `run_engine_stories_cancelled_total` | counter | stories recorded cancelled |
//! | `run_engine_attempts_timed_out_total` | counter | attempts stopped at their timeout |
//! | `run_engine_claim_conflicts_total` | counter | claims another worker won first |
//! | `run_engine_fenced_results_total` | counter | results dropped: the lease was lost |
//! | `run_engine_given_back_total` | counter | stories given back on shutdown |
//! | `run_engine_attempt_duration_seconds` | histogram | how long attempts ran |
//! | `run_engine_log_lines_total`, `run_engine_log_batches_total` | counter | run log appends |
//! | `run_engine_lease_renewals_total` | counter | leases renewed |
//! | `run_engine_wakeups_total{cause}` | counter | idle workers woken, by cause |

use crate::executor::ExecutorEvent;
use run_domain::StoryStatus;
use std::net::SocketAddr;

pub(crate) const CLAIMED: &str = "run_engine_stories_claimed_total";
pub(crate) const TAKE_OVERS: &str = "run_engine_take_overs_total";
pub(crate) const COMPLETED: &str = "run_engine_stories_completed_total";
pub(crate) const FAILED: &str = "run_engine_stories_failed_total";
pub(crate) const RETRIED: &str = "run_engine_attempts_retried_total";
pub(crate) const SKIPPED: &str = "run_engine_stories_skipped_total";
pub(crate) const CANCELLED: &str = "run_engine_stories_cancelled_total";
pub(crate) const TIMED_OUT: &str = "run_engine_attempts_timed_out_total";
pub(crate) const CLAIM_CONFLICTS: &str = "run_engine_claim_conflicts_total";
pub(crate) const FENCED: &str = "run_engine_fenced_results_total";
pub(crate) const GIVEN_BACK: &str = "run_engine_given_back_total";
pub(crate) const ATTEMPT_SECONDS: &str = "run_engine_attempt_duration_seconds";
pub(crate) const LOG_LINES: &str = "run_engine_log_lines_total";
pub(crate) const LOG_BATCHES: &str = "run_engine_log_batches_total";
pub(crate) const RENEWALS: &str = "run_engine_lease_renewals_total";
pub(crate) const WAKEUPS: &str = "run_engine_wakeups_total";

/// Counts what an executor event says happened.
pub(crate) fn count_event(event: &ExecutorEvent) {
    match event {
        ExecutorEvent::Started {
            taken_over_from, ..
        } => {
            metrics::counter!(CLAIMED).increment(1);
            if taken_over_from.is_some() {
                metrics::counter!(TAKE_OVERS).increment(1);
            }
        }
        ExecutorEvent::Finished {
            status, elapsed, ..
        } => {
            let name = match status {
                StoryStatus::Completed => COMPLETED,
                StoryStatus::Failed => FAILED,
                StoryStatus::Pending => RETRIED,
                StoryStatus::Skipped => SKIPPED,
                StoryStatus::Cancelled => CANCELLED,
                StoryStatus::Running => return,
            };
            metrics::counter!(name).increment(1);
            if *status != StoryStatus::Skipped {
                metrics::histogram!(ATTEMPT_SECONDS).record(elapsed.as_secs_f64());
            }
        }
        ExecutorEvent::Fenced { .. } => metrics::counter!(FENCED).increment(1),
        ExecutorEvent::GaveBack { .. } => metrics::counter!(GIVEN_BACK).increment(1),
        _ => {}
    }
}

/// Serves every metric of this process in the Prometheus text format on `addr` (any path),
/// from now until the process ends. Call once, inside a tokio runtime.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// run_engine::metrics::serve_prometheus("127.0.0.1:9464".parse()?)?;
/// # Ok(()) }
/// ```
pub fn serve_prometheus(addr: SocketAddr) -> Result<(), MetricsError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| MetricsError {
            addr,
            reason: e.to_string(),
        })
}

/// The metrics endpoint could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why (the address is taken, a recorder is already installed, ...).
    pub reason: String,
}

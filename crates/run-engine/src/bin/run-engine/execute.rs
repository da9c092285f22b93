//! `run-engine exec` and `run`: an executor with signal handling (Ctrl-C drains, a second one
//! or SIGTERM gives leases back).

use crate::EXIT_INTERRUPTED;
use crate::ExecArgs;
use crate::display::Display;
use crate::display::show_events;
use crate::display::show_progress;
use anyhow::{Context, Result};
use run_engine::{Executor, ExecutorConfig, ShellHandler, Shutdown, StoryCounts, Summary};
use sea_orm::DatabaseConnection;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Executes a run with a progress display and signal handling; the exit code says how it
/// ended.
pub(crate) async fn execute(
    db: DatabaseConnection,
    run_id: Uuid,
    args: &ExecArgs,
) -> Result<ExitCode> {
    let config = ExecutorConfig::default()
        .workers(usize::from(args.workers))
        .lease(Duration::from_secs(args.lease_secs))
        .poll_interval(args.poll)
        .listen(!args.no_listen)
        .claim_batch(usize::from(args.claim_batch));
    if let Some(addr) = args.metrics {
        run_engine::metrics::serve_prometheus(addr)?;
        eprintln!("serving metrics on http://{addr}/metrics");
    }
    let executor = Executor::new(db.clone(), ShellHandler::default(), config);
    let shutdown = Shutdown::new();
    let total = StoryCounts::of_run(&db, run_id).await?.total();
    let display = Arc::new(Display::new(total));
    let signals = tokio::spawn(handle_signals(shutdown.clone(), display.clone()));
    let events = tokio::spawn(show_events(executor.subscribe(), display.clone()));
    let progress = tokio::spawn(show_progress(db.clone(), run_id, display.clone()));

    let result = executor.execute_until(run_id, &shutdown).await;
    signals.abort();
    progress.abort();
    // Let the last events through before the bar goes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    events.abort();
    display.finish();

    let summary: Summary = result.with_context(|| format!("executing run {run_id}"))?;
    println!("{summary}");
    Ok(if summary.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if summary.is_completed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// First Ctrl-C: claim nothing new and let running stories finish. Second Ctrl-C or SIGTERM:
/// stop running stories and give their leases back.
pub(crate) async fn handle_signals(shutdown: Shutdown, display: Arc<Display>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut interrupts = 0;
    loop {
        let terminate = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                if r.is_err() {
                    return;
                }
                interrupts += 1;
                if interrupts == 1 {
                    display.line(
                        "interrupted: no new stories start; running ones finish \
                         (Ctrl-C again to stop them and give their leases back)",
                    );
                    shutdown.drain();
                } else {
                    display.line("interrupted again: stopping running stories, giving them back");
                    shutdown.give_back();
                }
            }
            _ = terminate => {
                display.line("terminated: stopping running stories, giving them back");
                shutdown.give_back();
            }
        }
    }
}

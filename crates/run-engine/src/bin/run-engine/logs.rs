//! `run-engine logs [--follow]`: the run log, to its closing line.

use crate::LOG_PAGE;
use crate::POLL;
use anyhow::{Context, Result};
use run_domain::{Lifecycle, LogCursor, RunStatus, read_run_log_after};
use run_engine::{StoryCounts, closing_line_batch, settle_run};
use sea_orm::{DatabaseConnection, EntityTrait};
use std::io::Write;
use std::process::ExitCode;
use uuid::Uuid;

/// Prints the run's log; with `follow`, keeps polling until the run is finished and its
/// closing line (`run <key> <status>`, the last line of every finished run's log) has been
/// printed. On a terminal, control characters from story output are shown escaped (colour
/// kept, see [`run_engine::terminal::escape_controls`]) unless `raw`; elsewhere lines go out as
/// stored.
pub(crate) async fn logs(
    db: &DatabaseConnection,
    run_id: Uuid,
    follow: bool,
    raw: bool,
) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let stdout = std::io::stdout();
    let escape = !raw && stdout.is_terminal();
    let mut cursor = LogCursor::START;
    // Batch ids of lines read so far that close the run in some status (after as many
    // retries as the run has had when it was last read).
    let mut retries = 0;
    let closers_of = |retries: i32| {
        [RunStatus::Completed, RunStatus::Cancelled].map(|s| closing_line_batch(run_id, retries, s))
    };
    let mut closed_with: Vec<Uuid> = Vec::new();
    let mut settled = false;
    loop {
        let finished = if follow {
            let run = entity::run::Entity::find_by_id(run_id)
                .one(db)
                .await?
                .with_context(|| format!("run {run_id} not found"))?;
            retries = run.retries;
            RunStatus::parse(&run.status).filter(|s| s.is_terminal())
        } else {
            None
        };
        let closers = closers_of(retries);
        loop {
            let page = read_run_log_after(db, run_id, cursor, LOG_PAGE).await?;
            let mut out = stdout.lock();
            for entry in &page.entries {
                let line = entry.to_line();
                let shown = if escape {
                    run_engine::terminal::escape_controls(&line)
                } else {
                    line
                };
                if let Err(e) = writeln!(out, "{shown}") {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(ExitCode::SUCCESS);
                    }
                    return Err(e).context("writing the log");
                }
                if closers.contains(&entry.batch_id) {
                    closed_with.push(entry.batch_id);
                }
            }
            let _ = out.flush();
            cursor = page.next;
            if (page.entries.len() as u64) < LOG_PAGE {
                break;
            }
        }
        let Some(status) = finished else {
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(POLL).await;
            continue;
        };
        // SAFETY(log order): the closing line is written once every line of the run is in
        // (see `run_engine::finish`), and the status was read before this pass of reading, so
        // having read the closing line of that status means having read the whole log. (A
        // cancelled run written by an earlier version closed under the completed run's id.)
        let closing = closing_line_batch(run_id, retries, status);
        if closed_with.contains(&closing)
            || (status == RunStatus::Cancelled && closed_with.contains(&closers[0]))
        {
            return Ok(ExitCode::SUCCESS);
        }
        // A cancelled run whose stories all stopped but whose last worker stopped before closing
        // its log (or a run finished by an earlier version): settling writes what is missing.
        if StoryCounts::of_run(db, run_id).await?.unfinished() == 0 {
            if settled {
                // Settled, read again, and still no closing line: a run an earlier version
                // finished without one. Its log has been read to the end.
                eprintln!("warning: run {run_id} is {status} but its log has no closing line");
                return Ok(ExitCode::SUCCESS);
            }
            settle_run(db, run_id).await?;
            settled = true;
            continue;
        }
        tokio::time::sleep(POLL).await;
    }
}

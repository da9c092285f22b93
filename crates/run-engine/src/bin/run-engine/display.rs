//! What `exec` shows while it runs: a progress bar on a terminal, plain lines otherwise.

use crate::POLL;
use indicatif::{ProgressBar, ProgressStyle};
use run_engine::{ExecutorEvent, StoryCounts};
use sea_orm::DatabaseConnection;
use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// The progress bar shown now, if any: `tracing` lines are printed around it.
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Where the CLI's `tracing` lines go: standard error, around the progress bar.
pub(crate) struct TraceWriter;

/// One `tracing` line, printed whole when dropped.
pub(crate) struct TraceLine(Vec<u8>);

impl std::io::Write for TraceLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TraceLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let bar = ACTIVE_BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| eprint!("{text}")),
            None => eprint!("{text}"),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TraceWriter {
    type Writer = TraceLine;

    fn make_writer(&'a self) -> TraceLine {
        TraceLine(Vec::new())
    }
}

/// A progress bar on a terminal, plain lines otherwise.
pub(crate) struct Display {
    pub(crate) bar: Option<ProgressBar>,
    pub(crate) running: Mutex<BTreeSet<String>>,
}

impl Display {
    pub(crate) fn new(total: u64) -> Display {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(100));
            if let Ok(mut active) = ACTIVE_BAR.lock() {
                *active = Some(bar.clone());
            }
            bar
        });
        Display {
            bar,
            running: Mutex::new(BTreeSet::new()),
        }
    }

    pub(crate) fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub(crate) fn counts(&self, counts: &StoryCounts) {
        if let Some(bar) = &self.bar {
            bar.set_length(counts.total());
            bar.set_position(counts.finished());
            let running = self
                .running
                .lock()
                .map(|r| r.iter().cloned().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            let mut msg = format!("{} running", counts.running);
            if counts.failed > 0 {
                msg.push_str(&format!(", {} failed", counts.failed));
            }
            if !running.is_empty() {
                msg.push_str(&format!(" | here: {running}"));
            }
            bar.set_message(msg);
        }
    }

    pub(crate) fn started(&self, story: String) {
        if let Ok(mut r) = self.running.lock() {
            r.insert(story);
        }
    }

    pub(crate) fn stopped(&self, story: &str) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(story);
        }
    }

    pub(crate) fn finish(&self) {
        if let Ok(mut active) = ACTIVE_BAR.lock() {
            *active = None;
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub(crate) async fn show_events(
    mut events: tokio::sync::broadcast::Receiver<ExecutorEvent>,
    display: Arc<Display>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                display.line(&format!("({n} events not shown)"));
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        match event {
            ExecutorEvent::Started {
                story,
                attempt,
                max_attempts,
                worker,
                taken_over_from,
            } => {
                let name = story.to_string();
                if display.bar.is_none() {
                    let from = taken_over_from
                        .map(|p| format!(", taken over from {p}"))
                        .unwrap_or_default();
                    display.line(&format!(
                        "started   {name} (attempt {attempt}/{max_attempts} on {worker}{from})"
                    ));
                }
                display.started(name);
            }
            ExecutorEvent::Finished {
                story,
                status,
                attempt,
                max_attempts,
                elapsed,
                error,
                ..
            } => {
                let name = story.to_string();
                display.stopped(&name);
                let error = error.map(|e| format!(": {e}")).unwrap_or_default();
                let text = match status {
                    run_domain::StoryStatus::Pending => {
                        format!("retrying  {name} (attempt {attempt}/{max_attempts} failed{error})")
                    }
                    run_domain::StoryStatus::Completed => {
                        format!("completed {name} in {:.2}s", elapsed.as_secs_f64())
                    }
                    other => format!("{other:<9} {name}{error}"),
                };
                display.line(&text);
            }
            ExecutorEvent::Fenced { story, worker } => {
                let name = story.to_string();
                display.stopped(&name);
                display.line(&format!(
                    "fenced    {name}: {worker} lost its lease to another worker; result dropped"
                ));
            }
            ExecutorEvent::GaveBack { story, .. } => {
                let name = story.to_string();
                display.stopped(&name);
                display.line(&format!("gave back {name}"));
            }
            ExecutorEvent::EpicFinished { key, status } => {
                display.line(&format!("epic {key} {status}"));
            }
            ExecutorEvent::RunFinished { status } => display.line(&format!("run {status}")),
            // Printed by the `tracing` subscriber (a warning), around the bar.
            ExecutorEvent::Warning { .. } => {}
        }
    }
}

pub(crate) async fn show_progress(db: DatabaseConnection, run_id: Uuid, display: Arc<Display>) {
    if display.bar.is_none() {
        return;
    }
    loop {
        if let Ok(counts) = StoryCounts::of_run(&db, run_id).await {
            display.counts(&counts);
        }
        tokio::time::sleep(POLL).await;
    }
}

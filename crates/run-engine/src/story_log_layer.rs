//! A `tracing` layer that writes the events a story's handler emits into that run's log.
//!
//! The executor runs every attempt in a span `attempt` (fields: run, epic, story, attempt,
//! worker, and a `story_log` token); [`StoryLogLayer`] finds the story's log by that token and
//! appends each event emitted inside the span, as `LEVEL message key=value ...`, through the
//! same [`LogSink`] as the story's output, so it is written before the story's result is
//! recorded and shows up in `run-engine logs` as a line of the story. Install it in the
//! subscriber of a program that runs Rust handlers:
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! tracing_subscriber::registry()
//!     .with(run_engine::StoryLogLayer::new())
//!     .init();
//! // Inside a `StoryHandler::run`: `tracing::info!(rows = 10, "imported")` becomes the
//! // story's log line `INFO imported rows=10`.
//! ```

use crate::log_sink::LogSink;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The span field that carries a story's log token.
pub(crate) const STORY_LOG_FIELD: &str = "story_log";

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// The logs of the attempts running now in this process, by token.
static STORY_LOGS: Mutex<Option<HashMap<u64, LogSink>>> = Mutex::new(None);

/// A story's log registered for the layer while its attempt runs; unregistered on drop.
pub(crate) struct StoryLogToken(pub(crate) u64);

impl StoryLogToken {
    /// Registers `log` (the story's handle, with its prefix).
    pub(crate) fn register(log: &LogSink) -> StoryLogToken {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut logs) = STORY_LOGS.lock() {
            logs.get_or_insert_with(HashMap::new)
                .insert(token, log.clone());
        }
        StoryLogToken(token)
    }
}

impl Drop for StoryLogToken {
    fn drop(&mut self) {
        if let Ok(mut logs) = STORY_LOGS.lock()
            && let Some(logs) = logs.as_mut()
        {
            logs.remove(&self.0);
        }
    }
}

/// Writes events emitted inside a story's attempt span into the story's run log.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoryLogLayer;

impl StoryLogLayer {
    /// The layer.
    pub fn new() -> StoryLogLayer {
        StoryLogLayer
    }
}

/// The story log a span leads to, kept in the span's extensions.
struct StoryLog(LogSink);

#[derive(Default)]
struct TokenVisitor(Option<u64>);

impl Visit for TokenVisitor {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == STORY_LOG_FIELD {
            self.0 = Some(value);
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

/// `message key=value ...` of an event.
#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S> Layer<S> for StoryLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut token = TokenVisitor::default();
        attrs.record(&mut token);
        let Some(token) = token.0 else { return };
        let log = STORY_LOGS
            .lock()
            .ok()
            .and_then(|logs| logs.as_ref().and_then(|l| l.get(&token).cloned()));
        if let (Some(log), Some(span)) = (log, ctx.span(id)) {
            span.extensions_mut().insert(StoryLog(log));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            let extensions = span.extensions();
            let Some(StoryLog(log)) = extensions.get::<StoryLog>() else {
                continue;
            };
            // The executor's own events about the story are not its output.
            let target = event.metadata().target();
            let ours = |krate: &str| {
                target == krate
                    || target
                        .strip_prefix(krate)
                        .is_some_and(|rest| rest.starts_with("::"))
            };
            if ours("run_engine") || ours("run_domain") {
                return;
            }
            let mut line = LineVisitor::default();
            event.record(&mut line);
            log.line_now(format!(
                "{} {}{}",
                event.metadata().level(),
                line.message,
                line.fields
            ));
            return;
        }
    }
}

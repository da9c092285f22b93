//! What a story does when a worker runs it: a pluggable [`StoryHandler`].

use crate::log_sink::LogSink;
use async_trait::async_trait;
use entity::run_story;
use tokio::sync::watch;
use uuid::Uuid;

/// Runs a story's work. The executor calls [`StoryHandler::run`] once per attempt, holding the
/// story's lease meanwhile; the handler never changes the story's state itself.
///
/// A handler should return soon after [`StoryContext::cancel`] fires (the worker lost its lease,
/// the run was cancelled, or the process is shutting down). If it does not return within the
/// executor's grace period, its future is dropped.
///
/// ```
/// use run_engine::{StoryContext, StoryHandler, StoryOutcome};
///
/// struct Greeter;
///
/// #[async_trait::async_trait]
/// impl StoryHandler for Greeter {
///     async fn run(&self, ctx: StoryContext) -> StoryOutcome {
///         ctx.log.line(format!("hello from {}", ctx.story.key)).await;
///         if ctx.cancel.is_cancelled() {
///             return StoryOutcome::Cancelled;
///         }
///         StoryOutcome::Completed
///     }
/// }
/// ```
#[async_trait]
pub trait StoryHandler: Send + Sync {
    /// Does the story's work and says how it went.
    async fn run(&self, ctx: StoryContext) -> StoryOutcome;
}

/// Everything a handler gets for one attempt of a story.
#[derive(Debug, Clone)]
pub struct StoryContext {
    /// The story as claimed (status running, this attempt counted in `attempts`).
    pub story: run_story::Model,
    /// The key of the story's epic.
    pub epic_key: String,
    /// This attempt's number, from 1 (the story's `attempts` after the claim).
    pub attempt: i32,
    /// The id of the worker running it (`<hostname>-<pid>-<n>`), as stored in `lease_owner`.
    pub worker_id: String,
    /// Lines written here go to the run's log, prefixed with `[<epic>/<story>]`, in batches.
    pub log: LogSink,
    /// Fires when the handler should stop.
    pub cancel: Cancellation,
    /// When this attempt times out (the story's `timeout` from when it started), if it has
    /// one. The executor enforces it for every handler: at the deadline `cancel` fires, and
    /// after the grace period the attempt is recorded failed (`timed out after 30m`), whatever
    /// the handler does.
    pub deadline: Option<tokio::time::Instant>,
}

impl StoryContext {
    /// The run the story belongs to.
    pub fn run_id(&self) -> Uuid {
        self.story.run_id
    }

    /// The story's free-form input (the plan's `payload`, or [`run_domain::NewStory::payload`]),
    /// parsed from the JSON stored with it; `None` when it has none.
    ///
    /// ```
    /// # fn demo(ctx: &run_engine::StoryContext) {
    /// let jobs = ctx.payload().and_then(|p| p["jobs"].as_u64()).unwrap_or(1);
    /// # }
    /// ```
    pub fn payload(&self) -> Option<serde_json::Value> {
        self.payload_as().ok().flatten()
    }

    /// The story's payload deserialized into `T`, or why it could not be: for handlers that
    /// know the shape of their input.
    ///
    /// ```
    /// #[derive(serde::Deserialize)]
    /// struct Input { target: String }
    /// # fn demo(ctx: &run_engine::StoryContext) -> Result<(), serde_json::Error> {
    /// let input: Option<Input> = ctx.payload_as()?;
    /// # Ok(()) }
    /// ```
    pub fn payload_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Option<T>, serde_json::Error> {
        self.story
            .payload
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
    }

    /// The environment variables the story asks for (the plan's `env` over `[defaults] env`);
    /// empty when none.
    pub fn env(&self) -> std::collections::BTreeMap<String, String> {
        self.story
            .env
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok())
            .unwrap_or_default()
    }

    /// The directory the story asks to run in (the plan's `dir`), if any.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.story.work_dir.as_deref().map(std::path::Path::new)
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoryOutcome {
    /// The work succeeded.
    Completed,
    /// The work failed; the story is tried again while attempts remain.
    Failed {
        /// What went wrong, stored in the story's `error`.
        error: String,
    },
    /// The handler stopped because [`StoryContext::cancel`] fired.
    Cancelled,
}

/// The receiving side of a cancellation signal: cheap to clone, checked or awaited by handlers.
#[derive(Debug, Clone)]
pub struct Cancellation {
    rx: watch::Receiver<bool>,
}

/// The sending side of a [`Cancellation`].
#[derive(Debug)]
pub struct CancelHandle {
    tx: watch::Sender<bool>,
}

impl Cancellation {
    /// A new signal, not fired, and the handle that fires it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (handle, cancel) = run_engine::Cancellation::new();
    /// assert!(!cancel.is_cancelled());
    /// handle.cancel();
    /// cancel.cancelled().await;
    /// assert!(cancel.is_cancelled());
    /// # }
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> (CancelHandle, Cancellation) {
        let (tx, rx) = watch::channel(false);
        (CancelHandle { tx }, Cancellation { rx })
    }

    /// True once the signal fired.
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until the signal fires. Also returns when the handle is dropped, since nobody is
    /// left to wait for the work.
    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        // An error means the handle is gone: treat as cancelled.
        let _ = rx.wait_for(|fired| *fired).await;
    }
}

impl CancelHandle {
    /// Fires the signal (again is harmless).
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }

    /// True once [`CancelHandle::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.tx.borrow()
    }
}

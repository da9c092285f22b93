//! run-engine's reference executor: runs a run's stories in parallel, with any number of worker
//! tasks in any number of processes on one database, and the `run-engine` command-line tool.
//!
//! Every state change goes through [`run_domain`]'s compare-and-swap and lifecycle API; this
//! crate only reads with plain queries.
//!
//! - [`plan`]: the TOML plan file, its validation, and turning it into a run ([`Plan`]).
//! - [`lease`]: claiming a story with a lease, renewing it, taking over an expired one, and
//!   releasing it with a result ([`try_claim`], [`renew_lease`], [`release`]).
//! - [`executor`]: N workers per process that claim, run and record stories ([`Executor`]).
//! - [`handler`]: what a story does when it runs ([`StoryHandler`], [`StoryContext`]).
//! - [`shell`]: the command-line tool's handler, `sh -c <command>` ([`ShellHandler`]).
//! - [`log_sink`]: a story's output, batched into the run log ([`LogSink`]).
//! - [`finish`]: completing epics and runs once their stories are done.
//! - [`cancel`]: cancelling a run ([`cancel_run`]).
//! - [`queries`]: what the engine asks of the database, each question once ([`StoryCounts`],
//!   candidates, expired leases, unfinished stories).
//! - [`status`]: progress and the run/epic/story tree ([`RunTree`]).
//! - [`runs`]: the recent runs with status, progress and duration ([`list_runs`]).
//! - [`graph`]: a plan or run as a graph of needs, drawn as DOT or Mermaid ([`Graph`]).
//! - [`terminal`]: story output shown on a terminal without its control characters acting.
//! - [`web`]: `run-engine serve`, a live web view of runs ([`web::serve`]).
//!
//! ```no_run
//! use run_engine::{Executor, ExecutorConfig, Plan, ShellHandler, create_run_from_plan};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let db = run_domain::connect(run_domain::DEFAULT_DATABASE_URL).await?;
//! migration::apply(&db, None).await?;
//! let plan = Plan::load("examples/plan.toml")?;
//! let run = create_run_from_plan(&db, &plan).await?;
//! let executor = Executor::new(db, ShellHandler::default(), ExecutorConfig::default().workers(4));
//! let summary = executor.execute(run.id).await?;
//! println!("{summary}");
//! # Ok(()) }
//! ```

pub mod cancel;
pub mod control;
pub mod error;
pub mod executor;
pub mod finish;
pub mod graph;
pub mod handler;
pub mod lease;
pub mod log_sink;
pub mod metrics;
pub mod plan;
pub mod prune;
pub mod queries;
pub mod runs;
pub mod shell;
pub mod skip;
pub mod status;
pub mod story_log_layer;
pub mod terminal;
pub mod web;

pub use cancel::{CancelReport, cancel_leftovers, cancel_run};
pub use control::{CancelStoryReport, PauseReport, cancel_story, pause_run, resume_run};
pub use error::{EngineError, TransientDb};
pub use executor::{
    Executor, ExecutorConfig, ExecutorEvent, Shutdown, ShutdownLevel, StoryRef, Summary,
    default_worker_prefix,
};
pub use finish::{
    closing_line_batch, finish_epic_if_done, finish_run_if_done, settle_run, start_epic, start_run,
};
pub use graph::{Graph, GraphEpic, GraphFormat, GraphStory, UnknownGraphFormat};
pub use handler::{CancelHandle, Cancellation, StoryContext, StoryHandler, StoryOutcome};
pub use lease::{Claim, Lease, Release, TryClaim};
pub use lease::{claimed_by, released_by, still_held};
pub use lease::{give_back, release, release_letting_go, renew_lease, try_claim};
pub use log_sink::{LogSink, LogSinkError};
/// [`plan::StoryRef`] under another name: [`StoryRef`] is the executor's.
pub use plan::StoryRef as PlanStoryRef;
pub use plan::{Plan, PlanEpic, PlanError, PlanProblem, PlanStory, create_run_from_plan};
pub use prune::{PRUNE_BATCH, PruneReport, prune_finished};
pub use queries::{
    StoryCounts, epic_has_unfinished, expired_leases, pending_candidates, run_has_unfinished,
    unblocked_by, unfinished_stories,
};
pub use runs::{RunSummary, list_runs, render_runs};
pub use shell::ShellHandler;
pub use skip::{skip_blocked, skip_dependents};
pub use status::{EpicView, LimitView, RunTree, RunView, StoryView, load_run_tree};
pub use story_log_layer::StoryLogLayer;

//! run-engine's benchmark suite: every figure is measured against its baseline in the same run,
//! on fresh databases, and written to `BENCHMARKS.md` with two SVG plots.
//!
//! Run it with `cargo run --release -p run-bench -- [--quick] [--out BENCHMARKS.md]`.
//!
//! - [`bench_db`]: the backends, their servers, and a fresh migrated database per scenario.
//! - [`measure`]: timing samples, throughput windows, and their median and spread.
//! - [`log_append`]: one append against the size of the log already there, ours vs a text column.
//! - [`versioned_update`]: `update_versioned` vs the same statement in plain sqlx.
//! - [`contention`]: compare-and-swap, retry and row locks under 1, 8 and 32 writers.
//! - [`append_throughput`]: concurrent appends vs a plain INSERT loop.
//! - [`executor`]: the executor's throughput vs a `FOR UPDATE SKIP LOCKED` claim loop.
//! - [`peers`]: real job queues (graphile-worker, pgqueuer) draining no-op jobs on the same
//!   PostgreSQL server, installed into a scratch folder with npm and pip.
//! - [`memory`]: peak RSS of streaming a large log vs building it as one `String`, of
//!   `run-engine logs --follow` on it, and of the executor on runs of two sizes.
//! - [`web`]: `run-engine serve`: time to first byte of a 10,000-story run page, the queries of
//!   50 open pages, peak memory while 10 clients follow a large log.
//! - [`report`]: tables, goals, the machine description and the markdown file.
//! - [`plot`]: the SVG charts, drawn by hand.

pub mod append_throughput;
pub mod bench_db;
pub mod contention;
pub mod executor;
pub mod log_append;
pub mod measure;
pub mod memory;
pub mod observability;
pub mod ordered;
pub mod peers;
pub mod plot;
pub mod report;
pub mod scheduling;
pub mod versioned_update;
pub mod web;

pub use bench_db::{Backend, BenchDb, Servers};
pub use measure::{Profile, Summary};
pub use report::{Goal, Report, Section};

//! Scenario 5: executor throughput. HOOK, NOT YET MEASURED.
//!
//! The executor is being written in `crates/run-engine`; its throughput (stories claimed and
//! finished per second against workers, with the claim strategies of the shared reference
//! figures, `MEASUREMENTS.md`, as baselines) belongs to that crate's benchmark. When it lands,
//! call it from [`section`] and put its table in place of [`PENDING`], so that `BENCHMARKS.md`
//! keeps one section per scenario in the order of issue 5.

use crate::report::Section;

/// What the report says until the executor's benchmark exists.
pub const PENDING: &str = "executor throughput: see crates/run-engine benchmark";

/// The report section: for now, the pointer to `crates/run-engine`.
pub fn section() -> Section {
    Section {
        title: "5. Executor throughput".into(),
        body: format!("{PENDING}\n"),
    }
}

//! Timing samples, throughput windows, and their median and spread.
//!
//! Latency figures are the mean time per operation over one *sample* (at least
//! [`Profile::min_ops`] operations and at least [`Profile::sample_time`]); a scenario takes
//! [`Profile::repeats`] samples of each thing it measures, interleaved with its baseline's, and
//! reports their median and min–max. Throughput figures run writers for [`Profile::repeats`]
//! windows per cell, each after a warm-up, the windows of the methods compared taking turns;
//! the windows' rates give the median and min–max.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long and how often to measure: the full run, or `--quick`.
#[derive(Debug, Clone)]
pub struct Profile {
    /// True for `--quick`.
    pub quick: bool,
    /// Samples (latency) or windows (throughput) per figure.
    pub repeats: usize,
    /// The least time one latency sample runs.
    pub sample_time: Duration,
    /// The fewest operations in one latency sample.
    pub min_ops: u64,
    /// The most operations in one latency sample (bounds the log growth of fast appends).
    pub max_ops: u64,
    /// How long each throughput cell measures on a server backend, all windows together
    /// (SQLite cells take half).
    pub cell_time: Duration,
    /// Unmeasured time at the start of each throughput window.
    pub warmup: Duration,
    /// Size of the log whose reading is measured for memory.
    pub memory_log_bytes: u64,
    /// Whether the memory scenario's log readers also run on PostgreSQL.
    pub memory_on_postgres: bool,
    /// Run sizes (stories) whose executor's peak memory is measured, smallest first.
    pub executor_memory_stories: [usize; 2],
}

impl Profile {
    /// The full run: 5 repeats, 3 s per throughput cell, a 100 MiB log for memory
    /// (about 6 to 8 minutes on a 2-core machine).
    pub fn full() -> Profile {
        Profile {
            quick: false,
            repeats: 5,
            sample_time: Duration::from_millis(400),
            min_ops: 5,
            max_ops: 5_000,
            cell_time: Duration::from_secs(3),
            warmup: Duration::from_millis(200),
            memory_log_bytes: 100 << 20,
            memory_on_postgres: true,
            executor_memory_stories: [1_000, 10_000],
        }
    }

    /// `--quick`: 3 repeats, 0.6 s per throughput cell, a 10 MiB log for memory, an executor
    /// on 1,000 and 2,000 stories (about 100 s on a 2-core machine, once built).
    pub fn quick() -> Profile {
        Profile {
            quick: true,
            repeats: 3,
            sample_time: Duration::from_millis(120),
            min_ops: 3,
            max_ops: 2_000,
            cell_time: Duration::from_millis(600),
            warmup: Duration::from_millis(60),
            memory_log_bytes: 10 << 20,
            memory_on_postgres: false,
            executor_memory_stories: [1_000, 2_000],
        }
    }

    /// The measured time of one throughput window on `backend`.
    pub fn window_on(&self, backend: crate::Backend) -> Duration {
        let cell = match backend {
            crate::Backend::Sqlite => self.cell_time / 2,
            _ => self.cell_time,
        };
        cell / u32::try_from(self.repeats.max(1)).unwrap_or(1)
    }

    /// One line for the report: what this profile does.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} repeats; latency samples of at least {} ops and {} ms; throughput cells of \
             {} s (SQLite {} s) in {} windows, each after a {} ms warm-up; memory on a {} MiB log \
             and an executor on {} and {} stories",
            if self.quick { "quick" } else { "full" },
            self.repeats,
            self.min_ops,
            self.sample_time.as_millis(),
            self.cell_time.as_secs_f64(),
            self.cell_time.as_secs_f64() / 2.0,
            self.repeats,
            self.warmup.as_millis(),
            self.memory_log_bytes >> 20,
            self.executor_memory_stories[0],
            self.executor_memory_stories[1],
        )
    }
}

/// The median and spread of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Summary {
    /// The summary of `values`; all NaN when there are none.
    ///
    /// ```
    /// let s = run_bench::Summary::of(&[3.0, 1.0, 2.0, 10.0]);
    /// assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
    /// ```
    pub fn of(values: &[f64]) -> Summary {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Summary {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Summary {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        }
    }

    /// The same summary with every value multiplied by `k` (to change units).
    pub fn scaled(self, k: f64) -> Summary {
        Summary {
            median: self.median * k,
            min: self.min * k,
            max: self.max * k,
            n: self.n,
        }
    }
}

/// The median of `values`, NaN ignored: the middle value of an odd count, the mean of the two
/// middle values of an even count; NaN when there are none. [`Summary::of`]'s median.
///
/// ```
/// assert_eq!(run_bench::measure::median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
/// ```
pub fn median(values: &[f64]) -> f64 {
    Summary::of(values).median
}

/// Runs `op` (given the operation's number) at least `profile.min_ops` times and for at least
/// `profile.sample_time` (at most `profile.max_ops` times), after one unmeasured call, and
/// returns the mean seconds per call. The first error ends the sample.
pub async fn time_per_op<F, Fut, T, E>(profile: &Profile, mut op: F) -> anyhow::Result<f64>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    anyhow::Error: From<E>,
{
    // Warms the statement cache and the connection the pool hands out.
    op(0).await?;
    let start = Instant::now();
    let mut n = 0u64;
    while n < profile.min_ops || (start.elapsed() < profile.sample_time && n < profile.max_ops) {
        op(n + 1).await?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

/// A boxed operation's future, for [`time_interleaved`].
pub type OpFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// An operation for [`time_interleaved`]: given the operation's number, one call.
pub type Op<'a> = Box<dyn FnMut(u64) -> OpFuture<'a> + 'a>;

/// Like [`time_per_op`] for several operations at once, one call of each in turn (the order
/// rotating each round) and each call timed on its own, so that every operation runs under
/// the same background load; returns the mean seconds per call of each.
pub async fn time_interleaved(profile: &Profile, ops: &mut [Op<'_>]) -> anyhow::Result<Vec<f64>> {
    for op in ops.iter_mut() {
        op(0).await?;
    }
    let k = ops.len();
    let mut totals = vec![Duration::ZERO; k];
    let start = Instant::now();
    let mut n = 0u64;
    while n < profile.min_ops || (start.elapsed() < profile.sample_time && n < profile.max_ops) {
        for j in 0..k {
            let i = (j + n as usize) % k;
            let t = Instant::now();
            ops[i](n + 1).await?;
            totals[i] += t.elapsed();
        }
        n += 1;
    }
    Ok(totals.iter().map(|t| t.as_secs_f64() / n as f64).collect())
}

/// What one attempt of a concurrent writer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Successful updates or appends.
    pub ok: u64,
    /// Attempts that met a newer version.
    pub conflicts: u64,
    /// Operations abandoned after the retry policy ran out.
    pub gave_up: u64,
    /// A database error, if one happened.
    pub error: Option<String>,
}

impl Outcome {
    /// One success.
    pub fn ok() -> Outcome {
        Outcome {
            ok: 1,
            ..Outcome::default()
        }
    }

    /// One conflict.
    pub fn conflict() -> Outcome {
        Outcome {
            conflicts: 1,
            ..Outcome::default()
        }
    }

    /// A database error.
    pub fn error(e: impl std::fmt::Display) -> Outcome {
        Outcome {
            error: Some(e.to_string()),
            ..Outcome::default()
        }
    }
}

/// Rates measured over the windows of a throughput cell.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Successful operations per second.
    pub ok_per_s: Summary,
    /// Conflicting attempts per second.
    pub conflicts_per_s: Summary,
    /// Operations abandoned after retrying, over the measured windows.
    pub gave_up: u64,
    /// Database errors, warm-ups included.
    pub errors: u64,
    /// The first database error, if any.
    pub first_error: Option<String>,
}

impl Throughput {
    /// The median and spread of `windows`.
    pub fn of(windows: &[Window]) -> Throughput {
        let ok: Vec<f64> = windows.iter().map(|w| w.ok_per_s).collect();
        let conflicts: Vec<f64> = windows.iter().map(|w| w.conflicts_per_s).collect();
        Throughput {
            ok_per_s: Summary::of(&ok),
            conflicts_per_s: Summary::of(&conflicts),
            gave_up: windows.iter().map(|w| w.gave_up).sum(),
            errors: windows.iter().map(|w| w.errors).sum(),
            first_error: windows.iter().find_map(|w| w.first_error.clone()),
        }
    }
}

/// What one measurement window saw.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Successful operations per second.
    pub ok_per_s: f64,
    /// Conflicting attempts per second.
    pub conflicts_per_s: f64,
    /// Operations abandoned after retrying.
    pub gave_up: u64,
    /// Database errors, warm-up included.
    pub errors: u64,
    /// The first database error, if any.
    pub first_error: Option<String>,
}

/// How long a writer may take to finish its last operation once a window ends.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    conflicts: AtomicU64,
    gave_up: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn add(&self, o: Outcome) {
        self.ok.fetch_add(o.ok, Ordering::Relaxed);
        self.conflicts.fetch_add(o.conflicts, Ordering::Relaxed);
        self.gave_up.fetch_add(o.gave_up, Ordering::Relaxed);
        if let Some(e) = o.error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert(e);
            }
        }
    }

    fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.conflicts.load(Ordering::Relaxed),
            self.gave_up.load(Ordering::Relaxed),
        )
    }
}

/// Runs `writers` concurrent tasks, each calling `op(writer_index)` in a loop, for
/// `profile.warmup` and then `window`, and returns the rates over `window`. A writer that meets
/// a database error pauses 10 ms before its next attempt.
///
/// Callers compare methods by running their windows in turn (A, B, C, then B, C, A, ...), so
/// that a change in background load falls on all of them alike.
pub async fn run_window<F, Fut>(
    profile: &Profile,
    window: Duration,
    writers: usize,
    op: F,
) -> Window
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let op = Arc::new(op);
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let (op, tally, stop) = (op.clone(), tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let outcome = op(w).await;
                let failed = outcome.error.is_some();
                tally.add(outcome);
                if failed {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    tokio::time::sleep(profile.warmup).await;
    let (before, start) = (tally.snapshot(), Instant::now());
    tokio::time::sleep(window).await;
    let (after, secs) = (tally.snapshot(), start.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for mut task in tasks {
        // A writer stuck in one operation (waiting for a lock or a connection) must not hold
        // up the next window: after a grace period it is cancelled. A writer that panicked
        // shows up as missing throughput.
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
        }
    }
    let first_error = tally.first_error.lock().ok().and_then(|e| e.clone());
    Window {
        ok_per_s: (after.0 - before.0) as f64 / secs,
        conflicts_per_s: (after.1 - before.1) as f64 / secs,
        gave_up: after.2 - before.2,
        errors: tally.errors.load(Ordering::Relaxed),
        first_error,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_an_odd_count_is_its_middle_value() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[7.0]), 7.0);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_its_two_middle_values() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
    }

    #[test]
    fn the_median_ignores_nan_and_is_nan_of_nothing() {
        assert_eq!(median(&[f64::NAN, 1.0, 3.0]), 2.0);
        assert!(median(&[]).is_nan());
    }
}

//! Append throughput with 1, 8 and 32 concurrent writers, into one run and into a
//! run per writer.
//!
//! Ours is [`run_domain::append_run_log`], each writer on its own connection as separate
//! processes would be, and [`run_engine::LogSink`] shared by the writers of one process (each
//! writes its line and waits for it to be committed, as `append_run_log` does; their flushes
//! are served together). The baseline is the raw cost of the row: a plain
//! `INSERT INTO run_log` loop in plain sqlx, one autocommitted statement per line, each with its
//! own `seq` from a client-side atomic counter per run and a new batch id. It gives none of the
//! log's guarantees (a follower could skip a line that commits late; a retry could write a line
//! twice), which is what ours pays for. Every cell appends to new runs.

use crate::bench_db::{Backend, BenchDb, Measured, Servers, close_all};
use crate::log_append::line;
use crate::measure::{Outcome, Profile, Throughput, Window, run_window};
use crate::plot::{Chart, Scale, Series};
use crate::report::{Bound, Goal, Section, Table, fmt_count, fmt_rate, fmt_rate_summary};
use chrono::Utc;
use run_domain::append_run_log;
use run_engine::LogSink;
use run_engine_tests::RunFactory;
use sea_orm::sqlx;
use sea_orm::{DatabaseConnection, DbBackend};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use uuid::Uuid;

/// The backends this scenario runs on.
pub const BACKENDS: [Backend; 2] = [Backend::Postgres, Backend::Sqlite];

/// Concurrent writers per cell.
pub const WRITERS: [usize; 3] = [1, 8, 32];

/// The target the appender must reach, as a fraction of the plain INSERT's throughput.
pub const GOAL: f64 = 0.8;

/// Who appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appender {
    /// `append_run_log`, each writer on its own connection.
    Ours,
    /// One `LogSink` per run shared by the writers: `line` then `flush`.
    SharedSink,
    /// A plain INSERT of the row.
    PlainInsert,
}

impl Appender {
    /// All three, in the order they take turns.
    pub const ALL: [Appender; 3] = [Appender::Ours, Appender::SharedSink, Appender::PlainInsert];

    /// Its name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Appender::Ours => "append_run_log",
            Appender::SharedSink => "shared LogSink",
            Appender::PlainInsert => "plain INSERT",
        }
    }
}

/// Where the writers append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// All into one run's log.
    One,
    /// Each writer into a run of its own.
    PerWriter,
}

impl Runs {
    /// Its name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Runs::One => "one run",
            Runs::PerWriter => "run per writer",
        }
    }
}

/// One cell's figures.
#[derive(Debug, Clone)]
pub struct AppendCell {
    /// Where.
    pub runs: Runs,
    /// How many writers.
    pub writers: usize,
    /// Who.
    pub appender: Appender,
    /// Lines per second.
    pub throughput: Throughput,
}

/// The scenario's results.
#[derive(Debug, Clone)]
pub struct AppendThroughputResults {
    /// Per backend.
    pub backends: Vec<(Backend, Measured<Vec<AppendCell>>)>,
}

/// Runs the scenario on [`BACKENDS`].
pub async fn run(servers: &Servers, profile: &Profile) -> AppendThroughputResults {
    let mut backends = Vec::new();
    for backend in BACKENDS {
        eprintln!("[run-bench] append throughput: {}", backend.name());
        let measured = servers
            .measure(backend, async |bench| measure_on(bench, profile).await)
            .await;
        backends.push((backend, measured));
    }
    AppendThroughputResults { backends }
}

async fn measure_on(bench: &BenchDb, profile: &Profile) -> anyhow::Result<Vec<AppendCell>> {
    let max_writers = WRITERS.iter().copied().max().unwrap_or(1);
    let pools = Arc::new(bench.connect_many(max_writers).await?);
    let window = profile.window_on(bench.backend);
    let appenders = Appender::ALL;
    let mut cells = Vec::new();
    // Fewest writers first: a burst of 32 writers leaves the server flushing for a while
    // (checkpoint, autovacuum), which a single writer waiting on every commit would feel.
    for writers in WRITERS {
        for runs in [Runs::One, Runs::PerWriter] {
            let count = match runs {
                Runs::One => 1,
                Runs::PerWriter => writers,
            };
            // Each appender writes to runs of its own, kept across its windows.
            let mut targets = Vec::new();
            for appender in appenders {
                let mut ids = Vec::with_capacity(count);
                for i in 0..count {
                    let run = RunFactory::new()
                        .key(format!("append-{}-{i}", appender.label()))
                        .title("bench")
                        .epics(0)
                        .try_create(&bench.db)
                        .await?;
                    ids.push(run.id());
                }
                // The baseline's seq per run: a client-side counter stands in for the head.
                let seqs: Vec<AtomicI64> = (0..count).map(|_| 0.into()).collect();
                let sinks: Vec<LogSink> = match appender {
                    Appender::SharedSink => ids
                        .iter()
                        .map(|id| LogSink::start(bench.db.clone(), *id, ""))
                        .collect(),
                    _ => Vec::new(),
                };
                targets.push((Arc::new(ids), Arc::new(seqs), Arc::new(sinks)));
            }
            // The appenders take turns window by window, so that background load falls on both.
            let mut windows: Vec<Vec<Window>> = vec![Vec::new(); appenders.len()];
            for repeat in 0..profile.repeats {
                for j in 0..appenders.len() {
                    let a = (j + repeat) % appenders.len();
                    let appender = appenders[a];
                    let (ids, seqs, sinks) = targets[a].clone();
                    let pools = pools.clone();
                    let w = run_window(profile, window, writers, move |w| {
                        let (ids, seqs, sinks, pools) =
                            (ids.clone(), seqs.clone(), sinks.clone(), pools.clone());
                        async move {
                            let r = match runs {
                                Runs::One => 0,
                                Runs::PerWriter => w,
                            };
                            append_once(&pools[w], appender, ids[r], &seqs[r], sinks.get(r)).await
                        }
                    })
                    .await;
                    windows[a].push(w);
                }
            }
            for (a, appender) in appenders.into_iter().enumerate() {
                cells.push(AppendCell {
                    runs,
                    writers,
                    appender,
                    throughput: Throughput::of(&windows[a]),
                });
            }
        }
    }
    if let Ok(pools) = Arc::try_unwrap(pools) {
        close_all(pools).await;
    }
    Ok(cells)
}

/// One append by `appender` to run `run_id`; `seq` is the baseline's counter for that run,
/// `sink` the run's shared sink.
async fn append_once(
    db: &DatabaseConnection,
    appender: Appender,
    run_id: Uuid,
    seq: &AtomicI64,
    sink: Option<&LogSink>,
) -> Outcome {
    let result = match appender {
        Appender::Ours => append_run_log(db, run_id, &line(fastrand::u64(..1_000_000)))
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
        Appender::SharedSink => match sink {
            Some(sink) => {
                sink.line(line(fastrand::u64(..1_000_000))).await;
                sink.flush().await.map_err(anyhow::Error::from)
            }
            None => Err(anyhow::anyhow!("no sink for run {run_id}")),
        },
        Appender::PlainInsert => {
            insert_row(db, run_id, seq.fetch_add(1, Ordering::Relaxed) + 1).await
        }
    };
    match result {
        Ok(()) => Outcome::ok(),
        Err(e) => Outcome::error(format!("{e:#}")),
    }
}

/// The baseline: one autocommitted INSERT of a log row, in plain sqlx.
async fn insert_row(db: &DatabaseConnection, run_id: Uuid, seq: i64) -> anyhow::Result<()> {
    let message = line(u64::try_from(seq)?).into_bytes();
    match db.get_database_backend() {
        DbBackend::Postgres => {
            sqlx::query(
                "INSERT INTO run_log (run_id, seq, batch_id, line_no, logged_at, message) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(run_id)
            .bind(seq)
            .bind(Uuid::new_v4())
            .bind(0i32)
            .bind(Utc::now())
            .bind(message)
            .execute(db.get_postgres_connection_pool())
            .await?;
        }
        DbBackend::Sqlite => {
            sqlx::query(
                "INSERT INTO run_log (run_id, seq, batch_id, line_no, logged_at, message) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(run_id)
            .bind(seq)
            .bind(Uuid::new_v4())
            .bind(0i32)
            .bind(Utc::now())
            .bind(message)
            .execute(db.get_sqlite_connection_pool())
            .await?;
        }
        other => anyhow::bail!("no INSERT baseline for {other:?}"),
    }
    Ok(())
}

impl AppendThroughputResults {
    fn rate(cells: &[AppendCell], runs: Runs, writers: usize, appender: Appender) -> f64 {
        cells
            .iter()
            .find(|c| c.runs == runs && c.writers == writers && c.appender == appender)
            .map_or(f64::NAN, |c| c.throughput.ok_per_s.median)
    }

    /// The goals: ours ≥ 0.8 of the plain INSERT, in every cell.
    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        for (backend, measured) in &self.backends {
            let Some(cells) = measured.done() else {
                continue;
            };
            for runs in [Runs::One, Runs::PerWriter] {
                for writers in WRITERS {
                    let insert = Self::rate(cells, runs, writers, Appender::PlainInsert);
                    for (appender, what) in [
                        (
                            Appender::Ours,
                            "append throughput: append_run_log / plain INSERT",
                        ),
                        (
                            Appender::SharedSink,
                            "append throughput: shared LogSink / plain INSERT",
                        ),
                    ] {
                        // A sink per writer shares nothing: its rows are in the table only.
                        if appender == Appender::SharedSink && runs == Runs::PerWriter {
                            continue;
                        }
                        let ours = Self::rate(cells, runs, writers, appender);
                        goals.push(Goal {
                            what: what.into(),
                            context: format!(
                                "{}, {writers} writer{}, {}",
                                backend.name(),
                                if writers == 1 { "" } else { "s" },
                                runs.label()
                            ),
                            measured: ours / insert,
                            bound: Bound::AtLeast(GOAL),
                        });
                    }
                }
            }
        }
        goals
    }

    /// The report section, with the gap and its cause.
    pub fn section(&self) -> Section {
        let mut body = String::from(
            "Concurrent writers, one ~100-byte line per call, each writer with a pool of its own \
             (one connection). \
             **Ours**: `append_run_log`, as writers in separate processes would append; and \
             **shared LogSink**: the writers of one process share a `run_engine::LogSink` per \
             run, each queueing its line and waiting until it is committed (`flush`), as the \
             executor's workers do: flushes that arrive while a batch is written are served \
             by the next one (group commit). **Plain INSERT**: one autocommitted `INSERT INTO \
             run_log` per line in plain sqlx, `seq` from a client-side atomic counter, a new \
             batch id each: the raw cost of the row, without the log's ordering and \
             idempotency. The three take turns window by window. Lines per second: median (min–max) over \
             the windows.\n\n",
        );
        for (backend, measured) in &self.backends {
            let _ = writeln!(body, "### {}\n", backend.name());
            let cells = match measured {
                Measured::Done(cells) => cells,
                other => {
                    let _ = writeln!(body, "{}\n", other.missing().unwrap_or_default());
                    continue;
                }
            };
            let mut t = Table::new(&[
                "runs",
                "writers",
                "append_run_log",
                "shared LogSink",
                "plain INSERT",
                "append_run_log / INSERT",
                "LogSink / INSERT",
                "errors",
            ]);
            for runs in [Runs::One, Runs::PerWriter] {
                for writers in WRITERS {
                    let find = |a| {
                        cells
                            .iter()
                            .find(|c| c.runs == runs && c.writers == writers && c.appender == a)
                    };
                    let (Some(ours), Some(sink), Some(insert)) = (
                        find(Appender::Ours),
                        find(Appender::SharedSink),
                        find(Appender::PlainInsert),
                    ) else {
                        continue;
                    };
                    let errors =
                        ours.throughput.errors + sink.throughput.errors + insert.throughput.errors;
                    let first = ours
                        .throughput
                        .first_error
                        .as_ref()
                        .or(sink.throughput.first_error.as_ref())
                        .or(insert.throughput.first_error.as_ref());
                    let ratio = |c: &AppendCell| {
                        format!(
                            "{:.2}",
                            c.throughput.ok_per_s.median / insert.throughput.ok_per_s.median
                        )
                    };
                    t.row(vec![
                        runs.label().into(),
                        writers.to_string(),
                        fmt_rate_summary(&ours.throughput.ok_per_s),
                        fmt_rate_summary(&sink.throughput.ok_per_s),
                        fmt_rate_summary(&insert.throughput.ok_per_s),
                        ratio(ours),
                        ratio(sink),
                        match first {
                            Some(e) => format!("{errors} (first: {e})"),
                            None => errors.to_string(),
                        },
                    ]);
                }
            }
            body.push_str(&t.to_markdown());
            body.push('\n');
            body.push_str(&gap_and_cause(*backend, cells));
            body.push('\n');
        }
        body.push_str(&crate::report::goals_table(&self.goals()));
        Section {
            title: "4. Append throughput vs a plain INSERT".into(),
            body,
        }
    }

    /// The plot: lines per second against writers, one panel per backend.
    pub fn chart_panels(&self) -> Vec<Chart> {
        let mut panels = Vec::new();
        for (backend, measured) in &self.backends {
            let Some(cells) = measured.done() else {
                continue;
            };
            let mut series = Vec::new();
            for (appender, runs, color) in [
                (Appender::Ours, Runs::One, "#d62728"),
                (Appender::Ours, Runs::PerWriter, "#1f77b4"),
                (Appender::SharedSink, Runs::One, "#2ca02c"),
                (Appender::PlainInsert, Runs::One, "#d62728"),
                (Appender::PlainInsert, Runs::PerWriter, "#1f77b4"),
            ] {
                series.push(Series {
                    name: format!("{}, {}", appender.label(), runs.label()),
                    color,
                    dashed: appender == Appender::PlainInsert,
                    points: WRITERS
                        .iter()
                        .map(|&w| {
                            cells
                                .iter()
                                .find(|c| {
                                    c.runs == runs && c.writers == w && c.appender == appender
                                })
                                .map(|c| c.throughput.ok_per_s)
                        })
                        .collect(),
                });
            }
            panels.push(Chart {
                title: backend.name().into(),
                x_label: "concurrent writers".into(),
                y_label: "lines appended per second".into(),
                categories: WRITERS.iter().map(|w| w.to_string()).collect(),
                scale: Scale::Linear,
                format_y: fmt_count,
                series,
            });
        }
        panels
    }
}

/// The gap to the goal, and what causes it, from the figures.
fn gap_and_cause(backend: Backend, cells: &[AppendCell]) -> String {
    let rate = |runs, w, a| AppendThroughputResults::rate(cells, runs, w, a);
    let one = |a| rate(Runs::One, 1, a);
    let max_w = WRITERS.iter().copied().max().unwrap_or(1);
    let hot = rate(Runs::One, max_w, Appender::Ours);
    let hot_sink = rate(Runs::One, max_w, Appender::SharedSink);
    let spread = rate(Runs::PerWriter, max_w, Appender::Ours);
    let insert_hot = rate(Runs::One, max_w, Appender::PlainInsert);
    let statements = match backend {
        Backend::Sqlite => {
            "one statement, as the INSERT is, but a heavier one: an `INSERT ... SELECT` that \
             numbers the lines from the run's `run_log_head`, whose trigger then moves the head \
             (an UPDATE per line), returning the numbers"
        }
        _ => {
            "one statement, as the INSERT is, but a heavier one: a CTE that bumps the run's \
             `run_log_head` and inserts the lines from an array, returning their numbers"
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "**Gap and cause on {}.** With one writer `append_run_log` reaches {:.2} of the INSERT \
         ({} vs {}): that is latency, not contention: an append is {statements}.",
        backend.name(),
        one(Appender::Ours) / one(Appender::PlainInsert),
        fmt_rate(one(Appender::Ours)),
        fmt_rate(one(Appender::PlainInsert)),
    );
    let _ = writeln!(
        out,
        "With {max_w} writers on one run `append_run_log` reaches {} ({:.2} of the INSERT's \
         {}), and {} with a run per writer: {}",
        fmt_rate(hot),
        hot / insert_hot,
        fmt_rate(insert_hot),
        fmt_rate(spread),
        match backend {
            Backend::Sqlite => {
                "SQLite lets one writer in at a time whatever the design, so both sides queue \
                 on its write lock and what costs is the length of our statement (the head's \
                 read and the trigger's update besides the INSERT)."
            }
            _ => {
                "appends to one run are serialised by design: the row lock on the run's \
                 `run_log_head` is held from the bump to the COMMIT (including its WAL flush), \
                 so that lines are numbered in commit order and a follower never skips one; \
                 one run's log so takes one append per commit latency from writers on separate \
                 connections, while the plain INSERTs commit side by side (group commit). \
                 Appends to different runs do not wait for each other."
            }
        }
    );
    let _ = writeln!(
        out,
        "\nWriters in one process that share a `LogSink` get that group commit back: {max_w} \
         of them on one run reach {} ({:.2} of the INSERT), every line committed before its \
         writer goes on, since the lines and flushes that queue up during one transaction go \
         in the next.",
        fmt_rate(hot_sink),
        hot_sink / insert_hot,
    );
    out
}

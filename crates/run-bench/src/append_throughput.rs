//! Scenario 4: append throughput with 1, 8 and 32 concurrent writers, into one run and into a
//! run per writer.
//!
//! Ours is [`run_domain::append_run_log`]. The baseline is the raw cost of the row: a plain
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
use run_domain::{NewRun, append_run_log, create_run};
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
    /// `append_run_log`.
    Ours,
    /// A plain INSERT of the row.
    PlainInsert,
}

impl Appender {
    /// Its name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Appender::Ours => "append_run_log",
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
    let appenders = [Appender::Ours, Appender::PlainInsert];
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
                    let run = create_run(
                        &bench.db,
                        NewRun {
                            key: format!("append-{}-{i}", appender.label()),
                            title: "bench".into(),
                        },
                    )
                    .await?;
                    ids.push(run.id);
                }
                // The baseline's seq per run: a client-side counter stands in for the head.
                let seqs: Vec<AtomicI64> = (0..count).map(|_| 0.into()).collect();
                targets.push((Arc::new(ids), Arc::new(seqs)));
            }
            // The appenders take turns window by window, so that background load falls on both.
            let mut windows: Vec<Vec<Window>> = vec![Vec::new(); appenders.len()];
            for repeat in 0..profile.repeats {
                for j in 0..appenders.len() {
                    let a = (j + repeat) % appenders.len();
                    let appender = appenders[a];
                    let (ids, seqs) = targets[a].clone();
                    let pools = pools.clone();
                    let w = run_window(profile, window, writers, move |w| {
                        let (ids, seqs, pools) = (ids.clone(), seqs.clone(), pools.clone());
                        async move {
                            let r = match runs {
                                Runs::One => 0,
                                Runs::PerWriter => w,
                            };
                            append_once(&pools[w], appender, ids[r], &seqs[r]).await
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

/// One append by `appender` to run `run_id`; `seq` is the baseline's counter for that run.
async fn append_once(
    db: &DatabaseConnection,
    appender: Appender,
    run_id: Uuid,
    seq: &AtomicI64,
) -> Outcome {
    let result = match appender {
        Appender::Ours => append_run_log(db, run_id, &line(fastrand::u64(..1_000_000)))
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
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
                    let ours = Self::rate(cells, runs, writers, Appender::Ours);
                    let insert = Self::rate(cells, runs, writers, Appender::PlainInsert);
                    goals.push(Goal {
                        what: "append throughput: ours / plain INSERT".into(),
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
        goals
    }

    /// The report section, with the gap and its cause.
    pub fn section(&self) -> Section {
        let mut body = String::from(
            "Concurrent writers, one ~100-byte line per call, each writer with a pool of its own \
             (one connection). \
             **Ours**: `append_run_log`. **Plain INSERT**: one autocommitted `INSERT INTO \
             run_log` per line in plain sqlx, `seq` from a client-side atomic counter, a new \
             batch id each: the raw cost of the row, without the log's ordering and \
             idempotency. The two take turns window by window. Lines per second: median (min–max) over \
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
                "plain INSERT",
                "ours / INSERT",
                "errors",
            ]);
            for runs in [Runs::One, Runs::PerWriter] {
                for writers in WRITERS {
                    let find = |a| {
                        cells
                            .iter()
                            .find(|c| c.runs == runs && c.writers == writers && c.appender == a)
                    };
                    let (Some(ours), Some(insert)) =
                        (find(Appender::Ours), find(Appender::PlainInsert))
                    else {
                        continue;
                    };
                    let errors = ours.throughput.errors + insert.throughput.errors;
                    let first = ours
                        .throughput
                        .first_error
                        .as_ref()
                        .or(insert.throughput.first_error.as_ref());
                    t.row(vec![
                        runs.label().into(),
                        writers.to_string(),
                        fmt_rate_summary(&ours.throughput.ok_per_s),
                        fmt_rate_summary(&insert.throughput.ok_per_s),
                        format!(
                            "{:.2}",
                            ours.throughput.ok_per_s.median / insert.throughput.ok_per_s.median
                        ),
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
    let spread = rate(Runs::PerWriter, max_w, Appender::Ours);
    let insert_hot = rate(Runs::One, max_w, Appender::PlainInsert);
    let statements = match backend {
        Backend::Sqlite => {
            "five statements (`BEGIN IMMEDIATE`; `UPDATE run_log_head ... RETURNING`; a \
             `SELECT` by batch id; the `INSERT`; `COMMIT`), each through sea-orm"
        }
        _ => {
            "six round trips (`BEGIN`; `SET TRANSACTION READ WRITE`, which sea-orm sends \
             because the append asks for `AccessMode::ReadWrite`, the default anyway; \
             `UPDATE run_log_head ... RETURNING`; a `SELECT` by batch id; the `INSERT`; \
             `COMMIT`)"
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "**Gap and cause on {}.** With one writer ours reaches {:.2} of the INSERT ({} vs {}). \
         That is latency, not contention: an append is {statements} against one \
         autocommitted statement. The batch-id lookup is needed only when a caller retries \
         with its own batch id: `append_run_log` makes a fresh one, which cannot exist yet.",
        backend.name(),
        one(Appender::Ours) / one(Appender::PlainInsert),
        fmt_rate(one(Appender::Ours)),
        fmt_rate(one(Appender::PlainInsert)),
    );
    let _ = writeln!(
        out,
        "With {max_w} writers on one run ours reaches {} ({:.2} of the INSERT's {}), and {} \
         with a run per writer: {}",
        fmt_rate(hot),
        hot / insert_hot,
        fmt_rate(insert_hot),
        fmt_rate(spread),
        match backend {
            Backend::Sqlite => {
                "SQLite lets one writer in at a time whatever the design, so both sides queue \
                 on its write lock and what costs is the length of our transaction."
            }
            _ => {
                "appends to one run are serialised by design: the row lock on the run's \
                 `run_log_head` is held from the bump to the COMMIT (including its WAL flush), \
                 so one run's log takes one append per transaction latency however many \
                 writers there are, while the plain INSERTs commit side by side (group \
                 commit). Appends to different runs do not wait for each other, and a batch \
                 of lines (`append_run_logs`) pays the lock once."
            }
        }
    );
    out
}

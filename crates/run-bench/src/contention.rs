//! Updating rows under contention, three ways, with 1, 8 and 32 writers on one row
//! and spread over 64 rows.
//!
//! Every successful operation reads a run and writes its title (and version):
//!
//! - **CAS**: [`VersionedUpdate::find_versioned`], then [`VersionedUpdate::update_versioned`]
//!   with no retry; a conflict is counted and the writer starts over with a fresh read.
//! - **retry**: [`update_with_retry`] with the default [`RetryPolicy`] (jittered backoff); each
//!   attempt that meets a newer version is counted as a conflict.
//! - **lock**: plain sqlx in a transaction: `SELECT version ... FOR UPDATE`, then `UPDATE`
//!   (SQLite has no row locks: `BEGIN IMMEDIATE` takes the database's write lock instead).
//!
//! Each writer has a pool of its own (one connection), as separate executor processes would
//! have.

use crate::bench_db::{Backend, BenchDb, Measured, Servers, close_all};
use crate::measure::{Outcome, Profile, Throughput, Window, run_window};
use crate::report::{Section, Table, fmt_rate, fmt_rate_summary};
use chrono::Utc;
use entity::run;
use run_domain::{Changes, RetryPolicy, VersionedUpdate, update_with_retry};
use run_engine_tests::RunFactory;
use sea_orm::sqlx;
use sea_orm::{DatabaseConnection, DbBackend};
use std::fmt::Write as _;
use std::sync::Arc;
use uuid::Uuid;

/// The backends this scenario runs on.
pub const BACKENDS: [Backend; 2] = [Backend::Postgres, Backend::Sqlite];

/// Concurrent writers per cell.
pub const WRITERS: [usize; 3] = [1, 8, 32];

/// Rows in the spread-out case.
pub const SPREAD_ROWS: usize = 64;

/// How a writer changes a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read, compare-and-swap, no retry.
    Cas,
    /// `update_with_retry`.
    Retry,
    /// Row lock (`SELECT ... FOR UPDATE`), then update, in a transaction.
    Lock,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 3] = [Method::Cas, Method::Retry, Method::Lock];

    /// Its name in the tables.
    pub fn label(self, backend: Backend) -> &'static str {
        match (self, backend) {
            (Method::Cas, _) => "(a) CAS, no retry",
            (Method::Retry, _) => "(b) update_with_retry",
            (Method::Lock, Backend::Sqlite) => "(c) BEGIN IMMEDIATE, SELECT, UPDATE",
            (Method::Lock, _) => "(c) SELECT ... FOR UPDATE, UPDATE",
        }
    }
}

/// Which rows the writers aim at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Everyone updates the same row.
    OneRow,
    /// Each update picks one of [`SPREAD_ROWS`] rows at random.
    Spread,
}

impl Target {
    /// Its name in the tables.
    pub fn label(self) -> String {
        match self {
            Target::OneRow => "one row".into(),
            Target::Spread => format!("{SPREAD_ROWS} rows"),
        }
    }
}

/// One cell's figures.
#[derive(Debug, Clone)]
pub struct ContentionCell {
    /// Which rows.
    pub target: Target,
    /// How many writers.
    pub writers: usize,
    /// How they update.
    pub method: Method,
    /// Updates and conflicts per second.
    pub throughput: Throughput,
}

/// The scenario's results.
#[derive(Debug, Clone)]
pub struct ContentionResults {
    /// Per backend.
    pub backends: Vec<(Backend, Measured<Vec<ContentionCell>>)>,
}

/// Runs the scenario on [`BACKENDS`].
pub async fn run(servers: &Servers, profile: &Profile) -> ContentionResults {
    let mut backends = Vec::new();
    for backend in BACKENDS {
        eprintln!("[run-bench] contention: {}", backend.name());
        let measured = servers
            .measure(backend, async |bench| measure_on(bench, profile).await)
            .await;
        backends.push((backend, measured));
    }
    ContentionResults { backends }
}

async fn measure_on(bench: &BenchDb, profile: &Profile) -> anyhow::Result<Vec<ContentionCell>> {
    let mut ids = Vec::with_capacity(SPREAD_ROWS);
    for i in 0..SPREAD_ROWS {
        let run = RunFactory::new()
            .key(format!("contention-{i}"))
            .title("bench")
            .epics(0)
            .try_create(&bench.db)
            .await?;
        ids.push(run.id());
    }
    let ids = Arc::new(ids);
    let max_writers = WRITERS.iter().copied().max().unwrap_or(1);
    let pools = Arc::new(bench.connect_many(max_writers).await?);
    let window = profile.window_on(bench.backend);
    let mut cells = Vec::new();
    // Fewest writers first: a burst of 32 writers leaves the server flushing for a while
    // (checkpoint, autovacuum), which a single writer waiting on every commit would feel.
    for writers in WRITERS {
        for target in [Target::OneRow, Target::Spread] {
            // The methods take turns window by window, so that background load falls on all.
            let mut windows: Vec<Vec<Window>> = vec![Vec::new(); Method::ALL.len()];
            for repeat in 0..profile.repeats {
                for j in 0..Method::ALL.len() {
                    let m = (j + repeat) % Method::ALL.len();
                    let method = Method::ALL[m];
                    let (ids, pools) = (ids.clone(), pools.clone());
                    let w = run_window(profile, window, writers, move |w| {
                        let (ids, pools) = (ids.clone(), pools.clone());
                        async move {
                            let id = match target {
                                Target::OneRow => ids[0],
                                Target::Spread => ids[fastrand::usize(..ids.len())],
                            };
                            update_once(&pools[w], method, id, w).await
                        }
                    })
                    .await;
                    windows[m].push(w);
                }
            }
            for (m, method) in Method::ALL.into_iter().enumerate() {
                cells.push(ContentionCell {
                    target,
                    writers,
                    method,
                    throughput: Throughput::of(&windows[m]),
                });
            }
        }
    }
    cells.sort_by_key(|c| (c.target == Target::Spread, c.writers));
    if let Ok(pools) = Arc::try_unwrap(pools) {
        close_all(pools).await;
    }
    Ok(cells)
}

/// One operation of `method` on run `id` by writer `w`.
async fn update_once(db: &DatabaseConnection, method: Method, id: Uuid, w: usize) -> Outcome {
    let title = format!("writer {w}");
    match method {
        Method::Cas => {
            let current = match run::Entity::find_versioned(db, id).await {
                Ok(c) => c,
                Err(e) => return Outcome::error(e),
            };
            let changes = Changes::new().set(run::Column::Title, title);
            match run::Entity::update_versioned(db, id, current.version, changes).await {
                Ok(_) => Outcome::ok(),
                Err(e) if e.is_conflict() => Outcome::conflict(),
                Err(e) => Outcome::error(e),
            }
        }
        Method::Retry => {
            let mut attempts = 0u64;
            let result =
                update_with_retry::<run::Entity, _, _>(db, id, &RetryPolicy::default(), |_| {
                    attempts += 1;
                    Changes::new().set(run::Column::Title, title.clone())
                })
                .await;
            match result {
                Ok(_) => Outcome {
                    ok: 1,
                    conflicts: attempts.saturating_sub(1),
                    ..Outcome::default()
                },
                Err(e) if e.is_conflict() => Outcome {
                    conflicts: attempts,
                    gave_up: 1,
                    ..Outcome::default()
                },
                Err(e) => Outcome::error(e),
            }
        }
        Method::Lock => match lock_then_update(db, id, title).await {
            Ok(()) => Outcome::ok(),
            Err(e) => Outcome::error(e),
        },
    }
}

/// The pessimistic baseline in plain sqlx: lock the row, read its version, write, commit.
async fn lock_then_update(db: &DatabaseConnection, id: Uuid, title: String) -> anyhow::Result<()> {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let mut tx = db.get_postgres_connection_pool().begin().await?;
            // SAFETY(row lock): FOR UPDATE holds the row until commit, so the version read is
            // the one the UPDATE overwrites.
            let version: i32 =
                sqlx::query_scalar("SELECT version FROM run WHERE id = $1 FOR UPDATE")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
            sqlx::query("UPDATE run SET title = $1, version = $2, updated_at = $3 WHERE id = $4")
                .bind(title)
                .bind(version + 1)
                .bind(Utc::now())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        DbBackend::Sqlite => {
            // SAFETY(write lock): BEGIN IMMEDIATE takes SQLite's single write lock up front, the
            // closest thing it has to a row lock.
            let mut tx = db
                .get_sqlite_connection_pool()
                .begin_with("BEGIN IMMEDIATE")
                .await?;
            let version: i32 = sqlx::query_scalar("SELECT version FROM run WHERE id = ?")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query("UPDATE run SET title = ?, version = ?, updated_at = ? WHERE id = ?")
                .bind(title)
                .bind(version + 1)
                .bind(Utc::now())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        other => anyhow::bail!("no lock baseline for {other:?}"),
    }
    Ok(())
}

impl ContentionResults {
    /// The report section, with where compare-and-swap loses.
    pub fn section(&self) -> Section {
        let mut body = String::from(
            "Each operation reads a run and updates its title. **(a)** `find_versioned` then \
             `update_versioned`, no retry: a conflict is counted and the writer starts over \
             with a fresh read. **(b)** `update_with_retry` (default policy: 16 attempts, \
             jittered backoff 1–100 ms); every attempt that meets a newer version counts as a \
             conflict, *gave up* counts operations that ran out of attempts. **(c)** plain \
             sqlx, in a transaction: `SELECT version ... FOR UPDATE`, then `UPDATE` \
             (SQLite: `BEGIN IMMEDIATE`, since it has no row locks). Each writer has its own \
             pool of one connection, as a separate process would. The three methods take turns \
             window by window, so that changes in background load fall on all of them. Rates: \
             median (min–max) over the windows.\n\n",
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
                "rows",
                "writers",
                "method",
                "updates/s",
                "conflicts/s",
                "conflicts / attempts",
                "gave up",
                "errors",
            ]);
            for c in cells {
                let th = &c.throughput;
                let attempts = th.ok_per_s.median + th.conflicts_per_s.median;
                t.row(vec![
                    c.target.label(),
                    c.writers.to_string(),
                    c.method.label(*backend).into(),
                    fmt_rate_summary(&th.ok_per_s),
                    fmt_rate(th.conflicts_per_s.median),
                    if attempts > 0.0 {
                        format!("{:.0}%", 100.0 * th.conflicts_per_s.median / attempts)
                    } else {
                        "n/a".into()
                    },
                    th.gave_up.to_string(),
                    match &th.first_error {
                        Some(e) => format!("{} (first: {e})", th.errors),
                        None => th.errors.to_string(),
                    },
                ]);
            }
            body.push_str(&t.to_markdown());
            body.push('\n');
            body.push_str(&where_cas_loses(*backend, cells));
            body.push('\n');
        }
        Section {
            title: "3. Contention: compare-and-swap, retry, row lock".into(),
            body,
        }
    }
}

/// Sentences naming every cell where a compare-and-swap method finished fewer updates than the
/// lock (by more than 10 %), and where it won.
fn where_cas_loses(backend: Backend, cells: &[ContentionCell]) -> String {
    let rate = |target, writers, method| {
        cells
            .iter()
            .find(|c| c.target == target && c.writers == writers && c.method == method)
            .map_or(f64::NAN, |c| c.throughput.ok_per_s.median)
    };
    let (mut loses, mut wins) = (Vec::new(), Vec::new());
    for target in [Target::OneRow, Target::Spread] {
        for writers in WRITERS {
            let lock = rate(target, writers, Method::Lock);
            for method in [Method::Cas, Method::Retry] {
                let cas = rate(target, writers, method);
                let ratio = cas / lock;
                let text = format!(
                    "{} with {writers} writer{} on {}: {} vs {} ({:.2}×)",
                    method.label(backend),
                    if writers == 1 { "" } else { "s" },
                    target.label(),
                    fmt_rate(cas),
                    fmt_rate(lock),
                    ratio
                );
                if ratio < 0.9 {
                    loses.push(text);
                } else if ratio > 1.1 {
                    wins.push(text);
                }
            }
        }
    }
    let mut out = format!("**Where CAS loses on {}** (vs (c)):\n\n", backend.name());
    let solo = rate(Target::OneRow, 1, Method::Cas) / rate(Target::OneRow, 1, Method::Lock);
    let _ = writeln!(
        out,
        "With one writer nothing contends, and (a) runs at {solo:.2}× the rate of (c): that \
         is the cost of one operation (two sea-orm calls, a read and the compare-and-swap, \
         against four plain sqlx statements in a transaction). Losses well below that ratio \
         are contention: conflicts that throw the work away.\n"
    );
    if loses.is_empty() {
        out.push_str("- nowhere by more than 10 %\n");
    }
    for l in &loses {
        let _ = writeln!(out, "- {l}");
    }
    out.push_str("\nWhere it wins by more than 10 %:\n\n");
    if wins.is_empty() {
        out.push_str("- nowhere\n");
    }
    for w in &wins {
        let _ = writeln!(out, "- {w}");
    }
    out
}

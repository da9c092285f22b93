//! The backends, their servers, and a fresh migrated database for each scenario.
//!
//! Every scenario gets a database of its own from the scratch-database helper the tests use
//! too ([`run_engine_tests::ScratchDb`]): `bench_<uuid>` on the PostgreSQL or MariaDB server,
//! or a temporary SQLite file, migrated with [`migration::apply`] and dropped afterwards; its
//! pools come from [`run_domain::connect`]. Benchmarks are not tests: a server that cannot be
//! reached is reported as skipped, with the reason, and the rest runs.

use anyhow::anyhow;
use run_engine_tests::{ScratchDb, ScratchError};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use std::time::Duration;

/// How long to wait for a server before reporting it as skipped.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A database backend the suite can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// SQLite, in a temporary file.
    Sqlite,
    /// PostgreSQL, from `RUN_ENGINE_BENCH_POSTGRES_URL`.
    Postgres,
    /// MariaDB (or MySQL), from `RUN_ENGINE_BENCH_MYSQL_URL`.
    MySql,
}

impl Backend {
    /// Every backend, in the order the report lists them.
    pub const ALL: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::MySql];

    /// The name shown in the report.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::MySql => "MariaDB",
        }
    }

    /// The environment variable naming this backend's server, if it has one.
    pub fn env_var(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("RUN_ENGINE_BENCH_POSTGRES_URL"),
            Backend::MySql => Some("RUN_ENGINE_BENCH_MYSQL_URL"),
        }
    }

    /// The server used when the environment names none.
    pub fn default_url(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("postgres://postgres@127.0.0.1:5432/postgres"),
            Backend::MySql => Some("mysql://root@127.0.0.1:3306/test"),
        }
    }

    /// The server URL: the environment's, else the default.
    pub fn server_url(self) -> Option<String> {
        let var = self.env_var()?;
        match std::env::var(var) {
            Ok(url) if !url.is_empty() => Some(url),
            _ => self.default_url().map(str::to_owned),
        }
    }

    /// sea-orm's name for the backend.
    pub fn db_backend(self) -> DbBackend {
        match self {
            Backend::Sqlite => DbBackend::Sqlite,
            Backend::Postgres => DbBackend::Postgres,
            Backend::MySql => DbBackend::MySql,
        }
    }
}

/// Whether a backend can be benchmarked, found once at start-up.
#[derive(Debug, Clone)]
pub enum Availability {
    /// The server answered.
    Ready {
        /// URL of a database on the server from which bench databases are created (for SQLite,
        /// unused).
        admin_url: String,
        /// The server's version string.
        version: String,
        /// Durability settings that shape the figures (fsync, commit mode, journal).
        settings: String,
    },
    /// The server could not be used; the reason is printed in place of its figures.
    Skipped(String),
}

/// The outcome of one scenario on one backend.
#[derive(Debug, Clone)]
pub enum Measured<T> {
    /// The figures.
    Done(T),
    /// The backend was not available (the reason).
    Skipped(String),
    /// The scenario failed on this backend (the error).
    Failed(String),
}

impl<T> Measured<T> {
    /// The figures, if the scenario ran.
    pub fn done(&self) -> Option<&T> {
        match self {
            Measured::Done(t) => Some(t),
            _ => None,
        }
    }

    /// What to print instead of figures, if the scenario did not run.
    pub fn missing(&self) -> Option<String> {
        match self {
            Measured::Done(_) => None,
            Measured::Skipped(reason) => Some(format!("skipped: {reason}")),
            Measured::Failed(error) => Some(format!("failed: {error}")),
        }
    }
}

/// The servers found at start-up, one [`Availability`] per backend.
#[derive(Debug, Clone)]
pub struct Servers {
    sqlite: Availability,
    postgres: Availability,
    mysql: Availability,
}

impl Servers {
    /// Connects to each backend's server once, reads its version, and remembers which are
    /// usable. Never fails: an unusable server is [`Availability::Skipped`] with the reason.
    pub async fn probe() -> Servers {
        Servers {
            sqlite: availability_of(Backend::Sqlite).await,
            postgres: availability_of(Backend::Postgres).await,
            mysql: availability_of(Backend::MySql).await,
        }
    }

    /// What start-up found for `backend`.
    pub fn availability(&self, backend: Backend) -> &Availability {
        match backend {
            Backend::Sqlite => &self.sqlite,
            Backend::Postgres => &self.postgres,
            Backend::MySql => &self.mysql,
        }
    }

    /// Runs `scenario` on a fresh migrated database of `backend` and drops the database after,
    /// whether the scenario succeeded or not.
    pub async fn measure<T>(
        &self,
        backend: Backend,
        scenario: impl AsyncFnOnce(&BenchDb) -> anyhow::Result<T>,
    ) -> Measured<T> {
        let admin_url = match self.availability(backend) {
            Availability::Ready { admin_url, .. } => admin_url.clone(),
            Availability::Skipped(reason) => return Measured::Skipped(reason.clone()),
        };
        let bench = match BenchDb::create(backend, &admin_url).await {
            Ok(bench) => bench,
            Err(e) => return Measured::Failed(format!("creating the bench database: {e:#}")),
        };
        let result = scenario(&bench).await;
        bench.destroy().await;
        match result {
            Ok(t) => Measured::Done(t),
            Err(e) => Measured::Failed(format!("{e:#}")),
        }
    }
}

/// Where a backend's server lives, password redacted, for messages.
fn server_label(backend: Backend) -> String {
    match backend.server_url() {
        Some(url) => run_domain::redact_url(&url),
        None => "a temporary file".to_owned(),
    }
}

async fn availability_of(backend: Backend) -> Availability {
    match tokio::time::timeout(PROBE_TIMEOUT, probe(backend)).await {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => Availability::Skipped(format!("{e:#}")),
        Err(_) => Availability::Skipped(format!(
            "no answer from {} within {} s",
            server_label(backend),
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

async fn probe(backend: Backend) -> anyhow::Result<Availability> {
    let admin_url = backend
        .server_url()
        .unwrap_or_else(|| "sqlite::memory:".to_owned());
    // The error names the server (password redacted).
    let db = run_domain::connect(&admin_url).await?;
    let (version_sql, settings_sql) = match backend {
        Backend::Sqlite => ("SELECT sqlite_version()", None),
        Backend::Postgres => (
            "SELECT version()",
            Some(
                "SELECT 'fsync=' || current_setting('fsync') || ', synchronous_commit=' \
                 || current_setting('synchronous_commit') || ', shared_buffers=' \
                 || current_setting('shared_buffers')",
            ),
        ),
        Backend::MySql => (
            "SELECT VERSION()",
            Some(
                "SELECT CONCAT('innodb_flush_log_at_trx_commit=', \
                 @@innodb_flush_log_at_trx_commit, ', sync_binlog=', @@sync_binlog, \
                 ', max_allowed_packet=', @@max_allowed_packet)",
            ),
        ),
    };
    let version = query_string(&db, version_sql).await?;
    let settings = match settings_sql {
        Some(sql) => query_string(&db, sql).await?,
        // run_domain::connect's SQLite defaults, which every bench database uses.
        None => "journal_mode=WAL, synchronous=NORMAL, as run_domain::connect sets".to_owned(),
    };
    db.close().await.ok();
    Ok(Availability::Ready {
        admin_url,
        version,
        settings,
    })
}

/// The first column of the first row of `sql`, as text.
pub async fn query_string(db: &DatabaseConnection, sql: &str) -> anyhow::Result<String> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?
        .ok_or_else(|| anyhow!("{sql}: no row"))?;
    Ok(row.try_get_by_index::<String>(0)?)
}

/// A fresh, migrated database that lives for one scenario.
pub struct BenchDb {
    /// A pool on the bench database, with run-domain's defaults.
    pub db: DatabaseConnection,
    /// The bench database's URL (to open more pools, or hand to a child process).
    pub url: String,
    /// Which backend it is on.
    pub backend: Backend,
    scratch: ScratchDb,
}

impl BenchDb {
    /// Creates `bench_<uuid>` on the server of `admin_url` (or a temporary SQLite file) and
    /// applies every migration.
    pub async fn create(backend: Backend, admin_url: &str) -> anyhow::Result<BenchDb> {
        let scratch = match backend {
            Backend::Sqlite => ScratchDb::sqlite(PREFIX),
            Backend::Postgres | Backend::MySql => ScratchDb::on_server(admin_url, PREFIX).await?,
        };
        let db = match run_domain::connect(scratch.url()).await {
            Ok(db) => db,
            Err(e) => {
                report_leftover(scratch.remove().await);
                return Err(e.into());
            }
        };
        let bench = BenchDb {
            db,
            url: scratch.url().to_owned(),
            backend,
            scratch,
        };
        if let Err(e) = migration::apply(&bench.db, None).await {
            bench.destroy().await;
            return Err(anyhow!("migrating the bench database: {e}"));
        }
        Ok(bench)
    }

    /// Opens `n` more pools on this database, one per concurrent writer, as `n` executor
    /// processes would: run-domain's settings (see [`run_domain::connect`]) but a single
    /// connection each ([`run_domain::connection::connect_with`]).
    ///
    /// One connection, because sqlx hands a released connection back to its pool from a
    /// spawned task: on a busy 2-core machine the next acquire often finds the pool empty and
    /// opens another connection, so 32 pools of 16 exhaust PostgreSQL's `max_connections` (and
    /// starve whatever else uses the server). One writer needs one connection at a time.
    pub async fn connect_many(&self, n: usize) -> anyhow::Result<Vec<DatabaseConnection>> {
        let mut pools = Vec::with_capacity(n);
        for _ in 0..n {
            pools.push(run_domain::connection::connect_with(&self.url, 1).await?);
        }
        Ok(pools)
    }

    /// Closes the pool and drops the database (best effort: a failure is printed, not raised).
    pub async fn destroy(self) {
        self.db.close().await.ok();
        report_leftover(self.scratch.remove().await);
    }
}

/// What the names of bench databases start with, so that a stray one is recognised.
const PREFIX: &str = "bench";

/// Prints a database that could not be dropped (it is left behind, not a failure).
fn report_leftover(removed: Result<(), ScratchError>) {
    if let Err(e) = removed {
        eprintln!("[run-bench] could not drop a bench database: {e:#}");
    }
}

/// Closes every pool of `pools` (best effort).
pub async fn close_all(pools: Vec<DatabaseConnection>) {
    for pool in pools {
        pool.close().await.ok();
    }
}

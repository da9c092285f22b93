//! The shared test fixture: a fresh, isolated database per test on each backend.
//!
//! SQLite always runs (a temporary file). PostgreSQL and MariaDB run when their server is named:
//!
//! - `RUN_ENGINE_TEST_POSTGRES_URL`, e.g. `postgres://postgres@127.0.0.1:5432/postgres`
//! - `RUN_ENGINE_TEST_MYSQL_URL`, e.g. `mysql://root@127.0.0.1:3306/test`
//!
//! The URL names a server and a database the fixture can connect to in order to create and drop
//! one database per test. A named server that cannot be reached fails the test with a message
//! naming it. When `CI` is set, an unnamed server fails too: CI never passes by skipping.
//!
//! Use [`each_backend!`] to write one test body that runs on all three. A backend left
//! untested is named on standard error past the test harness's capture, once per test.
//!
//! - [`scratch_db`]: a database created under a fresh name and dropped after, for tests and
//!   benchmarks alike.
//! - [`run_factory`]: [`RunFactory`], the one way to make a run of epics and stories.
//! - [`private_server`]: a PostgreSQL or MariaDB server of a test's own, to kill and restart.

pub mod private_server;
pub mod run_factory;
pub mod scratch_db;

pub use run_factory::{CreatedRun, RunFactory};
pub use scratch_db::{ScratchDb, ScratchError};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use std::io::Write as _;
use std::sync::{Mutex, PoisonError};

/// A database backend under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, in a temporary file.
    Sqlite,
    /// PostgreSQL, from `RUN_ENGINE_TEST_POSTGRES_URL`.
    Postgres,
    /// MariaDB or MySQL, from `RUN_ENGINE_TEST_MYSQL_URL`.
    MySql,
}

impl Backend {
    /// The environment variable that names this backend's server, if it needs one.
    pub fn env_var(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("RUN_ENGINE_TEST_POSTGRES_URL"),
            Backend::MySql => Some("RUN_ENGINE_TEST_MYSQL_URL"),
        }
    }

    /// The backend's name, for people.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::MySql => "MariaDB",
        }
    }

    /// The server URL from the environment; `None` means "skip" (only outside CI).
    ///
    /// # Panics
    /// In CI (`CI` set) when the variable is missing.
    pub fn server_url(self) -> Option<String> {
        let var = self.env_var()?;
        match std::env::var(var) {
            Ok(url) if !url.is_empty() => Some(url),
            _ if std::env::var_os("CI").is_some() => {
                panic!("{var} is not set, but CI must test {self:?}: set it to the server's URL")
            }
            _ => {
                self.report_untested(var);
                None
            }
        }
    }

    /// Says on standard error that the running test leaves this backend untested, once per
    /// test. libtest captures what the test thread prints with `print!` and `eprint!` (and
    /// shows it only for failures), but not writes to the stderr handle itself: the user sees
    /// which backends were not tested, though each such test reports "ok".
    fn report_untested(self, var: &str) {
        static TOLD: Mutex<Vec<(String, Backend)>> = Mutex::new(Vec::new());
        // libtest runs each test on a thread named after it.
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        let mut told = TOLD.lock().unwrap_or_else(PoisonError::into_inner);
        if told.iter().any(|(t, b)| *t == test && *b == self) {
            return;
        }
        let line = format!(
            "note: {test} did not run on {}: {var} is not set\n",
            self.name()
        );
        told.push((test, self));
        // One write, so that the line is not cut by the harness's own output.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// A fresh database that exists for one test and is dropped afterwards.
pub struct TestDb {
    /// A connection pool to the test's own database (run-domain's defaults).
    pub db: DatabaseConnection,
    /// The URL of the test's own database (to hand to subprocesses).
    pub url: String,
    /// Which backend this is.
    pub backend: Backend,
    // Held for its drop, which drops the database; last, so that the pool above goes first.
    _scratch: ScratchDb,
}

impl TestDb {
    /// A fresh empty database, or `None` when the backend is not configured (outside CI).
    ///
    /// # Panics
    /// When the backend is named but cannot be reached, naming it.
    pub async fn empty(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => Some(Self::open(backend, ScratchDb::sqlite(PREFIX)).await),
            Backend::Postgres | Backend::MySql => {
                let admin_url = backend.server_url()?;
                Some(Self::on_server(backend, &admin_url).await)
            }
        }
    }

    /// A fresh empty database created on the server of `admin_url`.
    async fn on_server(backend: Backend, admin_url: &str) -> TestDb {
        let scratch = match ScratchDb::on_server(admin_url, PREFIX).await {
            Ok(scratch) => scratch,
            Err(ScratchError::Unreachable { url, source }) => panic!(
                "{backend:?} server named by {} is unreachable at {url}: {source}",
                backend.env_var().unwrap_or("?"),
            ),
            Err(e) => panic!("{backend:?}: cannot create a test database: {e}"),
        };
        Self::open(backend, scratch).await
    }

    async fn open(backend: Backend, scratch: ScratchDb) -> TestDb {
        let db = run_domain::connect(scratch.url())
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: cannot open the test database: {e}"));
        TestDb {
            db,
            url: scratch.url().to_owned(),
            backend,
            _scratch: scratch,
        }
    }

    /// A fresh database with every migration applied.
    pub async fn migrated(backend: Backend) -> Option<TestDb> {
        let t = Self::empty(backend).await?;
        migration::apply(&t.db, None)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: migrating the test database failed: {e}"));
        Some(t)
    }

    /// The sea-orm backend.
    pub fn db_backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Opens another pool on the same database (as another process would).
    pub async fn reconnect(&self) -> DatabaseConnection {
        run_domain::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("{:?}: reconnect failed: {e}", self.backend))
    }
}

/// What the names of test databases start with, so that a stray one is recognised.
const PREFIX: &str = "re_test";

/// Writes one test that runs on SQLite, PostgreSQL and MariaDB, each in a fresh migrated
/// database: `each_backend!(async fn name(t) { ... })` makes a module `name` with the tests
/// `sqlite`, `postgres` and `mysql`, each binding `t: TestDb`. Start the body with `empty:` —
/// `each_backend!(empty: async fn name(t) { ... })` — for a database with no migration applied.
#[macro_export]
macro_rules! each_backend {
    (empty: $(#[$meta:meta])* async fn $name:ident($t:ident) $body:block) => {
        $crate::each_backend!(@with empty, $(#[$meta])* $name, $t, $body);
    };
    ($(#[$meta:meta])* async fn $name:ident($t:ident) $body:block) => {
        $crate::each_backend!(@with migrated, $(#[$meta])* $name, $t, $body);
    };
    (@with $make:ident, $(#[$meta:meta])* $name:ident, $t:ident, $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                if let Some($t) = $crate::TestDb::$make($crate::Backend::Sqlite).await $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some($t) = $crate::TestDb::$make($crate::Backend::Postgres).await $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn mysql() {
                if let Some($t) = $crate::TestDb::$make($crate::Backend::MySql).await $body
            }
        }
    };
}

/// Creates a run with one epic holding one pending story (command `true`, 3 attempts) and
/// returns the story: `RunFactory::new().command("true").max_attempts(3)`.
pub async fn new_story(db: &DatabaseConnection) -> entity::run_story::Model {
    use run_domain::VersionedUpdate;
    let run = RunFactory::new()
        .command("true")
        .max_attempts(3)
        .create(db)
        .await;
    entity::run_story::Entity::find_versioned(db, run.stories[0])
        .await
        .expect("read story")
}

impl TestDb {
    /// A fresh migrated database on `server` (a private server the test controls).
    pub async fn migrated_on(server: &private_server::PrivateServer) -> TestDb {
        let t = Self::on_server(server.backend(), &server.url()).await;
        migration::apply(&t.db, None)
            .await
            .expect("migrate the private server");
        t
    }
}

/// `SELECT COUNT(*)` of `table`.
///
/// # Panics
/// When the table is gone (which is what tests that feed SQL injection strings check).
pub async fn count_rows(db: &DatabaseConnection, table: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await
        .unwrap_or_else(|e| panic!("table {table} must still exist: {e}"))
        .expect("a row");
    row.try_get::<i64>("", "n").expect("count")
}

/// Every table of the schema, migrations' bookkeeping included.
pub const TABLES: [&str; 6] = [
    "run",
    "run_epic",
    "run_story",
    "run_log_head",
    "run_log",
    "seaql_migrations",
];

/// `(table, rows)` of every table in [`TABLES`], in that order.
///
/// # Panics
/// When a table is gone (see [`count_rows`]).
pub async fn table_counts(db: &DatabaseConnection) -> Vec<(&'static str, i64)> {
    let mut out = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        out.push((table, count_rows(db, table).await));
    }
    out
}

//! Connecting to a database with the right defaults for each backend.

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};
use std::time::Duration;

/// The embedded default: a SQLite file `run-engine.db` in the working directory, created when
/// missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://run-engine.db?mode=rwc";

/// How long a SQLite connection waits for another writer before giving up.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not one of `sqlite:`, `postgres:`/`postgresql:`, `mysql:`/`mariadb:`.
    #[error(
        "unsupported database URL scheme {scheme:?} in {url}: use sqlite://, postgres:// or mysql://"
    )]
    UnsupportedScheme {
        /// The scheme found.
        scheme: String,
        /// The URL, password redacted.
        url: String,
    },
    /// The URL could not be parsed.
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server refused or could not be reached.
    #[error("cannot connect to {url}")]
    Database {
        /// The URL, password redacted.
        url: String,
        /// The driver's error.
        #[source]
        source: DbErr,
    },
}

/// Returns `url` with any password replaced by `***`, safe to print or log.
///
/// ```
/// assert_eq!(
///     run_domain::redact_url("postgres://app:s3cret@db:5432/runs"),
///     "postgres://app:***@db:5432/runs"
/// );
/// assert_eq!(run_domain::redact_url("sqlite://run-engine.db"), "sqlite://run-engine.db");
/// ```
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password fails only for URLs that cannot have one, which this has.
            if parsed.set_password(Some("***")).is_ok() {
                parsed.to_string()
            } else {
                "<database URL with password>".to_owned()
            }
        }
        Ok(_) => url.to_owned(),
        // Unparseable: it might still hold a password, so show only its scheme.
        Err(_) => match url.split_once(':') {
            Some((scheme, _)) if !scheme.contains('@') => format!("{scheme}:<unparseable URL>"),
            _ => "<unparseable URL>".to_owned(),
        },
    }
}

/// Connects to `url` with run-engine's defaults for its backend.
///
/// - SQLite: WAL journal, `synchronous = NORMAL`, foreign keys on, a 60 s busy timeout, and a
///   pool of 8 connections (readers never wait for the writer in WAL mode). A `:memory:`
///   database keeps one connection, since each connection would otherwise get its own database.
/// - PostgreSQL and MariaDB: a pool of 16 connections, a 30 s acquire timeout.
///
/// Statements are not logged, so nothing here prints a URL's password.
///
/// ```no_run
/// # async fn demo() -> Result<(), run_domain::ConnectError> {
/// let db = run_domain::connect(run_domain::DEFAULT_DATABASE_URL).await?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<DatabaseConnection, ConnectError> {
    let redacted = redact_url(url);
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .ok_or_else(|| ConnectError::InvalidUrl {
            url: redacted.clone(),
            reason: "no scheme (expected sqlite://, postgres:// or mysql://)".into(),
        })?;
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .acquire_timeout(Duration::from_secs(30));
    match scheme.as_str() {
        "sqlite" => {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            opts.max_connections(if in_memory { 1 } else { 8 })
                .map_sqlx_sqlite_opts(|o| {
                    o.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal)
                        .foreign_keys(true)
                        .busy_timeout(SQLITE_BUSY_TIMEOUT)
                });
        }
        "postgres" | "postgresql" | "mysql" => {
            opts.max_connections(16);
        }
        other => {
            return Err(ConnectError::UnsupportedScheme {
                scheme: other.to_owned(),
                url: redacted,
            });
        }
    }
    Database::connect(opts)
        .await
        .map_err(|source| ConnectError::Database {
            source: scrub(source, url, &redacted),
            url: redacted,
        })
}

/// A driver error with `url`'s password removed: drivers quote a URL they cannot parse, and
/// nothing this crate returns may carry a password.
fn scrub(err: DbErr, url: &str, redacted: &str) -> DbErr {
    let Some(password) = password_of(url) else {
        return err;
    };
    let shown = format!("{err} {err:?}");
    if !shown.contains(&password) && !shown.contains(url) {
        return err;
    }
    DbErr::Custom(
        err.to_string()
            .replace(url, redacted)
            .replace(&password, "***"),
    )
}

/// The password in `url`, found even when the URL does not parse.
fn password_of(url: &str) -> Option<String> {
    if let Ok(parsed) = url::Url::parse(url) {
        return parsed.password().map(str::to_owned);
    }
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let userinfo = &rest[..rest.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// True when `err` is worth retrying as is: the connection broke or was killed, the server is
/// restarting, the pool had no connection in time, or the database chose this transaction as a
/// deadlock or serialisation victim. Constraint violations, type errors and the like are not.
///
/// Only idempotent work may be retried blindly: run-log appends carry a batch id for that
/// reason and are retried inside [`crate::append_run_logs`]. A compare-and-swap whose first try
/// may have committed shows up on retry as a conflict with `actual == expected + 1`.
pub fn is_transient(err: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            use sea_orm::sqlx::Error as E;
            match e.as_ref() {
                E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => {
                    true
                }
                E::Database(db) => db.code().is_some_and(|code| transient_code(&code)),
                _ => false,
            }
        }
        _ => false,
    }
}

/// SQLSTATE (PostgreSQL, MariaDB) or result code (SQLite) of a retryable failure.
fn transient_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("57P0") // admin/crash shutdown, cannot connect now
        || matches!(
            code,
            "40001" // serialization failure; MariaDB deadlock (1213)
            | "40P01" // deadlock detected
            | "70100" // MariaDB: query/connection killed
            | "5" | "6" | "517" // SQLite BUSY, LOCKED, BUSY_SNAPSHOT
        )
}

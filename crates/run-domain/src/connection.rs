//! Connecting to a database with the right defaults for each backend.

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
    /// The URL names a backend this build leaves out (built without its cargo feature).
    #[error(
        "cannot connect to {url}: this build of run-engine has no {feature} driver (build it with \
         the cargo feature `{feature}`, which is on by default)"
    )]
    NotBuiltIn {
        /// The URL, password redacted.
        url: String,
        /// The cargo feature that brings the driver: `sqlite`, `postgres` or `mysql`.
        feature: &'static str,
    },
    /// The URL could not be parsed.
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Nothing accepts connections at the server's address (checked before the pool tries,
    /// which would wait out its 30 s acquire timeout).
    #[error("cannot connect to {url}: the server {server} cannot be reached: {why}")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// `host:port`.
        server: String,
        /// What happened, with a hint.
        why: String,
    },
    /// The server (or, for SQLite, the file) refused the connection.
    #[error("cannot connect to {url}: {reason}")]
    Database {
        /// The URL, password redacted.
        url: String,
        /// Why, in one clause: the server's message without the driver's wrappers, and a hint
        /// ([`crate::reach::explain`]).
        reason: String,
        /// The driver's error, password removed (its text is `reason`'s source, so it is not
        /// printed again as a cause).
        driver: Box<DbErr>,
    },
}

/// The file a SQLite URL names (`sqlite://path?...` or `sqlite:path`), relative to the working
/// directory; `None` for other URLs and in-memory databases.
///
/// ```
/// use std::path::PathBuf;
/// assert_eq!(
///     run_domain::connection::sqlite_path("sqlite://run-engine.db?mode=rwc"),
///     Some(PathBuf::from("run-engine.db"))
/// );
/// assert_eq!(run_domain::connection::sqlite_path("sqlite::memory:"), None);
/// assert_eq!(run_domain::connection::sqlite_path("postgres://u@h/db"), None);
/// ```
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| std::path::PathBuf::from(path))
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
/// - PostgreSQL and MariaDB: a pool of 16 connections, a 30 s acquire timeout. A server that
///   does not accept TCP connections is reported within about 2 s
///   ([`ConnectError::Unreachable`], see [`crate::reach::probe_server`]).
///
/// Statements are not logged, so nothing here prints a URL's password.
///
/// ```no_run
/// # async fn demo() -> Result<(), run_domain::ConnectError> {
/// let db = run_domain::connect(run_domain::DEFAULT_DATABASE_URL).await?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<DatabaseConnection, ConnectError> {
    open(url, None).await
}

/// Opens a pool on `url` with run-engine's settings for its backend, the pool's size being
/// `pool_size` when given: the one place those settings are written.
async fn open(url: &str, pool_size: Option<u32>) -> Result<DatabaseConnection, ConnectError> {
    let redacted = redact_url(url);
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .ok_or_else(|| ConnectError::InvalidUrl {
            url: redacted.clone(),
            reason: "no scheme (expected sqlite://, postgres:// or mysql://)".into(),
        })?;
    // `mariadb://` is MariaDB's own spelling of a `mysql://` URL; the driver knows only the
    // latter.
    let url = match scheme.as_str() {
        "mariadb" => format!("mysql{}", url.get(scheme.len()..).unwrap_or_default()),
        _ => url.to_owned(),
    };
    let scheme = if scheme == "mariadb" {
        "mysql".to_owned()
    } else {
        scheme
    };
    let mut opts = ConnectOptions::new(url.clone());
    opts.sqlx_logging(false)
        .acquire_timeout(Duration::from_secs(30));
    // Whether the driver of `feature` is in this build.
    let built_in = |feature: &'static str, on: bool| -> Result<(), ConnectError> {
        if on {
            Ok(())
        } else {
            Err(ConnectError::NotBuiltIn {
                url: redacted.clone(),
                feature,
            })
        }
    };
    let default_size = match scheme.as_str() {
        "sqlite" => {
            built_in("sqlite", cfg!(feature = "sqlite"))?;
            #[cfg(feature = "sqlite")]
            opts.map_sqlx_sqlite_opts(|o| {
                use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
            });
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            if in_memory { 1 } else { 8 }
        }
        "postgres" | "postgresql" => {
            built_in("postgres", cfg!(feature = "postgres"))?;
            16
        }
        "mysql" => {
            built_in("mysql", cfg!(feature = "mysql"))?;
            16
        }
        other => {
            return Err(ConnectError::UnsupportedScheme {
                scheme: other.to_owned(),
                url: redacted,
            });
        }
    };
    opts.max_connections(pool_size.unwrap_or(default_size));
    if let Err(e) = crate::reach::probe_server(&url).await {
        return Err(ConnectError::Unreachable {
            url: redacted,
            server: e.server,
            why: e.why,
        });
    }
    Database::connect(opts).await.map_err(|e| {
        let driver = scrub(e);
        ConnectError::Database {
            reason: crate::reach::explain(&driver, &url),
            driver: Box::new(driver),
            url: redacted,
        }
    })
}

/// A driver error with every password removed: drivers quote a URL they cannot parse, and
/// nothing this crate returns may carry a password. Redacts by structure ([`redact_text`]),
/// never by searching for the password's text, which would garble any message that happens to
/// contain it and give the password away by position.
fn scrub(err: DbErr) -> DbErr {
    let shown = format!("{err}");
    let debug = format!("{err:?}");
    if redact_text(&shown) == shown && redact_text(&debug) == debug {
        return err;
    }
    DbErr::Custom(redact_text(&shown))
}

/// Returns `text` with the password of every URL in it (the part of its userinfo after the
/// first `:`) and every `password=...`/`password: ...` field replaced by `***`. Everything else
/// is left exactly as it was: redaction goes by the structure of URLs and fields, never by the
/// password's text, so a password like `o` or `127` garbles nothing.
///
/// ```
/// use run_domain::redact_text;
/// assert_eq!(
///     redact_text("error connecting to 'postgres://app:o@db:5432/runs': Connection refused"),
///     "error connecting to 'postgres://app:***@db:5432/runs': Connection refused"
/// );
/// assert_eq!(redact_text("host=db password=s3cret user=app"), "host=db password=*** user=app");
/// assert_eq!(redact_text("mysql://root@127.0.0.1/test"), "mysql://root@127.0.0.1/test");
/// ```
pub fn redact_text(text: &str) -> String {
    redact_fields(&redact_userinfo(text))
}

/// Characters that end a URL quoted in a message.
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\'' | '"' | '`' | '<' | '>' | '(' | ')' | ',' | ';')
}

/// Redacts the password of every `scheme://user:password@host` in `text`.
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The URL runs to the first character that cannot be in it; its userinfo ends at the
        // last '@' before any query or fragment (a password may hold a raw '@' or '/').
        let end = after.find(ends_url).unwrap_or(after.len());
        let url = &after[..end];
        let tail = url.find(['?', '#']).unwrap_or(url.len());
        match url[..tail].rfind('@') {
            Some(at) => {
                let userinfo = &url[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                rest = &after[at..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Redacts the value of every field named `password` (any case): `password=v`,
/// `password: v`, `password: Some("v")`, `password = 'v'`.
fn redact_fields(text: &str) -> String {
    const NAME: &str = "password";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find(NAME) {
        let name_end = search + found + NAME.len();
        search = name_end;
        // A whole word only: not `passwords` or `no_password`.
        let start = search - NAME.len();
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        if !before_ok {
            continue;
        }
        let after = &text[name_end..];
        let trimmed = after.trim_start_matches(' ');
        let Some(sep) = trimmed.chars().next().filter(|c| matches!(c, '=' | ':')) else {
            continue;
        };
        let mut value_start = name_end + (after.len() - trimmed.len()) + sep.len_utf8();
        value_start +=
            text[value_start..].len() - text[value_start..].trim_start_matches(' ').len();
        let mut value = &text[value_start..];
        if let Some(inner) = value.strip_prefix("Some(") {
            value_start += "Some(".len();
            value = inner;
        }
        let (open, quote) = match value.chars().next() {
            Some(q @ ('"' | '\'')) => (1, Some(q)),
            _ => (0, None),
        };
        let body = &value[open..];
        let len = match quote {
            Some(q) => body.find(q).unwrap_or(body.len()),
            None => body
                .find(|c: char| ends_url(c) || c == '&')
                .unwrap_or(body.len()),
        };
        if len == 0
            || body[..len].starts_with("***")
            || body[..len] == *"YES"
            || body[..len] == *"NO"
        {
            continue;
        }
        let value_begin = value_start + open;
        out.push_str(&text[from..value_begin]);
        out.push_str("***");
        from = value_begin + len;
        search = from;
    }
    out.push_str(&text[from..]);
    out
}

pub use crate::retry::is_transient;

/// Begins a transaction that will write. On SQLite it takes the write lock at `BEGIN`
/// (`BEGIN IMMEDIATE`): a deferred transaction that reads first would have to upgrade its read
/// lock, which fails at once with "database is locked" instead of waiting for the other writer.
/// Elsewhere it is a plain transaction.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
/// let tx = run_domain::begin_write(db).await?;
/// // ... reads and writes ...
/// sea_orm::TransactionSession::commit(tx).await?;
/// # Ok(()) }
/// ```
pub async fn begin_write<C: sea_orm::TransactionTrait>(db: &C) -> Result<C::Transaction, DbErr> {
    db.begin_with_options(sea_orm::TransactionOptions {
        isolation_level: None,
        access_mode: None,
        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
    })
    .await
}

/// Connects to `url` like [`connect`], with a pool of at most `pool_size` connections instead
/// of its default: every other setting (pragmas, timeouts, logging) is [`connect`]'s.
///
/// For callers that open many pools on one server, one per simulated process, where
/// [`connect`]'s 16 connections each would exhaust the server's connection limit. A `:memory:`
/// SQLite database is not shared between pools.
///
/// ```no_run
/// # async fn demo() -> Result<(), run_domain::ConnectError> {
/// let db = run_domain::connection::connect_with("postgres://app@db:5432/runs", 1).await?;
/// # Ok(()) }
/// ```
pub async fn connect_with(url: &str, pool_size: u32) -> Result<DatabaseConnection, ConnectError> {
    open(url, Some(pool_size)).await
}

//! Reaching the database: `.env`, connecting and probing the server, and error messages with
//! every password redacted.

use anyhow::{Context, Result};
use run_domain::retry::{Schedule, retry_when};
use run_domain::{redact_text, redact_url};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use std::time::Duration;

/// How long the database server may take to accept one TCP connection.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refused connection is tried again (a server starting up).
pub(crate) const PROBE_PATIENCE: Duration = Duration::from_secs(2);

/// `text` with every password blanked out by structure: `url` itself is shown redacted, and
/// the userinfo password of any other URL the driver quoted (an unparseable URL comes back whole
/// in its error) and any `password` field are replaced (see [`run_domain::redact_text`]). The
/// password's text is never searched for, so a short password garbles nothing.
pub(crate) fn scrub_password(text: &str, url: &str) -> String {
    redact_text(&text.replace(url, &redact_url(url)))
}

/// The error and its causes, `outer: inner`, leaving out a cause whose text an outer error
/// already quotes (several errors print their source in their own message).
pub(crate) fn render_error(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Reads `.env` if there is one; one that is there but cannot be read or parsed is an error
/// (not a silent fall-back to the default database). Its content is never printed: it may hold
/// a password.
pub(crate) fn load_dotenv() -> Result<(), String> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(dotenvy::Error::LineParse(_, at)) => Err(format!(
            ".env cannot be used: syntax error at position {at} (fix it, or remove it to use the default database)"
        )),
        Err(dotenvy::Error::Io(e)) => Err(format!(".env cannot be read: {e}")),
        Err(_) => Err(".env cannot be used: it holds an invalid value".to_owned()),
    }
}

/// Connects and applies any pending migration. Errors show the URL without its password.
pub(crate) async fn open(url: &str) -> Result<DatabaseConnection> {
    probe_server(url).await?;
    let db = run_domain::connect(url).await?;
    migration::apply(&db, None)
        .await
        .with_context(|| format!("applying migrations to {}", redact_url(url)))?;
    Ok(db)
}

/// Connects for a command that only reads (`status`, `logs`, `runs`, `graph <run-id>`, `limits`): a
/// SQLite file that does not exist is an error naming it (nothing is created), and a database
/// without run-engine's tables is refused instead of migrated. A database that has them but is
/// behind gets its pending migrations, as every command does.
pub(crate) async fn open_existing(url: &str) -> Result<DatabaseConnection> {
    if let Some(path) = sqlite_file(url)
        && !path.exists()
    {
        anyhow::bail!(
            "no database at {}: nothing to read (create a run first with `run-engine create` or \
             `run-engine run`, or name the database with --database-url)",
            path.display()
        );
    }
    probe_server(url).await?;
    let db = run_domain::connect(url).await?;
    let applied = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM seaql_migrations",
        ))
        .await
        .ok()
        .flatten()
        .and_then(|row| row.try_get::<i64>("", "n").ok())
        .unwrap_or(0);
    if applied == 0 {
        anyhow::bail!(
            "{} holds no run-engine tables: nothing to read (a command that writes, such as \
             `run-engine create`, sets them up)",
            redact_url(url)
        );
    }
    migration::apply(&db, None)
        .await
        .with_context(|| format!("applying migrations to {}", redact_url(url)))?;
    Ok(db)
}

/// The file a SQLite URL names (`sqlite://path?...` or `sqlite:path`), relative to the working
/// directory; `None` for other URLs and in-memory databases.
pub(crate) fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| std::path::PathBuf::from(path))
}

/// For a PostgreSQL or MariaDB URL naming a host, checks that the server there accepts
/// connections before the pool tries: the pool would wait out its whole acquire timeout (30 s)
/// on a refused connection and then say only that it timed out. A server that is just starting
/// gets a few seconds. Anything else is left to [`run_domain::connect`] to report.
pub(crate) async fn probe_server(url: &str) -> Result<()> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let default_port = match parsed.scheme().to_ascii_lowercase().as_str() {
        "postgres" | "postgresql" => 5432,
        "mysql" | "mariadb" => 3306,
        _ => return Ok(()),
    };
    // A Unix socket (empty host, or a `host`/`socket` parameter) is not probed.
    let socket = parsed
        .query_pairs()
        .any(|(k, _)| k == "host" || k == "socket");
    let host = match parsed.host_str() {
        Some(h) if !h.is_empty() && !socket => h.trim_start_matches('[').trim_end_matches(']'),
        _ => return Ok(()),
    };
    let (host, port) = (host.to_owned(), parsed.port().unwrap_or(default_port));
    // A server that is starting up refuses for a moment: refusals are tried again for a while.
    let (tried, _) = retry_when(
        &Patience,
        |_| {
            let (h, p) = (host.clone(), port);
            async move {
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    use std::net::ToSocketAddrs;
                    let mut last = None;
                    for addr in (h.as_str(), p).to_socket_addrs()? {
                        match std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
                            Ok(_) => return Ok(()),
                            Err(e) => last = Some(e),
                        }
                    }
                    Err(last
                        .unwrap_or_else(|| std::io::Error::other("the host name has no address")))
                })
                .await
                .map_err(|e| std::io::Error::other(format!("probing the database server: {e}")))?
            }
        },
        |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused,
    )
    .await;
    let Err(unreachable) = tried else {
        return Ok(());
    };
    let why = match unreachable.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            format!("connection refused (is the server running and listening on port {port}?)")
        }
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            format!("no answer within {} s", PROBE_TIMEOUT.as_secs())
        }
        _ => unreachable.to_string(),
    };
    let server = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    anyhow::bail!(
        "cannot connect to {}: the server {server} cannot be reached: {why}",
        redact_url(url)
    )
}

/// How a refused probe is tried again: every 250 ms for [`PROBE_PATIENCE`].
struct Patience;

impl Schedule for Patience {
    fn allows(&self, _failures: u32, elapsed: Duration) -> bool {
        elapsed < PROBE_PATIENCE
    }

    fn wait(&self, _failures: u32, _elapsed: Duration) -> Duration {
        Duration::from_millis(250)
    }
}

#[cfg(test)]
mod tests {
    use super::{scrub_password, sqlite_file};

    #[test]
    fn sqlite_urls_name_their_file_and_others_none() {
        use std::path::PathBuf;
        assert_eq!(
            sqlite_file("sqlite://run-engine.db?mode=rwc"),
            Some(PathBuf::from("run-engine.db"))
        );
        assert_eq!(
            sqlite_file("sqlite:///tmp/x/a.db"),
            Some(PathBuf::from("/tmp/x/a.db"))
        );
        assert_eq!(sqlite_file("sqlite:a.db"), Some(PathBuf::from("a.db")));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://u:p@h/db"), None);
    }

    #[test]
    fn passwords_are_scrubbed_from_error_text_even_in_unparseable_urls() {
        let url = "postgres://app:s3cret@[db/runs";
        let text = format!("cannot connect: the connection string '{url}' cannot be parsed");
        let scrubbed = scrub_password(&text, url);
        assert!(!scrubbed.contains("s3cret"), "{scrubbed}");

        let url = "mysql://app:p%40ss@db:3306/runs";
        let scrubbed = scrub_password(&format!("error at {url}"), url);
        assert_eq!(scrubbed, "error at mysql://app:***@db:3306/runs");

        let url = "sqlite://run-engine.db?mode=rwc";
        assert_eq!(scrub_password("no such table", url), "no such table");

        // A short password that occurs inside other words garbles nothing.
        let url = "postgres://postgres:o@[db/runs";
        let text = format!("Connection Error: the string '{url}' cannot be parsed: not found");
        assert_eq!(
            scrub_password(&text, url),
            "Connection Error: the string 'postgres:<unparseable URL>' cannot be parsed: not found"
        );
    }
}

//! Reaching the database server, and saying in one sentence why it could not be reached.
//!
//! [`crate::connect`] first checks that a PostgreSQL or MariaDB server accepts TCP connections
//! ([`probe_server`]): the pool would otherwise wait out its whole acquire timeout (30 s) on a
//! refused connection and then say only that it timed out. A connection the server refuses is
//! explained from the driver's error ([`explain`]): the server's own message without the
//! driver's wrappers (`Connection Error: error returned from database: ...`) or the server's
//! source line (`at line 948`), and a hint for the usual causes. [`describe`] turns any error
//! with its causes into one line, each cause once, every password hidden: the text both
//! binaries print.

use crate::connection::redact_text;
use crate::retry::{Schedule, retry_when};
use sea_orm::{DbErr, RuntimeErr};
use std::time::Duration;

/// How long the database server may take to accept one TCP connection.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refused connection is tried again (a server starting up).
pub const PROBE_PATIENCE: Duration = Duration::from_secs(2);

/// Why the server at an address cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    /// `host:port` (`[v6]:port`).
    pub server: String,
    /// What happened, with a hint.
    pub why: String,
}

/// For a PostgreSQL or MariaDB URL naming a host, checks that something there accepts TCP
/// connections, trying refusals again for [`PROBE_PATIENCE`] (a server starting up). `Ok` for
/// other URLs, Unix sockets and URLs that do not parse (the driver reports those).
pub async fn probe_server(url: &str) -> Result<(), Unreachable> {
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
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => format!(
            "no answer within {} s (is the host right, and does a firewall let port {port} through?)",
            PROBE_TIMEOUT.as_secs()
        ),
        _ => format!("{unreachable} (is the host name right?)"),
    };
    let server = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Err(Unreachable { server, why })
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

/// Why opening a connection to `url` failed with `err`, in one clause: the server's or the
/// driver's own message, without their wrappers, and a hint for a missing database, a wrong
/// user or password, or a SQLite file that cannot be opened. Passwords are hidden.
pub fn explain(err: &DbErr, url: &str) -> String {
    use sea_orm::sqlx::Error as Sqlx;
    let driver = match err {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e.as_ref()),
        _ => None,
    };
    let text = match driver {
        Some(Sqlx::Database(db)) => {
            let message = db.message().trim().to_owned();
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let lower = message.to_ascii_lowercase();
            let database = url::Url::parse(url)
                .ok()
                .map(|u| u.path().trim_start_matches('/').to_owned())
                .unwrap_or_default();
            let hint = if code == "3D000" || lower.starts_with("unknown database") {
                format!(
                    " (create it, for example `CREATE DATABASE {database}`, or name an existing \
                     database in the URL)"
                )
            } else if matches!(code.as_str(), "28P01" | "28000")
                || lower.contains("access denied")
                || lower.contains("password authentication failed")
            {
                " (check the user name and password in the URL)".to_owned()
            } else if lower.contains("unable to open database file") {
                match crate::connection::sqlite_path(url) {
                    Some(path) => format!(
                        " (does the folder of {} exist, and may this user write there?)",
                        path.display()
                    ),
                    None => String::new(),
                }
            } else {
                String::new()
            };
            format!("{message}{hint}")
        }
        Some(Sqlx::PoolTimedOut) => {
            "no connection could be opened within 30 s (the server is overloaded, or its \
             connection limit is reached)"
                .to_owned()
        }
        Some(Sqlx::Io(e)) => format!("{e}"),
        Some(Sqlx::Tls(e)) => format!("TLS failed: {e}"),
        Some(Sqlx::Configuration(e)) => format!("the URL cannot be used: {e}"),
        Some(other) => other.to_string(),
        None => strip_wrappers(&err.to_string()).to_owned(),
    };
    redact_text(&text)
}

/// `text` without SeaORM's and the driver's prefixes.
fn strip_wrappers(mut text: &str) -> &str {
    loop {
        let before = text;
        for prefix in [
            "Connection Error: ",
            "Custom Error: ",
            "Execution Error: ",
            "Query Error: ",
            "error returned from database: ",
            "error with configuration: ",
        ] {
            text = text.strip_prefix(prefix).unwrap_or(text);
        }
        if text == before {
            return text;
        }
    }
}

/// An error and its causes on one line, `outer: inner`, leaving out a cause whose text an outer
/// one already holds (many errors print their source in their own message) and SeaORM's and the
/// driver's prefixes, every password hidden ([`redact_text`]). What `run-engine` and
/// `cargo xtask` print after `error: `.
///
/// ```
/// let err = std::io::Error::other("disk full");
/// assert_eq!(run_domain::describe(&err), "disk full");
/// ```
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut cause = Some(err);
    while let Some(e) = cause {
        let shown = e.to_string();
        let part = strip_wrappers(shown.trim());
        if !part.is_empty() && !text.contains(part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(part);
        }
        cause = e.source();
    }
    redact_text(&text)
}

#[cfg(test)]
mod tests {
    use super::{describe, strip_wrappers};

    #[derive(Debug, thiserror::Error)]
    #[error("opening the run")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("Connection Error: error returned from database: no such table: run")]
    struct Inner;

    #[test]
    fn causes_are_shown_once_without_driver_wrappers() {
        assert_eq!(
            describe(&Outer(Inner)),
            "opening the run: no such table: run"
        );
        assert_eq!(
            strip_wrappers("error with configuration: error with configuration: bad port"),
            "bad port"
        );
    }
}

//! Reaching the database: `.env`, connecting (the server is probed by `run_domain::connect`),
//! and error messages with every password redacted.

use anyhow::{Context, Result};
use run_domain::{redact_text, redact_url};
use sea_orm::{ConnectionTrait, DatabaseConnection};

/// `text` with every password blanked out by structure: `url` itself is shown redacted, and
/// the userinfo password of any other URL the driver quoted (an unparseable URL comes back whole
/// in its error) and any `password` field are replaced (see [`run_domain::redact_text`]). The
/// password's text is never searched for, so a short password garbles nothing.
pub(crate) fn scrub_password(text: &str, url: &str) -> String {
    redact_text(&text.replace(url, &redact_url(url)))
}

/// The error and its causes on one line, each once, without the driver's wrappers: the same
/// text `cargo xtask` prints ([`run_domain::describe`]).
pub(crate) fn render_error(e: &anyhow::Error) -> String {
    run_domain::describe(e.as_ref())
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
    if let Some(path) = run_domain::connection::sqlite_path(url)
        && !path.exists()
    {
        anyhow::bail!(
            "no database at {}: nothing to read (create a run first with `run-engine create` or \
             `run-engine run`, or name the database with --database-url)",
            path.display()
        );
    }
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

#[cfg(test)]
mod tests {
    use super::scrub_password;
    use run_domain::connection::sqlite_path;

    #[test]
    fn sqlite_urls_name_their_file_and_others_none() {
        use std::path::PathBuf;
        assert_eq!(
            sqlite_path("sqlite://run-engine.db?mode=rwc"),
            Some(PathBuf::from("run-engine.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///tmp/x/a.db"),
            Some(PathBuf::from("/tmp/x/a.db"))
        );
        assert_eq!(sqlite_path("sqlite:a.db"), Some(PathBuf::from("a.db")));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://u:p@h/db"), None);
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

//! A scratch database: created under a fresh name, dropped when done. The test fixture
//! ([`crate::TestDb`]) and the benchmarks (`run-bench`'s `BenchDb`) both get theirs here.
//!
//! SQLite: a file `<prefix>_<uuid>.db` in the temporary directory, created by the first
//! connection (its URL carries `mode=rwc`). PostgreSQL and MariaDB: `CREATE DATABASE
//! <prefix>_<uuid>` on the server of an admin URL, a database the caller may connect to.

use run_domain::{ConnectError, redact_url};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a scratch database could not be created or dropped.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// The server of the admin URL could not be reached (after a few tries).
    #[error("the server is unreachable at {url}: {source}")]
    Unreachable {
        /// The admin URL, password redacted.
        url: String,
        /// The last connection error.
        #[source]
        source: ConnectError,
    },
    /// The server refused a `CREATE DATABASE` or `DROP DATABASE`.
    #[error("{statement} on {url}: {source}")]
    Refused {
        /// The statement.
        statement: String,
        /// The admin URL, password redacted.
        url: String,
        /// The driver's error.
        #[source]
        source: DbErr,
    },
    /// The admin URL is not a URL.
    #[error("invalid server URL {url}: {source}")]
    InvalidUrl {
        /// The admin URL, password redacted.
        url: String,
        /// What is wrong with it.
        #[source]
        source: url::ParseError,
    },
}

/// A database of its own for one test or one benchmark. Dropping it removes the database (best
/// effort, from a thread of its own, since `Drop` cannot await); [`ScratchDb::remove`] does the
/// same in async code and says whether it worked. Not `Debug`: its admin URL may hold a
/// password.
pub struct ScratchDb {
    url: String,
    place: Place,
}

enum Place {
    File(PathBuf),
    Server {
        backend: DbBackend,
        admin_url: String,
        name: String,
    },
    Removed,
}

impl ScratchDb {
    /// A fresh SQLite file in the temporary directory.
    pub fn sqlite(prefix: &str) -> ScratchDb {
        let path = std::env::temp_dir().join(format!("{}.db", fresh_name(prefix)));
        ScratchDb {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            place: Place::File(path),
        }
    }

    /// Creates a fresh database on the PostgreSQL or MariaDB server of `admin_url`.
    ///
    /// A server under load may refuse a connection for a moment, so the admin connection is
    /// tried three times; a server that is not there refuses every time.
    pub async fn on_server(admin_url: &str, prefix: &str) -> Result<ScratchDb, ScratchError> {
        let name = fresh_name(prefix);
        let url = with_database(admin_url, &name)?;
        let admin = admin_connect(admin_url).await?;
        let backend = admin.get_database_backend();
        let statement = match backend {
            DbBackend::Postgres => format!("CREATE DATABASE \"{name}\""),
            _ => format!("CREATE DATABASE `{name}`"),
        };
        let created = admin.execute_unprepared(&statement).await;
        admin.close().await.ok();
        created.map_err(|source| ScratchError::Refused {
            statement,
            url: redact_url(admin_url),
            source,
        })?;
        Ok(ScratchDb {
            url,
            place: Place::Server {
                backend,
                admin_url: admin_url.to_owned(),
                name,
            },
        })
    }

    /// The URL of the scratch database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Removes the database now: deletes the SQLite file, or drops the database on its server.
    pub async fn remove(mut self) -> Result<(), ScratchError> {
        remove(std::mem::replace(&mut self.place, Place::Removed)).await
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.place, Place::Removed) {
            Place::Removed => {}
            Place::File(path) => remove_file(&path),
            server => {
                // Drop may run inside an async context, which must not be blocked on, so the
                // database is dropped from a thread with a runtime of its own. Best effort: a
                // failure leaves a stray database behind, never a failure.
                let _ = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    let _ = rt.block_on(remove(server));
                })
                .join();
            }
        }
    }
}

/// `<prefix>_<uuid>`, a name no other test or benchmark uses.
fn fresh_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Deletes a SQLite file and its WAL and shared-memory files (those that exist).
fn remove_file(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

async fn remove(place: Place) -> Result<(), ScratchError> {
    match place {
        Place::File(path) => {
            remove_file(&path);
            Ok(())
        }
        Place::Server {
            backend,
            admin_url,
            name,
        } => {
            let statement = match backend {
                DbBackend::Postgres => format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                _ => format!("DROP DATABASE IF EXISTS `{name}`"),
            };
            let admin = run_domain::connect(&admin_url).await.map_err(|source| {
                ScratchError::Unreachable {
                    url: redact_url(&admin_url),
                    source,
                }
            })?;
            let dropped = admin.execute_unprepared(&statement).await;
            admin.close().await.ok();
            dropped.map(|_| ()).map_err(|source| ScratchError::Refused {
                statement,
                url: redact_url(&admin_url),
                source,
            })
        }
        Place::Removed => Ok(()),
    }
}

async fn admin_connect(admin_url: &str) -> Result<DatabaseConnection, ScratchError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match run_domain::connect(admin_url).await {
            Ok(db) => return Ok(db),
            Err(source) if tries == 3 => {
                return Err(ScratchError::Unreachable {
                    url: redact_url(admin_url),
                    source,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `url` with its database (path) replaced by `name`.
fn with_database(url: &str, name: &str) -> Result<String, ScratchError> {
    let mut u = url::Url::parse(url).map_err(|source| ScratchError::InvalidUrl {
        url: redact_url(url),
        source,
    })?;
    u.set_path(&format!("/{name}"));
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;

    /// Whether the database of `url` can still be opened (SQLite: whether its file exists).
    async fn exists(url: &str) -> bool {
        match url.strip_prefix("sqlite://") {
            Some(rest) => Path::new(rest.split('?').next().unwrap_or(rest)).exists(),
            None => run_domain::connect(url).await.is_ok(),
        }
    }

    /// A scratch database of `backend` (`None` when its server is not named), connected to once
    /// so that it exists.
    async fn created(backend: Backend) -> Option<ScratchDb> {
        let scratch = match backend {
            Backend::Sqlite => ScratchDb::sqlite("re_test"),
            _ => ScratchDb::on_server(&backend.server_url()?, "re_test")
                .await
                .expect("create"),
        };
        let db = run_domain::connect(scratch.url()).await.expect("connect");
        db.execute_unprepared("CREATE TABLE t (x INTEGER)")
            .await
            .expect("use it");
        db.close().await.expect("close");
        assert!(exists(scratch.url()).await);
        Some(scratch)
    }

    async fn removed_and_dropped_databases_are_gone(backend: Backend) {
        let Some(scratch) = created(backend).await else {
            return;
        };
        let url = scratch.url().to_owned();
        scratch.remove().await.expect("remove");
        assert!(!exists(&url).await, "{backend:?}: removed, yet still there");

        let Some(scratch) = created(backend).await else {
            return;
        };
        let url = scratch.url().to_owned();
        drop(scratch);
        assert!(!exists(&url).await, "{backend:?}: dropped, yet still there");
    }

    #[tokio::test]
    async fn removed_and_dropped_sqlite_files_are_gone() {
        removed_and_dropped_databases_are_gone(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn removed_and_dropped_postgres_databases_are_gone() {
        removed_and_dropped_databases_are_gone(Backend::Postgres).await;
    }

    #[tokio::test]
    async fn removed_and_dropped_mariadb_databases_are_gone() {
        removed_and_dropped_databases_are_gone(Backend::MySql).await;
    }
}

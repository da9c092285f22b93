//! Applying migrations under a cross-process lock.
//!
//! sea-orm-migration takes no lock of its own: two processes that migrate one database at once
//! both see a migration pending and both apply it. Every entry point here first takes a lock
//! that lives in the database server, so any number of processes on any number of machines
//! apply each migration exactly once.

use crate::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement,
    TransactionTrait,
};
use std::future::Future;

/// The key of the PostgreSQL advisory lock (any constant unique to this project).
const PG_LOCK_KEY: i64 = 0x0072_756e_5f65_6e67; // "run_eng"
/// The name of the MariaDB/MySQL named lock.
const MYSQL_LOCK_NAME: &str = "run_engine_migrations";
/// How long a MariaDB process waits for another's migrations, in seconds.
const MYSQL_LOCK_TIMEOUT_S: u32 = 600;

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationLockError {
    /// The migration lock could not be taken in time.
    #[error("another process held the migration lock for more than {0} s")]
    LockTimeout(u32),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// Runs `work` while holding the migration lock.
///
/// PostgreSQL: a transaction-scoped advisory lock on a connection of its own. MariaDB: a named
/// lock (`GET_LOCK`) on a connection of its own. SQLite: an exclusive lock (`flock`) on the file
/// `<database>-migrate.lock` beside the database, so processes on one machine that open a new
/// database at once (`run` in one terminal, `serve` in another) migrate it once; an in-memory
/// database needs none. Every lock is let go when its process dies.
///
/// The pool behind `db` must allow at least two connections on PostgreSQL and MariaDB (the
/// default does): one holds the lock while `work` runs on another.
pub async fn with_migration_lock<T, F, Fut>(
    db: &DatabaseConnection,
    work: F,
) -> Result<T, MigrationLockError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, DbErr>>,
{
    let guard = acquire(db).await?;
    let result = work().await;
    release(guard).await?;
    Ok(result?)
}

/// What holds the migration lock until it is released.
enum Guard {
    /// PostgreSQL's and MariaDB's: a transaction on a connection of its own.
    Server(DatabaseTransaction),
    /// SQLite's: the lock file, locked while open.
    File(std::fs::File),
}

/// SQLite: locks `<database file>-migrate.lock`, waiting for another process that holds it.
/// `None` for an in-memory database.
async fn lock_sqlite_file(db: &DatabaseConnection) -> Result<Option<Guard>, MigrationLockError> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT file FROM pragma_database_list WHERE name = 'main'",
        ))
        .await?;
    let file: String = match row {
        Some(row) => row.try_get("", "file")?,
        None => String::new(),
    };
    if file.is_empty() {
        return Ok(None);
    }
    let path = format!("{file}-migrate.lock");
    let locked = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        lock.lock()?;
        Ok(lock)
    })
    .await
    .map_err(|e| DbErr::Custom(format!("waiting for the migration lock: {e}")))?
    .map_err(|e| DbErr::Custom(format!("locking {file}-migrate.lock: {e}")))?;
    Ok(Some(Guard::File(locked)))
}

async fn acquire(db: &DatabaseConnection) -> Result<Option<Guard>, MigrationLockError> {
    let backend = db.get_database_backend();
    match backend {
        DbBackend::Postgres => {
            let tx = db.begin().await?;
            // SAFETY(lock): a transaction-scoped advisory lock is released when `tx` ends,
            // even if this process dies, because the server ends the transaction with the
            // connection.
            tx.execute_raw(Statement::from_sql_and_values(
                backend,
                "SELECT pg_advisory_xact_lock($1)",
                [PG_LOCK_KEY.into()],
            ))
            .await?;
            Ok(Some(Guard::Server(tx)))
        }
        DbBackend::MySql => {
            let tx = db.begin().await?;
            // SAFETY(lock): GET_LOCK is held by this session until RELEASE_LOCK or until the
            // session ends, so a dead process frees it.
            let row = tx
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT GET_LOCK(?, ?) AS got",
                    [MYSQL_LOCK_NAME.into(), MYSQL_LOCK_TIMEOUT_S.into()],
                ))
                .await?;
            let got: Option<i64> = match row {
                Some(row) => row.try_get("", "got")?,
                None => None,
            };
            if got != Some(1) {
                tx.rollback().await?;
                return Err(MigrationLockError::LockTimeout(MYSQL_LOCK_TIMEOUT_S));
            }
            Ok(Some(Guard::Server(tx)))
        }
        DbBackend::Sqlite => lock_sqlite_file(db).await,
        _ => Ok(None),
    }
}

async fn release(guard: Option<Guard>) -> Result<(), DbErr> {
    let tx = match guard {
        None => return Ok(()),
        // Closing the file lets go of its lock.
        Some(Guard::File(file)) => {
            drop(file);
            return Ok(());
        }
        Some(Guard::Server(tx)) => tx,
    };
    if tx.get_database_backend() == DbBackend::MySql {
        tx.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "SELECT RELEASE_LOCK(?)",
            [MYSQL_LOCK_NAME.into()],
        ))
        .await?;
    }
    tx.rollback().await
}

/// Applies pending migrations (all of them, or the first `steps`) under the migration lock, and
/// returns the names of those this call applied.
///
/// ```no_run
/// # async fn demo(db: &sea_orm_migration::sea_orm::DatabaseConnection) -> Result<(), migration::MigrationLockError> {
/// let applied = migration::apply(db, None).await?;
/// println!("applied {} migration(s)", applied.len());
/// # Ok(()) }
/// ```
pub async fn apply(
    db: &DatabaseConnection,
    steps: Option<u32>,
) -> Result<Vec<String>, MigrationLockError> {
    with_migration_lock(db, || async {
        let pending: Vec<String> = Migrator::get_pending_migrations(db)
            .await?
            .iter()
            .map(|m| m.name().to_owned())
            .collect();
        Migrator::up(db, steps).await?;
        let still: Vec<String> = Migrator::get_pending_migrations(db)
            .await?
            .iter()
            .map(|m| m.name().to_owned())
            .collect();
        Ok(pending.into_iter().filter(|n| !still.contains(n)).collect())
    })
    .await
}

/// Rolls back the last `steps` applied migrations (all of them when `None`) under the migration
/// lock, and returns the names of those this call rolled back, newest first.
pub async fn rollback(
    db: &DatabaseConnection,
    steps: Option<u32>,
) -> Result<Vec<String>, MigrationLockError> {
    with_migration_lock(db, || async {
        let before = applied_names(db).await?;
        Migrator::down(db, steps).await?;
        let after = applied_names(db).await?;
        Ok(before
            .into_iter()
            .rev()
            .filter(|n| !after.contains(n))
            .collect())
    })
    .await
}

/// Every migration, oldest first, and whether it is applied.
pub async fn status(db: &DatabaseConnection) -> Result<Vec<(String, bool)>, MigrationLockError> {
    with_migration_lock(db, || async {
        let applied = applied_names(db).await?;
        Ok(crate::migration_names()
            .into_iter()
            .map(|n| {
                let done = applied.contains(&n);
                (n, done)
            })
            .collect())
    })
    .await
}

async fn applied_names(db: &DatabaseConnection) -> Result<Vec<String>, DbErr> {
    Ok(Migrator::get_applied_migrations(db)
        .await?
        .iter()
        .map(|m| m.name().to_owned())
        .collect())
}

/// Drops every table in the database and applies every migration from scratch, under the
/// migration lock. Destroys all data.
pub async fn fresh(db: &DatabaseConnection) -> Result<Vec<String>, MigrationLockError> {
    with_migration_lock(db, || async {
        if db.get_database_backend() == DbBackend::Sqlite {
            drop_sqlite_tables(db).await?;
        }
        Migrator::fresh(db).await?;
        Ok(crate::migration_names())
    })
    .await
}

/// Drops every table of a SQLite database, each after every table whose foreign keys point at
/// it. SeaORM's `fresh` turns foreign keys off inside a transaction, where SQLite ignores the
/// pragma, and drops in whatever order the tables come: a table dropped after one it points at
/// fails with `no such table` (seen about half the time), so the order is decided here.
async fn drop_sqlite_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT m.name AS name, p.\"table\" AS parent FROM sqlite_master m \
             LEFT JOIN pragma_foreign_key_list(m.name) p \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
        ))
        .await?;
    let mut parents: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for row in rows {
        let name: String = row.try_get("", "name")?;
        let parent: Option<String> = row.try_get("", "parent")?;
        let entry = parents.entry(name.clone()).or_default();
        if let Some(parent) = parent.filter(|p| *p != name) {
            entry.push(parent);
        }
    }
    while !parents.is_empty() {
        // A table no remaining table points at goes first.
        let leaf = parents
            .keys()
            .find(|t| !parents.values().any(|ps| ps.contains(t)))
            .cloned();
        // A cycle of foreign keys: SQLite cannot drop any of them first; let SeaORM try.
        let Some(table) = leaf else { return Ok(()) };
        db.execute_unprepared(&format!(
            "DROP TABLE IF EXISTS \"{}\"",
            table.replace('"', "\"\"")
        ))
        .await?;
        parents.remove(&table);
    }
    Ok(())
}

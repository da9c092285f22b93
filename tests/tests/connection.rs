//! Connecting with run-domain's settings on every backend: `connect_with` keeps every setting
//! of `connect` and changes only the pool's size.

use run_domain::connection::connect_with;
use run_engine_tests::each_backend;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use std::time::Duration;

/// The pool's size and acquire timeout.
fn pool_settings(db: &DatabaseConnection) -> (u32, Duration) {
    match db.get_database_backend() {
        DbBackend::Sqlite => {
            let o = db.get_sqlite_connection_pool().options();
            (o.get_max_connections(), o.get_acquire_timeout())
        }
        DbBackend::Postgres => {
            let o = db.get_postgres_connection_pool().options();
            (o.get_max_connections(), o.get_acquire_timeout())
        }
        _ => {
            let o = db.get_mysql_connection_pool().options();
            (o.get_max_connections(), o.get_acquire_timeout())
        }
    }
}

/// What a connection of the pool reports of the settings `connect` makes (SQLite's pragmas;
/// the servers take none).
async fn session_settings(db: &DatabaseConnection) -> Vec<String> {
    if db.get_database_backend() != DbBackend::Sqlite {
        return Vec::new();
    }
    let mut out = Vec::new();
    for pragma in [
        "journal_mode",
        "synchronous",
        "foreign_keys",
        "busy_timeout",
    ] {
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                format!("PRAGMA {pragma}"),
            ))
            .await
            .expect("pragma")
            .expect("a row");
        let value = row
            .try_get_by_index::<String>(0)
            .or_else(|_| row.try_get_by_index::<i64>(0).map(|n| n.to_string()))
            .expect("a value");
        out.push(format!("{pragma}={value}"));
    }
    out
}

each_backend! {
    async fn connect_with_keeps_every_setting_of_connect_but_the_pool_size(t) {
        let one = connect_with(&t.url, 1).await.expect("connect_with");
        let (size, timeout) = pool_settings(&one);
        let (default_size, default_timeout) = pool_settings(&t.db);
        assert_eq!(size, 1);
        assert!(default_size > 1, "connect's pool holds more than one connection");
        assert_eq!(timeout, default_timeout);
        assert_eq!(session_settings(&one).await, session_settings(&t.db).await);
        if t.backend == run_engine_tests::Backend::Sqlite {
            assert_eq!(
                session_settings(&one).await,
                ["journal_mode=wal", "synchronous=1", "foreign_keys=1", "busy_timeout=60000"]
            );
        }
        one.close().await.expect("close");
    }
}

/// `mariadb://` URLs are taken as `mysql://` ones (the docs promise it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_url_opens_the_server_like_a_mysql_one() {
    let Some(t) = run_engine_tests::TestDb::migrated(run_engine_tests::Backend::MySql).await else {
        return;
    };
    let url = t.url.replacen("mysql://", "mariadb://", 1);
    assert!(url.starts_with("mariadb://"), "{url}");
    let db = run_domain::connect(&url)
        .await
        .expect("a mariadb:// URL connects");
    assert_eq!(db.get_database_backend(), DbBackend::MySql);
    db.execute_unprepared("SELECT 1").await.expect("a query");
}

//! Column types that differ between backends, decided in one place.
//!
//! The migrations call these instead of sea-query's generic helpers where the generic type would
//! lose something on one backend: MariaDB's `timestamp` keeps no fractional seconds and ends in
//! 2038, and its `blob` holds at most 64 KiB.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

/// A UUID primary key: `uuid` on PostgreSQL, `binary(16)` on MariaDB, `uuid_text` on SQLite.
pub fn uuid_pk(name: impl IntoIden) -> ColumnDef {
    ColumnDef::new(name)
        .uuid()
        .not_null()
        .primary_key()
        .to_owned()
}

/// A UUID column.
pub fn uuid(name: impl IntoIden) -> ColumnDef {
    ColumnDef::new(name).uuid().to_owned()
}

/// A UTC timestamp with at least millisecond precision.
pub fn timestamp(backend: DbBackend, name: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(name);
    match backend {
        DbBackend::MySql => def.custom(Alias::new("datetime(6)")),
        _ => def.timestamp_with_time_zone(),
    };
    def
}

/// A byte string of any length up to at least 1 GiB (`longblob` on MariaDB).
pub fn bytes(backend: DbBackend, name: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(name);
    match backend {
        DbBackend::MySql => def.custom(Alias::new("longblob")),
        _ => def.blob(),
    };
    def
}

/// A 64-bit integer. SQLite would declare it `integer`, like a 32-bit one, so it is declared
/// `bigint` there (the same INTEGER affinity) and `cargo xtask codegen` can tell the two apart.
pub fn big_integer(backend: DbBackend, name: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(name);
    match backend {
        DbBackend::Sqlite => def.custom(Alias::new("bigint")),
        _ => def.big_integer(),
    };
    def
}

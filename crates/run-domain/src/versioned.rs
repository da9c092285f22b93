//! Compare-and-swap updates and deletes of versioned rows.
//!
//! Every state row carries an integer `version`. A change names the row, the version the caller
//! read, and the new values; it runs as one statement:
//!
//! ```sql
//! UPDATE run SET <changes>, version = version + 1, updated_at = <now>
//! WHERE id = ? AND version = ?
//! ```
//!
//! and returns the new row. No row matched means someone else changed it first
//! ([`ConcurrencyError::Conflict`], with the version found now) or it does not exist
//! ([`ConcurrencyError::NotFound`]). This module is the only path this crate offers to change a
//! versioned row; the `status` column is further reserved to [`crate::transition`].

use crate::error::ConcurrencyError;
use async_trait::async_trait;
use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait, IntoIden, SimpleExpr};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, IdenStatic, QueryFilter, QuerySelect,
    TransactionSession, TransactionTrait, Value,
};
use uuid::Uuid;

/// An entity whose rows are changed only by compare-and-swap on `version`.
///
/// Implement it in one line with [`versioned_entity!`](crate::versioned_entity) for any table
/// with `id` (UUID), `version` (integer) and `updated_at` columns; [`VersionedUpdate`] then comes
/// for free.
pub trait Versioned: EntityTrait + Default {
    /// The entity's name in errors (its table name).
    const NAME: &'static str;
    /// The primary-key column.
    fn id_column() -> Self::Column;
    /// The `version` column.
    fn version_column() -> Self::Column;
    /// The `updated_at` column, set on every change.
    fn updated_at_column() -> Self::Column;
    /// Columns a [`Changes`] may not set, with the reason (besides id, version, updated_at).
    fn reserved_columns() -> Vec<(Self::Column, &'static str)> {
        Vec::new()
    }
    /// A model's id.
    fn id_of(model: &Self::Model) -> Uuid;
    /// A model's version.
    fn version_of(model: &Self::Model) -> i32;
}

/// Implements [`Versioned`] for an entity module with `id`, `version` and `updated_at` columns
/// (and a `status` column when a lifecycle is given, reserving it to [`crate::transition`]).
///
/// ```
/// mod job {
///     use sea_orm::entity::prelude::*;
///
///     #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
///     #[sea_orm(table_name = "job")]
///     pub struct Model {
///         #[sea_orm(primary_key, auto_increment = false)]
///         pub id: Uuid,
///         pub payload: String,
///         pub version: i32,
///         pub updated_at: DateTimeUtc,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
///
///     impl ActiveModelBehavior for ActiveModel {}
/// }
///
/// // The one line: `job::Entity` now has `update_versioned`, `delete_versioned`, ...
/// run_domain::versioned_entity!(job, "job");
///
/// use run_domain::Versioned;
/// assert_eq!(<job::Entity as Versioned>::NAME, "job");
/// ```
#[macro_export]
macro_rules! versioned_entity {
    ($($module:ident)::+, $name:literal) => {
        impl $crate::Versioned for $($module)::+::Entity {
            const NAME: &'static str = $name;
            fn id_column() -> Self::Column { $($module)::+::Column::Id }
            fn version_column() -> Self::Column { $($module)::+::Column::Version }
            fn updated_at_column() -> Self::Column { $($module)::+::Column::UpdatedAt }
            fn id_of(model: &Self::Model) -> $crate::uuid::Uuid { model.id }
            fn version_of(model: &Self::Model) -> i32 { model.version }
        }
    };
    ($($module:ident)::+, $name:literal, status: $status:ty) => {
        $crate::versioned_entity!(@status $($module)::+, $name, $status, [], {});
    };
    // An entity with needs (run_story): its counters are reserved to `run_domain::needs`, and
    // `transition` reads them before a start.
    ($($module:ident)::+, $name:literal, status: $status:ty, needs: $needs:ident) => {
        $crate::versioned_entity!(@status $($module)::+, $name, $status, [
            ($($module)::+::Column::UnmetNeeds, "needs are counted down by run_domain::needs"),
            ($($module)::+::Column::NeededBy, "needs are created by run_domain::needs"),
            ($($module)::+::Column::WaitsOnStories, "needs are counted down by run_domain::needs"),
            ($($module)::+::Column::LimitKeys, "limits are fixed when the story is created"),
        ], {
            fn unmet_needs_of(model: &Self::Model) -> i32 { model.$needs }
            fn unmet_needs_column() -> Option<Self::Column> {
                Some($($module)::+::Column::UnmetNeeds)
            }
            fn start_guards() -> Vec<$crate::sea_orm::sea_query::SimpleExpr> {
                $crate::schedule::story_start_guards()
            }
            fn not_before_of(model: &Self::Model) -> Option<i64> { model.not_before_ms }
            fn limit_keys_of(model: &Self::Model) -> Vec<String> {
                $crate::limits::limit_keys_of(model.limit_keys.as_deref())
            }
        });
    };
    (@status $($module:ident)::+, $name:literal, $status:ty, [$($reserved:expr),* $(,)?], { $($has_status:tt)* }) => {
        impl $crate::Versioned for $($module)::+::Entity {
            const NAME: &'static str = $name;
            fn id_column() -> Self::Column { $($module)::+::Column::Id }
            fn version_column() -> Self::Column { $($module)::+::Column::Version }
            fn updated_at_column() -> Self::Column { $($module)::+::Column::UpdatedAt }
            fn reserved_columns() -> Vec<(Self::Column, &'static str)> {
                vec![
                    ($($module)::+::Column::Status, "status changes go through run_domain::transition"),
                    $($reserved),*
                ]
            }
            fn id_of(model: &Self::Model) -> $crate::uuid::Uuid { model.id }
            fn version_of(model: &Self::Model) -> i32 { model.version }
        }
        impl $crate::HasStatus for $($module)::+::Entity {
            type Status = $status;
            fn status_column() -> Self::Column { $($module)::+::Column::Status }
            fn status_of(model: &Self::Model) -> &str { &model.status }
            fn started_at_column() -> Self::Column { $($module)::+::Column::StartedAt }
            fn finished_at_column() -> Self::Column { $($module)::+::Column::FinishedAt }
            $($has_status)*
        }
    };
}

/// The new values of a compare-and-swap update, column by column.
///
/// ```
/// use entity::run_story;
/// use run_domain::Changes;
///
/// let changes = Changes::<run_story::Entity>::new()
///     .set(run_story::Column::Error, None::<String>)
///     .set(run_story::Column::Attempts, 2);
/// assert_eq!(changes.len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct Changes<E: EntityTrait> {
    pub(crate) sets: Vec<(E::Column, SimpleExpr)>,
    /// Conditions the row must meet besides its version, checked in the same statement (a
    /// story starts only while `unmet_needs = 0`, its delay passed, its run not paused).
    pub(crate) guards: Vec<SimpleExpr>,
}

impl<E: EntityTrait> Default for Changes<E> {
    fn default() -> Self {
        Self {
            sets: Vec::new(),
            guards: Vec::new(),
        }
    }
}

impl<E: EntityTrait> Changes<E> {
    /// No changes (the update then only bumps `version` and `updated_at`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `column` to `value`.
    pub fn set(mut self, column: E::Column, value: impl Into<Value>) -> Self {
        self.sets.push((column, Expr::val(value.into())));
        self
    }

    /// Sets `column` to an SQL expression (for example `Expr::col(c).add(1)`), evaluated
    /// atomically with the update.
    pub fn set_expr(mut self, column: E::Column, expr: SimpleExpr) -> Self {
        self.sets.push((column, expr));
        self
    }

    /// Adds a condition the row must meet besides its version, checked in the same statement
    /// (for example [`crate::run_not_paused`]). A row that fails it is not changed and is
    /// reported as [`ConcurrencyError::Conflict`] with `actual` equal to `expected`. A
    /// condition can only make the update match fewer rows, never more.
    pub fn guard(mut self, condition: SimpleExpr) -> Self {
        self.guards.push(condition);
        self
    }

    /// Adds every change of `other` after these.
    pub fn merge(mut self, other: Changes<E>) -> Self {
        self.sets.extend(other.sets);
        self.guards.extend(other.guards);
        self
    }

    /// How many columns are set.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// True when no column is set.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }
}

pub(crate) fn check_reserved<E: Versioned>(changes: &Changes<E>) -> Result<(), ConcurrencyError> {
    let mut reserved: Vec<(E::Column, &'static str)> = vec![
        (E::id_column(), "a row's id never changes"),
        (E::version_column(), "the version is bumped by every update"),
        (E::updated_at_column(), "updated_at is set by every update"),
    ];
    reserved.extend(E::reserved_columns());
    for (column, _) in &changes.sets {
        let name = column.as_str();
        if let Some((_, reason)) = reserved.iter().find(|(r, _)| r.as_str() == name) {
            return Err(ConcurrencyError::ReservedColumn {
                entity: E::NAME,
                column: name.to_owned(),
                reason,
            });
        }
    }
    Ok(())
}

/// Compare-and-swap operations, implemented for every [`Versioned`] entity.
///
/// Cancellation: on MariaDB an update runs as a short transaction (an UPDATE, then a read-back).
/// Dropping its future mid-flight may hand the connection back to the pool inside that
/// transaction, so do not race these futures against timers with `select!`; spawn them as tasks
/// when you may stop waiting.
#[async_trait]
pub trait VersionedUpdate: Versioned {
    /// Reads the row with this id; [`ConcurrencyError::NotFound`] when there is none.
    async fn find_versioned<C>(db: &C, id: Uuid) -> Result<Self::Model, ConcurrencyError>
    where
        C: ConnectionTrait;

    /// Applies `changes` if the row's version is still `expected`, bumping `version` by one and
    /// setting `updated_at`, in one statement; returns the row as written.
    ///
    /// ```no_run
    /// use entity::run;
    /// use run_domain::{Changes, VersionedUpdate};
    /// # async fn demo(db: &sea_orm::DatabaseConnection, id: uuid::Uuid) -> Result<(), run_domain::ConcurrencyError> {
    /// let current = run::Entity::find_versioned(db, id).await?;
    /// let updated = run::Entity::update_versioned(
    ///     db,
    ///     id,
    ///     current.version,
    ///     Changes::new().set(run::Column::Title, "nightly build"),
    /// )
    /// .await?;
    /// assert_eq!(updated.version, current.version + 1);
    /// # Ok(()) }
    /// ```
    async fn update_versioned<C>(
        db: &C,
        id: Uuid,
        expected: i32,
        changes: Changes<Self>,
    ) -> Result<Self::Model, ConcurrencyError>
    where
        C: ConnectionTrait + TransactionTrait;

    /// Deletes the row if its version is still `expected`.
    async fn delete_versioned<C>(db: &C, id: Uuid, expected: i32) -> Result<(), ConcurrencyError>
    where
        C: ConnectionTrait;
}

#[async_trait]
impl<E> VersionedUpdate for E
where
    E: Versioned,
    E::Model: Sync,
{
    async fn find_versioned<C>(db: &C, id: Uuid) -> Result<E::Model, ConcurrencyError>
    where
        C: ConnectionTrait,
    {
        E::find()
            .filter(E::id_column().eq(id))
            .one(db)
            .await?
            .ok_or(ConcurrencyError::NotFound {
                entity: E::NAME,
                id,
            })
    }

    async fn update_versioned<C>(
        db: &C,
        id: Uuid,
        expected: i32,
        changes: Changes<E>,
    ) -> Result<E::Model, ConcurrencyError>
    where
        C: ConnectionTrait + TransactionTrait,
    {
        check_reserved(&changes)?;
        compare_and_swap::<E, C>(db, id, expected, changes).await
    }

    async fn delete_versioned<C>(db: &C, id: Uuid, expected: i32) -> Result<(), ConcurrencyError>
    where
        C: ConnectionTrait,
    {
        let deleted = E::delete_many()
            .filter(E::id_column().eq(id))
            .filter(E::version_column().eq(expected))
            .exec(db)
            .await?
            .rows_affected;
        if deleted == 1 {
            Ok(())
        } else {
            Err(explain_miss::<E, C>(db, id, expected).await)
        }
    }
}

/// The compare-and-swap itself, without the reserved-column check (callers inside the crate
/// that set the status do so only after checking the lifecycle).
pub(crate) async fn compare_and_swap<E, C>(
    db: &C,
    id: Uuid,
    expected: i32,
    changes: Changes<E>,
) -> Result<E::Model, ConcurrencyError>
where
    E: Versioned,
    C: ConnectionTrait + TransactionTrait,
{
    let update = cas_update::<E>(id, expected, changes);
    let written = match db.get_database_backend() {
        DbBackend::MySql => {
            // MariaDB has no UPDATE ... RETURNING: read back inside one transaction, whose
            // row lock (taken by the UPDATE) keeps anyone else from changing it in between.
            let tx = db.begin().await?;
            let matched = update.exec(&tx).await?.rows_affected;
            let row = if matched == 1 {
                E::find().filter(E::id_column().eq(id)).one(&tx).await?
            } else {
                None
            };
            tx.commit().await?;
            row
        }
        _ => update.exec_with_returning(db).await?.into_iter().next(),
    };
    match written {
        Some(model) => Ok(model),
        None => Err(explain_miss::<E, C>(db, id, expected).await),
    }
}

/// The compare-and-swap statement: `UPDATE ... SET <changes>, version = version + 1,
/// updated_at = now WHERE id = ? AND version = ? AND <guards>`.
pub(crate) fn cas_update<E: Versioned>(
    id: Uuid,
    expected: i32,
    changes: Changes<E>,
) -> sea_orm::UpdateMany<E> {
    let version = E::version_column();
    let mut update = E::update_many()
        .col_expr(version, Expr::col(version.into_iden()).add(1))
        .col_expr(E::updated_at_column(), Expr::val(Utc::now()));
    // A column set twice keeps its last value (SQL refuses two assignments to one column).
    let guards = changes.guards;
    let mut sets: Vec<(E::Column, SimpleExpr)> = Vec::with_capacity(changes.sets.len());
    for (column, expr) in changes.sets {
        match sets.iter_mut().find(|(c, _)| c.as_str() == column.as_str()) {
            Some(slot) => slot.1 = expr,
            None => sets.push((column, expr)),
        }
    }
    for (column, expr) in sets {
        update = update.col_expr(column, expr);
    }
    // SAFETY(atomicity): the version test and the write are one UPDATE statement, so two
    // writers holding the same version cannot both match: the second re-checks the row
    // after the first commits (row lock on PostgreSQL/MariaDB, one writer on SQLite).
    let mut update = update
        .filter(E::id_column().eq(id))
        .filter(version.eq(expected));
    for guard in guards {
        update = update.filter(guard);
    }
    update
}

/// Why a compare-and-swap matched no row: the row's version now, or its absence.
///
/// The version is read as it is now, not as a caller's transaction once saw it: on MariaDB a
/// plain SELECT inside a REPEATABLE READ transaction reads the transaction's snapshot, which
/// may predate the change that made the swap miss, so the read there is a locking (current)
/// read. PostgreSQL and SQLite read the latest committed row per statement.
pub(crate) async fn explain_miss<E: Versioned, C: ConnectionTrait>(
    db: &C,
    id: Uuid,
    expected: i32,
) -> ConcurrencyError {
    let found = current_version::<E, C>(db, id).await;
    tracing::debug!(entity = E::NAME, %id, expected, found = ?found.as_ref().ok(), "compare-and-swap matched no row");
    match found {
        Ok(Some(actual)) => ConcurrencyError::Conflict {
            entity: E::NAME,
            id,
            expected,
            actual,
        },
        Ok(None) => ConcurrencyError::NotFound {
            entity: E::NAME,
            id,
        },
        Err(e) => ConcurrencyError::Database(e),
    }
}

/// The row's version as committed now (a locking read on MariaDB, where a plain read inside a
/// transaction returns the transaction's snapshot); `None` when there is no such row.
pub(crate) async fn current_version<E: Versioned, C: ConnectionTrait>(
    db: &C,
    id: Uuid,
) -> Result<Option<i32>, sea_orm::DbErr> {
    let select = E::find()
        .select_only()
        .column(E::version_column())
        .filter(E::id_column().eq(id));
    current_read(select, db).into_tuple::<i32>().one(db).await
}

/// Reads the row as committed now: like [`VersionedUpdate::find_versioned`], but a locking
/// (current) read on MariaDB, so that inside a caller's transaction it sees changes committed
/// after the transaction's snapshot was taken. Inside a transaction on MariaDB the row then
/// stays locked until the transaction ends.
pub(crate) async fn find_current<E: Versioned, C: ConnectionTrait>(
    db: &C,
    id: Uuid,
) -> Result<E::Model, ConcurrencyError> {
    current_read(E::find().filter(E::id_column().eq(id)), db)
        .one(db)
        .await?
        .ok_or(ConcurrencyError::NotFound {
            entity: E::NAME,
            id,
        })
}

/// `select` as a current read: a locking read on MariaDB, whose plain reads inside a
/// transaction return the transaction's snapshot; as it is elsewhere (PostgreSQL and SQLite read
/// the latest committed row per statement).
fn current_read<Q: QuerySelect, C: ConnectionTrait>(select: Q, db: &C) -> Q {
    if db.get_database_backend() == DbBackend::MySql {
        // SAFETY(snapshot): a caller inside a transaction learns the row as committed now,
        // not as its snapshot holds it.
        select.lock_exclusive()
    } else {
        select
    }
}

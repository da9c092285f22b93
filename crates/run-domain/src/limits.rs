//! Concurrency limits shared by every process on the database: at no instant do more stories
//! holding a limit run than its capacity.
//!
//! A limit is a `run_limit` row (a name, a `capacity`) with one `run_limit_slot` row per slot
//! (numbered from 0). A story names the limits it holds (`run_story.limit_keys`, fixed at
//! creation). A story starts only by taking a free slot (`story_id` NULL, number below the
//! capacity) of every limit it holds, in the statement or transaction that starts it
//! ([`crate::transition`]), and a start that finds one limit without a free slot changes
//! nothing ([`crate::TransitionError::LimitFull`]): all or none, never a partial hold. Leaving
//! running (completed, failed, back to pending, cancelled) frees its slots in the same
//! statement or transaction. A take-over of a story whose worker died keeps its slots: they
//! come back when the story finishes, however many workers it took. A slot row holds one story
//! at a time, so the running stories holding a limit never outnumber its capacity.
//!
//! - **PostgreSQL**: one statement does it all: the slots are picked with `FOR UPDATE SKIP
//!   LOCKED` (two starts never wait for each other's slot, and never take the same), the
//!   story's compare-and-swap requires every slot found, and the slots are written only if the
//!   story was; freeing is a second part of the statement that records the result.
//! - **MariaDB and SQLite**: one transaction: the story's compare-and-swap, then each slot
//!   (MariaDB picks it with `FOR UPDATE SKIP LOCKED`; SQLite has one writer at a time), rolled
//!   back whole if one is missing.
//!
//! `version` counts changes of the limit's settings ([`set_limit`], by compare-and-swap).

use crate::error::{ConcurrencyError, LimitError};
use crate::retry::{RetryPolicy, retry};
use crate::versioned::{Changes, Versioned, VersionedUpdate, cas_update, explain_miss};
use chrono::Utc;
use entity::{run_limit, run_limit_slot};
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, PostgresQueryBuilder, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait, Statement, TransactionSession,
    TransactionTrait, Value,
};
use std::collections::HashMap;
use uuid::Uuid;

/// A limit and how many of its slots running stories hold now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitUse {
    /// The limit's id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// How many stories holding it may run at once.
    pub capacity: i32,
    /// How many running stories hold it now.
    pub in_use: i32,
    /// Its version (changes of its settings).
    pub version: i32,
}

/// The longest limit name.
pub const MAX_LIMIT_NAME_LEN: usize = 64;

/// The largest capacity a limit may have (a row per slot is stored).
pub const MAX_CAPACITY: i32 = 10_000;

/// Checks a limit name: 1 to 64 ASCII letters, digits, `_`, `-` or `.`.
///
/// ```
/// assert!(run_domain::check_limit_name("llm").is_ok());
/// assert!(run_domain::check_limit_name("gpu,llm").is_err());
/// ```
pub fn check_limit_name(name: &str) -> Result<(), LimitError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_LIMIT_NAME_LEN {
        Some("it is longer than 64 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        Some("only ASCII letters, digits, '_', '-' and '.' may be used")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(LimitError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a capacity: 0 (nothing holding the limit starts) to [`MAX_CAPACITY`] (10,000).
pub fn check_capacity(capacity: i64) -> Result<i32, LimitError> {
    i32::try_from(capacity)
        .ok()
        .filter(|c| (0..=MAX_CAPACITY).contains(c))
        .ok_or(LimitError::InvalidCapacity { capacity })
}

/// The limit names stored in `run_story.limit_keys`.
pub fn limit_keys_of(column: Option<&str>) -> Vec<String> {
    column
        .map(|c| {
            c.split(',')
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The `run_story.limit_keys` text of `keys`: sorted, without repeats, comma-separated; `None`
/// when there are none.
pub fn limit_keys_column(keys: &[String]) -> Option<String> {
    let mut keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    keys.sort_unstable();
    keys.dedup();
    (!keys.is_empty()).then(|| keys.join(","))
}

/// Creates limit `name` with `capacity` unless it exists; returns it as it is now (an existing
/// limit keeps its capacity: it may have been changed live with [`set_limit`]).
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), run_domain::LimitError> {
/// let llm = run_domain::define_limit(db, "llm", 3).await?;
/// println!("{}: {} of {} in use", llm.name, llm.in_use, llm.capacity);
/// # Ok(()) }
/// ```
pub async fn define_limit<C>(db: &C, name: &str, capacity: i64) -> Result<LimitUse, LimitError>
where
    C: ConnectionTrait + TransactionTrait,
{
    check_limit_name(name)?;
    let capacity = check_capacity(capacity)?;
    if let Some(found) = find_limit(db, name).await? {
        return Ok(found);
    }
    let now = Utc::now();
    let id = Uuid::new_v4();
    let tx = db.begin().await?;
    let inserted = run_limit::Entity::insert(run_limit::ActiveModel {
        id: Set(id),
        name: Set(name.to_owned()),
        capacity: Set(capacity),
        version: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict_do_nothing_on([run_limit::Column::Name])
    .exec_without_returning(&tx)
    .await?;
    if matches!(inserted, sea_orm::TryInsertResult::Inserted(_)) {
        add_slots(&tx, id, 0, capacity).await?;
    }
    tx.commit().await?;
    // Another process may have created it in between: fine, it exists.
    find_limit(db, name)
        .await?
        .ok_or_else(|| LimitError::NotFound {
            name: name.to_owned(),
        })
}

/// Adds slots `from..to` of limit `id` (those that exist already are left as they are).
async fn add_slots<C: ConnectionTrait>(
    db: &C,
    id: Uuid,
    from: i32,
    to: i32,
) -> Result<(), sea_orm::DbErr> {
    const CHUNK: i64 = 500;
    let (mut at, to) = (i64::from(from), i64::from(to));
    while at < to {
        let end = Ord::min(at + CHUNK, to);
        run_limit_slot::Entity::insert_many((at..end).map(|slot_no| run_limit_slot::ActiveModel {
            limit_id: Set(id),
            slot_no: Set(slot_no),
            story_id: Set(None),
        }))
        .on_conflict_do_nothing_on([
            run_limit_slot::Column::LimitId,
            run_limit_slot::Column::SlotNo,
        ])
        .exec_without_returning(db)
        .await?;
        at = end;
    }
    Ok(())
}

/// Sets the capacity of limit `name` (creating it if missing), by compare-and-swap; takes
/// effect at once for every process. Lowering it below the slots in use stops nothing that
/// runs: no story holding it starts until fewer than `capacity` run.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), run_domain::LimitError> {
/// let llm = run_domain::set_limit(db, "llm", 5).await?;
/// assert_eq!(llm.capacity, 5);
/// # Ok(()) }
/// ```
pub async fn set_limit<C>(db: &C, name: &str, capacity: i64) -> Result<LimitUse, LimitError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let cap = check_capacity(capacity)?;
    let current = define_limit(db, name, capacity).await?;
    if current.capacity == cap {
        return Ok(current);
    }
    // The slots first: a claim may use them as soon as the capacity says so.
    add_slots(db, current.id, 0, cap).await?;
    let policy = RetryPolicy::default();
    let id = current.id;
    retry(&policy, |_| async move {
        let now = run_limit::Entity::find_versioned(db, id).await?;
        run_limit::Entity::update_versioned(
            db,
            id,
            now.version,
            Changes::new().set(run_limit::Column::Capacity, cap),
        )
        .await
    })
    .await
    .map_err(|e: ConcurrencyError| LimitError::from(e))?;
    find_limit(db, name)
        .await?
        .ok_or_else(|| LimitError::NotFound {
            name: name.to_owned(),
        })
}

/// Limit `name` with its use now, if it exists.
pub async fn find_limit<C: ConnectionTrait>(
    db: &C,
    name: &str,
) -> Result<Option<LimitUse>, LimitError> {
    let found = run_limit::Entity::find()
        .filter(run_limit::Column::Name.eq(name))
        .all(db)
        .await?;
    Ok(with_use(db, found).await?.into_iter().next())
}

/// Every limit with its use now, by name.
pub async fn list_limits<C: ConnectionTrait>(db: &C) -> Result<Vec<LimitUse>, LimitError> {
    let all = run_limit::Entity::find()
        .order_by_asc(run_limit::Column::Name)
        .all(db)
        .await?;
    with_use(db, all).await
}

/// The limits named in `names`, with their use now, by name.
pub async fn limits_named<C: ConnectionTrait>(
    db: &C,
    names: Vec<String>,
) -> Result<Vec<LimitUse>, LimitError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let found = run_limit::Entity::find()
        .filter(run_limit::Column::Name.is_in(names))
        .order_by_asc(run_limit::Column::Name)
        .all(db)
        .await?;
    with_use(db, found).await
}

async fn with_use<C: ConnectionTrait>(
    db: &C,
    limits: Vec<run_limit::Model>,
) -> Result<Vec<LimitUse>, LimitError> {
    if limits.is_empty() {
        return Ok(Vec::new());
    }
    let held: HashMap<Uuid, i64> = run_limit_slot::Entity::find()
        .select_only()
        .column(run_limit_slot::Column::LimitId)
        .column_as(Expr::col(run_limit_slot::Column::SlotNo).count(), "n")
        .filter(run_limit_slot::Column::LimitId.is_in(limits.iter().map(|l| l.id)))
        .filter(run_limit_slot::Column::StoryId.is_not_null())
        .group_by(run_limit_slot::Column::LimitId)
        .into_tuple::<(Uuid, i64)>()
        .all(db)
        .await?
        .into_iter()
        .collect();
    Ok(limits
        .into_iter()
        .map(|l| LimitUse {
            in_use: held
                .get(&l.id)
                .copied()
                .and_then(|n| i32::try_from(n).ok())
                .unwrap_or(0),
            id: l.id,
            name: l.name,
            capacity: l.capacity,
            version: l.version,
        })
        .collect())
}

/// The compare-and-swap of a story holding limits `keys` (sorted) that starts it (`taking`)
/// or ends its run: with its slots, all or none. `Ok(Err(limit))` when `limit` had no free
/// slot (nothing changed).
pub(crate) async fn swap_with_slots<E, C>(
    db: &C,
    id: Uuid,
    expected: i32,
    mut changes: Changes<E>,
    keys: &[String],
    taking: bool,
) -> Result<Result<E::Model, String>, ConcurrencyError>
where
    E: Versioned,
    C: ConnectionTrait + TransactionTrait,
{
    if db.get_database_backend() == DbBackend::Postgres {
        if taking {
            for i in 0..keys.len() {
                changes
                    .guards
                    .push(Expr::cust(format!("EXISTS (SELECT 1 FROM slot_{i})")));
            }
        }
        let mut update = cas_update::<E>(id, expected, changes).into_query();
        update.returning_all();
        let (story_sql, mut values) = update.build(PostgresQueryBuilder);
        let mut param = |v: Value| {
            values.0.push(v);
            format!("${}", values.0.len())
        };
        let story = param(id.into());
        let mut sql = String::from("WITH ");
        let mut counts = String::new();
        if taking {
            for (i, key) in keys.iter().enumerate() {
                let name = param(key.clone().into());
                // SAFETY(limit): a free slot, locked by this statement, skipped by every other
                // start meanwhile; re-checked free (the newest version) when locked.
                sql.push_str(&format!(
                    "slot_{i} AS (SELECT ls.limit_id, ls.slot_no FROM run_limit_slot ls \
                     JOIN run_limit l ON l.id = ls.limit_id WHERE l.name = {name} \
                     AND ls.story_id IS NULL AND ls.slot_no < l.capacity \
                     ORDER BY ls.slot_no LIMIT 1 FOR UPDATE OF ls SKIP LOCKED), "
                ));
                counts.push_str(&format!("(SELECT count(*) FROM slot_{i}) AS slot_{i}, "));
            }
        }
        sql.push_str(&format!("story AS ({story_sql})"));
        if taking {
            for i in 0..keys.len() {
                sql.push_str(&format!(
                    ", take_{i} AS (UPDATE run_limit_slot SET story_id = {story} FROM slot_{i} \
                     WHERE run_limit_slot.limit_id = slot_{i}.limit_id \
                     AND run_limit_slot.slot_no = slot_{i}.slot_no \
                     AND EXISTS (SELECT 1 FROM story) RETURNING 1)"
                ));
            }
        } else {
            let mut names = Vec::with_capacity(keys.len());
            for key in keys {
                names.push(param(key.clone().into()));
            }
            // By the key's first column (the story's limits), not a scan for the story.
            sql.push_str(&format!(
                ", free AS (UPDATE run_limit_slot SET story_id = NULL WHERE limit_id IN \
                 (SELECT id FROM run_limit WHERE name IN ({})) AND story_id = {story} \
                 AND EXISTS (SELECT 1 FROM story) RETURNING 1)",
                names.join(", ")
            ));
        }
        sql.push_str(&format!(
            " SELECT {counts}story.* FROM (SELECT 1) AS one LEFT JOIN story ON TRUE"
        ));
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values.0,
            ))
            .await?;
        let Some(row) = row else {
            return Err(explain_miss::<E, C>(db, id, expected).await);
        };
        if let Ok(model) = E::Model::from_query_result(&row, "") {
            return Ok(Ok(model));
        }
        for (i, key) in keys.iter().enumerate().filter(|_| taking) {
            let found: i64 = row.try_get("", &format!("slot_{i}"))?;
            if found == 0 {
                return Ok(Err(key.clone()));
            }
        }
        return Err(explain_miss::<E, C>(db, id, expected).await);
    }
    let tx = db.begin().await?;
    let model = match crate::versioned::compare_and_swap::<E, _>(&tx, id, expected, changes).await {
        Ok(model) => model,
        Err(e) => {
            tx.rollback().await?;
            return Err(e);
        }
    };
    if taking {
        for key in keys {
            if !take_slot(&tx, key, id).await? {
                tx.rollback().await?;
                return Ok(Err(key.clone()));
            }
        }
    } else {
        let limits: Vec<Uuid> = run_limit::Entity::find()
            .select_only()
            .column(run_limit::Column::Id)
            .filter(run_limit::Column::Name.is_in(keys.iter().map(String::as_str)))
            .into_tuple()
            .all(&tx)
            .await?;
        run_limit_slot::Entity::update_many()
            .col_expr(run_limit_slot::Column::StoryId, Expr::val(None::<Uuid>))
            .filter(run_limit_slot::Column::LimitId.is_in(limits))
            .filter(run_limit_slot::Column::StoryId.eq(id))
            .exec(&tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Ok(model))
}

/// MariaDB and SQLite: takes a free slot of limit `key` for `story` inside the caller's
/// transaction; false when none is free.
async fn take_slot<C: ConnectionTrait>(
    tx: &C,
    key: &str,
    story: Uuid,
) -> Result<bool, sea_orm::DbErr> {
    let Some(limit) = run_limit::Entity::find()
        .filter(run_limit::Column::Name.eq(key))
        .one(tx)
        .await?
    else {
        return Ok(false);
    };
    let mut pick = Query::select();
    pick.column(run_limit_slot::Column::SlotNo)
        .from(run_limit_slot::Entity)
        .and_where(Expr::col(run_limit_slot::Column::LimitId).eq(limit.id))
        .and_where(Expr::col(run_limit_slot::Column::StoryId).is_null())
        .and_where(Expr::col(run_limit_slot::Column::SlotNo).lt(limit.capacity))
        .order_by(run_limit_slot::Column::SlotNo, sea_orm::Order::Asc)
        .limit(1);
    if tx.get_database_backend() == DbBackend::MySql {
        // SAFETY(limit): a locked free slot, skipped by every other start meanwhile.
        pick.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    let Some(row) = tx.query_one(&pick).await? else {
        return Ok(false);
    };
    let slot_no: i64 = row.try_get_by_index(0)?;
    // SAFETY(limit): only if still free (SQLite: one writer at a time; MariaDB: locked).
    let taken = run_limit_slot::Entity::update_many()
        .col_expr(run_limit_slot::Column::StoryId, Expr::val(story))
        .filter(run_limit_slot::Column::LimitId.eq(limit.id))
        .filter(run_limit_slot::Column::SlotNo.eq(slot_no))
        .filter(run_limit_slot::Column::StoryId.is_null())
        .exec(tx)
        .await?
        .rows_affected;
    Ok(taken == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_sorted_and_unique() {
        let keys = vec!["llm".to_owned(), "gpu".to_owned(), "llm".to_owned()];
        let column = limit_keys_column(&keys);
        assert_eq!(column.as_deref(), Some("gpu,llm"));
        assert_eq!(limit_keys_of(column.as_deref()), ["gpu", "llm"]);
        assert_eq!(limit_keys_column(&[]), None);
        assert!(limit_keys_of(None).is_empty());
    }

    #[test]
    fn names_and_capacities_are_checked() {
        assert!(check_limit_name("a.b-c_9").is_ok());
        for bad in ["", "a b", "ü", &"x".repeat(65)] {
            assert!(check_limit_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_capacity(0).ok(), Some(0));
        assert!(check_capacity(-1).is_err());
        assert!(check_capacity(i64::from(MAX_CAPACITY) + 1).is_err());
    }
}

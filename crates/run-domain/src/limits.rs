//! Concurrency limits shared by every process on the database: at no instant do more stories
//! holding a limit run than its capacity.
//!
//! A limit is a `run_limit` row: a name, a `capacity`, and `in_use`, the number of running
//! stories that hold it. A story names the limits it holds (`run_story.limit_keys`, fixed at
//! creation). The counter moves only in the transaction that moves such a story into or out
//! of running ([`crate::transition`]): a start takes one slot of every limit, each by one
//! conditional statement (`in_use = in_use + 1 WHERE name = ? AND in_use < capacity`, under the
//! row's lock), in name order, and a start that finds one full rolls back all of it
//! ([`crate::TransitionError::LimitFull`]): all or none, never a partial hold, and no deadlock
//! (every transaction locks limits in the same order). Leaving running (completed, failed,
//! back to pending, cancelled) gives every slot back in the same transaction. A take-over of a
//! story whose worker died keeps its slots: they come back when the story finishes, however
//! many workers it took. So `in_use` always equals the number of running stories holding the
//! limit, on every backend.
//!
//! `version` counts changes of the limit's settings ([`set_limit`], by compare-and-swap);
//! `in_use` is a counter, as `run_log_head.last_seq` is, and does not move it.

use crate::error::{ConcurrencyError, LimitError};
use crate::retry::{RetryPolicy, retry};
use crate::versioned::{Changes, VersionedUpdate};
use chrono::Utc;
use entity::run_limit;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    TransactionTrait,
};
use uuid::Uuid;

/// The longest limit name.
pub const MAX_LIMIT_NAME_LEN: usize = 64;

/// The largest capacity a limit may have.
pub const MAX_CAPACITY: i32 = 1_000_000;

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

/// Checks a capacity: 0 (nothing holding the limit starts) to [`MAX_CAPACITY`].
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
pub async fn define_limit<C>(
    db: &C,
    name: &str,
    capacity: i64,
) -> Result<run_limit::Model, LimitError>
where
    C: ConnectionTrait + TransactionTrait,
{
    check_limit_name(name)?;
    let capacity = check_capacity(capacity)?;
    if let Some(found) = find_limit(db, name).await? {
        return Ok(found);
    }
    let now = Utc::now();
    let inserted = run_limit::Entity::insert(run_limit::ActiveModel {
        id: Set(Uuid::new_v4()),
        name: Set(name.to_owned()),
        capacity: Set(capacity),
        in_use: Set(0),
        version: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict_do_nothing_on([run_limit::Column::Name])
    .exec_without_returning(db)
    .await;
    match inserted {
        Ok(_) => {}
        // Another process created it in between: fine, it exists.
        Err(e) if find_limit(db, name).await?.is_some() => drop(e),
        Err(e) => return Err(e.into()),
    }
    find_limit(db, name)
        .await?
        .ok_or_else(|| LimitError::NotFound {
            name: name.to_owned(),
        })
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
pub async fn set_limit<C>(db: &C, name: &str, capacity: i64) -> Result<run_limit::Model, LimitError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let cap = check_capacity(capacity)?;
    let current = define_limit(db, name, capacity).await?;
    if current.capacity == cap {
        return Ok(current);
    }
    let policy = RetryPolicy::default();
    let id = current.id;
    let first = std::sync::Mutex::new(Some(current));
    retry(&policy, |_| {
        let first = first.lock().ok().and_then(|mut f| f.take());
        async move {
            let now = match first {
                Some(model) => model,
                None => run_limit::Entity::find_versioned(db, id).await?,
            };
            run_limit::Entity::update_versioned(
                db,
                id,
                now.version,
                Changes::new().set(run_limit::Column::Capacity, cap),
            )
            .await
        }
    })
    .await
    .map_err(|e: ConcurrencyError| e.into())
}

/// Limit `name`, if it exists.
pub async fn find_limit<C: ConnectionTrait>(
    db: &C,
    name: &str,
) -> Result<Option<run_limit::Model>, LimitError> {
    Ok(run_limit::Entity::find()
        .filter(run_limit::Column::Name.eq(name))
        .one(db)
        .await?)
}

/// Every limit, by name.
pub async fn list_limits<C: ConnectionTrait>(db: &C) -> Result<Vec<run_limit::Model>, LimitError> {
    Ok(run_limit::Entity::find()
        .order_by_asc(run_limit::Column::Name)
        .all(db)
        .await?)
}

/// Takes one slot of every limit in `keys` (sorted), inside the caller's transaction; returns
/// the first that was full (then the caller rolls back, taking none).
pub(crate) async fn take_slots<C: ConnectionTrait>(
    tx: &C,
    keys: &[String],
) -> Result<Option<String>, sea_orm::DbErr> {
    for key in keys {
        // SAFETY(limit): one conditional statement under the row's lock; of two starts
        // racing for the last slot, the second re-checks `in_use < capacity` after the first
        // commits, and matches nothing.
        let taken = run_limit::Entity::update_many()
            .col_expr(
                run_limit::Column::InUse,
                Expr::col(run_limit::Column::InUse).add(1),
            )
            .filter(run_limit::Column::Name.eq(key.as_str()))
            .filter(Expr::col(run_limit::Column::InUse).lt(Expr::col(run_limit::Column::Capacity)))
            .exec(tx)
            .await?
            .rows_affected;
        if taken == 0 {
            return Ok(Some(key.clone()));
        }
    }
    Ok(None)
}

/// Gives back one slot of every limit in `keys` (sorted), inside the caller's transaction.
pub(crate) async fn return_slots<C: ConnectionTrait>(
    tx: &C,
    keys: &[String],
) -> Result<(), sea_orm::DbErr> {
    for key in keys {
        run_limit::Entity::update_many()
            .col_expr(
                run_limit::Column::InUse,
                Expr::col(run_limit::Column::InUse).sub(1),
            )
            .filter(run_limit::Column::Name.eq(key.as_str()))
            .filter(run_limit::Column::InUse.gt(0))
            .exec(tx)
            .await?;
    }
    Ok(())
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

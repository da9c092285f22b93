//! Reading: pages after a cursor for followers, and the whole log in bounded memory.

use super::{LogCursor, LogEntry, LogPage};
use crate::error::LogError;
use entity::{run, run_log};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

/// Reads up to `limit` lines after `cursor`, in order, for a follower.
///
/// A follower that polls with the returned `next` cursor sees every line exactly once, even
/// while writers append (see the module docs).
///
/// ```no_run
/// use run_domain::{LogCursor, read_run_log_after};
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_domain::LogError> {
/// let mut cursor = LogCursor::START;
/// loop {
///     let page = read_run_log_after(db, run_id, cursor, 1000).await?;
///     for entry in &page.entries {
///         println!("{}", entry.to_line());
///     }
///     if page.entries.is_empty() { break; }
///     cursor = page.next;
/// }
/// # Ok(()) }
/// ```
pub async fn read_run_log_after<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    cursor: LogCursor,
    limit: u64,
) -> Result<LogPage, LogError> {
    let rows = run_log::Entity::find()
        .filter(run_log::Column::RunId.eq(run_id))
        .filter(run_log::Column::Seq.gt(cursor.0))
        .order_by_asc(run_log::Column::Seq)
        .limit(limit)
        .all(db)
        .await?;
    if rows.is_empty() && !run_exists(db, run_id).await? {
        return Err(LogError::RunNotFound { run_id });
    }
    let entries: Vec<LogEntry> = rows.into_iter().map(LogEntry::from_model).collect();
    let next = entries.last().map_or(cursor, |e| LogCursor(e.seq));
    Ok(LogPage { entries, next })
}

/// Writes the whole log of a run, one `[<timestamp>] <message>` line each, to `out`, reading
/// it in pages so that memory stays bounded whatever the log's size. Returns the lines written.
pub async fn write_run_log<C, W>(db: &C, run_id: Uuid, out: &mut W) -> Result<u64, LogError>
where
    C: ConnectionTrait,
    W: std::io::Write,
{
    const PAGE: u64 = 1000;
    let mut cursor = LogCursor::START;
    let mut count = 0u64;
    loop {
        let page = read_run_log_after(db, run_id, cursor, PAGE).await?;
        for entry in &page.entries {
            writeln!(out, "{}", entry.to_line()).map_err(|e| {
                LogError::Database(sea_orm::DbErr::Custom(format!("writing the log: {e}")))
            })?;
            count += 1;
        }
        if (page.entries.len() as u64) < PAGE {
            return Ok(count);
        }
        cursor = page.next;
    }
}

/// The whole log of a run as text, one `[<ISO-8601 UTC with ms>] <message>` line per message.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_domain::LogError> {
/// let text = run_domain::read_run_log(db, run_id).await?;
/// print!("{text}");
/// # Ok(()) }
/// ```
pub async fn read_run_log<C: ConnectionTrait>(db: &C, run_id: Uuid) -> Result<String, LogError> {
    let mut buf = Vec::new();
    write_run_log(db, run_id, &mut buf).await?;
    // Every line was built from Strings.
    Ok(String::from_utf8(buf)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

pub(super) async fn run_exists<C: ConnectionTrait>(db: &C, run_id: Uuid) -> Result<bool, LogError> {
    Ok(run::Entity::find()
        .select_only()
        .column(run::Column::Id)
        .filter(run::Column::Id.eq(run_id))
        .into_tuple::<Uuid>()
        .one(db)
        .await?
        .is_some())
}

//! Appending: one short transaction per batch (one statement on PostgreSQL and SQLite), numbered under the
//! run's head lock, written once per batch id and checked against its digest on a replay.

use super::AppendReceipt;
use crate::error::LogError;
use crate::retry::{RetryPolicy, Retryable, retry_when};
use chrono::{DateTime, SubsecRound, Utc};
use entity::{run, run_log, run_log_head};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionSession, TransactionTrait,
};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;
use uuid::Uuid;

/// Appends one line to a run's log.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_domain::LogError> {
/// run_domain::append_run_log(db, run_id, "story build started").await?;
/// # Ok(()) }
/// ```
pub async fn append_run_log<C>(
    db: &C,
    run_id: Uuid,
    message: &str,
) -> Result<AppendReceipt, LogError>
where
    C: ConnectionTrait + TransactionTrait,
{
    append_run_logs(db, run_id, [message]).await
}

/// Appends a batch of lines atomically: all of them or none, contiguous, in order, with one
/// timestamp. An empty batch is a no-op.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_domain::LogError> {
/// run_domain::append_run_logs(db, run_id, ["compiling", "linking", "done"]).await?;
/// # Ok(()) }
/// ```
pub async fn append_run_logs<C, I, S>(
    db: &C,
    run_id: Uuid,
    messages: I,
) -> Result<AppendReceipt, LogError>
where
    C: ConnectionTrait + TransactionTrait,
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    append_batch(db, run_id, Uuid::new_v4(), messages, true).await
}

/// Like [`append_run_logs`] under a batch id the caller chose: appending the same batch id again
/// (a retry after an error whose first try did commit) writes nothing and returns the first
/// try's receipt with `written == false`. Transient database failures (a dropped connection, a
/// server restart, a deadlock victim) are retried with backoff under the same batch id, so a
/// retry whose first try committed writes nothing twice.
pub async fn append_run_logs_idempotent<C, I, S>(
    db: &C,
    run_id: Uuid,
    batch_id: Uuid,
    messages: I,
) -> Result<AppendReceipt, LogError>
where
    C: ConnectionTrait + TransactionTrait,
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    append_batch(db, run_id, batch_id, messages, false).await
}

/// A batch of lines under an id of its own, written at most once however often it is tried:
/// what a writer that retries on its own (a log sink riding out a server restart) holds on to.
///
/// The id is drawn at random when the batch is made, so its first try cannot meet an earlier
/// one and skips looking for it (on PostgreSQL the whole append is then one statement); every
/// later try looks, and writes nothing if an earlier try committed with its answer lost.
///
/// ```no_run
/// use run_domain::retry::retry_transient;
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_domain::LogError> {
/// let batch = run_domain::LogBatch::new(run_id, ["compiling", "linking"]);
/// // The same id on every try: written once, whatever a failed try did.
/// let budget = Some(std::time::Duration::from_secs(30));
/// let (receipt, _) = retry_transient(budget, || batch.append_once(db), |_| {}).await;
/// assert_eq!(receipt?.batch_id, batch.batch_id());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LogBatch<S> {
    run_id: Uuid,
    batch_id: Uuid,
    messages: Vec<S>,
    tried: AtomicBool,
}

impl<S: AsRef<str>> LogBatch<S> {
    /// A batch of `messages` for `run_id`'s log, under a new random id.
    pub fn new(run_id: Uuid, messages: impl IntoIterator<Item = S>) -> LogBatch<S> {
        LogBatch {
            run_id,
            batch_id: Uuid::new_v4(),
            messages: messages.into_iter().collect(),
            tried: AtomicBool::new(false),
        }
    }

    /// Its id.
    pub fn batch_id(&self) -> Uuid {
        self.batch_id
    }

    /// The run whose log it goes to.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// Its lines.
    pub fn messages(&self) -> &[S] {
        &self.messages
    }

    /// Appends the batch once, without trying again: for a writer that retries on its own
    /// (with [`crate::retry::retry_transient`]), so that no retry runs inside another. Only the
    /// first try skips looking for an earlier one. (A call whose future is dropped counts as a
    /// try.)
    pub async fn append_once<C>(&self, db: &C) -> Result<AppendReceipt, LogError>
    where
        C: ConnectionTrait + TransactionTrait,
    {
        let fresh = !self.tried.swap(true, AtomicOrdering::SeqCst);
        append_once(db, self.run_id, self.batch_id, &self.messages, !fresh).await
    }

    /// Appends the batch, as [`append_run_logs_idempotent`] does; only the first call skips
    /// looking for an earlier try. (A call whose future is dropped counts as a try.)
    pub async fn append<C>(&self, db: &C) -> Result<AppendReceipt, LogError>
    where
        C: ConnectionTrait + TransactionTrait,
    {
        let fresh = !self.tried.swap(true, AtomicOrdering::SeqCst);
        append_batch(db, self.run_id, self.batch_id, &self.messages, fresh).await
    }
}

/// How often an append is tried through transient failures, the first try included (about
/// 10 s of backoff in all: enough to ride out a server restart).
pub const APPEND_TRIES: u32 = 14;

/// `fresh_id`: the batch id was just drawn at random, so its first try need not look for an
/// earlier one (saving a round trip while the head is locked); retries always look.
pub(super) async fn append_batch<C, I, S>(
    db: &C,
    run_id: Uuid,
    batch_id: Uuid,
    messages: I,
    fresh_id: bool,
) -> Result<AppendReceipt, LogError>
where
    C: ConnectionTrait + TransactionTrait,
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let messages: Vec<S> = messages.into_iter().collect();
    // About 10 s of retries in all: enough to ride out a server restart.
    let policy = RetryPolicy {
        max_attempts: APPEND_TRIES,
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_secs(2),
    };
    // SAFETY(idempotency): a retried batch whose first try committed is found by its batch id
    // and not written again.
    let (result, _) = retry_when(
        &policy,
        |attempt| append_once(db, run_id, batch_id, &messages, !fresh_id || attempt > 1),
        |e: &LogError| e.is_transient(),
    )
    .await;
    result
}

pub(super) async fn append_once<C, S>(
    db: &C,
    run_id: Uuid,
    batch_id: Uuid,
    messages: &[S],
    look_for_earlier_try: bool,
) -> Result<AppendReceipt, LogError>
where
    C: ConnectionTrait + TransactionTrait,
    S: AsRef<str>,
{
    if messages.is_empty() {
        return Ok(AppendReceipt {
            batch_id,
            first_seq: 0,
            last_seq: 0,
            logged_at: Utc::now(),
            written: false,
        });
    }
    let n = i64::try_from(messages.len()).unwrap_or(i64::MAX);
    let backend = db.get_database_backend();
    // A fresh batch of bounded size is one statement where the backend allows it.
    let fits = |max_lines: usize| {
        !look_for_earlier_try
            && messages.len() <= max_lines
            && messages.iter().map(|m| m.as_ref().len()).sum::<usize>() <= FAST_PATH_MAX_BYTES
    };
    let one_statement = match backend {
        #[cfg(feature = "postgres")]
        DbBackend::Postgres if fits(usize::MAX) => {
            append_in_one_statement(db, run_id, batch_id, messages).await?
        }
        DbBackend::Sqlite if fits(SQLITE_FAST_PATH_LINES) => {
            append_in_one_sqlite_statement(db, run_id, batch_id, messages).await?
        }
        _ => None,
    };
    if let Some(receipt) = one_statement {
        return Ok(receipt);
    }
    // SQLite: take the write lock at BEGIN, so the transaction never has to upgrade a read lock.
    let tx = crate::begin_write(db).await?;

    let last = match reserve(&tx, run_id, n).await? {
        Some(last) => last,
        None => {
            ensure_head(&tx, run_id).await?;
            reserve(&tx, run_id, n)
                .await?
                .ok_or(LogError::RunNotFound { run_id })?
        }
    };

    // SAFETY(idempotency): the head's row lock is held, so a concurrent retry of the same
    // batch waits here until this one commits or rolls back, then sees its rows.
    let earlier = if look_for_earlier_try {
        run_log::Entity::find()
            .filter(run_log::Column::BatchId.eq(batch_id))
            .order_by_asc(run_log::Column::LineNo)
            .one(&tx)
            .await?
    } else {
        None
    };
    let digest = batch_digest(messages);
    if let Some(first) = earlier {
        // SAFETY(idempotency): a replay must be the first try again (same run, same lines), or
        // its receipt would claim lines of other batches; it is checked before anything is
        // written, and the head's reservation is rolled back either way.
        let same = first.run_id == run_id
            && match &first.batch_digest {
                Some(stored) => stored.as_slice() == digest.as_slice(),
                // Written before batches carried a digest: compare the lines themselves.
                None => same_lines(&tx, batch_id, messages).await?,
            };
        tx.rollback().await?;
        if !same {
            return Err(LogError::BatchMismatch { batch_id });
        }
        return Ok(AppendReceipt {
            batch_id,
            first_seq: first.seq,
            last_seq: first.seq + n - 1,
            logged_at: first.logged_at,
            written: false,
        });
    }

    // Taken under the head's lock, so timestamps follow `seq` on any one machine's clock.
    // Microseconds, as every backend stores them: the receipt says exactly what a replay's
    // receipt (read back from the rows) will say.
    // SQLite: milliseconds, as its own clock (read by the one-statement append) gives them.
    let logged_at = match backend {
        DbBackend::Sqlite => Utc::now().trunc_subsecs(3),
        _ => Utc::now().trunc_subsecs(6),
    };
    let first_seq = last - n + 1;
    // Bound each INSERT by rows and by bytes: MariaDB refuses packets over max_allowed_packet
    // (16 MiB by default), and every backend limits bound parameters.
    const MAX_ROWS: usize = 500;
    const MAX_BYTES: usize = 4 << 20;
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    for (i, message) in messages.iter().enumerate() {
        let message = message.as_ref().as_bytes();
        if !rows.is_empty() && (rows.len() == MAX_ROWS || bytes + message.len() > MAX_BYTES) {
            run_log::Entity::insert_many(std::mem::take(&mut rows))
                .exec_without_returning(&tx)
                .await?;
            bytes = 0;
        }
        bytes += message.len();
        let i = i64::try_from(i).unwrap_or(i64::MAX);
        rows.push(run_log::ActiveModel {
            id: sea_orm::ActiveValue::NotSet,
            run_id: Set(run_id),
            seq: Set(first_seq + i),
            batch_id: Set(batch_id),
            line_no: Set(i32::try_from(i).unwrap_or(i32::MAX)),
            logged_at: Set(logged_at),
            message: Set(message.to_vec()),
            batch_digest: Set((i == 0).then(|| digest.to_vec())),
        });
    }
    if !rows.is_empty() {
        run_log::Entity::insert_many(rows)
            .exec_without_returning(&tx)
            .await?;
    }
    tx.commit().await?;
    Ok(AppendReceipt {
        batch_id,
        first_seq,
        last_seq: last,
        logged_at,
        written: true,
    })
}

/// The largest batch (in message bytes) sent as one statement on PostgreSQL.
pub(super) const FAST_PATH_MAX_BYTES: usize = 4 << 20;

/// PostgreSQL: the whole append in one autocommit statement, so the head's row lock is held for
/// one round trip and the commit instead of four. The UPDATE in the CTE takes the lock and hands
/// out the numbers; `clock_timestamp()` is read there, after the lock, so timestamps follow
/// `seq`. Returns `None` when the run has no head row (then the general path decides between
/// creating one and `RunNotFound`).
#[cfg(feature = "postgres")]
pub(super) async fn append_in_one_statement<C, S>(
    db: &C,
    run_id: Uuid,
    batch_id: Uuid,
    messages: &[S],
) -> Result<Option<AppendReceipt>, LogError>
where
    C: ConnectionTrait,
    S: AsRef<str>,
{
    const SQL: &str = "WITH head AS (\
            UPDATE run_log_head SET last_seq = last_seq + $2 WHERE run_id = $1 \
            RETURNING last_seq, clock_timestamp() AS at) \
        INSERT INTO run_log (run_id, seq, batch_id, line_no, logged_at, message, batch_digest) \
        SELECT $1, head.last_seq - $2 + line.n, $3, (line.n - 1)::int, head.at, line.message, \
            CASE WHEN line.n = 1 THEN $5::bytea END \
        FROM head, unnest($4::bytea[]) WITH ORDINALITY AS line(message, n) \
        RETURNING seq, logged_at";
    let n = i64::try_from(messages.len()).unwrap_or(i64::MAX);
    let bytes: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| m.as_ref().as_bytes().to_vec())
        .collect();
    // SAFETY(ordering, atomicity): one statement in autocommit is one transaction; the head's
    // row lock is taken by the UPDATE and held until its commit, as in the general path.
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            DbBackend::Postgres,
            SQL,
            [
                run_id.into(),
                n.into(),
                batch_id.into(),
                bytes.into(),
                batch_digest(messages).to_vec().into(),
            ],
        ))
        .await?;
    receipt_of(batch_id, &rows)
}

/// The most lines a batch sent as one statement on SQLite has (the head follows each line
/// through a trigger, one update per line).
pub(super) const SQLITE_FAST_PATH_LINES: usize = 64;

/// SQLite: the whole append in one autocommit statement. The lines are numbered from the head
/// read once in the statement (an uncorrelated subquery), and the `run_log_head_follows`
/// trigger (migration 11) moves the head to each line's `seq` as it goes in. A write statement
/// holds SQLite's write lock from its start to its commit, so no other append reads the head in
/// between: numbers stay gap-free in commit order. The time is SQLite's own, read under that
/// lock, so timestamps follow `seq` (at millisecond precision). Returns `None` when the run has
/// no head row (the general path decides).
pub(super) async fn append_in_one_sqlite_statement<C, S>(
    db: &C,
    run_id: Uuid,
    batch_id: Uuid,
    messages: &[S],
) -> Result<Option<AppendReceipt>, LogError>
where
    C: ConnectionTrait,
    S: AsRef<str>,
{
    let mut lines = String::new();
    let mut values: Vec<sea_orm::Value> = vec![
        run_id.into(),
        batch_id.into(),
        batch_digest(messages).to_vec().into(),
    ];
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            lines.push_str(" UNION ALL ");
        }
        // Numbered: `?1` is the run, `?2` the batch, `?3` the digest, the texts from `?4`.
        lines.push_str(&format!("SELECT {i} AS n, ?{} AS message", i + 4));
        values.push(message.as_ref().as_bytes().to_vec().into());
    }
    let sql = format!(
        "INSERT INTO run_log (run_id, seq, batch_id, line_no, logged_at, message, batch_digest) \
         SELECT ?1, (SELECT last_seq FROM run_log_head WHERE run_id = ?1) + 1 + line.n, ?2, \
             line.n, strftime('%Y-%m-%d %H:%M:%f000 +00:00', 'now'), line.message, \
             CASE WHEN line.n = 0 THEN ?3 END \
         FROM ({lines}) AS line \
         WHERE EXISTS (SELECT 1 FROM run_log_head WHERE run_id = ?1) \
         ORDER BY line.n \
         RETURNING seq, logged_at"
    );
    // SAFETY(ordering, atomicity): one statement in autocommit is one transaction, and SQLite
    // lets one write transaction in at a time: the head read above and every line's insert
    // (with the trigger's move of the head) happen under its write lock.
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            DbBackend::Sqlite,
            sql,
            values,
        ))
        .await?;
    receipt_of(batch_id, &rows)
}

/// The receipt of a one-statement append from the `seq` and `logged_at` it returned; `None`
/// when it wrote nothing.
fn receipt_of(
    batch_id: Uuid,
    rows: &[sea_orm::QueryResult],
) -> Result<Option<AppendReceipt>, LogError> {
    let mut first_seq = i64::MAX;
    let mut last_seq = 0;
    let mut logged_at = None;
    for row in rows {
        let seq: i64 = row.try_get("", "seq")?;
        first_seq = Ord::min(first_seq, seq);
        last_seq = Ord::max(last_seq, seq);
        logged_at = Some(row.try_get::<DateTime<Utc>>("", "logged_at")?);
    }
    Ok(logged_at.map(|logged_at| AppendReceipt {
        batch_id,
        first_seq,
        last_seq,
        logged_at,
        written: true,
    }))
}

/// The SHA-256 of a batch: its line count, then each line's length and bytes, so that batches
/// that differ in any line, in where lines split, or in their number never share a digest.
pub(super) fn batch_digest<S: AsRef<str>>(messages: &[S]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update((messages.len() as u64).to_le_bytes());
    for message in messages {
        let bytes = message.as_ref().as_bytes();
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hasher.finalize().into()
}

/// Whether the lines stored under `batch_id` are exactly `messages` (for batches written before
/// batches carried a digest).
pub(super) async fn same_lines<C: ConnectionTrait, S: AsRef<str>>(
    tx: &C,
    batch_id: Uuid,
    messages: &[S],
) -> Result<bool, LogError> {
    let stored: Vec<Vec<u8>> = run_log::Entity::find()
        .select_only()
        .column(run_log::Column::Message)
        .filter(run_log::Column::BatchId.eq(batch_id))
        .order_by_asc(run_log::Column::LineNo)
        .into_tuple()
        .all(tx)
        .await?;
    Ok(stored.len() == messages.len()
        && stored
            .iter()
            .zip(messages)
            .all(|(stored, m)| stored.as_slice() == m.as_ref().as_bytes()))
}

/// Bumps the run's head by `n` and returns the new last seq, or `None` when it has no head row.
pub(super) async fn reserve<C: ConnectionTrait>(
    tx: &C,
    run_id: Uuid,
    n: i64,
) -> Result<Option<i64>, LogError> {
    let update = run_log_head::Entity::update_many()
        .col_expr(
            run_log_head::Column::LastSeq,
            Expr::col(run_log_head::Column::LastSeq).add(n),
        )
        .filter(run_log_head::Column::RunId.eq(run_id));
    // SAFETY(ordering): this UPDATE takes the head's row lock (PostgreSQL, MariaDB) or the
    // database write lock (SQLite, BEGIN IMMEDIATE) until commit; see the module docs.
    let head = match tx.get_database_backend() {
        DbBackend::MySql => {
            if update.exec(tx).await?.rows_affected == 0 {
                return Ok(None);
            }
            run_log_head::Entity::find_by_id(run_id).one(tx).await?
        }
        _ => update.exec_with_returning(tx).await?.into_iter().next(),
    };
    Ok(head.map(|h| h.last_seq))
}

/// Creates the run's head row if the run exists and has none (runs made before the log or by
/// other tools). Inserts nothing when the run does not exist.
pub(super) async fn ensure_head<C: ConnectionTrait>(tx: &C, run_id: Uuid) -> Result<(), LogError> {
    let mut select = Query::select();
    select
        .expr(Expr::val(run_id))
        .expr(Expr::val(0i64))
        .from(run::Entity)
        .and_where(Expr::col(run::Column::Id).eq(run_id));
    let mut insert = Query::insert();
    insert
        .into_table(run_log_head::Entity)
        .columns([run_log_head::Column::RunId, run_log_head::Column::LastSeq])
        .select_from(select)
        .map_err(|e| LogError::Database(sea_orm::DbErr::Custom(e.to_string())))?
        .on_conflict(
            OnConflict::column(run_log_head::Column::RunId)
                .do_nothing_on([run_log_head::Column::RunId])
                .to_owned(),
        );
    tx.execute(&insert).await?;
    Ok(())
}

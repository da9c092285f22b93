//! Many stories per statement: starting the ready stories of a run in one claim, and recording
//! many completions in one write, each row under its own version check.
//!
//! These are the batched forms of [`crate::transition_with`] for the two transitions every
//! story goes through, for stories that hold no limit (a story holding limits takes and frees
//! slots in its own transition; [`start_ready`] never picks one, and [`complete_running`]
//! refuses one). They change the status column, which is otherwise reserved to
//! [`crate::transition`]: they write exactly what it writes for the same transitions (status,
//! `started_at` or `finished_at`, the version moved on, `updated_at`).
//!
//! - **[`start_ready`]**: picks up to `max` pending stories of a run that may start now (no
//!   unmet need, retry delay passed, no limit; highest priority first, then position) and
//!   starts them for one lease owner. A row is written only if it is still pending at the
//!   version the pick read, with its needs met and its run not paused: the same conditions a
//!   single start's compare-and-swap carries.
//!   - PostgreSQL: one statement, `UPDATE ... FROM (SELECT id, version ... FOR UPDATE SKIP
//!     LOCKED) AS picked WHERE id and version match ... RETURNING *`: rows another process is
//!     claiming are skipped, not waited for, so processes spread over the ready stories
//!     instead of colliding. Its text is the same for every batch size, so its prepared form
//!     is planned once per connection.
//!   - SQLite: `UPDATE ... WHERE (id, version) IN (SELECT id, version ...) RETURNING *` (one
//!     writer at a time, so nobody else claims in between).
//!   - MariaDB (no `UPDATE ... RETURNING`): one transaction, a `SELECT ... FOR UPDATE SKIP
//!     LOCKED` of the picks, the `UPDATE` on their ids and versions, and a read of the rows
//!     written: three statements.
//! - **[`complete_running`]**: completes many running stories, each matched on its own id and
//!   the version its holder last wrote (`WHERE (id = ? AND version = ?) OR ...`). A row whose
//!   version moved on (taken over, cancelled, renewed by an answer its holder lost) is left
//!   alone and simply not returned: its holder learns of it as it would from a single
//!   compare-and-swap. PostgreSQL: one statement over arrays (`UPDATE ... FROM unnest(ids,
//!   versions, starts)`), the same text for every batch size; SQLite: one statement with
//!   `RETURNING`; MariaDB: one transaction (a locking read of the rows, the `UPDATE`, a read
//!   back).
//!
//! A batch that fails with a transient error may have committed with its answer lost:
//! [`started_by`] finds what a lost start wrote (the owner and lease expiry are the
//! statement's own); a lost completion is recognised row by row as a single one is.

use crate::error::ConcurrencyError;
use crate::lifecycle::{Lifecycle, StoryStatus};
use crate::schedule::{delay_passed, run_not_paused};
use chrono::{DateTime, Utc};
use entity::run_story;
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionSession, TransactionTrait,
};
use uuid::Uuid;

/// The most rows one batched statement writes.
pub const MAX_BATCH: usize = 1024;

/// Starts up to `max` (at most [`MAX_BATCH`]) ready stories of `run_id` that hold no limit,
/// highest priority first, leased to `owner` until `lease_until`, each with one more attempt.
/// Returns the stories as written (running); empty when none may start now.
///
/// ```no_run
/// use run_domain::batch::start_ready;
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_domain::ConcurrencyError> {
/// let until = chrono::Utc::now() + chrono::Duration::seconds(30);
/// for story in start_ready(db, run_id, 16, "host-1-0", until).await? {
///     println!("{} is ours (attempt {})", story.key, story.attempts);
/// }
/// # Ok(()) }
/// ```
pub async fn start_ready<C>(
    db: &C,
    run_id: Uuid,
    max: usize,
    owner: &str,
    lease_until: DateTime<Utc>,
) -> Result<Vec<run_story::Model>, ConcurrencyError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let max = max.clamp(1, MAX_BATCH);
    let now = Utc::now();
    let now_ms = now.timestamp_millis();
    let ready = |q: &mut sea_orm::sea_query::SelectStatement| {
        q.from(run_story::Entity)
            .and_where(Expr::col(run_story::Column::RunId).eq(run_id))
            .and_where(Expr::col(run_story::Column::Status).eq(StoryStatus::Pending.as_str()))
            .and_where(Expr::col(run_story::Column::UnmetNeeds).eq(0))
            .and_where(Expr::col(run_story::Column::LimitKeys).is_null())
            .and_where(delay_passed(now_ms))
            .order_by(run_story::Column::Priority, sea_orm::Order::Desc)
            .order_by(run_story::Column::Position, sea_orm::Order::Asc)
            .order_by(run_story::Column::Id, sea_orm::Order::Asc)
            .limit(max as u64)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    };
    let update = |matching: Condition| {
        run_story::Entity::update_many()
            .col_expr(
                run_story::Column::Status,
                Expr::val(StoryStatus::Running.as_str()),
            )
            .col_expr(
                run_story::Column::Version,
                Expr::col(run_story::Column::Version).add(1),
            )
            .col_expr(run_story::Column::UpdatedAt, Expr::val(now))
            .col_expr(run_story::Column::StartedAt, Expr::val(now))
            .col_expr(run_story::Column::LeaseOwner, Expr::val(owner))
            .col_expr(run_story::Column::LeaseExpiresAt, Expr::val(lease_until))
            .col_expr(
                run_story::Column::Attempts,
                Expr::col(run_story::Column::Attempts).add(1),
            )
            .filter(matching)
            // SAFETY(start): the conditions of a single start's compare-and-swap, in the
            // statement that writes (see `crate::schedule::story_start_guards`).
            .filter(run_story::Column::Status.eq(StoryStatus::Pending.as_str()))
            .filter(run_story::Column::UnmetNeeds.eq(0))
            .filter(run_story::Column::LimitKeys.is_null())
            .filter(delay_passed(now_ms))
            .filter(run_not_paused())
    };
    #[cfg(feature = "postgres")]
    if db.get_database_backend() == DbBackend::Postgres {
        return start_ready_postgres(db, run_id, max, owner, lease_until, now).await;
    }
    if db.get_database_backend() != DbBackend::MySql {
        let mut picked = Query::select();
        picked
            .column(run_story::Column::Id)
            .column(run_story::Column::Version);
        ready(&mut picked);
        // SAFETY(claim): each row is matched on the id and version the pick read, under the
        // row lock the pick took (PostgreSQL; SQLite has one writer at a time), so a row
        // changed by anyone since is not written.
        let matching = Expr::tuple([
            Expr::col(run_story::Column::Id),
            Expr::col(run_story::Column::Version),
        ])
        .in_subquery(picked.to_owned());
        return Ok(update(Condition::all().add(matching))
            .exec_with_returning(db)
            .await?);
    }
    let tx = db.begin().await?;
    let mut picked = Query::select();
    picked
        .column(run_story::Column::Id)
        .column(run_story::Column::Version);
    ready(&mut picked);
    let rows = tx.query_all(&picked).await?;
    let mut pairs = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get("", "id")?;
        let version: i32 = row.try_get("", "version")?;
        pairs.push((id, version));
    }
    if pairs.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    update(id_and_version_in(&pairs)).exec(&tx).await?;
    let ids: Vec<Uuid> = pairs.iter().map(|(id, _)| *id).collect();
    let written = run_story::Entity::find()
        .filter(run_story::Column::Id.is_in(ids))
        .order_by_desc(run_story::Column::Priority)
        .order_by_asc(run_story::Column::Position)
        .all(&tx)
        .await?;
    tx.commit().await?;
    // The rows are locked by this transaction from the pick on: those written are the ones
    // now running under this lease at the next version.
    Ok(written
        .into_iter()
        .filter(|s| {
            s.status == StoryStatus::Running.as_str()
                && s.lease_owner.as_deref() == Some(owner)
                && pairs
                    .iter()
                    .any(|(id, v)| *id == s.id && s.version == v + 1)
        })
        .collect())
}

/// The stories of `run_id` that a [`start_ready`] for `owner` and `lease_until` wrote and
/// that are still as it left them: what a start whose answer was lost committed.
pub async fn started_by<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    owner: &str,
    lease_until: DateTime<Utc>,
) -> Result<Vec<run_story::Model>, ConcurrencyError> {
    Ok(run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.eq(StoryStatus::Running.as_str()))
        .filter(run_story::Column::LeaseOwner.eq(owner))
        .filter(run_story::Column::LeaseExpiresAt.eq(lease_until))
        .all(db)
        .await?)
}

/// Completes the running stories `held` (each as its holder last wrote it, holding no limit)
/// in one write, each matched on its id and version, with its `started_at` as given (the
/// attempt's real start). Returns the stories written (completed,
/// lease expiry and error cleared); a story missing from the answer was not written (its
/// version moved on, or it holds a limit and was not tried). A story others need is
/// completed here like any other: the caller marks its needs met afterwards
/// ([`crate::mark_met`], [`crate::let_go`]).
pub async fn complete_running<C>(
    db: &C,
    held: &[run_story::Model],
) -> Result<Vec<run_story::Model>, ConcurrencyError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let pairs: Vec<(Uuid, i32)> = held
        .iter()
        .filter(|s| s.limit_keys.is_none() && s.status == StoryStatus::Running.as_str())
        .map(|s| (s.id, s.version))
        .take(MAX_BATCH)
        .collect();
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    #[cfg(feature = "postgres")]
    if db.get_database_backend() == DbBackend::Postgres {
        return complete_running_postgres(db, held, &pairs).await;
    }
    let now = Utc::now();
    // Each row's start as its holder gives it (a story claimed ahead of its worker started
    // after its claim); as stored where it gives none.
    let started_at = held
        .iter()
        .filter(|s| pairs.iter().any(|(id, _)| *id == s.id))
        .fold(
            None::<sea_orm::sea_query::CaseStatement>,
            |case, s| match s.started_at {
                Some(at) => {
                    let when = Expr::col(run_story::Column::Id).eq(s.id);
                    Some(match case {
                        Some(case) => case.case(when, Expr::val(at)),
                        None => Expr::case(when, Expr::val(at)),
                    })
                }
                None => case,
            },
        )
        .map(|case| -> Expr { case.finally(Expr::col(run_story::Column::StartedAt)).into() });
    let mut update = run_story::Entity::update_many();
    if let Some(started_at) = started_at {
        update = update.col_expr(run_story::Column::StartedAt, started_at);
    }
    let update = update
        .col_expr(
            run_story::Column::Status,
            Expr::val(StoryStatus::Completed.as_str()),
        )
        .col_expr(
            run_story::Column::Version,
            Expr::col(run_story::Column::Version).add(1),
        )
        .col_expr(run_story::Column::UpdatedAt, Expr::val(now))
        .col_expr(run_story::Column::FinishedAt, Expr::val(now))
        .col_expr(
            run_story::Column::LeaseExpiresAt,
            Expr::val(None::<DateTime<Utc>>),
        )
        .col_expr(run_story::Column::Error, Expr::val(None::<String>))
        // SAFETY(fencing): each row on its own id and version: a story taken over since its
        // holder's last renewal has moved on and is not written.
        .filter(id_and_version_in(&pairs))
        .filter(run_story::Column::Status.eq(StoryStatus::Running.as_str()))
        .filter(run_story::Column::LimitKeys.is_null());
    if db.get_database_backend() != DbBackend::MySql {
        return Ok(update.exec_with_returning(db).await?);
    }
    let ids: Vec<Uuid> = pairs.iter().map(|(id, _)| *id).collect();
    let tx = db.begin().await?;
    // A current, locking read: which rows are at the version their holders know.
    let current = run_story::Entity::find()
        .filter(run_story::Column::Id.is_in(ids.clone()))
        .lock_exclusive()
        .all(&tx)
        .await?;
    let matched: Vec<(Uuid, i32)> = pairs
        .iter()
        .copied()
        .filter(|(id, v)| {
            current.iter().any(|s| {
                s.id == *id && s.version == *v && s.status == StoryStatus::Running.as_str()
            })
        })
        .collect();
    if matched.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    update.filter(id_and_version_in(&matched)).exec(&tx).await?;
    let written = run_story::Entity::find()
        .filter(run_story::Column::Id.is_in(matched.iter().map(|(id, _)| *id)))
        .all(&tx)
        .await?;
    tx.commit().await?;
    Ok(written)
}

/// PostgreSQL: [`start_ready`] as one statement whose text is the same for every batch size, so
/// that its prepared form is planned once per connection and reused (the query-builder form,
/// `(id, version) IN (SELECT ...)`, was planned on every call). The same conditions, in the
/// same statement that writes.
#[cfg(feature = "postgres")]
async fn start_ready_postgres<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    max: usize,
    owner: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<run_story::Model>, ConcurrencyError> {
    // SAFETY(claim): each row is matched on the id and version the pick read, under the row
    // lock the pick took (`FOR UPDATE SKIP LOCKED`: rows another claim holds are skipped), and
    // written only while it still meets every condition of a single start's compare-and-swap
    // (pending, no unmet need, no limit, retry delay passed, run not paused).
    const SQL: &str = "UPDATE run_story AS s SET status = 'running', version = s.version + 1, \
            updated_at = $2, started_at = $2, lease_owner = $3, lease_expires_at = $4, \
            attempts = s.attempts + 1 \
        FROM (SELECT id, version FROM run_story \
            WHERE run_id = $1 AND status = 'pending' AND unmet_needs = 0 \
                AND limit_keys IS NULL AND (not_before_ms IS NULL OR not_before_ms <= $5) \
            ORDER BY priority DESC, position ASC, id ASC LIMIT $6 \
            FOR UPDATE SKIP LOCKED) AS picked \
        WHERE s.id = picked.id AND s.version = picked.version AND s.status = 'pending' \
            AND s.unmet_needs = 0 AND s.limit_keys IS NULL \
            AND (s.not_before_ms IS NULL OR s.not_before_ms <= $5) \
            AND NOT EXISTS (SELECT 1 FROM run WHERE run.id = s.run_id AND run.paused_at IS NOT NULL) \
        RETURNING s.*";
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let statement = sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        SQL,
        [
            run_id.into(),
            now.into(),
            owner.into(),
            lease_until.into(),
            now.timestamp_millis().into(),
            limit.into(),
        ],
    );
    Ok(run_story::Entity::find()
        .from_raw_sql(statement)
        .all(db)
        .await?)
}

/// PostgreSQL: [`complete_running`] as one statement over arrays (`unnest`), whose text is the
/// same for every batch size (planned once per connection, not once per call), each row joined
/// on its own id and version. Returns only what the write decides (id, version, start); the
/// rest of each story is `held`'s with what the statement wrote.
///
/// The status is not in the statement: a row still at the version its holder wrote is as its
/// holder wrote it, running (`pairs` holds running stories only). With `status = 'running'`
/// in it, the planner read the rows through the status index (its statistics say few stories
/// run) and joined every running story of every run against the arrays, a cost that grew with
/// the batch size squared; on the join alone each row is found by primary key.
#[cfg(feature = "postgres")]
async fn complete_running_postgres<C: ConnectionTrait>(
    db: &C,
    held: &[run_story::Model],
    pairs: &[(Uuid, i32)],
) -> Result<Vec<run_story::Model>, ConcurrencyError> {
    use sea_orm::sea_query::{ArrayType, Value};
    // SAFETY(fencing): each row on its own id and version: a story taken over since its
    // holder's last renewal has moved on and is not written.
    const SQL: &str = "UPDATE run_story AS s SET status = 'completed', version = s.version + 1, \
            updated_at = $1, finished_at = $1, lease_expires_at = NULL, error = NULL, \
            started_at = CASE WHEN w.given THEN w.started_at ELSE s.started_at END \
        FROM unnest($2::uuid[], $3::int4[], $4::bool[], $5::timestamptz[]) \
            AS w(id, version, given, started_at) \
        WHERE s.id = w.id AND s.version = w.version AND s.limit_keys IS NULL \
        RETURNING s.id, s.version, s.started_at";
    // Microseconds, as PostgreSQL keeps them: the stories returned say exactly what is stored.
    let now = micros(Utc::now());
    let by_id: std::collections::HashMap<Uuid, &run_story::Model> =
        held.iter().map(|s| (s.id, s)).collect();
    let mut ids = Vec::with_capacity(pairs.len());
    let mut versions = Vec::with_capacity(pairs.len());
    let mut given = Vec::with_capacity(pairs.len());
    let mut starts = Vec::with_capacity(pairs.len());
    for (id, version) in pairs {
        // Each row's start as its holder gives it (a story claimed ahead of its worker started
        // after its claim); as stored where it gives none.
        let at = by_id.get(id).and_then(|s| s.started_at);
        ids.push(Value::Uuid(Some(*id)));
        versions.push(Value::Int(Some(*version)));
        given.push(Value::Bool(Some(at.is_some())));
        starts.push(Value::ChronoDateTimeUtc(Some(micros(at.unwrap_or(now)))));
    }
    let array = |ty, values| Value::Array(ty, Some(Box::new(values)));
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            DbBackend::Postgres,
            SQL,
            [
                now.into(),
                array(ArrayType::Uuid, ids),
                array(ArrayType::Int, versions),
                array(ArrayType::Bool, given),
                array(ArrayType::ChronoDateTimeUtc, starts),
            ],
        ))
        .await?;
    let mut written = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get_by_index(0)?;
        let version: i32 = row.try_get_by_index(1)?;
        let started_at: Option<DateTime<Utc>> = row.try_get_by_index(2)?;
        if let Some(story) = by_id.get(&id) {
            written.push(run_story::Model {
                status: StoryStatus::Completed.as_str().to_owned(),
                version,
                updated_at: now,
                finished_at: Some(now),
                lease_expires_at: None,
                error: None,
                started_at,
                ..(*story).clone()
            });
        }
    }
    Ok(written)
}

/// `t` at microsecond precision, as PostgreSQL stores it.
#[cfg(feature = "postgres")]
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    t.trunc_subsecs(6)
}

/// `(id = ? AND version = ?) OR ...` over `pairs`.
fn id_and_version_in(pairs: &[(Uuid, i32)]) -> Condition {
    pairs.iter().fold(Condition::any(), |any, (id, version)| {
        any.add(
            Condition::all()
                .add(run_story::Column::Id.eq(*id))
                .add(run_story::Column::Version.eq(*version)),
        )
    })
}

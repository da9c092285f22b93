//! Recent runs at a glance: what `run-engine runs` lists, so a run whose id was lost can be
//! found without SQL.

use crate::error::EngineError;
use crate::queries::StoryCounts;
use chrono::{DateTime, SecondsFormat, Utc};
use entity::{run, run_story};
use run_domain::RunStatus;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use uuid::Uuid;

/// The most runs one listing returns.
pub const MAX_RUNS_LISTED: u64 = 10_000;

/// One run in a listing: its status, its progress, when it started and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    /// Its id.
    pub id: Uuid,
    /// Its key (the plan's name).
    pub key: String,
    /// Its title.
    pub title: String,
    /// Its status.
    pub status: String,
    /// Paused: nothing new starts until it is resumed (only while it is not finished).
    pub paused: bool,
    /// Its stories by status.
    pub counts: StoryCounts,
    /// Finished stories, percent.
    pub progress_percent: u64,
    /// Created at (RFC 3339).
    pub created_at: String,
    /// Started at (RFC 3339), once a story started.
    pub started_at: Option<String>,
    /// Finished at (RFC 3339).
    pub finished_at: Option<String>,
    /// From its start to its end, or to now while it runs, in milliseconds.
    pub duration_ms: Option<i64>,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The most recently created runs, newest first, at most `limit` of them (capped at
/// [`MAX_RUNS_LISTED`]), only those in `status` when given; two queries whatever the number.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), run_engine::EngineError> {
/// use run_domain::RunStatus;
/// for run in run_engine::list_runs(db, Some(RunStatus::Failed), 20).await? {
///     println!("{} {} {}%", run.id, run.status, run.progress_percent);
/// }
/// # Ok(()) }
/// ```
pub async fn list_runs<C: ConnectionTrait>(
    db: &C,
    status: Option<RunStatus>,
    limit: u64,
) -> Result<Vec<RunSummary>, EngineError> {
    use run_domain::Lifecycle;
    let mut query = run::Entity::find()
        .order_by_desc(run::Column::CreatedAt)
        .order_by_desc(run::Column::Id)
        .limit(limit.min(MAX_RUNS_LISTED));
    if let Some(status) = status {
        query = query.filter(run::Column::Status.eq(status.as_str()));
    }
    let runs = query.all(db).await?;
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Uuid, String, i64)> = run_story::Entity::find()
        .select_only()
        .column(run_story::Column::RunId)
        .column(run_story::Column::Status)
        .column_as(
            sea_orm::sea_query::ExprTrait::count(Expr::col(run_story::Column::Id)),
            "n",
        )
        .filter(run_story::Column::RunId.is_in(runs.iter().map(|r| r.id)))
        .group_by(run_story::Column::RunId)
        .group_by(run_story::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let mut counts: HashMap<Uuid, StoryCounts> = HashMap::new();
    for (run_id, status, n) in rows {
        counts
            .entry(run_id)
            .or_default()
            .add(&status, u64::try_from(n).unwrap_or(0));
    }
    let now = Utc::now();
    Ok(runs
        .into_iter()
        .map(|r| {
            let counts = counts.remove(&r.id).unwrap_or_default();
            let finished = RunStatus::parse(&r.status).is_some_and(|s| s.is_terminal());
            let duration_ms = r.started_at.map(|start| {
                let end = r.finished_at.unwrap_or(now);
                (end - start).num_milliseconds().max(0)
            });
            RunSummary {
                id: r.id,
                key: r.key,
                title: r.title,
                status: r.status,
                paused: r.paused_at.is_some() && !finished,
                progress_percent: counts.percent(),
                counts,
                created_at: ts(r.created_at),
                started_at: r.started_at.map(ts),
                finished_at: r.finished_at.map(ts),
                duration_ms,
            }
        })
        .collect())
}

/// How long `ms` milliseconds are, for people: `850ms`, `12.4s`, `3m 05s`, `2h 10m`.
pub fn describe_ms(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}.{}s", ms / 1000, (ms % 1000) / 100),
        60_000..3_600_000 => format!("{}m {:02}s", ms / 60_000, (ms % 60_000) / 1000),
        _ => format!("{}h {:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

/// The listing as a table for people, one run a line, with a header; a line saying so when
/// there is none.
///
/// ```text
/// ID                                    STATUS     PROGRESS       STARTED               DURATION  KEY
/// 0b6a5c1e-…                            failed     11/12 (91%)    2026-12-06T20:01:10Z  4.2s      example
/// ```
pub fn render_runs(runs: &[RunSummary]) -> String {
    if runs.is_empty() {
        return "no runs (create one with `run-engine create PLAN` or `run-engine run PLAN`)\n"
            .to_owned();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36}  {:<16}  {:<13}  {:<20}  {:<8}  KEY",
        "ID", "STATUS", "PROGRESS", "STARTED", "DURATION"
    );
    for r in runs {
        let status = if r.paused {
            format!("{} (paused)", r.status)
        } else {
            r.status.clone()
        };
        let progress = format!(
            "{}/{} ({}%)",
            r.counts.finished(),
            r.counts.total(),
            r.progress_percent
        );
        let _ = writeln!(
            out,
            "{:<36}  {:<16}  {:<13}  {:<20}  {:<8}  {}",
            r.id,
            status,
            progress,
            r.started_at.as_deref().unwrap_or("-"),
            r.duration_ms.map_or_else(|| "-".to_owned(), describe_ms),
            crate::terminal::escape_controls(&r.key)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe_ms;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(describe_ms(850), "850ms");
        assert_eq!(describe_ms(12_450), "12.4s");
        assert_eq!(describe_ms(185_000), "3m 05s");
        assert_eq!(describe_ms(7_800_000), "2h 10m");
        assert_eq!(describe_ms(-5), "0ms");
    }
}

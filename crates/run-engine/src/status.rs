//! What a run looks like now: story counts, progress, and the run/epic/story tree that
//! `run-engine status` prints (as text or JSON).

use crate::error::EngineError;
use crate::queries::StoryCounts;
use chrono::{DateTime, SecondsFormat, Utc};
use entity::{run, run_epic, run_story};
use run_domain::{Lifecycle, StoryStatus};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use uuid::Uuid;

fn ts(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// A run, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunView {
    /// Its id.
    pub id: Uuid,
    /// Its key (the plan's name).
    pub key: String,
    /// Its title.
    pub title: String,
    /// Its status.
    pub status: String,
    /// Its version.
    pub version: i32,
    /// Created at (RFC 3339).
    pub created_at: Option<String>,
    /// Started at (RFC 3339).
    pub started_at: Option<String>,
    /// Finished at (RFC 3339).
    pub finished_at: Option<String>,
    /// Its error text.
    pub error: Option<String>,
    /// Its stories by status.
    pub counts: StoryCounts,
    /// Finished stories, percent.
    pub progress_percent: u64,
}

/// An epic, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpicView {
    /// Its key.
    pub key: String,
    /// Its title.
    pub title: String,
    /// Its status.
    pub status: String,
    /// Started at (RFC 3339).
    pub started_at: Option<String>,
    /// Finished at (RFC 3339).
    pub finished_at: Option<String>,
    /// Its error text.
    pub error: Option<String>,
    /// Its stories by status.
    pub counts: StoryCounts,
    /// Its stories, in position order.
    pub stories: Vec<StoryView>,
}

/// A story, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoryView {
    /// Its key.
    pub key: String,
    /// Its title.
    pub title: String,
    /// Its status.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Its command.
    pub command: Option<String>,
    /// The worker holding it, or the one that recorded its result.
    pub lease_owner: Option<String>,
    /// When the lease runs out (RFC 3339), while running.
    pub lease_expires_at: Option<String>,
    /// Started at (RFC 3339).
    pub started_at: Option<String>,
    /// Finished at (RFC 3339).
    pub finished_at: Option<String>,
    /// Its error text (of the last failed attempt).
    pub error: Option<String>,
}

/// A run with its epics and their stories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunTree {
    /// The run.
    pub run: RunView,
    /// Its epics, in position order.
    pub epics: Vec<EpicView>,
}

/// Reads a run with its epics and stories (three queries).
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection, run_id: uuid::Uuid) -> Result<(), run_engine::EngineError> {
/// let tree = run_engine::load_run_tree(db, run_id).await?;
/// print!("{}", tree.render());
/// # Ok(()) }
/// ```
pub async fn load_run_tree<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
) -> Result<RunTree, EngineError> {
    let run = run::Entity::find_by_id(run_id)
        .one(db)
        .await?
        .ok_or(EngineError::RunNotFound(run_id))?;
    let epics = run_epic::Entity::find()
        .filter(run_epic::Column::RunId.eq(run_id))
        .order_by_asc(run_epic::Column::Position)
        .all(db)
        .await?;
    let stories = run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .order_by_asc(run_story::Column::Position)
        .all(db)
        .await?;
    let mut by_epic: HashMap<Uuid, Vec<run_story::Model>> = HashMap::new();
    for s in stories {
        by_epic.entry(s.epic_id).or_default().push(s);
    }
    let mut all = StoryCounts::default();
    let epics: Vec<EpicView> = epics
        .into_iter()
        .map(|e| {
            let stories = by_epic.remove(&e.id).unwrap_or_default();
            let counts = StoryCounts::of_stories(&stories);
            all.pending += counts.pending;
            all.running += counts.running;
            all.completed += counts.completed;
            all.failed += counts.failed;
            all.cancelled += counts.cancelled;
            all.unknown += counts.unknown;
            EpicView {
                key: e.key,
                title: e.title,
                status: e.status,
                started_at: ts(e.started_at),
                finished_at: ts(e.finished_at),
                error: e.error,
                counts,
                stories: stories
                    .into_iter()
                    .map(|s| StoryView {
                        key: s.key,
                        title: s.title,
                        status: s.status,
                        attempts: s.attempts,
                        max_attempts: s.max_attempts,
                        command: s.command,
                        lease_owner: s.lease_owner,
                        lease_expires_at: ts(s.lease_expires_at),
                        started_at: ts(s.started_at),
                        finished_at: ts(s.finished_at),
                        error: s.error,
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(RunTree {
        run: RunView {
            id: run.id,
            key: run.key,
            title: run.title,
            status: run.status,
            version: run.version,
            created_at: ts(Some(run.created_at)),
            started_at: ts(run.started_at),
            finished_at: ts(run.finished_at),
            error: run.error,
            counts: all,
            progress_percent: all.percent(),
        },
        epics,
    })
}

fn duration_between(start: &Option<String>, end: &Option<String>) -> Option<String> {
    let start: DateTime<Utc> = start.as_deref()?.parse().ok()?;
    let end: DateTime<Utc> = end.as_deref()?.parse().ok()?;
    let ms = (end - start).num_milliseconds().max(0);
    Some(format!("{}.{:02}s", ms / 1000, (ms % 1000) / 10))
}

fn counts_line(c: &StoryCounts) -> String {
    let mut parts = Vec::new();
    for (n, name) in [
        (c.completed, "completed"),
        (c.failed, "failed"),
        (c.cancelled, "cancelled"),
        (c.running, "running"),
        (c.pending, "pending"),
        (c.unknown, "unknown"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {name}"));
        }
    }
    if parts.is_empty() {
        "no stories".to_owned()
    } else {
        parts.join(", ")
    }
}

impl RunTree {
    /// The tree as text, one line per run, epic and story.
    ///
    /// ```text
    /// run 0b6a… example "Example plan": running, 5/12 finished (41%): 5 completed, 2 running, 5 pending
    /// ├─ build "Build": completed, 4/4 (4 completed)
    /// │  ├─ compile: completed (attempt 1/2, 0.21s)
    /// ```
    pub fn render(&self) -> String {
        let r = &self.run;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "run {} {} {:?}: {}, {}/{} finished ({}%): {}",
            r.id,
            r.key,
            r.title,
            r.status,
            r.counts.finished(),
            r.counts.total(),
            r.progress_percent,
            counts_line(&r.counts)
        );
        if let Some(error) = &r.error {
            let _ = writeln!(out, "   error: {error}");
        }
        for (i, e) in self.epics.iter().enumerate() {
            let last_epic = i + 1 == self.epics.len();
            let (branch, stem) = if last_epic {
                ("└─", "   ")
            } else {
                ("├─", "│  ")
            };
            let _ = writeln!(
                out,
                "{branch} {} {:?}: {}, {}/{} ({})",
                e.key,
                e.title,
                e.status,
                e.counts.finished(),
                e.counts.total(),
                counts_line(&e.counts)
            );
            for (j, s) in e.stories.iter().enumerate() {
                let twig = if j + 1 == e.stories.len() {
                    "└─"
                } else {
                    "├─"
                };
                let mut details = vec![format!("attempt {}/{}", s.attempts, s.max_attempts)];
                if let Some(d) = duration_between(&s.started_at, &s.finished_at) {
                    details.push(d);
                }
                if s.status == StoryStatus::Running.as_str()
                    && let Some(owner) = &s.lease_owner
                {
                    details.push(format!("on {owner}"));
                }
                let _ = writeln!(
                    out,
                    "{stem}{twig} {}: {} ({})",
                    s.key,
                    s.status,
                    details.join(", ")
                );
                if let Some(error) = &s.error {
                    let _ = writeln!(out, "{stem}   error: {error}");
                }
            }
        }
        out
    }
}

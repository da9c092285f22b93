//! What a run looks like now: story counts, progress, and the run/epic/story tree that
//! `run-engine status` prints (as text or JSON).

use crate::error::EngineError;
use crate::queries::StoryCounts;
use chrono::{DateTime, SecondsFormat, Utc};
use entity::{run, run_epic, run_epic_need, run_story, run_story_need};
use run_domain::{EpicStatus, Lifecycle, StoryStatus};
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
    /// Paused since (RFC 3339): nothing new starts until it is resumed.
    pub paused_at: Option<String>,
    /// Its stories by status.
    pub counts: StoryCounts,
    /// Finished stories, percent.
    pub progress_percent: u64,
    /// The limits its stories hold, with their use now (across every run).
    pub limits: Vec<LimitView>,
}

/// A concurrency limit, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitView {
    /// Its name.
    pub name: String,
    /// How many stories holding it may run at once.
    pub capacity: i32,
    /// How many running stories hold it now.
    pub in_use: i32,
}

impl From<run_domain::LimitUse> for LimitView {
    fn from(l: run_domain::LimitUse) -> LimitView {
        LimitView {
            name: l.name,
            capacity: l.capacity,
            in_use: l.in_use,
        }
    }
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
    /// The epics it needs (every story of each completes before any of its own starts).
    pub needs: Vec<String>,
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
    /// Its error text (of the last failed attempt), or why it was skipped.
    pub error: Option<String>,
    /// The stories it needs directly, as `epic.story` (its epic's needs are on the epic).
    pub needs: Vec<String>,
    /// While pending: the needs that have not completed yet, stories as `epic.story` and
    /// epics (its epic's needs) by key.
    pub waiting_on: Vec<String>,
    /// How long one attempt may run (`1h 30m`), if bounded.
    pub timeout: Option<String>,
    /// While pending after a failed attempt: when its retry delay passes (RFC 3339).
    pub retry_at: Option<String>,
    /// Higher is claimed first among ready stories.
    pub priority: i32,
    /// The limits it holds while it runs.
    pub limits: Vec<String>,
}

/// A run with its epics and their stories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunTree {
    /// The run.
    pub run: RunView,
    /// Its epics, in position order.
    pub epics: Vec<EpicView>,
}

/// Reads a run with its epics, stories, needs and limits (five or six queries).
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
    let story_needs = run_story_need::Entity::find()
        .filter(run_story_need::Column::RunId.eq(run_id))
        .all(db)
        .await?;
    let epic_needs = run_epic_need::Entity::find()
        .filter(run_epic_need::Column::RunId.eq(run_id))
        .all(db)
        .await?;
    let mut limit_names: Vec<String> = stories
        .iter()
        .flat_map(|s| run_domain::limit_keys_of(s.limit_keys.as_deref()))
        .collect();
    limit_names.sort_unstable();
    limit_names.dedup();
    let limits: Vec<LimitView> = run_domain::limits_named(db, limit_names)
        .await?
        .into_iter()
        .map(LimitView::from)
        .collect();
    let now_ms = run_domain::now_ms();
    let epic_by_id: HashMap<Uuid, &run_epic::Model> = epics.iter().map(|e| (e.id, e)).collect();
    let story_by_id: HashMap<Uuid, &run_story::Model> = stories.iter().map(|s| (s.id, s)).collect();
    let story_name = |id: Uuid| {
        story_by_id.get(&id).map(|s| {
            let epic = epic_by_id.get(&s.epic_id).map_or("?", |e| e.key.as_str());
            (
                format!("{epic}.{}", s.key),
                s.status == StoryStatus::Completed.as_str(),
            )
        })
    };
    let mut needs_of_story: HashMap<Uuid, Vec<(String, bool)>> = HashMap::new();
    for n in &story_needs {
        if let Some(named) = story_name(n.needs_story_id) {
            needs_of_story.entry(n.story_id).or_default().push(named);
        }
    }
    let mut needs_of_epic: HashMap<Uuid, Vec<(String, bool)>> = HashMap::new();
    for n in &epic_needs {
        if let Some(e) = epic_by_id.get(&n.needs_epic_id) {
            let done = e.status == EpicStatus::Completed.as_str();
            needs_of_epic
                .entry(n.epic_id)
                .or_default()
                .push((e.key.clone(), done));
        }
    }
    for list in needs_of_story
        .values_mut()
        .chain(needs_of_epic.values_mut())
    {
        list.sort();
    }
    let mut by_epic: HashMap<Uuid, Vec<run_story::Model>> = HashMap::new();
    for s in stories.iter() {
        by_epic.entry(s.epic_id).or_default().push(s.clone());
    }
    let mut all = StoryCounts::default();
    let epics: Vec<EpicView> = epics
        .iter()
        .map(|e| {
            let stories = by_epic.remove(&e.id).unwrap_or_default();
            let counts = StoryCounts::of_stories(&stories);
            all.pending += counts.pending;
            all.running += counts.running;
            all.completed += counts.completed;
            all.failed += counts.failed;
            all.cancelled += counts.cancelled;
            all.skipped += counts.skipped;
            all.unknown += counts.unknown;
            let epic_needs = needs_of_epic.get(&e.id).cloned().unwrap_or_default();
            EpicView {
                key: e.key.clone(),
                title: e.title.clone(),
                status: e.status.clone(),
                started_at: ts(e.started_at),
                finished_at: ts(e.finished_at),
                error: e.error.clone(),
                counts,
                needs: epic_needs.iter().map(|(k, _)| k.clone()).collect(),
                stories: stories
                    .into_iter()
                    .map(|s| {
                        let own = needs_of_story.get(&s.id).cloned().unwrap_or_default();
                        let waiting_on = if s.status == StoryStatus::Pending.as_str() {
                            own.iter()
                                .chain(epic_needs.iter())
                                .filter(|(_, done)| !done)
                                .map(|(name, _)| name.clone())
                                .collect()
                        } else {
                            Vec::new()
                        };
                        let retry_at = s
                            .not_before_ms
                            .filter(|&t| t > now_ms && s.status == StoryStatus::Pending.as_str())
                            .and_then(DateTime::<Utc>::from_timestamp_millis)
                            .and_then(|t| ts(Some(t)));
                        StoryView {
                            retry_at,
                            priority: s.priority,
                            limits: run_domain::limit_keys_of(s.limit_keys.as_deref()),
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
                            needs: own.into_iter().map(|(name, _)| name).collect(),
                            waiting_on,
                            timeout: s
                                .timeout_ms
                                .and_then(|ms| u64::try_from(ms).ok())
                                .map(|ms| {
                                    crate::plan::duration::describe(
                                        std::time::Duration::from_millis(ms),
                                    )
                                }),
                        }
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
            paused_at: ts(run.paused_at),
            counts: all,
            progress_percent: all.percent(),
            limits,
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

/// How long ago a lease that has run out did (`40s`), or `None` while it holds.
fn expired_ago(expires_at: Option<&str>) -> Option<String> {
    let at: DateTime<Utc> = expires_at?.parse().ok()?;
    let ago = (Utc::now() - at).to_std().ok()?;
    Some(crate::plan::duration::describe(
        std::time::Duration::from_secs(ago.as_secs()),
    ))
}

fn is_finished(status: &str) -> bool {
    run_domain::RunStatus::parse(status).is_some_and(|s| s.is_terminal())
}

fn counts_line(c: &StoryCounts) -> String {
    let mut parts = Vec::new();
    for (n, name) in [
        (c.completed, "completed"),
        (c.failed, "failed"),
        (c.cancelled, "cancelled"),
        (c.skipped, "skipped"),
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
        let paused = if r.paused_at.is_some() && !is_finished(&r.status) {
            " (paused)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "run {} {} {:?}: {}{paused}, {}/{} finished ({}%): {}",
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
        if !r.limits.is_empty() {
            let uses: Vec<String> = r
                .limits
                .iter()
                .map(|l| format!("{} {}/{}", l.name, l.in_use, l.capacity))
                .collect();
            let _ = writeln!(out, "   limits in use: {}", uses.join(", "));
        }
        for (i, e) in self.epics.iter().enumerate() {
            let last_epic = i + 1 == self.epics.len();
            let (branch, stem) = if last_epic {
                ("└─", "   ")
            } else {
                ("├─", "│  ")
            };
            let needs = if e.needs.is_empty() {
                String::new()
            } else {
                format!(", needs {}", e.needs.join(", "))
            };
            let _ = writeln!(
                out,
                "{branch} {} {:?}: {}, {}/{} ({}){needs}",
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
                    // A dead or stalled executor: its lease ran out, nobody took it over yet.
                    if let Some(ago) = expired_ago(s.lease_expires_at.as_deref()) {
                        details.push(format!("lease expired {ago} ago"));
                    }
                }
                if let Some(timeout) = &s.timeout
                    && s.status == StoryStatus::Running.as_str()
                {
                    details.push(format!("timeout {timeout}"));
                }
                if !s.waiting_on.is_empty() {
                    details.push(format!("waiting on {}", s.waiting_on.join(", ")));
                }
                if let Some(at) = &s.retry_at {
                    details.push(format!("retry at {at}"));
                }
                if s.priority != 0 {
                    details.push(format!("priority {}", s.priority));
                }
                if !s.limits.is_empty() {
                    details.push(format!("limits {}", s.limits.join(", ")));
                }
                let _ = writeln!(
                    out,
                    "{stem}{twig} {}: {} ({})",
                    s.key,
                    s.status,
                    details.join(", ")
                );
                if let Some(error) = &s.error {
                    let label = if s.status == StoryStatus::Skipped.as_str() {
                        "skipped"
                    } else {
                        "error"
                    };
                    // Under a story that is not its epic's last, the epic's line goes on.
                    let rail = if j + 1 == e.stories.len() {
                        "   "
                    } else {
                        "│  "
                    };
                    let _ = writeln!(out, "{stem}{rail}{label}: {error}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn story(key: &str, status: &str, error: Option<&str>) -> StoryView {
        StoryView {
            key: key.into(),
            title: key.into(),
            status: status.into(),
            attempts: 1,
            max_attempts: 1,
            command: None,
            lease_owner: None,
            lease_expires_at: None,
            started_at: None,
            finished_at: None,
            error: error.map(str::to_owned),
            needs: Vec::new(),
            waiting_on: Vec::new(),
            timeout: None,
            retry_at: None,
            priority: 0,
            limits: Vec::new(),
        }
    }

    fn tree(stories: Vec<StoryView>) -> RunTree {
        let counts = StoryCounts::default();
        RunTree {
            run: RunView {
                id: Uuid::nil(),
                key: "r".into(),
                title: "r".into(),
                status: "running".into(),
                version: 1,
                created_at: None,
                started_at: None,
                finished_at: None,
                error: None,
                paused_at: None,
                counts,
                progress_percent: 0,
                limits: Vec::new(),
            },
            epics: vec![
                EpicView {
                    key: "e".into(),
                    title: "e".into(),
                    status: "running".into(),
                    started_at: None,
                    finished_at: None,
                    error: None,
                    counts,
                    needs: Vec::new(),
                    stories,
                },
                EpicView {
                    key: "f".into(),
                    title: "f".into(),
                    status: "pending".into(),
                    started_at: None,
                    finished_at: None,
                    error: None,
                    counts,
                    needs: Vec::new(),
                    stories: vec![story("z", "pending", None)],
                },
            ],
        }
    }

    #[test]
    fn an_error_under_a_story_that_is_not_the_last_keeps_the_rail() {
        let text = tree(vec![
            story("a", "failed", Some("boom")),
            story("b", "failed", Some("bang")),
        ])
        .render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "│  ├─ a: failed (attempt 1/1)", "{text}");
        assert_eq!(lines[3], "│  │  error: boom", "{text}");
        assert_eq!(lines[4], "│  └─ b: failed (attempt 1/1)", "{text}");
        assert_eq!(lines[5], "│     error: bang", "{text}");
    }

    #[test]
    fn a_running_story_whose_lease_ran_out_says_so() {
        let mut dead = story("a", "running", None);
        dead.lease_owner = Some("host-1".into());
        dead.lease_expires_at = ts(Some(Utc::now() - chrono::Duration::seconds(40)));
        let mut alive = story("b", "running", None);
        alive.lease_owner = Some("host-2".into());
        alive.lease_expires_at = ts(Some(Utc::now() + chrono::Duration::seconds(40)));
        let text = tree(vec![dead, alive]).render();
        assert!(
            text.contains("a: running (attempt 1/1, on host-1, lease expired 40s ago)"),
            "{text}"
        );
        assert!(
            text.contains("b: running (attempt 1/1, on host-2)"),
            "{text}"
        );
    }
}

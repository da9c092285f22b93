//! Live updates with a bounded cost to the database.
//!
//! - **Run pages**: one poller per watched run ([`RunWatchers`]), shared by every page that
//!   shows it. While at least one page watches, it reads the run's tree
//!   ([`crate::load_run_tree`], five or six queries) every [`RUN_POLL`](super::RUN_POLL), renders
//!   the run's section once, and hands it to every page through a `watch` channel, only when
//!   something changed; it stops at the first tick with no page left. So 50 pages of one run
//!   cost what one does: at most 12 queries a second per watched run.
//! - **Log pages**: each follows the log from its own cursor ([`log_lines`]), one query of at
//!   most [`LOG_PAGE`](super::LOG_PAGE) lines every [`LOG_POLL`](super::LOG_POLL) (at once again
//!   while pages come full): at most 2 queries a second per open log page when idle, whatever
//!   the log's length, and never more than one page of lines in memory per follower.

use super::{LOG_PAGE, LOG_POLL, RUN_POLL, pages};
use crate::error::EngineError;
use crate::status::{RunTree, load_run_tree};
use run_domain::{LogCursor, read_run_log_after};
use sea_orm::DatabaseConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;
use uuid::Uuid;

/// A run as shown now: its tree and the HTML of its section.
#[derive(Debug)]
pub struct Snapshot {
    /// The view model.
    pub tree: RunTree,
    /// The run's section, rendered from `tree`.
    pub html: String,
}

/// What the server has asked of the database, for `/api/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads of a run's tree (each five or six queries).
    pub tree_reads: AtomicU64,
    /// Reads of a page of log lines (one query each).
    pub log_reads: AtomicU64,
}

/// The counters as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatsView {
    /// Reads of a run's tree (each five or six queries) since the server started.
    pub tree_reads: u64,
    /// Reads of a page of log lines (one query each) since the server started.
    pub log_reads: u64,
    /// Runs watched now (one poller each).
    pub watched_runs: u64,
}

/// The pollers of watched runs, one per run.
pub struct RunWatchers {
    db: DatabaseConnection,
    csrf: String,
    runs: Mutex<HashMap<Uuid, Arc<watch::Sender<Arc<Snapshot>>>>>,
    stats: Arc<Stats>,
}

impl RunWatchers {
    /// No run watched yet; sections are rendered with forms carrying `csrf`; reads are counted
    /// in `stats`.
    pub fn new(db: DatabaseConnection, csrf: String, stats: Arc<Stats>) -> RunWatchers {
        RunWatchers {
            db,
            csrf,
            runs: Mutex::new(HashMap::new()),
            stats,
        }
    }

    /// The counters now.
    pub fn stats(&self) -> StatsView {
        StatsView {
            tree_reads: self.stats.tree_reads.load(Ordering::Relaxed),
            log_reads: self.stats.log_reads.load(Ordering::Relaxed),
            watched_runs: self.lock().len() as u64,
        }
    }

    fn snapshot(&self, tree: RunTree) -> Arc<Snapshot> {
        let html = pages::run_section(&tree, &self.csrf).into_string();
        Arc::new(Snapshot { tree, html })
    }

    /// The run's snapshots: the latest now, then each change. Starts the run's poller if none
    /// runs. With `fresh`, the tree is read now (a page opened just after an action shows it)
    /// and handed to every page that watches the run; otherwise a watched run costs no query.
    /// A run that does not exist is an error.
    pub async fn subscribe(
        self: &Arc<Self>,
        run_id: Uuid,
        fresh: bool,
    ) -> Result<watch::Receiver<Arc<Snapshot>>, EngineError> {
        if !fresh && let Some(tx) = self.lock().get(&run_id) {
            return Ok(tx.subscribe());
        }
        self.stats.tree_reads.fetch_add(1, Ordering::Relaxed);
        let tree = load_run_tree(&self.db, run_id).await?;
        let mut runs = self.lock();
        if let Some(tx) = runs.get(&run_id) {
            // Watched already (or since): hand the fresh read to every page.
            if tree != tx.borrow().tree {
                tx.send_replace(self.snapshot(tree));
            }
            return Ok(tx.subscribe());
        }
        let (tx, rx) = watch::channel(self.snapshot(tree));
        let tx = Arc::new(tx);
        runs.insert(run_id, tx.clone());
        drop(runs);
        let this = self.clone();
        tokio::spawn(async move { this.poll(run_id, tx).await });
        Ok(rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<watch::Sender<Arc<Snapshot>>>>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn poll(self: Arc<Self>, run_id: Uuid, tx: Arc<watch::Sender<Arc<Snapshot>>>) {
        let mut interval = tokio::time::interval(RUN_POLL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            {
                // Under the lock, so that no page subscribes between the look and the removal.
                let mut runs = self.lock();
                if tx.receiver_count() == 0 {
                    forget(&mut runs, run_id, &tx);
                    tracing::debug!(%run_id, "no page watches the run any more");
                    return;
                }
            }
            self.stats.tree_reads.fetch_add(1, Ordering::Relaxed);
            match load_run_tree(&self.db, run_id).await {
                Ok(tree) => {
                    if tree != tx.borrow().tree {
                        let snapshot = self.snapshot(tree);
                        tx.send_replace(snapshot);
                    }
                }
                Err(EngineError::RunNotFound(_)) => {
                    // Pruned: the pages' streams end with the poller.
                    forget(&mut self.lock(), run_id, &tx);
                    return;
                }
                Err(e) => tracing::warn!(%run_id, error = %e, "reading the watched run failed"),
            }
        }
    }
}

/// Removes the run's entry if it is still `tx` (and not a newer poller's).
fn forget(
    runs: &mut HashMap<Uuid, Arc<watch::Sender<Arc<Snapshot>>>>,
    run_id: Uuid,
    tx: &Arc<watch::Sender<Arc<Snapshot>>>,
) {
    if runs.get(&run_id).is_some_and(|t| Arc::ptr_eq(t, tx)) {
        runs.remove(&run_id);
    }
}

/// A story filter: `epic.story`, matched against the `[epic/story] ` (or `[epic.story] `) prefix
/// of log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoryFilter(String);

impl StoryFilter {
    /// A filter for `name` (`epic.story` or `epic/story`); `None` when empty.
    pub fn new(name: &str) -> Option<StoryFilter> {
        let name = name.trim();
        (!name.is_empty()).then(|| StoryFilter(name.replace('/', ".")))
    }

    /// Its name, as `epic.story`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Whether `message` is a line of this story.
    pub fn matches(&self, message: &str) -> bool {
        message
            .strip_prefix('[')
            .and_then(|rest| rest.split_once(']'))
            .is_some_and(|(prefix, _)| {
                prefix.len() == self.0.len()
                    && prefix
                        .chars()
                        .zip(self.0.chars())
                        .all(|(a, b)| a == b || (a == '/' && b == '.'))
            })
    }
}

/// One log line to show.
#[derive(Debug, Clone)]
pub struct Line {
    /// Its position in the log.
    pub seq: i64,
    /// When it was logged (RFC 3339, milliseconds).
    pub at: String,
    /// The message as stored.
    pub message: String,
}

impl Line {
    fn from_entry(e: run_domain::LogEntry) -> Line {
        Line {
            seq: e.seq,
            at: e
                .logged_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            message: e.message,
        }
    }
}

/// How far back the filtered tail of a log looks for its story's lines.
pub const TAIL_SCAN: u64 = 20_000;

/// The last at most `limit` lines (of the story, when filtered) with `seq <= before` (the end
/// when `None`), in order, and the cursor to follow from (the log's last `seq` when `before` is
/// `None`). Reads pages of [`LOG_PAGE`] lines backwards: unfiltered one query, filtered at most
/// [`TAIL_SCAN`] lines' worth.
pub async fn log_tail(
    db: &DatabaseConnection,
    run_id: Uuid,
    before: Option<i64>,
    filter: Option<&StoryFilter>,
    limit: u64,
) -> Result<(Vec<Line>, LogCursor), EngineError> {
    use entity::run_log;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    let mut upper = before;
    let mut found: Vec<Line> = Vec::new();
    let mut cursor: Option<i64> = None;
    let mut scanned = 0u64;
    loop {
        let mut query = run_log::Entity::find()
            .filter(run_log::Column::RunId.eq(run_id))
            .order_by_desc(run_log::Column::Seq)
            .limit(LOG_PAGE);
        if let Some(upper) = upper {
            query = query.filter(run_log::Column::Seq.lte(upper));
        }
        let rows = query.all(db).await?;
        if cursor.is_none() {
            cursor = Some(rows.first().map_or(0, |r| r.seq));
        }
        let full = rows.len() as u64 == LOG_PAGE;
        scanned += rows.len() as u64;
        upper = rows.last().map(|r| r.seq - 1);
        for r in rows {
            let message = String::from_utf8_lossy(&r.message).into_owned();
            if filter.is_none_or(|f| f.matches(&message)) {
                found.push(Line {
                    seq: r.seq,
                    at: r
                        .logged_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    message,
                });
                if found.len() as u64 >= limit {
                    break;
                }
            }
        }
        if found.len() as u64 >= limit || !full || filter.is_none() || scanned >= TAIL_SCAN {
            break;
        }
    }
    if found.is_empty() && cursor == Some(0) {
        // An empty log, or no such run.
        if entity::run::Entity::find_by_id(run_id)
            .one(db)
            .await?
            .is_none()
        {
            return Err(EngineError::RunNotFound(run_id));
        }
    }
    found.reverse();
    let cursor = match before {
        None => cursor.unwrap_or(0),
        Some(_) => found.last().map_or(0, |l| l.seq),
    };
    Ok((found, LogCursor(cursor)))
}

/// The lines after `cursor` (of the story, when filtered) as they come: each item is a batch of
/// lines and the cursor after it (which may have moved past lines the filter dropped). Waits
/// [`LOG_POLL`] between reads that found nothing new.
pub fn log_lines(
    db: DatabaseConnection,
    run_id: Uuid,
    cursor: LogCursor,
    filter: Option<StoryFilter>,
    stats: Arc<Stats>,
) -> impl futures_util::Stream<Item = (Vec<Line>, LogCursor)> + Send + 'static {
    futures_util::stream::unfold(
        (db, cursor, filter, false, stats),
        move |(db, mut cursor, filter, mut wait, stats)| async move {
            loop {
                if wait {
                    tokio::time::sleep(LOG_POLL).await;
                }
                stats.log_reads.fetch_add(1, Ordering::Relaxed);
                let page = match read_run_log_after(&db, run_id, cursor, LOG_PAGE).await {
                    Ok(page) => page,
                    Err(run_domain::LogError::RunNotFound { .. }) => return None,
                    Err(e) => {
                        tracing::warn!(%run_id, error = %e, "reading the log failed");
                        wait = true;
                        continue;
                    }
                };
                let full = page.entries.len() as u64 == LOG_PAGE;
                let moved = page.next != cursor;
                cursor = page.next;
                wait = !full;
                let lines: Vec<Line> = page
                    .entries
                    .into_iter()
                    .filter(|e| filter.as_ref().is_none_or(|f| f.matches(&e.message)))
                    .map(Line::from_entry)
                    .collect();
                if !lines.is_empty() {
                    return Some(((lines, cursor), (db, cursor, filter, wait, stats)));
                }
                if moved && !full {
                    // Lines the filter dropped: say where the cursor is, for a reconnect.
                    return Some(((Vec::new(), cursor), (db, cursor, filter, wait, stats)));
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::StoryFilter;

    #[test]
    fn a_filter_matches_its_story_only() {
        let f = StoryFilter::new("build.compile").expect("filter");
        assert!(f.matches("[build/compile] compiling"));
        assert!(f.matches("[build.compile] cancelled (run-engine cancel --story)"));
        assert!(!f.matches("[build/compiler] x"));
        assert!(!f.matches("[build/comp] x"));
        assert!(!f.matches("run example completed"));
        assert!(StoryFilter::new("  ").is_none());
    }
}

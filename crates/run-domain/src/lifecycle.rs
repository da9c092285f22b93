//! Status lifecycles of runs, epics and stories, and the one call that changes a status.
//!
//! Each lifecycle is an enum with one table of legal transitions. [`transition`] checks the
//! table before it touches the database, then applies the change by compare-and-swap, so an
//! illegal change never reaches the database and a stale one never overwrites a newer state.

use crate::error::{ConcurrencyError, TransitionError};
use crate::versioned::{Changes, Versioned};
use chrono::Utc;
use sea_orm::{ConnectionTrait, TransactionTrait};
use std::fmt;
use std::str::FromStr;

/// A status enum with a table of legal transitions.
pub trait Lifecycle:
    Copy + Eq + fmt::Debug + fmt::Display + FromStr + Send + Sync + 'static
{
    /// Every status.
    const ALL: &'static [Self];
    /// Every legal `(from, to)` change.
    const TRANSITIONS: &'static [(Self, Self)];
    /// The status a new row starts in.
    const INITIAL: Self;
    /// The status's name as stored in the database.
    fn as_str(self) -> &'static str;
    /// True when nothing may follow it.
    fn is_terminal(self) -> bool {
        !Self::TRANSITIONS.iter().any(|(from, _)| *from == self)
    }
    /// True when `self -> to` is in the table.
    fn can_become(self, to: Self) -> bool {
        Self::TRANSITIONS.contains(&(self, to))
    }
    /// Parses a stored name.
    fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| s.as_str() == name)
    }
    /// True for the status that means "work is under way" (sets `started_at`).
    fn is_running(self) -> bool;
}

macro_rules! lifecycle {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }
     transitions: [$(($from:ident, $to:ident)),* $(,)?]) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl Lifecycle for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            const TRANSITIONS: &'static [(Self, Self)] = &[$(($name::$from, $name::$to)),*];
            const INITIAL: Self = $name::Pending;
            fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            fn is_running(self) -> bool {
                self == $name::Running
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownStatus;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$name as Lifecycle>::parse(s).ok_or_else(|| UnknownStatus(s.to_owned()))
            }
        }
    };
}

/// A status name that no lifecycle knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

lifecycle! {
    /// The status of a run.
    RunStatus {
        /// Created, not started.
        Pending = "pending",
        /// Some story has started.
        Running = "running",
        /// Every epic completed.
        Completed = "completed",
        /// Some story failed all its attempts.
        Failed = "failed",
        /// Cancelled: no new work is claimed.
        Cancelled = "cancelled",
    }
    transitions: [
        (Pending, Running), (Pending, Cancelled), (Pending, Completed), (Pending, Failed),
        (Running, Completed), (Running, Failed), (Running, Cancelled),
    ]
}

lifecycle! {
    /// The status of an epic.
    EpicStatus {
        /// No story started yet.
        Pending = "pending",
        /// Some story has started.
        Running = "running",
        /// Every story completed.
        Completed = "completed",
        /// Some story failed all its attempts.
        Failed = "failed",
        /// Its run was cancelled.
        Cancelled = "cancelled",
    }
    transitions: [
        (Pending, Running), (Pending, Cancelled), (Pending, Completed), (Pending, Failed),
        (Running, Completed), (Running, Failed), (Running, Cancelled),
    ]
}

lifecycle! {
    /// The status of a story.
    StoryStatus {
        /// Waiting to be claimed (again, after a failed attempt or a returned lease).
        Pending = "pending",
        /// Claimed by a worker holding its lease.
        Running = "running",
        /// Its work succeeded.
        Completed = "completed",
        /// Its last allowed attempt failed.
        Failed = "failed",
        /// Its run was cancelled before it finished.
        Cancelled = "cancelled",
        /// Never started: a story it needs failed, was cancelled or was skipped.
        Skipped = "skipped",
    }
    transitions: [
        (Pending, Running), (Pending, Cancelled), (Pending, Skipped),
        (Running, Completed), (Running, Failed), (Running, Pending), (Running, Cancelled),
    ]
}

/// An entity with a lifecycle-governed `status` column (and `started_at`/`finished_at`).
pub trait HasStatus: Versioned {
    /// Its lifecycle.
    type Status: Lifecycle;
    /// The `status` column.
    fn status_column() -> Self::Column;
    /// A model's status text.
    fn status_of(model: &Self::Model) -> &str;
    /// The `started_at` column, set when the status becomes running.
    fn started_at_column() -> Self::Column;
    /// The `finished_at` column, set when the status becomes terminal.
    fn finished_at_column() -> Self::Column;
    /// How many needs of the row have not completed yet (0 for rows without needs). A row with
    /// unmet needs cannot start running.
    fn unmet_needs_of(_model: &Self::Model) -> i32 {
        0
    }
    /// The column that counts unmet needs, for entities that have needs.
    fn unmet_needs_column() -> Option<Self::Column> {
        None
    }
    /// The conditions a row must meet to start running, checked in the statement that starts
    /// it (none by default).
    fn start_guards() -> Vec<sea_orm::sea_query::SimpleExpr> {
        Vec::new()
    }
    /// When the row may start at the earliest (Unix milliseconds; `None`: now).
    fn not_before_of(_model: &Self::Model) -> Option<i64> {
        None
    }
    /// The limits the row holds while it runs, sorted (none by default).
    fn limit_keys_of(_model: &Self::Model) -> Vec<String> {
        Vec::new()
    }
}

crate::versioned_entity!(entity::run, "run", status: RunStatus);
crate::versioned_entity!(entity::run_epic, "run_epic", status: EpicStatus);
crate::versioned_entity!(entity::run_story, "run_story", status: StoryStatus, needs: unmet_needs);
crate::versioned_entity!(entity::run_limit, "run_limit");

/// Moves `current` to status `to` by compare-and-swap on the version it was read at.
///
/// Rejects a change the lifecycle forbids with [`TransitionError::Illegal`], and the start of a
/// story whose needs have not all completed with [`TransitionError::Waiting`] (or whose retry
/// delay has not passed, [`TransitionError::NotReady`]), before touching the database. A start
/// the database refuses although the version matched (a need, a delay, a paused run) is
/// [`TransitionError::NotReady`]; a start whose limit is full is [`TransitionError::LimitFull`]. Sets `started_at` on entering running and `finished_at` on entering a terminal
/// status (clearing it when a story goes back to pending).
///
/// ```no_run
/// use entity::run;
/// use run_domain::{RunStatus, VersionedUpdate, transition};
/// # async fn demo(db: &sea_orm::DatabaseConnection, id: uuid::Uuid) -> Result<(), run_domain::TransitionError> {
/// let current = run::Entity::find_versioned(db, id).await?;
/// let running = transition::<run::Entity, _>(db, &current, RunStatus::Running).await?;
/// assert_eq!(running.status, "running");
/// # Ok(()) }
/// ```
pub async fn transition<E, C>(
    db: &C,
    current: &E::Model,
    to: E::Status,
) -> Result<E::Model, TransitionError>
where
    E: HasStatus,
    E::Model: Sync,
    C: ConnectionTrait + TransactionTrait,
{
    transition_with::<E, C>(db, current, to, Changes::new()).await
}

/// Like [`transition`], applying `extra` changes in the same statement (a lease, an error text,
/// an attempt count).
pub async fn transition_with<E, C>(
    db: &C,
    current: &E::Model,
    to: E::Status,
    extra: Changes<E>,
) -> Result<E::Model, TransitionError>
where
    E: HasStatus,
    E::Model: Sync,
    C: ConnectionTrait + TransactionTrait,
{
    let id = E::id_of(current);
    let from_text = E::status_of(current);
    let from = E::Status::parse(from_text).ok_or_else(|| TransitionError::UnknownStatus {
        entity: E::NAME,
        id,
        found: from_text.to_owned(),
    })?;
    if !from.can_become(to) {
        return Err(TransitionError::Illegal {
            entity: E::NAME,
            id,
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
        });
    }
    // SAFETY(order): a story starts only once every story it needs has completed. Its
    // `unmet_needs` reaches 0 only in the transaction that completes the last of them, every
    // change of the counter moves the version on, and completed is terminal: so a model whose
    // version still matches at the compare-and-swap below has the counter the row has, and a 0
    // there stays true.
    // The same condition is also part of the statement (with the retry delay and the run's
    // pause: `E::start_guards`), so that a model whose fields were changed by its caller cannot
    // start a story that must wait.
    let unmet = E::unmet_needs_of(current);
    let starting = to.is_running() && from == E::Status::INITIAL;
    if starting && unmet > 0 {
        return Err(TransitionError::Waiting {
            entity: E::NAME,
            id,
            unmet,
        });
    }
    if starting && E::not_before_of(current).is_some_and(|t| t > crate::schedule::now_ms()) {
        return Err(TransitionError::NotReady {
            entity: E::NAME,
            id,
        });
    }
    crate::versioned::check_reserved(&extra)?;
    let guards = if starting {
        E::start_guards()
    } else {
        Vec::new()
    };
    let guarded = !guards.is_empty();
    let now = Utc::now();
    let mut changes = Changes::<E>::new();
    // The status column is reserved in `Changes`; this is the one place that sets it.
    changes.sets.push((
        E::status_column(),
        sea_orm::sea_query::Expr::val(to.as_str()),
    ));
    if to.is_running() {
        changes = changes.set(E::started_at_column(), now);
    }
    if to.is_terminal() {
        changes = changes.set(E::finished_at_column(), now);
    } else if from.is_running() && !to.is_running() {
        changes = changes.set(E::finished_at_column(), None::<chrono::DateTime<Utc>>);
    }
    let mut changes = changes.merge(extra);
    changes.guards.extend(guards);
    let expected = E::version_of(current);
    let miss = |e: ConcurrencyError| match e {
        // The version matched but a condition did not: the row may not start now.
        ConcurrencyError::Conflict { actual, .. } if guarded && actual == expected => {
            TransitionError::NotReady {
                entity: E::NAME,
                id,
            }
        }
        e => e.into(),
    };
    // SAFETY(limit): a story holding limits takes their slots in the transaction that starts
    // it, and gives them back in the one that ends its run (see `crate::limits`).
    let keys = E::limit_keys_of(current);
    let taking = starting;
    let returning = from.is_running() && !to.is_running();
    if keys.is_empty() || !(taking || returning) {
        return crate::versioned::compare_and_swap::<E, C>(db, id, expected, changes)
            .await
            .map_err(miss);
    }
    match crate::limits::swap_with_slots::<E, C>(db, id, expected, changes, &keys, taking).await {
        Ok(Ok(model)) => Ok(model),
        Ok(Err(limit)) => Err(TransitionError::LimitFull {
            entity: E::NAME,
            id,
            limit,
        }),
        Err(e) => Err(miss(e)),
    }
}

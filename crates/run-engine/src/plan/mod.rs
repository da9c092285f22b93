//! The plan file: a run's epics and stories in TOML, validated, then created as a run.
//!
//! ```toml
//! name = "example"
//! title = "Example plan"      # optional, defaults to the name
//! fail_fast = true            # optional, default false: stop at the first failed story
//!
//! [defaults]                  # optional: what every story has unless it says otherwise
//! timeout = "30m"             # how long one attempt may run (humantime: 90s, 1h 30m)
//! env = { CI = "1" }         # environment every story's command gets
//! dir = "build"               # where every story's command runs, unless it says otherwise
//! retry = { delay = "10s", backoff = "exponential", max_delay = "10m" }
//!                             # wait before retrying a failed attempt (backoff: exponential,
//!                             # the default, or constant; jitter = true adds up to 25%)
//!
//! [limits]                    # optional: named limits shared by every process and run
//! llm = 3                     # at most 3 stories holding "llm" run at once (created if new;
//!                             # an existing limit keeps its capacity: `run-engine limits set`)
//!
//! [[epics]]
//! key = "build"
//! title = "Build"             # optional, defaults to the key
//! priority = 5                # optional, default 0: its stories' priority
//!
//! [[epics.stories]]
//! key = "compile"
//! title = "Compile"           # optional, defaults to the key
//! command = "echo compiling && sleep 0.2"
//! max_attempts = 2            # optional, default 1
//! timeout = "10m"             # optional, else [defaults] timeout, else none
//! retry = { delay = "1s" }    # optional, else [defaults] retry, else retried at once
//! priority = 10               # optional, else the epic's: higher is claimed first
//! limits = ["llm"]            # optional: holds a slot of each while it runs
//! env = { PROFILE = "release" }   # optional: environment of the command, over [defaults] env
//! dir = "crates/app"          # optional, else [defaults] dir: where the command runs
//!                             # (relative to the executor's working directory)
//! payload = { target = "x86_64", jobs = 4 }   # optional: any value, JSON for a Rust handler
//!
//! [[epics]]
//! key = "test"
//! needs = ["build"]           # optional: every story of epic "build" completes first
//!
//! [[epics.stories]]
//! key = "lint"
//! command = "echo linting"
//!
//! [[epics.stories]]
//! key = "unit"
//! command = "echo testing"
//! needs = ["lint", "build.compile"]   # optional: stories that complete first
//! ```
//!
//! A story's `needs` entry `n` names story `n` of the story's own epic when there is one;
//! otherwise `epic.story`: `n` is split at each `.` from the left, and the first split whose
//! left part is an epic key and whose right part a story key of that epic names the story.
//! Anything else is unknown. Needs are checked all at once: unknown names, an epic or story
//! that needs itself, the same need twice in one list (also spelled two ways, `unit` and
//! `test.unit`), and every cycle (one problem per set of needs that wait on each other,
//! spelled in the direction of "needs": `test.unit -> test.lint -> test.unit`; a step
//! through an epic's needs is written as the epic key, `build.compile -> test.unit -> build
//! -> build.compile`). Needs that name nothing are left out of the cycle check, which still
//! runs.
//!
//! Every problem is reported with the file, the line and column, and the field it is about
//! (`epics[0].stories[2].command`), all problems of a file at once: syntax errors (a repeated
//! key named, `duplicate key \`command\``), missing, unknown and mistyped fields of every
//! epic and story, then the plan's own checks.

pub(crate) mod duration;
mod inputs;
mod needs;
#[cfg(test)]
mod needs_tests;
mod parse;
mod scc;
mod schedule;
mod validate;

use crate::error::EngineError;
use entity::run;
use run_domain::{
    EpicNeed, NewEpic, NewRun, NewStory, StoryNeed, create_epic, create_needs, create_run,
    create_stories,
};
use sea_orm::{ConnectionTrait, TransactionSession, TransactionTrait};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use validate::validate;

/// A validated plan: a run's name and title, its epics, and their stories, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The plan's name (the run's key).
    pub name: String,
    /// The run's title.
    pub title: String,
    /// Stop the run at the first story that fails all its attempts (default false).
    pub fail_fast: bool,
    /// The limits of `[limits]`: name and capacity.
    pub limits: std::collections::BTreeMap<String, i32>,
    /// The epics, in file order (at least one).
    pub epics: Vec<PlanEpic>,
}

/// An epic of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanEpic {
    /// Key, unique within the plan.
    pub key: String,
    /// Title.
    pub title: String,
    /// The keys of the epics whose stories must all complete before this epic's stories
    /// start, in file order (each an epic of the plan, not this one, at most once).
    pub needs: Vec<String>,
    /// Its `priority` (default 0), which its stories have unless they give their own.
    pub priority: i32,
    /// The stories, in file order (at least one).
    pub stories: Vec<PlanStory>,
}

/// A story of a [`PlanEpic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStory {
    /// Key, unique within its epic.
    pub key: String,
    /// Title.
    pub title: String,
    /// The shell command it runs.
    pub command: String,
    /// Most attempts allowed (1 to 100).
    pub max_attempts: i32,
    /// How long one attempt may run (`timeout`, else `[defaults] timeout`; none: unbounded).
    pub timeout: Option<std::time::Duration>,
    /// The stories that must complete before this one starts, resolved, in file order (each
    /// a story of the plan, not this one, at most once).
    pub needs: Vec<StoryRef>,
    /// How long to wait after a failed attempt (`retry`, else `[defaults] retry`; none: at
    /// once).
    pub retry: Option<run_domain::RetryDelay>,
    /// Higher is claimed first among ready stories (`priority`, else the epic's, else 0).
    pub priority: i32,
    /// The limits it holds while it runs (each declared in `[limits]`, at most once).
    pub limits: Vec<String>,
    /// Environment variables for its command (`env`, over `[defaults] env`).
    pub env: std::collections::BTreeMap<String, String>,
    /// The directory its command runs in (`dir`, else `[defaults] dir`; relative to the
    /// executing process's working directory; none: that directory).
    pub dir: Option<String>,
    /// Free-form input for a Rust handler (`payload`, any TOML value, as JSON), read from
    /// [`crate::StoryContext::payload`].
    pub payload: Option<serde_json::Value>,
}

/// A story named by its epic's key and its own key, as a resolved `needs` entry; shown as
/// `epic.story`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoryRef {
    /// The epic's key.
    pub epic: String,
    /// The story's key within that epic.
    pub story: String,
}

impl fmt::Display for StoryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epic, self.story)
    }
}

/// One thing wrong with a plan file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanProblem {
    /// Line, from 1, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Column, from 1, with the line.
    pub column: Option<usize>,
    /// The field it is about, as a path: `epics[0].stories[2].command`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Why a plan could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("cannot read plan {}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid plan.
    #[error("{}", render_problems(file, problems))]
    Invalid {
        /// The file (or the name given to the text).
        file: PathBuf,
        /// Everything wrong with it, in file order.
        problems: Vec<PlanProblem>,
    },
}

fn render_problems(file: &Path, problems: &[PlanProblem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{}", file.display()));
        if let Some(line) = p.line {
            out.push_str(&format!(":{line}"));
            if let Some(column) = p.column {
                out.push_str(&format!(":{column}"));
            }
        }
        if !p.field.is_empty() {
            out.push_str(&format!(": {}", p.field));
        }
        out.push_str(&format!(": {}", p.message));
    }
    out
}

impl fmt::Display for PlanProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{l}:{c}: ")?,
            (Some(l), None) => write!(f, "{l}: ")?,
            _ => {}
        }
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl Plan {
    /// Reads and validates the plan file at `path`.
    ///
    /// ```no_run
    /// let plan = run_engine::Plan::load("examples/plan.toml")?;
    /// println!("{} epics, {} stories", plan.epics.len(), plan.story_count());
    /// # Ok::<(), run_engine::PlanError>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<Plan, PlanError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            file: path.to_owned(),
            source,
        })?;
        Plan::parse(&text, path)
    }

    /// Parses and validates plan text; `file` names it in error messages.
    ///
    /// ```
    /// let plan = run_engine::Plan::parse(r#"
    /// name = "demo"
    /// [[epics]]
    /// key = "build"
    /// [[epics.stories]]
    /// key = "compile"
    /// command = "true"
    /// "#, "demo.toml")?;
    /// assert_eq!(plan.epics[0].stories[0].max_attempts, 1);
    ///
    /// let err = run_engine::Plan::parse("name = \"demo\"\n", "demo.toml").unwrap_err();
    /// assert_eq!(err.to_string(), "demo.toml: epics: the plan has no epics");
    /// # Ok::<(), run_engine::PlanError>(())
    /// ```
    pub fn parse(text: &str, file: impl AsRef<Path>) -> Result<Plan, PlanError> {
        let file = file.as_ref().to_owned();
        let mut problems = Vec::new();
        let Some(raw) = parse::parse_raw(text, &mut problems) else {
            return Err(PlanError::Invalid { file, problems });
        };
        let plan = validate(text, raw, &mut problems);
        if problems.is_empty() {
            Ok(plan)
        } else {
            Err(PlanError::Invalid { file, problems })
        }
    }

    /// How many stories the plan has in all.
    pub fn story_count(&self) -> usize {
        self.epics.iter().map(|e| e.stories.len()).sum()
    }
}

/// Creates the run of `plan` with its epics and stories (all pending, version 1), all or
/// nothing, and returns the run.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// let plan = run_engine::Plan::load("examples/plan.toml")?;
/// let run = run_engine::create_run_from_plan(db, &plan).await?;
/// println!("{}", run.id);
/// # Ok(()) }
/// ```
pub async fn create_run_from_plan<C>(db: &C, plan: &Plan) -> Result<run::Model, EngineError>
where
    C: ConnectionTrait + TransactionTrait,
{
    // SQLite: take the write lock at BEGIN; a deferred transaction that reads first (as
    // create_epic does) would fail at once instead of waiting when another writer holds it.
    let tx = run_domain::begin_write(db).await?;
    let run = create_run(
        &tx,
        NewRun {
            key: plan.name.clone(),
            title: plan.title.clone(),
            fail_fast: plan.fail_fast,
        },
    )
    .await?;
    for (name, capacity) in &plan.limits {
        run_domain::define_limit(&tx, name, i64::from(*capacity)).await?;
    }
    let mut epic_ids: HashMap<&str, Uuid> = HashMap::new();
    let mut story_ids: HashMap<(&str, &str), Uuid> = HashMap::new();
    for (i, epic) in plan.epics.iter().enumerate() {
        let created = create_epic(
            &tx,
            run.id,
            NewEpic {
                key: epic.key.clone(),
                title: epic.title.clone(),
                position: i32::try_from(i).unwrap_or(i32::MAX),
            },
        )
        .await?;
        let stories = epic
            .stories
            .iter()
            .enumerate()
            .map(|(j, s)| NewStory {
                key: s.key.clone(),
                title: s.title.clone(),
                position: i32::try_from(j).unwrap_or(i32::MAX),
                command: Some(s.command.clone()),
                max_attempts: s.max_attempts,
                timeout: s.timeout,
                retry_delay: s.retry,
                priority: s.priority,
                env: s.env.clone(),
                dir: s.dir.clone(),
                payload: s.payload.clone(),
                limits: s.limits.clone(),
            })
            .collect();
        let ids = create_stories(&tx, &created, stories).await?;
        epic_ids.entry(epic.key.as_str()).or_insert(created.id);
        for (story, id) in epic.stories.iter().zip(ids) {
            story_ids
                .entry((epic.key.as_str(), story.key.as_str()))
                .or_insert(id);
        }
    }
    // In the same transaction: no executor sees a story before its needs.
    let mut story_needs = Vec::new();
    let mut epic_needs = Vec::new();
    for epic in &plan.epics {
        for need in &epic.needs {
            if let (Some(&e), Some(&n)) =
                (epic_ids.get(epic.key.as_str()), epic_ids.get(need.as_str()))
            {
                epic_needs.push(EpicNeed { epic: e, needs: n });
            }
        }
        for story in &epic.stories {
            let Some(&s) = story_ids.get(&(epic.key.as_str(), story.key.as_str())) else {
                continue;
            };
            for need in &story.needs {
                if let Some(&n) = story_ids.get(&(need.epic.as_str(), need.story.as_str())) {
                    story_needs.push(StoryNeed { story: s, needs: n });
                }
            }
        }
    }
    create_needs(&tx, run.id, &story_needs, &epic_needs).await?;
    tx.commit().await?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::validate::{LineStarts, line_column};
    use super::*;

    /// The problems of an invalid plan text, as printed (shared by the plan's test modules).
    pub(super) fn problems(text: &str) -> Vec<String> {
        match Plan::parse(text, "p.toml") {
            Err(PlanError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_plan_keeps_file_order_and_defaults() {
        let plan = Plan::parse(
            r#"
name = "p"
[[epics]]
key = "a"
title = "A"
[[epics.stories]]
key = "one"
command = "true"
max_attempts = 3
[[epics.stories]]
key = "two"
title = "Two"
command = "false"
[[epics]]
key = "b"
[[epics.stories]]
key = "one"
command = "true"
"#,
            "p.toml",
        )
        .expect("valid");
        assert_eq!(plan.title, "p");
        assert_eq!(plan.epics.len(), 2);
        assert_eq!(plan.epics[0].title, "A");
        assert_eq!(plan.epics[1].title, "b");
        assert_eq!(plan.epics[0].stories[0].max_attempts, 3);
        assert_eq!(plan.epics[0].stories[1].max_attempts, 1);
        assert_eq!(plan.epics[0].stories[1].title, "Two");
        assert_eq!(plan.epics[0].stories[0].title, "one");
        assert_eq!(plan.story_count(), 3);
    }

    #[test]
    fn a_missing_command_names_the_file_line_and_field() {
        let got =
            problems("name = \"p\"\n[[epics]]\nkey = \"a\"\n[[epics.stories]]\nkey = \"one\"\n");
        assert_eq!(
            got,
            ["5:7: epics[0].stories[0].command: story \"one\" in epic \"a\" has no command"]
        );
    }

    #[test]
    fn duplicate_keys_and_empty_epics_are_all_reported() {
        let got = problems(
            r#"name = "p"
[[epics]]
key = "a"
[[epics.stories]]
key = "x"
command = "true"
[[epics.stories]]
key = "x"
command = "true"
[[epics]]
key = "a"
"#,
        );
        assert_eq!(
            got,
            [
                "8:7: epics[0].stories[1].key: duplicate story key \"x\" in epic \"a\" (first used on line 5)",
                "11:7: epics[1].key: duplicate epic key \"a\" (first used on line 3)",
                "11:7: epics[1].stories: epic \"a\" has no stories",
            ]
        );
    }

    #[test]
    fn the_same_story_key_in_two_epics_is_fine() {
        Plan::parse(
            "name='p'\n[[epics]]\nkey='a'\n[[epics.stories]]\nkey='x'\ncommand='true'\n\
             [[epics]]\nkey='b'\n[[epics.stories]]\nkey='x'\ncommand='true'\n",
            "p.toml",
        )
        .expect("valid");
    }

    #[test]
    fn toml_errors_carry_line_and_field() {
        let text = "name = \"p\"\n[[epics]]\nkey = \"a\"\n[[epics.stories]]\nkey = \"x\"\ncommand = \"true\"\nmax_attempts = \"two\"\n";
        let got = problems(text);
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with("7:16: "), "{got:?}");
        assert!(got[0].contains("max_attempts"), "{got:?}");

        let got = problems("name = \"p\"\n[[epics]]\nkey = \"a\"\ncolour = 1\n");
        assert!(got[0].starts_with("4:1: "), "{got:?}");
        assert!(got[0].contains("colour"), "{got:?}");

        let got = problems("name = \"p\"\n[[epics]]\ntitle = \"a\"\n");
        assert!(got[0].contains("key"), "{got:?}");
        assert!(got[0].contains("missing field"), "{got:?}");

        let got = problems("name = \"p\n");
        assert!(got[0].starts_with("1:"), "{got:?}");
    }

    #[test]
    fn every_toml_problem_is_reported_with_its_indexed_path_and_a_repeated_key_by_name() {
        let text = "name = \"p\"\n[[epics]]\nkey = \"a\"\n[[epics.stories]]\nkey = \"x\"\n\
                    comand = \"true\"\n[[epics.stories]]\ncommand = \"true\"\n[[epics]]\n\
                    key = \"b\"\npriority = \"high\"\n[[epics.stories]]\nkey = \"y\"\n\
                    command = \"true\"\nmax_attempts = \"two\"\n";
        let got = problems(text);
        assert_eq!(got.len(), 4, "every problem, not the first: {got:?}");
        assert!(
            got[0].starts_with("6:1: epics[0].stories[0].comand: unknown field `comand`"),
            "{got:?}"
        );
        assert!(
            got[1].starts_with("7:1: epics[0].stories[1].key: missing field `key`"),
            "{got:?}"
        );
        assert!(
            got[2].starts_with("11:12: epics[1].priority: invalid type"),
            "{got:?}"
        );
        assert!(
            got[3].starts_with("15:16: epics[1].stories[0].max_attempts: invalid type"),
            "{got:?}"
        );

        let got = problems(
            "name = \"p\"\n[[epics]]\nkey = \"a\"\n[[epics.stories]]\nkey = \"x\"\n\
             command = \"true\"\ncommand = \"false\"\n[[epics]]\nkey = \"b\"\ntitle = \"x\n",
        );
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0],
            "7:1: epics[0].stories[0].command: duplicate key `command`"
        );
        assert!(
            got[1].starts_with("10:11: epics[1]: invalid basic string"),
            "{got:?}"
        );
    }

    #[test]
    fn env_and_dir_are_checked_and_follow_the_defaults() {
        let plan = Plan::parse(
            "name = 'p'\n[defaults]\nenv = { A = '1', B = '2' }\ndir = 'build'\n[[epics]]\nkey = 'e'\n\
             [[epics.stories]]\nkey = 'x'\ncommand = 'true'\nenv = { B = '3' }\n\
             [[epics.stories]]\nkey = 'y'\ncommand = 'true'\ndir = 'elsewhere'\npayload = 7\n",
            "p.toml",
        )
        .expect("valid");
        let [x, y] = &plan.epics[0].stories[..] else {
            panic!("two stories")
        };
        assert_eq!(x.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(x.env.get("B").map(String::as_str), Some("3"));
        assert_eq!(x.dir.as_deref(), Some("build"));
        assert_eq!(y.dir.as_deref(), Some("elsewhere"));
        assert_eq!(y.payload, Some(serde_json::json!(7)));

        let got = problems(
            "name = 'p'\n[[epics]]\nkey = 'e'\n[[epics.stories]]\nkey = 'x'\ncommand = 'true'\n\
             env = { 'A=B' = '1' }\ndir = ''\n",
        );
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].contains("epics[0].stories[0].env.A=B: \"A=B\" cannot be the name"),
            "{got:?}"
        );
        assert!(
            got[1].contains("epics[0].stories[0].dir: the directory is empty"),
            "{got:?}"
        );
    }

    #[test]
    fn max_attempts_out_of_range_is_refused() {
        let got = problems(
            "name='p'\n[[epics]]\nkey='a'\n[[epics.stories]]\nkey='x'\ncommand='true'\nmax_attempts=0\n",
        );
        assert_eq!(
            got,
            [
                "7:14: epics[0].stories[0].max_attempts: max_attempts must be between 1 and 100, not 0"
            ]
        );
    }

    #[test]
    fn control_characters_in_keys_and_nul_anywhere_are_refused() {
        let got = problems(
            "name = \"p\\u0000\"\n[[epics]]\nkey = \"a\\nb\"\ntitle = \"t\\u0000\"\n\
             [[epics.stories]]\nkey = \"s\"\ncommand = \"echo \\u0000\"\n",
        );
        assert_eq!(
            got,
            [
                "1:8: name: the plan name contains the control character U+0000 (NUL)",
                "3:7: epics[0].key: the epic key contains the control character U+000A (line feed)",
                "4:9: epics[0].title: the title contains a NUL character (U+0000)",
                "7:11: epics[0].stories[0].command: the command contains a NUL character (U+0000)",
            ]
        );
        // Tabs and newlines in commands and titles are fine (multi-line scripts).
        Plan::parse(
            "name='p'\ntitle=\"a\\tb\"\n[[epics]]\nkey='a'\n[[epics.stories]]\nkey='x'\n\
             command=\"\"\"\necho one\necho two\n\"\"\"\n",
            "p.toml",
        )
        .expect("valid");
    }

    #[test]
    fn line_starts_agree_with_line_column() {
        let text = "a\nbc\n\nd";
        let starts = LineStarts::of(text);
        for offset in 0..=text.len() {
            assert_eq!(starts.line(offset), line_column(text, offset).0, "{offset}");
        }
    }

    #[test]
    fn the_error_names_the_file() {
        let err = Plan::parse("name='p'\n", "plans/x.toml").expect_err("no epics");
        assert_eq!(
            err.to_string(),
            "plans/x.toml: epics: the plan has no epics"
        );
    }
}

//! The plan file: a run's epics and stories in TOML, validated, then created as a run.
//!
//! ```toml
//! name = "example"
//! title = "Example plan"      # optional, defaults to the name
//!
//! [[epics]]
//! key = "build"
//! title = "Build"             # optional, defaults to the key
//!
//! [[epics.stories]]
//! key = "compile"
//! title = "Compile"           # optional, defaults to the key
//! command = "echo compiling && sleep 0.2"
//! max_attempts = 2            # optional, default 1
//! ```
//!
//! Every problem is reported with the file, the line and column, and the field it is about
//! (`epics[0].stories[2].command`), all problems of a file at once.

use crate::error::EngineError;
use entity::run;
use run_domain::{NewEpic, NewRun, NewStory, create_epic, create_run, create_stories};
use sea_orm::{
    AccessMode, ConnectionTrait, DbBackend, SqliteTransactionMode, TransactionOptions,
    TransactionSession, TransactionTrait,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The longest key the database holds (run key, epic key, story key).
const MAX_KEY_LEN: usize = 255;
/// The longest title the database holds.
const MAX_TITLE_LEN: usize = 1024;
/// The most attempts a story may ask for.
const MAX_ATTEMPTS: i64 = 100;

/// A validated plan: a run's name and title, its epics, and their stories, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The plan's name (the run's key).
    pub name: String,
    /// The run's title.
    pub title: String,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Spanned<String>,
    title: Option<Spanned<String>>,
    #[serde(default)]
    epics: Vec<RawEpic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEpic {
    key: Spanned<String>,
    title: Option<Spanned<String>>,
    #[serde(default)]
    stories: Vec<RawStory>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStory {
    key: Spanned<String>,
    title: Option<Spanned<String>>,
    command: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
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
        let raw: RawPlan = toml::from_str(text).map_err(|e| PlanError::Invalid {
            file: file.clone(),
            problems: vec![problem_from_toml(text, &e)],
        })?;
        let mut problems = Vec::new();
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

/// The 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The byte offsets where the lines of a text start: line numbers of many offsets without
/// scanning the text for each (a 10,000-story plan has 10,000 keys to place).
struct LineStarts(Vec<usize>);

impl LineStarts {
    fn of(text: &str) -> LineStarts {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineStarts(starts)
    }

    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

fn at(text: &str, span: Range<usize>, field: String, message: String) -> PlanProblem {
    let (line, column) = line_column(text, span.start);
    PlanProblem {
        line: Some(line),
        column: Some(column),
        field,
        message,
    }
}

fn problem_from_toml(text: &str, e: &toml::de::Error) -> PlanProblem {
    // The key path is only rendered when the error carries no input; ask for it that way.
    let mut bare = e.clone();
    bare.set_input(None);
    let rendered = bare.to_string();
    let keys = rendered
        .lines()
        .find_map(|l| l.strip_prefix("in `").and_then(|l| l.strip_suffix('`')))
        .map(str::to_owned);
    let message = e.message().trim().to_owned();
    // "missing field `command`" / "unknown field `comand`, expected ...": name that field.
    let named = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("missing field") || message.starts_with("unknown field"));
    let field = match (keys, named) {
        (Some(k), Some(n)) if !k.ends_with(n) => format!("{k}.{n}"),
        (Some(k), _) => k,
        (None, Some(n)) => n.to_owned(),
        (None, None) => String::new(),
    };
    let (line, column) = match e.span() {
        Some(span) => {
            let (l, c) = line_column(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    PlanProblem {
        line,
        column,
        field,
        message,
    }
}

fn check_key(
    text: &str,
    key: &Spanned<String>,
    field: &str,
    what: &str,
    problems: &mut Vec<PlanProblem>,
) {
    let value = key.get_ref();
    if value.trim().is_empty() {
        problems.push(at(
            text,
            key.span(),
            field.to_owned(),
            format!("the {what} is empty"),
        ));
    } else if value.len() > MAX_KEY_LEN {
        problems.push(at(
            text,
            key.span(),
            field.to_owned(),
            format!("the {what} is longer than {MAX_KEY_LEN} bytes"),
        ));
    } else if let Some(c) = value.chars().find(|c| c.is_control()) {
        // Keys name stories in log lines (`[epic/story] ...`) and in terminals.
        problems.push(at(
            text,
            key.span(),
            field.to_owned(),
            format!(
                "the {what} contains the control character {}",
                describe_char(c)
            ),
        ));
    }
}

/// `U+0000 (NUL)`-style name of a character.
fn describe_char(c: char) -> String {
    let code = u32::from(c);
    match c {
        '\0' => format!("U+{code:04X} (NUL)"),
        '\t' => format!("U+{code:04X} (tab)"),
        '\n' => format!("U+{code:04X} (line feed)"),
        '\r' => format!("U+{code:04X} (carriage return)"),
        _ => format!("U+{code:04X}"),
    }
}

/// A NUL character cannot be stored in a PostgreSQL text column, nor passed to a command.
fn check_no_nul(
    text: &str,
    value: &Spanned<String>,
    field: String,
    what: &str,
    problems: &mut Vec<PlanProblem>,
) -> bool {
    if value.get_ref().contains('\0') {
        problems.push(at(
            text,
            value.span(),
            field,
            format!("the {what} contains a NUL character (U+0000)"),
        ));
        false
    } else {
        true
    }
}

fn title_of(
    text: &str,
    title: Option<Spanned<String>>,
    default: &str,
    field: String,
    problems: &mut Vec<PlanProblem>,
) -> String {
    match title {
        Some(t) if t.get_ref().len() > MAX_TITLE_LEN => {
            problems.push(at(
                text,
                t.span(),
                field,
                format!("the title is longer than {MAX_TITLE_LEN} bytes"),
            ));
            String::new()
        }
        Some(t) if !check_no_nul(text, &t, field, "title", problems) => String::new(),
        Some(t) if !t.get_ref().trim().is_empty() => t.into_inner(),
        _ => default.to_owned(),
    }
}

fn validate(text: &str, raw: RawPlan, problems: &mut Vec<PlanProblem>) -> Plan {
    let lines = LineStarts::of(text);
    check_key(text, &raw.name, "name", "plan name", problems);
    let name = raw.name.get_ref().clone();
    let title = title_of(text, raw.title, &name, "title".into(), problems);
    if raw.epics.is_empty() {
        problems.push(PlanProblem {
            line: None,
            column: None,
            field: "epics".into(),
            message: "the plan has no epics".into(),
        });
    }
    let mut epic_lines: HashMap<String, usize> = HashMap::new();
    let mut epics = Vec::with_capacity(raw.epics.len());
    for (i, epic) in raw.epics.into_iter().enumerate() {
        let field = format!("epics[{i}]");
        let key_field = format!("{field}.key");
        check_key(text, &epic.key, &key_field, "epic key", problems);
        let key = epic.key.get_ref().clone();
        let line = lines.line(epic.key.span().start);
        if let Some(first) = epic_lines.get(&key) {
            problems.push(at(
                text,
                epic.key.span(),
                key_field,
                format!("duplicate epic key {key:?} (first used on line {first})"),
            ));
        } else {
            epic_lines.insert(key.clone(), line);
        }
        let title = title_of(text, epic.title, &key, format!("{field}.title"), problems);
        if epic.stories.is_empty() {
            problems.push(at(
                text,
                epic.key.span(),
                format!("{field}.stories"),
                format!("epic {key:?} has no stories"),
            ));
        }
        let mut story_lines: HashMap<String, usize> = HashMap::new();
        let mut stories = Vec::with_capacity(epic.stories.len());
        for (j, story) in epic.stories.into_iter().enumerate() {
            let sfield = format!("{field}.stories[{j}]");
            let skey_field = format!("{sfield}.key");
            check_key(text, &story.key, &skey_field, "story key", problems);
            let skey = story.key.get_ref().clone();
            let sline = lines.line(story.key.span().start);
            if let Some(first) = story_lines.get(&skey) {
                problems.push(at(
                    text,
                    story.key.span(),
                    skey_field,
                    format!(
                        "duplicate story key {skey:?} in epic {key:?} (first used on line {first})"
                    ),
                ));
            } else {
                story_lines.insert(skey.clone(), sline);
            }
            let stitle = title_of(
                text,
                story.title,
                &skey,
                format!("{sfield}.title"),
                problems,
            );
            let command = match story.command {
                Some(c) if c.get_ref().trim().is_empty() => {
                    problems.push(at(
                        text,
                        c.span(),
                        format!("{sfield}.command"),
                        format!("story {skey:?} in epic {key:?} has an empty command"),
                    ));
                    String::new()
                }
                Some(c)
                    if !check_no_nul(
                        text,
                        &c,
                        format!("{sfield}.command"),
                        "command",
                        problems,
                    ) =>
                {
                    String::new()
                }
                Some(c) => c.into_inner(),
                None => {
                    problems.push(at(
                        text,
                        story.key.span(),
                        format!("{sfield}.command"),
                        format!("story {skey:?} in epic {key:?} has no command"),
                    ));
                    String::new()
                }
            };
            let max_attempts = match story.max_attempts {
                None => 1,
                Some(m) if (1..=MAX_ATTEMPTS).contains(m.get_ref()) => {
                    i32::try_from(*m.get_ref()).unwrap_or(1)
                }
                Some(m) => {
                    problems.push(at(
                        text,
                        m.span(),
                        format!("{sfield}.max_attempts"),
                        format!(
                            "max_attempts must be between 1 and {MAX_ATTEMPTS}, not {}",
                            m.get_ref()
                        ),
                    ));
                    1
                }
            };
            stories.push(PlanStory {
                key: skey,
                title: stitle,
                command,
                max_attempts,
            });
        }
        epics.push(PlanEpic {
            key,
            title,
            stories,
        });
    }
    problems.sort_by_key(|p| (p.line.unwrap_or(0), p.column.unwrap_or(0)));
    Plan { name, title, epics }
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
    let backend = db.get_database_backend();
    // SQLite: take the write lock at BEGIN; a deferred transaction that reads first (as
    // create_epic does) would fail at once instead of waiting when another writer holds it.
    let tx = db
        .begin_with_options(TransactionOptions {
            isolation_level: None,
            access_mode: Some(AccessMode::ReadWrite).filter(|_| backend != DbBackend::Sqlite),
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        })
        .await?;
    let run = create_run(
        &tx,
        NewRun {
            key: plan.name.clone(),
            title: plan.title.clone(),
        },
    )
    .await?;
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
            })
            .collect();
        create_stories(&tx, &created, stories).await?;
    }
    tx.commit().await?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
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

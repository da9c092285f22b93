//! Checking a plan: every problem at once, each with its line, column and field.

use super::duration::duration;
use super::inputs::{RawEnv, default_env, dir_of, env_of, json_of};
use super::needs::{RawNeeds, check_needs};
use super::schedule::{RawRetry, declared_limits, priority, retry_delay, story_limits};
use super::{Plan, PlanEpic, PlanProblem, PlanStory};
use serde::Deserialize;
use std::collections::HashMap;
use std::ops::Range;
use toml::Spanned;

/// The longest key the database holds (run key, epic key, story key).
pub(super) const MAX_KEY_LEN: usize = 255;

/// The longest title the database holds.
pub(super) const MAX_TITLE_LEN: usize = 1024;

/// The most attempts a story may ask for.
pub(super) const MAX_ATTEMPTS: i64 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    name: Spanned<String>,
    title: Option<Spanned<String>>,
    #[serde(default)]
    fail_fast: bool,
    defaults: Option<RawDefaults>,
    #[serde(default)]
    limits: std::collections::BTreeMap<String, Spanned<i64>>,
    #[serde(default)]
    pub(super) epics: Vec<RawEpic>,
}

/// `[defaults]`: what a story has unless it says otherwise.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    timeout: Option<Spanned<String>>,
    retry: Option<RawRetry>,
    env: Option<RawEnv>,
    dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEpic {
    key: Spanned<String>,
    title: Option<Spanned<String>>,
    needs: Option<Vec<Spanned<String>>>,
    priority: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) stories: Vec<RawStory>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStory {
    key: Spanned<String>,
    title: Option<Spanned<String>>,
    command: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
    needs: Option<Vec<Spanned<String>>>,
    timeout: Option<Spanned<String>>,
    retry: Option<RawRetry>,
    priority: Option<Spanned<i64>>,
    limits: Option<Vec<Spanned<String>>>,
    env: Option<RawEnv>,
    dir: Option<Spanned<String>>,
    payload: Option<toml::Value>,
}

/// The 1-based line and column of byte `offset` in `text`.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The byte offsets where the lines of a text start: line numbers of many offsets without
/// scanning the text for each (a 10,000-story plan has 10,000 keys to place).
pub(super) struct LineStarts(Vec<usize>);

impl LineStarts {
    pub(super) fn of(text: &str) -> LineStarts {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineStarts(starts)
    }

    /// The 1-based line of byte `offset`.
    pub(super) fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

pub(super) fn at(text: &str, span: Range<usize>, field: String, message: String) -> PlanProblem {
    let (line, column) = line_column(text, span.start);
    PlanProblem {
        line: Some(line),
        column: Some(column),
        field,
        message,
    }
}

pub(super) fn problem_from_toml(text: &str, e: &toml::de::Error) -> PlanProblem {
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

pub(super) fn check_key(
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
pub(super) fn describe_char(c: char) -> String {
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
pub(super) fn check_no_nul(
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

pub(super) fn title_of(
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

pub(super) fn validate(text: &str, raw: RawPlan, problems: &mut Vec<PlanProblem>) -> Plan {
    let lines = LineStarts::of(text);
    check_key(text, &raw.name, "name", "plan name", problems);
    let name = raw.name.get_ref().clone();
    let title = title_of(text, raw.title, &name, "title".into(), problems);
    let (default_timeout, default_retry, default_env, default_dir) = match raw.defaults {
        Some(d) => (
            d.timeout
                .and_then(|t| duration(text, &t, "defaults.timeout".into(), problems)),
            d.retry
                .and_then(|r| retry_delay(text, &r, "defaults.retry", problems)),
            default_env(text, d.env, problems),
            dir_of(text, d.dir, None, "defaults.dir".into(), problems),
        ),
        None => (None, None, Default::default(), None),
    };
    let limits = declared_limits(text, raw.limits, problems);
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
    let mut needs = Vec::with_capacity(raw.epics.len());
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
        let epic_priority = epic
            .priority
            .and_then(|p| priority(text, &p, format!("{field}.priority"), problems));
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
        let mut story_needs = Vec::with_capacity(epic.stories.len());
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
            let timeout = match &story.timeout {
                Some(t) => duration(text, t, format!("{sfield}.timeout"), problems),
                None => default_timeout,
            };
            let retry = match &story.retry {
                Some(r) => retry_delay(text, r, &format!("{sfield}.retry"), problems),
                None => default_retry,
            };
            let story_priority = story
                .priority
                .and_then(|p| priority(text, &p, format!("{sfield}.priority"), problems))
                .or(epic_priority)
                .unwrap_or(0);
            let story_limits = story_limits(
                text,
                story.limits.unwrap_or_default(),
                &limits,
                &format!("{sfield}.limits"),
                problems,
            );
            story_needs.push(story.needs.unwrap_or_default());
            let env = env_of(
                text,
                story.env,
                &default_env,
                &format!("{sfield}.env"),
                problems,
            );
            let dir = dir_of(
                text,
                story.dir,
                default_dir.as_ref(),
                format!("{sfield}.dir"),
                problems,
            );
            stories.push(PlanStory {
                env,
                dir,
                payload: story.payload.map(json_of),
                key: skey,
                title: stitle,
                command,
                max_attempts,
                needs: Vec::new(),
                timeout,
                retry,
                priority: story_priority,
                limits: story_limits,
            });
        }
        needs.push(RawNeeds {
            epic: epic.needs.unwrap_or_default(),
            stories: story_needs,
        });
        epics.push(PlanEpic {
            key,
            title,
            needs: Vec::new(),
            priority: epic_priority.unwrap_or(0),
            stories,
        });
    }
    check_needs(text, &mut epics, needs, problems);
    problems.sort_by_key(|p| (p.line.unwrap_or(0), p.column.unwrap_or(0)));
    Plan {
        name,
        title,
        fail_fast: raw.fail_fast,
        limits,
        epics,
    }
}

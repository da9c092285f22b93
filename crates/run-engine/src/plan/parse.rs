//! Reading plan text into its raw shape, every problem at once.
//!
//! A plain `toml::from_str` stops at the first problem and names the field by its path without
//! indices (`epics.stories.key`). Here the text is parsed first with recovery (every syntax error,
//! a repeated key named with its table's indexed path), then each part is deserialized on its
//! own: the top level, each epic, each story, so that every missing, unknown or mistyped field
//! of every story is reported, each at `epics[1].stories[3].field`.

use super::PlanProblem;
use super::validate::{RawEpic, RawPlan, RawStory, line_column, problem_from_toml};
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// The plan's raw shape, or `None` with every problem found pushed to `problems`.
pub(super) fn parse_raw(text: &str, problems: &mut Vec<PlanProblem>) -> Option<RawPlan> {
    let (root, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        problems.extend(errors.iter().map(|e| syntax_problem(text, e)));
        return None;
    }
    let before = problems.len();
    let span = root.span();
    let mut table = root.into_inner();
    let epics = table.remove("epics");
    let plan: Option<RawPlan> = part(
        Spanned::new(span, DeValue::Table(table)),
        text,
        "",
        problems,
    );
    let mut raw_epics = Vec::new();
    if let Some(epics) = epics {
        for (i, epic) in items(epics, text, "epics", problems)
            .into_iter()
            .enumerate()
        {
            let path = format!("epics[{i}]");
            let span = epic.span();
            let (epic, stories) = match epic.into_inner() {
                DeValue::Table(mut t) => {
                    let stories = t.remove("stories");
                    (Spanned::new(span, DeValue::Table(t)), stories)
                }
                other => (Spanned::new(span, other), None),
            };
            let raw_epic: Option<RawEpic> = part(epic, text, &path, problems);
            let mut raw_stories = Vec::new();
            if let Some(stories) = stories {
                let list = format!("{path}.stories");
                for (j, story) in items(stories, text, &list, problems)
                    .into_iter()
                    .enumerate()
                {
                    let story: Option<RawStory> =
                        part(story, text, &format!("{list}[{j}]"), problems);
                    raw_stories.extend(story);
                }
            }
            if let Some(mut raw_epic) = raw_epic {
                raw_epic.stories = raw_stories;
                raw_epics.push(raw_epic);
            }
        }
    }
    let mut plan = plan?;
    if problems.len() > before {
        return None;
    }
    plan.epics = raw_epics;
    Some(plan)
}

/// The elements of an array of tables (`[[epics]]`), or nothing with a problem when the value
/// is not an array.
fn items<'i>(
    value: Spanned<DeValue<'i>>,
    text: &str,
    path: &str,
    problems: &mut Vec<PlanProblem>,
) -> Vec<Spanned<DeValue<'i>>> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items.into_iter().collect(),
        _ => {
            let (line, column) = line_column(text, span.start);
            problems.push(PlanProblem {
                line: Some(line),
                column: Some(column),
                field: path.to_owned(),
                message: format!("expected an array of tables (`[[{}]]`)", header_of(path)),
            });
            Vec::new()
        }
    }
}

/// `epics[0].stories` as a table header: `epics.stories`.
fn header_of(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Deserializes one part of the plan; a problem names its field under `path`.
fn part<T: DeserializeOwned>(
    value: Spanned<DeValue<'_>>,
    text: &str,
    path: &str,
    problems: &mut Vec<PlanProblem>,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            let mut problem = problem_from_toml(text, &e);
            problem.field = match (path.is_empty(), problem.field.is_empty()) {
                (true, _) => problem.field,
                (false, true) => path.to_owned(),
                (false, false) => format!("{path}.{}", problem.field),
            };
            problems.push(problem);
            None
        }
    }
}

/// A syntax error, at its line and column, with the indexed path of the table it is in; a
/// repeated key is named.
fn syntax_problem(text: &str, e: &toml::de::Error) -> PlanProblem {
    let mut problem = problem_from_toml(text, e);
    let Some(span) = e.span() else {
        return problem;
    };
    let table = table_path_at(text, span.start);
    if problem.message.starts_with("duplicate key") {
        let key = text
            .get(span.clone())
            .unwrap_or_default()
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        problem.message = format!("duplicate key `{key}`");
        problem.field = if table.is_empty() {
            key.to_owned()
        } else {
            format!("{table}.{key}")
        };
    } else if problem.field.is_empty() {
        problem.field = table;
    }
    problem
}

/// The indexed path of the table that byte `offset` of `text` is in, from the table headers
/// above it: `epics[1].stories[0]`, `defaults`, or empty at the top level.
fn table_path_at(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let mut epic: Option<usize> = None;
    let mut story: Option<usize> = None;
    let mut path = String::new();
    for line in before.lines() {
        let line = line.trim();
        let Some(header) = line.strip_prefix('[') else {
            continue;
        };
        let (array, name) = match header.strip_prefix('[') {
            Some(inner) => (true, inner.split(']').next().unwrap_or_default()),
            None => (false, header.split(']').next().unwrap_or_default()),
        };
        let name: String = name.chars().filter(|c| !c.is_whitespace()).collect();
        path = match (array, name.as_str()) {
            (true, "epics") => {
                let i = epic.map_or(0, |i| i + 1);
                epic = Some(i);
                story = None;
                format!("epics[{i}]")
            }
            (true, "epics.stories") => {
                let j = story.map_or(0, |j| j + 1);
                story = Some(j);
                format!("epics[{}].stories[{j}]", epic.unwrap_or(0))
            }
            _ => name,
        };
    }
    path
}

#[cfg(test)]
mod tests {
    use super::{header_of, table_path_at};

    #[test]
    fn the_table_a_place_is_in_is_named_with_indices() {
        let text = "name = \"p\"\n[[epics]]\nkey = \"a\"\n[[epics.stories]]\nkey = \"x\"\n\
                    [[epics]]\nkey = \"b\"\n[[epics.stories]]\nkey = \"y\"\n[[epics.stories]]\nkey = \"z\"\n";
        let at = |needle: &str| table_path_at(text, text.find(needle).expect("in text"));
        assert_eq!(at("name"), "");
        assert_eq!(at("key = \"a\""), "epics[0]");
        assert_eq!(at("key = \"x\""), "epics[0].stories[0]");
        assert_eq!(at("key = \"b\""), "epics[1]");
        assert_eq!(at("key = \"z\""), "epics[1].stories[1]");
        assert_eq!(header_of("epics[3].stories"), "epics.stories");
    }
}

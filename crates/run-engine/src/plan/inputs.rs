//! What a story's handler is given besides its command: `env`, `dir` (per story, or as plan
//! defaults) and a free-form `payload`.

use super::PlanProblem;
use super::validate::{at, check_no_nul};
use std::collections::BTreeMap;
use toml::Spanned;

/// A plan's `env` table: variable name to value.
pub(super) type RawEnv = BTreeMap<String, Spanned<String>>;

/// The story's environment: the defaults' variables, then its own over them. A name must be
/// non-empty and hold no `=` or NUL, a value no NUL.
pub(super) fn env_of(
    text: &str,
    own: Option<RawEnv>,
    defaults: &BTreeMap<String, String>,
    field: &str,
    problems: &mut Vec<PlanProblem>,
) -> BTreeMap<String, String> {
    let mut env = defaults.clone();
    for (name, value) in own.unwrap_or_default() {
        if let Some(checked) = checked_var(text, &name, value, field, problems) {
            env.insert(name, checked);
        }
    }
    env
}

/// `[defaults] env`, checked.
pub(super) fn default_env(
    text: &str,
    raw: Option<RawEnv>,
    problems: &mut Vec<PlanProblem>,
) -> BTreeMap<String, String> {
    env_of(text, raw, &BTreeMap::new(), "defaults.env", problems)
}

fn checked_var(
    text: &str,
    name: &str,
    value: Spanned<String>,
    field: &str,
    problems: &mut Vec<PlanProblem>,
) -> Option<String> {
    let at_name = format!("{field}.{name}");
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        problems.push(at(
            text,
            value.span(),
            at_name,
            format!("{name:?} cannot be the name of an environment variable (empty, or holds `=` or NUL)"),
        ));
        return None;
    }
    check_no_nul(text, &value, at_name, "value", problems).then(|| value.into_inner())
}

/// The story's directory: its own `dir`, else the defaults'. Not empty, no NUL.
pub(super) fn dir_of(
    text: &str,
    own: Option<Spanned<String>>,
    default: Option<&String>,
    field: String,
    problems: &mut Vec<PlanProblem>,
) -> Option<String> {
    let Some(dir) = own else {
        return default.cloned();
    };
    if dir.get_ref().trim().is_empty() {
        problems.push(at(
            text,
            dir.span(),
            field,
            "the directory is empty (leave `dir` out to run in the executor's)".to_owned(),
        ));
        return None;
    }
    check_no_nul(text, &dir, field, "directory", problems).then(|| dir.into_inner())
}

/// A TOML value as JSON: tables become objects, arrays arrays, dates and times their RFC 3339
/// text, a float that JSON cannot hold (NaN, infinity) `null`.
pub(super) fn json_of(value: toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s),
        toml::Value::Integer(i) => J::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(items) => J::Array(items.into_iter().map(json_of).collect()),
        toml::Value::Table(t) => J::Object(t.into_iter().map(|(k, v)| (k, json_of(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::json_of;

    #[test]
    fn toml_values_become_the_json_a_handler_expects() {
        let value: toml::Value = toml::from_str(
            "n = 3\nf = 0.5\nlist = [1, \"two\"]\nwhen = 2026-12-06T10:00:00Z\n[nested]\nok = true\n",
        )
        .expect("toml");
        assert_eq!(
            json_of(value),
            serde_json::json!({
                "n": 3, "f": 0.5, "list": [1, "two"], "when": "2026-12-06T10:00:00Z",
                "nested": {"ok": true}
            })
        );
    }
}

//! The plan's scheduling fields: `retry = { ... }`, `priority`, `limits` and `[limits]`.

use super::PlanProblem;
use super::duration::duration;
use super::validate::at;
use run_domain::{Backoff, RetryDelay};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// The most a priority may be, up or down.
pub(super) const MAX_PRIORITY: i64 = 1_000_000;

/// `retry = { delay = "10s", backoff = "exponential", max_delay = "10m", jitter = true }`.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    delay: Spanned<String>,
    backoff: Option<Spanned<String>>,
    max_delay: Option<Spanned<String>>,
    jitter: Option<bool>,
}

/// Reads a `retry` table (the plan field `field`), or reports what is wrong with it.
pub(super) fn retry_delay(
    text: &str,
    raw: &RawRetry,
    field: &str,
    problems: &mut Vec<PlanProblem>,
) -> Option<RetryDelay> {
    let delay = duration(text, &raw.delay, format!("{field}.delay"), problems);
    let backoff = match &raw.backoff {
        None => Some(Backoff::Exponential),
        Some(b) => match b.get_ref().as_str() {
            "exponential" => Some(Backoff::Exponential),
            "constant" => Some(Backoff::Constant),
            other => {
                problems.push(at(
                    text,
                    b.span(),
                    format!("{field}.backoff"),
                    format!("backoff {other:?} is not \"exponential\" or \"constant\""),
                ));
                None
            }
        },
    };
    let max_delay = match &raw.max_delay {
        None => None,
        Some(m) => {
            let max = duration(text, m, format!("{field}.max_delay"), problems)?;
            if delay.is_some_and(|d| max < d) {
                problems.push(at(
                    text,
                    m.span(),
                    format!("{field}.max_delay"),
                    format!(
                        "max_delay {:?} is shorter than the delay {:?}",
                        m.get_ref(),
                        raw.delay.get_ref()
                    ),
                ));
                return None;
            }
            Some(max)
        }
    };
    Some(RetryDelay {
        delay: delay?,
        backoff: backoff?,
        max_delay,
        jitter: raw.jitter.unwrap_or(true),
    })
}

/// Reads a `priority` (the plan field `field`).
pub(super) fn priority(
    text: &str,
    raw: &Spanned<i64>,
    field: String,
    problems: &mut Vec<PlanProblem>,
) -> Option<i32> {
    let p = *raw.get_ref();
    if (-MAX_PRIORITY..=MAX_PRIORITY).contains(&p) {
        i32::try_from(p).ok()
    } else {
        problems.push(at(
            text,
            raw.span(),
            field,
            format!("priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}, not {p}"),
        ));
        None
    }
}

/// Reads the `[limits]` table: name = capacity.
pub(super) fn declared_limits(
    text: &str,
    raw: BTreeMap<String, Spanned<i64>>,
    problems: &mut Vec<PlanProblem>,
) -> BTreeMap<String, i32> {
    let mut limits = BTreeMap::new();
    for (name, capacity) in raw {
        let field = format!("limits.{name}");
        if let Err(e) = run_domain::check_limit_name(&name) {
            problems.push(at(text, capacity.span(), field, e.to_string()));
            continue;
        }
        match run_domain::check_capacity(*capacity.get_ref()) {
            Ok(c) => {
                limits.insert(name, c);
            }
            Err(e) => problems.push(at(text, capacity.span(), field, e.to_string())),
        }
    }
    limits
}

/// Reads a story's `limits = [...]` (the plan field `field`): each a limit of `[limits]`, once.
pub(super) fn story_limits(
    text: &str,
    raw: Vec<Spanned<String>>,
    declared: &BTreeMap<String, i32>,
    field: &str,
    problems: &mut Vec<PlanProblem>,
) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(raw.len());
    for (k, name) in raw.into_iter().enumerate() {
        let f = format!("{field}[{k}]");
        let n = name.get_ref();
        if !declared.contains_key(n) {
            let known = if declared.is_empty() {
                "the plan has no [limits] table".to_owned()
            } else {
                let list: Vec<&str> = declared.keys().map(String::as_str).collect();
                format!("the plan's limits are {}", list.join(", "))
            };
            problems.push(at(
                text,
                name.span(),
                f,
                format!("limit {n:?} is not declared in [limits] ({known})"),
            ));
        } else if names.contains(n) {
            problems.push(at(
                text,
                name.span(),
                f,
                format!("limit {n:?} is named twice"),
            ));
        } else {
            names.push(n.clone());
        }
    }
    names
}

//! Durations in a plan (`timeout = "30m"`): humantime's syntax (`500ms`, `30s`, `10m`,
//! `1h 30m`, `2days`), more than zero and at most 30 days.

use super::PlanProblem;
use super::validate::at;
use std::time::Duration;
use toml::Spanned;

/// The longest timeout a plan may give (a month: longer is a typo, not a bound).
pub(super) const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses the duration in `value` (the plan field `field`), or reports why it is not one.
pub(super) fn duration(
    text: &str,
    value: &Spanned<String>,
    field: String,
    problems: &mut Vec<PlanProblem>,
) -> Option<Duration> {
    let raw = value.get_ref();
    match humantime::parse_duration(raw.trim()) {
        Ok(d) if d.is_zero() => {
            problems.push(at(
                text,
                value.span(),
                field,
                format!("{raw:?} is no time at all; a timeout must be more than 0"),
            ));
            None
        }
        Ok(d) if d > MAX_TIMEOUT => {
            problems.push(at(
                text,
                value.span(),
                field,
                format!("{raw:?} is longer than the most a timeout may be (30 days)"),
            ));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(at(
                text,
                value.span(),
                field,
                format!(
                    "{raw:?} is not a duration ({e}); write it like \"90s\", \"10m\" or \"1h 30m\""
                ),
            ));
            None
        }
    }
}

/// `1h 30m`-style text of a duration, as messages print it.
pub(crate) fn describe(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    ))
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::super::Plan;
    use super::super::tests::problems;
    use std::time::Duration;

    #[test]
    fn a_story_timeout_overrides_the_plan_default() {
        let plan = Plan::parse(
            "name='p'\n[defaults]\ntimeout='10m'\n[[epics]]\nkey='a'\n\
             [[epics.stories]]\nkey='x'\ncommand='true'\n\
             [[epics.stories]]\nkey='y'\ncommand='true'\ntimeout='1h 30m'\n",
            "p.toml",
        )
        .expect("valid");
        let stories = &plan.epics[0].stories;
        assert_eq!(stories[0].timeout, Some(Duration::from_secs(600)));
        assert_eq!(stories[1].timeout, Some(Duration::from_secs(5400)));
        let plan = Plan::parse(
            "name='p'\n[[epics]]\nkey='a'\n[[epics.stories]]\nkey='x'\ncommand='true'\n",
            "p.toml",
        )
        .expect("valid");
        assert_eq!(
            plan.epics[0].stories[0].timeout, None,
            "no timeout unless asked"
        );
    }

    #[test]
    fn bad_timeouts_are_reported_with_line_and_field() {
        let got = problems(
            "name='p'\n[defaults]\ntimeout='soon'\n[[epics]]\nkey='a'\n\
             [[epics.stories]]\nkey='x'\ncommand='true'\ntimeout='0s'\n\
             [[epics.stories]]\nkey='y'\ncommand='true'\ntimeout='400d'\n",
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got[0].starts_with("3:9: defaults.timeout: \"soon\" is not a duration"),
            "{got:?}"
        );
        assert_eq!(
            got[1],
            "9:9: epics[0].stories[0].timeout: \"0s\" is no time at all; a timeout must be more than 0"
        );
        assert_eq!(
            got[2],
            "13:9: epics[0].stories[1].timeout: \"400d\" is longer than the most a timeout may be (30 days)"
        );
        let got = problems("name='p'\n[defaults]\ntimeout='1s'\nretries=2\n[[epics]]\nkey='a'\n");
        assert!(got[0].contains("retries"), "{got:?}");
    }

    #[test]
    fn durations_read_back_as_written() {
        assert_eq!(super::describe(Duration::from_millis(1500)), "1s 500ms");
        assert_eq!(super::describe(Duration::from_secs(1800)), "30m");
    }
}

//! The HTML, with maud: every `(expression)` is escaped, and nothing from the database is ever
//! marked pre-escaped.

use super::ansi;
use super::live::{Line, StoryFilter};
use crate::runs::{RunSummary, describe_ms};
use crate::status::{RunTree, StoryView};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use uuid::Uuid;

/// A whole page around `body`.
pub(crate) fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · run-engine" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "run-engine" }
                    nav { a href="/" { "Runs" } }
                }
                main { (body) }
            }
        }
    }
}

fn status_badge(status: &str) -> Markup {
    html! { span class=(format!("badge st-{status}")) data-status=(status) { (status) } }
}

fn duration_between(start: Option<&str>, end: Option<&str>) -> Option<String> {
    let start: DateTime<Utc> = start?.parse().ok()?;
    let end: DateTime<Utc> = match end {
        Some(end) => end.parse().ok()?,
        None => Utc::now(),
    };
    Some(describe_ms((end - start).num_milliseconds()))
}

/// A timestamp as people read it: `2026-12-06 21:01:50`.
fn when(ts: Option<&str>) -> String {
    ts.and_then(|t| t.parse::<DateTime<Utc>>().ok())
        .map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
}

/// The runs listing.
pub(crate) fn runs_page(runs: &[RunSummary], page: u64, more: bool) -> Markup {
    layout(
        "Runs",
        html! {
            h1 { "Runs" }
            @if runs.is_empty() {
                p.empty { "No runs here. Create one with " code { "run-engine run PLAN" } "." }
            } @else {
                table.runs {
                    thead { tr { th { "Run" } th { "Status" } th { "Progress" } th { "Started" } th { "Duration" } th { "Id" } } }
                    tbody {
                        @for r in runs {
                            tr {
                                td { a href=(format!("/runs/{}", r.id)) { (r.title) } " " span.key { (r.key) } }
                                td { (status_badge(&r.status)) @if r.paused { " " span.badge.paused { "paused" } } }
                                td {
                                    progress max=(r.counts.total().max(1)) value=(r.counts.finished()) {}
                                    " " (r.counts.finished()) "/" (r.counts.total())
                                }
                                td { (when(r.started_at.as_deref())) }
                                td { (r.duration_ms.map_or_else(|| "-".to_owned(), describe_ms)) }
                                td.id { code { (r.id) } }
                            }
                        }
                    }
                }
            }
            nav.pager {
                @if page > 0 { a rel="prev" href=(format!("/?page={}", page - 1)) { "← newer" } }
                @if more { a rel="next" href=(format!("/?page={}", page + 1)) { "older →" } }
            }
        },
    )
}

fn action(run_id: Uuid, what: &str, label: &str, csrf: &str, class: &str) -> Markup {
    html! {
        form.action method="post" action=(format!("/runs/{run_id}/{what}")) {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" class=(class) id=(format!("action-{what}")) { (label) }
        }
    }
}

fn story_row(run_id: Uuid, epic: &str, s: &StoryView, csrf: &str) -> Markup {
    let name = format!("{epic}.{}", s.key);
    let finished = matches!(
        s.status.as_str(),
        "completed" | "failed" | "cancelled" | "skipped"
    );
    html! {
        tr.story id=(format!("story-{name}")) data-status=(s.status) {
            td.key { (s.key) div.title { (s.title) } }
            td { (status_badge(&s.status)) }
            td { (s.attempts) "/" (s.max_attempts) }
            td.worker { (s.lease_owner.as_deref().unwrap_or("-")) }
            td { (when(s.started_at.as_deref())) }
            td { (duration_between(s.started_at.as_deref(), s.finished_at.as_deref()).unwrap_or_else(|| "-".to_owned())) }
            td.why {
                @if !s.waiting_on.is_empty() {
                    span.waits { "waits on " (s.waiting_on.join(", ")) }
                }
                @if let Some(at) = &s.retry_at { span.waits { "retry at " (when(Some(at))) } }
                @if let Some(error) = &s.error {
                    span class=(if s.status == "skipped" { "skip-why" } else { "error" }) { (error) }
                }
            }
            td.cmd { @if let Some(c) = &s.command { code { (c) } } }
            td.acts {
                a href=(format!("/runs/{run_id}/log?story={}", urlencode(&name))) { "log" }
                @if !finished {
                    form.action method="post" action=(format!("/runs/{run_id}/stories/cancel")) {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="story" value=(name);
                        button.small.danger type="submit" { "cancel" }
                    }
                }
            }
        }
    }
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The run's live section: header, actions, graph, epics and stories. Rendered once per change
/// by the run's poller and sent to every page that watches it.
pub(crate) fn run_section(tree: &RunTree, csrf: &str) -> Markup {
    let r = &tree.run;
    let finished = matches!(r.status.as_str(), "completed" | "failed" | "cancelled");
    html! {
        div.run-head {
            h1 { (r.title) " " span.key { (r.key) } }
            p {
                span #run-status data-status=(r.status) { (status_badge(&r.status)) }
                @if r.paused_at.is_some() && !finished { " " span.badge.paused #run-paused { "paused" } }
                " "
                progress max=(r.counts.total().max(1)) value=(r.counts.finished()) {}
                " " span #run-progress { (r.counts.finished()) "/" (r.counts.total()) " finished (" (r.progress_percent) "%)" }
                " · started " (when(r.started_at.as_deref()))
                " · " (duration_between(r.started_at.as_deref(), r.finished_at.as_deref()).unwrap_or_else(|| "-".to_owned()))
            }
            p.counts {
                @for (n, name) in [(r.counts.completed, "completed"), (r.counts.running, "running"), (r.counts.pending, "pending"), (r.counts.failed, "failed"), (r.counts.skipped, "skipped"), (r.counts.cancelled, "cancelled")] {
                    @if n > 0 { span class=(format!("count st-{name}")) { (n) " " (name) } " " }
                }
            }
            @if let Some(error) = &r.error { p.error { (error) } }
            @if !r.limits.is_empty() {
                p.limits { "limits: " @for l in &r.limits { span.limit { (l.name) " " (l.in_use) "/" (l.capacity) } " " } }
            }
            div.actions {
                a.button href=(format!("/runs/{}/log", r.id)) { "Log" }
                a.button href=(format!("/api/runs/{}", r.id)) { "JSON" }
                @if !finished {
                    @if r.paused_at.is_some() {
                        (action(r.id, "resume", "Resume", csrf, ""))
                    } @else {
                        (action(r.id, "pause", "Pause", csrf, ""))
                    }
                    (action(r.id, "cancel", "Cancel run", csrf, "danger"))
                }
            }
        }
        section.graph-box { h2 { "Graph" } div.graph-scroll { (super::svg::render(tree)) } }
        @for e in &tree.epics {
            section.epic id=(format!("epic-{}", e.key)) {
                h2 {
                    (e.title) " " span.key { (e.key) } " " (status_badge(&e.status))
                    " " span.small { (e.counts.finished()) "/" (e.counts.total()) }
                    @if !e.needs.is_empty() { " " span.needs { "needs " (e.needs.join(", ")) } }
                }
                @if let Some(error) = &e.error { p.error { (error) } }
                table.stories {
                    thead { tr { th { "Story" } th { "Status" } th { "Attempts" } th { "Worker" } th { "Started" } th { "Duration" } th { "Waits on / why" } th { "Command" } th {} } }
                    tbody { @for s in &e.stories { (story_row(r.id, &e.key, s, csrf)) } }
                }
            }
        }
    }
}

/// The run page: the section, and the hook the script follows.
pub(crate) fn run_page(tree: &RunTree, section_html: &str) -> Markup {
    layout(
        &tree.run.title,
        html! {
            div #run data-events=(format!("/runs/{}/events", tree.run.id)) {
                // Rendered by `run_section` from the same tree: already escaped.
                (maud::PreEscaped(section_html))
            }
            p.live #live-state { "live" }
        },
    )
}

/// Log lines as HTML rows.
pub(crate) fn log_lines(lines: &[Line]) -> Markup {
    html! {
        @for l in lines {
            div.line data-seq=(l.seq) { span.ts { (l.at) } " " span.msg { (ansi::to_html(&l.message)) } }
        }
    }
}

/// The log page: the last lines, then new ones live.
pub(crate) fn log_page(
    run: &entity::run::Model,
    lines: &[Line],
    cursor: i64,
    filter: Option<&StoryFilter>,
    before: Option<i64>,
) -> Markup {
    let story = filter.map(|f| f.name().to_owned()).unwrap_or_default();
    let mut events = format!("/runs/{}/log/events?after={cursor}", run.id);
    if !story.is_empty() {
        events.push_str("&story=");
        events.push_str(&urlencode(&story));
    }
    let older = lines.first().map(|l| l.seq - 1).filter(|&s| s > 0);
    let story_q = if story.is_empty() {
        String::new()
    } else {
        format!("&story={}", urlencode(&story))
    };
    layout(
        &format!("Log of {}", run.title),
        html! {
            h1 { "Log: " a href=(format!("/runs/{}", run.id)) { (run.title) } " " (status_badge(&run.status)) }
            form.filter method="get" action=(format!("/runs/{}/log", run.id)) {
                label { "Story " input type="text" name="story" value=(story) placeholder="epic.story"; }
                button type="submit" { "Filter" }
                @if !story.is_empty() { " " a href=(format!("/runs/{}/log", run.id)) { "all stories" } }
            }
            @if let Some(older) = older {
                p { a #older href=(format!("/runs/{}/log?before={older}{story_q}", run.id)) { "← older lines" } }
            }
            @if before.is_some() {
                div #log.log { (log_lines(lines)) }
                p { a href=(format!("/runs/{}/log{}", run.id, if story.is_empty() { String::new() } else { format!("?story={}", urlencode(&story)) })) { "latest lines →" } }
            } @else {
                div #log.log data-events=(events) { (log_lines(lines)) }
                p.live #live-state { "live" }
            }
        },
    )
}

/// A page that says what went wrong.
pub(crate) fn error_page(title: &str, message: &str) -> Markup {
    layout(
        title,
        html! { h1 { (title) } p.error { (message) } p { a href="/" { "All runs" } } },
    )
}

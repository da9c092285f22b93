//! The routes and their handlers.

use super::live::{StoryFilter, log_lines, log_tail};
use super::{AppState, LOG_PAGE, RUNS_PER_PAGE, auth, pages};
use crate::error::EngineError;
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde::Deserialize;
use std::collections::HashMap;
use std::convert::Infallible;
use uuid::Uuid;

const APP_JS: &str = include_str!("static/app.js");
const APP_CSS: &str = include_str!("static/app.css");

pub(crate) fn router(state: AppState) -> Router {
    let security = state.security.clone();
    Router::new()
        .route("/", get(runs))
        .route("/runs/{id}", get(run))
        .route("/runs/{id}/events", get(run_events))
        .route("/runs/{id}/log", get(log))
        .route("/runs/{id}/log/events", get(log_events))
        .route("/api/runs/{id}", get(api_run))
        .route("/api/stats", get(api_stats))
        .route("/runs/{id}/cancel", post(cancel))
        .route("/runs/{id}/pause", post(pause))
        .route("/runs/{id}/resume", post(resume))
        .route("/runs/{id}/stories/cancel", post(cancel_story))
        .route("/static/app.js", get(app_js))
        .route("/static/app.css", get(app_css))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(security, auth::guard))
        .with_state(state)
}

/// An error as a page.
struct PageError(StatusCode, String);

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = self.0.canonical_reason().unwrap_or("Error");
        (
            self.0,
            Html(pages::error_page(title, &self.1).into_string()),
        )
            .into_response()
    }
}

impl From<EngineError> for PageError {
    fn from(e: EngineError) -> PageError {
        let status = match &e {
            EngineError::RunNotFound(_)
            | EngineError::StoryNotFound { .. }
            | EngineError::Log(run_domain::LogError::RunNotFound { .. }) => StatusCode::NOT_FOUND,
            EngineError::RunFinished { .. } => StatusCode::CONFLICT,
            _ => {
                tracing::warn!(error = %e, "a request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        PageError(status, run_domain::redact_text(&e.to_string()))
    }
}

fn run_id(text: &str) -> Result<Uuid, PageError> {
    Uuid::parse_str(text)
        .map_err(|_| PageError(StatusCode::NOT_FOUND, format!("{text:?} is not a run id")))
}

async fn not_found() -> PageError {
    PageError(StatusCode::NOT_FOUND, "nothing here".to_owned())
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

#[derive(Deserialize)]
struct RunsQuery {
    page: Option<u64>,
}

async fn runs(
    State(state): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Html<String>, PageError> {
    let max_page = crate::runs::MAX_RUNS_LISTED / RUNS_PER_PAGE - 1;
    let page = q.page.unwrap_or(0).min(max_page);
    let want = (page + 1) * RUNS_PER_PAGE + 1;
    let mut all = crate::runs::list_runs(&state.db, None, want).await?;
    let more = all.len() as u64 == want && page < max_page;
    let start = usize::try_from(page * RUNS_PER_PAGE).unwrap_or(usize::MAX);
    let shown: Vec<_> = all
        .drain(start.min(all.len())..)
        .take(RUNS_PER_PAGE as usize)
        .collect();
    Ok(Html(pages::runs_page(&shown, page, more).into_string()))
}

async fn run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, PageError> {
    let id = run_id(&id)?;
    let rx = state.runs.subscribe(id, true).await?;
    let snapshot = rx.borrow().clone();
    Ok(Html(pages::run_page(&snapshot.tree, &snapshot.html).into_string()).into_response())
}

async fn run_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id = run_id(&id)?;
    let rx = state.runs.subscribe(id, false).await?;
    let stream = tokio_stream::wrappers::WatchStream::new(rx).map(|snapshot| {
        // A carriage return would end an SSE line early.
        Ok::<_, Infallible>(
            Event::default()
                .event("run")
                .data(snapshot.html.replace('\r', "\n")),
        )
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn api_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id = run_id(&id)?;
    let tree = crate::status::load_run_tree(&state.db, id).await?;
    // The same text `run-engine status --json` prints.
    let body = serde_json::to_string_pretty(&tree)
        .map_err(|e| PageError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response())
}

async fn api_stats(State(state): State<AppState>) -> axum::Json<super::live::StatsView> {
    axum::Json(state.runs.stats())
}

#[derive(Deserialize)]
struct LogQuery {
    story: Option<String>,
    before: Option<i64>,
    after: Option<i64>,
}

async fn log(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Html<String>, PageError> {
    use sea_orm::EntityTrait;
    let id = run_id(&id)?;
    let run = entity::run::Entity::find_by_id(id)
        .one(&state.db)
        .await
        .map_err(EngineError::from)?
        .ok_or(EngineError::RunNotFound(id))?;
    let filter = q.story.as_deref().and_then(StoryFilter::new);
    let (lines, cursor) = log_tail(&state.db, id, q.before, filter.as_ref(), LOG_PAGE).await?;
    Ok(Html(
        pages::log_page(&run, &lines, cursor.0, filter.as_ref(), q.before).into_string(),
    ))
}

async fn log_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    use sea_orm::EntityTrait;
    let id = run_id(&id)?;
    entity::run::Entity::find_by_id(id)
        .one(&state.db)
        .await
        .map_err(EngineError::from)?
        .ok_or(EngineError::RunNotFound(id))?;
    // A reconnecting browser says where it was.
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let cursor = run_domain::LogCursor(last.or(q.after).unwrap_or(0).max(0));
    let filter = q.story.as_deref().and_then(StoryFilter::new);
    let stream = log_lines(state.db.clone(), id, cursor, filter, state.stats.clone()).map(
        |(lines, cursor)| {
            let html = pages::log_lines(&lines).into_string().replace('\r', "\n");
            let event = Event::default().event("lines").id(cursor.0.to_string());
            // An event without data is not delivered: a move of the cursor alone is a comment.
            Ok::<_, Infallible>(if lines.is_empty() {
                event.comment("cursor")
            } else {
                event.data(html)
            })
        },
    );
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The form of an action: its CSRF token, and for a story, which.
/// The run an action's form is posted for, once its id parses and its CSRF token matches.
fn checked_action(
    state: &AppState,
    id: &str,
    form: &HashMap<String, String>,
) -> Result<Uuid, PageError> {
    let id = run_id(id)?;
    checked_form(state, form)?;
    Ok(id)
}

fn checked_form(state: &AppState, form: &HashMap<String, String>) -> Result<(), PageError> {
    let given = form.get("csrf").map(String::as_str).unwrap_or("");
    if state.security.csrf_matches(given) {
        Ok(())
    } else {
        Err(PageError(
            StatusCode::FORBIDDEN,
            "this form is stale or came from elsewhere (missing or wrong CSRF token): reload the page"
                .to_owned(),
        ))
    }
}

fn back_to(id: Uuid) -> Response {
    Redirect::to(&format!("/runs/{id}")).into_response()
}

async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let id = checked_action(&state, &id, &form)?;
    let report = crate::cancel::cancel_run(&state.db, id).await?;
    tracing::info!(run_id = %id, cancelled = report.stories_cancelled, "run cancelled from the web view");
    Ok(back_to(id))
}

async fn pause(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let id = checked_action(&state, &id, &form)?;
    crate::control::pause_run(&state.db, id).await?;
    Ok(back_to(id))
}

async fn resume(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let id = checked_action(&state, &id, &form)?;
    crate::control::resume_run(&state.db, id).await?;
    Ok(back_to(id))
}

async fn cancel_story(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let id = checked_action(&state, &id, &form)?;
    let story = form.get("story").map(String::as_str).unwrap_or("");
    crate::control::cancel_story(&state.db, id, story).await?;
    Ok(back_to(id))
}

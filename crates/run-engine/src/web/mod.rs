//! `run-engine serve`: a live web view of runs, server-rendered.
//!
//! - `/`: recent runs, newest first, paged (`?page=N`), with status, progress, start and
//!   duration.
//! - `/runs/<id>`: a run's epics and stories (status, attempts, worker, timings, what a pending
//!   story waits on, why a skipped one was skipped), its graph of needs as inline SVG, and the
//!   actions (cancel, pause, resume the run; cancel one story). It updates live through
//!   server-sent events (`/runs/<id>/events`).
//! - `/runs/<id>/log`: the run's log, its last lines then new ones as they come
//!   (`/runs/<id>/log/events`), optionally one story's (`?story=epic.story`), and older pages
//!   (`?before=SEQ`). It is read in pages from a cursor: no log is ever held whole in memory.
//! - `/api/runs/<id>`: the [`RunTree`](crate::RunTree) as JSON, exactly what
//!   `run-engine status --json` prints.
//! - `/api/stats`: what the server has asked of the database so far ([`live::StatsView`]).
//!
//! Every page reads the same view model as `status` ([`crate::load_run_tree`]); every text from
//! the database goes through the template's escaping ([`maud`]), and ANSI colour in log lines
//! becomes `<span>`s with classes ([`ansi`]). Security rules live in [`auth`]: loopback by
//! default, a token for anything else, same-origin POSTs carrying a per-server CSRF token, and a
//! Content-Security-Policy that allows no inline script.
//!
//! The database cost of open pages is bounded ([`live`]): one shared poller per watched run
//! (six queries at most every [`RUN_POLL`]), however many pages watch it; one log query per
//! [`LOG_POLL`] per open log page, whatever the log's length.

pub mod ansi;
pub mod auth;
pub mod live;
mod pages;
mod routes;
pub mod svg;

use sea_orm::DatabaseConnection;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often the shared poller of a watched run reads its tree.
pub const RUN_POLL: Duration = Duration::from_millis(500);

/// How often an open log page asks for new lines.
pub const LOG_POLL: Duration = Duration::from_millis(500);

/// Log lines read per query (and the most lines one page shows).
pub const LOG_PAGE: u64 = 500;

/// Runs listed per page.
pub const RUNS_PER_PAGE: u64 = 50;

/// How `serve` listens.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The address to bind (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The token every request must carry; required to bind anything but loopback.
    pub token: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
        }
    }
}

/// Why `serve` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// A non-loopback address without a token.
    #[error(
        "refusing to listen on {0} without --token: anyone who can reach it could cancel runs \
         (bind 127.0.0.1 or [::1], or give a token every request must carry)"
    )]
    TokenRequired(SocketAddr),
    /// A token too short to guess at, or with characters a cookie cannot carry.
    #[error(
        "the token must be at least 16 characters, each a letter, a digit or one of - . _ ~ + / ="
    )]
    WeakToken,
    /// The address could not be bound, or the server failed.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) db: DatabaseConnection,
    pub(crate) security: Arc<auth::Security>,
    pub(crate) runs: Arc<live::RunWatchers>,
    pub(crate) stats: Arc<live::Stats>,
}

/// Checks `config` (a non-loopback address needs a token) and binds it.
pub async fn bind(config: &ServeConfig) -> Result<tokio::net::TcpListener, WebError> {
    auth::check_config(config)?;
    tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| WebError::Io {
            addr: config.listen,
            source,
        })
}

/// The application: every route, with the security layer.
pub fn router(db: DatabaseConnection, config: &ServeConfig, listen: SocketAddr) -> axum::Router {
    let security = Arc::new(auth::Security::new(config.token.clone(), listen));
    let stats = Arc::new(live::Stats::default());
    let state = AppState {
        runs: Arc::new(live::RunWatchers::new(
            db.clone(),
            security.csrf().to_owned(),
            stats.clone(),
        )),
        stats,
        db,
        security,
    };
    routes::router(state)
}

/// Serves the web view on `config.listen` until the server fails (or its task is dropped).
///
/// ```no_run
/// # async fn demo(db: sea_orm::DatabaseConnection) -> Result<(), run_engine::web::WebError> {
/// run_engine::web::serve(db, run_engine::web::ServeConfig::default()).await?;
/// # Ok(()) }
/// ```
pub async fn serve(db: DatabaseConnection, config: ServeConfig) -> Result<(), WebError> {
    let listener = bind(&config).await?;
    serve_on(listener, db, &config).await
}

/// Serves on a bound listener (see [`bind`]) until the server fails. The address it is bound
/// to is checked as [`bind`] checks `config.listen`: anything but loopback needs a token.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    db: DatabaseConnection,
    config: &ServeConfig,
) -> Result<(), WebError> {
    let io = |addr: SocketAddr| move |source| WebError::Io { addr, source };
    let addr = listener.local_addr().map_err(io(config.listen))?;
    auth::check_config(&ServeConfig {
        listen: addr,
        token: config.token.clone(),
    })?;
    let app = router(db, config, addr);
    tracing::info!(%addr, "serving the web view");
    axum::serve(listener, app).await.map_err(io(addr))
}

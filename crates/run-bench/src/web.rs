//! The web view (`run-engine serve`, the real binary in a child process), on SQLite and
//! PostgreSQL:
//!
//! - **Time to first byte** of a run page with 10,000 stories (one epic), and to its last
//!   byte, each the median of 5 requests after one to warm up; the page's size.
//! - **Queries from 50 open run pages**: 50 server-sent event streams on that run (each
//!   drained by its own thread); the server's own count of tree reads (`/api/stats`, each five
//!   or six queries) over a 5 s window, as a rate.
//! - **Peak memory of `serve` while 10 clients follow a large log** (the memory profile's log,
//!   100 MiB in the full profile): a fresh `serve`, 10 streams from the log's start, each read
//!   to the last line; the child's `VmHWM` after, against its `VmRSS` before.

use crate::bench_db::{Backend, BenchDb, Measured, Servers};
use crate::log_append::prefilled_run;
use crate::measure::{Profile, median};
use crate::memory::run_engine_binary;
use crate::report::{Bound, Goal, Section, Table, fmt_bytes};
use anyhow::{Context, ensure};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Stories in the run whose page is timed.
pub const STORIES: usize = 10_000;
/// Open run pages.
pub const PAGES: usize = 50;
/// Clients following the log.
pub const FOLLOWERS: usize = 10;
/// Queries per tree read, at most.
pub const QUERIES_PER_READ: f64 = 6.0;

/// One backend's figures.
#[derive(Debug, Clone)]
pub struct WebFigures {
    /// Time to first byte, ms.
    pub ttfb_ms: Vec<f64>,
    /// Time to the last byte, ms.
    pub page_ms: Vec<f64>,
    /// The page's size.
    pub page_bytes: u64,
    /// Tree reads a second with 50 pages open.
    pub tree_reads_per_s: f64,
    /// The log's size.
    pub log_bytes: u64,
    /// `serve`'s resident set before the followers, KiB.
    pub rss_before_kib: u64,
    /// `serve`'s peak resident set after them, KiB.
    pub peak_kib: u64,
    /// Seconds until the last follower had read the whole log.
    pub follow_secs: f64,
}

/// The scenario's results.
#[derive(Debug)]
pub struct WebResults {
    backends: Vec<(Backend, Measured<WebFigures>)>,
}

/// A `run-engine serve` child, killed when dropped.
struct ServeChild {
    child: Child,
    port: u16,
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServeChild {
    async fn start(binary: &Path, url: &str) -> anyhow::Result<ServeChild> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary)
            .args(["--database-url", url, "serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env_remove("DATABASE_URL")
            .env_remove("RUN_ENGINE_WEB_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting run-engine serve")?;
        let serve = ServeChild { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "serve did not answer in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(serve)
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field} in /proc/<serve>/status"))
    }
}

fn request(port: u16, path: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    Ok(stream)
}

/// (time to first byte, time to last byte, bytes) of one GET.
fn time_get(port: u16, path: &str) -> anyhow::Result<(f64, f64, u64)> {
    let started = Instant::now();
    let mut stream = request(port, path)?;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first)?;
    let ttfb = started.elapsed().as_secs_f64() * 1000.0;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    let total = started.elapsed().as_secs_f64() * 1000.0;
    let text = String::from_utf8_lossy(&rest);
    ensure!(
        first[0] == b'H' && text.starts_with("TTP/1.1 200"),
        "{path}: {}",
        text.chars().take(200).collect::<String>()
    );
    Ok((ttfb, total, rest.len() as u64 + 1))
}

fn tree_reads(port: u16) -> anyhow::Result<u64> {
    let mut stream = request(port, "/api/stats")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let at = text.find("\"tree_reads\":").context("no tree_reads")? + 13;
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .context("tree_reads is not a number")
}

/// Reads an event stream until an `id:` of at least `last` (or the end); bytes read.
fn follow_to(port: u16, path: &str, last: i64) -> anyhow::Result<u64> {
    let stream = request(port, path)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut bytes = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        ensure!(n > 0, "the stream ended before line {last}");
        bytes += n as u64;
        if let Some(id) = line
            .strip_prefix("id: ")
            .or_else(|| line.strip_prefix("id:"))
            && id.trim().parse::<i64>().is_ok_and(|id| id >= last)
        {
            return Ok(bytes);
        }
    }
}

async fn measure_on(bench: &BenchDb, binary: &Path, log_bytes: u64) -> anyhow::Result<WebFigures> {
    let run_id = crate::executor::new_run(&bench.db, STORIES).await?;
    let serve = ServeChild::start(binary, &bench.url).await?;
    let port = serve.port;
    let page = format!("/runs/{run_id}");
    let samples = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(f64, f64, u64)>> {
        time_get(port, &page)?;
        (0..5).map(|_| time_get(port, &page)).collect()
    })
    .await??;

    // 50 open pages, each stream drained by a thread.
    let events = format!("/runs/{run_id}/events");
    let mut streams = Vec::new();
    for _ in 0..PAGES {
        let mut stream = request(port, &events)?;
        let reader = stream.try_clone()?;
        streams.push(stream.try_clone()?);
        std::thread::spawn(move || {
            let mut reader = reader;
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
        });
        stream.flush()?;
    }
    // Let every stream get its first snapshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = tree_reads(port)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = tree_reads(port)?;
    let tree_reads_per_s = (after - before) as f64 / started.elapsed().as_secs_f64();
    for s in &streams {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop(serve);

    // A fresh server for the followers.
    let log_run = prefilled_run(&bench.db, log_bytes).await?;
    let last = {
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
        entity::run_log::Entity::find()
            .filter(entity::run_log::Column::RunId.eq(log_run))
            .order_by_desc(entity::run_log::Column::Seq)
            .one(&bench.db)
            .await?
            .map_or(0, |r| r.seq)
    };
    let serve = ServeChild::start(binary, &bench.url).await?;
    let port = serve.port;
    let rss_before_kib = serve.status_kib("VmRSS")?;
    let path = format!("/runs/{log_run}/log/events?after=0");
    let started = Instant::now();
    let followers: Vec<_> = (0..FOLLOWERS)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || follow_to(port, &path, last))
        })
        .collect();
    let done = tokio::task::spawn_blocking(move || {
        followers
            .into_iter()
            .map(|f| {
                f.join()
                    .map_err(|_| anyhow::anyhow!("a follower panicked"))?
            })
            .collect::<anyhow::Result<Vec<u64>>>()
    })
    .await??;
    let follow_secs = started.elapsed().as_secs_f64();
    ensure!(done.len() == FOLLOWERS, "followers lost");
    let peak_kib = serve.status_kib("VmHWM")?;
    Ok(WebFigures {
        ttfb_ms: samples.iter().map(|s| s.0).collect(),
        page_ms: samples.iter().map(|s| s.1).collect(),
        page_bytes: samples.first().map_or(0, |s| s.2),
        tree_reads_per_s,
        log_bytes,
        rss_before_kib,
        peak_kib,
        follow_secs,
    })
}

/// Runs the scenario on SQLite and PostgreSQL.
pub async fn run(servers: &Servers, profile: &Profile) -> WebResults {
    eprintln!("[run-bench] web: building run-engine for `serve` (quick when up to date)");
    let binary = run_engine_binary().await.map_err(|e| format!("{e:#}"));
    let mut backends = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        eprintln!("[run-bench] web: {}", backend.name());
        let measured = match &binary {
            Err(why) => Measured::Failed(why.clone()),
            Ok(binary) => {
                servers
                    .measure(backend, async |bench| {
                        measure_on(bench, binary, profile.memory_log_bytes).await
                    })
                    .await
            }
        };
        backends.push((backend, measured));
    }
    WebResults { backends }
}

impl WebResults {
    /// The goals: 50 open pages read the tree no more often than one poller does (every
    /// 500 ms: 2 reads a second); `serve` grows by less than half the log its 10 followers
    /// read (it holds one page of lines per follower, not the log).
    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        for (backend, m) in &self.backends {
            if let Some(f) = m.done() {
                goals.push(Goal {
                    what: "web: tree reads/s of 50 open run pages / one poller's (2/s)".to_owned(),
                    context: format!("{}, {STORIES} stories", backend.name()),
                    measured: f.tree_reads_per_s / 2.0,
                    bound: Bound::AtMost(1.05),
                });
                goals.push(Goal {
                    what: "web: serve's memory growth, 10 followers / the log's size".to_owned(),
                    context: format!("{}, {} log", backend.name(), fmt_bytes(f.log_bytes)),
                    measured: (f.peak_kib.saturating_sub(f.rss_before_kib) * 1024) as f64
                        / f.log_bytes.max(1) as f64,
                    bound: Bound::AtMost(0.5),
                });
            }
        }
        goals
    }

    /// The report's section.
    pub fn section(&self) -> Section {
        let mut body = String::from(
            "`run-engine serve` (the release binary, a child process) on a fresh database. Time \
             to first byte and to the last byte of the page of a run of 10,000 stories (one \
             epic, pending), median of 5 after one warm-up; then 50 event streams of that run \
             open at once, and the server's own count of tree reads (`/api/stats`; each read is \
             five or six queries) over 5 s; then a fresh server, and 10 clients following the \
             log from its start to its last line at once: the server's peak resident set \
             (`VmHWM`) against its resident set before.\n\n",
        );
        let mut table = Table::new(&[
            "backend",
            "TTFB, 10k stories (ms)",
            "whole page (ms)",
            "page size",
            "tree reads/s, 50 pages",
            "queries/s (≤ 6 per read)",
            "log",
            "serve RSS before",
            "serve peak, 10 followers",
            "followers done in",
        ]);
        for (backend, m) in &self.backends {
            match m {
                Measured::Done(f) => table.row(vec![
                    backend.name().to_owned(),
                    format!("{:.0}", median(&f.ttfb_ms)),
                    format!("{:.0}", median(&f.page_ms)),
                    fmt_bytes(f.page_bytes),
                    format!("{:.2}", f.tree_reads_per_s),
                    format!("{:.1}", f.tree_reads_per_s * QUERIES_PER_READ),
                    fmt_bytes(f.log_bytes),
                    fmt_bytes(f.rss_before_kib * 1024),
                    fmt_bytes(f.peak_kib * 1024),
                    format!("{:.1} s", f.follow_secs),
                ]),
                Measured::Skipped(why) | Measured::Failed(why) => {
                    let mut row = vec![backend.name().to_owned(), why.clone()];
                    row.resize(10, String::new());
                    table.row(row);
                }
            }
        }
        body.push_str(&table.to_markdown());
        body.push_str(
            "\nThe 50 pages share one poller (one tree read every 500 ms at most while a page \
             watches), so their cost is that of one page. Each follower reads 500 lines a \
             query from its cursor and the server holds one page per follower, whatever the \
             log's size.\n",
        );
        Section {
            title: "Web view: run page, open pages, log followers".to_owned(),
            body,
        }
    }
}

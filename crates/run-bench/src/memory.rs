//! Peak memory of reading a large log, streamed vs built as one `String`; of the
//! `run-engine logs --follow` command on the same log; and of an executor running a large run.
//!
//! [`run_domain::write_run_log`] pages through the log into a writer (here a sink that only
//! counts bytes); [`run_domain::read_run_log`] returns the whole log as a `String`. Each read
//! runs in a fresh child process (this binary re-executed with the hidden `memory-probe`
//! subcommand), which reports its peak resident set (`VmHWM` in `/proc/self/status`), so that
//! the two peaks never mix.
//!
//! The follower is the real command-line tool, `run-engine logs <run> --follow`, built by cargo
//! if needed, on the same log once the run is marked completed. It runs under a small wrapper
//! process (the hidden `memory-peak` subcommand) that spawns only it, waits for it, and reads its
//! peak from `getrusage(RUSAGE_CHILDREN)`.
//!
//! The executor is `run_engine::Executor` with [`EXECUTOR_WORKERS`] workers and a no-op handler,
//! run in a fresh child process (the hidden `memory-executor-probe` subcommand) on a run of each
//! size of [`Profile::executor_memory_stories`], to show how its peak grows with the run.

use crate::bench_db::{Backend, BenchDb, Measured, Servers};
use crate::executor::{NoOp, new_run};
use crate::log_append::prefilled_run;
use crate::measure::{Profile, Summary, median};
use crate::report::{Section, Table, fmt_bytes, fmt_count, fmt_rate, fmt_secs};
use anyhow::{Context, anyhow, bail, ensure};
use run_engine::{Executor, ExecutorConfig};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;
use uuid::Uuid;

/// The hidden subcommand the parent re-executes this binary with.
pub const PROBE_SUBCOMMAND: &str = "memory-probe";

/// The hidden subcommand that executes a run in a fresh process.
pub const EXECUTOR_PROBE_SUBCOMMAND: &str = "memory-executor-probe";

/// The hidden subcommand that runs one command and reports its peak resident set.
pub const PEAK_SUBCOMMAND: &str = "memory-peak";

/// Child processes per reader and backend (the follower included).
pub const REPEATS: usize = 3;

/// Workers of the executor whose memory is measured.
pub const EXECUTOR_WORKERS: usize = 16;

/// The backends the executor's memory is measured on.
pub const EXECUTOR_BACKENDS: [Backend; 3] = Backend::ALL;

/// How the child reads the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// `write_run_log` into a sink.
    Stream,
    /// `read_run_log`, the whole log as one `String`.
    WholeString,
}

impl Reader {
    /// Both readers.
    pub const ALL: [Reader; 2] = [Reader::Stream, Reader::WholeString];

    /// Its command-line name.
    pub fn arg(self) -> &'static str {
        match self {
            Reader::Stream => "stream",
            Reader::WholeString => "string",
        }
    }

    /// The reader named `s` on the command line.
    pub fn from_arg(s: &str) -> Option<Reader> {
        Reader::ALL.into_iter().find(|r| r.arg() == s)
    }

    /// Its name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Reader::Stream => "write_run_log into a sink",
            Reader::WholeString => "read_run_log (one String)",
        }
    }
}

/// What one child process measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Resident set after connecting, before reading (KiB).
    pub start_rss_kib: u64,
    /// Peak resident set of the process (KiB).
    pub peak_kib: u64,
    /// Lines read.
    pub lines: u64,
    /// Bytes of text produced.
    pub bytes: u64,
    /// Seconds the read took.
    pub secs: f64,
}

impl Probe {
    /// The child's one-line report.
    ///
    /// ```
    /// use run_bench::memory::Probe;
    /// let p = Probe { start_rss_kib: 1, peak_kib: 2, lines: 3, bytes: 4, secs: 0.5 };
    /// assert_eq!(Probe::parse(&p.to_line()).ok(), Some(p));
    /// ```
    pub fn to_line(&self) -> String {
        format!(
            "probe start_rss_kib={} peak_kib={} lines={} bytes={} secs={}",
            self.start_rss_kib, self.peak_kib, self.lines, self.bytes, self.secs
        )
    }

    /// Parses [`Probe::to_line`]'s output.
    pub fn parse(line: &str) -> anyhow::Result<Probe> {
        let field = |name: &str| field(line, name);
        Ok(Probe {
            start_rss_kib: field("start_rss_kib")?.parse()?,
            peak_kib: field("peak_kib")?.parse()?,
            lines: field("lines")?.parse()?,
            bytes: field("bytes")?.parse()?,
            secs: field("secs")?.parse()?,
        })
    }
}

/// The value of `name=value` in a child's report line.
fn field<'a>(line: &'a str, name: &str) -> anyhow::Result<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .ok_or_else(|| anyhow!("no {name} in child output {line:?}"))
}

/// What the executor's child process measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExecutorProbe {
    /// Resident set after connecting, before executing (KiB).
    pub start_rss_kib: u64,
    /// Peak resident set of the process (KiB).
    pub peak_kib: u64,
    /// Stories whose result the executor recorded.
    pub stories: u64,
    /// Seconds the execution took.
    pub secs: f64,
    /// Claim statements the executor sent.
    pub claims: u64,
    /// Claims another worker or process won first.
    pub conflicts: u64,
    /// CPU seconds (user and system) the process used executing.
    pub cpu_secs: f64,
}

impl ExecutorProbe {
    /// The child's one-line report.
    ///
    /// ```
    /// use run_bench::memory::ExecutorProbe;
    /// let p = ExecutorProbe { start_rss_kib: 1, peak_kib: 2, stories: 3, secs: 0.5, claims: 2, conflicts: 1, cpu_secs: 0.25 };
    /// assert_eq!(ExecutorProbe::parse(&p.to_line()).unwrap(), p);
    /// ```
    pub fn to_line(&self) -> String {
        format!(
            "executor-probe start_rss_kib={} peak_kib={} stories={} secs={} claims={} conflicts={} cpu_secs={}",
            self.start_rss_kib,
            self.peak_kib,
            self.stories,
            self.secs,
            self.claims,
            self.conflicts,
            self.cpu_secs
        )
    }

    /// Parses [`ExecutorProbe::to_line`]'s output.
    pub fn parse(line: &str) -> anyhow::Result<ExecutorProbe> {
        Ok(ExecutorProbe {
            start_rss_kib: field(line, "start_rss_kib")?.parse()?,
            peak_kib: field(line, "peak_kib")?.parse()?,
            stories: field(line, "stories")?.parse()?,
            secs: field(line, "secs")?.parse()?,
            claims: field(line, "claims")?.parse()?,
            conflicts: field(line, "conflicts")?.parse()?,
            cpu_secs: field(line, "cpu_secs")?.parse()?,
        })
    }

    /// Peak minus the resident set before executing (KiB).
    pub fn growth_kib(&self) -> u64 {
        self.peak_kib.saturating_sub(self.start_rss_kib)
    }
}

/// What the wrapper measured of the one command it ran.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakProbe {
    /// The command's peak resident set (KiB), from `getrusage(RUSAGE_CHILDREN)`.
    pub peak_kib: u64,
    /// Seconds from spawning the command to its exit.
    pub secs: f64,
}

impl PeakProbe {
    /// The wrapper's one-line report.
    ///
    /// ```
    /// use run_bench::memory::PeakProbe;
    /// let p = PeakProbe { peak_kib: 2, secs: 0.5 };
    /// assert_eq!(PeakProbe::parse(&p.to_line()).unwrap(), p);
    /// ```
    pub fn to_line(&self) -> String {
        format!("peak peak_kib={} secs={}", self.peak_kib, self.secs)
    }

    /// Parses [`PeakProbe::to_line`]'s output.
    pub fn parse(line: &str) -> anyhow::Result<PeakProbe> {
        Ok(PeakProbe {
            peak_kib: field(line, "peak_kib")?.parse()?,
            secs: field(line, "secs")?.parse()?,
        })
    }
}

/// A field of `/proc/self/status` in KiB (`VmHWM`, `VmRSS`).
pub fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status (memory figures need Linux)")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/self/status"))
}

/// A writer that discards everything, like `std::io::sink`, and counts the bytes.
#[derive(Debug, Default)]
struct CountingSink {
    bytes: u64,
}

impl std::io::Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The child's side: connects to `url`, reads run `run_id`'s log with `reader`, and reports.
pub async fn probe(url: &str, run_id: Uuid, reader: Reader) -> anyhow::Result<Probe> {
    let db = run_domain::connect(url).await?;
    let start_rss_kib = status_kib("VmRSS")?;
    let start = Instant::now();
    let (lines, bytes) = match reader {
        Reader::Stream => {
            let mut sink = CountingSink::default();
            let lines = run_domain::write_run_log(&db, run_id, &mut sink).await?;
            (lines, sink.bytes)
        }
        Reader::WholeString => {
            let text = run_domain::read_run_log(&db, run_id).await?;
            (text.lines().count() as u64, text.len() as u64)
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let peak_kib = status_kib("VmHWM")?;
    db.close().await.ok();
    Ok(Probe {
        start_rss_kib,
        peak_kib,
        lines,
        bytes,
        secs,
    })
}

/// The wrapper's side: runs `command` (program and arguments) with no input and its output
/// discarded, waits for it, and reports its peak resident set. The wrapper must have started no
/// other child: `RUSAGE_CHILDREN` reports the largest peak among the waited-for children.
pub fn peak_of(command: &[String]) -> anyhow::Result<PeakProbe> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("{PEAK_SUBCOMMAND}: no command given"))?;
    let start = Instant::now();
    let status = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("starting {program}"))?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(status.success(), "{program} exited with {status}");
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .context("getrusage(RUSAGE_CHILDREN)")?;
    // Linux reports ru_maxrss in KiB.
    let peak_kib = u64::try_from(usage.max_rss()).context("negative ru_maxrss")?;
    Ok(PeakProbe { peak_kib, secs })
}

/// The child's side of the executor probe: connects to `url`, notes its resident set, executes
/// run `run_id` with `workers` workers and a no-op handler, and reports its peak.
pub async fn executor_probe(
    url: &str,
    run_id: Uuid,
    workers: usize,
) -> anyhow::Result<ExecutorProbe> {
    let db = run_domain::connect(url).await?;
    let start_rss_kib = status_kib("VmRSS")?;
    let executor = Executor::new(db.clone(), NoOp, ExecutorConfig::default().workers(workers));
    let cpu = crate::executor::own_cpu_seconds();
    let start = Instant::now();
    let summary = executor.execute(run_id).await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = crate::executor::own_cpu_seconds() - cpu;
    let peak_kib = status_kib("VmHWM")?;
    drop(executor);
    db.close().await.ok();
    ensure!(summary.is_completed(), "run did not complete: {summary}");
    Ok(ExecutorProbe {
        start_rss_kib,
        peak_kib,
        stories: summary.recorded,
        secs,
        claims: summary.claims_tried,
        conflicts: summary.claim_conflicts,
        cpu_secs,
    })
}

/// This binary, to run again: `/proc/self/exe` where there is one, which still names this
/// process's own file when a concurrent `cargo build` has replaced `target/release/run-bench`
/// meanwhile; else [`std::env::current_exe`].
fn this_binary() -> anyhow::Result<PathBuf> {
    let proc = Path::new("/proc/self/exe");
    if proc.exists() {
        return Ok(proc.to_path_buf());
    }
    std::env::current_exe().context("locating the run-bench binary")
}

/// Runs this binary again with `args`, and returns the last line of its output that starts
/// with `marker`.
async fn spawn_child(args: &[&str], marker: &str) -> anyhow::Result<String> {
    let exe = this_binary()?;
    let what = args.first().copied().unwrap_or_default();
    let out = tokio::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("starting {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed with {}: {}",
            out.status,
            one_line(&String::from_utf8_lossy(&out.stderr))
        );
    }
    stdout
        .lines()
        .rfind(|l| l.starts_with(marker))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{what} printed no report: {stdout:?}"))
}

/// Runs one child process and returns its report.
async fn spawn_probe(url: &str, run_id: Uuid, reader: Reader) -> anyhow::Result<Probe> {
    let run_id = run_id.to_string();
    let args = [
        PROBE_SUBCOMMAND,
        "--url",
        url,
        "--run-id",
        &run_id,
        "--reader",
        reader.arg(),
    ];
    Probe::parse(&spawn_child(&args, "probe ").await?)
}

/// Runs the executor on run `run_id` in a child process and returns its report.
async fn spawn_executor_probe(url: &str, run_id: Uuid) -> anyhow::Result<ExecutorProbe> {
    spawn_executor(url, run_id, EXECUTOR_WORKERS).await
}

/// Runs the executor with `workers` workers on run `run_id` in a child process of its own (a
/// process of the run's executors) and returns its report.
pub async fn spawn_executor(
    url: &str,
    run_id: Uuid,
    workers: usize,
) -> anyhow::Result<ExecutorProbe> {
    let run_id = run_id.to_string();
    let workers = workers.to_string();
    let args = [
        EXECUTOR_PROBE_SUBCOMMAND,
        "--url",
        url,
        "--run-id",
        &run_id,
        "--workers",
        &workers,
    ];
    ExecutorProbe::parse(&spawn_child(&args, "executor-probe ").await?)
}

/// Runs `run-engine logs <run_id> --follow` under the wrapper and returns its report.
async fn spawn_follower(binary: &Path, url: &str, run_id: Uuid) -> anyhow::Result<PeakProbe> {
    let binary = binary.to_string_lossy();
    let run_id = run_id.to_string();
    let args = [
        PEAK_SUBCOMMAND,
        "--",
        &binary,
        "--database-url",
        url,
        "logs",
        &run_id,
        "--follow",
    ];
    PeakProbe::parse(&spawn_child(&args, "peak ").await?)
}

/// `text`'s last lines joined on one line, for a table cell or a sentence.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(12)..].join(" / ")
}

/// The `run-engine` binary beside this one, built first by cargo (a no-op when it is up to
/// date), in the same profile as this binary.
pub async fn run_engine_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the run-bench binary")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no folder", exe.display()))?;
    let binary = dir.join(format!("run-engine{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let mut build = tokio::process::Command::new(&cargo);
    build.args([
        "build",
        "--quiet",
        "-p",
        "run-engine",
        "--bin",
        "run-engine",
    ]);
    if dir.file_name().is_none_or(|n| n != "debug") {
        build.arg("--release");
    }
    build.arg("--manifest-path").arg(&manifest);
    let out = build
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", cargo.to_string_lossy()))?;
    ensure!(
        out.status.success(),
        "`cargo build -p run-engine --bin run-engine` failed with {}: {}",
        out.status,
        one_line(&String::from_utf8_lossy(&out.stderr))
    );
    ensure!(
        binary.is_file(),
        "cargo built run-engine, but not at {} (another target folder?)",
        binary.display()
    );
    Ok(binary)
}

/// Marks run `run_id` completed with a plain UPDATE, so that `logs --follow` ends (a bench run:
/// none of the lifecycle's checks apply).
async fn mark_completed(db: &DatabaseConnection, run_id: Uuid) -> anyhow::Result<()> {
    let updated = entity::run::Entity::update_many()
        .col_expr(entity::run::Column::Status, Expr::value("completed"))
        .filter(entity::run::Column::Id.eq(run_id))
        .exec(db)
        .await
        .context("marking the bench run completed")?;
    ensure!(
        updated.rows_affected == 1,
        "run {run_id} not found to mark completed"
    );
    Ok(())
}

/// The follower's figures on one backend.
#[derive(Debug, Clone)]
pub struct FollowerFigures {
    /// `logs --follow` on a finished run with an empty log: the command's own footprint.
    pub empty: Vec<PeakProbe>,
    /// `logs --follow` on the measured log.
    pub full: Vec<PeakProbe>,
}

impl FollowerFigures {
    /// Median peak following the log (KiB).
    pub fn peak(&self) -> Summary {
        Summary::of(
            &self
                .full
                .iter()
                .map(|p| p.peak_kib as f64)
                .collect::<Vec<_>>(),
        )
    }

    /// Peaks following the log minus the median peak following an empty log (KiB).
    pub fn growth(&self) -> Summary {
        let empty = Summary::of(
            &self
                .empty
                .iter()
                .map(|p| p.peak_kib as f64)
                .collect::<Vec<_>>(),
        );
        Summary::of(
            &self
                .full
                .iter()
                .map(|p| (p.peak_kib as f64 - empty.median).max(0.0))
                .collect::<Vec<_>>(),
        )
    }
}

/// The figures of one backend.
#[derive(Debug, Clone)]
pub struct MemoryFigures {
    /// Bytes of messages in the log.
    pub log_bytes: u64,
    /// Reports per reader, in [`Reader::ALL`] order.
    pub probes: Vec<(Reader, Vec<Probe>)>,
    /// `run-engine logs --follow` on the same log, or why it was not measured.
    pub follower: Result<FollowerFigures, String>,
}

impl MemoryFigures {
    /// The reports of `reader`.
    fn of(&self, reader: Reader) -> &[Probe] {
        self.probes
            .iter()
            .find(|(r, _)| *r == reader)
            .map_or(&[], |(_, ps)| ps.as_slice())
    }
}

/// One run size's executor figures.
#[derive(Debug, Clone)]
pub struct ExecutorPoint {
    /// Stories in the run.
    pub stories: usize,
    /// The child's report.
    pub probe: ExecutorProbe,
}

/// The scenario's results.
#[derive(Debug, Clone)]
pub struct MemoryResults {
    /// Per backend: the log readers and the follower.
    pub backends: Vec<(Backend, Measured<MemoryFigures>)>,
    /// Per backend: the executor, one point per run size.
    pub executors: Vec<(Backend, Measured<Vec<ExecutorPoint>>)>,
    /// Run sizes of the executor.
    pub executor_stories: Vec<usize>,
}

/// Runs the log readers and the follower on SQLite, and on PostgreSQL when the profile says
/// so; the executor on [`EXECUTOR_BACKENDS`].
pub async fn run(servers: &Servers, profile: &Profile) -> MemoryResults {
    let mut which = vec![Backend::Sqlite];
    if profile.memory_on_postgres {
        which.push(Backend::Postgres);
    }
    // Built before anything is measured, so that the compiler never runs beside a measurement.
    eprintln!(
        "[run-bench] memory: building run-engine for `logs --follow` (quick when up to date; \
         waits for any other cargo holding the build lock)"
    );
    let binary = run_engine_binary().await.map_err(|e| format!("{e:#}"));
    if let Err(why) = &binary {
        eprintln!("[run-bench] memory: `logs --follow` will not be measured: {why}");
    }
    let mut backends = Vec::new();
    for backend in which {
        eprintln!(
            "[run-bench] memory, {} log: {}",
            fmt_bytes(profile.memory_log_bytes),
            backend.name()
        );
        let measured = servers
            .measure(backend, async |bench| {
                measure_on(bench, profile, binary.as_deref().map_err(String::as_str)).await
            })
            .await;
        backends.push((backend, measured));
    }
    let sizes = profile.executor_memory_stories.to_vec();
    let mut executors = Vec::new();
    for backend in EXECUTOR_BACKENDS {
        eprintln!(
            "[run-bench] memory, executor on {} stories: {}",
            sizes
                .iter()
                .map(|n| fmt_count(*n as f64))
                .collect::<Vec<_>>()
                .join(" and "),
            backend.name()
        );
        let measured = servers
            .measure(backend, async |bench| executor_on(bench, &sizes).await)
            .await;
        executors.push((backend, measured));
    }
    MemoryResults {
        backends,
        executors,
        executor_stories: sizes,
    }
}

async fn measure_on(
    bench: &BenchDb,
    profile: &Profile,
    binary: Result<&Path, &str>,
) -> anyhow::Result<MemoryFigures> {
    let run_id = prefilled_run(&bench.db, profile.memory_log_bytes).await?;
    let mut probes: Vec<(Reader, Vec<Probe>)> =
        Reader::ALL.iter().map(|r| (*r, Vec::new())).collect();
    for repeat in 0..REPEATS {
        // Alternate the order, so that neither always reads a colder page cache.
        let order = if repeat % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let reader = probes[i].0;
            let p = spawn_probe(&bench.url, run_id, reader).await?;
            probes[i].1.push(p);
        }
    }
    let follower = match binary {
        Err(why) => Err(why.to_owned()),
        Ok(binary) => follow(bench, binary, run_id)
            .await
            .map_err(|e| format!("{e:#}")),
    };
    Ok(MemoryFigures {
        log_bytes: profile.memory_log_bytes,
        probes,
        follower,
    })
}

/// `run-engine logs --follow` on run `run_id` (marked completed first) and on a finished run
/// with an empty log, [`REPEATS`] times each.
async fn follow(bench: &BenchDb, binary: &Path, run_id: Uuid) -> anyhow::Result<FollowerFigures> {
    mark_completed(&bench.db, run_id).await?;
    let empty_run = prefilled_run(&bench.db, 0).await?;
    mark_completed(&bench.db, empty_run).await?;
    let mut figures = FollowerFigures {
        empty: Vec::new(),
        full: Vec::new(),
    };
    for _ in 0..REPEATS {
        figures
            .empty
            .push(spawn_follower(binary, &bench.url, empty_run).await?);
        figures
            .full
            .push(spawn_follower(binary, &bench.url, run_id).await?);
    }
    Ok(figures)
}

/// The executor on a new run of each size, one child process each, smallest first.
async fn executor_on(bench: &BenchDb, sizes: &[usize]) -> anyhow::Result<Vec<ExecutorPoint>> {
    let mut points = Vec::new();
    for &stories in sizes {
        let run_id = new_run(&bench.db, stories).await?;
        let probe = spawn_executor_probe(&bench.url, run_id).await?;
        ensure!(
            probe.stories == stories as u64,
            "the executor recorded {} of {stories} stories",
            probe.stories
        );
        points.push(ExecutorPoint { stories, probe });
    }
    Ok(points)
}

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// A KiB figure in MiB, or in KiB when under 1 MiB either way.
fn mib_or_kib(kib: f64) -> String {
    if kib.abs() < 1024.0 {
        format!("{kib:.0} KiB")
    } else {
        mib(kib)
    }
}

/// `median (min–max)` of KiB figures, in MiB.
fn mib_summary(s: &Summary) -> String {
    format!("{} ({}–{})", mib(s.median), mib(s.min), mib(s.max))
}

/// `median (min–max)` of seconds.
fn secs_summary(s: &Summary) -> String {
    format!(
        "{} ({}–{})",
        fmt_secs(s.median),
        fmt_secs(s.min),
        fmt_secs(s.max)
    )
}

/// The label of the follower's rows.
const FOLLOWER_LABEL: &str = "`run-engine logs --follow` (CLI, stdout to /dev/null)";

impl MemoryResults {
    /// The report section.
    pub fn section(&self) -> Section {
        let mut body = format!(
            "Each read runs in a fresh child process ({REPEATS} per reader, alternating), which \
             connects, notes its resident set, reads the whole log of ~100-byte lines, and \
             reports its peak resident set (`VmHWM`). *Growth* is the peak minus the resident \
             set before reading. Median (min–max) over the processes.\n\n\
             The follower is the real command-line tool, `run-engine logs <run> --follow`, on \
             the same log after the bench run's status is set to `completed` (a plain UPDATE), \
             so that it prints the whole log and ends; its output goes to `/dev/null`. A wrapper \
             process spawns only it, waits for it and reads its peak from \
             `getrusage(RUSAGE_CHILDREN)` ({REPEATS} runs). The wrapper cannot see its resident \
             set before reading, so its growth is its peak minus the median peak of the same \
             command following a finished run with an empty log; its time includes starting, \
             connecting, the migration check and one 250 ms poll after the end.\n\n"
        );
        let mut t = Table::new(&[
            "backend",
            "log (messages)",
            "reader",
            "peak RSS",
            "growth",
            "time",
            "text produced",
        ]);
        for (backend, measured) in &self.backends {
            let figures = match measured {
                Measured::Done(f) => f,
                other => {
                    t.row(vec![
                        backend.name().into(),
                        other.missing().map(|m| one_line(&m)).unwrap_or_default(),
                    ]);
                    continue;
                }
            };
            for (reader, probes) in &figures.probes {
                let peak =
                    Summary::of(&probes.iter().map(|p| p.peak_kib as f64).collect::<Vec<_>>());
                let growth = Summary::of(
                    &probes
                        .iter()
                        .map(|p| p.peak_kib.saturating_sub(p.start_rss_kib) as f64)
                        .collect::<Vec<_>>(),
                );
                let secs = Summary::of(&probes.iter().map(|p| p.secs).collect::<Vec<_>>());
                let (lines, bytes) = probes.first().map_or((0, 0), |p| (p.lines, p.bytes));
                t.row(vec![
                    backend.name().into(),
                    fmt_bytes(figures.log_bytes),
                    reader.label().into(),
                    mib_summary(&peak),
                    mib_summary(&growth),
                    secs_summary(&secs),
                    format!("{} lines, {}", fmt_count(lines as f64), fmt_bytes(bytes)),
                ]);
            }
            match &figures.follower {
                Ok(f) => {
                    let secs = Summary::of(&f.full.iter().map(|p| p.secs).collect::<Vec<_>>());
                    t.row(vec![
                        backend.name().into(),
                        fmt_bytes(figures.log_bytes),
                        FOLLOWER_LABEL.into(),
                        mib_summary(&f.peak()),
                        mib_summary(&f.growth()),
                        secs_summary(&secs),
                        "the same lines, to /dev/null".into(),
                    ]);
                }
                Err(_) => t.row(vec![
                    backend.name().into(),
                    fmt_bytes(figures.log_bytes),
                    FOLLOWER_LABEL.into(),
                    "not measured (see below)".into(),
                ]),
            }
        }
        body.push_str(&t.to_markdown());
        for (backend, measured) in &self.backends {
            let Some(f) = measured.done() else { continue };
            let median_of = |ps: &[Probe], of: fn(&Probe) -> f64| {
                median(&ps.iter().map(of).collect::<Vec<_>>())
            };
            let growth = |p: &Probe| p.peak_kib.saturating_sub(p.start_rss_kib) as f64;
            let peak = |p: &Probe| p.peak_kib as f64;
            let (string, stream) = (f.of(Reader::WholeString), f.of(Reader::Stream));
            let string_growth = median_of(string, growth);
            let text = f
                .probes
                .iter()
                .find_map(|(_, ps)| ps.first().map(|p| p.bytes))
                .unwrap_or(0);
            let _ = write!(
                body,
                "\nOn {}, building the String grows the process by {} against {} for the \
                 streamed read of the same {} log: the stream holds one page of 1,000 lines at \
                 a time, the String the whole text ({}) at once.\n",
                backend.name(),
                mib(string_growth),
                mib(median_of(stream, growth)),
                fmt_bytes(f.log_bytes),
                fmt_bytes(text),
            );
            match &f.follower {
                Ok(follower) => {
                    let (fpeak, fgrowth) = (follower.peak().median, follower.growth().median);
                    let stream_growth = median_of(stream, growth);
                    // Nearer the streamed reader's growth than the String reader's: it does not
                    // hold the whole log.
                    let verdict = if fgrowth < (stream_growth + string_growth) / 2.0 {
                        format!(
                            "its growth is near the streamed reader's ({}), not the String \
                             reader's ({}): the follower holds one page at a time",
                            mib(stream_growth),
                            mib(string_growth)
                        )
                    } else {
                        format!(
                            "its growth is nearer the String reader's ({}) than the streamed \
                             reader's ({}): the follower does not hold to one page at a time",
                            mib(string_growth),
                            mib(stream_growth)
                        )
                    };
                    let _ = write!(
                        body,
                        "\nOn {}, `run-engine logs --follow` peaks at {} ({} above the same \
                         command on an empty log) against {} for the String reader's process and \
                         {} for the streamed reader's: {verdict}.\n",
                        backend.name(),
                        mib(fpeak),
                        mib(fgrowth),
                        mib(median_of(string, peak)),
                        mib(median_of(stream, peak)),
                    );
                }
                Err(why) => {
                    let _ = write!(
                        body,
                        "\nOn {}, `run-engine logs --follow` was not measured: {why}\n",
                        backend.name()
                    );
                }
            }
        }
        self.executor_part(&mut body);
        Section {
            title: "6. Memory: reading and following a large log; executing a large run".into(),
            body,
        }
    }

    /// The executor's table and sentences.
    fn executor_part(&self, body: &mut String) {
        let sizes = self
            .executor_stories
            .iter()
            .map(|n| fmt_count(*n as f64))
            .collect::<Vec<_>>()
            .join(" and ");
        let _ = write!(
            body,
            "\n### Executor\n\n`run_engine::Executor` with {EXECUTOR_WORKERS} workers and an \
             in-process handler that returns `Completed` at once, on a run of {sizes} no-op \
             stories, one fresh child process per run (created beforehand by the parent), which \
             connects, notes its resident set, executes the run to completion and reports its \
             peak (`VmHWM`). One process per size.\n\n"
        );
        let mut t = Table::new(&[
            "backend",
            "stories",
            "workers",
            "RSS before",
            "peak RSS",
            "growth",
            "time",
            "stories/s",
        ]);
        for (backend, measured) in &self.executors {
            match measured {
                Measured::Done(points) => {
                    for p in points {
                        t.row(vec![
                            backend.name().into(),
                            fmt_count(p.stories as f64),
                            EXECUTOR_WORKERS.to_string(),
                            mib(p.probe.start_rss_kib as f64),
                            mib(p.probe.peak_kib as f64),
                            mib(p.probe.growth_kib() as f64),
                            fmt_secs(p.probe.secs),
                            fmt_rate(p.stories as f64 / p.probe.secs.max(f64::MIN_POSITIVE)),
                        ]);
                    }
                }
                other => t.row(vec![
                    backend.name().into(),
                    other.missing().map(|m| one_line(&m)).unwrap_or_default(),
                ]),
            }
        }
        body.push_str(&t.to_markdown());
        for (backend, measured) in &self.executors {
            let Some(points) = measured.done() else {
                continue;
            };
            let (Some(small), Some(large)) = (points.first(), points.last()) else {
                continue;
            };
            if large.stories <= small.stories {
                continue;
            }
            let (g1, g2) = (
                small.probe.growth_kib() as f64,
                large.probe.growth_kib() as f64,
            );
            let extra = (large.stories - small.stories) as f64;
            let per_story = (g2 - g1) * 1024.0 / extra;
            let trend = if g2 > g1 {
                format!(
                    "{} more for {} more stories, about {} bytes per additional story",
                    mib_or_kib(g2 - g1),
                    fmt_count(extra),
                    fmt_count(per_story)
                )
            } else {
                format!(
                    "no growth with {} more stories (difference {})",
                    fmt_count(extra),
                    mib_or_kib(g2 - g1)
                )
            };
            let _ = write!(
                body,
                "\nOn {}, the executor grows by {} on {} stories and by {} on {} ({:.0}× the \
                 stories, peaks {} and {}): {trend}.\n",
                backend.name(),
                mib(g1),
                fmt_count(small.stories as f64),
                mib(g2),
                fmt_count(large.stories as f64),
                large.stories as f64 / small.stories as f64,
                mib(small.probe.peak_kib as f64),
                mib(large.probe.peak_kib as f64),
            );
        }
    }
}

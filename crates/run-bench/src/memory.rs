//! Scenario 6: peak memory of reading a large log, streamed vs built as one `String`.
//!
//! [`run_domain::write_run_log`] pages through the log into a writer (here a sink that only
//! counts bytes); [`run_domain::read_run_log`] returns the whole log as a `String`. Each read
//! runs in a fresh child process (this binary re-executed with the hidden `memory-probe`
//! subcommand), which reports its peak resident set (`VmHWM` in `/proc/self/status`), so that
//! the two peaks never mix.

use crate::bench_db::{Backend, BenchDb, Measured, Servers};
use crate::log_append::prefilled_run;
use crate::measure::{Profile, Summary};
use crate::report::{Section, Table, fmt_bytes, fmt_count, fmt_secs};
use anyhow::{Context, anyhow, bail};
use std::fmt::Write as _;
use std::time::Instant;
use uuid::Uuid;

/// The hidden subcommand the parent re-executes this binary with.
pub const PROBE_SUBCOMMAND: &str = "memory-probe";

/// Child processes per reader and backend.
pub const REPEATS: usize = 3;

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
    /// assert_eq!(Probe::parse(&p.to_line()).unwrap(), p);
    /// ```
    pub fn to_line(&self) -> String {
        format!(
            "probe start_rss_kib={} peak_kib={} lines={} bytes={} secs={}",
            self.start_rss_kib, self.peak_kib, self.lines, self.bytes, self.secs
        )
    }

    /// Parses [`Probe::to_line`]'s output.
    pub fn parse(line: &str) -> anyhow::Result<Probe> {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| anyhow!("no {name} in probe output {line:?}"))
        };
        Ok(Probe {
            start_rss_kib: field("start_rss_kib")?.parse()?,
            peak_kib: field("peak_kib")?.parse()?,
            lines: field("lines")?.parse()?,
            bytes: field("bytes")?.parse()?,
            secs: field("secs")?.parse()?,
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

/// Runs one child process and returns its report.
async fn spawn_probe(url: &str, run_id: Uuid, reader: Reader) -> anyhow::Result<Probe> {
    let exe = std::env::current_exe().context("locating the run-bench binary")?;
    let out = tokio::process::Command::new(exe)
        .args([
            PROBE_SUBCOMMAND,
            "--url",
            url,
            "--run-id",
            &run_id.to_string(),
            "--reader",
            reader.arg(),
        ])
        .output()
        .await
        .context("starting the memory probe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "memory probe ({}) failed with {}: {}",
            reader.arg(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with("probe "))
        .ok_or_else(|| anyhow!("memory probe printed no report: {stdout:?}"))?;
    Probe::parse(line)
}

/// The figures of one backend.
#[derive(Debug, Clone)]
pub struct MemoryFigures {
    /// Bytes of messages in the log.
    pub log_bytes: u64,
    /// Reports per reader, in [`Reader::ALL`] order.
    pub probes: Vec<(Reader, Vec<Probe>)>,
}

/// The scenario's results.
#[derive(Debug, Clone)]
pub struct MemoryResults {
    /// Per backend.
    pub backends: Vec<(Backend, Measured<MemoryFigures>)>,
}

/// Runs the scenario on SQLite, and on PostgreSQL when the profile says so.
pub async fn run(servers: &Servers, profile: &Profile) -> MemoryResults {
    let mut backends = Vec::new();
    let mut which = vec![Backend::Sqlite];
    if profile.memory_on_postgres {
        which.push(Backend::Postgres);
    }
    for backend in which {
        eprintln!(
            "[run-bench] memory, {} log: {}",
            fmt_bytes(profile.memory_log_bytes),
            backend.name()
        );
        let measured = servers
            .measure(backend, async |bench| measure_on(bench, profile).await)
            .await;
        backends.push((backend, measured));
    }
    MemoryResults { backends }
}

async fn measure_on(bench: &BenchDb, profile: &Profile) -> anyhow::Result<MemoryFigures> {
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
    Ok(MemoryFigures {
        log_bytes: profile.memory_log_bytes,
        probes,
    })
}

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

impl MemoryResults {
    /// The report section.
    pub fn section(&self) -> Section {
        let mut body = format!(
            "Each read runs in a fresh child process ({REPEATS} per reader, alternating), which \
             connects, notes its resident set, reads the whole log of ~100-byte lines, and \
             reports its peak resident set (`VmHWM`). *Growth* is the peak minus the resident \
             set before reading. Median (min–max) over the processes.\n\n"
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
                        other.missing().unwrap_or_default(),
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
                    format!("{} ({}–{})", mib(peak.median), mib(peak.min), mib(peak.max)),
                    format!(
                        "{} ({}–{})",
                        mib(growth.median),
                        mib(growth.min),
                        mib(growth.max)
                    ),
                    format!(
                        "{} ({}–{})",
                        fmt_secs(secs.median),
                        fmt_secs(secs.min),
                        fmt_secs(secs.max)
                    ),
                    format!("{} lines, {}", fmt_count(lines as f64), fmt_bytes(bytes)),
                ]);
            }
        }
        body.push_str(&t.to_markdown());
        for (backend, measured) in &self.backends {
            let Some(f) = measured.done() else { continue };
            let median_growth = |r: Reader| {
                f.probes
                    .iter()
                    .find(|(reader, _)| *reader == r)
                    .map(|(_, ps)| {
                        Summary::of(
                            &ps.iter()
                                .map(|p| p.peak_kib.saturating_sub(p.start_rss_kib) as f64)
                                .collect::<Vec<_>>(),
                        )
                        .median
                    })
                    .unwrap_or(f64::NAN)
            };
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
                mib(median_growth(Reader::WholeString)),
                mib(median_growth(Reader::Stream)),
                fmt_bytes(f.log_bytes),
                fmt_bytes(text),
            );
        }
        Section {
            title: "6. Memory: streaming vs building the whole log".into(),
            body,
        }
    }
}

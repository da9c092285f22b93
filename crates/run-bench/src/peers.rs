//! Peer job queues on the same PostgreSQL server: graphile-worker (npm) and pgqueuer (PyPI),
//! each draining a queue of no-op jobs, so that the executor's figures stand next to real
//! queues measured in the same run.
//!
//! [`Peers::install`] puts pinned versions into a scratch folder
//! ([`default_dir`], `target/run-bench-peers` under the workspace) with the ordinary clients:
//! `npm install --no-audit --no-fund graphile-worker@`[`GRAPHILE_WORKER_VERSION`] and
//! `python3 -m pip install --target DIR/py pgqueuer==`[`PGQUEUER_VERSION`]` asyncpg`, and
//! writes the two driver scripts (embedded in the binary) beside them. A folder that already
//! has the pinned versions is not installed again. A missing `npm` or `pip`, or a failed
//! install, skips that peer with a one-sentence reason ([`Peers::available`]).
//!
//! [`Peers::drain`] runs one script on a fresh empty database (a
//! [`BenchDb`](crate::bench_db::BenchDb) on PostgreSQL): the script installs its queue's
//! schema, enqueues the jobs in bulk before timing, times the drain at the given concurrency,
//! checks the queue is empty, and prints one JSON line, from which the jobs/s are read:
//!
//! ```text
//! {"peer":"graphile-worker","version":"0.17.3","batched":true,"jobs":10000,"concurrency":4,"seconds":0.48,"jobs_per_s":20891.7}
//! ```

use anyhow::{Context, anyhow, bail};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The graphile-worker version installed from npm.
pub const GRAPHILE_WORKER_VERSION: &str = "0.17.3";

/// The pgqueuer version installed from PyPI (asyncpg, its driver here, is unpinned).
pub const PGQUEUER_VERSION: &str = "1.6.0";

/// How long one drain may take before its process is killed and the drain fails.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// The graphile-worker driver script (`peers/graphile.mjs`).
const GRAPHILE_SCRIPT: &str = include_str!("../peers/graphile.mjs");

/// The pgqueuer driver script (`peers/pgqueuer_bench.py`).
const PGQUEUER_SCRIPT: &str = include_str!("../peers/pgqueuer_bench.py");

const GRAPHILE_FILE: &str = "graphile.mjs";
const PGQUEUER_FILE: &str = "pgqueuer_bench.py";

/// The folder Python packages are installed into, under the scratch folder.
const PY_DIR: &str = "py";

/// The scratch folder [`Peers::install`] uses by default: `target/run-bench-peers` under the
/// workspace this crate was built in.
pub fn default_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    // crates/run-bench -> the workspace root.
    let workspace = manifest.ancestors().nth(2).unwrap_or(manifest);
    workspace.join("target").join("run-bench-peers")
}

/// One peer configuration measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// graphile-worker with the settings of its own perf test: a local queue of 500 jobs
    /// fetched at once, and completions batched (`completeJobBatchDelay: 0`).
    GraphileBatched,
    /// graphile-worker with its defaults: one `get_job` and one `complete_job` a job.
    GraphileDefault,
    /// pgqueuer with its defaults: one consumer (`QueueManager`, own connection) per worker,
    /// dequeuing 10 jobs a statement and logging completions in batches.
    Pgqueuer,
}

impl Peer {
    /// Every peer configuration, in the order the report lists them.
    pub const ALL: [Peer; 3] = [Peer::GraphileBatched, Peer::GraphileDefault, Peer::Pgqueuer];

    /// The name shown in the report.
    pub fn name(self) -> &'static str {
        match self {
            Peer::GraphileBatched => "graphile-worker (localQueue 500, batched completion)",
            Peer::GraphileDefault => "graphile-worker (defaults)",
            Peer::Pgqueuer => "pgqueuer",
        }
    }

    /// The package and its pinned version, e.g. `graphile-worker 0.17.3`.
    pub fn package(self) -> String {
        match self {
            Peer::GraphileBatched | Peer::GraphileDefault => {
                format!("graphile-worker {GRAPHILE_WORKER_VERSION}")
            }
            Peer::Pgqueuer => format!("pgqueuer {PGQUEUER_VERSION}"),
        }
    }
}

/// The peers installed in a scratch folder, or why each was skipped.
#[derive(Debug, Clone)]
pub struct Peers {
    dir: PathBuf,
    graphile: Result<(), String>,
    pgqueuer: Result<(), String>,
}

impl Peers {
    /// Installs the pinned peers into `dir` (created if need be) unless they are already
    /// there, and writes the driver scripts into it. Never fails: a peer that cannot be
    /// installed is recorded as skipped, with the reason, and its installer's output is
    /// printed to stderr.
    ///
    /// Blocks while the installers run (seconds; nothing when already installed), so call
    /// it before measuring, or from `tokio::task::spawn_blocking`.
    pub fn install(dir: &Path) -> Peers {
        let dir = dir.to_path_buf();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            let reason = format!("cannot create {}: {e}", dir.display());
            return Peers {
                graphile: Err(format!("graphile-worker: skipped, {reason}")),
                pgqueuer: Err(format!("pgqueuer: skipped, {reason}")),
                dir,
            };
        }
        let graphile = install_graphile(&dir).map_err(|e| format!("graphile-worker: skipped, {e}"));
        let pgqueuer = install_pgqueuer(&dir).map_err(|e| format!("pgqueuer: skipped, {e}"));
        Peers {
            dir,
            graphile,
            pgqueuer,
        }
    }

    /// The scratch folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `peer` can be measured; if not, the one-sentence reason it is skipped.
    pub fn available(&self, peer: Peer) -> Result<(), String> {
        match peer {
            Peer::GraphileBatched | Peer::GraphileDefault => self.graphile.clone(),
            Peer::Pgqueuer => self.pgqueuer.clone(),
        }
    }

    /// Drains `jobs` no-op jobs with `peer` at concurrency `workers` on the PostgreSQL
    /// database at `url`, which should be fresh and empty (the script installs its schema
    /// there), and returns the jobs per second. Enqueueing is not timed; the drain is, from
    /// the start of the peer's workers until every job has completed.
    ///
    /// Fails if the peer was skipped, its process fails or prints no result line, or it
    /// takes longer than [`DRAIN_TIMEOUT`] (the process is then killed); the error carries
    /// the process's stderr.
    pub async fn drain(
        &self,
        peer: Peer,
        url: &str,
        workers: usize,
        jobs: usize,
    ) -> anyhow::Result<f64> {
        self.available(peer).map_err(|reason| anyhow!(reason))?;
        let mut command = match peer {
            Peer::GraphileBatched | Peer::GraphileDefault => {
                let mut command = tokio::process::Command::new("node");
                command.arg(self.dir.join(GRAPHILE_FILE));
                command
            }
            Peer::Pgqueuer => {
                let mut command = tokio::process::Command::new("python3");
                command
                    .arg(self.dir.join(PGQUEUER_FILE))
                    .env("PYTHONPATH", self.dir.join(PY_DIR))
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                command
            }
        };
        command
            .arg("--url")
            .arg(url)
            .arg("--jobs")
            .arg(jobs.to_string())
            .arg("--concurrency")
            .arg(workers.to_string());
        if peer == Peer::GraphileBatched {
            command.arg("--batched");
        }
        command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);

        let label = format!("{} ({} workers)", peer.name(), workers);
        // On a time-out the future is dropped, which kills the process (kill_on_drop).
        let output = tokio::time::timeout(DRAIN_TIMEOUT, command.output())
            .await
            .map_err(|_| anyhow!("{label}: no result within {} s", DRAIN_TIMEOUT.as_secs()))?
            .with_context(|| format!("{label}: starting the script"))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("{label}: {}: {}", output.status, stderr.trim());
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .ok_or_else(|| anyhow!("{label}: no result line; stderr: {}", stderr.trim()))?;
        let result = parse_result(line).with_context(|| format!("{label}: result {line:?}"))?;
        if result.jobs != jobs {
            bail!("{label}: drained {} jobs, not {jobs}", result.jobs);
        }
        Ok(result.jobs_per_s)
    }
}

/// The figures of a script's JSON result line that the harness uses.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainResult {
    /// Jobs drained.
    pub jobs: usize,
    /// Jobs per second.
    pub jobs_per_s: f64,
}

/// Reads `jobs` and `jobs_per_s` from a script's one-line JSON result.
pub fn parse_result(line: &str) -> anyhow::Result<DrainResult> {
    let number = |key: &str| -> anyhow::Result<f64> {
        let raw = json_field(line, key).ok_or_else(|| anyhow!("no \"{key}\""))?;
        raw.parse::<f64>()
            .map_err(|_| anyhow!("\"{key}\" is not a number: {raw}"))
    };
    let jobs = number("jobs")?;
    let jobs_per_s = number("jobs_per_s")?;
    if jobs < 0.0 || jobs.fract() != 0.0 {
        bail!("\"jobs\" is not a count: {jobs}");
    }
    if !jobs_per_s.is_finite() || jobs_per_s <= 0.0 {
        bail!("\"jobs_per_s\" is not a positive rate: {jobs_per_s}");
    }
    Ok(DrainResult {
        jobs: jobs as usize,
        jobs_per_s,
    })
}

/// The raw text of a top-level number or plain string field of a flat JSON object on one
/// line (no nesting, no escapes: what the scripts print); strings come back unquoted.
fn json_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let mut rest = line;
    loop {
        let at = rest.find(&quoted)?;
        let after = rest[at + quoted.len()..].trim_start();
        rest = &rest[at + quoted.len()..];
        // A key is followed by a colon; the same text as a value is not.
        let Some(value) = after.strip_prefix(':') else {
            continue;
        };
        let value = value.trim_start();
        return if let Some(string) = value.strip_prefix('"') {
            string.find('"').map(|end| &string[..end])
        } else {
            let end = value
                .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
                .unwrap_or(value.len());
            Some(&value[..end])
        };
    }
}

/// Runs an installer or probe, output captured. `Err` says why, in a phrase; a failed run's
/// output is printed to stderr.
fn run_quietly(command: &mut Command, what: &str) -> Result<Output, String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => format!("{what} not found"),
            _ => format!("{what} could not be started: {e}"),
        })?;
    if output.status.success() {
        return Ok(output);
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("[run-bench] peers: {what} failed ({}):", output.status);
    for line in text.lines() {
        eprintln!("[run-bench]   {line}");
    }
    // npm and pip both say what went wrong first (`npm error code ECONNREFUSED`, `ERROR:
    // No matching distribution ...`); the rest is printed above.
    match text.lines().map(str::trim).find(|line| !line.is_empty()) {
        Some(first) => Err(format!("{what} failed ({}): {first}", output.status)),
        None => Err(format!("{what} failed ({})", output.status)),
    }
}

/// Installs graphile-worker into `dir/node_modules` unless the pinned version is there.
fn install_graphile(dir: &Path) -> Result<(), String> {
    write_script(dir, GRAPHILE_FILE, GRAPHILE_SCRIPT)?;
    run_quietly(Command::new("node").arg("--version"), "node")?;
    if installed_graphile_version(dir).as_deref() == Some(GRAPHILE_WORKER_VERSION) {
        return Ok(());
    }
    run_quietly(Command::new("npm").arg("--version"), "npm")?;
    // A package.json of its own keeps npm from installing into a parent folder's project.
    let manifest = dir.join("package.json");
    if !manifest.exists() {
        std::fs::write(
            &manifest,
            "{\n  \"name\": \"run-bench-peers\",\n  \"private\": true\n}\n",
        )
        .map_err(|e| format!("cannot write {}: {e}", manifest.display()))?;
    }
    run_quietly(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .arg(format!("graphile-worker@{GRAPHILE_WORKER_VERSION}"))
            .current_dir(dir),
        "npm install",
    )?;
    match installed_graphile_version(dir) {
        Some(version) if version == GRAPHILE_WORKER_VERSION => Ok(()),
        Some(version) => Err(format!(
            "npm installed graphile-worker {version}, not {GRAPHILE_WORKER_VERSION}"
        )),
        None => Err("npm install left no graphile-worker in node_modules".to_owned()),
    }
}

/// The graphile-worker version in `dir/node_modules`, if any.
fn installed_graphile_version(dir: &Path) -> Option<String> {
    let manifest = dir
        .join("node_modules")
        .join("graphile-worker")
        .join("package.json");
    let text = std::fs::read_to_string(manifest).ok()?;
    // "version" is a top-level key near the start of graphile-worker's package.json, before
    // any nested object that could hold another.
    let flat = text.replace('\n', " ");
    json_field(&flat, "version").map(str::to_owned)
}

/// Installs pgqueuer and asyncpg into `dir/py` unless the pinned pgqueuer and an asyncpg are
/// there.
fn install_pgqueuer(dir: &Path) -> Result<(), String> {
    write_script(dir, PGQUEUER_FILE, PGQUEUER_SCRIPT)?;
    let py = dir.join(PY_DIR);
    if pgqueuer_installed(&py) {
        return Ok(());
    }
    run_quietly(Command::new("python3").arg("--version"), "python3")?;
    run_quietly(
        Command::new("python3").args(["-m", "pip", "--version"]),
        "pip (python3 -m pip)",
    )?;
    // Another version, or a broken install: start over rather than mix versions.
    if py.exists() {
        std::fs::remove_dir_all(&py).map_err(|e| format!("cannot remove {}: {e}", py.display()))?;
    }
    run_quietly(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-warn-conflicts",
                "--no-input",
                "--target",
            ])
            .arg(&py)
            .arg(format!("pgqueuer=={PGQUEUER_VERSION}"))
            .arg("asyncpg"),
        "pip install",
    )?;
    if pgqueuer_installed(&py) {
        Ok(())
    } else {
        Err(format!(
            "pip install left no pgqueuer {PGQUEUER_VERSION} and asyncpg in {}",
            py.display()
        ))
    }
}

/// Whether `py` holds pgqueuer at the pinned version and some asyncpg.
fn pgqueuer_installed(py: &Path) -> bool {
    let pinned = py.join(format!("pgqueuer-{PGQUEUER_VERSION}.dist-info"));
    let asyncpg = std::fs::read_dir(py).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("asyncpg-") && name.ends_with(".dist-info")
        })
    });
    pinned.is_dir() && asyncpg
}

/// Writes an embedded script into the scratch folder (always, so that it matches the binary).
fn write_script(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_and_python_result_lines() {
        let node = r#"{"peer":"graphile-worker","version":"0.17.3","batched":true,"jobs":10000,"concurrency":4,"seconds":0.47865919,"jobs_per_s":20891.691226068386}"#;
        assert_eq!(
            parse_result(node).ok(),
            Some(DrainResult {
                jobs: 10000,
                jobs_per_s: 20891.691226068386
            })
        );
        let python = r#"{"peer": "pgqueuer", "version": "1.6.0", "batched": true, "jobs": 10000, "concurrency": 1, "batch_size": 10, "seconds": 2.03, "jobs_per_s": 4911.41}"#;
        assert_eq!(
            parse_result(python).ok(),
            Some(DrainResult {
                jobs: 10000,
                jobs_per_s: 4911.41
            })
        );
        assert_eq!(json_field(python, "version"), Some("1.6.0"));
    }

    #[test]
    fn rejects_lines_without_a_rate() {
        assert!(parse_result(r#"{"jobs": 10}"#).is_err());
        assert!(parse_result(r#"{"jobs": 10, "jobs_per_s": "fast"}"#).is_err());
        assert!(parse_result("Error: connection refused").is_err());
    }

    #[test]
    fn a_key_in_a_value_is_not_a_key() {
        let line = r#"{"peer": "jobs", "jobs": 3, "jobs_per_s": 1.5}"#;
        assert_eq!(json_field(line, "jobs"), Some("3"));
    }
}

//! What the tests that drive the `run-engine` binary share: its processes, polling, and reads
//! of what they did. Their plans come from `run_engine_tests::RunFactory::write_plan`.

#![allow(dead_code)]

use entity::run_story;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_run-engine")
}

/// The command every counted story runs: leaves one uniquely named file per execution in
/// `$MARKER_DIR` (named after the story), then prints a marker line to the run log.
pub fn counted(extra: &str) -> String {
    format!(
        "mktemp \"$MARKER_DIR/$RUN_ENGINE_STORY.XXXXXXXX\" >/dev/null && {extra}echo \"ran $RUN_ENGINE_STORY\""
    )
}

/// Runs `run-engine <args>` to the end; returns (status, stdout, stderr).
pub fn cli(url: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(bin())
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run run-engine");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `run-engine create <plan>`: the new run's id.
pub fn create(url: &str, plan: &Path) -> Uuid {
    let plan = plan.to_str().expect("utf-8 path");
    let (status, stdout, stderr) = cli(url, &["create", plan]);
    assert!(status.success(), "create failed: {stderr}");
    stdout.trim().parse().expect("create prints the run id")
}

/// A `run-engine exec` process; its output goes to files in `dir` (never a pipe nobody reads).
pub struct ExecProcess {
    /// The process.
    pub child: Child,
    /// Its standard output file.
    pub stdout: PathBuf,
    /// Its standard error file.
    pub stderr: PathBuf,
}

impl ExecProcess {
    /// Starts `run-engine exec <run> --workers <workers> --lease-secs <lease>` with
    /// `MARKER_DIR=<dir>`.
    pub fn start(url: &str, run_id: Uuid, workers: u32, lease_secs: u32, dir: &Path) -> Self {
        Self::start_with(url, run_id, workers, lease_secs, dir, &[])
    }

    /// Like [`ExecProcess::start`], with more arguments for `exec`.
    pub fn start_with(
        url: &str,
        run_id: Uuid,
        workers: u32,
        lease_secs: u32,
        dir: &Path,
        extra: &[&str],
    ) -> Self {
        let n = fastrand::u32(..);
        let stdout = dir.join(format!("exec-{n}.out"));
        let stderr = dir.join(format!("exec-{n}.err"));
        let child = Command::new(bin())
            .arg("--database-url")
            .arg(url)
            .args(["exec", &run_id.to_string()])
            .args(["--workers", &workers.to_string()])
            .args(["--lease-secs", &lease_secs.to_string()])
            .args(extra)
            .env_remove("DATABASE_URL")
            .env("MARKER_DIR", dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start run-engine exec");
        ExecProcess {
            child,
            stdout,
            stderr,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it printed on standard error so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until it exits, at most `timeout`; kills it and fails the test after that.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "run-engine exec (pid {}) still running after {timeout:?}; stderr:\n{}",
                    self.pid(),
                    self.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `INT`, `TERM`) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }
}

impl Drop for ExecProcess {
    fn drop(&mut self) {
        // A failed test must not leave a process behind (a stopped one would never end).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.pid().to_string())
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` every 50 ms until it is true; fails the test after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The run's stories in position order.
pub async fn stories(db: &DatabaseConnection, run_id: Uuid) -> Vec<run_story::Model> {
    run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .order_by_asc(run_story::Column::Key)
        .all(db)
        .await
        .expect("read stories")
}

/// How many of the run's stories have `status`.
pub async fn count_status(db: &DatabaseConnection, run_id: Uuid, status: &str) -> usize {
    stories(db, run_id)
        .await
        .iter()
        .filter(|s| s.status == status)
        .count()
}

/// Executions per story key, from the marker files in `dir`.
pub fn executions(dir: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for entry in std::fs::read_dir(dir).expect("read marker dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some((key, _)) = name.split_once('.')
            && key.starts_with('e')
            && key.contains('s')
            && !name.ends_with(".out")
            && !name.ends_with(".err")
            && !name.ends_with(".toml")
        {
            *counts.entry(key.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// The run's whole log as text.
pub async fn log_text(db: &DatabaseConnection, run_id: Uuid) -> String {
    run_domain::read_run_log(db, run_id)
        .await
        .expect("read log")
}

/// How many lines of `log` contain `needle`.
pub fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

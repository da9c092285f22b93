//! The command-line tool's story handler: `sh -c <command>`, its output streamed to the run log.

use crate::handler::{StoryContext, StoryHandler, StoryOutcome};
use crate::log_sink::LogSink;
use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

/// Longest line sent to the log; longer ones are split.
const MAX_LINE_BYTES: usize = 8 * 1024;
/// How long output may still arrive after the shell exited (from processes it left behind).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
/// How long to wait for a killed process group to let go of its pipes.
const WAIT_AFTER_KILL: Duration = Duration::from_secs(5);
/// Lines of standard error quoted in a failed story's error text.
const STDERR_TAIL_LINES: usize = 3;

/// Runs a story's `command` with `sh -c`, in a process group of its own.
///
/// - Standard output and standard error go to the run log line by line (standard error lines
///   marked `stderr:`), in batches.
/// - Exit status 0 completes the story; anything else fails it, with the status and the last
///   lines of standard error as its error.
/// - On cancellation, or when the handler is dropped, the whole process group is killed.
/// - The command sees `RUN_ENGINE_RUN_ID`, `RUN_ENGINE_EPIC`, `RUN_ENGINE_STORY`,
///   `RUN_ENGINE_ATTEMPT` and `RUN_ENGINE_WORKER` in its environment, and the story's own
///   variables (the plan's `env`); it runs in the story's `dir` when it has one (relative to
///   [`ShellHandler::working_dir`], else to the process's working directory).
///
/// ```no_run
/// use run_engine::{Executor, ExecutorConfig, ShellHandler};
/// # fn demo(db: sea_orm::DatabaseConnection) {
/// let executor = Executor::new(db, ShellHandler::default(), ExecutorConfig::default());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ShellHandler {
    /// The shell (default `sh`).
    pub shell: PathBuf,
    /// The working directory of commands (default: the process's).
    pub working_dir: Option<PathBuf>,
}

impl Default for ShellHandler {
    fn default() -> Self {
        ShellHandler {
            shell: PathBuf::from("sh"),
            working_dir: None,
        }
    }
}

/// Kills a process group when dropped, unless disarmed: a dropped handler leaves nothing
/// running.
struct GroupKiller {
    pgid: Option<Pid>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (nobody left in the group) is the usual answer after a clean exit.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {sig} ({})", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended without a status".to_owned(),
    }
}

/// Copies `stream` to the log line by line (invalid UTF-8 replaced, long lines split); returns
/// the last few lines.
async fn pump<R: AsyncRead + Unpin>(stream: R, log: LogSink, marker: &str) -> VecDeque<String> {
    let mut reader = BufReader::new(stream);
    let mut tail = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let (taken, complete) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        let taken = taken.min(room.max(1));
        line.extend_from_slice(&chunk[..taken]);
        reader.consume(taken);
        if complete || line.len() >= MAX_LINE_BYTES {
            emit(&mut line, &log, marker, &mut tail).await;
        }
    }
    if !line.is_empty() {
        emit(&mut line, &log, marker, &mut tail).await;
    }
    tail
}

async fn emit(line: &mut Vec<u8>, log: &LogSink, marker: &str, tail: &mut VecDeque<String>) {
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    let text = String::from_utf8_lossy(line).into_owned();
    line.clear();
    log.line(format!("{marker}{text}")).await;
    if tail.len() == STDERR_TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(text);
}

#[async_trait]
impl StoryHandler for ShellHandler {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        let Some(command) = ctx.story.command.clone().filter(|c| !c.trim().is_empty()) else {
            return StoryOutcome::Failed {
                error: "the story has no command".to_owned(),
            };
        };
        let mut cmd = Command::new(&self.shell);
        cmd.arg("-c")
            .arg(&command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own: killed as one, and a terminal's Ctrl-C reaches only the
            // executor, which decides whether running stories finish.
            .process_group(0)
            .kill_on_drop(true)
            .env("RUN_ENGINE_RUN_ID", ctx.story.run_id.to_string())
            .env("RUN_ENGINE_EPIC", &ctx.epic_key)
            .env("RUN_ENGINE_STORY", &ctx.story.key)
            .env("RUN_ENGINE_ATTEMPT", ctx.attempt.to_string())
            .env("RUN_ENGINE_WORKER", &ctx.worker_id);
        // The story's own variables over the executor's, and its directory relative to the
        // handler's (or the process's) working directory.
        cmd.envs(ctx.env());
        let dir = match (ctx.dir(), &self.working_dir) {
            (Some(own), Some(base)) => Some(base.join(own)),
            (Some(own), None) => Some(own.to_path_buf()),
            (None, base) => base.clone(),
        };
        if let Some(dir) = &dir {
            if !dir.is_dir() {
                return StoryOutcome::Failed {
                    error: format!("the story's directory {} does not exist", dir.display()),
                };
            }
            cmd.current_dir(dir);
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                return StoryOutcome::Failed {
                    error: format!("cannot start {}: {e}", self.shell.display()),
                };
            }
        };
        let mut killer = GroupKiller {
            pgid: child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        };
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return StoryOutcome::Failed {
                error: "the command's output could not be captured".to_owned(),
            };
        };
        let pumps = async {
            let (_, tail) = tokio::join!(
                pump(stdout, ctx.log.clone(), ""),
                pump(stderr, ctx.log.clone(), "stderr: ")
            );
            tail
        };
        tokio::pin!(pumps);
        let wait = child.wait();
        tokio::pin!(wait);

        let mut status: Option<std::io::Result<ExitStatus>> = None;
        let mut tail: Option<VecDeque<String>> = None;
        let mut cancelled = false;
        // After the shell exits (or is killed): how long to wait for the pipes to close.
        let mut give_up: Option<Instant> = None;
        let mut killed = false;
        loop {
            if status.is_some() && tail.is_some() {
                break;
            }
            let deadline = give_up.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                s = &mut wait, if status.is_none() => {
                    status = Some(s);
                    give_up.get_or_insert_with(|| Instant::now() + DRAIN_AFTER_EXIT);
                }
                t = &mut pumps, if tail.is_none() => tail = Some(t),
                _ = ctx.cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    killer.kill();
                    killed = true;
                    give_up = Some(Instant::now() + WAIT_AFTER_KILL);
                }
                _ = tokio::time::sleep_until(deadline), if give_up.is_some() => {
                    if killed {
                        // Something escaped the group and holds the pipes: stop reading.
                        break;
                    }
                    // The shell is gone but left processes holding its output: end them.
                    killer.kill();
                    killed = true;
                    give_up = Some(Instant::now() + WAIT_AFTER_KILL);
                }
            }
        }
        // Whatever the shell left behind in its group goes with it; then disarm, so that the
        // group id, free once its last member is gone, is never signalled again.
        killer.kill();
        killer.pgid = None;
        if cancelled {
            return StoryOutcome::Cancelled;
        }
        match status {
            Some(Ok(s)) if s.success() => StoryOutcome::Completed,
            Some(Ok(s)) => {
                let mut error = describe(&s);
                let tail: Vec<String> = tail.unwrap_or_default().into_iter().collect();
                if !tail.is_empty() {
                    error.push_str(": ");
                    error.push_str(&tail.join(" | "));
                }
                StoryOutcome::Failed { error }
            }
            Some(Err(e)) => StoryOutcome::Failed {
                error: format!("waiting for the command failed: {e}"),
            },
            None => StoryOutcome::Failed {
                error: "the command's output never ended".to_owned(),
            },
        }
    }
}
